/* lm_logits: a language-model teacher's per-position logits as cache records (see lm_logits.h).
 *
 * Groups (teacher.batch_size consecutive windows, one forward pass) have a state: EMPTY, BUSY
 * (a thread of this process is computing it) or READY (every window of it is in the cache
 * file). Serving reads a window's block from the file (the page cache keeps a warm entry in
 * memory) and computes its group on the spot when the block is missing or corrupt; the fill
 * threads walk the groups from this node's share of them, as logits.c's fill does, claiming
 * each one across processes so two teacher nodes do not compute the same group. */
#include "lm_logits.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kd_checkpoint.h"
#include "kd_log.h"
#include "kd_tokens.h"
#include "kd_train.h"
#include "kd_util.h"

#define LM_PROGRESS_SECONDS 5.0
#define LM_LANES_MAX        8

enum { GROUP_EMPTY = 0, GROUP_BUSY, GROUP_READY };

/* One thread's teacher, cache handle and buffers for one group. */
typedef struct {
    kd_model_t *model; /* NULL for imported records */
    kd_cache_t *cache;
    uint32_t *tokens; /* (S, T) */
    uint8_t *records; /* (S, T, record_bytes) */
    void *codec;      /* kd_cache_encode_records' scratch */
} lane_t;

struct lm_logits {
    kd_recipe_t recipe;
    const kd_dataset_t *train;
    size_t N, T, S, n_groups, rb;
    int V, teacher_vocab;
    kd_cache_key_t key;
    bool imported;
    char entry[KD_CACHE_NAME_MAX];

    _Atomic uint8_t *state; /* (n_groups) GROUP_* */
    atomic_size_t ready;
    lane_t stream, fill[LM_LANES_MAX];
    int n_fill;
    pthread_t threads[LM_LANES_MAX];
    struct lm_fill_arg {
        struct lm_logits *l;
        int lane;
    } args[LM_LANES_MAX];
    bool started;
    int fill_index, fill_count;
    atomic_bool stop, failed;
    char fill_err[KD_ERR_LEN];

    _Atomic uint64_t forward_samples, forward_batches, on_demand, hits, misses, corrupt;
    kd_log_limit_t warn;
};

static void stat_add(_Atomic uint64_t *c, uint64_t n) {
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static uint64_t stat_get(const _Atomic uint64_t *c) {
    return atomic_load_explicit(c, memory_order_relaxed);
}

static size_t windows_in_group(const lm_logits_t *l, size_t g) {
    size_t first = g * l->S;
    return l->N - first < l->S ? l->N - first : l->S;
}

static bool claim(lm_logits_t *l, size_t g) {
    uint8_t expect = GROUP_EMPTY;
    return atomic_compare_exchange_strong_explicit(&l->state[g], &expect, GROUP_BUSY,
                                                   memory_order_acq_rel, memory_order_acquire);
}

static void set_state(lm_logits_t *l, size_t g, uint8_t st) {
    atomic_store_explicit(&l->state[g], st, memory_order_release);
    if (st == GROUP_READY) atomic_fetch_add_explicit(&l->ready, 1, memory_order_release);
}

void lm_logits_key(const kd_recipe_t *r, const kd_dataset_t *train, kd_cache_key_t *key) {
    kd_lm_teacher_t format; /* what the workers decode: one definition for both sides */
    kd_lm_teacher_format(r, train->num_classes, &format);
    *key = format.key;
    key->n_samples = train->n * (train->window - 1);
    key->block_rows = train->window - 1;
    kd_cache_fingerprint_data(train, KD_CACHE_PREPROCESSING_TOKENS, key->data_fp);
    char files[KD_PATH_MAX];
    kd_recipe_data_path(r, r->data.n_files ? r->data.files[0] : "", files, sizeof files);
    snprintf(key->data_desc, sizeof key->data_desc,
             "%s of %.300s%s (tokenizer %s, context %zu, stride %zu): %zu windows",
             KD_CACHE_PREPROCESSING_TOKENS, files, r->data.n_files > 1 ? " and more" : "",
             train->tokenizer, train->window - 1, train->stride, train->n);
}

/* ---- the teacher ---------------------------------------------------------------------------- */

struct encode_ctx {
    lm_logits_t *l;
    lane_t *ln;
    size_t first_row, real_rows;
    int rc;
    char *err;
    size_t errlen;
};

/* The head's chunk of positions (n, teacher vocabulary) straight into records; the padding rows
 * of a padded vocabulary (beyond the data's) are left out. */
static double encode_chunk(void *ctx_, size_t pos0, size_t n, float *logits, bool grad) {
    (void)grad;
    struct encode_ctx *c = ctx_;
    const lm_logits_t *l = c->l;
    for (size_t i = 0; i < n && c->rc == 0; i++) {
        size_t p = pos0 + i;
        if (p >= c->real_rows) break; /* a padding window of the last group */
        c->rc = kd_cache_encode_records(
            &l->key, c->first_row + p, 1, logits + i * (size_t)l->teacher_vocab,
            c->ln->records + p * l->rb, &c->ln->codec, c->err, c->errlen);
    }
    return 0.0;
}

/* Runs group g through the teacher into ln->records and writes its windows' blocks. */
static int compute_group(lm_logits_t *l, lane_t *ln, size_t g, bool on_demand, char *err,
                         size_t errlen) {
    const size_t S = l->S, T = l->T, first = g * S, real = windows_in_group(l, g);
    uint32_t *window = kd_xmalloc((T + 1) * sizeof *window);
    memset(ln->tokens, 0, S * T * sizeof *ln->tokens);
    for (size_t s = 0; s < real; s++) {
        uint32_t id = (uint32_t)(first + s);
        kd_dataset_gather_windows(l->train, &id, 1, window);
        memcpy(ln->tokens + s * T, window, T * sizeof *window);
    }
    free(window);
    kd_gpt_forward(ln->model->gpt, ln->tokens, (int)S, (int)T, false, 0);
    char why[KD_ERR_LEN];
    struct encode_ctx ctx = {l, ln, first * T, real * T, 0, why, sizeof why};
    kd_gpt_head(ln->model->gpt, encode_chunk, &ctx, false);
    stat_add(&l->forward_batches, 1);
    stat_add(&l->forward_samples, real);
    if (on_demand) stat_add(&l->on_demand, real);
    if (ctx.rc != 0)
        return kd_err(err, errlen,
                      "teacher %s on window %zu..%zu: %s (its weights are broken: logits that are "
                      "not finite are never served or cached)",
                      l->recipe.teacher.checkpoint, first, first + real - 1, why);
    for (size_t s = 0; s < real; s++)
        if (kd_cache_put_records(ln->cache, first + s, ln->records + s * T * l->rb, why,
                                 sizeof why) != 0 &&
            kd_log_allow(&l->warn, 10.0))
            kd_log(KD_LOG_ERROR, "TEACHER-CACHE-PUT", "%s (serving from memory; not cached)", why);
    return 0;
}

/* Group g into ln->records: read when every window is cached, else computed. 1 computed, 0
 * read, -1 error. */
static int fill_group(lm_logits_t *l, lane_t *ln, size_t g, char *err, size_t errlen) {
    const size_t first = g * l->S, real = windows_in_group(l, g);
    char msg[KD_ERR_LEN];
    size_t hit = 0;
    for (size_t s = 0; s < real; s++) { /* every window read: the counts are per window */
        int st = kd_cache_get_records(ln->cache, first + s, ln->records + s * l->T * l->rb, msg,
                                      sizeof msg);
        if (st == KD_CACHE_HIT) hit++;
        if (st == KD_CACHE_MISS) stat_add(&l->misses, 1);
        if (st == KD_CACHE_CORRUPT) {
            stat_add(&l->corrupt, 1);
            kd_log(KD_LOG_WARN, "TEACHER-CACHE-CORRUPT", "%s; recomputing its group", msg);
        }
        if (st < 0) kd_log(KD_LOG_WARN, "TEACHER-CACHE-READ", "%s; recomputing its group", msg);
    }
    if (hit == real) {
        stat_add(&l->hits, real);
        return 0;
    }
    return compute_group(l, ln, g, false, err, errlen) == 0 ? 1 : -1;
}

/* ---- the fill ------------------------------------------------------------------------------- */

static void log_progress(lm_logits_t *l, double t0, bool final) {
    double dt = kd_now() - t0;
    uint64_t windows = stat_get(&l->forward_samples);
    kd_log(KD_LOG_INFO, final ? "TEACHER-FILL-DONE" : "TEACHER-FILL-PROGRESS",
           "teacher logits %s: %zu/%zu groups of %zu windows ready (%llu windows from the cache, "
           "%llu computed: %.0f tokens/s)",
           l->entry, atomic_load(&l->ready), l->n_groups, l->S,
           (unsigned long long)stat_get(&l->hits), (unsigned long long)windows,
           dt > 0 ? (double)windows * (double)l->T / dt : 0.0);
}

static size_t next_empty(const lm_logits_t *l, size_t from) {
    for (size_t i = 0; i < l->n_groups; i++) {
        size_t g = (from + i) % l->n_groups;
        if (atomic_load_explicit(&l->state[g], memory_order_acquire) == GROUP_EMPTY) return g;
    }
    return SIZE_MAX;
}

static void *fill_main(void *arg) {
    const struct lm_fill_arg *fa = arg;
    lm_logits_t *l = fa->l;
    lane_t *ln = &l->fill[fa->lane];
    const size_t starts = (size_t)l->fill_count * (size_t)l->n_fill;
    size_t cursor =
        ((size_t)l->fill_index * (size_t)l->n_fill + (size_t)fa->lane) * l->n_groups / starts;
    char err[KD_ERR_LEN];
    double t0 = kd_now(), last = t0;
    bool skipped_last = false;
    while (!lm_logits_complete(l) && !atomic_load(&l->stop)) {
        size_t g = next_empty(l, cursor);
        if (g == SIZE_MAX || !claim(l, g)) { /* the streaming thread holds the last ones */
            nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
            continue;
        }
        /* Another node computing g: come back to it (its claim dies with it). */
        const size_t first_block = g * l->S;
        int across = kd_cache_claim_block(ln->cache, first_block);
        if (across == KD_CACHE_CLAIM_BUSY) {
            set_state(l, g, GROUP_EMPTY);
            cursor = g + 1;
            if (skipped_last) nanosleep(&(struct timespec){.tv_nsec = 2000000}, NULL);
            skipped_last = true;
            continue;
        }
        skipped_last = false;
        int rc = fill_group(l, ln, g, err, sizeof err);
        if (across == KD_CACHE_CLAIMED) kd_cache_release_block(ln->cache, first_block);
        if (rc < 0) {
            snprintf(l->fill_err, sizeof l->fill_err, "%s", err);
            atomic_store_explicit(&l->failed, true, memory_order_release);
            kd_log(KD_LOG_ERROR, "TEACHER-FILL-FAIL", "teacher logits: %s", err);
            set_state(l, g, GROUP_EMPTY);
            return NULL;
        }
        set_state(l, g, GROUP_READY);
        cursor = g + 1;
        if (fa->lane == 0 && kd_now() - last >= LM_PROGRESS_SECONDS) {
            log_progress(l, t0, false);
            last = kd_now();
        }
    }
    if (lm_logits_complete(l)) {
        char msg[KD_ERR_LEN];
        if (kd_cache_flush(ln->cache, msg, sizeof msg) != 0)
            kd_log(KD_LOG_WARN, "TEACHER-CACHE-PUT", "%s", msg);
        if (fa->lane == 0) log_progress(l, t0, true);
    }
    return NULL;
}

int lm_logits_start_fill(lm_logits_t *l, int index, int count, char *err, size_t errlen) {
    if (l->started) return kd_err(err, errlen, "teacher logits: the fill already started");
    if (count < 1 || index < 0 || index >= count)
        return kd_err(err, errlen, "teacher logits: node index %d is not in 0..%d", index,
                      count - 1);
    if (l->imported) return 0;
    l->fill_index = index;
    l->fill_count = count;
    for (int i = 0; i < l->n_fill; i++) {
        l->args[i] = (struct lm_fill_arg){l, i};
        int rc = pthread_create(&l->threads[i], NULL, fill_main, &l->args[i]);
        if (rc != 0) {
            atomic_store(&l->stop, true);
            for (int j = 0; j < i; j++) pthread_join(l->threads[j], NULL);
            return kd_err(err, errlen, "teacher logits: cannot start a fill thread: %s",
                          strerror(rc));
        }
    }
    l->started = true;
    return 0;
}

/* ---- serving -------------------------------------------------------------------------------- */

int lm_logits_get(lm_logits_t *l, const uint32_t *ids, size_t B, uint8_t *out, char *err,
                  size_t errlen) {
    const size_t per_window = l->T * l->rb;
    for (size_t i = 0; i < B; i++) {
        if (ids[i] >= l->N)
            return kd_err(err, errlen, "teacher logits: window %u out of range (%zu windows)",
                          ids[i], l->N);
        char msg[KD_ERR_LEN];
        int st =
            kd_cache_get_records(l->stream.cache, ids[i], out + i * per_window, msg, sizeof msg);
        if (st == KD_CACHE_HIT) continue;
        if (st != KD_CACHE_MISS && kd_log_allow(&l->warn, 5.0))
            kd_log(KD_LOG_WARN, st < 0 ? "TEACHER-CACHE-READ" : "TEACHER-CACHE-CORRUPT",
                   "%s; computing its window now", msg);
        if (st == KD_CACHE_CORRUPT) stat_add(&l->corrupt, 1);
        if (l->imported)
            return kd_err(err, errlen, "cache.import '%s': entry %s has no records for window %u",
                          l->recipe.cache.import, l->entry, ids[i]);
        const size_t g = ids[i] / l->S;
        if (compute_group(l, &l->stream, g, true, err, errlen) != 0) return -1;
        memcpy(out + i * per_window, l->stream.records + (ids[i] - g * l->S) * per_window,
               per_window);
        if (claim(l, g)) set_state(l, g, GROUP_READY);
    }
    return 0;
}

size_t lm_logits_record_bytes(const lm_logits_t *l) {
    return l->rb;
}

bool lm_logits_complete(const lm_logits_t *l) {
    return atomic_load_explicit(&l->ready, memory_order_acquire) == l->n_groups;
}

bool lm_logits_failed(const lm_logits_t *l, char *err, size_t errlen) {
    if (!atomic_load_explicit(&l->failed, memory_order_acquire)) return false;
    kd_err(err, errlen, "%s", l->fill_err);
    return true;
}

void lm_logits_stats(const lm_logits_t *l, teacher_logits_stats_t *out) {
    out->forward_samples = stat_get(&l->forward_samples);
    out->forward_batches = stat_get(&l->forward_batches);
    out->on_demand_samples = stat_get(&l->on_demand);
    out->cache_hits = stat_get(&l->hits);
    out->cache_misses = stat_get(&l->misses);
    out->cache_corrupt = stat_get(&l->corrupt);
}

const char *lm_logits_entry(const lm_logits_t *l) {
    return l->entry;
}

/* ---- opening -------------------------------------------------------------------------------- */

static void lane_free(lane_t *ln) {
    kd_model_destroy(&ln->model);
    kd_cache_close(&ln->cache);
    free(ln->tokens);
    free(ln->records);
    kd_cache_codec_free(&ln->codec);
    memset(ln, 0, sizeof *ln);
}

static int open_lane(lm_logits_t *l, lane_t *ln, const kd_model_t *weights, char *err,
                     size_t errlen) {
    const kd_recipe_t *r = &l->recipe;
    char why[KD_ERR_LEN];
    ln->tokens = kd_xcalloc(l->S * l->T, sizeof *ln->tokens);
    ln->records = kd_xmalloc(l->S * l->T * l->rb);
    if (!(ln->cache = kd_cache_open(r->cache.dir, &l->key, why, sizeof why)))
        return kd_err(err, errlen, "cache.dir %s: %s", r->cache.dir, why);
    if (ln != &l->fill[0]) {
        if (kd_model_from_recipe(r, true, l->train, &ln->model, why, sizeof why) != 0)
            return kd_err(err, errlen, "teacher: %s", why);
        memcpy(ln->model->params, weights->params, weights->n_params * sizeof(float));
    }
    return 0;
}

/* The teacher with its checkpoint, its fingerprint in the key, and one lane per thread. */
static int open_teacher(lm_logits_t *l, char *err, size_t errlen) {
    const kd_recipe_t *r = &l->recipe;
    if (r->teacher.gpt.layers == 0)
        return kd_err(err, errlen,
                      "teacher.gpt is not set: a language model's logits need a GPT teacher (or "
                      "set cache.import to distil from imported logits)");
    if (!r->teacher.checkpoint[0])
        return kd_err(err, errlen,
                      "teacher.checkpoint is empty: the teacher needs its trained weights (a "
                      "safetensors file or a Hugging Face GPT-2 directory), or set cache.import");
    char why[KD_ERR_LEN];
    kd_model_t *first = NULL;
    if (kd_model_from_recipe(r, true, l->train, &first, why, sizeof why) != 0 ||
        kd_checkpoint_load(first, r->teacher.checkpoint, why, sizeof why) != 0) {
        kd_model_destroy(&first);
        return kd_err(err, errlen, "teacher: %s", why);
    }
    l->fill[0].model = first;
    l->teacher_vocab = first->gpt->cfg.vocab;
    if (l->teacher_vocab > l->V && !r->teacher.drop_vocab_padding)
        return kd_err(err, errlen,
                      "teacher.gpt.vocab %d is larger than the tokenizer's %d ids (a padded "
                      "vocabulary): set teacher.drop_vocab_padding: true to drop logits %d..%d "
                      "(no token of this data has them), or correct teacher.gpt.vocab",
                      l->teacher_vocab, l->V, l->V, l->teacher_vocab - 1);
    kd_cache_fingerprint_teacher(first, l->key.teacher_fp);
    char arch[256];
    kd_model_describe(first, arch, sizeof arch);
    snprintf(l->key.teacher_desc, sizeof l->key.teacher_desc, "%.200s from %.300s", arch,
             r->teacher.checkpoint);
    if (open_lane(l, &l->fill[0], first, err, errlen) != 0) return -1;
    for (int i = 1; i < l->n_fill; i++)
        if (open_lane(l, &l->fill[i], first, err, errlen) != 0) return -1;
    if (open_lane(l, &l->stream, first, err, errlen) != 0) return -1;
    snprintf(l->entry, sizeof l->entry, "%s", kd_cache_name(l->fill[0].cache));
    return 0;
}

/* Records imported as cache.import for this split: every window must be there. */
static int open_import(lm_logits_t *l, char *err, size_t errlen) {
    const kd_recipe_t *r = &l->recipe;
    kd_cache_fingerprint_import(r->cache.import, l->key.teacher_fp);
    char dir[KD_PATH_MAX + 160], sub[40], why[KD_ERR_LEN];
    kd_cache_entry_subdir(&l->key, sub, sizeof sub);
    snprintf(dir, sizeof dir, "%s/%s-%s/%s", r->cache.dir, l->key.teacher_fp, l->key.data_fp, sub);
    if (kd_file_exists(dir) && !(l->stream.cache = kd_cache_open_entry(dir, why, sizeof why)))
        return kd_err(err, errlen, "cache.import '%s': %s", r->cache.import, why);
    if (!l->stream.cache)
        return kd_err(err, errlen,
                      "cache.import '%s': no %s logits imported under that label for these "
                      "windows (data fingerprint %s) in %s; import them with kdist cache import "
                      "--dir %s --data-fingerprint %s --label '%s' --encoding %s ...",
                      r->cache.import, kd_cache_encoding_name(r->cache.encoding), l->key.data_fp,
                      r->cache.dir, r->cache.dir, l->key.data_fp, r->cache.import,
                      kd_cache_encoding_name(r->cache.encoding));
    const kd_cache_key_t *got = kd_cache_key(l->stream.cache);
    snprintf(l->entry, sizeof l->entry, "%s", kd_cache_name(l->stream.cache));
    if (got->n_samples != l->key.n_samples || got->n_classes != l->V || got->block_rows != l->T)
        return kd_err(err, errlen,
                      "cache.import '%s': entry %s holds %zu positions of %d classes in blocks of "
                      "%zu, but the split has %zu windows x %zu positions of %d",
                      r->cache.import, l->entry, got->n_samples, got->n_classes, got->block_rows,
                      l->N, l->T, l->V);
    l->key = *got;
    size_t written = 0;
    if (kd_cache_coverage(l->stream.cache, &written, why, sizeof why) != 0)
        return kd_err(err, errlen, "cache.import '%s': %s", r->cache.import, why);
    if (written != l->N)
        return kd_err(err, errlen,
                      "cache.import '%s': entry %s covers %zu of %zu windows; import the whole "
                      "split again",
                      r->cache.import, l->entry, written, l->N);
    stat_add(&l->hits, l->N);
    return 0;
}

static int lanes_for(const kd_recipe_t *r) {
    long n = r->train.threads > 0 ? r->train.threads : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > LM_LANES_MAX) n = LM_LANES_MAX;
    if (n > 1) kd_set_threads(1); /* the lanes are the parallelism (logits.h) */
    return (int)n;
}

lm_logits_t *lm_logits_open(const kd_recipe_t *r, const kd_dataset_t *train, char *err,
                            size_t errlen) {
    KD_ASSERT(r && train && train->tokens);
    lm_logits_t *l = kd_xcalloc(1, sizeof *l);
    l->recipe = *r;
    l->train = train;
    l->N = train->n;
    l->T = train->window - 1;
    l->V = train->num_classes;
    l->S = (size_t)(r->teacher.batch_size > 0 ? r->teacher.batch_size : 1);
    l->imported = r->cache.import[0] != 0;
    lm_logits_key(r, train, &l->key);
    if (l->N == 0 || l->N > UINT32_MAX) {
        kd_err(err, errlen, "teacher logits: %zu training windows (1..2^32 - 1 are served)", l->N);
        goto fail;
    }
    if (!r->cache.dir[0]) {
        kd_err(err, errlen, "cache.dir is empty");
        goto fail;
    }
    l->n_groups = (l->N + l->S - 1) / l->S;
    l->rb = kd_cache_record_bytes(l->key.encoding, l->V, l->key.k);
    if (!l->imported) l->n_fill = lanes_for(r);
    if (l->imported ? open_import(l, err, errlen) : open_teacher(l, err, errlen)) goto fail;
    l->rb = kd_cache_record_bytes(l->key.encoding, l->V, l->key.k);
    l->state = kd_xcalloc(l->n_groups, sizeof *l->state);
    if (l->imported) {
        for (size_t g = 0; g < l->n_groups; g++) l->state[g] = GROUP_READY;
        atomic_store(&l->ready, l->n_groups);
    }
    kd_log(KD_LOG_INFO, "TEACHER-LOGITS-OPEN",
           "teacher logits: %zu windows x %zu positions, vocabulary %d, in cache entry %s/%s (%zu "
           "bytes per position)",
           l->N, l->T, l->V, r->cache.dir, l->entry, l->rb);
    return l;
fail:
    lm_logits_close(&l);
    return NULL;
}

void lm_logits_close(lm_logits_t **l_p) {
    if (!l_p || !*l_p) return;
    lm_logits_t *l = *l_p;
    if (l->started) {
        atomic_store(&l->stop, true);
        for (int i = 0; i < l->n_fill; i++) pthread_join(l->threads[i], NULL);
    }
    for (int i = 0; i < LM_LANES_MAX; i++) lane_free(&l->fill[i]);
    lane_free(&l->stream);
    free((void *)l->state);
    free(l);
    *l_p = NULL;
}
