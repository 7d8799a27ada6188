/* checkpoint: the coordinator's resumable state (see checkpoint.c). */
#ifndef KD_COORD_CHECKPOINT_H
#define KD_COORD_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "kd_model.h"
#include "kd_optim.h"
#include "kd_recipe.h"
#include "kd_util.h"

/* The counters that, with the weights, optimizer moments and ledger, make a run resumable. */
typedef struct {
    char run_id[KD_NAME_MAX + 32];
    uint32_t epoch;
    long step;
    uint64_t version;
    long position; /* batches applied before the current step: the schedule's clock */
    long batches_applied, batches_expected;
    long duplicates, restreamed;
    double elapsed;
    double best_score; /* eval_result_t.best_score of the best evaluation */
    long best_step;
    long evals_since_best; /* patience spent */
} coord_state_t;

/* dir/ckpt-<step>-<seq>.safetensors, atomically, under a name no file has (never in place),
 * then its digest; then prunes. Refuses non-finite weights. */
int coord_checkpoint_save(const char *dir, const coord_state_t *s, const kd_model_t *m,
                          const kd_optim_t *opt, const uint8_t *applied, size_t n_batches,
                          long keep, char *err, size_t errlen);
/* Keeps the newest `keep` checkpoints of run_id that match their digest: damaged ones are
 * removed, valid ones beyond `keep` too, other runs' files are left alone and not counted. */
void coord_checkpoint_prune(const char *dir, long keep, const char *run_id);
/* How many checkpoint files (valid or not) dir holds. */
int coord_checkpoint_count(const char *dir);
/* Loads the newest valid checkpoint of dir (torn or foreign ones are logged and skipped).
 * Returns 0 and its path in found, 1 when there is none, fills everything else. *applied is
 * malloc'd (n_batches bytes, 0/1). */
int coord_checkpoint_resume(const char *dir, coord_state_t *s, kd_model_t *m, kd_optim_t *opt,
                            uint8_t **applied, size_t *n_batches, char *found, size_t foundlen);

#endif
