/* kd_cli: `kdist run` (local launcher), `kdist status`, `kdist scale` and `kdist drain`, and
 * what they share: a control client that talks to the coordinator's ROUTER (Control ->
 * StatusReply) and the parsed form of StatusReply.json (docs/protocol.md). Not thread-safe:
 * one client per thread. */
#ifndef KD_CLI_H
#define KD_CLI_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

#include "kd_curve.h"
#include "kd_data.h"
#include "kd_model.h"
#include "kd_recipe.h"
#include "kd_wire.h"

int kd_cmd_run(int argc, char **argv); /* kd_pipeline.c */
/* "kdist run: <message>\n" on stderr, flushed (kd_run.c). */
void cli_vnote(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));
int kd_cmd_status(int argc, char **argv);
int kd_cmd_scale(int argc, char **argv);     /* kd_scale.c */
int kd_cmd_drain(int argc, char **argv);     /* kd_scale.c */
int kd_cmd_cache(int argc, char **argv);     /* kd_cache_cmd.c */
int kd_cmd_keygen(int argc, char **argv);    /* kd_keygen.c */
int kd_cmd_inventory(int argc, char **argv); /* kd_inventory.c */
int kd_cmd_sample(int argc, char **argv);    /* kd_sample.c */
int kd_cmd_data(int argc, char **argv);      /* kd_data_cmd.c */

/* A DEALER connected to the coordinator, routing id client-<pid>-<incarnation>. */
typedef struct cli_client cli_client_t;

/* Caller owns the result (cli_client_destroy). curve: this client's CurveZMQ credentials
 * (copied; cli_curve_credentials), NULL for plaintext. Returns NULL with err set. */
cli_client_t *cli_client_new(const char *endpoint, const kd_curve_client_t *curve, char *err,
                             size_t errlen);
void cli_client_destroy(cli_client_t **c);
/* Queues Control{kind, target} (target may be NULL). 0, or -1 with err set. */
int cli_client_control(cli_client_t *c, Kdist__Control__Kind kind, const char *target, char *err,
                       size_t errlen);
/* Waits up to timeout_ms (0: just look) for a StatusReply. Returns 0 with *json (caller
 * frees), 1 when none came in time or a signal interrupted, -1 when the coordinator refused
 * us or the socket is gone (err says why). Other messages are skipped; the session
 * (kd_session.h) answers a Refused UNKNOWN_MEMBER with Hello{CLIENT} and reconnects after
 * transient refusals, and then the last control is sent again. */
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
    double tokens_per_sec, val_bits_per_byte; /* language models; NAN otherwise */
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

/* The CurveZMQ credentials of `kdist status|drain|scale`: the --key and --coordinator-key
 * values (NULL: not given), else $KDIST_KEY and $KDIST_COORDINATOR_KEY (read by
 * kd_curve_client_from_args), else, when run_dir (may be NULL) holds a recipe.yaml that turns
 * cluster.security.curve on, <keys_dir>/client.key and cluster.security.coordinator_key.
 * *on false: plaintext. 0, or -1 with err set (a CurveZMQ run with no key to be found says
 * which option to give). */
int cli_curve_credentials(const char *key_opt, const char *server_opt, const char *run_dir,
                          kd_curve_client_t *out, bool *on, char *err, size_t errlen);

/* The endpoint in DIR/coordinator.endpoint (one line, written atomically by the coordinator).
 * 0, or -1 with err set (naming the file) when it is missing or malformed. */
int cli_read_endpoint(const char *dir, char *out, size_t outlen, char *err, size_t errlen);
/* The coordinator's local control channel (ipc://, in a 0700 directory) from
 * DIR/coordinator.control: the way for stop, drain and checkpoint without an operator key.
 * 0, or -1 with err set when the file is missing (another machine, or no coordinator). */
int cli_read_control_endpoint(const char *dir, char *out, size_t outlen, char *err, size_t errlen);

/* ---- CurveZMQ keys of a cluster (kd_keygen.c) --------------------------------------------- */

/* The roles whose key pairs `kdist keygen --cluster DIR` writes (DIR/ROLE.key, DIR/ROLE.pub) and
 * `kdist run` reads from cluster.security.keys_dir. */
enum { CLI_KEY_COORDINATOR, CLI_KEY_TEACHER, CLI_KEY_WORKER, CLI_KEY_CLIENT, CLI_KEY_ROLES };
extern const char *const cli_key_roles[CLI_KEY_ROLES];

/* ---- one run on a local cluster (kd_run.c) ------------------------------------------------ */

#define CLI_RUN_MAX_OVERRIDES 72 /* the user's 64 and those kdist run adds (name, alpha, ...) */

typedef struct {
    const char *recipe_path;
    const char *const *overrides; /* "section.key=value", applied in order */
    int n_overrides;
    const char *run_dir; /* NULL: <logging.runs_dir>/<name> */
    bool resume;
} cli_run_spec_t;

/* Runs the recipe on a local cluster to its end and prints its summary. Returns 0 when it
 * completed (or stopped early) with every process clean, 1 when it failed or was interrupted,
 * 2 when the recipe (or an override) is wrong. */
int cli_run_cluster(const cli_run_spec_t *spec);
/* The directory the run of spec with the resolved recipe writes. 0, or -1 with err set. */
int cli_run_dir(const cli_run_spec_t *spec, const kd_recipe_t *recipe, char *out, size_t outlen,
                char *err, size_t errlen);
/* Whether Ctrl-C (or SIGTERM) came during a cli_run_cluster: nothing more should start. */
bool cli_run_interrupted(void);

/* ---- saved weights: eval and the comparison table (kd_compare.c) ------------------------- */

/* The recipe's student (or teacher) layers shaped for shape_from, with the weights at path.
 * Caller owns *out. 0, or -1 with err set (naming the file). */
int cli_load_weights(const kd_recipe_t *r, bool teacher, const kd_dataset_t *shape_from,
                     const char *path, kd_model_t **out, char *err, size_t errlen);

/* One row of the comparison: a label, a key for the JSON, the weights and which layers. */
typedef struct {
    const char *label; /* "teacher", "student alone", "distilled student" */
    const char *key;   /* "teacher", "student_alone", "distilled" */
    const char *weights;
    bool teacher;    /* the recipe's teacher layers, else its student layers */
    const char *run; /* the run directory the weights come from, or NULL */
} cli_compare_row_t;

/* Evaluates every row on the recipe's test split in this process (kd_evaluate, as `kdist
 * eval`), times forward passes in batches of CLI_COMPARE_BATCH with the recipe's thread
 * count, prints the table to stdout and writes it as JSON to json_path. A row whose weights
 * cannot be loaded is shown with its reason and makes the result -1 (err says which). */
#define CLI_COMPARE_BATCH 256
int cli_compare(const kd_recipe_t *r, const cli_compare_row_t *rows, int n_rows,
                const char *json_path, char *err, size_t errlen);

#endif
