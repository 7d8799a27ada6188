/* kd_checkpoint: a model's flat parameter buffer <-> safetensors tensors named as PyTorch's
 * nn.Sequential state_dict names them. Borrows the model; keeps no state; thread-safe as long
 * as the model is not changed meanwhile. */
#include "kd_checkpoint.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_util.h"

_Static_assert(sizeof(float) == 4, "F32 tensors are copied as floats");
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; kd_checkpoint copies it as is"
#endif

/* Appends to out at *pos, never past outlen (truncates silently, always NUL-terminated). */
static void appendf(char *out, size_t outlen, size_t *pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void appendf(char *out, size_t outlen, size_t *pos, const char *fmt, ...) {
    if (*pos >= outlen) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + *pos, outlen - *pos, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    *pos += (size_t)n;
    if (*pos >= outlen) *pos = outlen;
}

void kd_model_describe(const kd_model_t *m, char *out, size_t outlen) {
    if (!out || outlen == 0) return;
    out[0] = 0;
    size_t pos = 0;
    if (m->gpt) {
        const kd_gpt_config_t *c = &m->gpt->cfg;
        appendf(out, outlen, &pos, "gpt:layers=%d,width=%d,heads=%d,context=%d,vocab=%d", c->layers,
                c->width, c->heads, c->context, c->vocab);
        return;
    }
    appendf(out, outlen, &pos, "input=%dx%dx%d", m->input.c, m->input.h, m->input.w);
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_spec_t *s = &m->layers[i].spec;
        appendf(out, outlen, &pos, ";%s", kd_layer_kind_name(s->kind));
        switch (s->kind) {
        case KD_LAYER_LINEAR:
            appendf(out, outlen, &pos, ":%d", s->out_features);
            break;
        case KD_LAYER_CONV2D:
            appendf(out, outlen, &pos, ":%d,%d,%d,%d", s->out_channels, s->kernel, s->stride,
                    s->padding);
            break;
        case KD_LAYER_MAXPOOL2D:
            appendf(out, outlen, &pos, ":%d,%d", s->kernel, s->stride ? s->stride : s->kernel);
            break;
        case KD_LAYER_DROPOUT:
            appendf(out, outlen, &pos, ":%g", (double)s->p);
            break;
        default:
            break;
        }
    }
}

static void weight_shape(const kd_layer_t *l, int *ndim, int64_t shape[4]) {
    *ndim = l->weight_ndim;
    for (int d = 0; d < l->weight_ndim; d++) shape[d] = l->weight_shape[d];
}

static void bias_shape(const kd_layer_t *l, int *ndim, int64_t shape[4]) {
    *ndim = 1;
    shape[0] = (int64_t)l->bias_count;
}

void kd_checkpoint_add_model(kd_st_writer_t *w, const kd_model_t *m) {
    if (m->gpt) kd_gpt_add_tensors(w, m->gpt);
    char name[64];
    int64_t shape[4];
    int ndim;
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *l = &m->layers[i];
        if (l->weight_count) {
            weight_shape(l, &ndim, shape);
            snprintf(name, sizeof name, "layers.%d.weight", i);
            kd_st_writer_add(w, name, KD_DTYPE_F32, ndim, shape, m->params + l->weight_offset);
        }
        if (l->bias_count) {
            bias_shape(l, &ndim, shape);
            snprintf(name, sizeof name, "layers.%d.bias", i);
            kd_st_writer_add(w, name, KD_DTYPE_F32, ndim, shape, m->params + l->bias_offset);
        }
    }
    char desc[4096];
    kd_model_describe(m, desc, sizeof desc);
    kd_st_writer_metadata(w, "kdist.model", desc);
    /* torch's safetensors writer marks its files so; loaders (transformers) look for it. */
    kd_st_writer_metadata(w, "format", "pt");
}

int kd_checkpoint_check_finite(const kd_model_t *m, const char *path, char *err, size_t errlen) {
    size_t bad = kd_first_nonfinite(m->params, m->n_params);
    if (bad == m->n_params) return 0;
    return kd_err(err, errlen,
                  "%s: not written: parameter %zu of %zu is %g (the weights are not finite: "
                  "training diverged; try a lower optim.lr)",
                  path, bad, m->n_params, (double)m->params[bad]);
}

int kd_checkpoint_save(const kd_model_t *m, const char *path, char *err, size_t errlen) {
    if (m->gpt) return kd_gpt_save(m->gpt, path, err, errlen); /* with its config.json */
    if (kd_checkpoint_check_finite(m, path, err, errlen) != 0) return -1;
    kd_st_writer_t *w = kd_st_writer_new();
    kd_checkpoint_add_model(w, m);
    int rc = kd_st_writer_write(w, path, err, errlen);
    kd_st_writer_destroy(&w);
    return rc;
}

/* The tensor for one parameter of m must exist, be F32 and have exactly the expected shape. */
static int check_param(const kd_safetensors_t *st, const char *name, int ndim, const int64_t *shape,
                       char *err, size_t errlen) {
    const kd_st_tensor_t *t = kd_st_find(st, name);
    if (!t)
        return kd_err(err, errlen, "%s: tensor '%s' is missing (the recipe's model needs it)",
                      kd_st_path(st), name);
    if (t->dtype != KD_DTYPE_F32)
        return kd_err(err, errlen, "%s: tensor '%s' has dtype %s, kdist needs F32", kd_st_path(st),
                      name, kd_dtype_name(t->dtype));
    bool same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char got[160], want[160];
        kd_st_format_shape(got, sizeof got, t->ndim, t->shape);
        kd_st_format_shape(want, sizeof want, ndim, shape);
        return kd_err(err, errlen, "%s: tensor '%s' has shape %s, the recipe's model expects %s",
                      kd_st_path(st), name, got, want);
    }
    return 0;
}

/* A `layers.*` tensor of the file must name a parameter that m has. */
static int check_known(const kd_model_t *m, const kd_safetensors_t *st, const char *name, char *err,
                       size_t errlen) {
    const char *rest = name + strlen("layers.");
    char *end;
    long i = strtol(rest, &end, 10);
    bool digits = end != rest && rest[0] >= '0' && rest[0] <= '9';
    if (!digits || i < 0 || i >= m->n_layers || (rest[0] == '0' && end != rest + 1))
        return kd_err(err, errlen,
                      "%s: unexpected tensor '%s' (the recipe's model has %d layers, numbered "
                      "0..%d)",
                      kd_st_path(st), name, m->n_layers, m->n_layers - 1);
    const kd_layer_t *l = &m->layers[i];
    bool ok = (strcmp(end, ".weight") == 0 && l->weight_count) ||
              (strcmp(end, ".bias") == 0 && l->bias_count);
    if (!ok)
        return kd_err(err, errlen,
                      "%s: unexpected tensor '%s' (layer %ld of the recipe's model is %s, which "
                      "has no such parameter)",
                      kd_st_path(st), name, i, kd_layer_kind_name(l->spec.kind));
    return 0;
}

int kd_checkpoint_load_into(kd_model_t *m, const kd_safetensors_t *st, char *err, size_t errlen) {
    if (m->gpt) return kd_gpt_load_tensors(m->gpt, st, err, errlen);
    char name[64];
    int64_t shape[4];
    int ndim;
    /* Check everything first, so a bad file leaves m as it was. */
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *l = &m->layers[i];
        if (l->weight_count) {
            weight_shape(l, &ndim, shape);
            snprintf(name, sizeof name, "layers.%d.weight", i);
            if (check_param(st, name, ndim, shape, err, errlen) != 0) return -1;
        }
        if (l->bias_count) {
            bias_shape(l, &ndim, shape);
            snprintf(name, sizeof name, "layers.%d.bias", i);
            if (check_param(st, name, ndim, shape, err, errlen) != 0) return -1;
        }
    }
    for (int k = 0; k < kd_st_count(st); k++) {
        const kd_st_tensor_t *t = kd_st_tensor(st, k);
        if (strncmp(t->name, "layers.", 7) != 0) continue; /* optimizer state, extras */
        if (check_known(m, st, t->name, err, errlen) != 0) return -1;
    }
    for (int i = 0; i < m->n_layers; i++) {
        const kd_layer_t *l = &m->layers[i];
        if (l->weight_count) {
            snprintf(name, sizeof name, "layers.%d.weight", i);
            const kd_st_tensor_t *t = kd_st_find(st, name);
            KD_ASSERT(t->nbytes == l->weight_count * sizeof(float));
            memcpy(m->params + l->weight_offset, kd_st_data(st, t), t->nbytes);
        }
        if (l->bias_count) {
            snprintf(name, sizeof name, "layers.%d.bias", i);
            const kd_st_tensor_t *t = kd_st_find(st, name);
            KD_ASSERT(t->nbytes == l->bias_count * sizeof(float));
            memcpy(m->params + l->bias_offset, kd_st_data(st, t), t->nbytes);
        }
    }
    return 0;
}

int kd_checkpoint_load(kd_model_t *m, const char *path, char *err, size_t errlen) {
    if (m->gpt) return kd_gpt_load(m->gpt, path, err, errlen); /* a file or a model directory */
    kd_safetensors_t *st = NULL;
    if (kd_st_open(path, &st, err, errlen) != 0) return -1;
    int rc = kd_checkpoint_load_into(m, st, err, errlen);
    kd_st_close(&st);
    return rc;
}
