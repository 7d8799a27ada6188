/* kd_npy: .npy files (NumPy format 1.0), float32 C-order, as `np.load` reads them. */
#ifndef KD_NPY_H
#define KD_NPY_H

#include <stddef.h>
#include <stdint.h>

/* Writes data (rows, cols) atomically. */
int kd_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                     size_t errlen);
/* Any shape (ndim 1..8): float32 or int32 ('<i4'), atomically. */
int kd_npy_write_f32_nd(const char *path, const float *data, int ndim, const size_t *shape,
                        char *err, size_t errlen);
int kd_npy_write_i32_nd(const char *path, const int32_t *data, int ndim, const size_t *shape,
                        char *err, size_t errlen);
typedef enum { KD_NPY_F32 = 1, KD_NPY_I32 = 2, KD_NPY_I64 = 4 } kd_npy_dtype_t;

typedef struct {
    kd_npy_dtype_t dtype;
    int ndim;
    size_t shape[8];
    size_t count; /* elements */
    void *data;   /* count elements of dtype, C order; caller frees */
} kd_npy_array_t;

/* Reads a little-endian C-order array of any shape (ndim 0..8) whose dtype is one of
 * accept_dtypes (KD_NPY_* ored). Validates as kd_npy_read_f32 does; errors name the file. */
int kd_npy_read(const char *path, unsigned accept_dtypes, kd_npy_array_t *out, char *err,
                size_t errlen);
/* Reads a 2-D little-endian float32 C-order array; caller frees *data. Validates magic, header,
 * dtype, order, shape and the file length; errors name the file. */
int kd_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, char *err,
                    size_t errlen);

#endif
