/* kd_log: one log line format for every process — timestamp, role/id, a stable message id,
 * then the text. The level is checked before any formatting. Thread-safe. */
#ifndef KD_LOG_H
#define KD_LOG_H

#include <stdbool.h>
#include <stdio.h>

typedef enum {
    KD_LOG_DEBUG = 0,
    KD_LOG_INFO,
    KD_LOG_WARN,
    KD_LOG_ERROR,
    KD_LOG_OFF
} kd_log_level_t;

extern kd_log_level_t kd_log_threshold;

/* role ("coordinator", "worker", "kdist"), node id (may be NULL). Logs go to stderr and,
 * when path is not NULL, also to that file (appended). */
int kd_log_init(const char *role, const char *node_id, kd_log_level_t level, const char *path);
void kd_log_close(void);
int kd_log_level_parse(const char *name, kd_log_level_t *out);

#define kd_log(level, id, ...)                                                                     \
    do {                                                                                           \
        if ((level) >= kd_log_threshold) kd_log_write((level), (id), __VA_ARGS__);                 \
    } while (0)
void kd_log_write(kd_log_level_t level, const char *id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Rate limiting for hot loops and hostile peers: kd_log_allow returns true at most once per
 * `interval` seconds per limiter; suppressed counts what was skipped since the last line. */
typedef struct {
    double last;
    long suppressed;
} kd_log_limit_t;
bool kd_log_allow(kd_log_limit_t *limit, double interval);

#endif
