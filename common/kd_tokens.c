/* kd_tokens: token streams from text or shards, split and cut into windows (see kd_tokens.h). */
#include "kd_tokens.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_tokenizer.h"
#include "kd_util.h"

#define HEADER_BYTES (KD_LLMC_HEADER_INTS * 4)

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void stream_reserve(kd_token_stream_t *s, size_t more) {
    if (s->n + more <= s->cap) return;
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < s->n + more) cap *= 2;
    s->ids = realloc(s->ids, cap * sizeof *s->ids);
    KD_ASSERT(s->ids);
    s->cap = cap;
}

int kd_tokens_read_file(const char *path, kd_token_stream_t *s, char *err, size_t errlen) {
    uint8_t *data;
    size_t len;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    int rc = -1;
    size_t first = 0, width = 2, count;
    if (len >= 4 && get_u32(data) == KD_LLMC_MAGIC) {
        if (len < HEADER_BYTES) {
            kd_err(err, errlen, "%s: llm.c token file truncated in its header (%zu of %d bytes)",
                   path, len, HEADER_BYTES);
            goto out;
        }
        uint32_t version = get_u32(data + 4);
        if (version != KD_LLMC_VERSION_U16 && version != KD_LLMC_VERSION_U32) {
            kd_err(err, errlen,
                   "%s: llm.c token file version %u; kdist reads 1 (uint16) and 2 (uint32)", path,
                   version);
            goto out;
        }
        width = version == KD_LLMC_VERSION_U16 ? 2 : 4;
        count = get_u32(data + 8);
        first = HEADER_BYTES;
        if ((len - first) != count * width) {
            kd_err(err, errlen,
                   "%s: the header says %zu tokens (%zu bytes) but the file holds %zu bytes after "
                   "it (truncated, or not a token file)",
                   path, count, count * width, len - first);
            goto out;
        }
    } else { /* nanoGPT: raw little-endian uint16 */
        if (len % 2 != 0) {
            kd_err(err, errlen,
                   "%s: %zu bytes: neither an llm.c token file (magic %d) nor nanoGPT's uint16 "
                   "tokens (an even size)",
                   path, len, KD_LLMC_MAGIC);
            goto out;
        }
        count = len / 2;
    }
    if (count == 0) {
        kd_err(err, errlen, "%s: holds no tokens", path);
        goto out;
    }
    stream_reserve(s, count);
    for (size_t i = 0; i < count; i++) {
        const uint8_t *p = data + first + i * width;
        s->ids[s->n + i] = width == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : get_u32(p);
    }
    s->n += count;
    rc = 0;
out:
    free(data);
    return rc;
}

int kd_tokens_write_llmc(const char *path, const uint32_t *ids, size_t n, char *err,
                         size_t errlen) {
    if (n > UINT32_MAX)
        return kd_err(err, errlen, "%s: %zu tokens are too many for one shard", path, n);
    size_t len = HEADER_BYTES + 2 * n;
    uint8_t *buf = kd_xcalloc(len, 1);
    const uint32_t head[3] = {KD_LLMC_MAGIC, KD_LLMC_VERSION_U16, (uint32_t)n};
    for (int i = 0; i < 3; i++)
        for (int b = 0; b < 4; b++) buf[4 * i + b] = (uint8_t)(head[i] >> (8 * b));
    for (size_t i = 0; i < n; i++) {
        if (ids[i] > UINT16_MAX) {
            free(buf);
            return kd_err(err, errlen, "%s: token %zu is %u, more than uint16 holds", path, i,
                          ids[i]);
        }
        buf[HEADER_BYTES + 2 * i] = (uint8_t)ids[i];
        buf[HEADER_BYTES + 2 * i + 1] = (uint8_t)(ids[i] >> 8);
    }
    int rc = kd_write_file_atomic(path, buf, len, err, errlen);
    free(buf);
    return rc;
}

/* ---- the recipe's splits ------------------------------------------------------------------- */

int kd_tokens_vocab(const kd_recipe_t *r) {
    if (r->student.gpt.vocab > 0) return r->student.gpt.vocab;
    return strcmp(r->data.tokenizer, "gpt2") == 0 ? 50257 : 257;
}

int kd_tokens_open_tokenizer(const kd_recipe_t *r, kd_tokenizer_t **tok, char *err, size_t errlen) {
    const char *dir = r->data.tokenizer_dir[0] ? r->data.tokenizer_dir : NULL;
    return kd_tokenizer_open(r->data.tokenizer, dir, tok, err, errlen);
}

/* The whole stream: files in order, end-of-text between them. */
static int load_stream(const kd_recipe_t *r, kd_tokenizer_t *tok, kd_token_stream_t *s, char *err,
                       size_t errlen) {
    for (int f = 0; f < r->data.n_files; f++) {
        char path[KD_PATH_MAX];
        kd_recipe_data_path(r, r->data.files[f], path, sizeof path);
        if (f > 0) {
            stream_reserve(s, 1);
            s->ids[s->n++] = (uint32_t)kd_tokenizer_eot(tok);
        }
        size_t before = s->n;
        if (r->data.format == KD_DATA_TOKENS) {
            if (kd_tokens_read_file(path, s, err, errlen) != 0) return -1;
        } else {
            uint8_t *text;
            size_t len;
            if (kd_read_file(path, &text, &len, err, errlen) != 0) return -1;
            char why[KD_ERR_LEN];
            int rc = kd_tokenizer_encode(tok, (const char *)text, len, &s->ids, &s->n, &s->cap, why,
                                         sizeof why);
            free(text);
            if (rc != 0)
                return kd_err(err, errlen, "%s: %s (data.tokenizer %s needs UTF-8 text)", path, why,
                              r->data.tokenizer);
            if (s->n == before) return kd_err(err, errlen, "%s: holds no text", path);
        }
        const uint32_t vocab = (uint32_t)kd_tokens_vocab(r);
        for (size_t i = before; i < s->n; i++)
            if (s->ids[i] >= vocab)
                return kd_err(err, errlen,
                              "%s: token %zu is %u, outside the vocabulary of %u (data.tokenizer "
                              "%s%s)",
                              path, i - before, s->ids[i], vocab, r->data.tokenizer,
                              r->student.gpt.vocab ? ", student.gpt.vocab" : "");
    }
    return 0;
}

static size_t windows_in(size_t n_tokens, size_t window, size_t stride) {
    return n_tokens < window ? 0 : (n_tokens - window) / stride + 1;
}

/* A window dataset over ids[0..n) (copied). */
static kd_dataset_t *part(const uint32_t *ids, size_t n, size_t window, size_t stride,
                          size_t max_windows, int vocab, const uint16_t *token_bytes,
                          const kd_tokenizer_t *tok) {
    kd_dataset_t *ds = kd_xcalloc(1, sizeof *ds);
    ds->n = windows_in(n, window, stride);
    if (max_windows > 0 && max_windows < ds->n) ds->n = max_windows;
    ds->n_tokens = ds->n ? (ds->n - 1) * stride + window : 0; /* only what the windows cover */
    ds->tokens = kd_xmalloc((ds->n_tokens ? ds->n_tokens : 1) * sizeof *ds->tokens);
    memcpy(ds->tokens, ids, ds->n_tokens * sizeof *ds->tokens);
    ds->window = window;
    ds->stride = stride;
    ds->channels = ds->height = 1;
    ds->width = (int)window;
    ds->sample_dim = window;
    ds->num_classes = vocab;
    if (token_bytes) {
        ds->token_bytes = kd_xmalloc((size_t)vocab * sizeof *ds->token_bytes);
        memcpy(ds->token_bytes, token_bytes, (size_t)vocab * sizeof *ds->token_bytes);
    }
    snprintf(ds->tokenizer, sizeof ds->tokenizer, "%s", kd_tokenizer_name(tok));
    kd_tokenizer_fingerprint(tok, ds->tokenizer_fp);
    return ds;
}

int kd_tokens_load_splits(const kd_recipe_t *r, kd_dataset_t **train, kd_dataset_t **val,
                          kd_dataset_t **test, char *err, size_t errlen) {
    *train = *val = *test = NULL;
    KD_ASSERT(kd_recipe_is_lm(r));
    const size_t context = (size_t)r->student.gpt.context, window = context + 1;
    const size_t stride = r->data.stride > 0 ? (size_t)r->data.stride : context;
    kd_tokenizer_t *tok = NULL;
    if (kd_tokens_open_tokenizer(r, &tok, err, errlen) != 0) return -1;
    int vocab = kd_tokens_vocab(r), rc = -1;
    if (vocab < kd_tokenizer_vocab(tok)) {
        kd_err(err, errlen, "student.gpt.vocab %d is smaller than data.tokenizer %s's %d ids",
               vocab, r->data.tokenizer, kd_tokenizer_vocab(tok));
        kd_tokenizer_destroy(&tok);
        return -1;
    }
    kd_token_stream_t s = {0};
    uint16_t *token_bytes = kd_xcalloc((size_t)vocab, sizeof *token_bytes);
    if (load_stream(r, tok, &s, err, errlen) != 0) goto out;
    /* bits per byte counts the text: every id's decoded length; end-of-text (between files) and
     * ids beyond the tokenizer's (a padded vocabulary) stand for none */
    for (int id = 0; id < kd_tokenizer_vocab(tok); id++) {
        size_t len = 0;
        uint32_t u = (uint32_t)id;
        char why[KD_ERR_LEN];
        if (id != kd_tokenizer_eot(tok) &&
            kd_tokenizer_decode(tok, &u, 1, NULL, 0, &len, why, sizeof why) == 0)
            token_bytes[id] = (uint16_t)(len < UINT16_MAX ? len : UINT16_MAX);
    }
    const size_t n_test = (size_t)((double)s.n * r->data.test_fraction);
    const size_t n_val = (size_t)((double)s.n * r->data.val_fraction);
    const size_t n_train = s.n - n_val - n_test;
    struct {
        const char *name, *key;
        size_t first, n, max;
        float fraction;
        kd_dataset_t **out;
    } parts[3] = {
        {"training", "train_subset", 0, n_train, (size_t)r->data.train_subset, 1, train},
        {"validation", "val_fraction", n_train, n_val, (size_t)r->data.val_windows,
         r->data.val_fraction, val},
        {"test", "test_fraction", n_train + n_val, n_test, (size_t)r->data.test_windows,
         r->data.test_fraction, test},
    };
    for (int i = 0; i < 3; i++) {
        if (parts[i].fraction > 0 && windows_in(parts[i].n, window, stride) == 0) {
            kd_err(err, errlen,
                   "data: the %s part has %zu tokens, fewer than one window of student.gpt.context "
                   "+ 1 = %zu (%zu tokens in all from %d file%s; raise data.%s or add text)",
                   parts[i].name, parts[i].n, window, s.n, r->data.n_files,
                   r->data.n_files == 1 ? "" : "s", i == 0 ? "files" : parts[i].key);
            goto out;
        }
        *parts[i].out = part(s.ids + parts[i].first, parts[i].n, window, stride, parts[i].max,
                             vocab, token_bytes, tok);
    }
    rc = 0;
out:
    if (rc != 0) {
        kd_dataset_destroy(train);
        kd_dataset_destroy(val);
        kd_dataset_destroy(test);
    }
    free(token_bytes);
    free(s.ids);
    kd_tokenizer_destroy(&tok);
    return rc;
}

void kd_dataset_gather_windows(const kd_dataset_t *ds, const uint32_t *ids, size_t n,
                               uint32_t *windows) {
    KD_ASSERT(ds->tokens);
    for (size_t i = 0; i < n; i++) {
        KD_ASSERT(ids[i] < ds->n);
        memcpy(windows + i * ds->window, ds->tokens + (size_t)ids[i] * ds->stride,
               ds->window * sizeof *windows);
    }
}

double kd_dataset_target_bytes(const kd_dataset_t *ds, const uint32_t *ids, size_t n) {
    if (!ds->token_bytes) return 0.0;
    double bytes = 0.0;
    for (size_t i = 0; i < n; i++) {
        const uint32_t *w = ds->tokens + (size_t)ids[i] * ds->stride;
        for (size_t t = 1; t < ds->window; t++) bytes += ds->token_bytes[w[t]];
    }
    return bytes;
}

void kd_tokens_windows_id(const kd_dataset_t *ds, char fp[KD_CACHE_FP_HEX + 1], char *desc,
                          size_t desc_len) {
    kd_cache_fingerprint_data(ds, KD_CACHE_PREPROCESSING_TOKENS, fp);
    snprintf(desc, desc_len,
             "tokenizer %s (fingerprint %.12s), context %zu, stride %zu, %zu windows",
             ds->tokenizer, ds->tokenizer_fp, ds->window - 1, ds->stride, ds->n);
}
