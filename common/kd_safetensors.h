/* kd_safetensors: reading and writing the safetensors format (8-byte little-endian header
 * length, JSON header of {name: {dtype, shape, data_offsets}} plus optional __metadata__,
 * then the raw little-endian data), as PyTorch's safetensors package writes and reads it.
 * A reader owns the file's bytes; a writer borrows tensor data until it writes. */
#ifndef KD_SAFETENSORS_H
#define KD_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define KD_ST_MAX_DIMS 8

typedef enum {
    KD_DTYPE_F32 = 0,
    KD_DTYPE_F16,
    KD_DTYPE_BF16,
    KD_DTYPE_F64,
    KD_DTYPE_I8,
    KD_DTYPE_U8,
    KD_DTYPE_I32,
    KD_DTYPE_I64,
    KD_DTYPE_COUNT
} kd_dtype_t;

const char *kd_dtype_name(kd_dtype_t d); /* "F32", ... as safetensors spells them */
int kd_dtype_parse(const char *name, kd_dtype_t *out);
size_t kd_dtype_size(kd_dtype_t d);

typedef struct {
    char *name;
    kd_dtype_t dtype;
    int ndim;
    int64_t shape[KD_ST_MAX_DIMS];
    size_t offset; /* into the data section */
    size_t nbytes;
} kd_st_tensor_t;

typedef struct kd_safetensors kd_safetensors_t;

/* Opens and validates a file: header length within the file, JSON well-formed, every entry
 * with a known dtype, a shape whose element count times dtype size equals its byte range, and
 * byte ranges inside the data section, in order, not overlapping, covering it without gaps.
 * Errors name the file and the tensor. Caller owns *out. */
int kd_st_open(const char *path, kd_safetensors_t **out, char *err, size_t errlen);
void kd_st_close(kd_safetensors_t **self_p);

int kd_st_count(const kd_safetensors_t *st);
const kd_st_tensor_t *kd_st_tensor(const kd_safetensors_t *st, int i);
const kd_st_tensor_t *kd_st_find(const kd_safetensors_t *st, const char *name); /* NULL if absent */
/* Bytes of tensor t, borrowed from st (not necessarily aligned: memcpy from it). */
const void *kd_st_data(const kd_safetensors_t *st, const kd_st_tensor_t *t);
/* A __metadata__ string value, or NULL. */
const char *kd_st_metadata(const kd_safetensors_t *st, const char *key);
const char *kd_st_path(const kd_safetensors_t *st);
/* "[2, 3]": a shape for error messages. */
void kd_st_format_shape(char *out, size_t outlen, int ndim, const int64_t *shape);

typedef struct kd_st_writer kd_st_writer_t;

kd_st_writer_t *kd_st_writer_new(void);
void kd_st_writer_destroy(kd_st_writer_t **self_p);
/* Adds a tensor; data is borrowed until kd_st_writer_write. Names must be unique (KD_ASSERT). */
void kd_st_writer_add(kd_st_writer_t *w, const char *name, kd_dtype_t dtype, int ndim,
                      const int64_t *shape, const void *data);
void kd_st_writer_metadata(kd_st_writer_t *w, const char *key, const char *value);
/* Writes the file atomically (kd_write_file_atomic). */
int kd_st_writer_write(kd_st_writer_t *w, const char *path, char *err, size_t errlen);

#endif
