/* kd_util: allocation, errors, files and clocks (see kd_util.h). */
#include "kd_util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

void kd_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "kdist: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}

static _Noreturn void out_of_memory(size_t n, const char *file, int line) {
    fprintf(stderr, "kdist: out of memory allocating %zu bytes (%s:%d)\n", n, file, line);
    abort();
}

void *kd_xmalloc_at(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) out_of_memory(n, file, line);
    return p;
}

void *kd_xcalloc_at(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) out_of_memory(n * size, file, line);
    return p;
}

char *kd_xstrdup_at(const char *s, const char *file, int line) {
    size_t n = strlen(s) + 1;
    char *p = kd_xmalloc_at(n, file, line);
    memcpy(p, s, n);
    return p;
}

size_t kd_first_nonfinite(const float *x, size_t n) {
    /* x - x is 0 for finite x and NaN otherwise: a branch-free scan, then the exact index */
    float acc = 0.0f;
    for (size_t i = 0; i < n; i++) acc += x[i] - x[i];
    if (acc == 0.0f) return n;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return n;
}

float *kd_alloc_floats(size_t n) {
    size_t bytes = (n ? n : 1) * sizeof(float);
    bytes = (bytes + 63) & ~(size_t)63;
    float *p = aligned_alloc(64, bytes);
    if (!p) out_of_memory(bytes, __FILE__, __LINE__);
    memset(p, 0, bytes);
    return p;
}

int kd_err(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int kd_read_file(const char *path, uint8_t **data, size_t *len, char *err, size_t errlen) {
    *data = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return kd_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return kd_err(err, errlen, "%s: not a regular file", path);
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = kd_xmalloc(n + 1);
    if (n && fread(buf, 1, n, f) != n) {
        int e = errno;
        fclose(f);
        free(buf);
        return kd_err(err, errlen, "%s: read failed: %s", path, e ? strerror(e) : "short read");
    }
    fclose(f);
    buf[n] = 0;
    *data = buf;
    *len = n;
    return 0;
}

static int fsync_parent_dir(const char *path) {
    char dir[KD_PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = 0;
    else if (slash)
        *slash = 0;
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int kd_write_file_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen) {
    /* A unique temp name per call, so threads and processes writing one path never share it. */
    static _Atomic unsigned long counter = 0;
    char tmp[KD_PATH_MAX + 64];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%lu", path, (long)getpid(), counter++) >=
        (int)sizeof tmp)
        return kd_err(err, errlen, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return kd_err(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
    const uint8_t *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = w < 0 ? errno : ENOSPC;
            close(fd);
            unlink(tmp);
            return kd_err(err, errlen, "%s: write failed: %s", path, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return kd_err(err, errlen, "%s: fsync failed: %s", path, strerror(e));
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return kd_err(err, errlen, "%s: rename failed: %s", path, strerror(e));
    }
    if (fsync_parent_dir(path) != 0)
        return kd_err(err, errlen, "%s: fsync of its directory failed: %s", path, strerror(errno));
    return 0;
}

/* mkdir that accepts an existing directory, and only a directory. */
static int make_dir(const char *path, char *err, size_t errlen) {
    if (mkdir(path, 0755) == 0) return 0;
    if (errno != EEXIST)
        return kd_err(err, errlen, "%s: cannot create directory: %s", path, strerror(errno));
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return kd_err(err, errlen, "%s: exists and is not a directory", path);
    return 0;
}

int kd_mkdirs(const char *path, char *err, size_t errlen) {
    char buf[KD_PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return kd_err(err, errlen, "%s: path too long", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (make_dir(buf, err, errlen) != 0) return -1;
        *p = '/';
    }
    return make_dir(buf, err, errlen);
}

bool kd_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

double kd_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double kd_wall_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int kd_parse_long(const char *s, long *out) {
    if (!s || !*s || isspace((unsigned char)*s)) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

int kd_parse_double(const char *s, double *out) {
    if (!s || !*s || isspace((unsigned char)*s)) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    /* Finite values only (overflow gives inf); an underflow (ERANGE) is still a number. */
    if (*end || !isfinite(v)) return -1;
    *out = v;
    return 0;
}
