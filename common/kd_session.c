/* kd_session: a node's session with the coordinator (see kd_session.h). */
#include "kd_session.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_log.h"
#include "kd_node.h"
#include "kd_util.h"

#define HELLO_INTERVAL 1.0 /* s: a client asked to say Hello again sooner gives up */
#define ID_LEN         64

struct kd_session {
    void *ctx, *dealer;
    Kdist__Role role;
    bool member; /* worker or teacher: Hello on every connection, reconnects by itself */
    char node_id[ID_LEN];
    char endpoint[KD_PATH_MAX];
    char stream_endpoint[KD_PATH_MAX];
    bool has_stream;
    uint32_t threads;
    bool curve_on;
    kd_curve_client_t curve;
    kd_curve_watch_t watch;
    bool broken_told;
    char prefix[32]; /* "" when the session does not log */
    char key_hint[128];

    uint64_t incarnation;
    bool joined;       /* a Welcome on this connection */
    bool say_hello;    /* on the next connection (clients: once the coordinator asked for one) */
    double hello_time; /* kd_now() of the last Hello on this connection; 0: none */
    double last_sent, last_heard, reconnect_at;
    int heartbeat_ms, timeout_ms;
    kd_backoff_t backoff;
    kd_log_limit_t send_limit;
};

static const char *role_name(Kdist__Role role) {
    switch (role) {
    case KDIST__ROLE__WORKER:
        return "worker";
    case KDIST__ROLE__TEACHER:
        return "teacher";
    default:
        return "client";
    }
}

/* "<prefix>-<what>" into buf. */
static const char *log_id(const kd_session_t *s, const char *what, char *buf, size_t len) {
    snprintf(buf, len, "%s-%s", s->prefix, what);
    return buf;
}

#define SESSION_LOG(s, level, what, ...)                                                           \
    do {                                                                                           \
        if ((s)->prefix[0]) {                                                                      \
            char id_[48];                                                                          \
            kd_log((level), log_id((s), (what), id_, sizeof id_), __VA_ARGS__);                    \
        }                                                                                          \
    } while (0)

kd_session_t *kd_session_new(void *ctx, const kd_session_config_t *cfg) {
    kd_session_t *s = kd_xcalloc(1, sizeof *s);
    s->ctx = ctx;
    s->role = cfg->role;
    s->member = cfg->role == KDIST__ROLE__WORKER || cfg->role == KDIST__ROLE__TEACHER;
    s->say_hello = s->member;
    snprintf(s->node_id, sizeof s->node_id, "%s", cfg->node_id ? cfg->node_id : "");
    snprintf(s->endpoint, sizeof s->endpoint, "%s", cfg->endpoint ? cfg->endpoint : "");
    s->has_stream = cfg->stream_endpoint != NULL;
    snprintf(s->stream_endpoint, sizeof s->stream_endpoint, "%s",
             cfg->stream_endpoint ? cfg->stream_endpoint : "");
    s->threads = cfg->threads;
    s->curve_on = cfg->curve != NULL;
    if (cfg->curve) s->curve = *cfg->curve;
    snprintf(s->prefix, sizeof s->prefix, "%s", cfg->log_prefix ? cfg->log_prefix : "");
    snprintf(s->key_hint, sizeof s->key_hint, "%s", cfg->key_hint ? cfg->key_hint : "");
    s->heartbeat_ms = cfg->heartbeat_ms;
    s->timeout_ms = cfg->timeout_ms;
    return s;
}

static void close_socket(kd_session_t *s) {
    kd_curve_watch_stop(&s->watch, s->dealer);
    if (s->dealer) zmq_close(s->dealer);
    s->dealer = NULL;
    s->joined = false;
    s->hello_time = 0;
}

void kd_session_destroy(kd_session_t **self_p) {
    if (!self_p || !*self_p) return;
    close_socket(*self_p);
    free(*self_p);
    *self_p = NULL;
}

int kd_session_send(kd_session_t *s, kd_env_t *env, const kd_wire_tensor_t *tensors, int n,
                    char *err, size_t errlen) {
    /* DONTWAIT: a coordinator that is not there yet must not block the node; the DEALER queues
     * the message until it connects, and only a full queue fails. */
    if (!s->dealer || kd_wire_send(s->dealer, NULL, 0, env, tensors, n, ZMQ_DONTWAIT) != 0) {
        const char *why = s->dealer ? zmq_strerror(errno) : "not connected";
        if (s->prefix[0] && kd_log_allow(&s->send_limit, 1.0))
            SESSION_LOG(s, KD_LOG_WARN, "SEND-FAIL", "cannot send %s to the coordinator: %s",
                        kd_wire_body_name(env), why);
        return kd_err(err, errlen, "cannot send to the coordinator at %s: %s", s->endpoint, why);
    }
    s->last_sent = kd_now();
    return 0;
}

static int send_hello(kd_session_t *s, char *err, size_t errlen) {
    char host[256];
    kd_node_hostname(host, sizeof host);
    Kdist__Hello hello = KDIST__HELLO__INIT;
    hello.role = s->role;
    hello.node_id = s->node_id;
    hello.incarnation = s->incarnation;
    hello.host = host;
    hello.pid = (uint32_t)getpid();
    hello.threads = s->threads;
    if (s->has_stream) hello.stream_endpoint = s->stream_endpoint;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    s->hello_time = kd_now();
    return kd_session_send(s, &env, NULL, 0, err, errlen);
}

int kd_session_connect(kd_session_t *s, char *err, size_t errlen) {
    close_socket(s);
    s->incarnation = kd_wire_new_incarnation();
    char identity[256];
    kd_wire_identity(identity, sizeof identity, role_name(s->role), s->node_id, s->incarnation);
    s->dealer =
        kd_socket_dealer_curve(s->ctx, identity, s->endpoint, s->heartbeat_ms,
                               s->curve_on ? &s->curve : NULL, &s->watch.monitor, err, errlen);
    if (!s->dealer) return -1;
    s->last_heard = s->last_sent = kd_now();
    if (!s->say_hello) return 0;
    send_hello(s, NULL, 0); /* a full queue now is a silent coordinator later: reconnected */
    if (s->has_stream)
        SESSION_LOG(s, KD_LOG_INFO, "HELLO", "said hello to %s as %s (streaming on %s)",
                    s->endpoint, identity, s->stream_endpoint);
    else
        SESSION_LOG(s, KD_LOG_INFO, "HELLO", "said hello to %s as %s", s->endpoint, identity);
    return 0;
}

void kd_session_lose(kd_session_t *s, const char *why) {
    int delay = kd_backoff_next(&s->backoff);
    SESSION_LOG(s, KD_LOG_WARN, "RECONNECT", "%s; saying hello again in %d ms", why, delay);
    close_socket(s);
    s->reconnect_at = kd_now() + delay / 1000.0;
}

/* A refused key or a plaintext/CurveZMQ mismatch does not heal by retrying: FATAL, with what to
 * fix. A wrong coordinator key shows only as handshakes the coordinator closes: said once, and
 * retried. */
static kd_session_event_t check_handshakes(kd_session_t *s, char *err, size_t errlen) {
    char why[KD_ERR_LEN];
    const kd_curve_client_t *curve = s->curve_on ? &s->curve : NULL;
    int verdict = kd_curve_watch_check(&s->watch, s->endpoint, curve, why, sizeof why);
    if (verdict == KD_CURVE_REFUSED || verdict == KD_CURVE_MISMATCH) {
        SESSION_LOG(s, KD_LOG_ERROR, "CURVE", "%s", why);
        kd_err(err, errlen, "%s", why);
        return KD_SESSION_FATAL;
    }
    if (curve && s->watch.broken > 0 && !s->broken_told) {
        SESSION_LOG(s, KD_LOG_WARN, "CURVE",
                    "the coordinator at %s closed %ld CurveZMQ handshake(s) unfinished: is %s its "
                    "public key (%s)?",
                    s->endpoint, s->watch.broken, curve->server_z85, s->key_hint);
        s->broken_told = true;
    }
    return KD_SESSION_IDLE;
}

kd_session_event_t kd_session_tick(kd_session_t *s, double now, char *err, size_t errlen) {
    if (!s->dealer) {
        if (now < s->reconnect_at || (!s->member && !s->say_hello)) return KD_SESSION_IDLE;
        if (kd_session_connect(s, err, errlen) != 0) {
            SESSION_LOG(s, KD_LOG_ERROR, "CONNECT", "%s", err);
            return KD_SESSION_FATAL;
        }
        return s->say_hello ? KD_SESSION_HELLO : KD_SESSION_IDLE;
    }
    if (check_handshakes(s, err, errlen) == KD_SESSION_FATAL) return KD_SESSION_FATAL;
    if (s->timeout_ms > 0 && now - s->last_heard > s->timeout_ms / 1000.0) {
        /* whether TCP got through tells a coordinator that is not there from one that is
         * there and silent */
        char why[96];
        snprintf(why, sizeof why, "%s (%ld TCP connection(s) made)",
                 s->joined ? "no word from the coordinator" : "no welcome from the coordinator",
                 s->watch.connected);
        kd_session_lose(s, why);
        return KD_SESSION_LOST;
    }
    return KD_SESSION_IDLE;
}

static kd_session_event_t refused(kd_session_t *s, kd_session_event_t ev, const char *reason,
                                  char *err, size_t errlen) {
    kd_err(err, errlen, "the coordinator at %s refused this %s: %s", s->endpoint,
           role_name(s->role), reason);
    if (ev == KD_SESSION_END)
        SESSION_LOG(s, KD_LOG_INFO, "REFUSED", "the run is finishing: exiting");
    else
        SESSION_LOG(s, KD_LOG_ERROR, "REFUSED", "the coordinator refused this %s: %s",
                    role_name(s->role), reason);
    return ev;
}

static kd_session_event_t on_refused(kd_session_t *s, const Kdist__Refused *r, char *err,
                                     size_t errlen) {
    const char *reason = r->reason && r->reason[0] ? r->reason : "(no reason)";
    switch (r->code) {
    case KDIST__REFUSAL_CODE__UNKNOWN_MEMBER:
        if (s->member) {
            kd_session_lose(s, "the coordinator does not know this incarnation");
            return KD_SESSION_LOST;
        }
        /* A client introduces itself when asked; asked again at once, it gives up. */
        if (s->hello_time > 0 && kd_now() - s->hello_time <= HELLO_INTERVAL)
            return refused(s, KD_SESSION_FATAL, reason, err, errlen);
        s->say_hello = true;
        return send_hello(s, err, errlen) == 0 ? KD_SESSION_HELLO : KD_SESSION_FATAL;
    case KDIST__REFUSAL_CODE__STALE_INCARNATION:
    case KDIST__REFUSAL_CODE__ID_IN_USE:
    case KDIST__REFUSAL_CODE__TOO_MANY_MEMBERS: /* transient: a fresh Hello after the back-off */
        s->say_hello = true;
        kd_session_lose(s, reason);
        return KD_SESSION_LOST;
    case KDIST__REFUSAL_CODE__RUN_FINISHING:
        return refused(s, KD_SESSION_END, reason, err, errlen);
    default:
        return refused(s, KD_SESSION_FATAL, reason, err, errlen);
    }
}

int kd_session_answer(const kd_session_handlers_t *h, void *node, kd_session_event_t ev,
                      const char *err) {
    switch (ev) {
    case KD_SESSION_IDLE:
        return KD_SESSION_GO_ON;
    case KD_SESSION_END: /* nothing left to do: a clean end */
        return KD_SESSION_STOP;
    case KD_SESSION_FATAL: /* logged by the session */
        return KD_SESSION_FAIL;
    default:
        return h->on_event(node, ev, err);
    }
}

int kd_session_pump(kd_session_t *s, const kd_session_handlers_t *h, void *node) {
    for (;;) {
        kd_msg_t msg;
        char err[KD_ERR_LEN];
        kd_session_event_t ev = kd_session_recv(s, &msg, err, sizeof err);
        if (ev == KD_SESSION_IDLE) return KD_SESSION_GO_ON;
        int action;
        if (ev == KD_SESSION_WELCOME || ev == KD_SESSION_MESSAGE) {
            action = h->on_message(node, &msg);
            kd_msg_close(&msg);
        } else {
            action = kd_session_answer(h, node, ev, err);
        }
        if (action != KD_SESSION_GO_ON) return action;
    }
}

kd_session_event_t kd_session_recv(kd_session_t *s, kd_msg_t *msg, char *err, size_t errlen) {
    while (s->dealer) {
        int rc = kd_wire_recv(s->dealer, false, ZMQ_DONTWAIT, msg, err, errlen);
        if (rc == KD_WIRE_NONE) return KD_SESSION_IDLE;
        if (rc == KD_WIRE_BAD) return KD_SESSION_BAD;
        if (rc == KD_WIRE_CLOSED) {
            SESSION_LOG(s, KD_LOG_ERROR, "SOCKET", "coordinator socket: %s", err);
            return KD_SESSION_FATAL;
        }
        s->last_heard = kd_now();
        kd_session_event_t ev = KD_SESSION_MESSAGE;
        switch (msg->env->body_case) {
        case KDIST__ENVELOPE__BODY_HEARTBEAT:
            kd_msg_close(msg);
            continue;
        case KDIST__ENVELOPE__BODY_REFUSED:
            ev = on_refused(s, msg->env->refused, err, errlen);
            kd_msg_close(msg);
            return ev;
        case KDIST__ENVELOPE__BODY_WELCOME:
            if (s->joined) {
                kd_msg_close(msg);
                kd_err(err, errlen, "a second welcome");
                return KD_SESSION_BAD;
            }
            s->joined = true;
            kd_backoff_reset(&s->backoff);
            return KD_SESSION_WELCOME;
        default:
            return ev;
        }
    }
    return KD_SESSION_IDLE;
}

bool kd_session_heartbeat_due(const kd_session_t *s, double now) {
    return s->dealer && s->joined && s->heartbeat_ms > 0 &&
           now - s->last_sent >= s->heartbeat_ms / 1000.0;
}

int kd_session_heartbeat(kd_session_t *s, Kdist__Heartbeat *hb) {
    hb->rss_bytes = kd_node_rss_bytes();
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = hb;
    return kd_session_send(s, &env, NULL, 0, NULL, 0);
}

void kd_session_goodbye(kd_session_t *s, const char *reason) {
    if (!s || !s->dealer) return;
    Kdist__Goodbye bye = KDIST__GOODBYE__INIT;
    bye.reason = (char *)reason;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_GOODBYE;
    env.goodbye = &bye;
    kd_session_send(s, &env, NULL, 0, NULL, 0);
    int linger = 1000;
    zmq_setsockopt(s->dealer, ZMQ_LINGER, &linger, sizeof linger);
}

void kd_session_set_timing(kd_session_t *s, int heartbeat_ms, int timeout_ms) {
    s->heartbeat_ms = heartbeat_ms;
    s->timeout_ms = timeout_ms;
}

double kd_session_deadline(const kd_session_t *s) {
    if (!s->dealer) return s->member || s->say_hello ? s->reconnect_at : kd_now() + 3600.0;
    double next = kd_now() + 3600.0;
    if (s->timeout_ms > 0 && s->last_heard + s->timeout_ms / 1000.0 < next)
        next = s->last_heard + s->timeout_ms / 1000.0;
    if (s->joined && s->heartbeat_ms > 0 && s->last_sent + s->heartbeat_ms / 1000.0 < next)
        next = s->last_sent + s->heartbeat_ms / 1000.0;
    return next;
}

void *kd_session_socket(const kd_session_t *s) {
    return s->dealer;
}

void *kd_session_monitor(const kd_session_t *s) {
    return s->watch.monitor;
}

long kd_session_unfinished_handshakes(const kd_session_t *s) {
    return s->watch.connected > 0 && !s->curve_on ? s->watch.broken : 0;
}

bool kd_session_joined(const kd_session_t *s) {
    return s->joined;
}

uint64_t kd_session_incarnation(const kd_session_t *s) {
    return s->incarnation;
}
