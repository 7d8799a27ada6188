/* kd_tokens: language-model data (DESIGN §11). A token stream comes from UTF-8 text through a
 * tokenizer (data.format text) or from pre-tokenized shards (data.format tokens: llm.c's format
 * or nanoGPT's raw uint16); the stream is split into train | validation | test parts (the tail
 * of the stream held out), and each part is cut into windows of context + 1 tokens, `stride`
 * tokens apart. A window is one sample of a kd_dataset_t (kd_data.h). */
#ifndef KD_TOKENS_H
#define KD_TOKENS_H

#include <stddef.h>
#include <stdint.h>

#include "kd_data.h"
#include "kd_recipe.h"
#include "kd_tokenizer.h"

#define KD_LLMC_MAGIC       20240520
#define KD_LLMC_HEADER_INTS 256
#define KD_LLMC_VERSION_U16 1 /* tokens are uint16 (GPT-2) */
#define KD_LLMC_VERSION_U32 2 /* tokens are uint32 (llm.c's Llama 3 shards) */

/* A stream being loaded: ids (n of cap), grown with realloc; caller frees ids. */
typedef struct {
    uint32_t *ids;
    size_t n, cap;
} kd_token_stream_t;

/* Reads one token file: llm.c's (header of 256 int32: magic 20240520, version 1|2, token count;
 * then uint16|uint32 tokens) or, without that magic, nanoGPT's raw uint16. Appends to *s.
 * Errors name the file and the problem (bad version, a count the size contradicts, a
 * truncated or odd-sized file). */
int kd_tokens_read_file(const char *path, kd_token_stream_t *s, char *err, size_t errlen);
/* Writes ids[0..n) as an llm.c shard (version 1: every id must be < 65536). */
int kd_tokens_write_llmc(const char *path, const uint32_t *ids, size_t n, char *err, size_t errlen);

/* The recipe's data as three window datasets (data.format text or tokens): the tokenizer
 * named by data.tokenizer (text; for tokens it only sets the vocabulary and bits per byte),
 * files joined with end-of-text between them, windows of student.gpt.context + 1 tokens,
 * data.stride apart, the parts data.val_fraction and data.test_fraction at the tail, limited
 * to data.train_subset / val_windows / test_windows windows. Every id must be below the
 * vocabulary. Errors name the file and the problem. */
int kd_tokens_load_splits(const kd_recipe_t *r, kd_dataset_t **train, kd_dataset_t **val,
                          kd_dataset_t **test, char *err, size_t errlen);

/* The recipe's data.tokenizer, from data.tokenizer_dir (empty: the installed files). Caller owns
 * *tok. 0, or -1 with err set (kd_tokenizer_open). */
int kd_tokens_open_tokenizer(const kd_recipe_t *r, kd_tokenizer_t **tok, char *err, size_t errlen);

/* The vocabulary of the recipe's tokenizer (257 bytes, 50257 gpt2), without loading data. */
int kd_tokens_vocab(const kd_recipe_t *r);

/* What identifies a split's windows: the cache's data fingerprint of them (token ids, the
 * tokenizer's fingerprint, context and stride) into fp, and the same for people into desc
 * ("tokenizer gpt2 (fingerprint ...), context 64, stride 64, 1500 windows"). */
void kd_tokens_windows_id(const kd_dataset_t *ds, char fp[KD_CACHE_FP_HEX + 1], char *desc,
                          size_t desc_len);

/* windows (n, ds->window) = the windows of samples ids[0..n). */
void kd_dataset_gather_windows(const kd_dataset_t *ds, const uint32_t *ids, size_t n,
                               uint32_t *windows);

/* Bytes of text the targets of the windows ids[0..n) decode to (positions 1..context of each
 * window): what bits per byte divides by. 0 when the dataset does not know (token shards with
 * no tokenizer). */
double kd_dataset_target_bytes(const kd_dataset_t *ds, const uint32_t *ids, size_t n);

#endif
