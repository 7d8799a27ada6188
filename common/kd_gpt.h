/* kd_gpt: a GPT-2-style decoder (DESIGN §11): token + position embeddings, `layers`
 * pre-layernorm blocks (causal multi-head self-attention, then a 4x tanh-GELU MLP, each with
 * a residual), a final layernorm and a head tied to the token embedding. The maths and the
 * parameter names are Hugging Face's GPT2LMHeadModel (Conv1D weights [in, out]), so its
 * checkpoints load here and ours load there (kd_gpt_hf.c).
 *
 * Parameters, gradients and (in kd_optim) moments each live in one flat float buffer; the
 * tensor table gives every tensor's name, offset and shape in that buffer, in the order of
 * Hugging Face's state_dict. A model owns its buffers and activations; one per thread. */
#ifndef KD_GPT_H
#define KD_GPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_rng.h"
#include "kd_safetensors.h"

#define KD_GPT_MAX_LAYERS  64
#define KD_GPT_TENSOR_NAME 48
#define KD_GPT_LN_EPS      1e-5f

typedef struct {
    int layers, width, heads; /* n_layer, n_embd, n_head */
    int context;              /* n_positions: the longest window */
    int vocab;                /* vocab_size */
    float dropout;            /* on the embeddings and both residual branches; 0 = none */
} kd_gpt_config_t;

/* Checks the sizes (width a multiple of heads, everything positive and bounded). 0, or -1
 * with err naming the field. */
int kd_gpt_config_check(const kd_gpt_config_t *cfg, char *err, size_t errlen);
size_t kd_gpt_param_count(const kd_gpt_config_t *cfg);

typedef struct {
    char name[KD_GPT_TENSOR_NAME]; /* "wte.weight", "h.0.attn.c_attn.weight", ... */
    size_t offset, count;
    int ndim;
    int64_t shape[2];
    bool decay; /* AdamW decays it: the 2-D weights (nanoGPT), not biases and layernorm gains */
} kd_gpt_tensor_t;

typedef struct kd_gpt_acts kd_gpt_acts_t; /* activations of the last forward (private) */

typedef struct {
    kd_gpt_config_t cfg;
    int n_tensors;
    kd_gpt_tensor_t *tensors; /* (n_tensors) */
    size_t n_params;
    float *params; /* (n_params) */
    float *grads;  /* (n_params) */
    kd_gpt_acts_t *acts;
} kd_gpt_t;

/* Parameters start zeroed (kd_gpt_init_params). Caller owns *out. 0, or -1 with err set. */
int kd_gpt_new(const kd_gpt_config_t *cfg, kd_gpt_t **out, char *err, size_t errlen);
void kd_gpt_destroy(kd_gpt_t **self_p);
const kd_gpt_tensor_t *kd_gpt_find(const kd_gpt_t *m, const char *name); /* NULL if absent */

/* GPT-2's initialisation: weights N(0, 0.02), the residual projections (c_proj) N(0,
 * 0.02/sqrt(2 layers)), biases 0, layernorm gains 1; deterministic from seed. */
void kd_gpt_init_params(kd_gpt_t *m, uint64_t seed);

/* Forward of B windows of T tokens up to the final layernorm: tokens (B,T), each < vocab,
 * T <= context. train: dropout active, masks keyed by dropout_key alone. The activations are
 * kept for kd_gpt_head and kd_gpt_backward. */
void kd_gpt_forward(kd_gpt_t *m, const uint32_t *tokens, int B, int T, bool train,
                    uint64_t dropout_key);

/* The head, in chunks of positions so that no (B*T, V) buffer exists: for positions
 * [pos0, pos0+n) of the last forward (row-major over (B,T)), fn gets their logits (n,V); with
 * grad it overwrites them with d(loss)/d(logits), which the head folds into the gradients.
 * fn returns its part of the loss; kd_gpt_head returns the sum. grad zeroes m->grads first;
 * call kd_gpt_backward after it. */
typedef double (*kd_gpt_head_fn)(void *ctx, size_t pos0, size_t n, float *logits, bool grad);
double kd_gpt_head(kd_gpt_t *m, kd_gpt_head_fn fn, void *ctx, bool grad);
/* Positions per head chunk for a vocabulary (what bounds the head's memory). */
size_t kd_gpt_head_chunk(int vocab);

/* Mean next-token cross-entropy of the last forward over the positions whose target (B,T) is
 * >= 0; with grad, its gradient in m->grads (after kd_gpt_backward). NaN when no position
 * counts. correct (may be NULL) gets how many of them have the target as the top logit. */
double kd_gpt_loss(kd_gpt_t *m, const int32_t *targets, bool grad, size_t *correct);

/* The logits (B,T,V) of the last forward into out. */
void kd_gpt_logits(kd_gpt_t *m, float *out);

/* Backward from the head's gradient (kd_gpt_head or kd_gpt_loss with grad) to every
 * parameter: m->grads = d(loss)/d(params). */
void kd_gpt_backward(kd_gpt_t *m);

/* ---- Hugging Face files (kd_gpt_hf.c) ---- */

/* Reads a Hugging Face GPT-2 config.json: n_layer, n_embd, n_head, n_positions (or n_ctx),
 * vocab_size; refuses what kdist's maths does not have (another activation, layernorm eps,
 * n_inner). Errors name the file and the field. */
int kd_gpt_config_read(const char *path, kd_gpt_config_t *cfg, char *err, size_t errlen);
int kd_gpt_config_write(const kd_gpt_config_t *cfg, const char *path, char *err, size_t errlen);
/* A checkpoint path is a .safetensors file or a model directory (model.safetensors +
 * config.json). Fills both paths; returns 1 when the config.json exists, else 0. */
int kd_gpt_resolve_path(const char *path, char *st_path, size_t st_len, char *cfg_path,
                        size_t cfg_len);
/* Loads parameters in the Hugging Face GPT-2 layout (names with or without `transformer.`),
 * tolerating the attention-mask buffers (h.<i>.attn.bias, .masked_bias) and an lm_head.weight
 * equal to wte.weight; a config.json (of a directory, or beside the file) must agree with
 * m->cfg, naming both values. Everything is checked before anything is copied: on error m is
 * unchanged, and err names the file and the tensor or field. */
int kd_gpt_load(kd_gpt_t *m, const char *path, char *err, size_t errlen);
/* Writes the parameters (F32, Hugging Face names without prefix) to path and config.json
 * beside it. Refuses non-finite parameters. */
int kd_gpt_save(const kd_gpt_t *m, const char *path, char *err, size_t errlen);
/* The two halves of load and save on an open file: the tensors checked and copied (no
 * config.json), and m's tensors added to a writer (borrowed until it writes). */
int kd_gpt_load_tensors(kd_gpt_t *m, const kd_safetensors_t *st, char *err, size_t errlen);
void kd_gpt_add_tensors(kd_st_writer_t *w, const kd_gpt_t *m);

/* ---- generation (kd_gpt_sample.c) ---- */

/* Feeds a model one token at a time with a KV cache. Borrows m (its parameters may not change
 * while sampling). Not thread-safe. */
typedef struct kd_gpt_sampler kd_gpt_sampler_t;
kd_gpt_sampler_t *kd_gpt_sampler_new(const kd_gpt_t *m);
void kd_gpt_sampler_destroy(kd_gpt_sampler_t **self_p);
void kd_gpt_sampler_reset(kd_gpt_sampler_t *s); /* back to position 0 */
int kd_gpt_sampler_position(const kd_gpt_sampler_t *s);
/* token at the next position (< context); returns the next-token logits (V), valid until the
 * next step: what kd_gpt_forward gives at that position. */
const float *kd_gpt_sampler_step(kd_gpt_sampler_t *s, uint32_t token);
/* A token drawn from softmax(logits / temperature) over the top_k largest (0 = all), with rng;
 * temperature 0 is greedy. scratch (V). */
uint32_t kd_gpt_pick(const float *logits, int V, float temperature, int top_k, kd_rng_t *rng,
                     float *scratch);

/* n_new tokens after prompt[0..n_prompt) (n_prompt >= 1) into out, drawn as kd_gpt_pick does
 * from a generator keyed by seed alone (the same seed, the same text). Past the context the
 * window slides: the cache restarts from the last half. Returns n_new. */
size_t kd_gpt_generate(const kd_gpt_t *m, const uint32_t *prompt, size_t n_prompt, size_t n_new,
                       float temperature, int top_k, uint64_t seed, uint32_t *out);

/* The same as text: n_new tokens generated after prompt[0..n_prompt) (n_prompt >= 1) and
 * decoded by tok (ids beyond its vocabulary, a padded one's, have no text and are dropped).
 * *text (caller frees) gets the continuation, preceded by the prompt's own text when
 * with_prompt, NUL-terminated, *len bytes; a cut through a character is not repaired
 * (kd_utf8_repair). 0, or -1 with err set (a prompt id outside tok's vocabulary). */
struct kd_tokenizer;
int kd_gpt_sample_text(const kd_gpt_t *m, const struct kd_tokenizer *tok, const uint32_t *prompt,
                       size_t n_prompt, bool with_prompt, size_t n_new, float temperature,
                       int top_k, uint64_t seed, char **text, size_t *len, char *err,
                       size_t errlen);

/* Multiply-adds of a forward of one window of T tokens, head included. */
double kd_gpt_forward_flops(const kd_gpt_config_t *cfg, int T);

#endif
