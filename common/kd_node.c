/* kd_node: signals, memory, host name, back-off (see kd_node.h). */
#include "kd_node.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile sig_atomic_t kd_node_stop_requested = 0;

static void on_stop_signal(int sig) {
    /* A second Ctrl-C: leave now. A repeated SIGTERM (scancel, systemd, Kubernetes resend it)
     * must not cut a drain short: the goodbye spares the coordinator a heartbeat timeout. */
    if (kd_node_stop_requested && sig == SIGINT) _exit(128 + sig);
    kd_node_stop_requested = 1;
}

void kd_node_signals_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

void kd_node_quiet_blas_threads(char **argv) {
    if (getenv("OPENBLAS_THREAD_TIMEOUT")) return;
    setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1); /* 2^4 cycles: sleep almost at once */
    execv("/proc/self/exe", argv);
    /* exec failed: go on with OpenBLAS's default, which is only slower */
}

uint64_t kd_node_rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    unsigned long size = 0, resident = 0;
    int n = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    return n == 2 ? (uint64_t)resident * (uint64_t)sysconf(_SC_PAGESIZE) : 0;
}

uint64_t kd_node_memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (uint64_t)pages * (uint64_t)size : 0;
}

void kd_node_hostname(char *out, size_t outlen) {
    if (gethostname(out, outlen) != 0) snprintf(out, outlen, "unknown");
    out[outlen - 1] = 0;
}

int kd_backoff_next(kd_backoff_t *b) {
    if (b->delay_ms < 100) b->delay_ms = 100;
    int d = b->delay_ms;
    b->delay_ms = d >= 2500 ? 5000 : d * 2;
    return d;
}

void kd_backoff_reset(kd_backoff_t *b) {
    b->delay_ms = 0;
}
