/* kd_log: timestamped, role-tagged log lines with stable message ids (see kd_log.h). */
#include "kd_log.h"

#include <pthread.h>
#include <stdarg.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

kd_log_level_t kd_log_threshold = KD_LOG_INFO;

static char log_role[64] = "kdist";
static char log_node[64] = "";
static FILE *log_file = NULL;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

int kd_log_init(const char *role, const char *node_id, kd_log_level_t level, const char *path) {
    pthread_mutex_lock(&log_lock);
    snprintf(log_role, sizeof log_role, "%s", role ? role : "kdist");
    snprintf(log_node, sizeof log_node, "%s", node_id ? node_id : "");
    kd_log_threshold = level;
    if (log_file) fclose(log_file);
    log_file = path ? fopen(path, "a") : NULL;
    int rc = (path && !log_file) ? -1 : 0;
    pthread_mutex_unlock(&log_lock);
    return rc;
}

void kd_log_close(void) {
    pthread_mutex_lock(&log_lock);
    if (log_file) fclose(log_file);
    log_file = NULL;
    pthread_mutex_unlock(&log_lock);
}

int kd_log_level_parse(const char *name, kd_log_level_t *out) {
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (kd_log_level_t)i;
            return 0;
        }
    }
    if (strcasecmp(name, "off") == 0) {
        *out = KD_LOG_OFF;
        return 0;
    }
    return -1;
}

void kd_log_write(kd_log_level_t level, const char *id, const char *fmt, ...) {
    if (level < KD_LOG_DEBUG || level > KD_LOG_ERROR) level = KD_LOG_ERROR;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char prefix[256];
    int n = snprintf(prefix, sizeof prefix, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %s%s%s %-5s %s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000), log_role, log_node[0] ? "-" : "", log_node,
                     level_names[level], id);
    char text[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    (void)n;
    pthread_mutex_lock(&log_lock);
    fprintf(stderr, "%s%s\n", prefix, text);
    if (log_file) {
        fprintf(log_file, "%s%s\n", prefix, text);
        fflush(log_file);
    }
    pthread_mutex_unlock(&log_lock);
}

bool kd_log_allow(kd_log_limit_t *limit, double interval) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    if (limit->last != 0.0 && now - limit->last < interval) {
        limit->suppressed++;
        return false;
    }
    limit->last = now;
    return true;
}
