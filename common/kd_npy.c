/* kd_npy: 2-D float32 .npy files, written in NumPy format 1.0 and read in 1.0 or 2.0 (see
 * kd_npy.h). Data is stored little-endian whatever the host. No state; thread-safe. */
#include "kd_npy.h"

#include "kd_util.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAGIC     "\x93NUMPY"
#define NPY_MAGIC_LEN 6
/* Pre-header bytes: magic, two version bytes and the header length (2 bytes in v1, 4 in v2). */
#define NPY_V1_PREFIX 10
#define NPY_V2_PREFIX 12
/* numpy aligns the data to 64 bytes so it can be memory-mapped. */
#define NPY_ALIGN 64

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* An array of 4-byte elements (descr '<f4' or '<i4') of any shape, as numpy writes it. */
static int write_npy(const char *path, const char *descr, const void *data, int ndim,
                     const size_t *shape, char *err, size_t errlen) {
    KD_ASSERT(path && ndim >= 1 && ndim <= 8);
    size_t count = 1;
    char dims[200] = "";
    size_t pos = 0;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] != 0 && count > SIZE_MAX / 4 / shape[d])
            return kd_err(err, errlen, "%s: array of %zu x ... values is too large", path, count);
        count *= shape[d];
        pos += (size_t)snprintf(dims + pos, sizeof dims - pos, "%zu,%s", shape[d],
                                d + 1 < ndim ? " " : "");
    }
    if (ndim > 1) dims[pos - 1] = 0; /* (2, 3) but (5,) */
    KD_ASSERT(data || count == 0);
    char dict[256];
    int dlen = snprintf(dict, sizeof dict,
                        "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, dims);
    KD_ASSERT(dlen > 0 && (size_t)dlen < sizeof dict);
    /* Pad with spaces and end with '\n' so that prefix + header is a multiple of 64. */
    size_t hlen = NPY_V1_PREFIX + (size_t)dlen + 1;
    hlen = (hlen + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN - NPY_V1_PREFIX;
    size_t total = NPY_V1_PREFIX + hlen + 4 * count;
    uint8_t *buf = kd_xmalloc(total);
    memcpy(buf, NPY_MAGIC, NPY_MAGIC_LEN);
    buf[6] = 1;
    buf[7] = 0;
    buf[8] = (uint8_t)(hlen & 0xff);
    buf[9] = (uint8_t)(hlen >> 8);
    memcpy(buf + NPY_V1_PREFIX, dict, (size_t)dlen);
    memset(buf + NPY_V1_PREFIX + dlen, ' ', hlen - (size_t)dlen - 1);
    buf[NPY_V1_PREFIX + hlen - 1] = '\n';
    uint8_t *p = buf + NPY_V1_PREFIX + hlen;
    const uint8_t *src = data;
    for (size_t i = 0; i < count; i++, p += 4) {
        uint32_t u;
        memcpy(&u, src + 4 * i, 4);
        p[0] = (uint8_t)u;
        p[1] = (uint8_t)(u >> 8);
        p[2] = (uint8_t)(u >> 16);
        p[3] = (uint8_t)(u >> 24);
    }
    int rc = kd_write_file_atomic(path, buf, total, err, errlen);
    free(buf);
    return rc;
}

int kd_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                     size_t errlen) {
    const size_t shape[2] = {rows, cols};
    return write_npy(path, "<f4", data, 2, shape, err, errlen);
}

int kd_npy_write_f32_nd(const char *path, const float *data, int ndim, const size_t *shape,
                        char *err, size_t errlen) {
    return write_npy(path, "<f4", data, ndim, shape, err, errlen);
}

int kd_npy_write_i32_nd(const char *path, const int32_t *data, int ndim, const size_t *shape,
                        char *err, size_t errlen) {
    return write_npy(path, "<i4", data, ndim, shape, err, errlen);
}

/* A tiny reader for the Python literal numpy writes as its header: a dict of string keys whose
 * values are strings, True/False or tuples of non-negative integers. */
typedef struct {
    const char *p, *end;
} cursor_t;

static void skip_ws(cursor_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int accept(cursor_t *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* Quoted string (either quote); *s points into the header, *n its length. */
static int parse_str(cursor_t *c, const char **s, size_t *n) {
    skip_ws(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return -1;
    char q = *c->p++;
    const char *start = c->p;
    while (c->p < c->end && *c->p != q) c->p++;
    if (c->p >= c->end) return -1;
    *s = start;
    *n = (size_t)(c->p - start);
    c->p++;
    return 0;
}

static int parse_word(cursor_t *c, const char *w) {
    skip_ws(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0) return -1;
    c->p += n;
    return 0;
}

#define NPY_MAX_DIMS 8

/* "(a, b, ...)" with an optional trailing comma; *ndim may exceed 2 so the caller can say so. */
static int parse_shape(cursor_t *c, uint64_t *dims, int *ndim) {
    *ndim = 0;
    if (!accept(c, '(')) return -1;
    for (;;) {
        if (accept(c, ')')) return 0;
        skip_ws(c);
        if (c->p >= c->end || *c->p < '0' || *c->p > '9') return -1;
        uint64_t v = 0;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            if (v > (UINT64_MAX - 9) / 10) return -1;
            v = v * 10 + (uint64_t)(*c->p++ - '0');
        }
        if (*ndim >= NPY_MAX_DIMS) return -1;
        dims[(*ndim)++] = v;
        if (!accept(c, ',')) return accept(c, ')') ? 0 : -1;
    }
}

/* The dtypes kd_npy_read accepts, with their element sizes. */
static const struct {
    const char *descr;
    kd_npy_dtype_t dtype;
    size_t size;
} DTYPES[] = {{"<f4", KD_NPY_F32, 4}, {"<i4", KD_NPY_I32, 4}, {"<i8", KD_NPY_I64, 8}};

int kd_npy_read(const char *path, unsigned accept_dtypes, kd_npy_array_t *out, char *err,
                size_t errlen) {
    KD_ASSERT(path && out);
    memset(out, 0, sizeof *out);
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = -1;
    if (kd_read_file(path, &buf, &len, err, errlen) != 0) return -1;

    if (len < NPY_MAGIC_LEN || memcmp(buf, NPY_MAGIC, NPY_MAGIC_LEN) != 0) {
        kd_err(err, errlen, "%s: not a .npy file (no \\x93NUMPY magic)", path);
        goto cleanup;
    }
    if (len < NPY_V1_PREFIX) {
        kd_err(err, errlen, "%s: .npy file too short (%zu bytes) for its header", path, len);
        goto cleanup;
    }
    size_t prefix, hlen;
    if (buf[6] == 1 && buf[7] == 0) {
        prefix = NPY_V1_PREFIX;
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8;
    } else if (buf[6] == 2 && buf[7] == 0) {
        if (len < NPY_V2_PREFIX) {
            kd_err(err, errlen, "%s: truncated .npy header", path);
            goto cleanup;
        }
        prefix = NPY_V2_PREFIX;
        hlen = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
    } else {
        kd_err(err, errlen, "%s: unsupported .npy format version %d.%d (expected 1.0 or 2.0)", path,
               buf[6], buf[7]);
        goto cleanup;
    }
    if (hlen > len - prefix) {
        kd_err(err, errlen, "%s: truncated .npy header: declares %zu bytes, file has %zu", path,
               hlen, len - prefix);
        goto cleanup;
    }

    cursor_t c = {(const char *)buf + prefix, (const char *)buf + prefix + hlen};
    int have_descr = 0, have_order = 0, have_shape = 0, which = -1;
    uint64_t dims[NPY_MAX_DIMS];
    int ndim = 0;
    if (!accept(&c, '{')) goto bad_header;
    while (!accept(&c, '}')) {
        const char *key, *val;
        size_t klen, vlen;
        if (parse_str(&c, &key, &klen) != 0 || !accept(&c, ':')) goto bad_header;
        if (klen == 5 && memcmp(key, "descr", 5) == 0) {
            if (parse_str(&c, &val, &vlen) != 0) goto bad_header;
            for (int i = 0; i < (int)(sizeof DTYPES / sizeof DTYPES[0]); i++)
                if ((accept_dtypes & DTYPES[i].dtype) && vlen == 3 &&
                    memcmp(val, DTYPES[i].descr, 3) == 0)
                    which = i;
            if (which < 0) {
                kd_err(err, errlen, "%s: dtype '%.*s' not supported: expected %s", path,
                       (int)(vlen > 32 ? 32 : vlen), val,
                       accept_dtypes == KD_NPY_F32  ? "'<f4' (float32)"
                       : accept_dtypes & KD_NPY_F32 ? "'<f4' (float32)"
                                                    : "'<i4' or '<i8' (int32 or int64)");
                goto cleanup;
            }
            have_descr = 1;
        } else if (klen == 13 && memcmp(key, "fortran_order", 13) == 0) {
            if (parse_word(&c, "False") == 0) {
                have_order = 1;
            } else if (parse_word(&c, "True") == 0) {
                kd_err(err, errlen, "%s: fortran_order is True: only C-order arrays are supported",
                       path);
                goto cleanup;
            } else {
                goto bad_header;
            }
        } else if (klen == 5 && memcmp(key, "shape", 5) == 0) {
            if (parse_shape(&c, dims, &ndim) != 0) goto bad_header;
            have_shape = 1;
        } else {
            goto bad_header;
        }
        if (!accept(&c, ',')) {
            if (!accept(&c, '}')) goto bad_header;
            break;
        }
    }
    skip_ws(&c);
    if (c.p != c.end || !have_descr || !have_order || !have_shape) goto bad_header;
    const size_t elem = DTYPES[which].size, data_len = len - prefix - hlen;
    uint64_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (dims[i] != 0 && count > UINT64_MAX / elem / dims[i]) {
            kd_err(err, errlen, "%s: its shape is too large", path);
            goto cleanup;
        }
        count *= dims[i];
    }
    if (count * elem != (uint64_t)data_len) {
        kd_err(err, errlen, "%s: %s: its shape needs %llu bytes of data, found %zu", path,
               data_len < count * elem ? "truncated" : "trailing bytes",
               (unsigned long long)(count * elem), data_len);
        goto cleanup;
    }
    out->dtype = DTYPES[which].dtype;
    out->ndim = ndim;
    for (int i = 0; i < ndim; i++) out->shape[i] = (size_t)dims[i];
    out->count = (size_t)count;
    out->data = kd_xmalloc(data_len ? data_len : 1);
    const uint8_t *p = buf + prefix + hlen; /* little-endian, whatever the host */
    for (size_t i = 0; i < out->count; i++, p += elem) {
        uint32_t lo =
            (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (out->dtype == KD_NPY_F32)
            ((float *)out->data)[i] = bits_f32(lo);
        else if (out->dtype == KD_NPY_I32)
            ((int32_t *)out->data)[i] = (int32_t)lo;
        else
            ((int64_t *)out->data)[i] =
                (int64_t)((uint64_t)lo | (uint64_t)((uint32_t)p[4] | (uint32_t)p[5] << 8 |
                                                    (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24)
                                             << 32);
    }
    rc = 0;
    goto cleanup;

bad_header:
    /* Quote the header, minus its padding, so the user sees what was wrong. */
    while (hlen > 0 && (buf[prefix + hlen - 1] == ' ' || buf[prefix + hlen - 1] == '\n')) hlen--;
    kd_err(err, errlen, "%s: malformed .npy header: %.*s", path, (int)(hlen > 160 ? 160 : hlen),
           (const char *)buf + prefix);
cleanup:
    free(buf);
    return rc;
}

int kd_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, char *err,
                    size_t errlen) {
    KD_ASSERT(path && data && rows && cols);
    *data = NULL;
    *rows = *cols = 0;
    kd_npy_array_t a;
    if (kd_npy_read(path, KD_NPY_F32, &a, err, errlen) != 0) return -1;
    if (a.ndim != 2) {
        kd_err(err, errlen, "%s: array has %d dimension%s, expected 2", path, a.ndim,
               a.ndim == 1 ? "" : "s");
        free(a.data);
        return -1;
    }
    *data = a.data;
    *rows = a.shape[0];
    *cols = a.shape[1];
    return 0;
}
