/* kd_data: IDX loading (through zlib, so .gz and raw files alike), subsets, the train/val
 * split and per-epoch batching (see kd_data.h). Datasets are immutable once built; the
 * functions keep no global state and are thread-safe. */
#include "kd_data.h"

#include "kd_rng.h"
#include "kd_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* A lying header must not make us allocate gigabytes: no IDX payload may exceed this. */
#define KD_IDX_MAX_BYTES ((uint64_t)1 << 31)
/* Buffers grow as data actually arrives, so a short file with a huge header costs little. */
#define KD_IDX_CHUNK ((size_t)1 << 20)
/* Stream id of the split permutation; epochs use streams < 2^32, so the two never coincide. */
#define KD_SPLIT_STREAM 0x73706c6974ULL /* "split" */

typedef struct {
    uint32_t dims[3];
    uint8_t *data; /* (dims[0] * ... ) bytes */
    size_t len;
} idx_file_t;

static const char *idx_type_name(int type) {
    switch (type) {
    case 0x08:
        return "unsigned byte";
    case 0x09:
        return "signed byte";
    case 0x0B:
        return "short";
    case 0x0C:
        return "int";
    case 0x0D:
        return "float";
    case 0x0E:
        return "double";
    default:
        return "unknown type";
    }
}

/* Reports the gzip layer's error if there is one; 0 if the stream is healthy. */
static int gz_check(gzFile gz, const char *path, char *err, size_t errlen) {
    int errnum = Z_OK;
    const char *msg = gzerror(gz, &errnum);
    if (errnum == Z_OK || errnum == Z_STREAM_END) return 0;
    if (errnum == Z_ERRNO) return kd_err(err, errlen, "%s: read error: %s", path, strerror(errno));
    if (!msg) msg = "unknown error";
    /* zlib prefixes its message with the path, which ours already carries. */
    size_t plen = strlen(path);
    if (strncmp(msg, path, plen) == 0 && strncmp(msg + plen, ": ", 2) == 0) msg += plen + 2;
    return kd_err(err, errlen, "%s: corrupt gzip stream: %s", path, msg);
}

/* Reads exactly want bytes (or fewer at end of file) into a buffer grown as data arrives.
 * Returns the byte count read, or -1 on a gzip/IO error. */
static int64_t gz_read_all(gzFile gz, size_t want, uint8_t **out, const char *path, char *err,
                           size_t errlen) {
    size_t cap = want < KD_IDX_CHUNK ? want : KD_IDX_CHUNK;
    uint8_t *buf = kd_xmalloc(cap);
    size_t got = 0;
    while (got < want) {
        if (got == cap) {
            size_t ncap = cap * 2 < want ? cap * 2 : want;
            uint8_t *nbuf = kd_xmalloc(ncap);
            memcpy(nbuf, buf, got);
            free(buf);
            buf = nbuf;
            cap = ncap;
        }
        size_t ask = cap - got;
        if (ask > (size_t)1 << 30) ask = (size_t)1 << 30; /* gzread takes an unsigned int */
        int r = gzread(gz, buf + got, (unsigned)ask);
        if (r < 0) {
            gz_check(gz, path, err, errlen);
            free(buf);
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    /* A short read may hide a damaged stream: report that rather than "truncated". */
    if (got < want && gz_check(gz, path, err, errlen) != 0) {
        free(buf);
        return -1;
    }
    *out = buf;
    return (int64_t)got;
}

/* Reads and validates one IDX file of unsigned bytes with the expected magic and rank. */
static int idx_read(const char *path, int want_ndims, const char *what, idx_file_t *f, char *err,
                    size_t errlen) {
    int rc = -1;
    memset(f, 0, sizeof *f);
    uint8_t *hdr = NULL;
    errno = 0;
    gzFile gz = gzopen(path, "rb");
    if (!gz)
        return kd_err(err, errlen, "%s: cannot open: %s", path,
                      errno ? strerror(errno) : "out of memory");

    int64_t got = gz_read_all(gz, 4, &hdr, path, err, errlen);
    if (got < 0) goto cleanup;
    if (got < 4) {
        kd_err(err, errlen, "%s: truncated IDX header: expected 4 magic bytes, found %lld", path,
               (long long)got);
        goto cleanup;
    }
    uint32_t magic =
        (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    uint32_t want_magic = 0x0800u | (uint32_t)want_ndims;
    if (hdr[0] != 0 || hdr[1] != 0) {
        kd_err(err, errlen, "%s: not an IDX file: magic 0x%08x, expected 0x%08x (%s)", path, magic,
               want_magic, what);
        goto cleanup;
    }
    if (hdr[2] != 0x08) {
        kd_err(err, errlen,
               "%s: unsupported IDX element type 0x%02x (%s) in magic 0x%08x; expected 0x08 "
               "(unsigned byte) for %s",
               path, hdr[2], idx_type_name(hdr[2]), magic, what);
        goto cleanup;
    }
    if (hdr[3] != want_ndims) {
        kd_err(err, errlen, "%s: IDX %s file must have %d dimension%s, found %d (magic 0x%08x)",
               path, what, want_ndims, want_ndims == 1 ? "" : "s", hdr[3], magic);
        goto cleanup;
    }
    free(hdr);
    hdr = NULL;

    size_t dim_bytes = 4 * (size_t)want_ndims;
    got = gz_read_all(gz, dim_bytes, &hdr, path, err, errlen);
    if (got < 0) goto cleanup;
    if ((size_t)got < dim_bytes) {
        kd_err(err, errlen,
               "%s: truncated IDX header: expected %zu bytes of dimension sizes, found %lld", path,
               dim_bytes, (long long)got);
        goto cleanup;
    }
    uint64_t total = 1;
    for (int d = 0; d < want_ndims; d++) {
        const uint8_t *p = hdr + 4 * d;
        f->dims[d] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        if (f->dims[d] == 0) {
            kd_err(err, errlen, "%s: IDX %s file has a zero size in dimension %d", path, what, d);
            goto cleanup;
        }
        total *= f->dims[d]; /* each factor < 2^32 and we stop once past the limit: no overflow */
        if (total > KD_IDX_MAX_BYTES) {
            kd_err(err, errlen,
                   "%s: IDX dimensions declare more than %llu bytes of data (dimension %d is %u): "
                   "refusing to load",
                   path, (unsigned long long)KD_IDX_MAX_BYTES, d, f->dims[d]);
            goto cleanup;
        }
    }
    free(hdr);
    hdr = NULL;

    got = gz_read_all(gz, (size_t)total, &f->data, path, err, errlen);
    if (got < 0) goto cleanup;
    if ((uint64_t)got < total) {
        kd_err(err, errlen, "%s: truncated: expected %llu bytes of %s data, found %lld", path,
               (unsigned long long)total, what, (long long)got);
        goto cleanup;
    }
    f->len = (size_t)total;
    /* The file must end exactly here: trailing bytes mean the header does not describe it. */
    uint8_t extra[256];
    int r = gzread(gz, extra, sizeof extra);
    if (r < 0) {
        gz_check(gz, path, err, errlen);
        goto cleanup;
    }
    if (r > 0) {
        /* Count a little further for the message, but never decompress an unbounded tail. */
        uint64_t more = (uint64_t)r;
        while (more < KD_IDX_CHUNK && (r = gzread(gz, extra, sizeof extra)) > 0)
            more += (uint64_t)r;
        /* Garbage decoded from a damaged stream is corruption, not a trailing-bytes problem. */
        if (gz_check(gz, path, err, errlen) != 0) goto cleanup;
        kd_err(err, errlen, "%s: %s%llu trailing bytes after the %llu bytes of %s data", path,
               more >= KD_IDX_CHUNK ? "at least " : "", (unsigned long long)more,
               (unsigned long long)total, what);
        goto cleanup;
    }
    if (gz_check(gz, path, err, errlen) != 0) goto cleanup;
    rc = 0;

cleanup:
    free(hdr);
    if (rc != 0) {
        free(f->data);
        f->data = NULL;
    }
    if (gz) gzclose(gz);
    return rc;
}

int kd_idx_load(const char *images_path, const char *labels_path, kd_dataset_t **out, char *err,
                size_t errlen) {
    KD_ASSERT(images_path && labels_path && out);
    *out = NULL;
    idx_file_t img, lab;
    int rc = -1;
    if (idx_read(images_path, 3, "image", &img, err, errlen) != 0) return -1;
    if (idx_read(labels_path, 1, "label", &lab, err, errlen) != 0) {
        free(img.data);
        return -1;
    }
    if (img.dims[0] != lab.dims[0]) {
        kd_err(err, errlen, "%s holds %u images but %s holds %u labels: counts must match",
               images_path, img.dims[0], labels_path, lab.dims[0]);
        goto cleanup;
    }
    if (img.dims[1] > INT32_MAX || img.dims[2] > INT32_MAX) {
        kd_err(err, errlen, "%s: image size %ux%u too large", images_path, img.dims[1],
               img.dims[2]);
        goto cleanup;
    }
    kd_dataset_t *ds = kd_xcalloc(1, sizeof *ds);
    ds->n = img.dims[0];
    ds->channels = 1;
    ds->height = (int)img.dims[1];
    ds->width = (int)img.dims[2];
    ds->sample_dim = (size_t)img.dims[1] * img.dims[2];
    ds->pixels = img.data;
    img.data = NULL;
    ds->labels = kd_xmalloc(ds->n * sizeof(int32_t));
    int max_label = 0;
    for (size_t i = 0; i < ds->n; i++) {
        ds->labels[i] = lab.data[i]; /* u8, so < 256 by construction */
        if (lab.data[i] > max_label) max_label = lab.data[i];
    }
    ds->num_classes = max_label + 1 < 2 ? 2 : max_label + 1;
    *out = ds;
    rc = 0;

cleanup:
    free(img.data);
    free(lab.data);
    return rc;
}

kd_dataset_t *kd_dataset_subset(const kd_dataset_t *src, const uint32_t *ids, size_t n) {
    KD_ASSERT(!src->tokens); /* windows are cut per split (kd_tokens.c), never picked */
    KD_ASSERT(src && (ids || n == 0));
    kd_dataset_t *ds = kd_xcalloc(1, sizeof *ds);
    ds->n = n;
    ds->channels = src->channels;
    ds->height = src->height;
    ds->width = src->width;
    ds->sample_dim = src->sample_dim;
    /* Keep the parent's class count: a small subset may miss the highest class. */
    ds->num_classes = src->num_classes;
    ds->pixels = kd_xmalloc(n * src->sample_dim);
    ds->labels = kd_xmalloc(n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        KD_ASSERT(ids[i] < src->n);
        memcpy(ds->pixels + i * src->sample_dim, src->pixels + (size_t)ids[i] * src->sample_dim,
               src->sample_dim);
        ds->labels[i] = src->labels[ids[i]];
    }
    return ds;
}

int kd_dataset_split(const kd_dataset_t *src, size_t val_count, uint64_t seed, kd_dataset_t **train,
                     kd_dataset_t **val, char *err, size_t errlen) {
    KD_ASSERT(src && train && val);
    *train = NULL;
    *val = NULL;
    if (val_count > src->n)
        return kd_err(err, errlen,
                      "validation split of %zu samples is larger than the dataset (%zu samples)",
                      val_count, src->n);
    if (src->n > UINT32_MAX)
        return kd_err(err, errlen, "dataset of %zu samples is too large to split", src->n);
    size_t n = src->n;
    uint32_t *perm = kd_xmalloc(n * sizeof(uint32_t));
    uint8_t *in_val = kd_xcalloc(n ? n : 1, 1);
    uint32_t *val_ids = kd_xmalloc(val_count * sizeof(uint32_t));
    uint32_t *train_ids = kd_xmalloc((n - val_count) * sizeof(uint32_t));
    kd_rng_permutation(seed, KD_SPLIT_STREAM, perm, n);
    for (size_t i = 0; i < val_count; i++) in_val[perm[i]] = 1;
    size_t nv = 0, nt = 0;
    for (size_t i = 0; i < n; i++) {
        if (in_val[i])
            val_ids[nv++] = (uint32_t)i;
        else
            train_ids[nt++] = (uint32_t)i;
    }
    KD_ASSERT(nv == val_count && nt == n - val_count);
    *train = kd_dataset_subset(src, train_ids, nt);
    *val = kd_dataset_subset(src, val_ids, nv);
    free(perm);
    free(in_val);
    free(val_ids);
    free(train_ids);
    return 0;
}

void kd_dataset_destroy(kd_dataset_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_dataset_t *ds = *self_p;
    free(ds->pixels);
    free(ds->labels);
    free(ds->tokens);
    free(ds->token_bytes);
    free(ds);
    *self_p = NULL;
}

void kd_pixels_to_float(const uint8_t *src, size_t n, float *dst) {
    for (size_t j = 0; j < n; j++) dst[j] = (float)src[j] / 255.0f;
}

void kd_dataset_gather(const kd_dataset_t *ds, const uint32_t *ids, size_t n, float *x,
                       int32_t *y) {
    KD_ASSERT(ds && (n == 0 || (ids && x)));
    const size_t dim = ds->sample_dim;
    for (size_t i = 0; i < n; i++) {
        KD_ASSERT(ids[i] < ds->n);
        const uint8_t *src = ds->pixels + (size_t)ids[i] * dim;
        float *dst = x + i * dim; // x (n, sample_dim)
        kd_pixels_to_float(src, dim, dst);
        if (y) y[i] = ds->labels[ids[i]];
    }
}

size_t kd_epoch_count(size_t n_samples, size_t batch_size) {
    if (batch_size == 0) return 0;
    return n_samples / batch_size + (n_samples % batch_size != 0);
}

kd_epoch_t *kd_epoch_new(uint64_t seed, uint32_t epoch, size_t n_samples, size_t batch_size) {
    KD_ASSERT(batch_size > 0);
    KD_ASSERT(n_samples <= UINT32_MAX);
    kd_epoch_t *ep = kd_xcalloc(1, sizeof *ep);
    ep->seed = seed;
    ep->epoch = epoch;
    ep->n_samples = n_samples;
    ep->batch_size = batch_size;
    ep->n_batches = kd_epoch_count(n_samples, batch_size);
    ep->perm = kd_xmalloc(n_samples * sizeof(uint32_t));
    kd_rng_permutation(seed, epoch, ep->perm, n_samples);
    return ep;
}

void kd_epoch_destroy(kd_epoch_t **self_p) {
    if (!self_p || !*self_p) return;
    free((*self_p)->perm);
    free(*self_p);
    *self_p = NULL;
}

size_t kd_epoch_batch(const kd_epoch_t *ep, size_t batch_id, const uint32_t **ids) {
    KD_ASSERT(ep && ids);
    if (batch_id >= ep->n_batches) {
        *ids = NULL;
        return 0;
    }
    size_t start = batch_id * ep->batch_size;
    size_t left = ep->n_samples - start;
    *ids = ep->perm + start;
    return left < ep->batch_size ? left : ep->batch_size;
}
