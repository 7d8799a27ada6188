/* kd_metrics: a run's metrics outputs — a TensorBoard event file (TFRecord framing, scalars,
 * text and the student's graph) and metrics.jsonl with the same scalars, in the run directory.
 * A kd_metrics_t owns both files and its buffers; it is not thread-safe (one per process). */
#ifndef KD_METRICS_H
#define KD_METRICS_H

#include <jansson.h>
#include <stddef.h>

#include "kd_model.h"

typedef struct kd_metrics kd_metrics_t;

/* A JSON number for v, or null when v is NaN or infinite (which JSON cannot spell; jansson
 * refuses them). Every kdist JSON writer puts doubles through this. New reference. */
json_t *kd_json_number(double v);
/* A language model's evaluation of one split in a summary: <split>_perplexity and
 * <split>_bits_per_byte ("val", "test"). */
void kd_json_set_lm_eval(json_t *j, const char *split, double perplexity, double bits_per_byte);

/* Creates run_dir if needed and opens (appending) run_dir/events.out.tfevents.<unix
 * seconds>.<hostname> and run_dir/metrics.jsonl; the event file starts with the
 * file_version "brain.Event:2" record. Caller owns the result; NULL on error. */
kd_metrics_t *kd_metrics_open(const char *run_dir, char *err, size_t errlen);

/* Buffers one value for the next flush; a tag given twice before a flush keeps the last
 * value. Tags are kept verbatim ("loss/train"); "step" and "wall_time" are reserved.
 * Allocates only the first time a tag is seen. */
void kd_metrics_scalar(kd_metrics_t *m, const char *tag, double value);

/* Writes the buffered values as one Event (one Summary holding every value, float as
 * TensorBoard stores them) and one metrics.jsonl line {"step", "wall_time", <tag>: value...}
 * (full double precision; NaN and infinities as null, which JSON cannot spell), both with
 * the same wall time, then flushes both files (no fsync) and clears the buffer. Nothing is
 * written when nothing is buffered. -1 with err naming the file on a write error. */
int kd_metrics_flush(kd_metrics_t *m, long step, char *err, size_t errlen);

/* Writes text at step now, as its own Event: a string tensor for TensorBoard's Text tab
 * (plugin "text", which renders markdown, so text goes in as a preformatted block: every line
 * indented by four spaces) and a metrics.jsonl line {"step", "wall_time", <tag>: text}.
 * text must be UTF-8. -1 with err naming the file on a write error. */
int kd_metrics_text(kd_metrics_t *m, const char *tag, const char *text, long step, char *err,
                    size_t errlen);

/* Writes the model as a GraphDef event for TensorBoard's Graphs tab: "input"
 * (Placeholder), one node per layer "layers.<i>" with the PyTorch class name as op
 * ("Linear", "Conv2d", ...) fed by the previous node and by its parameter nodes
 * "layers.<i>.weight"/".bias" (VariableV2), and "output"; every node carries its
 * "_output_shapes" (batch dimension -1). */
int kd_metrics_graph(kd_metrics_t *m, const kd_model_t *model, char *err, size_t errlen);

const char *kd_metrics_events_path(const kd_metrics_t *m);
const char *kd_metrics_jsonl_path(const kd_metrics_t *m);

/* Closes both files; values buffered since the last flush are dropped. NULL-safe. */
void kd_metrics_close(kd_metrics_t **self_p);

#endif
