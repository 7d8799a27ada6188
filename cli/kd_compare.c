/* kd_compare: saved weights measured side by side, the table `kdist run` ends a distillation
 * with (teacher, student alone, distilled student): test accuracy, parameters, size on disk and
 * inference samples/s. Every row is measured in this process the same way: `kdist eval`'s
 * evaluation on the recipe's test split, and timed forward passes with one thread count.
 * Not thread-safe. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_checkpoint.h"
#include "kd_cli.h"
#include "kd_metrics.h"
#include "kd_tokens.h"
#include "kd_train.h"

#define TIME_MIN_SECONDS 1.0 /* whole passes over the test set until this much time has gone */

typedef struct {
    bool ok;
    char why[KD_ERR_LEN];
    kd_eval_t test;
    size_t params;
    long long bytes;
    double samples_per_sec;
    /* language models: measured on the validation split against the teacher; the run's cache
     * cost from its summary (-1: none) */
    kd_eval_t val;
    long long record_bytes, teacher_forwards;
} row_result_t;

/* The teacher's logits on the validation windows, at most this many floats (else no KL). */
#define LM_TEACHER_MAX_FLOATS ((size_t)128 << 20)

int cli_load_weights(const kd_recipe_t *r, bool teacher, const kd_dataset_t *shape_from,
                     const char *path, kd_model_t **out, char *err, size_t errlen) {
    if (kd_model_from_recipe(r, teacher, shape_from, out, err, errlen) != 0) return -1;
    if (kd_checkpoint_load(*out, path, err, errlen) != 0) {
        kd_model_destroy(out);
        return -1;
    }
    return 0;
}

/* Samples per second of inference (dropout off) over x (n, D) in batches of
 * CLI_COMPARE_BATCH: one warm-up batch (workspace, BLAS threads), then whole passes until
 * TIME_MIN_SECONDS have gone, so a fast model is timed over many passes. */
static double time_inference(kd_model_t *m, const float *x, size_t n, size_t D) {
    if (n == 0) return 0.0;
    kd_model_forward(m, x, (int)(n < CLI_COMPARE_BATCH ? n : CLI_COMPARE_BATCH), false, 0);
    size_t samples = 0;
    double t0 = kd_now(), seconds;
    do {
        for (size_t start = 0; start < n; start += CLI_COMPARE_BATCH) {
            size_t B = n - start < CLI_COMPARE_BATCH ? n - start : CLI_COMPARE_BATCH;
            kd_model_forward(m, x + start * D, (int)B, false, 0);
        }
        samples += n;
        seconds = kd_now() - t0;
    } while (seconds < TIME_MIN_SECONDS);
    return (double)samples / seconds;
}

static double noop_head(void *ctx, size_t pos0, size_t n, float *logits, bool grad) {
    (void)ctx, (void)pos0, (void)n, (void)logits, (void)grad;
    return 0.0;
}

/* Tokens per second of a GPT's forward passes, head included, over the windows of ds in
 * batches of 8 windows: whole passes until TIME_MIN_SECONDS have gone. */
static double time_lm_inference(kd_model_t *m, const kd_dataset_t *ds) {
    const int T = (int)ds->window - 1, Bmax = 8;
    uint32_t *windows = kd_xmalloc((size_t)Bmax * ds->window * sizeof *windows);
    uint32_t ids[8];
    kd_lm_batch_t lb = {0};
    size_t tokens = 0;
    double t0 = kd_now(), seconds;
    do {
        for (size_t start = 0; start < ds->n; start += (size_t)Bmax) {
            int B = (int)(ds->n - start < (size_t)Bmax ? ds->n - start : (size_t)Bmax);
            for (int i = 0; i < B; i++) ids[i] = (uint32_t)(start + (size_t)i);
            kd_dataset_gather_windows(ds, ids, (size_t)B, windows);
            kd_lm_batch_split(&lb, windows, B, T);
            kd_gpt_forward(m->gpt, lb.tokens, B, T, false, 0);
            kd_gpt_head(m->gpt, noop_head, NULL, false);
            tokens += (size_t)B * T;
        }
        seconds = kd_now() - t0;
    } while (seconds < TIME_MIN_SECONDS && ds->n > 0);
    kd_lm_batch_free(&lb);
    free(windows);
    return seconds > 0 ? (double)tokens / seconds : 0.0;
}

/* A run's teacher cost from its summary.json: bytes a position in the cache and teacher
 * forward passes (windows); -1 when the run has none. */
static void run_teacher_cost(const char *run, row_result_t *res) {
    res->record_bytes = res->teacher_forwards = -1;
    if (!run) return;
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/summary.json", run);
    json_t *j = json_load_file(path, 0, NULL), *t = json_object_get(j, "teacher");
    json_t *rb = json_object_get(t, "record_bytes_per_token");
    if (json_is_integer(rb)) {
        res->record_bytes = json_integer_value(rb);
        res->teacher_forwards = json_integer_value(json_object_get(t, "forward_samples"));
    }
    json_decref(j);
}

/* One row: a classifier on the test split (x: its inputs); a language model on the
 * validation split against the teacher (teacher_val, or NULL) and on the test split. */
static void measure_row(const kd_recipe_t *r, const kd_splits_t *d, const float *x,
                        const float *teacher_val, const cli_compare_row_t *row, row_result_t *res) {
    memset(res, 0, sizeof *res);
    kd_model_t *m = NULL;
    if (cli_load_weights(r, row->teacher, d->train, row->weights, &m, res->why, sizeof res->why) !=
        0)
        return;
    struct stat st;
    res->bytes = stat(row->weights, &st) == 0 ? (long long)st.st_size : -1;
    res->params = m->n_params;
    if (m->gpt) {
        kd_evaluate(m, d->val, 32, teacher_val, &res->val, NULL);
        kd_evaluate(m, d->test, 32, NULL, &res->test, NULL);
        res->samples_per_sec = time_lm_inference(m, d->val);
        run_teacher_cost(row->run, res);
    } else {
        kd_evaluate(m, d->test, CLI_COMPARE_BATCH, NULL, &res->test, NULL);
        res->samples_per_sec = time_inference(m, x, d->test->n, d->test->sample_dim);
        res->val.bits_per_byte = NAN;
    }
    res->ok = true;
    kd_model_destroy(&m);
}

/* The teacher row's logits on the validation windows (NULL: no teacher row, or too many). */
static float *lm_teacher_logits(const kd_recipe_t *r, const kd_splits_t *d,
                                const cli_compare_row_t *rows, int n_rows) {
    for (int i = 0; i < n_rows; i++) {
        if (!rows[i].teacher) continue;
        kd_model_t *t = NULL;
        char why[KD_ERR_LEN];
        const size_t n = d->val->n * (d->val->window - 1) * (size_t)d->val->num_classes;
        if (n > LM_TEACHER_MAX_FLOATS ||
            cli_load_weights(r, true, d->train, rows[i].weights, &t, why, sizeof why) != 0)
            return NULL;
        if (t->num_classes != d->val->num_classes) {
            kd_model_destroy(&t);
            return NULL; /* a padded vocabulary: no position-by-position comparison */
        }
        float *logits = kd_alloc_floats(n);
        kd_eval_t unused;
        kd_evaluate(t, d->val, 32, NULL, &unused, logits);
        kd_model_destroy(&t);
        return logits;
    }
    return NULL;
}

static void print_cell(double v, const char *fmt, int width) {
    if (isnan(v))
        printf(" %*s", width, "-");
    else
        printf(fmt, width, v);
}

/* 1234567 -> "1,234,567" */
static void format_count(double v, char *out, size_t outlen) {
    char digits[32];
    snprintf(digits, sizeof digits, "%.0f", v);
    size_t n = strlen(digits), o = 0;
    for (size_t i = 0; i < n && o + 2 < outlen; i++) {
        if (i > 0 && (n - i) % 3 == 0) out[o++] = ',';
        out[o++] = digits[i];
    }
    out[o] = 0;
}

static void format_bytes(long long bytes, char *out, size_t outlen) {
    if (bytes < 0)
        snprintf(out, outlen, "?");
    else if (bytes >= 1024 * 1024)
        snprintf(out, outlen, "%.1f MiB", bytes / (1024.0 * 1024.0));
    else
        snprintf(out, outlen, "%.1f KiB", bytes / 1024.0);
}

static void print_table(const cli_compare_row_t *rows, const row_result_t *res, int n_rows,
                        size_t n_test, int threads, const char *json_path) {
    printf(
        "\ncomparison on the test split (%zu samples; inference in batches of %d, %d thread%s)\n",
        n_test, CLI_COMPARE_BATCH, threads, threads == 1 ? "" : "s");
    printf("%-20s %13s %12s %13s %20s\n", "model", "test accuracy", "parameters", "size on disk",
           "inference samples/s");
    for (int i = 0; i < n_rows; i++) {
        if (!res[i].ok) {
            printf("%-20s %s\n", rows[i].label, res[i].why);
            continue;
        }
        char params[32], size[32], rate[32];
        format_count((double)res[i].params, params, sizeof params);
        format_bytes(res[i].bytes, size, sizeof size);
        format_count(res[i].samples_per_sec, rate, sizeof rate);
        printf("%-20s %12.2f%% %12s %13s %20s\n", rows[i].label, 100.0 * res[i].test.accuracy,
               params, size, rate);
    }
    printf("%-20s %s\n", "written to", json_path);
    fflush(stdout);
}

static void print_lm_table(const cli_compare_row_t *rows, const row_result_t *res, int n_rows,
                           size_t n_val, int threads, const char *json_path) {
    printf("\ncomparison on the validation split (%zu windows; inference in batches of 8 "
           "windows, %d thread%s)\n",
           n_val, threads, threads == 1 ? "" : "s");
    printf("%-18s %8s %9s %9s %9s %7s %11s %10s %10s %13s %12s\n", "model", "val bpb", "val ppl",
           "agreement", "KL to t.", "ECE", "parameters", "size", "cache B/tok", "teacher fwd",
           "tokens/s");
    for (int i = 0; i < n_rows; i++) {
        if (!res[i].ok) {
            printf("%-18s %s\n", rows[i].label, res[i].why);
            continue;
        }
        const row_result_t *x = &res[i];
        char params[32], size[32], rate[32], fwd[32] = "-", rb[32] = "-";
        format_count((double)x->params, params, sizeof params);
        format_bytes(x->bytes, size, sizeof size);
        format_count(x->samples_per_sec, rate, sizeof rate);
        if (x->record_bytes >= 0) {
            snprintf(rb, sizeof rb, "%lld", x->record_bytes);
            format_count((double)x->teacher_forwards, fwd, sizeof fwd);
        }
        printf("%-18s", rows[i].label);
        print_cell(x->val.bits_per_byte, " %*.4f", 8);
        print_cell(x->val.perplexity, " %*.3f", 9);
        print_cell(100.0 * x->val.agreement, " %*.2f%%", 8);
        print_cell(x->val.teacher_kl, " %*.4f", 9);
        print_cell(x->val.ece, " %*.4f", 7);
        printf(" %11s %10s %10s %13s %12s\n", params, size, rb, fwd, rate);
    }
    printf("%-18s %s\n", "written to", json_path);
    fflush(stdout);
}

static json_t *row_json(const cli_compare_row_t *row, const row_result_t *res) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "model", row->key, "label", row->label, "weights",
                          row->weights, "layers", row->teacher ? "teacher" : "student");
    json_object_set_new(o, "run", row->run ? json_string(row->run) : json_null());
    if (!res->ok) {
        json_object_set_new(o, "error", json_string(res->why));
        return o;
    }
    json_object_set_new(o, "test_accuracy", json_real(res->test.accuracy));
    json_object_set_new(o, "test_loss", json_real(res->test.loss));
    json_object_set_new(o, "parameters", json_integer((json_int_t)res->params));
    json_object_set_new(o, "size_bytes", json_integer((json_int_t)res->bytes));
    json_object_set_new(o, "inference_samples_per_sec", json_real(res->samples_per_sec));
    if (!isnan(res->val.bits_per_byte)) { /* a language model's row */
        json_object_set_new(o, "val_bits_per_byte", kd_json_number(res->val.bits_per_byte));
        json_object_set_new(o, "val_perplexity", kd_json_number(res->val.perplexity));
        json_object_set_new(o, "val_teacher_agreement", kd_json_number(res->val.agreement));
        json_object_set_new(o, "val_teacher_kl", kd_json_number(res->val.teacher_kl));
        json_object_set_new(o, "val_ece", kd_json_number(res->val.ece));
        json_object_set_new(o, "test_bits_per_byte", kd_json_number(res->test.bits_per_byte));
        json_object_set_new(o, "inference_tokens_per_sec", json_real(res->samples_per_sec));
        if (res->record_bytes >= 0) {
            json_object_set_new(o, "cache_bytes_per_token", json_integer(res->record_bytes));
            json_object_set_new(o, "teacher_forward_windows", json_integer(res->teacher_forwards));
        }
    }
    return o;
}

static int write_json(const kd_recipe_t *r, const cli_compare_row_t *rows, const row_result_t *res,
                      int n_rows, size_t n_test, int threads, const char *path, char *err,
                      size_t errlen) {
    json_t *list = json_array();
    for (int i = 0; i < n_rows; i++) json_array_append_new(list, row_json(&rows[i], &res[i]));
    json_t *root = json_pack("{s:s, s:s, s:I, s:i, s:i, s:o}", "name", r->name, "split", "test",
                             "test_samples", (json_int_t)n_test, "batch_size", CLI_COMPARE_BATCH,
                             "threads", threads, "rows", list);
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text) return kd_err(err, errlen, "cannot encode %s", path);
    int rc = kd_write_file_atomic(path, text, strlen(text), err, errlen);
    free(text);
    return rc;
}

int cli_compare(const kd_recipe_t *r, const cli_compare_row_t *rows, int n_rows,
                const char *json_path, char *err, size_t errlen) {
    kd_splits_t d = {0};
    row_result_t *res = kd_xcalloc((size_t)n_rows, sizeof *res);
    float *x = NULL;
    int rc = -1;
    kd_set_threads((int)r->train.threads); /* the same for every row */
    int threads = openblas_get_num_threads();
    if (kd_splits_load(r, &d, err, errlen) != 0) goto cleanup;
    if (kd_recipe_is_lm(r)) {
        float *teacher_val = lm_teacher_logits(r, &d, rows, n_rows);
        int failed = -1;
        for (int i = 0; i < n_rows; i++) {
            fprintf(stderr, "kdist run: measuring %s (%s)\n", rows[i].label, rows[i].weights);
            measure_row(r, &d, NULL, teacher_val, &rows[i], &res[i]);
            if (!res[i].ok && failed < 0) failed = i;
        }
        free(teacher_val);
        print_lm_table(rows, res, n_rows, d.val->n, threads, json_path);
        rc = write_json(r, rows, res, n_rows, d.test->n, threads, json_path, err, errlen);
        if (rc == 0 && failed >= 0)
            rc = kd_err(err, errlen, "%s: %s", rows[failed].label, res[failed].why);
        goto cleanup;
    }
    /* The whole test split as floats once: the timing measures forward passes only. */
    size_t n = d.test->n, D = d.test->sample_dim;
    uint32_t *ids = kd_xmalloc((n ? n : 1) * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (uint32_t)i;
    x = kd_alloc_floats((n ? n : 1) * D);
    kd_dataset_gather(d.test, ids, n, x, NULL);
    free(ids);
    int failed = -1;
    for (int i = 0; i < n_rows; i++) {
        fprintf(stderr, "kdist run: measuring %s (%s)\n", rows[i].label, rows[i].weights);
        measure_row(r, &d, x, NULL, &rows[i], &res[i]);
        if (!res[i].ok && failed < 0) failed = i;
    }
    print_table(rows, res, n_rows, n, threads, json_path);
    if (write_json(r, rows, res, n_rows, n, threads, json_path, err, errlen) != 0) goto cleanup;
    if (failed >= 0) {
        kd_err(err, errlen, "%s: %s", rows[failed].label, res[failed].why);
        goto cleanup;
    }
    rc = 0;
cleanup:
    free(x);
    free(res);
    kd_splits_destroy(&d);
    return rc;
}
