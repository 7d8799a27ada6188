/* kd_curve: CurveZMQ for kdist (docs/security.md). Key files as `kdist keygen` writes them, the
 * set of public keys a server admits (cluster.security.authorized_keys), CURVE options on
 * sockets, a ZAP handler that refuses every other key, and the client-side reading of a refused
 * handshake. Key parsing and socket set-up are thread-safe; a kd_zap_t is an actor thread
 * owned by the thread that started it. */
#ifndef KD_CURVE_H
#define KD_CURVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_recipe.h"

#define KD_CURVE_Z85_LEN    40   /* characters of a Z85-encoded 32-byte key */
#define KD_CURVE_MAX_KEYS   4096 /* authorized keys once directories are expanded */
#define KD_CURVE_ENV_KEY    "KDIST_KEY"
#define KD_CURVE_ENV_SERVER "KDIST_COORDINATOR_KEY"

/* One node's key pair; secret is "" when only the public half is known. */
typedef struct {
    char public_z85[KD_CURVE_Z85_LEN + 1];
    char secret_z85[KD_CURVE_Z85_LEN + 1];
} kd_curve_pair_t;

/* What a CURVE client needs: its own pair and the server's public key. */
typedef struct {
    kd_curve_pair_t self;
    char server_z85[KD_CURVE_Z85_LEN + 1];
} kd_curve_client_t;

/* ---- keys and key files --------------------------------------------------------------------- */

/* Whether text is exactly a Z85-encoded 32-byte key (40 characters of the Z85 alphabet). */
bool kd_curve_is_z85(const char *text);

/* A key file is text: comment lines (#), `public-key = "Z85"` and `secret-key = "Z85"` lines
 * (quotes optional; the layout of czmq's zcert files, whose `metadata`/`curve` section lines and
 * other `name = value` lines are ignored), or a single bare Z85 line (a public key). `kdist
 * keygen NAME` writes NAME.key (both keys, mode 0600) and NAME.pub (the public one).
 * Parses text; name stands for the file in messages ("name:line: ..."). The public key is
 * derived from the secret one when the file gives only the secret; when it gives both they
 * must belong together. 0, or -1 with err set. */
int kd_curve_parse_keys(const char *name, const char *text, size_t len, kd_curve_pair_t *out,
                        char *err, size_t errlen);
/* A key pair from path: the secret key is required (a .pub file is an error that says so). A
 * secret file that others may read is accepted with a warning in the log. */
int kd_curve_load_pair(const char *path, kd_curve_pair_t *out, char *err, size_t errlen);
/* A public key given as Z85 text, or as the path of any key file (its public half). what names
 * the setting in messages ("--coordinator-key", "cluster.security.coordinator_key"). */
int kd_curve_load_public(const char *z85_or_path, const char *what, char out[KD_CURVE_Z85_LEN + 1],
                         char *err, size_t errlen);
/* A fresh pair (zmq_curve_keypair) written as dir/name.key (0600) and dir/name.pub (0644).
 * Existing files are an error unless force (then both are replaced atomically). */
int kd_curve_generate(const char *dir, const char *name, bool force, kd_curve_pair_t *out,
                      char *err, size_t errlen);

/* ---- the authorized keys ------------------------------------------------------------------ */

typedef struct {
    int n;
    char keys[KD_CURVE_MAX_KEYS][KD_CURVE_Z85_LEN + 1];
} kd_curve_keyset_t;

/* The keys a teacher's stream admits: the recipe's cluster.security.authorized_keys and
 * worker_keys, each entry a Z85 key, a key file (its public half) or a directory (every *.pub
 * file in it). An empty result is an error: a server that admits nobody is a mistake.
 * recipe_name names the recipe in messages. Caller owns *out (free it with free()). */
int kd_curve_keyset_load(const kd_recipe_t *r, const char *recipe_name, kd_curve_keyset_t **out,
                         char *err, size_t errlen);
bool kd_curve_keyset_has(const kd_curve_keyset_t *set, const char *z85);

/* What a key may do (DESIGN §10). Member keys (authorized_keys) join as a worker or a teacher
 * node, worker_keys and teacher_keys only as that role; operator_keys may also stop, drain and
 * checkpoint; status_keys may only ask for status. */
typedef enum {
    KD_CURVE_MEMBER = 0, /* cluster.security.authorized_keys */
    KD_CURVE_WORKER,     /* cluster.security.worker_keys */
    KD_CURVE_TEACHER,    /* cluster.security.teacher_keys */
    KD_CURVE_OPERATOR,   /* cluster.security.operator_keys */
    KD_CURVE_STATUS,     /* cluster.security.status_keys */
    KD_CURVE_ROLES
} kd_curve_role_t;

typedef struct {
    kd_curve_keyset_t *sets[KD_CURVE_ROLES];
    kd_curve_keyset_t *all; /* every listed key: what the coordinator's ZAP handler admits */
} kd_curve_roles_t;

/* Loads every role's list; no key at all is an error. Free with kd_curve_roles_free. */
int kd_curve_roles_load(const kd_recipe_t *r, const char *recipe_name, kd_curve_roles_t *out,
                        char *err, size_t errlen);
void kd_curve_roles_free(kd_curve_roles_t *roles);
bool kd_curve_role_has(const kd_curve_roles_t *roles, kd_curve_role_t role, const char *z85);
const char *kd_curve_role_list(kd_curve_role_t role); /* "worker_keys", ... */

/* Binding `endpoint` without CurveZMQ is allowed only on loopback, ipc:// or inproc://, unless
 * the recipe says cluster.security.allow_plaintext. what names the setting ("cluster.bind",
 * "--stream-bind"). 0, or -1 with err naming the keys to set. */
int kd_curve_check_plaintext_bind(const kd_recipe_t *r, const char *endpoint, const char *what,
                                  char *err, size_t errlen);

/* ---- the server side (socket options: kd_wire_curve_server, _client, _server_key) -------- */

/* The ZAP handler (ZeroMQ RFC 27) of one context: admits CURVE clients whose key is in keys
 * (copied) with their Z85 key as the User-Id (zmq_msg_gets(msg, "User-Id")), answers 400 to
 * every other key and logs it with the peer's address and key under log_id (at most once a
 * second). Libzmq lets any key in while a context has no handler, so start it before the
 * first server socket of ctx binds. Returns NULL with err set. */
typedef struct kd_zap kd_zap_t;
kd_zap_t *kd_zap_new(void *ctx, const kd_curve_keyset_t *keys, const char *log_id, char *err,
                     size_t errlen);
/* Keys refused so far (any thread). */
long kd_zap_refused(const kd_zap_t *z);
/* False once the handler thread has died: no connection is admitted any more. */
bool kd_zap_alive(const kd_zap_t *z);
/* Stops and joins the thread; NULL-safe; call before zmq_ctx_term of its context. */
void kd_zap_destroy(kd_zap_t **self_p);

/* ---- the client's view of its handshakes -------------------------------------------------- */

enum {
    KD_CURVE_PENDING = 0,  /* nothing conclusive yet */
    KD_CURVE_OK = 1,       /* a handshake completed */
    KD_CURVE_REFUSED = -1, /* the server refused our key (or, plaintext, our address) */
    KD_CURVE_MISMATCH = -2 /* one side speaks CurveZMQ and the other does not */
};

/* A monitor of a connecting socket's handshake events. */
typedef struct {
    void *monitor;   /* PAIR receiving the events; NULL when not started */
    bool connecting; /* a connection is up and its handshake not done */
    long broken;     /* handshakes the server closed without a verdict (a wrong server key) */
    long connected;  /* TCP connections made (what a silent coordinator is told apart by) */
} kd_curve_watch_t;
/* Starts watching sock (before it connects; kd_socket_dealer_curve makes the monitor itself);
 * 0, or -1 with err set. */
int kd_curve_watch_start(kd_curve_watch_t *w, void *ctx, void *sock, const char *name, char *err,
                         size_t errlen);
/* Stops watching sock and closes the monitor; safe on a watch never started. Call before closing
 * sock. */
void kd_curve_watch_stop(kd_curve_watch_t *w, void *sock);
/* Drains the monitor without blocking and returns the worst outcome seen (one of the values
 * above); on a failure why says what to fix, naming the endpoint and, with curve, our public
 * key. Broken handshakes only count in w->broken: the client keeps retrying those. */
int kd_curve_watch_check(kd_curve_watch_t *w, const char *endpoint, const kd_curve_client_t *curve,
                         char *why, size_t whylen);

/* ---- command-line and environment --------------------------------------------------------- */

/* A node's client credentials from --key/--coordinator-key values (NULL: not given), falling
 * back on KDIST_KEY and KDIST_COORDINATOR_KEY. *on says whether a key was found; a key without
 * a server key, or a server key without a key, is an error. server_fallback (may be NULL or "")
 * is used when neither the option nor the environment names the server key (the teacher's
 * recipe carries cluster.security.coordinator_key). 0, or -1 with err set. */
int kd_curve_client_from_args(const char *key_opt, const char *server_opt,
                              const char *server_fallback, kd_curve_client_t *out, bool *on,
                              char *err, size_t errlen);

#endif
