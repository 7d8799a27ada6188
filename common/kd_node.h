/* kd_node: what every kdist process shares besides the wire: stop signals, resident memory,
 * host name and reconnect back-off. Signal state is process-wide; the rest is thread-safe. */
#ifndef KD_NODE_H
#define KD_NODE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Set by SIGTERM/SIGINT once kd_node_signals_install ran; main loops poll it. */
extern volatile sig_atomic_t kd_node_stop_requested;
/* SIGTERM and SIGINT set kd_node_stop_requested (a second one exits at once); SIGPIPE ignored. */
void kd_node_signals_install(void);

/* OpenBLAS's idle threads busy-wait (sched_yield) for a long while after every call; in a
 * process that then waits on the network they steal the cores its peers need. OpenBLAS reads
 * OPENBLAS_THREAD_TIMEOUT only when it loads, so when it is unset this sets it to the
 * shortest wait and re-executes the program (same argv); when set, it returns. */
void kd_node_quiet_blas_threads(char **argv);

uint64_t kd_node_rss_bytes(void); /* resident set size of this process, 0 if unknown */
/* Physical memory of this machine (0 if unknown): the bound on buffers sized by a peer. */
uint64_t kd_node_memory_bytes(void);
void kd_node_hostname(char *out, size_t outlen);

/* Reconnect back-off: 100 ms doubling to 5 s; reset after a successful Hello. */
typedef struct {
    int delay_ms;
} kd_backoff_t;
int kd_backoff_next(kd_backoff_t *b); /* the delay to wait now, in ms */
void kd_backoff_reset(kd_backoff_t *b);

#endif
