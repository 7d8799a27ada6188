/* kd_npy: .npy files (NumPy format 1.0), float32 C-order, as `np.load` reads them. */
#ifndef KD_NPY_H
#define KD_NPY_H

#include <stddef.h>

/* Writes data (rows, cols) atomically. */
int kd_npy_write_f32(const char *path, const float *data, size_t rows, size_t cols, char *err,
                     size_t errlen);
/* Reads a 2-D little-endian float32 C-order array; caller frees *data. Validates magic, header,
 * dtype, order, shape and the file length; errors name the file. */
int kd_npy_read_f32(const char *path, float **data, size_t *rows, size_t *cols, char *err,
                    size_t errlen);

#endif
