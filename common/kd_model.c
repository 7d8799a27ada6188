/* kd_model: the sequential model (see kd_model.h): shape resolution and validation, the flat
 * parameter/gradient buffers, and forward/backward over the kd_kernels layer kernels.
 * The activation workspace grows with the largest batch seen; it is never shrunk. */
#include "kd_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_kernels.h"
#include "kd_rng.h"
#include "kd_util.h"

#define DROPOUT_STREAM 0x64726f70ULL /* "drop" */

struct kd_model_workspace {
    int cap;                          /* batch size the buffers hold */
    float *act[KD_MAX_LAYERS];        /* (cap, layer out) output of layer i; NULL for flatten */
    int32_t *pool_idx[KD_MAX_LAYERS]; /* (cap, layer out) maxpool argmax */
    float *mask[KD_MAX_LAYERS];       /* (cap, layer out) dropout scale per unit */
    float *grad[2];                   /* (cap, max layer in) ping-pong input gradients */
    float *scratch;                   /* conv2d im2col and reorder scratch */
    size_t scratch_floats;
    /* state of the last forward, for backward */
    const float *in[KD_MAX_LAYERS + 1]; /* in[i] = input of layer i; in[n] = logits */
    bool dropped[KD_MAX_LAYERS];        /* dropout layer i applied a mask */
    int B;
    bool ready;
};

static void ws_free_buffers(kd_model_workspace_t *ws) {
    for (int i = 0; i < KD_MAX_LAYERS; i++) {
        free(ws->act[i]);
        free(ws->pool_idx[i]);
        free(ws->mask[i]);
        ws->act[i] = ws->mask[i] = NULL;
        ws->pool_idx[i] = NULL;
    }
    free(ws->grad[0]);
    free(ws->grad[1]);
    free(ws->scratch);
    ws->grad[0] = ws->grad[1] = ws->scratch = NULL;
    ws->scratch_floats = 0;
    ws->cap = 0;
    ws->ready = false;
}

static kd_conv2d_t conv_dims(const kd_layer_t *L, int B) {
    return kd_conv2d_make(B, L->in.c, L->in.h, L->in.w, L->spec.out_channels, L->spec.kernel,
                          L->spec.kernel, L->spec.stride, L->spec.padding);
}

/* Grow every buffer to hold B samples. Old contents are dropped: a forward refills them. */
static void ws_reserve(kd_model_t *m, int B) {
    kd_model_workspace_t *ws = m->ws;
    if (B <= ws->cap) return;
    ws_free_buffers(ws);
    size_t max_in = 1;
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *L = &m->layers[i];
        size_t nout = (size_t)B * kd_shape_size(L->out);
        size_t nin = (size_t)B * kd_shape_size(L->in);
        if (nin > max_in) max_in = nin;
        /* relu runs in place except on the caller's x (only flatten/dropout before it) */
        bool needs_act = L->spec.kind != KD_LAYER_FLATTEN;
        if (L->spec.kind == KD_LAYER_RELU)
            for (int j = 0; j < i && needs_act; j++)
                needs_act = m->layers[j].spec.kind == KD_LAYER_FLATTEN ||
                            m->layers[j].spec.kind == KD_LAYER_DROPOUT;
        if (needs_act) ws->act[i] = kd_alloc_floats(nout);
        if (L->spec.kind == KD_LAYER_MAXPOOL2D)
            ws->pool_idx[i] = kd_xmalloc(nout * sizeof(int32_t));
        if (L->spec.kind == KD_LAYER_DROPOUT) ws->mask[i] = kd_alloc_floats(nout);
    }
    ws->grad[0] = kd_alloc_floats(max_in);
    ws->grad[1] = kd_alloc_floats(max_in);
    ws->cap = B;
}

static float *ws_scratch(kd_model_workspace_t *ws, size_t n) {
    if (n > ws->scratch_floats) {
        free(ws->scratch);
        ws->scratch = kd_alloc_floats(n);
        ws->scratch_floats = n;
    }
    return ws->scratch;
}

static int layer_err(char *err, size_t errlen, int i, kd_layer_kind_t kind, const char *what,
                     kd_shape_t s) {
    return kd_err(err, errlen, "layer %d (%s): %s (input is %dx%dx%d)", i, kd_layer_kind_name(kind),
                  what, s.c, s.h, s.w);
}

int kd_model_plan(const kd_layer_spec_t *specs, int n_specs, kd_shape_t input, kd_model_t *m,
                  char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    if (n_specs < 1 || n_specs > KD_MAX_LAYERS)
        return kd_err(err, errlen, "model: %d layers; a model needs 1 to %d layers", n_specs,
                      KD_MAX_LAYERS);
    if (input.c < 1 || input.h < 1 || input.w < 1 || kd_shape_size(input) > KD_MODEL_MAX_UNITS)
        return kd_err(err, errlen,
                      "model: input shape %dx%dx%d must be positive and at most %d values", input.c,
                      input.h, input.w, KD_MODEL_MAX_UNITS);
    m->n_layers = n_specs;
    m->input = input;
    kd_shape_t cur = input;
    /* A (C,1,1) model input counts as a flat vector; afterwards only flatten/linear flatten. */
    bool flat = input.h == 1 && input.w == 1;
    size_t off = 0;
    char msg[160];
#define LAYER_FAIL(...)                                                                            \
    do {                                                                                           \
        snprintf(msg, sizeof msg, __VA_ARGS__);                                                    \
        layer_err(err, errlen, i, s.kind, msg, cur);                                               \
        goto fail;                                                                                 \
    } while (0)
    for (int i = 0; i < n_specs; i++) {
        kd_layer_t *L = &m->layers[i];
        kd_layer_spec_t s = specs[i];
        L->in = cur;
        switch (s.kind) {
        case KD_LAYER_FLATTEN:
            cur = (kd_shape_t){(int)kd_shape_size(cur), 1, 1};
            flat = true;
            break;
        case KD_LAYER_LINEAR: {
            if (!flat) {
                kd_err(err, errlen,
                       "layer %d (linear): input is %dx%dx%d, add a flatten layer first", i, cur.c,
                       cur.h, cur.w);
                goto fail;
            }
            if (s.out_features < 1) {
                LAYER_FAIL("out_features must be >= 1, got %d", s.out_features);
            }
            int in_f = cur.c;
            L->weight_offset = off;
            L->weight_count = (size_t)s.out_features * in_f;
            off += L->weight_count;
            L->bias_offset = off;
            L->bias_count = (size_t)s.out_features;
            off += L->bias_count;
            L->weight_ndim = 2;
            L->weight_shape[0] = s.out_features;
            L->weight_shape[1] = in_f;
            cur = (kd_shape_t){s.out_features, 1, 1};
            break;
        }
        case KD_LAYER_CONV2D:
        case KD_LAYER_MAXPOOL2D: {
            bool conv = s.kind == KD_LAYER_CONV2D;
            if (flat) {
                LAYER_FAIL("needs a spatial C x H x W input, not a flat vector");
            }
            if (conv && s.out_channels < 1) {
                LAYER_FAIL("out_channels must be >= 1, got %d", s.out_channels);
            }
            if (s.kernel < 1) {
                LAYER_FAIL("kernel must be >= 1, got %d", s.kernel);
            }
            if (s.stride < 0) {
                LAYER_FAIL("stride must be >= 1, got %d", s.stride);
            }
            if (s.padding < 0 || (!conv && s.padding != 0)) {
                LAYER_FAIL("padding %d not supported (%s)", s.padding,
                           conv ? "must be >= 0" : "maxpool2d has no padding");
            }
            if (s.stride == 0) s.stride = conv ? 1 : s.kernel;
            if (cur.h + 2 * s.padding < s.kernel || cur.w + 2 * s.padding < s.kernel) {
                LAYER_FAIL("kernel %d does not fit with padding %d", s.kernel, s.padding);
            }
            int oh = (cur.h + 2 * s.padding - s.kernel) / s.stride + 1;
            int ow = (cur.w + 2 * s.padding - s.kernel) / s.stride + 1;
            if (conv) {
                L->weight_offset = off;
                L->weight_count = (size_t)s.out_channels * cur.c * s.kernel * s.kernel;
                off += L->weight_count;
                L->bias_offset = off;
                L->bias_count = (size_t)s.out_channels;
                off += L->bias_count;
                L->weight_ndim = 4;
                L->weight_shape[0] = s.out_channels;
                L->weight_shape[1] = cur.c;
                L->weight_shape[2] = s.kernel;
                L->weight_shape[3] = s.kernel;
                cur = (kd_shape_t){s.out_channels, oh, ow};
            } else {
                cur = (kd_shape_t){cur.c, oh, ow};
            }
            break;
        }
        case KD_LAYER_RELU:
        case KD_LAYER_GELU:
            break;
        case KD_LAYER_DROPOUT:
            if (!(s.p >= 0.0f && s.p < 1.0f)) {
                LAYER_FAIL("p must be in [0, 1), got %g", (double)s.p);
            }
            break;
        default:
            kd_err(err, errlen, "layer %d: unknown layer kind %d", i, (int)s.kind);
            goto fail;
        }
        L->spec = s;
        L->out = cur;
        if (off > KD_MODEL_MAX_PARAMS) {
            LAYER_FAIL("the model has more than %d parameters", KD_MODEL_MAX_PARAMS);
        }
        if (kd_shape_size(cur) > KD_MODEL_MAX_UNITS || cur.c < 1 || cur.h < 1 || cur.w < 1) {
            LAYER_FAIL("an output of more than %d values per sample", KD_MODEL_MAX_UNITS);
        }
    }
    if (!flat) {
        int i = n_specs - 1;
        kd_err(err, errlen,
               "layer %d (%s): the model's output is %dx%dx%d; the last output must be flat "
               "(add flatten and a linear layer)",
               i, kd_layer_kind_name(specs[i].kind), cur.c, cur.h, cur.w);
        goto fail;
    }
    m->num_classes = cur.c;
    m->n_params = off;
    return 0;

fail:
#undef LAYER_FAIL
    return -1;
}

int kd_model_new(const kd_layer_spec_t *specs, int n_specs, kd_shape_t input, kd_model_t **out,
                 char *err, size_t errlen) {
    *out = NULL;
    kd_model_t *m = kd_xcalloc(1, sizeof *m);
    if (kd_model_plan(specs, n_specs, input, m, err, errlen) != 0) {
        free(m);
        return -1;
    }
    m->params = kd_alloc_floats(m->n_params);
    m->grads = kd_alloc_floats(m->n_params);
    m->ws = kd_xcalloc(1, sizeof *m->ws);
    *out = m;
    return 0;
}

double kd_model_train_bytes_gpt(const kd_gpt_config_t *c, long B) {
    /* per window: ~16 (N,C)-sized activations a layer, attention, the head chunk */
    double T = c->context, C = c->width, per_layer = 16.0 * T * C + c->heads * T * T;
    return 4.0 * (2.0 * (double)kd_gpt_param_count(c) + (double)B * c->layers * per_layer +
                  (double)kd_gpt_head_chunk(c->vocab) * c->vocab);
}

double kd_model_train_bytes(const kd_model_t *m, long B) {
    if (m->gpt) return kd_model_train_bytes_gpt(&m->gpt->cfg, B);
    double units = 0, max_in = 1;
    for (int i = 0; i < m->n_layers; i++) {
        units += (double)kd_shape_size(m->layers[i].out);
        if ((double)kd_shape_size(m->layers[i].in) > max_in)
            max_in = (double)kd_shape_size(m->layers[i].in);
    }
    /* params and grads; per sample an activation, a mask or argmax per layer output, and the
     * two input-gradient buffers (ws_reserve); conv scratch is below that */
    return 4.0 * (2.0 * (double)m->n_params + (double)B * (2.0 * units + 2.0 * max_in));
}

int kd_model_new_gpt(const kd_gpt_config_t *cfg, kd_model_t **out, char *err, size_t errlen) {
    *out = NULL;
    kd_gpt_t *g = NULL;
    if (kd_gpt_new(cfg, &g, err, errlen) != 0) return -1;
    kd_model_t *m = kd_xcalloc(1, sizeof *m);
    m->gpt = g;
    m->input = (kd_shape_t){1, 1, cfg->context + 1};
    m->num_classes = cfg->vocab;
    m->n_params = g->n_params;
    m->params = g->params;
    m->grads = g->grads;
    *out = m;
    return 0;
}

int kd_model_new_like(const kd_model_t *m, kd_model_t **out, char *err, size_t errlen) {
    if (m->gpt) return kd_model_new_gpt(&m->gpt->cfg, out, err, errlen);
    kd_layer_spec_t specs[KD_MAX_LAYERS];
    for (int i = 0; i < m->n_layers; i++) specs[i] = m->layers[i].spec;
    return kd_model_new(specs, m->n_layers, m->input, out, err, errlen);
}

void kd_model_set_params(kd_model_t *m, float *params) {
    m->params = params;
    if (m->gpt) m->gpt->params = params;
}

void kd_model_set_grads(kd_model_t *m, float *grads) {
    m->grads = grads;
    if (m->gpt) m->gpt->grads = grads;
}

void kd_model_destroy(kd_model_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_model_t *m = *self_p;
    if (m->gpt) { /* params and grads are the GPT's */
        kd_gpt_destroy(&m->gpt);
        free(m);
        *self_p = NULL;
        return;
    }
    if (m->ws) ws_free_buffers(m->ws);
    free(m->ws);
    free(m->params);
    free(m->grads);
    free(m);
    *self_p = NULL;
}

void kd_model_init_params(kd_model_t *m, uint64_t seed) {
    if (m->gpt) {
        kd_gpt_init_params(m->gpt, seed);
        return;
    }
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *L = &m->layers[i];
        if (!L->weight_count) continue;
        size_t fan_in = L->weight_count / (size_t)L->weight_shape[0];
        float bound = (float)(1.0 / sqrt((double)fan_in));
        /* One stream per tensor, so a layer's values do not depend on the layers before it. */
        kd_rng_t rng;
        kd_rng_init(&rng, kd_rng_key(seed, (uint64_t)i, 0));
        float *w = m->params + L->weight_offset;
        for (size_t k = 0; k < L->weight_count; k++)
            w[k] = (2.0f * kd_rng_uniform(&rng) - 1.0f) * bound;
        kd_rng_init(&rng, kd_rng_key(seed, (uint64_t)i, 1));
        float *b = m->params + L->bias_offset;
        for (size_t k = 0; k < L->bias_count; k++)
            b[k] = (2.0f * kd_rng_uniform(&rng) - 1.0f) * bound;
    }
}

const float *kd_model_forward(kd_model_t *m, const float *x, int B, bool train,
                              uint64_t dropout_key) {
    KD_ASSERT(B >= 1 && x);
    kd_model_workspace_t *ws = m->ws;
    ws_reserve(m, B);
    ws->in[0] = x;
    for (int i = 0; i < m->n_layers; i++) {
        double t0 = kd_now();
        const kd_layer_t *L = &m->layers[i];
        const float *in = ws->in[i];
        float *out = ws->act[i];
        size_t n_out = (size_t)B * kd_shape_size(L->out);
        const float *W = m->params + L->weight_offset, *bias = m->params + L->bias_offset;
        ws->in[i + 1] = out;
        switch (L->spec.kind) {
        case KD_LAYER_FLATTEN:
            ws->in[i + 1] = in; /* NCHW is already the flattened (B, C*H*W) order */
            break;
        case KD_LAYER_LINEAR:
            kd_linear_forward(out, in, W, bias, B, L->in.c, L->out.c);
            break;
        case KD_LAYER_CONV2D: {
            kd_conv2d_t d = conv_dims(L, B);
            int g = kd_conv2d_default_group(&d);
            float *scratch = ws_scratch(ws, kd_conv2d_scratch_floats(&d, g));
            kd_conv2d_forward(out, in, W, bias, &d, g, scratch);
            break;
        }
        case KD_LAYER_MAXPOOL2D:
            kd_maxpool2d_forward(out, ws->pool_idx[i], in, B * L->in.c, L->in.h, L->in.w,
                                 L->spec.kernel, L->spec.stride);
            break;
        case KD_LAYER_RELU:
            /* In place saves a pass over memory: no layer's backward needs a relu's input, as
             * linear/conv/gelu keep their own inputs, maxpool/dropout their indices/masks, and a
             * relu of a relu output changes nothing. */
            if (in != x) ws->in[i + 1] = out = (float *)in;
            kd_relu_forward(out, in, n_out);
            break;
        case KD_LAYER_GELU:
            kd_gelu_forward(out, in, n_out);
            break;
        case KD_LAYER_DROPOUT:
            ws->dropped[i] = train && L->spec.p > 0.0f;
            if (ws->dropped[i])
                kd_dropout_forward(out, ws->mask[i], in, n_out, L->spec.p,
                                   kd_rng_key(dropout_key, (uint64_t)i, DROPOUT_STREAM));
            else
                ws->in[i + 1] = in;
            break;
        default:
            KD_ASSERT(!"unknown layer kind");
        }
        m->forward_seconds[i] += kd_now() - t0;
    }
    ws->B = B;
    ws->ready = true;
    return ws->in[m->n_layers];
}

void kd_model_backward(kd_model_t *m, const float *dlogits) {
    kd_model_workspace_t *ws = m->ws;
    KD_ASSERT(ws->ready && dlogits);
    const int B = ws->B;
    /* Input gradients are needed only above the first layer with parameters. */
    int first = m->n_layers;
    for (int i = 0; i < m->n_layers; i++)
        if (m->layers[i].weight_count) {
            first = i;
            break;
        }
    const float *d = dlogits;
    for (int i = m->n_layers - 1; i >= first; i--) {
        double t0 = kd_now();
        const kd_layer_t *L = &m->layers[i];
        float *dinp = i > first ? (d == ws->grad[0] ? ws->grad[1] : ws->grad[0]) : NULL;
        /* elementwise layers work in place on our own gradient buffers */
        bool elementwise = L->spec.kind == KD_LAYER_RELU || L->spec.kind == KD_LAYER_DROPOUT;
        if (dinp && elementwise && d != dlogits) dinp = (float *)d;
        size_t n_in = (size_t)B * kd_shape_size(L->in);
        const float *W = m->params + L->weight_offset;
        float *dW = m->grads + L->weight_offset, *db = m->grads + L->bias_offset;
        switch (L->spec.kind) {
        case KD_LAYER_FLATTEN:
            dinp = (float *)d; /* alias: the gradient is the same memory, reshaped */
            break;
        case KD_LAYER_LINEAR:
            kd_linear_backward(dinp, dW, db, d, ws->in[i], W, B, L->in.c, L->out.c);
            break;
        case KD_LAYER_CONV2D: {
            kd_conv2d_t cd = conv_dims(L, B);
            int g = kd_conv2d_default_group(&cd);
            float *scratch = ws_scratch(ws, kd_conv2d_scratch_floats(&cd, g));
            kd_conv2d_backward(dinp, dW, db, d, ws->in[i], W, &cd, g, scratch);
            break;
        }
        case KD_LAYER_MAXPOOL2D:
            kd_maxpool2d_backward(dinp, d, ws->pool_idx[i], B * L->in.c, L->in.h, L->in.w, L->out.h,
                                  L->out.w);
            break;
        case KD_LAYER_RELU:
            kd_relu_backward(dinp, d, ws->in[i + 1], n_in);
            break;
        case KD_LAYER_GELU:
            kd_gelu_backward(dinp, d, ws->in[i], n_in);
            break;
        case KD_LAYER_DROPOUT:
            if (ws->dropped[i])
                kd_dropout_backward(dinp, d, ws->mask[i], n_in);
            else
                dinp = (float *)d;
            break;
        default:
            KD_ASSERT(!"unknown layer kind");
        }
        d = dinp;
        m->backward_seconds[i] += kd_now() - t0;
    }
}

double kd_model_forward_flops(const kd_model_t *m) {
    if (m->gpt) return kd_gpt_forward_flops(&m->gpt->cfg, m->gpt->cfg.context);
    double macs = 0.0;
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *L = &m->layers[i];
        if (L->spec.kind == KD_LAYER_LINEAR || L->spec.kind == KD_LAYER_CONV2D)
            macs += (double)L->weight_count * L->out.h * L->out.w;
    }
    return macs;
}

void kd_set_threads(int n) {
    if (n <= 0) {
        const char *env = getenv("OPENBLAS_NUM_THREADS");
        long v = 0;
        if (!env || kd_parse_long(env, &v) != 0 || v < 1) v = openblas_get_num_procs();
        n = (int)v;
    }
    openblas_set_num_threads(n);
}
