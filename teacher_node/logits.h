/* teacher_logits: the teacher's logits for the training split (DESIGN §1, §4), as the batch
 * stream attaches them. Owns an in-memory table (N, C) filled block by block from the
 * persistent cache (kd_cache) or by the teacher model, by a background thread, while
 * teacher_logits_get serves any rows at once (computing the missing ones now). One streaming
 * thread may call teacher_logits_get while the fill thread runs; the other functions belong to
 * the thread that opened the table.
 *
 * Reproducibility: every row served is the same bits whichever path served it (table, cache
 * read, on-demand forward). The teacher runs every forward pass on exactly teacher.batch_size
 * rows, each sample in the slot it has in its block's chunk (padding with zeros), because a
 * GEMM's result for a row depends on the batch size and on the row's place in the batch; and
 * rows computed on demand go through the cache's codec (kd_cache_roundtrip_rows). This holds
 * on one machine and BLAS build with one OpenBLAS thread count; a cache block written
 * elsewhere is served as written.
 *
 * The fill runs one lane (thread, model copy, cache handle) per core: train.threads, else the
 * online CPUs. With more than one lane, teacher_logits_open sets OpenBLAS to one thread for the
 * whole process — the lanes are the parallelism, so the teacher's non-GEMM layers use every
 * core too (with two BLAS threads they ran on one). */
#ifndef TEACHER_LOGITS_H
#define TEACHER_LOGITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_cache.h"
#include "kd_data.h"
#include "kd_recipe.h"

/* How the teacher sees pixels (kd_pixels_to_float, as the workers do); part of the data
 * fingerprint, so a change of preprocessing can never be served old logits. */
#define TEACHER_LOGITS_PREPROCESSING KD_CACHE_PREPROCESSING_PIXELS

typedef struct teacher_logits teacher_logits_t;

typedef struct {
    uint64_t forward_samples;   /* samples run through the teacher, fill and on demand
                                   (padding rows not counted) */
    uint64_t forward_batches;   /* forward passes, each of teacher.batch_size rows */
    uint64_t on_demand_samples; /* of forward_samples: computed by teacher_logits_get */
    uint64_t cache_hits;        /* blocks loaded from the cache into the table */
    uint64_t cache_misses;      /* blocks the fill found missing, then computed and cached */
    uint64_t cache_corrupt;     /* blocks the fill found corrupt, then recomputed and rewritten */
} teacher_logits_stats_t;

/* The data fingerprint of the training split as teacher_logits keys it: what `kdist cache
 * import --data-fingerprint` needs for logits to distil from. */
void teacher_logits_data_fingerprint(const kd_dataset_t *train, char out[KD_CACHE_FP_HEX + 1]);

/* r: the run's recipe; train: the training split the batches index (sample ids are indices
 * into it); both must outlive the result. The logits come from
 *  - cache.import empty: the teacher (teacher.layers with teacher.checkpoint) through the cache
 *    entry at cache.dir for (teacher, train) in cache.encoding (cache.topk for topk), created
 *    when missing;
 *  - cache.import = LABEL: the entry imported as LABEL for this split (any encoding, the
 *    recipe's preferred); no model. It must exist and cover the split.
 * Opens two cache handles and, with a teacher, two model instances (one per thread). Memory:
 * the table is N x C floats (Fashion-MNIST: 55000 x 10 x 4 B = 2.2 MB) plus one byte per block.
 * Caller owns the result; NULL with err set on failure. */
teacher_logits_t *teacher_logits_open(const kd_recipe_t *r, const kd_dataset_t *train, char *err,
                                      size_t errlen);

/* out (B, C): row i = logits of sample ids[i]. Rows of blocks in the table are copied; the
 * others are read from the cache or, when not there yet, computed now by a teacher forward
 * pass (at most a few of teacher.batch_size rows), so a batch never waits for the fill.
 * 0, or -1 with err set (an id out of range, an imported entry without that sample, a teacher
 * that produced a non-finite logit). */
int teacher_logits_get(teacher_logits_t *tl, const uint32_t *ids, size_t B, float *out, char *err,
                       size_t errlen);

/* Language models (the split is token windows; lm_logits.h): out (B, T, record bytes) = the
 * records of windows ids in the cache's encoding (teacher_logits_record_bytes each). */
int teacher_logits_get_records(teacher_logits_t *tl, const uint32_t *ids, size_t B, uint8_t *out,
                               char *err, size_t errlen);
/* Bytes of one position's record (language models); 0 for classifiers. */
size_t teacher_logits_record_bytes(const teacher_logits_t *tl);

/* Starts the thread that fills the table block by block: a cache hit loads the block; a miss or
 * a corrupt block (logged at WARN with the cache's message) is computed by the teacher and put
 * into the cache. Teacher node `index` of `count` sharing one cache directory starts at block
 * index * n_blocks / count and wraps around, reading the cache again just before computing a
 * block (another node may have written it). Logs progress every few seconds. Once only.
 * 0, or -1 with err set. */
int teacher_logits_start_fill(teacher_logits_t *tl, int index, int count, char *err, size_t errlen);

/* Every block is in the table: teacher_logits_get will not touch the cache or the teacher. */
bool teacher_logits_complete(const teacher_logits_t *tl);
/* The fill thread stopped on an error (err gets it): the table will not complete. */
bool teacher_logits_failed(const teacher_logits_t *tl, char *err, size_t errlen);

void teacher_logits_stats(const teacher_logits_t *tl, teacher_logits_stats_t *out);
int teacher_logits_classes(const teacher_logits_t *tl);
/* The cache entry the logits come from, "<teacher_fp>-<data_fp>/<enc>". */
const char *teacher_logits_entry(const teacher_logits_t *tl);

/* Stops and joins the fill thread, frees everything. NULL-safe; nulls *tl. */
void teacher_logits_close(teacher_logits_t **tl);

#endif
