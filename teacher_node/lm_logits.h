/* lm_logits: a language-model teacher's logits for every position of every training window,
 * kept in the persistent cache in the recipe's encoding and served as records, never as dense
 * rows (a GPT-2 vocabulary's row is 200 KB; a top-k or sampled record tens of bytes). The
 * teacher_logits functions (logits.h) dispatch here for language-model recipes.
 *
 * Cache entry: one row per (window, position) — row w * T + t is the teacher's next-token
 * distribution after the first t + 1 tokens of window w, T = context — and one block per window,
 * so a batch of random windows reads one checksummed block each. The teacher runs on groups of
 * teacher.batch_size consecutive windows, each window in its slot of its group (the last group
 * padded), so a window's logits are the same bits whichever thread or node computes them
 * (logits.h). Its logits are encoded as the head produces them, a chunk of positions at a time:
 * no (windows x T x V) buffer exists. */
#ifndef LM_LOGITS_H
#define LM_LOGITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_data.h"
#include "kd_recipe.h"
#include "logits.h"

typedef struct lm_logits lm_logits_t;

/* The cache key of the teacher's records for this recipe and split (the teacher fingerprint
 * left for the caller), as the workers decode them: encoding, k, temperature and vocabulary. */
void lm_logits_key(const kd_recipe_t *r, const kd_dataset_t *train, kd_cache_key_t *key);

/* As teacher_logits_open, for a GPT teacher (teacher.gpt with teacher.checkpoint); imported
 * entries (cache.import) are read as they are. */
lm_logits_t *lm_logits_open(const kd_recipe_t *r, const kd_dataset_t *train, char *err,
                            size_t errlen);
/* out (B, T, record_bytes): the records of windows ids. 0, or -1 with err set. */
int lm_logits_get(lm_logits_t *l, const uint32_t *ids, size_t B, uint8_t *out, char *err,
                  size_t errlen);
size_t lm_logits_record_bytes(const lm_logits_t *l);
int lm_logits_start_fill(lm_logits_t *l, int index, int count, char *err, size_t errlen);
bool lm_logits_complete(const lm_logits_t *l);
bool lm_logits_failed(const lm_logits_t *l, char *err, size_t errlen);
void lm_logits_stats(const lm_logits_t *l, teacher_logits_stats_t *out);
const char *lm_logits_entry(const lm_logits_t *l);
void lm_logits_close(lm_logits_t **l);

#endif
