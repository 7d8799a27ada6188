/* kd_data: datasets (IDX, as MNIST and Fashion-MNIST ship, .gz or raw), the train/validation
 * split, and the deterministic per-epoch batching of DESIGN §3.2. A dataset owns its pixels
 * and labels; it is immutable after loading and may be read from many threads. */
#ifndef KD_DATA_H
#define KD_DATA_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t n;                    /* samples */
    int channels, height, width; /* per-sample shape (1, 28, 28 for Fashion-MNIST) */
    size_t sample_dim;           /* channels * height * width */
    int num_classes;             /* max label + 1, at least 2 */
    uint8_t *pixels;             /* (n, sample_dim), raw bytes; scaled to [0,1] on gather */
    int32_t *labels;             /* (n) */
    /* Language-model data (kd_tokens.h), pixels and labels NULL: sample i is the window
     * tokens[i * stride, i * stride + window) of window = context + 1 ids (sample_dim);
     * num_classes is the vocabulary. */
    uint32_t *tokens; /* (n_tokens) */
    size_t n_tokens, window, stride;
    uint16_t *token_bytes; /* (num_classes) bytes of text each id stands for; NULL = unknown */
    char tokenizer[16];    /* "bytes" | "gpt2" */
    char tokenizer_fp[33]; /* kd_tokenizer_fingerprint */
} kd_dataset_t;

/* Loads an IDX image file (magic 0x00000803, u8, 3 dims) and its IDX label file (0x00000801,
 * u8, 1 dim). Either may be gzip-compressed. Validates magic, dimensions, sizes against the
 * file length, the two counts against each other, and labels < 256. Errors name the file. */
int kd_idx_load(const char *images_path, const char *labels_path, kd_dataset_t **out, char *err,
                size_t errlen);

/* A dataset made of the given samples of src (copied). Caller owns the result. */
kd_dataset_t *kd_dataset_subset(const kd_dataset_t *src, const uint32_t *ids, size_t n);

/* Deterministic split: a permutation keyed by seed puts val_count samples in *val and the rest
 * in *train (each in ascending id order of src). val_count may be 0 (then *val is empty). */
int kd_dataset_split(const kd_dataset_t *src, size_t val_count, uint64_t seed, kd_dataset_t **train,
                     kd_dataset_t **val, char *err, size_t errlen);

void kd_dataset_destroy(kd_dataset_t **self_p);

/* x (n, sample_dim) = pixels / 255 of samples ids[0..n); y (n) = labels (y may be NULL).
 * ids must be < ds->n (KD_ASSERT). */
void kd_dataset_gather(const kd_dataset_t *ds, const uint32_t *ids, size_t n, float *x, int32_t *y);

/* Pixel scaling to [0, 1], the one formula every process uses (inputs travel as raw bytes). */
void kd_pixels_to_float(const uint8_t *src, size_t n, float *dst);

/* One epoch's batching: a permutation of 0..n-1 keyed by (seed, epoch), cut into batches of
 * batch_size numbered 0..n_batches-1; the last one may be short (PyTorch's drop_last=False).
 * Any process computes the same batches from the same (seed, epoch, n, batch_size). */
typedef struct {
    uint64_t seed;
    uint32_t epoch;
    size_t n_samples, batch_size, n_batches;
    uint32_t *perm; /* (n_samples) */
} kd_epoch_t;

kd_epoch_t *kd_epoch_new(uint64_t seed, uint32_t epoch, size_t n_samples, size_t batch_size);
void kd_epoch_destroy(kd_epoch_t **self_p);
/* Sample ids of batch_id (borrowed from the epoch); returns the count, 0 if out of range. */
size_t kd_epoch_batch(const kd_epoch_t *ep, size_t batch_id, const uint32_t **ids);
size_t kd_epoch_count(size_t n_samples, size_t batch_size);

#endif
