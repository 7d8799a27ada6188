/* kdist: the user's front door. Subcommands:
 *   train RECIPE [section.key=value ...]   train in this process, write runs/<name>/
 *   eval MODEL --recipe RECIPE [...]       accuracy and loss of saved weights; dump logits
 *   recipe check RECIPE | recipe keys      validate a recipe; list every key
 *   run RECIPE [...]                       a local cluster (kd_pipeline.c, kd_run.c)
 *   status [RUN_DIR|ENDPOINT]              ask a running coordinator (kd_status.c)
 *   scale RUN_DIR --workers N              more or fewer workers in a running run (kd_scale.c)
 *   drain RUN_DIR WORKER_ID                one worker finishes its step and leaves (kd_scale.c)
 *   cache ls|verify|gc|export|import       the teacher-logit cache (kd_cache_cmd.c)
 *   data prepare                           text tokenized into llm.c shards (kd_data_cmd.c) */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_checkpoint.h"
#include "kd_cli.h"
#include "kd_log.h"
#include "kd_metrics.h"
#include "kd_npy.h"
#include "kd_recipe.h"
#include "kd_tokens.h"
#include "kd_train.h"

#define MAX_OVERRIDES 64

static void usage(FILE *out) {
    fprintf(
        out,
        "usage: kdist <command> [args]\n"
        "\n"
        "  train RECIPE [section.key=value ...]\n"
        "        train the recipe's student in this process; writes runs/<name>/\n"
        "        (recipe.yaml, student.safetensors, summary.json)\n"
        "  eval MODEL.safetensors --recipe RECIPE [--split test|val|train]\n"
        "       [--model student|teacher] [--dump-logits OUT.npy] [--dump-tokens TOK.npy]\n"
        "       [section.key=value ...]\n"
        "        accuracy and mean loss of saved weights on a split (a GPT: per-token loss,\n"
        "        perplexity, bits per byte); optionally write the logits as float32 (N, C) or\n"
        "        (windows, context, vocab) .npy, and a GPT's token windows (windows, context+1)\n"
        "  sample MODEL --recipe RECIPE [--prompt TEXT] [--tokens N] [--temperature T]\n"
        "         [--top-k K] [--seed S]\n"
        "        text from a GPT (a kdist checkpoint or a Hugging Face GPT-2 directory), the same\n"
        "        for the same seed\n"
        "  data prepare --tokenizer bytes|gpt2 [--tokenizer-dir DIR] FILE... --out DIR\n"
        "        tokenize text once into llm.c token shards (data.format: tokens)\n"
        "  recipe check RECIPE [section.key=value ...]   validate and print the resolved recipe\n"
        "  recipe keys                                    every recipe key, type and default\n"
        "  run RECIPE [section.key=value ...] [teacher_run.section.key=value ...]\n"
        "      [--baseline] [--run-dir DIR] [--resume]\n"
        "        train on a local cluster: a coordinator, cluster.teachers teacher nodes and\n"
        "        cluster.workers workers as processes; progress live, Ctrl-C stops cleanly.\n"
        "        A distillation trains its teacher first (teacher.recipe) when\n"
        "        teacher.checkpoint is missing; --baseline also trains the student alone;\n"
        "        ends with teacher / student alone / distilled student side by side\n"
        "  status [RUN_DIR|ENDPOINT] [--json]\n"
        "        progress, membership and recent events of a running coordinator\n"
        "  scale RUN_DIR --workers N [--timeout SECONDS]\n"
        "        start or drain workers of a running `kdist run` until N are live\n"
        "  drain RUN_DIR WORKER_ID [--timeout SECONDS]\n"
        "        the worker finishes its step, says goodbye and exits\n"
        "  cache ls|verify|gc|export|import [--dir DIR] ...\n"
        "        the teacher-logit cache: list, check, delete, export to .npy, import logits\n"
        "        computed elsewhere (kdist cache --help)\n"
        "  keygen NAME [--dir DIR] [--force] | keygen --cluster DIR [--force]\n"
        "        CurveZMQ key pairs: DIR/NAME.key (secret) and DIR/NAME.pub; --cluster: every\n"
        "        role's pair and the recipe lines (docs/security.md)\n"
        "  inventory check|plan INVENTORY [RECIPE [section.key=value ...]]\n"
        "        validate a deployment inventory (deploy/), or print the plan that\n"
        "        deploy/kdist-cluster follows\n");
}

static int fail(const char *msg) {
    fprintf(stderr, "kdist: %s\n", msg);
    return 1;
}

/* Loads RECIPE with the overrides found among argv (any "a.b=c" or "name=..." argument). */
static int load_recipe(const char *path, int argc, char **argv, kd_recipe_t *r, char *err,
                       size_t errlen) {
    const char *overrides[MAX_OVERRIDES];
    int n = 0;
    for (int i = 0; i < argc; i++) {
        if (!strchr(argv[i], '=') || argv[i][0] == '-') continue;
        if (n == MAX_OVERRIDES) return kd_err(err, errlen, "more than %d overrides", MAX_OVERRIDES);
        overrides[n++] = argv[i];
    }
    return kd_recipe_load(path, overrides, n, r, err, errlen);
}

static int apply_log_level(const kd_recipe_t *r) {
    kd_log_level_t level;
    if (kd_log_level_parse(r->logging.level, &level) != 0) level = KD_LOG_INFO;
    return kd_log_init("kdist", NULL, level, NULL);
}

/* ---- progress ---------------------------------------------------------------------------- */

static void print_progress(const kd_train_progress_t *p, void *user) {
    const kd_recipe_t *r = user;
    bool tty = isatty(STDERR_FILENO);
    double done = p->total_steps ? (double)p->step / p->total_steps : 1.0;
    char eta[32];
    cli_format_duration(done > 0 ? p->elapsed * (1.0 - done) / done : 0.0, eta, sizeof eta);
    const bool lm = kd_recipe_is_lm(r);
    if (p->epoch_end) {
        if (lm)
            fprintf(stderr,
                    "%sepoch %d/%ld  step %ld/%ld  train loss %.4f  val loss %.4f  val bpb %.4f  "
                    "val ppl %.2f\n",
                    tty ? "\r\033[K" : "", p->epoch + 1, r->train.epochs, p->step, p->total_steps,
                    p->loss, p->val.loss, p->val.bits_per_byte, p->val.perplexity);
        else
            fprintf(stderr,
                    "%sepoch %d/%ld  step %ld/%ld  train loss %.4f  val acc %.4f  val loss %.4f\n",
                    tty ? "\r\033[K" : "", p->epoch + 1, r->train.epochs, p->step, p->total_steps,
                    p->loss, p->val.accuracy, p->val.loss);
        return;
    }
    if (!tty) return; /* logs get one line per epoch, terminals a live line */
    fprintf(stderr,
            "\r\033[Kepoch %d/%ld  step %ld/%ld (%3.0f%%)  loss %.4f  acc %.3f  lr %.4g  %.0f "
            "%s/s  ETA %s",
            p->epoch + 1, r->train.epochs, p->step, p->total_steps, 100.0 * done, p->loss,
            p->train_accuracy, p->lr, lm ? p->tokens_per_sec : p->samples_per_sec,
            lm ? "tokens" : "samples", eta);
    fflush(stderr);
}

/* ---- train ------------------------------------------------------------------------------- */

static int write_summary(const char *path, const kd_recipe_t *r, const kd_model_t *m,
                         const kd_train_result_t *res, char *err, size_t errlen) {
    json_t *j =
        json_pack("{s:s, s:s, s:o, s:o, s:o, s:o, s:i, s:I, s:I, s:f, s:f}", "status", "completed",
                  "name", r->name, "test_accuracy", kd_json_number(res->test.accuracy), "test_loss",
                  kd_json_number(res->test.loss), "val_accuracy", kd_json_number(res->val.accuracy),
                  "val_loss", kd_json_number(res->val.loss), "epochs", res->epochs, "steps",
                  (json_int_t)res->steps, "parameters", (json_int_t)m->n_params, "samples_per_sec",
                  res->samples_per_sec, "wall_seconds", res->seconds);
    if (kd_recipe_is_lm(r)) {
        json_object_set_new(j, "tokens_per_sec", kd_json_number(res->tokens_per_sec));
        kd_json_set_lm_eval(j, "val", res->val.perplexity, res->val.bits_per_byte);
        kd_json_set_lm_eval(j, "test", res->test.perplexity, res->test.bits_per_byte);
    }
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    int rc = kd_write_file_atomic(path, text, strlen(text), err, errlen);
    free(text);
    return rc;
}

static int cmd_train(int argc, char **argv) {
    if (argc < 1 || argv[0][0] == '-') {
        usage(stderr);
        return 2;
    }
    char err[KD_ERR_LEN], dir[KD_PATH_MAX + KD_NAME_MAX + 2], path[sizeof dir + 64];
    kd_recipe_t r;
    kd_splits_t d = {0};
    kd_model_t *m = NULL;
    int rc = 1;
    if (load_recipe(argv[0], argc - 1, argv + 1, &r, err, sizeof err) != 0) goto out;
    apply_log_level(&r);
    kd_set_threads((int)r.train.threads);
    if (r.distill.loss.alpha > 0) {
        snprintf(err, sizeof err,
                 "%s: distill.alpha is %g; `kdist train` trains without a teacher "
                 "(set distill.alpha=0)",
                 argv[0], (double)r.distill.loss.alpha);
        goto out;
    }
    snprintf(dir, sizeof dir, "%s/%s", r.logging.runs_dir, r.name);
    if (kd_mkdirs(dir, err, sizeof err) != 0) goto out;
    snprintf(path, sizeof path, "%s/recipe.yaml", dir);
    if (kd_recipe_write(&r, path, err, sizeof err) != 0) goto out;
    if (kd_splits_load(&r, &d, err, sizeof err) != 0) goto out;
    if (kd_model_from_recipe(&r, false, d.train, &m, err, sizeof err) != 0) goto out;
    fprintf(stderr,
            "kdist: training '%s': %zu parameters, %zu train / %zu val / %zu test samples\n",
            r.name, m->n_params, d.train->n, d.val->n, d.test->n);

    kd_train_result_t res;
    if (kd_train_local(&r, m, NULL, &d, print_progress, &r, &res, err, sizeof err) != 0) goto out;
    snprintf(path, sizeof path, "%s/student.safetensors", dir);
    if (kd_checkpoint_save(m, path, err, sizeof err) != 0) goto out;
    snprintf(path, sizeof path, "%s/summary.json", dir);
    if (write_summary(path, &r, m, &res, err, sizeof err) != 0) goto out;

    printf("\n%-22s %s\n", "run", r.name);
    printf("%-22s %d (%ld steps)\n", "epochs", res.epochs, res.steps);
    if (kd_recipe_is_lm(&r)) {
        printf("%-22s %.4f (perplexity %.2f, %.4f bits per byte)\n", "validation loss",
               res.val.loss, res.val.perplexity, res.val.bits_per_byte);
        printf("%-22s %.4f (perplexity %.2f, %.4f bits per byte)\n", "test loss", res.test.loss,
               res.test.perplexity, res.test.bits_per_byte);
        printf("%-22s %.2f%%\n", "next-token accuracy", 100.0 * res.test.accuracy);
        printf("%-22s %.0f\n", "tokens/s", res.tokens_per_sec);
    } else {
        printf("%-22s %.2f%%\n", "test accuracy", 100.0 * res.test.accuracy);
        printf("%-22s %.2f%%\n", "validation accuracy", 100.0 * res.val.accuracy);
        printf("%-22s %.4f\n", "test loss", res.test.loss);
        printf("%-22s %.0f\n", "samples/s", res.samples_per_sec);
    }
    printf("%-22s %.1f s\n", "wall time", res.seconds);
    printf("%-22s %s/student.safetensors\n", "weights", dir);
    rc = 0;
out:
    if (rc) fail(err);
    kd_model_destroy(&m);
    kd_splits_destroy(&d);
    return rc;
}

/* ---- eval -------------------------------------------------------------------------------- */

static int cmd_eval(int argc, char **argv) {
    const char *model_path = NULL, *recipe_path = NULL, *split = "test", *dump = NULL;
    const char *dump_tokens = NULL;
    const char *which = "student";
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(a, "--recipe") == 0 && has_value)
            recipe_path = argv[++i];
        else if (strcmp(a, "--split") == 0 && has_value)
            split = argv[++i];
        else if (strcmp(a, "--dump-logits") == 0 && has_value)
            dump = argv[++i];
        else if (strcmp(a, "--dump-tokens") == 0 && has_value)
            dump_tokens = argv[++i];
        else if (strcmp(a, "--model") == 0 && has_value)
            which = argv[++i];
        else if (a[0] == '-') {
            fprintf(stderr, "kdist eval: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (!strchr(a, '=') && !model_path)
            model_path = a;
        else if (!strchr(a, '=')) {
            fprintf(stderr, "kdist eval: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model_path || !recipe_path) {
        usage(stderr);
        return 2;
    }
    bool teacher = strcmp(which, "teacher") == 0;
    if (!teacher && strcmp(which, "student") != 0)
        return fail("--model must be 'student' or 'teacher'");

    char err[KD_ERR_LEN];
    kd_recipe_t r;
    kd_splits_t d = {0};
    kd_model_t *m = NULL;
    float *logits = NULL;
    int rc = 1;
    if (load_recipe(recipe_path, argc, argv, &r, err, sizeof err) != 0) goto out;
    apply_log_level(&r);
    kd_set_threads((int)r.train.threads);
    const kd_dataset_t *ds = NULL;
    if (strcmp(split, "test") != 0 && strcmp(split, "val") != 0 && strcmp(split, "train") != 0) {
        snprintf(err, sizeof err, "--split must be test, val or train, not '%s'", split);
        goto out;
    }
    if (kd_splits_load(&r, &d, err, sizeof err) != 0) goto out;
    ds = strcmp(split, "test") == 0 ? d.test : strcmp(split, "val") == 0 ? d.val : d.train;
    if (cli_load_weights(&r, teacher, d.train, model_path, &m, err, sizeof err) != 0) goto out;

    const bool lm = m->gpt != NULL;
    if (dump_tokens && !lm) {
        snprintf(err, sizeof err, "--dump-tokens is for language-model recipes");
        goto out;
    }
    /* a GPT's logits are (windows, context, vocab) */
    const size_t per_sample = (size_t)m->num_classes * (lm ? ds->window - 1 : 1);
    logits = dump ? kd_alloc_floats(ds->n * per_sample) : NULL;
    kd_eval_t ev;
    double t0 = kd_now();
    kd_evaluate(m, ds, (int)r.eval.batch_size, NULL, &ev, logits);
    double secs = kd_now() - t0;
    if (lm)
        printf("%s on %s (%zu windows, %zu tokens): loss %.4f, perplexity %.3f, %.4f bits per "
               "byte, next-token accuracy %.2f%%, %.0f tokens/s\n",
               model_path, split, ds->n, ev.count, ev.loss, ev.perplexity, ev.bits_per_byte,
               100.0 * ev.accuracy, secs > 0 ? ev.count / secs : 0.0);
    else
        printf("%s on %s (%zu samples): accuracy %.2f%%, mean loss %.4f, %.0f samples/s\n",
               model_path, split, ev.count, 100.0 * ev.accuracy, ev.loss,
               secs > 0 ? ev.count / secs : 0.0);
    if (dump) {
        const size_t shape[3] = {ds->n, lm ? ds->window - 1 : (size_t)m->num_classes,
                                 (size_t)m->num_classes};
        if (kd_npy_write_f32_nd(dump, logits, lm ? 3 : 2, shape, err, sizeof err) != 0) goto out;
        if (lm)
            printf("logits (%zu, %zu, %d) written to %s\n", ds->n, ds->window - 1, m->num_classes,
                   dump);
        else
            printf("logits (%zu, %d) written to %s\n", ds->n, m->num_classes, dump);
    }
    if (dump_tokens) {
        uint32_t *ids = kd_xmalloc((ds->n ? ds->n : 1) * sizeof *ids);
        int32_t *windows = kd_xmalloc((ds->n ? ds->n : 1) * ds->window * sizeof *windows);
        for (size_t i = 0; i < ds->n; i++) ids[i] = (uint32_t)i;
        kd_dataset_gather_windows(ds, ids, ds->n, (uint32_t *)windows);
        const size_t shape[2] = {ds->n, ds->window};
        int wrc = kd_npy_write_i32_nd(dump_tokens, windows, 2, shape, err, sizeof err);
        free(ids);
        free(windows);
        if (wrc != 0) goto out;
        printf("token windows (%zu, %zu) written to %s\n", ds->n, ds->window, dump_tokens);
    }
    rc = 0;
out:
    if (rc) fail(err);
    free(logits);
    kd_model_destroy(&m);
    kd_splits_destroy(&d);
    return rc;
}

/* ---- recipe ------------------------------------------------------------------------------ */

static int cmd_recipe(int argc, char **argv) {
    if (argc >= 1 && strcmp(argv[0], "keys") == 0) {
        kd_recipe_print_reference(stdout);
        return 0;
    }
    if (argc < 2 || strcmp(argv[0], "check") != 0) {
        usage(stderr);
        return 2;
    }
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    if (load_recipe(argv[1], argc - 2, argv + 2, &r, err, sizeof err) != 0) return fail(err);
    char *yaml = kd_recipe_to_yaml(&r);
    fputs(yaml, stdout);
    free(yaml);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "train") == 0) return cmd_train(argc - 2, argv + 2);
    if (strcmp(cmd, "eval") == 0) return cmd_eval(argc - 2, argv + 2);
    if (strcmp(cmd, "recipe") == 0) return cmd_recipe(argc - 2, argv + 2);
    if (strcmp(cmd, "run") == 0) return kd_cmd_run(argc - 2, argv + 2);
    if (strcmp(cmd, "status") == 0) return kd_cmd_status(argc - 2, argv + 2);
    if (strcmp(cmd, "scale") == 0) return kd_cmd_scale(argc - 2, argv + 2);
    if (strcmp(cmd, "drain") == 0) return kd_cmd_drain(argc - 2, argv + 2);
    if (strcmp(cmd, "cache") == 0) return kd_cmd_cache(argc - 2, argv + 2);
    if (strcmp(cmd, "keygen") == 0) return kd_cmd_keygen(argc - 2, argv + 2);
    if (strcmp(cmd, "inventory") == 0) return kd_cmd_inventory(argc - 2, argv + 2);
    if (strcmp(cmd, "sample") == 0) return kd_cmd_sample(argc - 2, argv + 2);
    if (strcmp(cmd, "data") == 0) return kd_cmd_data(argc - 2, argv + 2);
    fprintf(stderr, "kdist: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
