/* kd_bench_gpt: training tokens/s of the GPT recipes' models (one step: forward, mean
 * next-token cross-entropy, backward, AdamW with clipping) and forward tokens/s (logits and
 * loss, no gradient: what a teacher does), each against two references measured in the same
 * run, interleaved round by round so that a disturbance of the shared machine hits both sides:
 *   - plain cblas_sgemm on exactly the GEMM shapes that work made (the kd_sgemm trace): the
 *     ratio sgemm-time / kdist-time is the fraction of the machine's sgemm rate achieved
 *     (target for the step >= 50%); the forward's is its distance to its sgemm bound;
 *   - a PyTorch 1.13 loop of the same model, shapes, batch, optimizer and thread count
 *     (bench/pytorch_gpt.py --serve, run with /usr/bin/python3): target kdist >= 2x PyTorch.
 *   usage: kd_bench_gpt [--seconds S] [--rounds R] [--threads N[,N...]] [--batch B]
 *                       [--python PATH | --no-torch] [--torch-arg ARG ...] [CASE ...]
 *   CASE: student and teacher (the default), student-bpe, or LAYERS,WIDTH,HEADS,CONTEXT,VOCAB
 *   --threads: OpenBLAS thread counts, one pass each (0, the default: OpenBLAS's own count)
 *   --torch-arg: passed on to pytorch_gpt.py (e.g. --torch-arg --foreach) */
#include <cblas.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd_bench.h"
#include "kd_gpt.h"
#include "kd_model.h"
#include "kd_optim.h"
#include "kd_rng.h"
#include "kd_train.h"
#include "kd_util.h"

#ifndef KD_BENCH_DIR
#define KD_BENCH_DIR "bench"
#endif

#define MAX_TRACE      65536
#define MAX_CASES      16
#define MAX_THREADS    8
#define WARMUPS        1 /* untimed calls before each timing (caches, BLAS threads) */
#define TARGET_SGEMM   0.50
#define TARGET_PYTORCH 2.0
#define LR             3e-4f

typedef struct {
    char name[32];
    kd_gpt_config_t cfg;
    int batch;
} gpt_case_t;

static const gpt_case_t known_cases[] = {
    /* recipes/kjv_gpt_student.yaml and kjv_gpt_teacher.yaml: bytes tokenizer (256 + end) */
    {"student", {.layers = 2, .width = 128, .heads = 4, .context = 256, .vocab = 257}, 16},
    {"teacher", {.layers = 6, .width = 256, .heads = 8, .context = 256, .vocab = 257}, 16},
    /* the GPT-2-BPE student: the head dominates */
    {"student-bpe", {.layers = 2, .width = 128, .heads = 4, .context = 256, .vocab = 50257}, 16},
};

typedef struct {
    const char *python; /* NULL: no PyTorch comparison */
    const char *torch_args[8];
    int n_torch_args;
    double seconds;
    int rounds;
} bench_opts_t;

typedef struct {
    kd_gpt_t *m;
    kd_optim_t *opt;
    uint32_t *tokens; /* (B,T) */
    int32_t *targets; /* (B,T) */
    int B, T;
    long step;
} gpt_ctx_t;

/* One training step, as the trainer makes it. */
static void train_step(void *arg) {
    gpt_ctx_t *s = arg;
    kd_gpt_forward(s->m, s->tokens, s->B, s->T, true, kd_rng_key(7, (uint64_t)s->step, 0));
    kd_gpt_loss(s->m, s->targets, true, NULL);
    kd_gpt_backward(s->m);
    kd_optim_step(s->opt, s->m->params, s->m->grads, LR);
    s->step++;
}

/* The forward a teacher makes: logits (in the head's chunks) and the loss, no gradient. */
static void forward_only(void *arg) {
    gpt_ctx_t *s = arg;
    kd_gpt_forward(s->m, s->tokens, s->B, s->T, false, 0);
    kd_gpt_loss(s->m, s->targets, false, NULL);
}

/* ---- the PyTorch side: bench/pytorch_gpt.py --serve, asked for one timing at a time ---- */

typedef struct {
    pid_t pid;
    FILE *to, *from;
} torch_server_t;

/* Starts the server on c's model with `threads` threads (OpenBLAS's and OpenMP's too) and
 * waits for its "ready". 0, or -1 (no server: the comparison is skipped). */
static int torch_start(torch_server_t *ts, const gpt_case_t *c, int threads,
                       const bench_opts_t *o) {
    char script[1024], nums[7][16], env_blas[48], env_omp[48];
    snprintf(script, sizeof script, "%s/pytorch_gpt.py", KD_BENCH_DIR);
    const int vals[7] = {c->cfg.layers, c->cfg.width, c->cfg.heads, c->cfg.context,
                         c->cfg.vocab,  c->batch,     threads};
    static const char *const flags[7] = {"--layers", "--width", "--heads",  "--context",
                                         "--vocab",  "--batch", "--threads"};
    char *argv[2 + 14 + 1 + 8 + 1];
    int n = 0;
    argv[n++] = (char *)o->python;
    argv[n++] = script;
    for (int i = 0; i < 7; i++) {
        snprintf(nums[i], sizeof nums[i], "%d", vals[i]);
        argv[n++] = (char *)flags[i];
        argv[n++] = nums[i];
    }
    argv[n++] = "--serve";
    for (int i = 0; i < o->n_torch_args; i++) argv[n++] = (char *)o->torch_args[i];
    argv[n] = NULL;
    /* the environment, with both thread counts set */
    extern char **environ;
    size_t n_env = 0;
    while (environ[n_env]) n_env++;
    char **envp = kd_xmalloc((n_env + 3) * sizeof *envp);
    size_t k = 0;
    for (size_t i = 0; i < n_env; i++)
        if (strncmp(environ[i], "OPENBLAS_NUM_THREADS=", 21) != 0 &&
            strncmp(environ[i], "OMP_NUM_THREADS=", 16) != 0)
            envp[k++] = environ[i];
    snprintf(env_blas, sizeof env_blas, "OPENBLAS_NUM_THREADS=%d", threads);
    snprintf(env_omp, sizeof env_omp, "OMP_NUM_THREADS=%d", threads);
    envp[k++] = env_blas;
    envp[k++] = env_omp;
    envp[k] = NULL;

    int in[2], out[2];
    if (pipe(in) != 0) {
        free(envp);
        return -1;
    }
    if (pipe(out) != 0) {
        close(in[0]), close(in[1]), free(envp);
        return -1;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    fflush(stdout);
    int rc = posix_spawn(&ts->pid, o->python, &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    free(envp);
    close(in[0]);
    close(out[1]);
    if (rc != 0) {
        fprintf(stderr, "kd_bench_gpt: cannot run %s: %s\n", o->python, strerror(rc));
        close(in[1]), close(out[0]);
        return -1;
    }
    ts->to = fdopen(in[1], "w");
    ts->from = fdopen(out[0], "r");
    char line[256];
    while (fgets(line, sizeof line, ts->from))
        if (strncmp(line, "ready ", 6) == 0) return 0;
    fprintf(stderr, "kd_bench_gpt: %s %s gave no \"ready\" (see its errors above)\n", o->python,
            script);
    return -1;
}

/* Seconds per call of PyTorch's `what` ("train" or "forward") over o->seconds; -1 on failure. */
static double torch_time(torch_server_t *ts, const char *what, const bench_opts_t *o) {
    char line[256], got[16];
    double wall, cpu;
    int calls;
    fprintf(ts->to, "%s %g\n", what, o->seconds);
    fflush(ts->to);
    if (!fgets(line, sizeof line, ts->from) ||
        sscanf(line, "%15s %lf %lf %d", got, &wall, &cpu, &calls) != 4 || strcmp(got, what) != 0)
        return -1.0;
    return wall;
}

static void torch_stop(torch_server_t *ts) {
    if (ts->to) fclose(ts->to); /* end of input: the server exits */
    if (ts->from) fclose(ts->from);
    if (ts->pid > 0) waitpid(ts->pid, NULL, 0);
    *ts = (torch_server_t){0};
}

/* ---- one case ---- */

/* A figure over the rounds: its best, and the range of a ratio measured within each round. */
typedef struct {
    double best_t;     /* the shortest time per call */
    double lo, hi;     /* the ratio's range over the rounds */
    double best_ratio; /* the ratio of the best times */
} figure_t;

static void figure_add(figure_t *f, int round, double t, double ratio) {
    if (round == 0 || t < f->best_t) f->best_t = t;
    if (round == 0 || ratio < f->lo) f->lo = ratio;
    if (round == 0 || ratio > f->hi) f->hi = ratio;
}

static int bench_one(const gpt_case_t *c, int threads, const bench_opts_t *o, int *below) {
    char err[KD_ERR_LEN];
    gpt_ctx_t s = {.B = c->batch, .T = c->cfg.context};
    if (kd_gpt_new(&c->cfg, &s.m, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_gpt: %s: %s\n", c->name, err);
        return -1;
    }
    kd_gpt_init_params(s.m, 42);
    /* the recipes' AdamW: decay on 2-D weights only, clipping at 1 */
    kd_optim_config_t oc = {.kind = KD_OPT_ADAMW,
                            .beta1 = 0.9f,
                            .beta2 = 0.95f,
                            .eps = 1e-8f,
                            .weight_decay = 0.1f,
                            .clip_norm = 1.0f};
    s.opt = kd_optim_for_gpt(&oc, s.m);
    const size_t N = (size_t)s.B * s.T;
    s.tokens = kd_xmalloc(N * sizeof *s.tokens);
    s.targets = kd_xmalloc(N * sizeof *s.targets);
    kd_rng_t rng;
    kd_rng_init(&rng, 1);
    for (size_t i = 0; i < N; i++) {
        s.tokens[i] = (uint32_t)kd_rng_below(&rng, (uint32_t)c->cfg.vocab);
        s.targets[i] = (int32_t)kd_rng_below(&rng, (uint32_t)c->cfg.vocab);
    }

    /* the GEMMs of one step and of one forward (after a call that sizes the workspaces) */
    static kd_sgemm_call_t calls[2][MAX_TRACE];
    kd_bench_work_fn work[2] = {train_step, forward_only};
    int n_calls[2];
    kd_gemm_replay_t replay[2];
    for (int w = 0; w < 2; w++) {
        n_calls[w] = kd_bench_trace(work[w], &s, calls[w], MAX_TRACE);
        if (n_calls[w] > MAX_TRACE) {
            fprintf(stderr, "kd_bench_gpt: %s: %d GEMMs in one call, more than the trace holds\n",
                    c->name, n_calls[w]);
            return -1;
        }
        kd_gemm_replay_init(&replay[w], calls[w], n_calls[w]);
    }
    torch_server_t ts = {0};
    bool torch = o->python && torch_start(&ts, c, threads, o) == 0;

    /* Rounds of: sgemm replay, kdist, PyTorch, for the step and then the forward; each ratio
     * is of timings taken next to each other, so a disturbance hits both sides alike. */
    static const char *const what[2] = {"train", "forward"};
    figure_t kd[2] = {{0}}, gemm[2] = {{0}}, pt[2] = {{0}};
    for (int r = 0; r < o->rounds; r++)
        for (int w = 0; w < 2; w++) {
            const double tg = kd_bench_time(kd_gemm_replay, &replay[w], WARMUPS, o->seconds).wall;
            const double tk = kd_bench_time(work[w], &s, WARMUPS, o->seconds).wall;
            figure_add(&gemm[w], r, tg, tg / tk);
            figure_add(&kd[w], r, tk, 1.0);
            if (!torch) continue;
            const double tp = torch_time(&ts, what[w], o);
            if (tp <= 0) {
                fprintf(stderr, "kd_bench_gpt: %s: PyTorch gave no timing\n", c->name);
                torch = false;
                continue;
            }
            figure_add(&pt[w], r, tp, tp / tk);
        }
    torch_stop(&ts);

    const double tok = (double)N;
    printf("%s: %d layers, width %d, %d heads, vocab %d; batch %d x %d tokens; %d threads\n",
           c->name, c->cfg.layers, c->cfg.width, c->cfg.heads, c->cfg.vocab, s.B, s.T, threads);
    for (int w = 0; w < 2; w++) {
        const double of_sgemm = gemm[w].best_t / kd[w].best_t;
        printf("  %-7s kdist %8.0f tokens/s (%7.1f ms) | sgemm bound %8.0f tokens/s, %4d GEMMs: "
               "%3.0f%% [%.0f-%.0f%%]",
               what[w], tok / kd[w].best_t, kd[w].best_t * 1e3, tok / gemm[w].best_t, n_calls[w],
               100 * of_sgemm, 100 * gemm[w].lo, 100 * gemm[w].hi);
        if (w == 0) {
            printf(" %s", of_sgemm >= TARGET_SGEMM ? "ok " : "LOW");
            if (of_sgemm < TARGET_SGEMM) (*below)++;
        } else {
            printf("    ");
        }
        if (torch) {
            const double vs = pt[w].best_t / kd[w].best_t;
            printf(" | PyTorch %8.0f tokens/s: %.2fx [%.2f-%.2f]", tok / pt[w].best_t, vs, pt[w].lo,
                   pt[w].hi);
            if (w == 0) {
                printf(" %s", vs >= TARGET_PYTORCH ? "ok" : "LOW");
                if (vs < TARGET_PYTORCH) (*below)++;
            }
        }
        printf("\n");
    }
    fflush(stdout);

    for (int w = 0; w < 2; w++) kd_gemm_replay_free(&replay[w]);
    free(s.tokens);
    free(s.targets);
    kd_optim_destroy(&s.opt);
    kd_gpt_destroy(&s.m);
    return 0;
}

/* "LAYERS,WIDTH,HEADS,CONTEXT,VOCAB" or a known name. */
static int parse_case(const char *arg, int batch, gpt_case_t *out) {
    for (size_t i = 0; i < sizeof known_cases / sizeof known_cases[0]; i++)
        if (strcmp(arg, known_cases[i].name) == 0) {
            *out = known_cases[i];
            if (batch > 0) out->batch = batch;
            return 0;
        }
    kd_gpt_config_t cfg = {0};
    char tail;
    if (sscanf(arg, "%d,%d,%d,%d,%d%c", &cfg.layers, &cfg.width, &cfg.heads, &cfg.context,
               &cfg.vocab, &tail) != 5)
        return -1;
    char err[KD_ERR_LEN];
    if (kd_gpt_config_check(&cfg, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_gpt: %s: %s\n", arg, err);
        return -1;
    }
    *out = (gpt_case_t){.cfg = cfg, .batch = batch > 0 ? batch : 16};
    snprintf(out->name, sizeof out->name, "L%dC%dH%dV%d", cfg.layers, cfg.width, cfg.heads,
             cfg.vocab);
    return 0;
}

static int usage(void) {
    fprintf(stderr,
            "usage: kd_bench_gpt [--seconds S] [--rounds R] [--threads N[,N...]] [--batch B]\n"
            "                    [--python PATH | --no-torch] [--torch-arg ARG ...] [CASE ...]\n"
            "  CASE: student, teacher, student-bpe or LAYERS,WIDTH,HEADS,CONTEXT,VOCAB\n");
    return 2;
}

int main(int argc, char **argv) {
    bench_opts_t o = {.python = "/usr/bin/python3", .seconds = 2.0, .rounds = 3};
    int batch = 0, threads[MAX_THREADS] = {0}, n_threads = 1;
    const char *case_args[MAX_CASES];
    int n_case_args = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            o.seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            o.rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc)
            batch = atoi(argv[++i]);
        else if (strcmp(argv[i], "--python") == 0 && i + 1 < argc)
            o.python = argv[++i];
        else if (strcmp(argv[i], "--no-torch") == 0)
            o.python = NULL;
        else if (strcmp(argv[i], "--torch-arg") == 0 && i + 1 < argc && o.n_torch_args < 8)
            o.torch_args[o.n_torch_args++] = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            n_threads = 0;
            for (char *tok = strtok(argv[++i], ","); tok && n_threads < MAX_THREADS;
                 tok = strtok(NULL, ","))
                threads[n_threads++] = atoi(tok);
        } else if (argv[i][0] != '-' && n_case_args < MAX_CASES)
            case_args[n_case_args++] = argv[i];
        else
            return usage();
    }
    if (o.seconds <= 0 || o.rounds < 1 || batch < 0 || n_threads == 0) return usage();
    if (n_case_args == 0) {
        case_args[n_case_args++] = "student";
        case_args[n_case_args++] = "teacher";
    }
    gpt_case_t cases[MAX_CASES];
    for (int c = 0; c < n_case_args; c++)
        if (parse_case(case_args[c], batch, &cases[c]) != 0) return usage();

    printf("GPT step (train: forward, loss, backward, AdamW with clipping; forward: logits and "
           "loss)\nvs cblas_sgemm on its own GEMM shapes and vs PyTorch (%s), interleaved in %d "
           "rounds of %gs;\nbest times, [range of the per-round ratios]\n",
           o.python ? o.python : "skipped", o.rounds, o.seconds);
    int below = 0;
    for (int t = 0; t < n_threads; t++) {
        kd_set_threads(threads[t]);
        const int resolved = openblas_get_num_threads();
        for (int c = 0; c < n_case_args; c++)
            if (bench_one(&cases[c], resolved, &o, &below) != 0) return 1;
    }
    printf("targets (train): >= %.0f%% of the sgemm rate, >= %.1fx PyTorch: %s\n",
           100 * TARGET_SGEMM, TARGET_PYTORCH, below ? "some figures are below" : "all met");
    return 0;
}
