/* kd_gpt_sample: generation with a KV cache (see kd_gpt.h): one position at a time, each layer
 * keeps the keys and values of the positions before, so a token costs one row of every GEMM
 * instead of a forward over the whole window. The maths is kd_gpt_forward's, row by row. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_kernels.h"
#include "kd_tokenizer.h"
#include "kd_util.h"

struct kd_gpt_sampler {
    const kd_gpt_t *m;
    int pos;                                            /* positions fed so far */
    float *k, *v;                                       /* (L, context, C) the cache */
    float *x, *ln, *qkv, *att, *y, *fc, *fc_gelu, *tmp; /* one row each */
    float *scores;                                      /* (context) */
    float mean, rstd;
    float *logits; /* (V) */
};

kd_gpt_sampler_t *kd_gpt_sampler_new(const kd_gpt_t *m) {
    const size_t C = (size_t)m->cfg.width, L = (size_t)m->cfg.layers, ctx = (size_t)m->cfg.context;
    kd_gpt_sampler_t *s = kd_xcalloc(1, sizeof *s);
    s->m = m;
    s->k = kd_alloc_floats(L * ctx * C);
    s->v = kd_alloc_floats(L * ctx * C);
    s->x = kd_alloc_floats(C);
    s->ln = kd_alloc_floats(C);
    s->qkv = kd_alloc_floats(3 * C);
    s->att = kd_alloc_floats(C);
    s->y = kd_alloc_floats(C);
    s->fc = kd_alloc_floats(4 * C);
    s->fc_gelu = kd_alloc_floats(4 * C);
    s->tmp = kd_alloc_floats(C);
    s->scores = kd_alloc_floats(ctx);
    s->logits = kd_alloc_floats((size_t)m->cfg.vocab);
    return s;
}

void kd_gpt_sampler_destroy(kd_gpt_sampler_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_gpt_sampler_t *s = *self_p;
    float *all[] = {s->k, s->v,  s->x,       s->ln,  s->qkv,    s->att,
                    s->y, s->fc, s->fc_gelu, s->tmp, s->scores, s->logits};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
    free(s);
    *self_p = NULL;
}

void kd_gpt_sampler_reset(kd_gpt_sampler_t *s) {
    s->pos = 0;
}

int kd_gpt_sampler_position(const kd_gpt_sampler_t *s) {
    return s->pos;
}

static const float *param(const kd_gpt_t *m, const char *fmt, int l) {
    char name[KD_GPT_TENSOR_NAME];
    snprintf(name, sizeof name, fmt, l);
    const kd_gpt_tensor_t *t = kd_gpt_find(m, name);
    KD_ASSERT(t);
    return m->params + t->offset;
}

const float *kd_gpt_sampler_step(kd_gpt_sampler_t *s, uint32_t token) {
    const kd_gpt_t *m = s->m;
    const int C = m->cfg.width, NH = m->cfg.heads, hs = C / NH, t = s->pos, V = m->cfg.vocab;
    KD_ASSERT(t < m->cfg.context && token < (uint32_t)V);
    const float *wte = param(m, "wte.weight", 0), *wpe = param(m, "wpe.weight", 0);
    for (int i = 0; i < C; i++) s->x[i] = wte[(size_t)token * C + i] + wpe[(size_t)t * C + i];
    const float scale = 1.0f / sqrtf((float)hs);
    for (int l = 0; l < m->cfg.layers; l++) {
        float *K = s->k + ((size_t)l * m->cfg.context) * C,
              *Vc = s->v + ((size_t)l * m->cfg.context) * C;
        kd_layernorm_forward(s->ln, &s->mean, &s->rstd, s->x, param(m, "h.%d.ln_1.weight", l),
                             param(m, "h.%d.ln_1.bias", l), 1, C, KD_GPT_LN_EPS);
        kd_conv1d_forward(s->qkv, s->ln, param(m, "h.%d.attn.c_attn.weight", l),
                          param(m, "h.%d.attn.c_attn.bias", l), 1, C, 3 * C);
        memcpy(K + (size_t)t * C, s->qkv + C, (size_t)C * sizeof(float));
        memcpy(Vc + (size_t)t * C, s->qkv + 2 * C, (size_t)C * sizeof(float));
        for (int h = 0; h < NH; h++) {
            const float *q = s->qkv + h * hs;
            // scores (t+1) = K[0..t, head h] (t+1,hs) @ q (hs) * scale
            cblas_sgemv(CblasRowMajor, CblasNoTrans, t + 1, hs, scale, K + h * hs, C, q, 1, 0.0f,
                        s->scores, 1);
            float mx = s->scores[0];
            for (int j = 1; j <= t; j++) mx = s->scores[j] > mx ? s->scores[j] : mx;
            double sum = 0.0;
            for (int j = 0; j <= t; j++) {
                s->scores[j] = expf(s->scores[j] - mx);
                sum += s->scores[j];
            }
            for (int j = 0; j <= t; j++) s->scores[j] = (float)(s->scores[j] / sum);
            // att[head h] (hs) = V[0..t, head h]^T (hs,t+1) @ p (t+1)
            cblas_sgemv(CblasRowMajor, CblasTrans, t + 1, hs, 1.0f, Vc + h * hs, C, s->scores, 1,
                        0.0f, s->att + h * hs, 1);
        }
        kd_conv1d_forward(s->tmp, s->att, param(m, "h.%d.attn.c_proj.weight", l),
                          param(m, "h.%d.attn.c_proj.bias", l), 1, C, C);
        for (int i = 0; i < C; i++) s->x[i] += s->tmp[i];
        kd_layernorm_forward(s->ln, &s->mean, &s->rstd, s->x, param(m, "h.%d.ln_2.weight", l),
                             param(m, "h.%d.ln_2.bias", l), 1, C, KD_GPT_LN_EPS);
        kd_conv1d_forward(s->fc, s->ln, param(m, "h.%d.mlp.c_fc.weight", l),
                          param(m, "h.%d.mlp.c_fc.bias", l), 1, C, 4 * C);
        kd_gelu_tanh_forward(s->fc_gelu, s->fc, 4 * (size_t)C);
        kd_conv1d_forward(s->tmp, s->fc_gelu, param(m, "h.%d.mlp.c_proj.weight", l),
                          param(m, "h.%d.mlp.c_proj.bias", l), 1, 4 * C, C);
        for (int i = 0; i < C; i++) s->x[i] += s->tmp[i];
    }
    kd_layernorm_forward(s->ln, &s->mean, &s->rstd, s->x, param(m, "ln_f.weight", 0),
                         param(m, "ln_f.bias", 0), 1, C, KD_GPT_LN_EPS);
    // logits (V) = wte (V,C) @ ln (C)
    cblas_sgemv(CblasRowMajor, CblasNoTrans, V, C, 1.0f, wte, C, s->ln, 1, 0.0f, s->logits, 1);
    s->pos++;
    return s->logits;
}

uint32_t kd_gpt_pick(const float *logits, int V, float temperature, int top_k, kd_rng_t *rng,
                     float *scratch) {
    int best = 0;
    for (int j = 1; j < V; j++)
        if (logits[j] > logits[best]) best = j;
    if (temperature <= 0.0f) return (uint32_t)best; /* greedy */
    /* the k-th largest logit bounds what may be drawn (ties at the bound included) */
    float floor = -INFINITY;
    if (top_k > 0 && top_k < V) {
        memcpy(scratch, logits, (size_t)V * sizeof(float));
        for (int i = 0; i < top_k; i++) { /* partial selection: k passes, k small */
            int at = i;
            for (int j = i + 1; j < V; j++)
                if (scratch[j] > scratch[at]) at = j;
            float keep = scratch[i];
            scratch[i] = scratch[at];
            scratch[at] = keep;
        }
        floor = scratch[top_k - 1];
    }
    double sum = 0.0;
    for (int j = 0; j < V; j++)
        sum += logits[j] >= floor ? exp((double)(logits[j] - logits[best]) / temperature) : 0.0;
    double u = (double)kd_rng_uniform(rng) * sum, acc = 0.0;
    for (int j = 0; j < V; j++) {
        if (logits[j] < floor) continue;
        acc += exp((double)(logits[j] - logits[best]) / temperature);
        if (acc > u) return (uint32_t)j;
    }
    return (uint32_t)best; /* u rounded to the very top */
}

size_t kd_gpt_generate(const kd_gpt_t *m, const uint32_t *prompt, size_t n_prompt, size_t n_new,
                       float temperature, int top_k, uint64_t seed, uint32_t *out) {
    KD_ASSERT(n_prompt >= 1);
    const size_t ctx = (size_t)m->cfg.context, V = (size_t)m->cfg.vocab;
    kd_gpt_sampler_t *s = kd_gpt_sampler_new(m);
    float *scratch = kd_alloc_floats(V);
    kd_rng_t rng;
    kd_rng_init(&rng, seed);
    uint32_t *all = kd_xmalloc((n_prompt + n_new) * sizeof *all);
    memcpy(all, prompt, n_prompt * sizeof *all);
    size_t n = n_prompt;
    /* a prompt longer than the context keeps its end */
    size_t start = n > ctx ? n - ctx : 0;
    const float *logits = NULL;
    for (size_t i = start; i < n; i++) logits = kd_gpt_sampler_step(s, all[i]);
    for (size_t k = 0; k < n_new; k++) {
        uint32_t next = kd_gpt_pick(logits, (int)V, temperature, top_k, &rng, scratch);
        out[k] = all[n++] = next;
        if (k + 1 == n_new) break;
        if ((size_t)kd_gpt_sampler_position(s) == ctx) { /* full: slide to the last half */
            kd_gpt_sampler_reset(s);
            for (size_t i = n - ctx / 2 - 1; i + 1 < n; i++) kd_gpt_sampler_step(s, all[i]);
        }
        logits = kd_gpt_sampler_step(s, next);
    }
    free(all);
    free(scratch);
    kd_gpt_sampler_destroy(&s);
    return n_new;
}

int kd_gpt_sample_text(const kd_gpt_t *m, const kd_tokenizer_t *tok, const uint32_t *prompt,
                       size_t n_prompt, bool with_prompt, size_t n_new, float temperature,
                       int top_k, uint64_t seed, char **text, size_t *len, char *err,
                       size_t errlen) {
    KD_ASSERT(n_prompt >= 1);
    *text = NULL;
    *len = 0;
    const size_t skip = with_prompt ? 0 : n_prompt;
    uint32_t *all = kd_xmalloc((n_prompt + n_new) * sizeof *all);
    memcpy(all, prompt, n_prompt * sizeof *all);
    if (n_new)
        kd_gpt_generate(m, prompt, n_prompt, n_new, temperature, top_k, seed, all + n_prompt);
    size_t kept = 0;
    for (size_t i = skip; i < n_prompt + n_new; i++)
        if (all[i] < (uint32_t)kd_tokenizer_vocab(tok)) all[kept++] = all[i];
    int rc = kd_tokenizer_decode(tok, all, kept, NULL, 0, len, err, errlen);
    if (rc == 0) {
        *text = kd_xmalloc(*len + 1);
        rc = kd_tokenizer_decode(tok, all, kept, *text, *len, len, err, errlen);
        (*text)[*len] = '\0';
    }
    free(all);
    return rc;
}
