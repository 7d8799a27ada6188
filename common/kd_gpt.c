/* kd_gpt: the GPT-2 decoder (see kd_gpt.h): the tensor table, forward, the chunked head and
 * backward over the transformer kernels (kd_kernels_gpt.c), after llm.c's train_gpt2.c.
 * Shapes: B windows, T positions, N = B*T rows, C width, NH heads, V vocabulary, L layers.
 * The activations grow with the largest (B, T) seen; they are never shrunk. */
#include "kd_gpt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_kernels.h"
#include "kd_rng.h"
#include "kd_util.h"

#define DROPOUT_STREAM 0x67707464ULL     /* "gptd" */
#define HEAD_FLOATS    ((size_t)1 << 22) /* a head chunk's logits: 16 MiB */
#define MAX_WIDTH      (1 << 16)
#define MAX_CONTEXT    (1 << 16)
#define MAX_VOCAB      (1 << 24)

/* Where each tensor of block l sits, as indices into the tensor table. */
enum {
    T_LN1_W,
    T_LN1_B,
    T_ATTN_W,
    T_ATTN_B,
    T_APROJ_W,
    T_APROJ_B,
    T_LN2_W,
    T_LN2_B,
    T_FC_W,
    T_FC_B,
    T_MPROJ_W,
    T_MPROJ_B,
    T_PER_LAYER
};
#define T_WTE         0
#define T_WPE         1
#define T_LAYER(l, k) (2 + (l)*T_PER_LAYER + (k))
#define T_LNF_W(L)    (2 + (L)*T_PER_LAYER)
#define T_LNF_B(L)    (3 + (L)*T_PER_LAYER)
#define N_TENSORS(L)  (4 + (L)*T_PER_LAYER)

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* (N,C) (N) (N) */
    float *qkv;                       /* (N,3C) */
    float *atty;                      /* (N,C) attention output, c_proj's input */
    float *att;                       /* (B,NH,T,T) probabilities */
    float *res2;                      /* (N,C) x + attention branch */
    float *ln2, *ln2_mean, *ln2_rstd; /* (N,C) (N) (N) */
    float *fch, *fch_gelu;            /* (N,4C) */
    float *res3;                      /* (N,C) the block's output */
    float *mask_attn, *mask_mlp;      /* (N,C) dropout scales, when dropout is on */
} layer_acts_t;

struct kd_gpt_acts {
    size_t cap_rows, cap_att, cap_T; /* N, B*NH*T*T and T the buffers hold */
    int B, T;
    bool ready, dropped, head_grad;
    uint32_t *tokens;          /* (N) of the last forward */
    float *encoded, *mask_emb; /* (N,C) */
    layer_acts_t layer[KD_GPT_MAX_LAYERS];
    float *lnf, *lnf_mean, *lnf_rstd; /* (N,C) (N) (N) */
    float *dlnf;                      /* (N,C) the head's gradient */
    float *head;                      /* (chunk,V) */
    /* scratch: one branch's output in forward; gradients in backward */
    float *tmp, *dres, *dln, *datty, *dqkv, *dfch; /* (N,C) x4, (N,3C), (N,4C) */
    float *att_scratch;                            /* (T,T) */
};

/* ---- the tensor table ------------------------------------------------------------------- */

int kd_gpt_config_check(const kd_gpt_config_t *c, char *err, size_t errlen) {
    if (c->layers < 1 || c->layers > KD_GPT_MAX_LAYERS)
        return kd_err(err, errlen, "gpt: layers is %d; it must be 1..%d", c->layers,
                      KD_GPT_MAX_LAYERS);
    if (c->heads < 1 || c->width < 1 || c->width > MAX_WIDTH)
        return kd_err(err, errlen, "gpt: width %d and heads %d must be positive (width <= %d)",
                      c->width, c->heads, MAX_WIDTH);
    if (c->width % c->heads != 0)
        return kd_err(err, errlen, "gpt: width %d is not a multiple of heads %d", c->width,
                      c->heads);
    if (c->context < 1 || c->context > MAX_CONTEXT)
        return kd_err(err, errlen, "gpt: context is %d; it must be 1..%d", c->context, MAX_CONTEXT);
    if (c->vocab < 2 || c->vocab > MAX_VOCAB)
        return kd_err(err, errlen, "gpt: vocab is %d; it must be 2..%d", c->vocab, MAX_VOCAB);
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return kd_err(err, errlen, "gpt: dropout is %g; it must be in [0, 1)", (double)c->dropout);
    if (kd_gpt_param_count(c) > ((size_t)1 << 31))
        return kd_err(err, errlen, "gpt: %zu parameters are more than 2^31", kd_gpt_param_count(c));
    return 0;
}

/* Fills the table (NULL: counts only); returns the parameter count. */
static size_t build_table(const kd_gpt_config_t *c, kd_gpt_tensor_t *t) {
    const int64_t C = c->width;
    size_t off = 0;
    int i = 0;
#define ADD(decay_, d0, d1, ...)                                                                   \
    do {                                                                                           \
        size_t count_ = (size_t)(d0) * (size_t)((d1) > 0 ? (d1) : 1);                              \
        if (t) {                                                                                   \
            kd_gpt_tensor_t *x_ = &t[i];                                                           \
            snprintf(x_->name, sizeof x_->name, __VA_ARGS__);                                      \
            x_->offset = off;                                                                      \
            x_->count = count_;                                                                    \
            x_->ndim = (d1) > 0 ? 2 : 1;                                                           \
            x_->shape[0] = (d0);                                                                   \
            x_->shape[1] = (d1) > 0 ? (d1) : 0;                                                    \
            x_->decay = (decay_);                                                                  \
        }                                                                                          \
        off += count_;                                                                             \
        i++;                                                                                       \
    } while (0)
    ADD(true, c->vocab, C, "wte.weight");
    ADD(true, c->context, C, "wpe.weight");
    for (int l = 0; l < c->layers; l++) {
        ADD(false, C, 0, "h.%d.ln_1.weight", l);
        ADD(false, C, 0, "h.%d.ln_1.bias", l);
        ADD(true, C, 3 * C, "h.%d.attn.c_attn.weight", l);
        ADD(false, 3 * C, 0, "h.%d.attn.c_attn.bias", l);
        ADD(true, C, C, "h.%d.attn.c_proj.weight", l);
        ADD(false, C, 0, "h.%d.attn.c_proj.bias", l);
        ADD(false, C, 0, "h.%d.ln_2.weight", l);
        ADD(false, C, 0, "h.%d.ln_2.bias", l);
        ADD(true, C, 4 * C, "h.%d.mlp.c_fc.weight", l);
        ADD(false, 4 * C, 0, "h.%d.mlp.c_fc.bias", l);
        ADD(true, 4 * C, C, "h.%d.mlp.c_proj.weight", l);
        ADD(false, C, 0, "h.%d.mlp.c_proj.bias", l);
    }
    ADD(false, C, 0, "ln_f.weight");
    ADD(false, C, 0, "ln_f.bias");
#undef ADD
    return off;
}

size_t kd_gpt_param_count(const kd_gpt_config_t *cfg) {
    return build_table(cfg, NULL);
}

int kd_gpt_new(const kd_gpt_config_t *cfg, kd_gpt_t **out, char *err, size_t errlen) {
    KD_ASSERT(cfg && out);
    *out = NULL;
    if (kd_gpt_config_check(cfg, err, errlen) != 0) return -1;
    kd_gpt_t *m = kd_xcalloc(1, sizeof *m);
    m->cfg = *cfg;
    m->n_tensors = N_TENSORS(cfg->layers);
    m->tensors = kd_xcalloc((size_t)m->n_tensors, sizeof *m->tensors);
    m->n_params = build_table(cfg, m->tensors);
    m->params = kd_alloc_floats(m->n_params);
    m->grads = kd_alloc_floats(m->n_params);
    m->acts = kd_xcalloc(1, sizeof *m->acts);
    *out = m;
    return 0;
}

static void acts_free(kd_gpt_acts_t *a, int L) {
    free(a->tokens);
    float **all[] = {&a->encoded, &a->mask_emb, &a->lnf,  &a->lnf_mean,   &a->lnf_rstd,
                     &a->dlnf,    &a->head,     &a->tmp,  &a->dres,       &a->dln,
                     &a->datty,   &a->dqkv,     &a->dfch, &a->att_scratch};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        free(*all[i]);
        *all[i] = NULL;
    }
    for (int l = 0; l < L; l++) {
        layer_acts_t *y = &a->layer[l];
        float **per[] = {&y->ln1, &y->ln1_mean, &y->ln1_rstd, &y->qkv,       &y->atty,
                         &y->att, &y->res2,     &y->ln2,      &y->ln2_mean,  &y->ln2_rstd,
                         &y->fch, &y->fch_gelu, &y->res3,     &y->mask_attn, &y->mask_mlp};
        for (size_t i = 0; i < sizeof per / sizeof per[0]; i++) {
            free(*per[i]);
            *per[i] = NULL;
        }
    }
    a->tokens = NULL;
    a->cap_rows = a->cap_att = a->cap_T = 0;
    a->ready = false;
}

void kd_gpt_destroy(kd_gpt_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_gpt_t *m = *self_p;
    acts_free(m->acts, m->cfg.layers);
    free(m->acts);
    free(m->tensors);
    free(m->params);
    free(m->grads);
    free(m);
    *self_p = NULL;
}

const kd_gpt_tensor_t *kd_gpt_find(const kd_gpt_t *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return &m->tensors[i];
    return NULL;
}

void kd_gpt_init_params(kd_gpt_t *m, uint64_t seed) {
    const float proj_std = 0.02f / sqrtf(2.0f * (float)m->cfg.layers);
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        float *p = m->params + t->offset;
        const char *name = t->name;
        if (t->ndim == 2) {
            float std = strstr(name, "c_proj.weight") ? proj_std : 0.02f;
            kd_rng_t rng;
            kd_rng_init(&rng, kd_rng_key(seed, (uint64_t)i, 0));
            for (size_t j = 0; j < t->count; j++) p[j] = std * kd_rng_normal(&rng);
        } else {
            bool gain = strstr(name, "ln_") && strstr(name, ".weight");
            for (size_t j = 0; j < t->count; j++) p[j] = gain ? 1.0f : 0.0f;
        }
    }
}

/* ---- activations -------------------------------------------------------------------------- */

static void acts_reserve(kd_gpt_t *m, int B, int T) {
    kd_gpt_acts_t *a = m->acts;
    const int L = m->cfg.layers, NH = m->cfg.heads;
    const size_t N = (size_t)B * T, C = (size_t)m->cfg.width, att = (size_t)B * NH * T * T;
    if (N <= a->cap_rows && att <= a->cap_att && (size_t)T <= a->cap_T) return;
    size_t rows = N > a->cap_rows ? N : a->cap_rows, atts = att > a->cap_att ? att : a->cap_att;
    size_t maxT = (size_t)T > a->cap_T ? (size_t)T : a->cap_T;
    acts_free(a, L);
    const bool drop = m->cfg.dropout > 0.0f;
    a->tokens = kd_xmalloc(rows * sizeof *a->tokens);
    a->encoded = kd_alloc_floats(rows * C);
    if (drop) a->mask_emb = kd_alloc_floats(rows * C);
    for (int l = 0; l < L; l++) {
        layer_acts_t *y = &a->layer[l];
        y->ln1 = kd_alloc_floats(rows * C);
        y->ln1_mean = kd_alloc_floats(rows);
        y->ln1_rstd = kd_alloc_floats(rows);
        y->qkv = kd_alloc_floats(rows * 3 * C);
        y->atty = kd_alloc_floats(rows * C);
        y->att = kd_alloc_floats(atts);
        y->res2 = kd_alloc_floats(rows * C);
        y->ln2 = kd_alloc_floats(rows * C);
        y->ln2_mean = kd_alloc_floats(rows);
        y->ln2_rstd = kd_alloc_floats(rows);
        y->fch = kd_alloc_floats(rows * 4 * C);
        y->fch_gelu = kd_alloc_floats(rows * 4 * C);
        y->res3 = kd_alloc_floats(rows * C);
        if (drop) {
            y->mask_attn = kd_alloc_floats(rows * C);
            y->mask_mlp = kd_alloc_floats(rows * C);
        }
    }
    a->lnf = kd_alloc_floats(rows * C);
    a->lnf_mean = kd_alloc_floats(rows);
    a->lnf_rstd = kd_alloc_floats(rows);
    a->dlnf = kd_alloc_floats(rows * C);
    a->head = kd_alloc_floats(kd_gpt_head_chunk(m->cfg.vocab) * (size_t)m->cfg.vocab);
    a->tmp = kd_alloc_floats(rows * C);
    a->dres = kd_alloc_floats(rows * C);
    a->dln = kd_alloc_floats(rows * C);
    a->datty = kd_alloc_floats(rows * C);
    a->dqkv = kd_alloc_floats(rows * 3 * C);
    a->dfch = kd_alloc_floats(rows * 4 * C);
    a->att_scratch = kd_alloc_floats(maxT * maxT);
    a->cap_rows = rows;
    a->cap_att = atts;
    a->cap_T = maxT;
}

/* ---- forward ------------------------------------------------------------------------------ */

static const float *P(const kd_gpt_t *m, int t) {
    return m->params + m->tensors[t].offset;
}
static float *G(kd_gpt_t *m, int t) {
    return m->grads + m->tensors[t].offset;
}

/* out = x + branch, with the branch's dropout when on. */
static void residual_add(float *out, const float *x, float *branch, float *mask, size_t n,
                         const kd_gpt_t *m, bool dropped, uint64_t key) {
    if (dropped) kd_dropout_forward(branch, mask, branch, n, m->cfg.dropout, key);
    for (size_t i = 0; i < n; i++) out[i] = x[i] + branch[i];
}

void kd_gpt_forward(kd_gpt_t *m, const uint32_t *tokens, int B, int T, bool train,
                    uint64_t dropout_key) {
    const kd_gpt_config_t *c = &m->cfg;
    KD_ASSERT(B >= 1 && T >= 1 && T <= c->context);
    acts_reserve(m, B, T);
    kd_gpt_acts_t *a = m->acts;
    const int C = c->width, NH = c->heads, L = c->layers;
    const size_t N = (size_t)B * T, NC = N * (size_t)C;
    a->B = B;
    a->T = T;
    a->dropped = train && c->dropout > 0.0f;
    a->head_grad = false;
    memcpy(a->tokens, tokens, N * sizeof *tokens);

    // encoded (N,C) = wte[token] + wpe[t]
    const float *wte = P(m, T_WTE), *wpe = P(m, T_WPE);
    for (size_t n = 0; n < N; n++) {
        KD_ASSERT(tokens[n] < (uint32_t)c->vocab);
        const float *te = wte + (size_t)tokens[n] * C, *pe = wpe + (n % (size_t)T) * C;
        float *e = a->encoded + n * C;
        for (int i = 0; i < C; i++) e[i] = te[i] + pe[i];
    }
    if (a->dropped)
        kd_dropout_forward(a->encoded, a->mask_emb, a->encoded, NC, c->dropout,
                           kd_rng_key(dropout_key, DROPOUT_STREAM, 0));

    const float *x = a->encoded;
    for (int l = 0; l < L; l++) {
        layer_acts_t *y = &a->layer[l];
        const uint64_t key = kd_rng_key(dropout_key, DROPOUT_STREAM, 1 + 2 * (uint64_t)l);
        kd_layernorm_forward(y->ln1, y->ln1_mean, y->ln1_rstd, x, P(m, T_LAYER(l, T_LN1_W)),
                             P(m, T_LAYER(l, T_LN1_B)), (int)N, C, KD_GPT_LN_EPS);
        kd_conv1d_forward(y->qkv, y->ln1, P(m, T_LAYER(l, T_ATTN_W)), P(m, T_LAYER(l, T_ATTN_B)),
                          (int)N, C, 3 * C);
        kd_attention_forward(y->atty, y->att, y->qkv, B, T, C, NH);
        kd_conv1d_forward(a->tmp, y->atty, P(m, T_LAYER(l, T_APROJ_W)), P(m, T_LAYER(l, T_APROJ_B)),
                          (int)N, C, C);
        residual_add(y->res2, x, a->tmp, y->mask_attn, NC, m, a->dropped, key);
        kd_layernorm_forward(y->ln2, y->ln2_mean, y->ln2_rstd, y->res2, P(m, T_LAYER(l, T_LN2_W)),
                             P(m, T_LAYER(l, T_LN2_B)), (int)N, C, KD_GPT_LN_EPS);
        kd_conv1d_forward(y->fch, y->ln2, P(m, T_LAYER(l, T_FC_W)), P(m, T_LAYER(l, T_FC_B)),
                          (int)N, C, 4 * C);
        kd_gelu_tanh_forward(y->fch_gelu, y->fch, N * 4 * (size_t)C);
        kd_conv1d_forward(a->tmp, y->fch_gelu, P(m, T_LAYER(l, T_MPROJ_W)),
                          P(m, T_LAYER(l, T_MPROJ_B)), (int)N, 4 * C, C);
        residual_add(y->res3, y->res2, a->tmp, y->mask_mlp, NC, m, a->dropped, key + 1);
        x = y->res3;
    }
    kd_layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, x, P(m, T_LNF_W(L)), P(m, T_LNF_B(L)),
                         (int)N, C, KD_GPT_LN_EPS);
    a->ready = true;
}

/* ---- the head ----------------------------------------------------------------------------- */

size_t kd_gpt_head_chunk(int vocab) {
    size_t n = HEAD_FLOATS / (size_t)(vocab > 0 ? vocab : 1);
    return n > 0 ? n : 1;
}

double kd_gpt_head(kd_gpt_t *m, kd_gpt_head_fn fn, void *ctx, bool grad) {
    kd_gpt_acts_t *a = m->acts;
    KD_ASSERT(a->ready);
    const int C = m->cfg.width, V = m->cfg.vocab;
    const size_t N = (size_t)a->B * a->T, chunk = kd_gpt_head_chunk(V);
    const float *wte = P(m, T_WTE);
    if (grad) memset(m->grads, 0, m->n_params * sizeof(float));
    double loss = 0.0;
    for (size_t p0 = 0; p0 < N; p0 += chunk) {
        const int n = (int)(N - p0 < chunk ? N - p0 : chunk);
        const float *h = a->lnf + p0 * C;
        // logits (n,V) = lnf (n,C) @ wte^T (C,V)
        kd_sgemm(CblasNoTrans, CblasTrans, n, V, C, 1.0f, h, C, wte, C, 0.0f, a->head, V);
        loss += fn(ctx, p0, (size_t)n, a->head, grad);
        if (!grad) continue;
        // dlnf (n,C) = dlogits (n,V) @ wte (V,C);  dwte (V,C) += dlogits^T (V,n) @ lnf (n,C)
        kd_sgemm(CblasNoTrans, CblasNoTrans, n, C, V, 1.0f, a->head, V, wte, C, 0.0f,
                 a->dlnf + p0 * C, C);
        kd_sgemm(CblasTrans, CblasNoTrans, V, C, n, 1.0f, a->head, V, h, C, 1.0f, G(m, T_WTE), C);
    }
    a->head_grad = grad;
    return loss;
}

struct ce_ctx {
    const int32_t *targets;
    int V;
    double inv_count;
    size_t correct;
};

static double ce_chunk(void *ctx_, size_t pos0, size_t n, float *logits, bool grad) {
    struct ce_ctx *ctx = ctx_;
    const int V = ctx->V;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        float *row = logits + i * V;
        const int32_t y = ctx->targets[pos0 + i];
        if (y < 0) {
            if (grad) memset(row, 0, (size_t)V * sizeof(float));
            continue;
        }
        KD_ASSERT(y < V);
        float mx = row[0];
        for (int j = 1; j < V; j++) mx = row[j] > mx ? row[j] : mx;
        bool top = row[y] == mx; /* ties count as correct only when no other logit is above */
        for (int j = 0; top && j < y; j++) top = row[j] < mx; /* argmax: the first maximum */
        ctx->correct += top;
        double z = 0.0;
        for (int j = 0; j < V; j++) z += exp((double)(row[j] - mx));
        const double lse = (double)mx + log(z);
        sum += lse - row[y];
        if (!grad) continue;
        /* d(mean CE)/d(logit j) = (softmax_j - [j == y]) / count */
        const float s = (float)ctx->inv_count;
        for (int j = 0; j < V; j++) row[j] = (float)exp((double)row[j] - lse) * s;
        row[y] -= s;
    }
    return sum * ctx->inv_count;
}

double kd_gpt_loss(kd_gpt_t *m, const int32_t *targets, bool grad, size_t *correct) {
    const size_t N = (size_t)m->acts->B * m->acts->T;
    size_t count = 0;
    for (size_t i = 0; i < N; i++) count += targets[i] >= 0;
    if (correct) *correct = 0;
    if (count == 0) return NAN;
    struct ce_ctx ctx = {targets, m->cfg.vocab, 1.0 / (double)count, 0};
    double loss = kd_gpt_head(m, ce_chunk, &ctx, grad);
    if (correct) *correct = ctx.correct;
    return loss;
}

struct copy_ctx {
    float *out;
    int V;
};

static double copy_chunk(void *ctx_, size_t pos0, size_t n, float *logits, bool grad) {
    (void)grad;
    const struct copy_ctx *ctx = ctx_;
    memcpy(ctx->out + pos0 * ctx->V, logits, n * (size_t)ctx->V * sizeof(float));
    return 0.0;
}

void kd_gpt_logits(kd_gpt_t *m, float *out) {
    struct copy_ctx ctx = {out, m->cfg.vocab};
    kd_gpt_head(m, copy_chunk, &ctx, false);
}

/* ---- backward ----------------------------------------------------------------------------- */

/* The gradient reaching a dropped-out branch: d(res)/d(branch) is the mask. */
static const float *branch_grad(float *tmp, const float *dres, const float *mask, size_t n,
                                bool dropped) {
    if (!dropped) return dres;
    kd_dropout_backward(tmp, dres, mask, n);
    return tmp;
}

void kd_gpt_backward(kd_gpt_t *m) {
    kd_gpt_acts_t *a = m->acts;
    KD_ASSERT(a->ready && a->head_grad);
    const kd_gpt_config_t *c = &m->cfg;
    const int B = a->B, T = a->T, C = c->width, NH = c->heads, L = c->layers;
    const size_t N = (size_t)B * T, NC = N * (size_t)C;

    memset(a->dres, 0, NC * sizeof(float));
    const float *last = a->layer[L - 1].res3;
    kd_layernorm_backward(a->dres, G(m, T_LNF_W(L)), G(m, T_LNF_B(L)), a->dlnf, last,
                          P(m, T_LNF_W(L)), a->lnf_mean, a->lnf_rstd, (int)N, C);
    for (int l = L - 1; l >= 0; l--) {
        layer_acts_t *y = &a->layer[l];
        const float *x = l == 0 ? a->encoded : a->layer[l - 1].res3;
        // res3 = res2 + mlp(ln2(res2))
        const float *dbranch = branch_grad(a->tmp, a->dres, y->mask_mlp, NC, a->dropped);
        kd_conv1d_backward(a->dfch, G(m, T_LAYER(l, T_MPROJ_W)), G(m, T_LAYER(l, T_MPROJ_B)),
                           dbranch, y->fch_gelu, P(m, T_LAYER(l, T_MPROJ_W)), (int)N, 4 * C, C);
        kd_gelu_tanh_backward(a->dfch, a->dfch, y->fch, N * 4 * (size_t)C);
        kd_conv1d_backward(a->dln, G(m, T_LAYER(l, T_FC_W)), G(m, T_LAYER(l, T_FC_B)), a->dfch,
                           y->ln2, P(m, T_LAYER(l, T_FC_W)), (int)N, C, 4 * C);
        kd_layernorm_backward(a->dres, G(m, T_LAYER(l, T_LN2_W)), G(m, T_LAYER(l, T_LN2_B)), a->dln,
                              y->res2, P(m, T_LAYER(l, T_LN2_W)), y->ln2_mean, y->ln2_rstd, (int)N,
                              C);
        // res2 = x + attn(ln1(x))
        dbranch = branch_grad(a->tmp, a->dres, y->mask_attn, NC, a->dropped);
        kd_conv1d_backward(a->datty, G(m, T_LAYER(l, T_APROJ_W)), G(m, T_LAYER(l, T_APROJ_B)),
                           dbranch, y->atty, P(m, T_LAYER(l, T_APROJ_W)), (int)N, C, C);
        kd_attention_backward(a->dqkv, a->att_scratch, a->datty, y->qkv, y->att, B, T, C, NH);
        kd_conv1d_backward(a->dln, G(m, T_LAYER(l, T_ATTN_W)), G(m, T_LAYER(l, T_ATTN_B)), a->dqkv,
                           y->ln1, P(m, T_LAYER(l, T_ATTN_W)), (int)N, C, 3 * C);
        kd_layernorm_backward(a->dres, G(m, T_LAYER(l, T_LN1_W)), G(m, T_LAYER(l, T_LN1_B)), a->dln,
                              x, P(m, T_LAYER(l, T_LN1_W)), y->ln1_mean, y->ln1_rstd, (int)N, C);
    }
    // encoded = wte[token] + wpe[t]: scatter the gradient back
    const float *d = branch_grad(a->tmp, a->dres, a->mask_emb, NC, a->dropped);
    float *dwte = G(m, T_WTE), *dwpe = G(m, T_WPE);
    for (size_t n = 0; n < N; n++) {
        float *te = dwte + (size_t)a->tokens[n] * C, *pe = dwpe + (n % (size_t)T) * C;
        const float *g = d + n * C;
        for (int i = 0; i < C; i++) {
            te[i] += g[i];
            pe[i] += g[i];
        }
    }
    a->head_grad = false;
}

double kd_gpt_forward_flops(const kd_gpt_config_t *c, int T) {
    const double C = c->width, L = c->layers;
    /* per token and layer: qkv 3C^2, proj C^2, mlp 8C^2; attention scores and values ~T*C
     * (half of T, causal: counted whole, as the GEMMs compute it) */
    double per_token = L * (12.0 * C * C + 2.0 * T * C) + C * c->vocab;
    return per_token * T;
}
