/* kd_model: a sequential network built from a layer list (DESIGN §5), with PyTorch's shape
 * conventions (NCHW; linear weight [out, in]; conv weight [out, in, kh, kw]). Parameters and
 * gradients each live in one flat float buffer with an offset table, so an optimizer step,
 * a network send and a checkpoint are single loops or copies (llm.c style).
 * A model owns its buffers and activation workspace; it is not thread-safe (one per thread). */
#ifndef KD_MODEL_H
#define KD_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_gpt.h"

#define KD_MAX_LAYERS 64
/* What one weights frame (KD_WIRE_MAX_MESSAGE, 2 GiB) can carry, and values per sample of any
 * layer's input or output: beyond these a model is refused, before anything is allocated. */
#define KD_MODEL_MAX_PARAMS (1 << 29)
#define KD_MODEL_MAX_UNITS  (1 << 28)

typedef enum {
    KD_LAYER_FLATTEN = 0,
    KD_LAYER_LINEAR,
    KD_LAYER_CONV2D,
    KD_LAYER_MAXPOOL2D,
    KD_LAYER_RELU,
    KD_LAYER_GELU,
    KD_LAYER_DROPOUT,
    KD_LAYER_KIND_COUNT
} kd_layer_kind_t;

/* Names as the recipe spells them: "flatten", "linear", ... */
const char *kd_layer_kind_name(kd_layer_kind_t kind);
int kd_layer_kind_parse(const char *name, kd_layer_kind_t *out);

/* What the recipe says about one layer. Unused fields are 0. */
typedef struct {
    kd_layer_kind_t kind;
    int out_features; /* linear */
    int out_channels; /* conv2d */
    int kernel;       /* conv2d, maxpool2d (square) */
    int stride;       /* conv2d (default 1), maxpool2d (default = kernel) */
    int padding;      /* conv2d */
    float p;          /* dropout probability */
} kd_layer_spec_t;

/* Per-sample activation shape; flat vectors are (features, 1, 1). */
typedef struct {
    int c, h, w;
} kd_shape_t;

static inline size_t kd_shape_size(kd_shape_t s) {
    return (size_t)s.c * s.h * s.w;
}

/* One resolved layer: shapes and where its parameters sit in the flat buffers. */
typedef struct {
    kd_layer_spec_t spec;
    kd_shape_t in, out;
    size_t weight_offset, weight_count; /* count 0: no weight */
    size_t bias_offset, bias_count;
    int weight_ndim;
    int64_t weight_shape[4]; /* PyTorch order: [out, in] or [out, in, kh, kw] */
} kd_layer_t;

typedef struct kd_model_workspace kd_model_workspace_t; /* activations, scratch (private) */

typedef struct {
    int n_layers;
    kd_layer_t layers[KD_MAX_LAYERS];
    kd_shape_t input;
    int num_classes; /* size of the last layer's output */
    size_t n_params;
    float *params; /* (n_params) */
    float *grads;  /* (n_params) */
    /* Seconds spent in each layer, accumulated over calls (for per-layer timing metrics). */
    double forward_seconds[KD_MAX_LAYERS];
    double backward_seconds[KD_MAX_LAYERS];
    kd_model_workspace_t *ws;
    /* A GPT (kd_gpt.h) instead of layers (n_layers 0): params and grads are its buffers, input
     * is (1, 1, context + 1), num_classes its vocabulary. The sequential calls below
     * (forward, backward) do not apply; kd_train.h's calls take either. */
    kd_gpt_t *gpt;
} kd_model_t;

/* Resolves shapes and parameter offsets, validating the list: a conv2d/maxpool2d needs a
 * spatial input, a linear after a spatial input needs a flatten first, kernels fit, the last
 * layer produces a flat vector. Errors name the layer index and the problem. Parameters
 * start zeroed; call kd_model_init_params. Caller owns *out. */
int kd_model_new(const kd_layer_spec_t *specs, int n_specs, kd_shape_t input, kd_model_t **out,
                 char *err, size_t errlen);
void kd_model_destroy(kd_model_t **self_p);
/* A new model of m's architecture (layers or GPT), parameters zeroed. Caller owns *out. */
int kd_model_new_like(const kd_model_t *m, kd_model_t **out, char *err, size_t errlen);
/* Points the model's parameters (or gradients) at another buffer of n_params floats, e.g. a
 * shared-memory slot. The caller keeps the model's own buffers and sets them back before
 * kd_model_destroy, which frees whatever the model points at. */
void kd_model_set_params(kd_model_t *m, float *params);
void kd_model_set_grads(kd_model_t *m, float *grads);
/* A model that is the GPT of cfg. Caller owns *out. 0, or -1 with err set. */
int kd_model_new_gpt(const kd_gpt_config_t *cfg, kd_model_t **out, char *err, size_t errlen);
/* The same resolution and checks as kd_model_new into *plan, without allocating anything (its
 * buffers stay NULL; not a model to run): for sizes from the network, checked before
 * kd_model_new allocates them. 0, or -1 with err set. */
int kd_model_plan(const kd_layer_spec_t *specs, int n_specs, kd_shape_t input, kd_model_t *plan,
                  char *err, size_t errlen);
/* About how many bytes training batches of B takes: parameters, gradients, the activation
 * workspace (an upper estimate, for bounds). */
double kd_model_train_bytes(const kd_model_t *m, long B);
/* The same for a GPT of cfg, before it exists (sizes from the network). */
double kd_model_train_bytes_gpt(const kd_gpt_config_t *cfg, long B);

/* PyTorch's default initialisation (kaiming_uniform with a = sqrt(5)): weights and biases
 * U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn deterministically from seed. */
void kd_model_init_params(kd_model_t *m, uint64_t seed);

/* Forward pass of B samples. x (B, input) is read, not kept past the call to backward.
 * train: dropout active, with masks keyed by (dropout_key, layer index) only, so a batch gives
 * the same masks wherever it runs. Returns the logits (B, num_classes), owned by the model and
 * valid until the next forward. */
const float *kd_model_forward(kd_model_t *m, const float *x, int B, bool train,
                              uint64_t dropout_key);

/* Backward pass after a forward with train = true (or false: dropout then is identity).
 * dlogits (B, num_classes). Overwrites m->grads with d(loss)/d(params). */
void kd_model_backward(kd_model_t *m, const float *dlogits);

/* Multiply-adds of one forward pass for one sample (a GPT: one full window) (for FLOP-rate
 * reporting). */
double kd_model_forward_flops(const kd_model_t *m);

/* OpenBLAS thread count for this process (0 = OpenBLAS default). */
void kd_set_threads(int n);

#endif
