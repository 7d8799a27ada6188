/* kd_gpt_hf: GPT checkpoints in Hugging Face's GPT-2 layout (see kd_gpt.h): safetensors with
 * the names of GPT2Model's state_dict (with or without GPT2LMHeadModel's `transformer.`
 * prefix), and a model directory's config.json. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_gpt.h"
#include "kd_safetensors.h"
#include "kd_util.h"

#define PREFIX "transformer."

static bool is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* ---- config.json -------------------------------------------------------------------------- */

static int config_int(const char *path, json_t *root, const char *key, const char *alt, int *out,
                      char *err, size_t errlen) {
    json_t *v = json_object_get(root, key);
    if (!v && alt) v = json_object_get(root, alt);
    if (!v) return kd_err(err, errlen, "%s: field '%s' is missing", path, key);
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 30))
        return kd_err(err, errlen, "%s: field '%s' must be a positive integer", path, key);
    *out = (int)json_integer_value(v);
    return 0;
}

int kd_gpt_config_read(const char *path, kd_gpt_config_t *cfg, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        if (!kd_file_exists(path))
            return kd_err(err, errlen, "%s: cannot read: no such file", path);
        return kd_err(err, errlen, "%s:%d:%d: not valid JSON: %s", path, jerr.line, jerr.column,
                      jerr.text);
    }
    int rc = -1;
    kd_gpt_config_t c = {0};
    if (!json_is_object(root)) {
        kd_err(err, errlen, "%s: not a JSON object", path);
        goto out;
    }
    json_t *type = json_object_get(root, "model_type");
    if (type && (!json_is_string(type) || strcmp(json_string_value(type), "gpt2") != 0)) {
        kd_err(err, errlen, "%s: model_type is %s; kdist reads GPT-2 models (\"gpt2\")", path,
               json_is_string(type) ? json_string_value(type) : "not a string");
        goto out;
    }
    if (config_int(path, root, "n_layer", NULL, &c.layers, err, errlen) != 0 ||
        config_int(path, root, "n_embd", NULL, &c.width, err, errlen) != 0 ||
        config_int(path, root, "n_head", NULL, &c.heads, err, errlen) != 0 ||
        config_int(path, root, "n_positions", "n_ctx", &c.context, err, errlen) != 0 ||
        config_int(path, root, "vocab_size", NULL, &c.vocab, err, errlen) != 0)
        goto out;
    /* The maths kdist has: tanh GELU, layernorm eps 1e-5, no inner size but 4 n_embd. */
    json_t *act = json_object_get(root, "activation_function");
    if (act && (!json_is_string(act) || (strcmp(json_string_value(act), "gelu_new") != 0 &&
                                         strcmp(json_string_value(act), "gelu_pytorch_tanh")))) {
        kd_err(err, errlen, "%s: activation_function %s; kdist's GPT uses gelu_new (tanh)", path,
               json_is_string(act) ? json_string_value(act) : "is not a string");
        goto out;
    }
    json_t *eps = json_object_get(root, "layer_norm_epsilon");
    if (eps && (!json_is_number(eps) || fabs(json_number_value(eps) - KD_GPT_LN_EPS) > 1e-9)) {
        kd_err(err, errlen, "%s: layer_norm_epsilon must be 1e-05, as kdist's GPT has it", path);
        goto out;
    }
    json_t *inner = json_object_get(root, "n_inner");
    if (inner && !json_is_null(inner) &&
        (!json_is_integer(inner) || json_integer_value(inner) != 4 * (json_int_t)c.width)) {
        kd_err(err, errlen, "%s: n_inner must be null or 4 n_embd (%d)", path, 4 * c.width);
        goto out;
    }
    char why[KD_ERR_LEN];
    if (kd_gpt_config_check(&c, why, sizeof why) != 0) {
        kd_err(err, errlen, "%s: %s", path, why);
        goto out;
    }
    *cfg = c;
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int kd_gpt_config_write(const kd_gpt_config_t *c, const char *path, char *err, size_t errlen) {
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", "GPT2LMHeadModel"));
    json_object_set_new(j, "model_type", json_string("gpt2"));
    json_object_set_new(j, "n_layer", json_integer(c->layers));
    json_object_set_new(j, "n_embd", json_integer(c->width));
    json_object_set_new(j, "n_head", json_integer(c->heads));
    json_object_set_new(j, "n_positions", json_integer(c->context));
    json_object_set_new(j, "n_ctx", json_integer(c->context));
    json_object_set_new(j, "vocab_size", json_integer(c->vocab));
    json_object_set_new(j, "n_inner", json_null());
    json_object_set_new(j, "activation_function", json_string("gelu_new"));
    json_object_set_new(j, "layer_norm_epsilon", json_real(KD_GPT_LN_EPS));
    json_object_set_new(j, "resid_pdrop", json_real(c->dropout));
    json_object_set_new(j, "embd_pdrop", json_real(c->dropout));
    json_object_set_new(j, "attn_pdrop", json_real(0.0));
    json_object_set_new(j, "initializer_range", json_real(0.02));
    json_object_set_new(j, "tie_word_embeddings", json_true());
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_REAL_PRECISION(9));
    json_decref(j);
    KD_ASSERT(text);
    size_t len = strlen(text);
    text[len] = '\n'; /* json_dumps leaves room for the NUL: replace it, write len + 1 */
    int rc = kd_write_file_atomic(path, text, len + 1, err, errlen);
    free(text);
    return rc;
}

/* config.json (when the checkpoint has one) must describe the model the recipe asks for. */
static int check_config(const char *cfg_path, const kd_gpt_config_t *want, char *err,
                        size_t errlen) {
    kd_gpt_config_t got;
    if (kd_gpt_config_read(cfg_path, &got, err, errlen) != 0) return -1;
    struct {
        const char *key, *recipe;
        int got, want;
    } f[] = {{"n_layer", "layers", got.layers, want->layers},
             {"n_embd", "width", got.width, want->width},
             {"n_head", "heads", got.heads, want->heads},
             {"n_positions", "context", got.context, want->context},
             {"vocab_size", "vocab", got.vocab, want->vocab}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].got != f[i].want)
            return kd_err(err, errlen, "%s: %s is %d but the recipe's model has %s %d", cfg_path,
                          f[i].key, f[i].got, f[i].recipe, f[i].want);
    return 0;
}

/* ---- safetensors -------------------------------------------------------------------------- */

int kd_gpt_resolve_path(const char *path, char *st_path, size_t st_len, char *cfg_path,
                        size_t cfg_len) {
    if (is_dir(path)) { /* a Hugging Face directory, or a kdist run's */
        snprintf(st_path, st_len, "%s/model.safetensors", path);
        if (!kd_file_exists(st_path)) snprintf(st_path, st_len, "%s/student.safetensors", path);
        if (!kd_file_exists(st_path)) snprintf(st_path, st_len, "%s/model.safetensors", path);
        snprintf(cfg_path, cfg_len, "%s/config.json", path);
    } else {
        snprintf(st_path, st_len, "%s", path);
        /* a file in a directory may have its config.json beside it (kd_gpt_save writes one) */
        const char *slash = strrchr(path, '/');
        if (!slash) {
            cfg_path[0] = 0;
            return 0;
        }
        snprintf(cfg_path, cfg_len, "%.*s/config.json", (int)(slash - path), path);
    }
    return kd_file_exists(cfg_path) ? 1 : 0;
}

/* The file's tensor for table entry t: with or without the prefix. */
static const kd_st_tensor_t *find_named(const kd_safetensors_t *st, const char *name) {
    const kd_st_tensor_t *t = kd_st_find(st, name);
    if (t) return t;
    char full[KD_GPT_TENSOR_NAME + sizeof PREFIX];
    snprintf(full, sizeof full, PREFIX "%s", name);
    return kd_st_find(st, full);
}

/* What a checkpoint may carry besides the parameters: the attention-mask buffers of older hub
 * files, the optimizer state and ledger of kdist's own run checkpoints. (lm_head.weight is
 * checked against wte.weight.) */
static bool tolerated(const char *name) {
    if (strncmp(name, "optim.", 6) == 0 || strncmp(name, "ledger.", 7) == 0) return true;
    if (strncmp(name, PREFIX, strlen(PREFIX)) == 0) name += strlen(PREFIX);
    const char *dot = strstr(name, ".attn.");
    return strncmp(name, "h.", 2) == 0 && dot &&
           (strcmp(dot, ".attn.bias") == 0 || strcmp(dot, ".attn.masked_bias") == 0);
}

static int check_tensor(const kd_safetensors_t *st, const kd_gpt_tensor_t *want,
                        const kd_st_tensor_t *t, char *err, size_t errlen) {
    if (!t)
        return kd_err(err, errlen, "%s: tensor '%s' is missing (the recipe's model needs it)",
                      kd_st_path(st), want->name);
    if (t->dtype != KD_DTYPE_F32)
        return kd_err(err, errlen, "%s: tensor '%s' has dtype %s, kdist needs F32", kd_st_path(st),
                      t->name, kd_dtype_name(t->dtype));
    bool same = t->ndim == want->ndim;
    for (int d = 0; same && d < want->ndim; d++) same = t->shape[d] == want->shape[d];
    if (!same) {
        char got[160], exp[160];
        kd_st_format_shape(got, sizeof got, t->ndim, t->shape);
        kd_st_format_shape(exp, sizeof exp, want->ndim, want->shape);
        return kd_err(err, errlen, "%s: tensor '%s' has shape %s, the recipe's model expects %s",
                      kd_st_path(st), t->name, got, exp);
    }
    return 0;
}

int kd_gpt_load_tensors(kd_gpt_t *m, const kd_safetensors_t *st, char *err, size_t errlen) {
    const char *path = kd_st_path(st);
    /* Everything is checked before anything is copied: a bad file leaves m as it was. */
    for (int i = 0; i < m->n_tensors; i++)
        if (check_tensor(st, &m->tensors[i], find_named(st, m->tensors[i].name), err, errlen) != 0)
            return -1;
    const kd_st_tensor_t *wte = find_named(st, "wte.weight");
    for (int k = 0; k < kd_st_count(st); k++) {
        const kd_st_tensor_t *t = kd_st_tensor(st, k);
        const char *bare =
            strncmp(t->name, PREFIX, strlen(PREFIX)) == 0 ? t->name + strlen(PREFIX) : t->name;
        if (kd_gpt_find(m, bare) || tolerated(t->name)) continue;
        if (strcmp(t->name, "lm_head.weight") == 0) {
            /* the head is tied to wte: an untied head cannot load into this model */
            if (t->dtype != wte->dtype || t->nbytes != wte->nbytes ||
                memcmp(kd_st_data(st, t), kd_st_data(st, wte), t->nbytes) != 0)
                return kd_err(err, errlen,
                              "%s: lm_head.weight differs from wte.weight; kdist's GPT ties the "
                              "head to the token embedding",
                              path);
            continue;
        }
        return kd_err(err, errlen,
                      "%s: unexpected tensor '%s' (not part of a GPT-2 with %d layers)", path,
                      t->name, m->cfg.layers);
    }
    float *staged = kd_alloc_floats(m->n_params);
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_st_tensor_t *t = find_named(st, m->tensors[i].name);
        KD_ASSERT(t->nbytes == m->tensors[i].count * sizeof(float));
        memcpy(staged + m->tensors[i].offset, kd_st_data(st, t), t->nbytes);
    }
    size_t bad = kd_first_nonfinite(staged, m->n_params);
    for (int i = 0; bad < m->n_params && i < m->n_tensors; i++)
        if (bad >= m->tensors[i].offset && bad < m->tensors[i].offset + m->tensors[i].count) {
            kd_err(err, errlen, "%s: tensor '%s' holds a non-finite value at index %zu", path,
                   m->tensors[i].name, bad - m->tensors[i].offset);
            free(staged);
            return -1;
        }
    memcpy(m->params, staged, m->n_params * sizeof(float));
    free(staged);
    return 0;
}

int kd_gpt_load(kd_gpt_t *m, const char *path, char *err, size_t errlen) {
    char st_path[KD_PATH_MAX + 32], cfg_path[KD_PATH_MAX + 32];
    if (kd_gpt_resolve_path(path, st_path, sizeof st_path, cfg_path, sizeof cfg_path) == 1 &&
        check_config(cfg_path, &m->cfg, err, errlen) != 0)
        return -1;
    kd_safetensors_t *st = NULL;
    if (kd_st_open(st_path, &st, err, errlen) != 0) return -1;
    int rc = kd_gpt_load_tensors(m, st, err, errlen);
    kd_st_close(&st);
    return rc;
}

void kd_gpt_add_tensors(kd_st_writer_t *w, const kd_gpt_t *m) {
    for (int i = 0; i < m->n_tensors; i++) {
        const kd_gpt_tensor_t *t = &m->tensors[i];
        kd_st_writer_add(w, t->name, KD_DTYPE_F32, t->ndim, t->shape, m->params + t->offset);
    }
}

int kd_gpt_save(const kd_gpt_t *m, const char *path, char *err, size_t errlen) {
    size_t bad = kd_first_nonfinite(m->params, m->n_params);
    if (bad < m->n_params)
        return kd_err(err, errlen, "%s: not saved: parameter %zu is not finite", path, bad);
    kd_st_writer_t *w = kd_st_writer_new();
    kd_gpt_add_tensors(w, m);
    kd_st_writer_metadata(w, "format", "pt");
    int rc = kd_st_writer_write(w, path, err, errlen);
    kd_st_writer_destroy(&w);
    if (rc != 0) return -1;
    /* config.json beside it, so the directory is a Hugging Face model */
    char cfg_path[KD_PATH_MAX + 32], ignored[KD_PATH_MAX + 32];
    kd_gpt_resolve_path(path, ignored, sizeof ignored, cfg_path, sizeof cfg_path);
    return kd_gpt_config_write(&m->cfg, cfg_path, err, errlen);
}
