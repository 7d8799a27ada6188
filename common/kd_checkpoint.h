/* kd_checkpoint: model weights as safetensors with PyTorch's nn.Sequential names
 * (`layers.<i>.weight`, `layers.<i>.bias`, i = index in the layer list), so a kdist model
 * loads into PyTorch with load_state_dict and a PyTorch model loads into kdist.
 * The metadata records the layer list and input shape ("kdist.model"). */
#ifndef KD_CHECKPOINT_H
#define KD_CHECKPOINT_H

#include "kd_model.h"
#include "kd_safetensors.h"

/* Text form of a model's layer list and input shape, e.g.
 * "input=1x28x28;flatten;linear:800;relu;conv2d:32,3,1,1;maxpool2d:2,2;dropout:0.3" */
void kd_model_describe(const kd_model_t *m, char *out, size_t outlen);

/* Adds the model's parameters (borrowed) and its description to a writer, so callers can
 * put more tensors (optimizer state, ...) in the same file. */
void kd_checkpoint_add_model(kd_st_writer_t *w, const kd_model_t *m);

/* Writes params as safetensors at path, atomically. */
int kd_checkpoint_save(const kd_model_t *m, const char *path, char *err, size_t errlen);
/* 0 when every parameter of m is finite; else -1 with err naming path and the first bad value.
 * Every writer of weights checks this: non-finite weights are never saved. */
int kd_checkpoint_check_finite(const kd_model_t *m, const char *path, char *err, size_t errlen);

/* Loads params from an open file into m: every parameter of m must be present as F32 with
 * the exact shape; unexpected `layers.*` tensors are an error too. Errors name the file and
 * the tensor, and nothing of m is changed unless everything checks. */
int kd_checkpoint_load_into(kd_model_t *m, const kd_safetensors_t *st, char *err, size_t errlen);
int kd_checkpoint_load(kd_model_t *m, const char *path, char *err, size_t errlen);

#endif
