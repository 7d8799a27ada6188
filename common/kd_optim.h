/* kd_optim: server-side optimizers over the flat parameter buffer (SGD with momentum and
 * Nesterov, AdamW), global-norm gradient clipping, and learning-rate schedules with warm-up.
 * The semantics follow torch.optim so a PyTorch run of the same recipe is comparable.
 * An optimizer owns its moment buffers; not thread-safe. */
#ifndef KD_OPTIM_H
#define KD_OPTIM_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { KD_OPT_SGD = 0, KD_OPT_ADAMW, KD_OPT_COUNT } kd_opt_kind_t;
typedef enum {
    KD_SCHED_CONSTANT = 0,
    KD_SCHED_STEP,
    KD_SCHED_COSINE,
    KD_SCHED_ONECYCLE,
    KD_SCHED_COUNT
} kd_sched_kind_t;

typedef struct {
    kd_opt_kind_t kind;
    float momentum;          /* SGD */
    bool nesterov;           /* SGD */
    float weight_decay;      /* SGD: added to the gradient (torch.optim.SGD); AdamW: decoupled */
    float beta1, beta2, eps; /* AdamW */
    float clip_norm;         /* global L2 norm bound on the gradient; 0 = no clipping */
} kd_optim_config_t;

typedef struct {
    kd_sched_kind_t kind;
    float lr;          /* base (constant, step, cosine) or peak (onecycle) learning rate */
    long total_steps;  /* cosine and onecycle horizon */
    long warmup_steps; /* linear warm-up from 0 (constant, step, cosine) */
    long step_size;    /* step: multiply by gamma every step_size steps */
    float gamma;
    float min_lr;           /* cosine floor */
    float pct_start;        /* onecycle: fraction of steps rising (torch default 0.3) */
    float div_factor;       /* onecycle: initial lr = lr / div_factor (torch default 25) */
    float final_div_factor; /* onecycle: final lr = initial / final_div_factor (torch 1e4) */
} kd_schedule_config_t;

const char *kd_opt_kind_name(kd_opt_kind_t k);
int kd_opt_kind_parse(const char *name, kd_opt_kind_t *out);
const char *kd_sched_kind_name(kd_sched_kind_t k);
int kd_sched_kind_parse(const char *name, kd_sched_kind_t *out);

/* Learning rate for optimizer step `step` (0-based), as torch's schedulers give it. */
float kd_schedule_lr(const kd_schedule_config_t *s, long step);

typedef struct {
    size_t offset, count;
} kd_param_span_t;

typedef struct {
    kd_optim_config_t cfg;
    size_t n;
    long t;   /* steps taken */
    float *m; /* (n) SGD momentum buffer / Adam first moment */
    float *v; /* (n) Adam second moment; NULL for SGD */
    /* Spans of the buffer weight decay leaves alone (a torch param group with decay 0), in
     * increasing order, disjoint. */
    kd_param_span_t *no_decay;
    int n_no_decay;
} kd_optim_t;

kd_optim_t *kd_optim_new(const kd_optim_config_t *cfg, size_t n_params);
void kd_optim_destroy(kd_optim_t **self_p);
/* Exempts params [offset, offset + count) from weight decay (GPT biases and layernorm gains,
 * as nanoGPT does). Spans must come in increasing order and not overlap. */
void kd_optim_exempt_decay(kd_optim_t *opt, size_t offset, size_t count);

/* One update of params (n) with grads (n) at learning rate lr. Clips grads in place when
 * clip_norm > 0. Returns the gradient's global L2 norm before clipping. */
float kd_optim_step(kd_optim_t *opt, float *params, float *grads, float lr);

/* The same step in pieces, for gradients that arrive in chunks: the update of params
 * [lo, hi) only (grads unclipped; moments updated in place), then kd_optim_end_step once every
 * range of the step is done. Element for element what kd_optim_step does without clipping. */
void kd_optim_update_range(kd_optim_t *opt, float *params, const float *grads, float lr, size_t lo,
                           size_t hi);
void kd_optim_end_step(kd_optim_t *opt);
/* What clipping multiplies a gradient of L2 norm `norm` by (1 when it is not clipped), and the
 * product itself, as kd_optim_step does them (dst may be grads). */
double kd_optim_clip_scale(const kd_optim_t *opt, float norm);
void kd_clip_scale_into(float *dst, const float *grads, size_t n, double scale);

/* Global L2 norm of x (n). */
float kd_l2_norm(const float *x, size_t n);

#endif
