/* kd_session: a node's session with the coordinator (docs/protocol.md, "Joining" and
 * "Liveness"), the same for workers, teacher nodes and the command-line clients. It owns the
 * DEALER (plaintext or CurveZMQ) and the monitor of its handshakes: it says Hello with a fresh
 * incarnation, takes Welcome, acts on Refused by its code, keeps the heartbeats going both
 * ways, reconnects with back-off when the coordinator falls silent or forgets it, and says
 * Goodbye. The caller owns the ZeroMQ context and handles every other message.
 * Not thread-safe: a session belongs to the thread that polls it. */
#ifndef KD_SESSION_H
#define KD_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_curve.h"
#include "kd_wire.h"

typedef struct kd_session kd_session_t;

typedef struct {
    Kdist__Role role;               /* WORKER, TEACHER: members; CLIENT: kdist status, run, scale */
    const char *node_id;            /* copied; at most 63 characters */
    const char *endpoint;           /* the coordinator's; copied */
    const kd_curve_client_t *curve; /* NULL: plaintext; copied */
    const char *stream_endpoint;    /* teachers: announced in Hello; copied; else NULL */
    uint32_t threads;               /* workers: announced in Hello */
    int heartbeat_ms;               /* interval of our heartbeats (and ZMTP's); 0: none (clients) */
    int timeout_ms; /* coordinator silence that makes a member reconnect; 0: never */
    /* Log ids are "<log_prefix>-HELLO", "-RECONNECT", "-REFUSED", "-CURVE", "-CONNECT",
     * "-SOCKET", "-SEND-FAIL"; NULL: the session logs nothing (clients report through err). */
    const char *log_prefix;
    const char *key_hint; /* where the coordinator's key came from ("--coordinator-key") */
} kd_session_config_t;

/* What kd_session_tick and kd_session_recv report. */
typedef enum {
    KD_SESSION_IDLE = 0, /* nothing for the caller (recv: nothing is waiting) */
    KD_SESSION_WELCOME,  /* *msg is the Welcome: the session is joined; caller closes msg */
    KD_SESSION_MESSAGE,  /* *msg is any other message for the caller; caller closes msg */
    KD_SESSION_HELLO,    /* a Hello just went out: a client sends its last request again */
    KD_SESSION_LOST,     /* the connection is closed; a fresh Hello follows after the back-off:
                            forget what was in flight */
    KD_SESSION_BAD,      /* a malformed or unexpected message was dropped: err says what;
                            count it */
    KD_SESSION_END,      /* the run is finishing (Refused RUN_FINISHING): a clean end */
    KD_SESSION_FATAL     /* err says why (logged already with a log_prefix); retrying cannot
                            help: a refusal, a refused key, a plaintext/CurveZMQ mismatch */
} kd_session_event_t;

/* A session of cfg (copied) on ctx, not connected yet: members connect on the first
 * kd_session_tick, clients call kd_session_connect. Caller owns the result. */
kd_session_t *kd_session_new(void *ctx, const kd_session_config_t *cfg);
/* Closes the socket and its monitor without a Goodbye; NULL-safe, nulls *self_p. Call before
 * zmq_ctx_term of the context. */
void kd_session_destroy(kd_session_t **self_p);

/* A new DEALER with a fresh incarnation now; members say Hello on it, clients only when the
 * coordinator asks (UNKNOWN_MEMBER). 0, or -1 with err set. */
int kd_session_connect(kd_session_t *s, char *err, size_t errlen);

/* The session's own work, once per loop turn: the handshake verdicts, the coordinator's
 * silence (LOST), and the reconnect when its back-off is over (HELLO, or FATAL when the
 * socket cannot be made). Returns IDLE, HELLO, LOST or FATAL. */
kd_session_event_t kd_session_tick(kd_session_t *s, double now, char *err, size_t errlen);

/* One message off the DEALER without blocking. Heartbeats are taken; Refused is acted on by
 * its code: UNKNOWN_MEMBER says Hello again (members: on a new connection after the
 * back-off, LOST; clients: on this one, at most once a second, HELLO); STALE_INCARNATION,
 * ID_IN_USE and TOO_MANY_MEMBERS reconnect after the back-off (LOST); RUN_FINISHING is END;
 * every other code is FATAL with its reason. A second Welcome is BAD. */
kd_session_event_t kd_session_recv(kd_session_t *s, kd_msg_t *msg, char *err, size_t errlen);

/* What a node's handlers answer: go on reading, stop cleanly, or fail. */
enum { KD_SESSION_GO_ON = 0, KD_SESSION_STOP = 1, KD_SESSION_FAIL = -1 };
typedef struct {
    /* the Welcome and every message for the node; the message is closed afterwards */
    int (*on_message)(void *node, kd_msg_t *msg);
    /* HELLO, LOST and BAD (err says what was dropped); END and FATAL need no handler */
    int (*on_event)(void *node, kd_session_event_t ev, const char *err);
} kd_session_handlers_t;
/* Hands everything waiting on the session to the node until nothing is left (GO_ON) or a
 * handler answers otherwise; END is STOP, FATAL is FAIL. */
int kd_session_pump(kd_session_t *s, const kd_session_handlers_t *h, void *node);
/* The answer to one event (of kd_session_tick, say): IDLE is GO_ON, END is STOP, FATAL is
 * FAIL, the others go to h->on_event. */
int kd_session_answer(const kd_session_handlers_t *h, void *node, kd_session_event_t ev,
                      const char *err);

/* Drops the connection (why is logged) and schedules a fresh Hello after the back-off. */
void kd_session_lose(kd_session_t *s, const char *why);

/* Sends env and its tensors without blocking (kd_wire_send). 0, or -1 with err set (may be
 * NULL) and, with a log_prefix, a warning at most once a second. */
int kd_session_send(kd_session_t *s, kd_env_t *env, const kd_wire_tensor_t *tensors, int n,
                    char *err, size_t errlen);
/* Whether a joined member has been quiet for heartbeat_ms. */
bool kd_session_heartbeat_due(const kd_session_t *s, double now);
/* Sends hb (its rss_bytes filled in here). 0 or -1. */
int kd_session_heartbeat(kd_session_t *s, Kdist__Heartbeat *hb);
/* Sends Goodbye{reason} and gives the DEALER a second to flush it when it closes. */
void kd_session_goodbye(kd_session_t *s, const char *reason);

/* New intervals, from the Welcome or the adopted recipe (see kd_session_config_t). */
void kd_session_set_timing(kd_session_t *s, int heartbeat_ms, int timeout_ms);
/* The kd_now() time by which kd_session_tick wants to run again (heartbeat, silence or
 * reconnect); callers bound their poll timeout by it. */
double kd_session_deadline(const kd_session_t *s);

void *kd_session_socket(const kd_session_t *s);  /* the DEALER, NULL while disconnected */
void *kd_session_monitor(const kd_session_t *s); /* its handshake monitor, for zmq_poll; or NULL */
/* Connections of a keyless session that the peer closed before the handshake ended: what a
 * CurveZMQ server does to a plaintext client when its mechanism error does not arrive first. */
long kd_session_unfinished_handshakes(const kd_session_t *s);
bool kd_session_joined(const kd_session_t *s); /* a Welcome came on this connection */
uint64_t kd_session_incarnation(const kd_session_t *s);

#endif
