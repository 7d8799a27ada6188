/* kd_safetensors: a validating reader and an atomic writer for safetensors files.
 * The reader keeps the whole file in memory and trusts nothing in it; the writer lays tensors
 * out in insertion order. Neither is shared between threads. */
#include "kd_safetensors.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "kd_util.h"

/* The Python/Rust implementation refuses headers above this size; so do we. */
#define KD_ST_MAX_HEADER 100000000ull
/* No real tensor has a dimension this large; rejecting it early keeps the arithmetic simple. */
#define KD_ST_MAX_DIM (1ll << 48)

static const char *const dtype_names[KD_DTYPE_COUNT] = {"F32", "F16", "BF16", "F64",
                                                        "I8",  "U8",  "I32",  "I64"};
static const size_t dtype_sizes[KD_DTYPE_COUNT] = {4, 2, 2, 8, 1, 1, 4, 8};

const char *kd_dtype_name(kd_dtype_t d) {
    return ((int)d >= 0 && d < KD_DTYPE_COUNT) ? dtype_names[d] : "?";
}

int kd_dtype_parse(const char *name, kd_dtype_t *out) {
    for (int i = 0; i < KD_DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_names[i]) == 0) {
            *out = (kd_dtype_t)i;
            return 0;
        }
    }
    return -1;
}

size_t kd_dtype_size(kd_dtype_t d) {
    KD_ASSERT((int)d >= 0 && d < KD_DTYPE_COUNT);
    return dtype_sizes[d];
}

/* ------------------------------------------------------------------------------------------ */
/* Reader                                                                                      */

struct kd_safetensors {
    char *path;
    uint8_t *bytes; /* the whole file */
    size_t len;
    const uint8_t *data; /* data section, inside bytes */
    size_t data_len;
    int n;
    kd_st_tensor_t *tensors; /* sorted by offset: file order */
    int n_meta;
    char **meta_keys;
    char **meta_values;
};

static uint64_t read_u64_le(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int cmp_by_offset(const void *a, const void *b) {
    const kd_st_tensor_t *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

/* Parses one tensor entry into t (t->name already set). */
static int parse_entry(const char *path, const char *name, json_t *v, size_t data_len,
                       kd_st_tensor_t *t, char *err, size_t errlen) {
    if (!json_is_object(v))
        return kd_err(err, errlen, "%s: tensor '%s': entry is not a JSON object", path, name);

    json_t *jd = json_object_get(v, "dtype");
    if (!jd) return kd_err(err, errlen, "%s: tensor '%s': missing \"dtype\"", path, name);
    if (!json_is_string(jd))
        return kd_err(err, errlen, "%s: tensor '%s': \"dtype\" is not a string", path, name);
    if (kd_dtype_parse(json_string_value(jd), &t->dtype) != 0)
        return kd_err(err, errlen,
                      "%s: tensor '%s': unknown dtype '%s' (kdist reads F32, F16, BF16, F64, I8, "
                      "U8, I32, I64)",
                      path, name, json_string_value(jd));

    json_t *js = json_object_get(v, "shape");
    if (!js) return kd_err(err, errlen, "%s: tensor '%s': missing \"shape\"", path, name);
    if (!json_is_array(js))
        return kd_err(err, errlen, "%s: tensor '%s': \"shape\" is not an array", path, name);
    size_t ndim = json_array_size(js);
    if (ndim > KD_ST_MAX_DIMS)
        return kd_err(err, errlen, "%s: tensor '%s': shape has %zu dimensions, at most %d allowed",
                      path, name, ndim, KD_ST_MAX_DIMS);
    t->ndim = (int)ndim;
    uint64_t elems = 1;
    bool overflow = false;
    for (size_t i = 0; i < ndim; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d))
            return kd_err(err, errlen, "%s: tensor '%s': shape[%zu] is not an integer", path, name,
                          i);
        json_int_t dim = json_integer_value(d);
        if (dim < 0 || dim > KD_ST_MAX_DIM)
            return kd_err(err, errlen, "%s: tensor '%s': shape[%zu] = %lld is out of range", path,
                          name, i, (long long)dim);
        t->shape[i] = (int64_t)dim;
        if (__builtin_mul_overflow(elems, (uint64_t)dim, &elems)) overflow = true;
    }
    uint64_t want;
    if (overflow || __builtin_mul_overflow(elems, (uint64_t)dtype_sizes[t->dtype], &want))
        return kd_err(err, errlen, "%s: tensor '%s': element count times dtype size overflows",
                      path, name);

    json_t *jo = json_object_get(v, "data_offsets");
    if (!jo) return kd_err(err, errlen, "%s: tensor '%s': missing \"data_offsets\"", path, name);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return kd_err(err, errlen, "%s: tensor '%s': \"data_offsets\" is not two integers", path,
                      name);
    json_int_t begin = json_integer_value(json_array_get(jo, 0));
    json_int_t end = json_integer_value(json_array_get(jo, 1));
    if (begin < 0 || end < begin)
        return kd_err(err, errlen,
                      "%s: tensor '%s': data_offsets [%lld, %lld] are not two ascending "
                      "non-negative integers",
                      path, name, (long long)begin, (long long)end);
    if ((uint64_t)end > data_len)
        return kd_err(err, errlen,
                      "%s: tensor '%s': data_offsets [%lld, %lld] run past the end of the data "
                      "section (%zu bytes; file truncated?)",
                      path, name, (long long)begin, (long long)end, data_len);
    t->offset = (size_t)begin;
    t->nbytes = (size_t)(end - begin);
    if ((uint64_t)t->nbytes != want)
        return kd_err(err, errlen,
                      "%s: tensor '%s': %zu bytes of data, but dtype %s and its shape need "
                      "%" PRIu64,
                      path, name, t->nbytes, dtype_names[t->dtype], want);
    return 0;
}

static int parse_metadata(kd_safetensors_t *st, json_t *meta, char *err, size_t errlen) {
    if (json_is_null(meta)) return 0;
    if (!json_is_object(meta))
        return kd_err(err, errlen, "%s: \"__metadata__\" is not a JSON object", st->path);
    size_t n = json_object_size(meta);
    st->meta_keys = kd_xcalloc(n ? n : 1, sizeof(char *));
    st->meta_values = kd_xcalloc(n ? n : 1, sizeof(char *));
    const char *key;
    json_t *val;
    json_object_foreach(meta, key, val) {
        if (!json_is_string(val))
            return kd_err(err, errlen, "%s: __metadata__ '%s': value is not a string", st->path,
                          key);
        st->meta_keys[st->n_meta] = kd_xstrdup(key);
        st->meta_values[st->n_meta] = kd_xstrdup(json_string_value(val));
        st->n_meta++;
    }
    return 0;
}

/* Tensors sorted by offset must tile the data section exactly, as the format requires. */
static int check_layout(const kd_safetensors_t *st, char *err, size_t errlen) {
    size_t pos = 0;
    for (int i = 0; i < st->n; i++) {
        const kd_st_tensor_t *t = &st->tensors[i];
        if (t->offset > pos)
            return kd_err(err, errlen,
                          "%s: gap in the data section: bytes [%zu, %zu) before tensor '%s' "
                          "belong to no tensor",
                          st->path, pos, t->offset, t->name);
        if (t->offset < pos) {
            const kd_st_tensor_t *p = &st->tensors[i - 1];
            return kd_err(err, errlen,
                          "%s: tensors '%s' [%zu, %zu) and '%s' [%zu, %zu) overlap in the data "
                          "section",
                          st->path, p->name, p->offset, p->offset + p->nbytes, t->name, t->offset,
                          t->offset + t->nbytes);
        }
        pos = t->offset + t->nbytes;
    }
    if (pos != st->data_len)
        return kd_err(err, errlen,
                      "%s: %zu trailing bytes in the data section after the last tensor (bytes "
                      "[%zu, %zu) belong to no tensor)",
                      st->path, st->data_len - pos, pos, st->data_len);
    return 0;
}

int kd_st_open(const char *path, kd_safetensors_t **out, char *err, size_t errlen) {
    *out = NULL;
    int rc = -1;
    json_t *root = NULL;
    kd_safetensors_t *st = kd_xcalloc(1, sizeof *st);
    st->path = kd_xstrdup(path);
    if (kd_read_file(path, &st->bytes, &st->len, err, errlen) != 0) goto cleanup;
    if (st->len < 8) {
        kd_err(err, errlen, "%s: file is %zu bytes, shorter than the 8-byte header length", path,
               st->len);
        goto cleanup;
    }
    uint64_t hlen = read_u64_le(st->bytes);
    if (hlen > KD_ST_MAX_HEADER) {
        kd_err(err, errlen, "%s: header length %" PRIu64 " is larger than the %llu-byte limit",
               path, hlen, KD_ST_MAX_HEADER);
        goto cleanup;
    }
    if (hlen > st->len - 8) {
        kd_err(err, errlen,
               "%s: header length %" PRIu64 " runs past the end of the file (%zu bytes; "
               "truncated?)",
               path, hlen, st->len);
        goto cleanup;
    }
    st->data = st->bytes + 8 + hlen;
    st->data_len = st->len - 8 - (size_t)hlen;

    json_error_t jerr;
    root = json_loadb((const char *)st->bytes + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        kd_err(err, errlen, "%s: header is not valid JSON: line %d, column %d: %s", path, jerr.line,
               jerr.column, jerr.text);
        goto cleanup;
    }
    if (!json_is_object(root)) {
        kd_err(err, errlen, "%s: header is not a JSON object", path);
        goto cleanup;
    }

    size_t n = json_object_size(root);
    st->tensors = kd_xcalloc(n ? n : 1, sizeof(kd_st_tensor_t));
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (parse_metadata(st, val, err, errlen) != 0) goto cleanup;
            continue;
        }
        kd_st_tensor_t *t = &st->tensors[st->n];
        t->name = kd_xstrdup(key);
        st->n++;
        if (parse_entry(path, key, val, st->data_len, t, err, errlen) != 0) goto cleanup;
    }
    qsort(st->tensors, (size_t)st->n, sizeof(kd_st_tensor_t), cmp_by_offset);
    if (check_layout(st, err, errlen) != 0) goto cleanup;

    *out = st;
    st = NULL;
    rc = 0;
cleanup:
    json_decref(root);
    kd_st_close(&st);
    return rc;
}

void kd_st_close(kd_safetensors_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_safetensors_t *st = *self_p;
    for (int i = 0; i < st->n; i++) free(st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_values[i]);
    }
    free(st->meta_keys);
    free(st->meta_values);
    free(st->bytes);
    free(st->path);
    free(st);
    *self_p = NULL;
}

int kd_st_count(const kd_safetensors_t *st) {
    return st->n;
}

const kd_st_tensor_t *kd_st_tensor(const kd_safetensors_t *st, int i) {
    KD_ASSERT(i >= 0 && i < st->n);
    return &st->tensors[i];
}

const kd_st_tensor_t *kd_st_find(const kd_safetensors_t *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

const void *kd_st_data(const kd_safetensors_t *st, const kd_st_tensor_t *t) {
    KD_ASSERT(t >= st->tensors && t < st->tensors + st->n);
    return st->data + t->offset;
}

const char *kd_st_metadata(const kd_safetensors_t *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_values[i];
    return NULL;
}

const char *kd_st_path(const kd_safetensors_t *st) {
    return st->path;
}

/* ------------------------------------------------------------------------------------------ */
/* Writer                                                                                      */

typedef struct {
    char *name;
    kd_dtype_t dtype;
    int ndim;
    int64_t shape[KD_ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
} st_entry_t;

struct kd_st_writer {
    st_entry_t *entries;
    int n, cap;
    char **meta_keys;
    char **meta_values;
    int n_meta, meta_cap;
};

kd_st_writer_t *kd_st_writer_new(void) {
    return kd_xcalloc(1, sizeof(kd_st_writer_t));
}

void kd_st_writer_destroy(kd_st_writer_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_st_writer_t *w = *self_p;
    for (int i = 0; i < w->n; i++) free(w->entries[i].name);
    free(w->entries);
    for (int i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->meta_keys);
    free(w->meta_values);
    free(w);
    *self_p = NULL;
}

static void *grow(void *p, int *cap, size_t elem) {
    int ncap = *cap ? *cap * 2 : 16;
    void *q = kd_xcalloc((size_t)ncap, elem);
    if (p) memcpy(q, p, (size_t)*cap * elem);
    free(p);
    *cap = ncap;
    return q;
}

void kd_st_writer_add(kd_st_writer_t *w, const char *name, kd_dtype_t dtype, int ndim,
                      const int64_t *shape, const void *data) {
    KD_ASSERT(name && strcmp(name, "__metadata__") != 0);
    KD_ASSERT((int)dtype >= 0 && dtype < KD_DTYPE_COUNT);
    KD_ASSERT(ndim >= 0 && ndim <= KD_ST_MAX_DIMS);
    for (int i = 0; i < w->n; i++) KD_ASSERT(strcmp(w->entries[i].name, name) != 0);
    if (w->n == w->cap) w->entries = grow(w->entries, &w->cap, sizeof(st_entry_t));
    st_entry_t *e = &w->entries[w->n++];
    e->name = kd_xstrdup(name);
    e->dtype = dtype;
    e->ndim = ndim;
    size_t nbytes = dtype_sizes[dtype];
    for (int i = 0; i < ndim; i++) {
        KD_ASSERT(shape[i] >= 0 && shape[i] <= KD_ST_MAX_DIM);
        e->shape[i] = shape[i];
        KD_ASSERT(!__builtin_mul_overflow(nbytes, (size_t)shape[i], &nbytes));
    }
    KD_ASSERT(data || nbytes == 0);
    e->data = data;
    e->nbytes = nbytes;
}

void kd_st_writer_metadata(kd_st_writer_t *w, const char *key, const char *value) {
    for (int i = 0; i < w->n_meta; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) {
            free(w->meta_values[i]);
            w->meta_values[i] = kd_xstrdup(value);
            return;
        }
    }
    if (w->n_meta == w->meta_cap) {
        int cap = w->meta_cap;
        w->meta_keys = grow(w->meta_keys, &cap, sizeof(char *));
        w->meta_values = grow(w->meta_values, &w->meta_cap, sizeof(char *));
    }
    w->meta_keys[w->n_meta] = kd_xstrdup(key);
    w->meta_values[w->n_meta] = kd_xstrdup(value);
    w->n_meta++;
}

int kd_st_writer_write(kd_st_writer_t *w, const char *path, char *err, size_t errlen) {
    int rc = -1;
    char *header = NULL;
    uint8_t *buf = NULL;
    json_t *root = json_object();
    if (w->n_meta > 0) {
        json_t *meta = json_object();
        for (int i = 0; i < w->n_meta; i++)
            json_object_set_new(meta, w->meta_keys[i], json_string(w->meta_values[i]));
        json_object_set_new(root, "__metadata__", meta);
    }
    size_t offset = 0;
    for (int i = 0; i < w->n; i++) {
        const st_entry_t *e = &w->entries[i];
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++) json_array_append_new(shape, json_integer(e->shape[d]));
        json_t *ent = json_object();
        json_object_set_new(ent, "dtype", json_string(dtype_names[e->dtype]));
        json_object_set_new(ent, "shape", shape);
        json_object_set_new(
            ent, "data_offsets",
            json_pack("[II]", (json_int_t)offset, (json_int_t)(offset + e->nbytes)));
        json_object_set_new(root, e->name, ent);
        offset += e->nbytes;
    }
    /* jansson keeps insertion order, so the header lists tensors in file order. */
    header = json_dumps(root, JSON_COMPACT);
    if (!header) {
        kd_err(err, errlen, "%s: cannot encode the safetensors header (invalid UTF-8 in a name?)",
               path);
        goto cleanup;
    }
    size_t hlen = strlen(header);
    size_t padded = (hlen + 7) & ~(size_t)7; /* keeps the data section 8-byte aligned */
    size_t total = 8 + padded + offset;
    buf = kd_xmalloc(total ? total : 1);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, header, hlen);
    memset(buf + 8 + hlen, ' ', padded - hlen);
    uint8_t *p = buf + 8 + padded;
    for (int i = 0; i < w->n; i++) {
        if (w->entries[i].nbytes) memcpy(p, w->entries[i].data, w->entries[i].nbytes);
        p += w->entries[i].nbytes;
    }
    rc = kd_write_file_atomic(path, buf, total, err, errlen);
cleanup:
    free(buf);
    free(header);
    json_decref(root);
    return rc;
}

void kd_st_format_shape(char *out, size_t outlen, int ndim, const int64_t *shape) {
    size_t pos = 0;
    for (int d = -1; d <= ndim && pos < outlen; d++) {
        int n = d < 0 ? snprintf(out + pos, outlen - pos, "[")
                : d == ndim
                    ? snprintf(out + pos, outlen - pos, "]")
                    : snprintf(out + pos, outlen - pos, "%s%" PRId64, d ? ", " : "", shape[d]);
        if (n < 0) return;
        pos += (size_t)n;
    }
}
