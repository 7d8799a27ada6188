/* kd_util: allocation, errors, files and clocks shared by every kdist module.
 * Owns nothing; all functions are thread-safe. */
#ifndef KD_UTIL_H
#define KD_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KD_ERR_LEN  512
#define KD_PATH_MAX 1024

/* Programmer error: an invariant is broken. Prints file and line, aborts. */
#define KD_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) kd_assert_fail(#cond, __FILE__, __LINE__);                                    \
    } while (0)
_Noreturn void kd_assert_fail(const char *expr, const char *file, int line);

/* Allocation failure aborts here, naming the caller's file and line. */
#define kd_xmalloc(n)     kd_xmalloc_at((n), __FILE__, __LINE__)
#define kd_xcalloc(n, sz) kd_xcalloc_at((n), (sz), __FILE__, __LINE__)
#define kd_xstrdup(s)     kd_xstrdup_at((s), __FILE__, __LINE__)
void *kd_xmalloc_at(size_t n, const char *file, int line);
void *kd_xcalloc_at(size_t n, size_t size, const char *file, int line);
char *kd_xstrdup_at(const char *s, const char *file, int line);
/* 64-byte aligned, zeroed float buffer for kernels; free with free(). */
float *kd_alloc_floats(size_t n);
/* The index of the first NaN or infinity in x (n), or n when every value is finite. */
size_t kd_first_nonfinite(const float *x, size_t n);

/* Tier-2 errors: formats into the caller's buffer (NULL-safe), returns -1 so callers can
 * write `return kd_err(err, errlen, "...")`. */
int kd_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Whole-file read; caller owns *data (NUL-terminated one byte past *len). */
int kd_read_file(const char *path, uint8_t **data, size_t *len, char *err, size_t errlen);
/* Atomic write: temp file beside path, fsync, rename, fsync of the directory. A crash leaves
 * either the old file or the new one, never a torn one. */
int kd_write_file_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen);
/* mkdir -p */
int kd_mkdirs(const char *path, char *err, size_t errlen);
bool kd_file_exists(const char *path);

double kd_now(void);       /* monotonic seconds */
double kd_wall_time(void); /* seconds since the epoch */

/* Strict number parsing: the whole string must be consumed. 0 on success. */
int kd_parse_long(const char *s, long *out);
int kd_parse_double(const char *s, double *out);

#endif
