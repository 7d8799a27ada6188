/* test_gpt_torch: kdist's GPT against PyTorch (tests/data/make_gpt_fixtures.py, a GPT-2 with
 * Hugging Face's names and maths): a Hugging Face model directory loads (prefix, mask buffers
 * and tied lm_head tolerated), logits, loss and every gradient of one batch match, ten AdamW
 * steps (decay on 2-D weights only, clipping, warm-up + cosine) follow the same loss curve and
 * end at the same weights. Then our own files round-trip, and malformed ones are refused with
 * errors that name the file and the problem. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_optim.h"
#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_train.h"
#include "kd_util.h"

#define MODEL_DIR "data/gpt_small"
#define IO_FILE   "data/gpt_small_io.safetensors"
#define STEPS     10

static const char *tmp;
static kd_safetensors_t *io;

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

/* A reference tensor, copied out of the file (its data need not be aligned); freed at exit. */
static float *copies[256];
static int n_copies;

static const float *io_f32(const char *name, size_t count) {
    const kd_st_tensor_t *t = kd_st_find(io, name);
    if (!t || t->dtype != KD_DTYPE_F32 || t->nbytes != count * sizeof(float) ||
        n_copies == (int)(sizeof copies / sizeof copies[0])) {
        fprintf(stderr, "%s: tensor %s missing or misshaped\n", IO_FILE, name);
        exit(1);
    }
    float *c = kd_xmalloc(t->nbytes);
    memcpy(c, kd_st_data(io, t), t->nbytes);
    return copies[n_copies++] = c;
}

static void io_tokens(const char *name, size_t count, uint32_t *out) {
    const kd_st_tensor_t *t = kd_st_find(io, name);
    if (!t || t->dtype != KD_DTYPE_I32 || t->nbytes != count * 4) {
        fprintf(stderr, "%s: tensor %s missing or misshaped\n", IO_FILE, name);
        exit(1);
    }
    int32_t v;
    for (size_t i = 0; i < count; i++) {
        memcpy(&v, (const char *)kd_st_data(io, t) + 4 * i, 4);
        out[i] = (uint32_t)v;
    }
}

/* max |a - b| / max |b|: the relative error of the whole tensor */
static double rel_err(const float *a, const float *b, size_t n) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return s > 0 ? d / s : d;
}

static kd_gpt_t *load_reference(void) {
    char err[KD_ERR_LEN];
    kd_gpt_config_t cfg;
    kd_gpt_t *m = NULL;
    if (kd_gpt_config_read(MODEL_DIR "/config.json", &cfg, err, sizeof err) != 0 ||
        kd_gpt_new(&cfg, &m, err, sizeof err) != 0 || kd_gpt_load(m, MODEL_DIR, err, sizeof err)) {
        fprintf(stderr, "cannot load %s: %s\n", MODEL_DIR, err);
        exit(1);
    }
    return m;
}

/* tokens/targets of windows (B, T+1) */
static void split_windows(const uint32_t *w, int B, int T, uint32_t *tok, int32_t *tgt) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            tok[b * T + t] = w[b * (T + 1) + t];
            tgt[b * T + t] = (int32_t)w[b * (T + 1) + t + 1];
        }
}

static void test_one_batch(void) {
    kd_gpt_t *m = load_reference();
    const kd_gpt_config_t *c = &m->cfg;
    CHECK(c->layers == 2 && c->width == 32 && c->heads == 4 && c->context == 16 && c->vocab == 67);
    const int B = 3, T = 16, V = c->vocab;
    uint32_t tok[3 * 16], tg[3 * 16];
    int32_t tgt[3 * 16];
    io_tokens("tokens", (size_t)B * T, tok);
    io_tokens("targets", (size_t)B * T, tg);
    for (int i = 0; i < B * T; i++) tgt[i] = (int32_t)tg[i];

    kd_gpt_forward(m, tok, B, T, false, 0);
    float *logits = kd_xmalloc((size_t)B * T * V * sizeof(float));
    kd_gpt_logits(m, logits);
    double le = rel_err(logits, io_f32("logits", (size_t)B * T * V), (size_t)B * T * V);
    double loss = kd_gpt_loss(m, tgt, true, NULL);
    kd_gpt_backward(m);
    double loss_ref = io_f32("loss", 1)[0];
    fprintf(stderr, "  logits: relative error %.2g; loss %.7f vs PyTorch %.7f\n", le, loss,
            loss_ref);
    CHECK(le < 1e-4);
    CHECK(fabs(loss - loss_ref) < 1e-3 * fabs(loss_ref));
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        char name[KD_GPT_TENSOR_NAME + 8];
        snprintf(name, sizeof name, "grad.%s", t->name);
        double e = rel_err(m->grads + t->offset, io_f32(name, t->count), t->count);
        CHECK(e < 1e-3);
        if (e > worst) worst = e, worst_name = t->name;
    }
    fprintf(stderr, "  gradients: %d tensors, worst relative error %.2g (%s)\n", m->n_tensors,
            worst, worst_name);
    free(logits);
    kd_gpt_destroy(&m);
}

static void test_adamw_steps(void) {
    kd_gpt_t *m = load_reference();
    const int B = 3, T = 16;
    kd_optim_config_t oc = {.kind = KD_OPT_ADAMW,
                            .beta1 = 0.9f,
                            .beta2 = 0.95f,
                            .eps = 1e-8f,
                            .weight_decay = 0.1f,
                            .clip_norm = 1.0f};
    kd_schedule_config_t sc = {.kind = KD_SCHED_COSINE,
                               .lr = 3e-3f,
                               .min_lr = 3e-4f,
                               .warmup_steps = 3,
                               .total_steps = STEPS};
    kd_optim_t *opt = kd_optim_for_gpt(&oc, m);
    uint32_t *windows = kd_xmalloc((size_t)STEPS * B * (T + 1) * sizeof *windows);
    io_tokens("step_tokens", (size_t)STEPS * B * (T + 1), windows);
    const float *ref_loss = io_f32("step_loss", STEPS), *ref_lr = io_f32("step_lr", STEPS);
    uint32_t tok[3 * 16];
    int32_t tgt[3 * 16];
    double worst = 0;
    for (int s = 0; s < STEPS; s++) {
        split_windows(windows + (size_t)s * B * (T + 1), B, T, tok, tgt);
        kd_gpt_forward(m, tok, B, T, true, 0);
        double loss = kd_gpt_loss(m, tgt, true, NULL);
        kd_gpt_backward(m);
        float lr = kd_schedule_lr(&sc, s);
        CHECK(fabsf(lr - ref_lr[s]) <= 1e-7f * ref_lr[s]);
        kd_optim_step(opt, m->params, m->grads, lr);
        worst = fmax(worst, fabs(loss - ref_loss[s]) / ref_loss[s]);
    }
    fprintf(stderr, "  %d AdamW steps: loss curve within %.2g relative of PyTorch's\n", STEPS,
            worst);
    CHECK(worst < 1e-5);
    double wp = 0;
    const size_t C = (size_t)m->cfg.width;
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        char name[KD_GPT_TENSOR_NAME + 8];
        snprintf(name, sizeof name, "final.%s", t->name);
        const float *ref = io_f32(name, t->count), *got = m->params + t->offset;
        /* The key part of c_attn's bias, [C, 2C), has a gradient of exactly 0 (it adds q.b to
         * every score of a row, which the softmax cancels): both sides hold rounding noise
         * there, which Adam scales up to full steps. Compare the query and value parts. */
        double e = strstr(t->name, "c_attn.bias")
                       ? fmax(rel_err(got, ref, C), rel_err(got + 2 * C, ref + 2 * C, C))
                       : rel_err(got, ref, t->count);
        CHECK(e < 1e-3);
        wp = fmax(wp, e);
    }
    fprintf(stderr, "  weights after the steps: worst relative error %.2g\n", wp);
    free(windows);
    kd_optim_destroy(&opt);
    kd_gpt_destroy(&m);
}

/* ---- our files, and malformed ones ---------------------------------------------------------- */

/* Writes m's tensors to path, changed as `edit` says. */
typedef enum { AS_IS, DROP_ONE, EXTRA, UNTIED_HEAD, AS_F64 } edit_t;

static void write_edited(const kd_gpt_t *m, const char *path, edit_t edit) {
    kd_st_writer_t *w = kd_st_writer_new();
    static float extra[4] = {1, 2, 3, 4};
    static double dbl[32];
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        bool target = strcmp(t->name, "h.1.mlp.c_fc.bias") == 0;
        if (target && edit == DROP_ONE) continue;
        int64_t shape[2] = {t->shape[0], t->shape[1]};
        if (strcmp(t->name, "ln_f.bias") == 0 && edit == AS_F64) {
            for (int j = 0; j < 32; j++) dbl[j] = m->params[t->offset + j];
            kd_st_writer_add(w, t->name, KD_DTYPE_F64, 1, shape, dbl);
            continue;
        }
        kd_st_writer_add(w, t->name, KD_DTYPE_F32, t->ndim, shape, m->params + t->offset);
    }
    if (edit == EXTRA)
        kd_st_writer_add(w, "h.7.attn.c_attn.weight", KD_DTYPE_F32, 1, (int64_t[]){4}, extra);
    if (edit == UNTIED_HEAD) {
        const kd_gpt_tensor_t *wte = kd_gpt_find(m, "wte.weight");
        float *head = kd_xmalloc(wte->count * sizeof(float));
        memcpy(head, m->params + wte->offset, wte->count * sizeof(float));
        head[5] += 1.0f;
        kd_st_writer_add(w, "lm_head.weight", KD_DTYPE_F32, 2, wte->shape, head);
        char err[KD_ERR_LEN];
        CHECK(kd_st_writer_write(w, path, err, sizeof err) == 0);
        free(head);
        kd_st_writer_destroy(&w);
        return;
    }
    char err[KD_ERR_LEN];
    CHECK(kd_st_writer_write(w, path, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
}

static void expect_refused(kd_gpt_t *m, const char *path, const char *a, const char *b) {
    char err[KD_ERR_LEN] = "";
    float *before = kd_xmalloc(m->n_params * sizeof(float));
    memcpy(before, m->params, m->n_params * sizeof(float));
    CHECK(kd_gpt_load(m, path, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, a);
    if (b) CHECK_ERR_HAS(err, b);
    CHECK(memcmp(before, m->params, m->n_params * sizeof(float)) == 0); /* left as it was */
    free(before);
}

static void test_files(void) {
    kd_gpt_t *m = load_reference();
    char err[KD_ERR_LEN] = "";
    /* ours: safetensors + config.json beside it, which reads back as the same model */
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/ours", tmp);
    CHECK(kd_mkdirs(dir, err, sizeof err) == 0);
    const char *ours = tmp_path("ours/model.safetensors");
    CHECK(kd_gpt_save(m, ours, err, sizeof err) == 0);
    kd_gpt_config_t back;
    CHECK(kd_gpt_config_read(tmp_path("ours/config.json"), &back, err, sizeof err) == 0);
    CHECK(memcmp(&back, &m->cfg, sizeof back) == 0);
    kd_gpt_t *again = NULL;
    CHECK(kd_gpt_new(&back, &again, err, sizeof err) == 0);
    CHECK(kd_gpt_load(again, dir, err, sizeof err) == 0); /* the directory, as a hub model */
    CHECK(memcmp(again->params, m->params, m->n_params * sizeof(float)) == 0);
    kd_gpt_destroy(&again);

    /* a recipe that disagrees with config.json: both values named */
    kd_gpt_config_t other = m->cfg;
    other.layers = 3;
    kd_gpt_t *wrong = NULL;
    CHECK(kd_gpt_new(&other, &wrong, err, sizeof err) == 0);
    CHECK(kd_gpt_load(wrong, MODEL_DIR, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "config.json: n_layer is 2 but the recipe's model has layers 3");
    kd_gpt_destroy(&wrong);
    other = m->cfg;
    other.vocab = 50;
    CHECK(kd_gpt_new(&other, &wrong, err, sizeof err) == 0);
    CHECK(kd_gpt_load(wrong, MODEL_DIR, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "vocab_size is 67 but the recipe's model has vocab 50");
    kd_gpt_destroy(&wrong);
    /* without config.json the shapes decide */
    write_edited(m, tmp_path("bare.safetensors"), AS_IS);
    other = m->cfg;
    other.context = 8;
    CHECK(kd_gpt_new(&other, &wrong, err, sizeof err) == 0);
    CHECK(kd_gpt_load(wrong, tmp_path("bare.safetensors"), err, sizeof err) == -1);
    CHECK_ERR_HAS(err,
                  "tensor 'wpe.weight' has shape [16, 32], the recipe's model expects [8, 32]");
    kd_gpt_destroy(&wrong);

    /* a config.json that disagrees with its safetensors */
    snprintf(dir, sizeof dir, "%s/liar", tmp);
    CHECK(kd_mkdirs(dir, err, sizeof err) == 0);
    write_edited(m, tmp_path("liar/model.safetensors"), AS_IS);
    FILE *f = fopen(tmp_path("liar/config.json"), "w");
    fprintf(f, "{\"model_type\": \"gpt2\", \"n_layer\": 2, \"n_embd\": 32, \"n_head\": 4, "
               "\"n_positions\": 16, \"vocab_size\": 68}\n");
    fclose(f);
    other = m->cfg;
    other.vocab = 68;
    CHECK(kd_gpt_new(&other, &wrong, err, sizeof err) == 0);
    expect_refused(wrong, dir, "model.safetensors: tensor", "'wte.weight' has shape [67, 32]");
    kd_gpt_destroy(&wrong);
    /* config.json problems, each naming the file and the field */
    struct {
        const char *json, *want;
    } bad[] = {
        {"{\"n_layer\": 2}", "field 'n_embd' is missing"},
        {"{\"model_type\": \"llama\", \"n_layer\": 2}", "model_type is llama"},
        {"{\"n_layer\": \"2\", \"n_embd\": 32}", "field 'n_layer' must be a positive integer"},
        {"{\"n_layer\": 2, \"n_embd\": 30, \"n_head\": 4, \"n_positions\": 16, \"vocab_size\": 67}",
         "width 30 is not a multiple of heads 4"},
        {"{\"n_layer\": 2, \"n_embd\": 32, \"n_head\": 4, \"n_positions\": 16, \"vocab_size\": 67, "
         "\"activation_function\": \"relu\"}",
         "activation_function relu"},
        {"{\"n_layer\": 2,", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *p = tmp_path("bad_config.json");
        f = fopen(p, "w");
        fputs(bad[i].json, f);
        fclose(f);
        kd_gpt_config_t c;
        CHECK(kd_gpt_config_read(p, &c, err, sizeof err) == -1);
        CHECK_ERR_HAS(err, p);
        CHECK_ERR_HAS(err, bad[i].want);
    }

    /* tensors: missing, misshaped, unknown, an untied head, another dtype */
    write_edited(m, tmp_path("missing.safetensors"), DROP_ONE);
    expect_refused(m, tmp_path("missing.safetensors"),
                   "missing.safetensors: tensor 'h.1.mlp.c_fc.bias' is missing", NULL);
    write_edited(m, tmp_path("extra.safetensors"), EXTRA);
    expect_refused(m, tmp_path("extra.safetensors"), "unexpected tensor 'h.7.attn.c_attn.weight'",
                   "extra.safetensors");
    write_edited(m, tmp_path("untied.safetensors"), UNTIED_HEAD);
    expect_refused(m, tmp_path("untied.safetensors"), "lm_head.weight differs from wte.weight",
                   "untied.safetensors");
    write_edited(m, tmp_path("f64.safetensors"), AS_F64);
    expect_refused(m, tmp_path("f64.safetensors"),
                   "tensor 'ln_f.bias' has dtype F64, kdist needs F32", NULL);
    kd_gpt_destroy(&m);
}

static void test_misshaped(void) {
    /* a tensor whose shape is wrong (same byte count is impossible here: it is half) */
    kd_gpt_t *m = load_reference();
    kd_st_writer_t *w = kd_st_writer_new();
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        int64_t shape[2] = {t->shape[0], t->shape[1]};
        if (strcmp(t->name, "h.0.attn.c_attn.weight") == 0) shape[0] = 96, shape[1] = 32;
        kd_st_writer_add(w, t->name, KD_DTYPE_F32, t->ndim, shape, m->params + t->offset);
    }
    char err[KD_ERR_LEN];
    CHECK(kd_st_writer_write(w, tmp_path("shape.safetensors"), err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    /* Conv1D [in, out] = [32, 96]; a PyTorch Linear's [out, in] is refused, naming both */
    expect_refused(m, tmp_path("shape.safetensors"),
                   "tensor 'h.0.attn.c_attn.weight' has shape [96, 32], the recipe's model "
                   "expects [32, 96]",
                   NULL);
    kd_gpt_destroy(&m);
}

int main(void) {
    tmp = kd_test_tmpdir("test_gpt_torch");
    char err[KD_ERR_LEN];
    if (kd_st_open(IO_FILE, &io, err, sizeof err) != 0) {
        fprintf(stderr, "%s (run from tests/)\n", err);
        return 1;
    }
    test_one_batch();
    test_adamw_steps();
    test_files();
    test_misshaped();
    kd_st_close(&io);
    while (n_copies > 0) free(copies[--n_copies]);
    if (!kd_test_failures) {
        char cmd[1100];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_gpt_torch");
}
