/* kd_cli: `kdist run` (local launcher), `kdist status`, `kdist scale` and `kdist drain`, and
 * what they share: a control client that talks to the coordinator's ROUTER (Control ->
 * StatusReply) and the parsed form of StatusReply.json (docs/protocol.md). Not thread-safe:
 * one client per thread. */
#ifndef KD_CLI_H
#define KD_CLI_H

#include <stdbool.h>
#include <stddef.h>

#include "kd_wire.h"

int kd_cmd_run(int argc, char **argv);
int kd_cmd_status(int argc, char **argv);
int kd_cmd_scale(int argc, char **argv); /* kd_scale.c */
int kd_cmd_drain(int argc, char **argv); /* kd_scale.c */
int kd_cmd_cache(int argc, char **argv); /* kd_cache_cmd.c */

/* A DEALER connected to the coordinator, routing id client-<pid>-<incarnation>. */
typedef struct cli_client cli_client_t;

/* Caller owns the result (cli_client_destroy). Returns NULL with err set. */
cli_client_t *cli_client_new(const char *endpoint, char *err, size_t errlen);
void cli_client_destroy(cli_client_t **c);
/* Queues Control{kind, target} (target may be NULL). 0, or -1 with err set. */
int cli_client_control(cli_client_t *c, Kdist__Control__Kind kind, const char *target, char *err,
                       size_t errlen);
/* Waits up to timeout_ms (0: just look) for a StatusReply. Returns 0 with *json (caller
 * frees), 1 when none came in time or a signal interrupted, -1 when the coordinator refused
 * us or the socket is gone (err says why). Other messages are skipped; a Refused "say hello"
 * is answered with Hello{CLIENT} and the last control is sent again. */
int cli_client_wait_status(cli_client_t *c, int timeout_ms, char **json, char *err, size_t errlen);
/* Control{STATUS}, then its reply within timeout_ms: 0 with *json (caller frees), or -1 with
 * err set (naming the endpoint) when none came. */
int cli_client_status(cli_client_t *c, int timeout_ms, char **json, char *err, size_t errlen);
/* The socket, for zmq_poll. */
void *cli_client_socket(cli_client_t *c);

/* The progress part of StatusReply.json; unknown values are NaN or -1. */
typedef struct {
    char status[32];
    char name[128];
    long epoch, epochs, step, total_steps;
    long batches_applied, batches_expected, duplicates_dropped, restreamed;
    double loss, lr, train_accuracy, val_accuracy, test_accuracy;
    double samples_per_sec, elapsed, eta;
    int workers_live, teachers_live;
} cli_progress_t;

/* 0, or -1 with err set when json is not an object. Missing fields stay unknown. */
int cli_progress_parse(const char *json, cli_progress_t *p, char *err, size_t errlen);
/* "epoch 2/15  step 120/6450 (2%)  loss 0.4123  val acc 85.10%  9000 samples/s  2 workers
 * ETA 3m05s" */
void cli_progress_line(const cli_progress_t *p, char *out, size_t outlen);
void cli_format_duration(double seconds, char *out, size_t outlen);
/* The members table of a StatusReply.json: role, id, host, pid, state, last seen, steps, rate. */
void cli_print_members(const char *json);

/* The endpoint in DIR/coordinator.endpoint (one line, written atomically by the coordinator).
 * 0, or -1 with err set (naming the file) when it is missing or malformed. */
int cli_read_endpoint(const char *dir, char *out, size_t outlen, char *err, size_t errlen);

#endif
