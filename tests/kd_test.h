/* kd_test: the minimal harness every test executable uses. A failed check prints file, line
 * and the values, and makes the test exit non-zero (kd_test_done), so ctest sees it. */
#ifndef KD_TEST_H
#define KD_TEST_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int kd_test_failures = 0;
static int kd_test_checks = 0;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        kd_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            kd_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

/* |a - b| <= tol * max(1, |a|, |b|) */
#define CHECK_CLOSE(a, b, tol)                                                                     \
    do {                                                                                           \
        double ka_ = (double)(a), kb_ = (double)(b);                                               \
        double ks_ = fmax(1.0, fmax(fabs(ka_), fabs(kb_)));                                        \
        kd_test_checks++;                                                                          \
        if (!(fabs(ka_ - kb_) <= (tol)*ks_)) {                                                     \
            kd_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK_CLOSE failed: %s = %.9g, %s = %.9g (tol %g)\n",          \
                    __FILE__, __LINE__, #a, ka_, #b, kb_, (double)(tol));                          \
        }                                                                                          \
    } while (0)

/* err must contain every one of the given substrings (the error names file and problem). */
#define CHECK_ERR_HAS(err, needle)                                                                 \
    do {                                                                                           \
        kd_test_checks++;                                                                          \
        if (!strstr((err), (needle))) {                                                            \
            kd_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: error message \"%s\" lacks \"%s\"\n", __FILE__, __LINE__,      \
                    (err), (needle));                                                              \
        }                                                                                          \
    } while (0)

static inline int kd_test_done(const char *name) {
    if (kd_test_checks == 0) {
        fprintf(stderr, "%s: no checks ran\n", name);
        return 1;
    }
    fprintf(stderr, "%s: %d checks, %d failed\n", name, kd_test_checks, kd_test_failures);
    return kd_test_failures ? 1 : 0;
}

/* dir/name, in one of a few rotating buffers (so a call can take two paths). */
static inline const char *kd_test_path(const char *dir, const char *name) {
    static char paths[4][2048];
    static int next;
    char *p = paths[next++ % 4];
    snprintf(p, sizeof paths[0], "%s/%s", dir, name);
    return p;
}

/* Runs a shell command line, capturing stdout+stderr into out (NUL-terminated, cut at outlen);
 * returns its exit code, or -1 when it did not exit. */
static inline int kd_test_run(char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline int kd_test_run(char *out, size_t outlen, const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = 0;
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* A fresh directory for a test's files: $KD_TEST_TMP/<name>.<pid> (or /tmp). */
static inline const char *kd_test_tmpdir(const char *name) {
    static char dir[1024];
    const char *base = getenv("KD_TEST_TMP");
    snprintf(dir, sizeof dir, "%s/%s.%d", base ? base : "/tmp", name, (int)getpid());
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "cannot create %s\n", dir);
        exit(1);
    }
    return dir;
}

#endif
