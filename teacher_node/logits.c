/* teacher_logits: the teacher's logits for the training split (see logits.h).
 *
 * Blocks are the cache's (kd_cache_block_rows samples of consecutive ids). Each has a state in
 * `state`: EMPTY, BUSY (one thread claimed it and is writing its rows of the table), READY
 * (its rows are final; published with release, read with acquire). Only the claimer writes a
 * block's rows, so the two threads never write the same memory.
 *
 * A forward pass always has teacher.batch_size (S) rows, and sample i of a block sits in slot
 * (i - first of block) % S: the fill computes a block as consecutive chunks of S, and an
 * on-demand pass places each sample in that same slot (padding the rest with zeros). The bits a
 * GEMM gives one row depend on the batch size and on the row's place in the batch, not on the
 * other rows (measured with OpenBLAS 0.3.21: one sample gets other last bits in a batch of 64
 * than of 300, and in a batch of 7 by its place), so a row gets identical logits whichever path
 * computes it. */
#include "logits.h"

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_checkpoint.h"
#include "kd_log.h"
#include "kd_train.h"
#include "kd_util.h"
#include "lm_logits.h"

#define PROGRESS_SECONDS 5.0

enum { BLOCK_EMPTY = 0, BLOCK_BUSY, BLOCK_READY };

/* What one thread needs to run the teacher and read the cache (models keep activations and
 * cache handles keep buffers: neither is shared between threads). */
typedef struct {
    kd_model_t *model;      /* NULL for imported logits */
    kd_cache_t *cache;      /* NULL for imported logits (loaded at open) */
    float *x;               /* (S, D) one forward pass's inputs */
    float *block;           /* (block_rows, C) a block read from the cache */
    uint32_t *slot_row;     /* (S) which pending row sits in each slot of a pass */
    double slowest_block_s; /* the longest this lane took to compute a block */
} lane_t;

#define FILL_LANES_MAX 8

struct teacher_logits {
    lm_logits_t *lm; /* a language model's: every function below hands over to it */
    kd_recipe_t recipe;
    const kd_dataset_t *train;
    size_t N, D, S, block_rows, n_blocks;
    int C;
    kd_cache_encoding_t enc;
    int k;
    bool imported;
    char entry[KD_CACHE_NAME_MAX];

    float *table;           /* (N, C): memory N * C * 4 bytes */
    _Atomic uint8_t *state; /* (n_blocks) BLOCK_* */
    atomic_size_t ready;    /* blocks READY */
    /* The fill runs on n_fill lanes, one thread each; with more than one, OpenBLAS runs single-
     * threaded (the lanes are the parallelism: the non-GEMM layers then use every core too). */
    lane_t stream, fill[FILL_LANES_MAX];
    int n_fill;
    pthread_t threads[FILL_LANES_MAX];
    struct fill_arg {
        struct teacher_logits *tl;
        int lane;
    } args[FILL_LANES_MAX];
    bool started;
    int fill_index, fill_count;
    atomic_bool stop, failed;
    char fill_err[KD_ERR_LEN]; /* set before `failed` (release) */

    _Atomic uint64_t forward_samples, forward_batches, on_demand, hits, misses, corrupt;
    kd_log_limit_t stream_warn, put_warn;
};

/* ---- small helpers ------------------------------------------------------------------------- */

static size_t block_of(const teacher_logits_t *tl, size_t id) {
    return id / tl->block_rows;
}

static size_t rows_in_block(const teacher_logits_t *tl, size_t b) {
    size_t first = b * tl->block_rows;
    return tl->N - first < tl->block_rows ? tl->N - first : tl->block_rows;
}

static size_t slot_of(const teacher_logits_t *tl, size_t id) {
    return (id % tl->block_rows) % tl->S;
}

static void stat_add(_Atomic uint64_t *c, uint64_t n) {
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static uint64_t stat_get(const _Atomic uint64_t *c) {
    return atomic_load_explicit(c, memory_order_relaxed);
}

static bool is_ready(const teacher_logits_t *tl, size_t b) {
    return atomic_load_explicit(&tl->state[b], memory_order_acquire) == BLOCK_READY;
}

/* Only the thread that moves a block from EMPTY to BUSY writes its rows. */
static bool claim(teacher_logits_t *tl, size_t b) {
    uint8_t expect = BLOCK_EMPTY;
    return atomic_compare_exchange_strong_explicit(&tl->state[b], &expect, BLOCK_BUSY,
                                                   memory_order_acq_rel, memory_order_acquire);
}

static void unclaim(teacher_logits_t *tl, size_t b) {
    atomic_store_explicit(&tl->state[b], BLOCK_EMPTY, memory_order_release);
}

static void publish(teacher_logits_t *tl, size_t b) {
    atomic_store_explicit(&tl->state[b], BLOCK_READY, memory_order_release);
    atomic_fetch_add_explicit(&tl->ready, 1, memory_order_release);
}

static bool lossy(const teacher_logits_t *tl) {
    return tl->enc != KD_ENC_FP32;
}

void teacher_logits_data_fingerprint(const kd_dataset_t *train, char out[KD_CACHE_FP_HEX + 1]) {
    kd_cache_fingerprint_data(train, TEACHER_LOGITS_PREPROCESSING, out);
}

/* ---- the teacher --------------------------------------------------------------------------- */

/* logits (n, C) must be finite: the cache refuses anything else, and a student must never see
 * it. ids name the samples in the message. */
static int check_finite(const teacher_logits_t *tl, const float *logits, const uint32_t *ids,
                        size_t n, char *err, size_t errlen) {
    size_t C = (size_t)tl->C;
    for (size_t i = 0; i < n * C; i++)
        if (!isfinite(logits[i]))
            return kd_err(err, errlen,
                          "teacher %s gives logit %g for sample %u class %zu: its weights are "
                          "broken (not finite logits are never served or cached)",
                          tl->recipe.teacher.checkpoint, (double)logits[i], ids[i / C], i % C);
    return 0;
}

/* kd_cache_get_block, and a hit's logits checked finite: a block that passes its checksum but
 * holds NaN or Inf (written by a broken import or another program) is KD_CACHE_CORRUPT, so it
 * is recomputed and counted like a torn one, never served. */
static int get_block(const teacher_logits_t *tl, kd_cache_t *cache, size_t b, float *dst, char *msg,
                     size_t msglen) {
    int st = kd_cache_get_block(cache, b, dst, msg, msglen);
    if (st != KD_CACHE_HIT) return st;
    const size_t C = (size_t)tl->C, n = rows_in_block(tl, b) * C;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(dst[i])) {
            kd_err(msg, msglen, "cache entry %s: block %zu holds logit %g for sample %zu class %zu",
                   tl->entry, b, (double)dst[i], b * tl->block_rows + i / C, i % C);
            return KD_CACHE_CORRUPT;
        }
    return KD_CACHE_HIT;
}

/* out (n, C) = raw teacher logits of samples ids, each run in its slot of an S-row pass (see
 * the top of the file); as few passes as the slots allow. */
static void forward_in_slots(teacher_logits_t *tl, lane_t *ln, const uint32_t *ids, size_t n,
                             float *out, bool on_demand) {
    const size_t S = tl->S, D = tl->D, C = (size_t)tl->C;
    uint8_t *done = kd_xcalloc(n ? n : 1, 1);
    for (size_t left = n; left > 0;) {
        memset(ln->x, 0, S * D * sizeof(float));
        for (size_t s = 0; s < S; s++) ln->slot_row[s] = UINT32_MAX;
        size_t placed = 0;
        for (size_t i = 0; i < n; i++) {
            size_t s = slot_of(tl, ids[i]);
            if (done[i] || ln->slot_row[s] != UINT32_MAX) continue;
            ln->slot_row[s] = (uint32_t)i;
            kd_pixels_to_float(tl->train->pixels + (size_t)ids[i] * D, D, ln->x + s * D);
            placed++;
        }
        const float *y = kd_model_forward(ln->model, ln->x, (int)S, false, 0);
        for (size_t s = 0; s < S; s++) {
            uint32_t i = ln->slot_row[s];
            if (i == UINT32_MAX) continue;
            memcpy(out + (size_t)i * C, y + s * C, C * sizeof(float));
            done[i] = 1;
        }
        left -= placed;
        stat_add(&tl->forward_batches, 1);
        stat_add(&tl->forward_samples, placed);
        if (on_demand) stat_add(&tl->on_demand, placed);
    }
    free(done);
}

/* ---- the fill thread ----------------------------------------------------------------------- */

static void fill_fail(teacher_logits_t *tl, const char *msg) {
    snprintf(tl->fill_err, sizeof tl->fill_err, "%s", msg);
    atomic_store_explicit(&tl->failed, true, memory_order_release);
    kd_log(KD_LOG_ERROR, "TEACHER-FILL-FAIL", "teacher logits: %s", msg);
}

/* Computes block b into the table (rows claimed by the caller) and caches it. */
static int compute_block(teacher_logits_t *tl, lane_t *ln, size_t b, char *err, size_t errlen) {
    const size_t first = b * tl->block_rows, rows = rows_in_block(tl, b), C = (size_t)tl->C;
    float *dst = tl->table + first * C;
    uint32_t *ids = kd_xmalloc(tl->S * sizeof *ids);
    for (size_t lo = 0; lo < rows && !atomic_load(&tl->stop); lo += tl->S) {
        size_t m = rows - lo < tl->S ? rows - lo : tl->S;
        for (size_t j = 0; j < m; j++) ids[j] = (uint32_t)(first + lo + j);
        forward_in_slots(tl, ln, ids, m, dst + lo * C, false);
        if (check_finite(tl, dst + lo * C, ids, m, err, errlen) != 0) {
            free(ids);
            return -1;
        }
    }
    free(ids);
    if (atomic_load(&tl->stop)) return 1; /* unfinished: leave it BUSY, nobody reads it */
    char msg[KD_ERR_LEN];
    if (kd_cache_put_block(ln->cache, b, dst, msg, sizeof msg) != 0 &&
        kd_log_allow(&tl->put_warn, 10.0))
        kd_log(KD_LOG_ERROR, "TEACHER-CACHE-PUT", "%s (serving from memory; not cached)", msg);
    /* Serve what the cache gives back, so this run and the next see the same logits. */
    if (lossy(tl) &&
        kd_cache_roundtrip_rows(tl->enc, tl->k, tl->C, rows, dst, dst, err, errlen) != 0)
        return -1;
    return 0;
}

/* What the fill did with one block. */
enum { FILL_LOADED = 1, FILL_COMPUTED };

/* Block b, claimed by the caller: loaded on a hit, else computed and cached. FILL_*, or -1. */
static int fill_block(teacher_logits_t *tl, lane_t *ln, size_t b, char *err, size_t errlen) {
    const size_t first = b * tl->block_rows;
    char msg[KD_ERR_LEN];
    int st = get_block(tl, ln->cache, b, tl->table + first * (size_t)tl->C, msg, sizeof msg);
    if (st == KD_CACHE_HIT) {
        stat_add(&tl->hits, 1);
        publish(tl, b);
        return FILL_LOADED;
    }
    if (st == KD_CACHE_MISS) stat_add(&tl->misses, 1);
    if (st == KD_CACHE_CORRUPT) {
        stat_add(&tl->corrupt, 1);
        kd_log(KD_LOG_WARN, "TEACHER-CACHE-CORRUPT", "%s; recomputing it", msg);
    }
    if (st < 0) kd_log(KD_LOG_WARN, "TEACHER-CACHE-READ", "%s; recomputing the block", msg);
    double t0 = kd_now();
    int rc = compute_block(tl, ln, b, err, errlen);
    if (rc < 0) return -1;
    if (kd_now() - t0 > ln->slowest_block_s) ln->slowest_block_s = kd_now() - t0;
    if (rc == 0) publish(tl, b);
    return FILL_COMPUTED;
}

/* The first block at or after `from` (circularly) that nobody here has claimed; SIZE_MAX when
 * there is none. */
static size_t next_empty(const teacher_logits_t *tl, size_t from) {
    for (size_t i = 0; i < tl->n_blocks; i++) {
        size_t b = (from + i) % tl->n_blocks;
        if (atomic_load_explicit(&tl->state[b], memory_order_acquire) == BLOCK_EMPTY) return b;
    }
    return SIZE_MAX;
}

/* Called when the fill, walking up from its start, reaches a block another node computed: it
 * would now trail that node block for block, computing each one twice. Instead it loads every
 * block the cache has and moves to the middle of the longest run of missing blocks, splitting
 * that run with whoever works up from its start (work stealing by halves). */
static size_t replan(teacher_logits_t *tl, lane_t *ln) {
    const size_t n = tl->n_blocks;
    uint8_t *missing = kd_xcalloc(n, 1);
    char msg[KD_ERR_LEN];
    for (size_t b = 0; b < n && !atomic_load(&tl->stop); b++) {
        if (!claim(tl, b)) continue;
        float *dst = tl->table + b * tl->block_rows * (size_t)tl->C;
        if (kd_cache_get_block(ln->cache, b, dst, msg, sizeof msg) == KD_CACHE_HIT) {
            stat_add(&tl->hits, 1);
            publish(tl, b);
        } else { /* dst untouched: give the block back; fill_block reports what is wrong */
            unclaim(tl, b);
            missing[b] = 1;
        }
    }
    size_t best = 0, best_len = 0;
    for (size_t b = 0; b < n; b++) {
        if (!missing[b] || missing[(b + n - 1) % n]) continue; /* not the start of a run */
        size_t len = 0;
        while (len < n && missing[(b + len) % n]) len++;
        if (len > best_len) best = b, best_len = len;
    }
    if (best_len == 0 && missing[0]) best_len = n; /* everything missing: one circular run */
    free(missing);
    return (best + best_len / 2) % n;
}

static void log_progress(teacher_logits_t *tl, double t0, bool final) {
    double dt = kd_now() - t0;
    uint64_t computed = stat_get(&tl->forward_samples);
    kd_log(KD_LOG_INFO, final ? "TEACHER-FILL-DONE" : "TEACHER-FILL-PROGRESS",
           "teacher logits %s: %zu/%zu blocks ready (%llu from the cache, %llu computed, %llu of "
           "them corrupt), %llu samples computed in %.1f s (%.0f/s)",
           tl->entry, atomic_load(&tl->ready), tl->n_blocks,
           (unsigned long long)stat_get(&tl->hits),
           (unsigned long long)(stat_get(&tl->misses) + stat_get(&tl->corrupt)),
           (unsigned long long)stat_get(&tl->corrupt), (unsigned long long)computed, dt,
           dt > 0 ? (double)computed / dt : 0.0);
}

/* Another node has claimed block b (it is computing it). The lane skips it and comes back;
 * once every block left is claimed elsewhere it polls, and after waiting several times its own
 * slowest block it computes the block itself: that node may be stopped (a dead node's claims
 * are dropped by the kernel, so its blocks are free again at once). True to skip b for now. */
typedef struct {
    size_t first; /* the first block skipped since the lane last filled one; SIZE_MAX: none */
    double since;
} busy_wait_t;

static bool skip_busy(const teacher_logits_t *tl, busy_wait_t *w, const lane_t *ln, size_t b) {
    if (w->first == SIZE_MAX ||
        atomic_load_explicit(&tl->state[w->first], memory_order_acquire) != BLOCK_EMPTY) {
        *w = (busy_wait_t){b, kd_now()};
        return true;
    }
    if (b != w->first) return true;
    if (kd_now() - w->since > fmax(2.0, 4.0 * ln->slowest_block_s)) return false;
    nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL); /* around once: all are elsewhere */
    return true;
}

static void *fill_main(void *arg) {
    const struct fill_arg *fa = arg;
    teacher_logits_t *tl = fa->tl;
    lane_t *ln = &tl->fill[fa->lane];
    /* node fill_index of fill_count, lane of n_fill: each starts at its own share */
    const size_t starts = (size_t)tl->fill_count * (size_t)tl->n_fill;
    size_t cursor =
        ((size_t)tl->fill_index * (size_t)tl->n_fill + (size_t)fa->lane) * tl->n_blocks / starts;
    char err[KD_ERR_LEN];
    double t0 = kd_now(), last = t0;
    bool computed_since_replan = false;
    busy_wait_t busy = {SIZE_MAX, 0};
    while (!teacher_logits_complete(tl) && !atomic_load(&tl->stop)) {
        size_t b = next_empty(tl, cursor);
        if (b == SIZE_MAX || !claim(tl, b)) { /* the streaming thread is loading the last ones */
            sched_yield();
            continue;
        }
        int across = ln->cache ? kd_cache_claim_block(ln->cache, b) : KD_CACHE_CLAIM_UNSUPPORTED;
        if (across == KD_CACHE_CLAIM_BUSY && skip_busy(tl, &busy, ln, b)) {
            unclaim(tl, b);
            cursor = b + 1;
            continue;
        }
        busy.first = SIZE_MAX;
        int done = fill_block(tl, ln, b, err, sizeof err);
        if (across == KD_CACHE_CLAIMED) kd_cache_release_block(ln->cache, b);
        if (done < 0) {
            fill_fail(tl, err);
            return NULL;
        }
        cursor = b + 1;
        if (done == FILL_LOADED && computed_since_replan) {
            cursor = replan(tl, ln);
            computed_since_replan = false;
        }
        if (done == FILL_COMPUTED) computed_since_replan = true;
        if (fa->lane == 0 && kd_now() - last >= PROGRESS_SECONDS) {
            log_progress(tl, t0, false);
            last = kd_now();
        }
    }
    if (teacher_logits_complete(tl)) {
        char msg[KD_ERR_LEN];
        if (kd_cache_flush(ln->cache, msg, sizeof msg) != 0)
            kd_log(KD_LOG_WARN, "TEACHER-CACHE-PUT", "%s", msg);
        if (fa->lane == 0) log_progress(tl, t0, true);
    }
    return NULL;
}

int teacher_logits_start_fill(teacher_logits_t *tl, int index, int count, char *err,
                              size_t errlen) {
    if (tl->lm) return lm_logits_start_fill(tl->lm, index, count, err, errlen);
    if (tl->started) return kd_err(err, errlen, "teacher logits: the fill already started");
    if (count < 1 || index < 0 || index >= count)
        return kd_err(err, errlen, "teacher logits: node index %d is not in 0..%d", index,
                      count - 1);
    if (tl->imported) return 0; /* loaded whole at open */
    tl->fill_index = index;
    tl->fill_count = count;
    for (int i = 0; i < tl->n_fill; i++) {
        tl->args[i] = (struct fill_arg){tl, i};
        int rc = pthread_create(&tl->threads[i], NULL, fill_main, &tl->args[i]);
        if (rc != 0) {
            atomic_store(&tl->stop, true);
            for (int j = 0; j < i; j++) pthread_join(tl->threads[j], NULL);
            return kd_err(err, errlen, "teacher logits: cannot start a fill thread: %s",
                          strerror(rc));
        }
    }
    tl->started = true;
    return 0;
}

/* ---- serving ------------------------------------------------------------------------------- */

typedef struct {
    size_t block;
    size_t i; /* index into the caller's ids */
} pending_t;

static int by_block(const void *a, const void *b) {
    const pending_t *x = a, *y = b;
    if (x->block != y->block) return x->block < y->block ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* Reads block b from the cache for rows p[0..n) (all in b): copies them to out and, when the
 * fill has not claimed the block, into the table. False when the rows must be computed. */
static bool serve_from_cache(teacher_logits_t *tl, size_t b, const pending_t *p, size_t n,
                             const uint32_t *ids, float *out) {
    const size_t C = (size_t)tl->C, first = b * tl->block_rows;
    char msg[KD_ERR_LEN];
    int st = get_block(tl, tl->stream.cache, b, tl->stream.block, msg, sizeof msg);
    if (st == KD_CACHE_CORRUPT) stat_add(&tl->corrupt, 1);
    if (st != KD_CACHE_HIT) {
        if (st != KD_CACHE_MISS && kd_log_allow(&tl->stream_warn, 5.0))
            kd_log(KD_LOG_WARN, st < 0 ? "TEACHER-CACHE-READ" : "TEACHER-CACHE-CORRUPT",
                   "%s; computing its rows now", msg);
        return false;
    }
    for (size_t j = 0; j < n; j++)
        memcpy(out + p[j].i * C, tl->stream.block + (ids[p[j].i] - first) * C, C * sizeof(float));
    if (claim(tl, b)) {
        memcpy(tl->table + first * C, tl->stream.block, rows_in_block(tl, b) * C * sizeof(float));
        stat_add(&tl->hits, 1);
        publish(tl, b);
    }
    return true;
}

/* Computes rows p[0..n) now, as the fill would, into out. */
static int serve_computed(teacher_logits_t *tl, const pending_t *p, size_t n, const uint32_t *ids,
                          float *out, char *err, size_t errlen) {
    const size_t C = (size_t)tl->C;
    uint32_t *sub = kd_xmalloc(n * sizeof *sub);
    float *rows = kd_xmalloc(n * C * sizeof *rows);
    for (size_t j = 0; j < n; j++) sub[j] = ids[p[j].i];
    forward_in_slots(tl, &tl->stream, sub, n, rows, true);
    int rc = check_finite(tl, rows, sub, n, err, errlen);
    if (rc == 0 && lossy(tl))
        rc = kd_cache_roundtrip_rows(tl->enc, tl->k, tl->C, n, rows, rows, err, errlen);
    for (size_t j = 0; j < n && rc == 0; j++)
        memcpy(out + p[j].i * C, rows + j * C, C * sizeof(float));
    free(sub);
    free(rows);
    return rc;
}

int teacher_logits_get(teacher_logits_t *tl, const uint32_t *ids, size_t B, float *out, char *err,
                       size_t errlen) {
    if (tl->lm)
        return kd_err(err, errlen, "teacher logits: a language model's are records, not rows");
    const size_t C = (size_t)tl->C;
    for (size_t i = 0; i < B; i++)
        if (ids[i] >= tl->N)
            return kd_err(err, errlen, "teacher logits: sample id %u out of range (%zu samples)",
                          ids[i], tl->N);
    pending_t *p = kd_xmalloc((B ? B : 1) * sizeof *p);
    size_t n = 0;
    for (size_t i = 0; i < B; i++) {
        size_t b = block_of(tl, ids[i]);
        if (is_ready(tl, b))
            memcpy(out + i * C, tl->table + (size_t)ids[i] * C, C * sizeof(float));
        else
            p[n++] = (pending_t){b, i};
    }
    qsort(p, n, sizeof *p, by_block);
    /* Blocks another node (or our fill) cached meanwhile are read; the rest is computed. */
    size_t m = 0;
    for (size_t lo = 0, hi; lo < n; lo = hi) {
        for (hi = lo; hi < n && p[hi].block == p[lo].block;) hi++;
        if (!serve_from_cache(tl, p[lo].block, p + lo, hi - lo, ids, out))
            for (size_t j = lo; j < hi; j++) p[m++] = p[j];
    }
    int rc = m ? serve_computed(tl, p, m, ids, out, err, errlen) : 0;
    free(p);
    return rc;
}

int teacher_logits_get_records(teacher_logits_t *tl, const uint32_t *ids, size_t B, uint8_t *out,
                               char *err, size_t errlen) {
    if (!tl->lm) return kd_err(err, errlen, "teacher logits: records are a language model's");
    return lm_logits_get(tl->lm, ids, B, out, err, errlen);
}

size_t teacher_logits_record_bytes(const teacher_logits_t *tl) {
    return tl->lm ? lm_logits_record_bytes(tl->lm) : 0;
}

bool teacher_logits_complete(const teacher_logits_t *tl) {
    if (tl->lm) return lm_logits_complete(tl->lm);
    return atomic_load_explicit(&tl->ready, memory_order_acquire) == tl->n_blocks;
}

bool teacher_logits_failed(const teacher_logits_t *tl, char *err, size_t errlen) {
    if (tl->lm) return lm_logits_failed(tl->lm, err, errlen);
    if (!atomic_load_explicit(&tl->failed, memory_order_acquire)) return false;
    kd_err(err, errlen, "%s", tl->fill_err);
    return true;
}

void teacher_logits_stats(const teacher_logits_t *tl, teacher_logits_stats_t *out) {
    if (tl->lm) {
        lm_logits_stats(tl->lm, out);
        return;
    }
    out->forward_samples = stat_get(&tl->forward_samples);
    out->forward_batches = stat_get(&tl->forward_batches);
    out->on_demand_samples = stat_get(&tl->on_demand);
    out->cache_hits = stat_get(&tl->hits);
    out->cache_misses = stat_get(&tl->misses);
    out->cache_corrupt = stat_get(&tl->corrupt);
}

int teacher_logits_classes(const teacher_logits_t *tl) {
    return tl->C;
}

const char *teacher_logits_entry(const teacher_logits_t *tl) {
    return tl->lm ? lm_logits_entry(tl->lm) : tl->entry;
}

/* ---- opening ------------------------------------------------------------------------------- */

static void lane_init(teacher_logits_t *tl, lane_t *ln) {
    ln->x = kd_alloc_floats(tl->S * tl->D);
    ln->block = kd_alloc_floats(tl->block_rows * (size_t)tl->C);
    ln->slot_row = kd_xmalloc(tl->S * sizeof *ln->slot_row);
}

static void lane_free(lane_t *ln) {
    kd_model_destroy(&ln->model);
    kd_cache_close(&ln->cache);
    free(ln->x);
    free(ln->block);
    free(ln->slot_row);
    memset(ln, 0, sizeof *ln);
}

/* The recipe's teacher with its checkpoint, twice (one per thread). */
static int load_teacher(teacher_logits_t *tl, char *err, size_t errlen) {
    const kd_recipe_t *r = &tl->recipe;
    if (r->teacher.n_layers == 0)
        return kd_err(err, errlen,
                      "teacher.layers is empty: the teacher logits need a teacher (or set "
                      "cache.import to distil from imported logits)");
    if (!r->teacher.checkpoint[0])
        return kd_err(err, errlen,
                      "teacher.checkpoint is empty: the teacher needs its trained weights (or set "
                      "cache.import to distil from imported logits)");
    char why[KD_ERR_LEN];
    kd_model_t *first = NULL;
    if (kd_model_from_recipe(r, true, tl->train, &first, why, sizeof why) != 0 ||
        kd_checkpoint_load(first, r->teacher.checkpoint, why, sizeof why) != 0) {
        kd_model_destroy(&first);
        return kd_err(err, errlen, "teacher: %s", why);
    }
    tl->fill[0].model = first;
    lane_t *others[FILL_LANES_MAX + 1];
    int n = 0;
    others[n++] = &tl->stream;
    for (int i = 1; i < tl->n_fill; i++) others[n++] = &tl->fill[i];
    for (int i = 0; i < n; i++) {
        if (kd_model_from_recipe(r, true, tl->train, &others[i]->model, why, sizeof why) != 0)
            return kd_err(err, errlen, "teacher: %s", why);
        memcpy(others[i]->model->params, first->params, first->n_params * sizeof(float));
    }
    return 0;
}

static void describe_data(const teacher_logits_t *tl, char *out, size_t outlen) {
    const kd_recipe_t *r = &tl->recipe;
    const kd_dataset_t *d = tl->train;
    char images[KD_PATH_MAX];
    kd_recipe_data_path(r, r->data.train_images, images, sizeof images);
    snprintf(out, outlen,
             "training split of %.300s (val_size %ld, train_subset %ld, seed %ld): %zu samples "
             "%dx%dx%d, %d classes; %s",
             images, r->data.val_size, r->data.train_subset, r->seed, d->n, d->channels, d->height,
             d->width, d->num_classes, TEACHER_LOGITS_PREPROCESSING);
}

static int open_teacher_entry(teacher_logits_t *tl, char *err, size_t errlen) {
    const kd_recipe_t *r = &tl->recipe;
    if (load_teacher(tl, err, errlen) != 0) return -1;
    kd_cache_key_t key = {.n_samples = tl->N, .n_classes = tl->C, .encoding = tl->enc, .k = tl->k};
    kd_cache_fingerprint_teacher(tl->fill[0].model, key.teacher_fp);
    teacher_logits_data_fingerprint(tl->train, key.data_fp);
    char arch[KD_CACHE_DESC_MAX];
    kd_model_describe(tl->fill[0].model, arch, sizeof arch);
    snprintf(key.teacher_desc, sizeof key.teacher_desc, "%.200s from %.300s", arch,
             r->teacher.checkpoint);
    describe_data(tl, key.data_desc, sizeof key.data_desc);
    char why[KD_ERR_LEN];
    for (int i = 0; i < tl->n_fill; i++)
        if (!(tl->fill[i].cache = kd_cache_open(r->cache.dir, &key, why, sizeof why)))
            return kd_err(err, errlen, "cache.dir %s: %s", r->cache.dir, why);
    /* The streaming thread only reads. */
    if (!(tl->stream.cache = kd_cache_open_entry(kd_cache_dir(tl->fill[0].cache), why, sizeof why)))
        return kd_err(err, errlen, "cache.dir %s: %s", r->cache.dir, why);
    snprintf(tl->entry, sizeof tl->entry, "%s", kd_cache_name(tl->fill[0].cache));
    tl->block_rows = kd_cache_block_rows(tl->fill[0].cache);
    return 0;
}

/* The entry directory imported as label for this split: the recipe's encoding when there is
 * one, else the most precise there is. 0, or -1 with err set. */
static int find_import(teacher_logits_t *tl, const char *pair, char *out, size_t outlen, char *err,
                       size_t errlen) {
    static const char *const PRECISE_FIRST[] = {"fp32", "fp16", "int8", "topk"};
    char want[32];
    kd_cache_key_t key = {.encoding = tl->enc, .k = tl->k};
    kd_cache_entry_subdir(&key, want, sizeof want);
    DIR *d = opendir(pair);
    if (!d) return -1;
    char best[64] = "";
    int best_rank = 99;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof best) continue;
        int rank = strcmp(e->d_name, want) == 0 ? -1 : 98;
        for (int i = 0; rank == 98 && i < 4; i++)
            if (strncmp(e->d_name, PRECISE_FIRST[i], strlen(PRECISE_FIRST[i])) == 0) rank = i;
        if (rank == 98) continue; /* not an entry */
        if (rank < best_rank || (rank == best_rank && strcmp(e->d_name, best) < 0)) {
            best_rank = rank;
            snprintf(best, sizeof best, "%.63s", e->d_name);
        }
    }
    closedir(d);
    if (!best[0]) return -1;
    if (snprintf(out, outlen, "%s/%s", pair, best) >= (int)outlen)
        return kd_err(err, errlen, "cache.dir %s: path too long", tl->recipe.cache.dir);
    return 0;
}

/* Imported logits: the whole entry is read now, so a gap is an error before anything streams. */
static int open_import(teacher_logits_t *tl, char *err, size_t errlen) {
    const kd_recipe_t *r = &tl->recipe;
    const char *label = r->cache.import;
    char ifp[KD_CACHE_FP_HEX + 1], dfp[KD_CACHE_FP_HEX + 1], pair[KD_PATH_MAX + 80],
        entry[KD_PATH_MAX + 160], why[KD_ERR_LEN];
    kd_cache_fingerprint_import(label, ifp);
    teacher_logits_data_fingerprint(tl->train, dfp);
    snprintf(pair, sizeof pair, "%s/%s-%s", r->cache.dir, ifp, dfp);
    if (find_import(tl, pair, entry, sizeof entry, err, errlen) != 0)
        return kd_err(err, errlen,
                      "cache.import '%s': no logits imported under that label for this training "
                      "split (%zu samples, data fingerprint %s) in %s; import them with: kdist "
                      "cache import --dir %s --data-fingerprint %s --label '%s' --encoding fp32 "
                      "FILE.npy",
                      label, tl->N, dfp, r->cache.dir, r->cache.dir, dfp, label);
    kd_cache_t *c = kd_cache_open_entry(entry, why, sizeof why);
    if (!c) return kd_err(err, errlen, "cache.import '%s': %s", label, why);
    const kd_cache_key_t *key = kd_cache_key(c);
    snprintf(tl->entry, sizeof tl->entry, "%s", kd_cache_name(c));
    tl->block_rows = kd_cache_block_rows(c);
    int rc = 0;
    if (key->n_samples != tl->N || key->n_classes != tl->C)
        rc = kd_err(err, errlen,
                    "cache.import '%s': entry %s holds %zu samples x %d classes but the training "
                    "split has %zu x %d",
                    label, tl->entry, key->n_samples, key->n_classes, tl->N, tl->C);
    for (size_t b = 0; rc == 0 && b < kd_cache_blocks(c); b++) {
        size_t first = b * tl->block_rows;
        int st = get_block(tl, c, b, tl->table + first * (size_t)tl->C, why, sizeof why);
        if (st == KD_CACHE_HIT) continue;
        if (st == KD_CACHE_MISS) snprintf(why, sizeof why, "block %zu was never written", b);
        rc = kd_err(err, errlen,
                    "cache.import '%s': entry %s has no logits for samples %zu..%zu (%s); "
                    "import the whole split again",
                    label, tl->entry, first, first + rows_in_block(tl, b) - 1, why);
    }
    if (rc == 0) stat_add(&tl->hits, kd_cache_blocks(c));
    kd_cache_close(&c);
    return rc;
}

static int check_recipe(const teacher_logits_t *tl, char *err, size_t errlen) {
    const kd_recipe_t *r = &tl->recipe;
    if (tl->N == 0) return kd_err(err, errlen, "teacher logits: the training split is empty");
    if (tl->N > UINT32_MAX)
        return kd_err(err, errlen, "teacher logits: %zu samples do not fit 32-bit ids", tl->N);
    if (r->teacher.batch_size < 1)
        return kd_err(err, errlen, "teacher.batch_size %ld must be >= 1", r->teacher.batch_size);
    if (!r->cache.dir[0]) return kd_err(err, errlen, "cache.dir is empty");
    if (tl->enc == KD_ENC_TOPK && (r->cache.topk < 1 || r->cache.topk > tl->C))
        return kd_err(err, errlen, "cache.topk %ld must be in 1..%d (the number of classes)",
                      r->cache.topk, tl->C);
    return 0;
}

/* One fill lane per core (train.threads, else the online CPUs). OpenBLAS on two threads leaves
 * the teacher's non-GEMM layers (im2col, pooling, activations) on one core; lanes use them all. */
static int fill_lanes(const kd_recipe_t *r) {
    long n = r->train.threads > 0 ? r->train.threads : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > FILL_LANES_MAX) n = FILL_LANES_MAX;
    if (n > 1) kd_set_threads(1);
    return (int)n;
}

teacher_logits_t *teacher_logits_open(const kd_recipe_t *r, const kd_dataset_t *train, char *err,
                                      size_t errlen) {
    KD_ASSERT(r && train);
    teacher_logits_t *tl = kd_xcalloc(1, sizeof *tl);
    if (train->tokens) {
        tl->C = train->num_classes;
        if (!(tl->lm = lm_logits_open(r, train, err, errlen))) goto fail;
        return tl;
    }
    tl->recipe = *r;
    tl->train = train;
    tl->N = train->n;
    tl->D = train->sample_dim;
    tl->C = train->num_classes;
    tl->S = (size_t)(r->teacher.batch_size > 0 ? r->teacher.batch_size : 1);
    tl->enc = r->cache.encoding;
    tl->k = tl->enc == KD_ENC_TOPK ? (int)r->cache.topk : 0;
    tl->imported = r->cache.import[0] != 0;
    tl->n_fill = fill_lanes(r);
    if (check_recipe(tl, err, errlen) != 0) goto fail;
    tl->table = kd_alloc_floats(tl->N * (size_t)tl->C);
    if (tl->imported ? open_import(tl, err, errlen) : open_teacher_entry(tl, err, errlen))
        goto fail;
    tl->n_blocks = (tl->N + tl->block_rows - 1) / tl->block_rows;
    tl->state = kd_xcalloc(tl->n_blocks, sizeof *tl->state);
    if (tl->imported) {
        for (size_t b = 0; b < tl->n_blocks; b++) tl->state[b] = BLOCK_READY;
        atomic_store(&tl->ready, tl->n_blocks);
        kd_log(KD_LOG_INFO, "TEACHER-LOGITS-IMPORT",
               "teacher logits: %zu x %d imported as '%s' (entry %s)", tl->N, tl->C,
               r->cache.import, tl->entry);
        return tl;
    }
    for (int i = 0; i < tl->n_fill; i++) lane_init(tl, &tl->fill[i]);
    lane_init(tl, &tl->stream);
    kd_log(KD_LOG_INFO, "TEACHER-LOGITS-OPEN",
           "teacher logits: %zu x %d in cache entry %s/%s (%s, %zu blocks of %zu rows)", tl->N,
           tl->C, r->cache.dir, tl->entry, kd_cache_encoding_name(tl->enc), tl->n_blocks,
           tl->block_rows);
    return tl;
fail:
    teacher_logits_close(&tl);
    return NULL;
}

void teacher_logits_close(teacher_logits_t **tl_p) {
    if (!tl_p || !*tl_p) return;
    teacher_logits_t *tl = *tl_p;
    lm_logits_close(&tl->lm);
    if (tl->started) {
        atomic_store(&tl->stop, true);
        for (int i = 0; i < tl->n_fill; i++) pthread_join(tl->threads[i], NULL);
    }
    for (int i = 0; i < FILL_LANES_MAX; i++) lane_free(&tl->fill[i]);
    lane_free(&tl->stream);
    free(tl->table);
    free((void *)tl->state);
    free(tl);
    *tl_p = NULL;
}
