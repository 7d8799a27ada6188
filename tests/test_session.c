/* test_session: a node's session with the coordinator (kd_session.h), driven against a real
 * ROUTER on tcp://127.0.0.1:* that plays the coordinator in this process: Hello and Welcome,
 * heartbeats both ways, each refusal code (say Hello again, back-off then a fresh Hello, a
 * clean end, fatal with the reason), the coordinator's silence, a client's Hello on demand,
 * Goodbye, and a CurveZMQ client meeting a plaintext coordinator. Every wait is for an event,
 * with a deadline; times are only checked from below (a slow machine only waits longer). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kd_session.h"
#include "kd_test.h"
#include "kd_util.h"
#include "kd_wire.h"

#define DEADLINE 10.0 /* s: any event the tests wait for */

static char err[KD_ERR_LEN];

/* The coordinator's end. */
typedef struct {
    void *ctx, *router;
    char endpoint[256];
} coord_t;

static void coord_open(coord_t *c, void *ctx) {
    c->ctx = ctx;
    c->router = kd_socket_router(ctx, "tcp://127.0.0.1:*", 0, c->endpoint, sizeof c->endpoint, err,
                                 sizeof err);
    CHECK(c->router != NULL);
}

static kd_session_event_t pump(kd_session_t *s, double seconds);

/* The next message of body `body` (others are skipped), within DEADLINE, while the session s
 * (may be NULL) runs. */
static bool coord_expect(coord_t *c, kd_session_t *s, int body, kd_msg_t *m) {
    double deadline = kd_now() + DEADLINE;
    while (kd_now() < deadline) {
        zmq_pollitem_t it = {c->router, 0, ZMQ_POLLIN, 0};
        if (s)
            pump(s, 0.01);
        else
            zmq_poll(&it, 1, 100);
        if (kd_wire_recv(c->router, true, ZMQ_DONTWAIT, m, err, sizeof err) != KD_WIRE_OK) continue;
        if ((int)m->env->body_case == body) return true;
        kd_msg_close(m);
    }
    fprintf(stderr, "no %d message within %.0f s\n", body, DEADLINE);
    return false;
}

static void coord_welcome(coord_t *c, const kd_msg_t *to) {
    Kdist__Welcome wel = KDIST__WELCOME__INIT;
    wel.run_id = "test-run";
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
    env.welcome = &wel;
    CHECK(kd_wire_send(c->router, to->peer, to->peer_len, &env, NULL, 0, 0) == 0);
}

static void coord_heartbeat(coord_t *c, const kd_msg_t *to) {
    Kdist__Heartbeat hb = KDIST__HEARTBEAT__INIT;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    CHECK(kd_wire_send(c->router, to->peer, to->peer_len, &env, NULL, 0, 0) == 0);
}

/* Runs the session as a node's loop does (receive, tick, heartbeats, poll) until it reports an
 * event other than IDLE, or `seconds` pass (then IDLE). Messages are closed. */
static kd_session_event_t pump(kd_session_t *s, double seconds) {
    double deadline = kd_now() + seconds;
    err[0] = 0;
    for (;;) {
        kd_msg_t m;
        kd_session_event_t ev = kd_session_recv(s, &m, err, sizeof err);
        if (ev == KD_SESSION_WELCOME || ev == KD_SESSION_MESSAGE) kd_msg_close(&m);
        if (ev != KD_SESSION_IDLE) return ev;
        double now = kd_now();
        ev = kd_session_tick(s, now, err, sizeof err);
        if (ev != KD_SESSION_IDLE) return ev;
        if (kd_session_heartbeat_due(s, now)) {
            Kdist__Heartbeat hb = KDIST__HEARTBEAT__INIT;
            kd_session_heartbeat(s, &hb);
        }
        if (now >= deadline) return KD_SESSION_IDLE;
        double until = kd_session_deadline(s);
        if (until > deadline) until = deadline;
        int ms = (int)((until - now) * 1000.0) + 1;
        zmq_pollitem_t items[2] = {{kd_session_socket(s), 0, ZMQ_POLLIN, 0},
                                   {kd_session_monitor(s), 0, ZMQ_POLLIN, 0}};
        int n = items[0].socket ? (items[1].socket ? 2 : 1) : 0;
        zmq_poll(n ? items : NULL, n, ms > 100 ? 100 : ms);
    }
}

static kd_session_t *worker_session(void *ctx, const coord_t *c, int heartbeat_ms, int timeout_ms) {
    kd_session_config_t cfg = {.role = KDIST__ROLE__WORKER,
                               .node_id = "7",
                               .endpoint = c->endpoint,
                               .threads = 3,
                               .heartbeat_ms = heartbeat_ms,
                               .timeout_ms = timeout_ms,
                               .log_prefix = "TEST"};
    return kd_session_new(ctx, &cfg);
}

/* The session's Hello, checked; the message is left in *hello for the answer. */
static bool joined_hello(coord_t *c, kd_session_t *s, kd_msg_t *hello) {
    CHECK(pump(s, DEADLINE) == KD_SESSION_HELLO);
    if (!coord_expect(c, NULL, KDIST__ENVELOPE__BODY_HELLO, hello)) return false;
    const Kdist__Hello *h = hello->env->hello;
    CHECK(h->role == KDIST__ROLE__WORKER);
    CHECK(strcmp(h->node_id, "7") == 0);
    CHECK(h->incarnation == kd_session_incarnation(s) && h->incarnation != 0);
    CHECK(h->pid == (uint32_t)getpid());
    CHECK(h->threads == 3);
    char identity[128];
    kd_wire_identity(identity, sizeof identity, "worker", "7", h->incarnation);
    CHECK(hello->peer_len == strlen(identity) &&
          memcmp(hello->peer, identity, hello->peer_len) == 0);
    return true;
}

static void test_hello_welcome_heartbeats(void *ctx) {
    coord_t c;
    coord_open(&c, ctx);
    kd_session_t *s = worker_session(ctx, &c, 50, 5000);
    CHECK(!kd_session_joined(s));
    kd_msg_t hello;
    if (joined_hello(&c, s, &hello)) {
        coord_welcome(&c, &hello);
        CHECK(pump(s, DEADLINE) == KD_SESSION_WELCOME);
        CHECK(kd_session_joined(s));
        /* the member heartbeats once joined; the coordinator's heartbeats are taken */
        kd_msg_t hb;
        if (coord_expect(&c, s, KDIST__ENVELOPE__BODY_HEARTBEAT, &hb)) {
            CHECK(hb.env->heartbeat->rss_bytes > 0);
            kd_msg_close(&hb);
        }
        coord_heartbeat(&c, &hello);
        coord_welcome(&c, &hello); /* a second one is dropped, after the heartbeat was taken */
        CHECK(pump(s, DEADLINE) == KD_SESSION_BAD);
        CHECK_ERR_HAS(err, "second welcome");
        kd_session_goodbye(s, "done");
        kd_msg_t bye;
        if (coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_GOODBYE, &bye)) {
            CHECK(strcmp(bye.env->goodbye->reason, "done") == 0);
            kd_msg_close(&bye);
        }
        kd_msg_close(&hello);
    }
    kd_session_destroy(&s);
    CHECK(s == NULL);
    kd_session_destroy(&s); /* NULL-safe */
    zmq_close(c.router);
}

/* A refusal that makes the member reconnect: LOST, then after the back-off (100 ms, then
 * 200 ms) a Hello from a new incarnation. */
static void test_retried_refusals(void *ctx) {
    const Kdist__RefusalCode codes[] = {
        KDIST__REFUSAL_CODE__UNKNOWN_MEMBER, KDIST__REFUSAL_CODE__STALE_INCARNATION,
        KDIST__REFUSAL_CODE__ID_IN_USE, KDIST__REFUSAL_CODE__TOO_MANY_MEMBERS};
    coord_t c;
    coord_open(&c, ctx);
    kd_session_t *s = worker_session(ctx, &c, 1000, 30000);
    kd_msg_t hello;
    if (!joined_hello(&c, s, &hello)) goto out;
    const double expect_ms[] = {100, 200, 400, 800};
    for (int i = 0; i < 4; i++) {
        uint64_t old = hello.env->hello->incarnation;
        CHECK(kd_wire_send_refused(c.router, hello.peer, hello.peer_len, codes[i], "try later") ==
              0);
        kd_msg_close(&hello);
        CHECK(pump(s, DEADLINE) == KD_SESSION_LOST);
        CHECK(kd_session_socket(s) == NULL);
        double lost = kd_now();
        CHECK(kd_session_deadline(s) - lost <= expect_ms[i] / 1000.0 + 1e-6); /* when it says */
        if (!joined_hello(&c, s, &hello)) goto out;
        CHECK(kd_now() - lost >= expect_ms[i] / 1000.0 * 0.9); /* ... and not before */
        CHECK(hello.env->hello->incarnation != old);
    }
    /* a Welcome resets the back-off */
    coord_welcome(&c, &hello);
    CHECK(pump(s, DEADLINE) == KD_SESSION_WELCOME);
    CHECK(kd_wire_send_refused(c.router, hello.peer, hello.peer_len,
                               KDIST__REFUSAL_CODE__UNKNOWN_MEMBER, "say hello") == 0);
    kd_msg_close(&hello);
    CHECK(pump(s, DEADLINE) == KD_SESSION_LOST);
    CHECK(kd_session_deadline(s) - kd_now() <= 0.1 + 1e-6); /* 100 ms again, not 1.6 s */
    if (joined_hello(&c, s, &hello)) kd_msg_close(&hello);
out:
    kd_session_destroy(&s);
    zmq_close(c.router);
}

/* RUN_FINISHING ends cleanly; every other code is fatal with its reason. */
static void test_final_refusals(void *ctx) {
    const struct {
        Kdist__RefusalCode code;
        kd_session_event_t want;
    } cases[] = {{KDIST__REFUSAL_CODE__RUN_FINISHING, KD_SESSION_END},
                 {KDIST__REFUSAL_CODE__WRONG_RUN, KD_SESSION_FATAL},
                 {KDIST__REFUSAL_CODE__WRONG_PROTOCOL, KD_SESSION_FATAL},
                 {KDIST__REFUSAL_CODE__NOT_AUTHORIZED, KD_SESSION_FATAL},
                 {KDIST__REFUSAL_CODE__BAD_HELLO, KD_SESSION_FATAL},
                 {KDIST__REFUSAL_CODE__EVICTED, KD_SESSION_FATAL},
                 {KDIST__REFUSAL_CODE__REFUSAL_UNSPECIFIED, KD_SESSION_FATAL}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        coord_t c;
        coord_open(&c, ctx);
        kd_session_t *s = worker_session(ctx, &c, 1000, 30000);
        kd_msg_t hello;
        if (joined_hello(&c, s, &hello)) {
            char reason[64];
            snprintf(reason, sizeof reason, "reason number %zu", i);
            CHECK(kd_wire_send_refused(c.router, hello.peer, hello.peer_len, cases[i].code,
                                       reason) == 0);
            kd_msg_close(&hello);
            CHECK(pump(s, DEADLINE) == cases[i].want);
            CHECK_ERR_HAS(err, reason);
        }
        kd_session_destroy(&s);
        zmq_close(c.router);
    }
}

/* A coordinator that falls silent: after timeout_ms the member reconnects and says Hello. */
static void test_silence(void *ctx) {
    coord_t c;
    coord_open(&c, ctx);
    kd_session_t *s = worker_session(ctx, &c, 50, 300);
    kd_msg_t hello;
    if (joined_hello(&c, s, &hello)) {
        coord_welcome(&c, &hello);
        CHECK(pump(s, DEADLINE) == KD_SESSION_WELCOME);
        double t0 = kd_now();
        CHECK(pump(s, DEADLINE) == KD_SESSION_LOST);
        CHECK(kd_now() - t0 >= 0.3 * 0.9);
        CHECK(!kd_session_joined(s));
        kd_msg_close(&hello);
        if (joined_hello(&c, s, &hello)) kd_msg_close(&hello);
    }
    /* not yet welcomed counts the same */
    CHECK(pump(s, DEADLINE) == KD_SESSION_LOST);
    kd_session_destroy(&s);
    zmq_close(c.router);
}

/* A client speaks first and says Hello only when asked, once a second at most. */
static void test_client(void *ctx) {
    coord_t c;
    coord_open(&c, ctx);
    kd_session_config_t cfg = {
        .role = KDIST__ROLE__CLIENT, .node_id = "42", .endpoint = c.endpoint};
    kd_session_t *s = kd_session_new(ctx, &cfg);
    CHECK(kd_session_connect(s, err, sizeof err) == 0);
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__STATUS;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    CHECK(kd_session_send(s, &env, NULL, 0, err, sizeof err) == 0);
    kd_msg_t m;
    if (coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_CONTROL, &m)) {
        kd_wire_send_refused(c.router, m.peer, m.peer_len, KDIST__REFUSAL_CODE__UNKNOWN_MEMBER,
                             "say hello");
        kd_msg_close(&m);
        CHECK(pump(s, DEADLINE) == KD_SESSION_HELLO);
        if (coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_HELLO, &m)) {
            CHECK(m.env->hello->role == KDIST__ROLE__CLIENT);
            kd_wire_send_refused(c.router, m.peer, m.peer_len, KDIST__REFUSAL_CODE__UNKNOWN_MEMBER,
                                 "say hello");
            kd_msg_close(&m);
            kd_session_event_t ev = pump(s, DEADLINE);
            CHECK(ev == KD_SESSION_FATAL || ev == KD_SESSION_HELLO); /* HELLO: a stalled second */
            if (ev == KD_SESSION_FATAL) CHECK_ERR_HAS(err, "refused");
        }
    }
    /* no heartbeats and no silence timeout for a client */
    CHECK(!kd_session_heartbeat_due(s, kd_now() + 100));
    kd_session_destroy(&s);
    zmq_close(c.router);
}

/* A CurveZMQ client of a plaintext coordinator: a clear error, not endless retries. */
static void test_curve_mismatch(void *ctx) {
    coord_t c;
    coord_open(&c, ctx);
    kd_curve_client_t curve;
    memset(&curve, 0, sizeof curve);
    char server_secret[41];
    CHECK(zmq_curve_keypair(curve.self.public_z85, curve.self.secret_z85) == 0);
    CHECK(zmq_curve_keypair(curve.server_z85, server_secret) == 0);
    kd_session_config_t cfg = {.role = KDIST__ROLE__WORKER,
                               .node_id = "9",
                               .endpoint = c.endpoint,
                               .curve = &curve,
                               .heartbeat_ms = 1000,
                               .timeout_ms = 60000,
                               .log_prefix = "TEST",
                               .key_hint = "--coordinator-key"};
    kd_session_t *s = kd_session_new(ctx, &cfg);
    CHECK(pump(s, DEADLINE) == KD_SESSION_HELLO);
    CHECK(pump(s, DEADLINE) == KD_SESSION_FATAL);
    CHECK_ERR_HAS(err, c.endpoint);
    CHECK_ERR_HAS(err, "CurveZMQ");
    kd_session_destroy(&s);
    zmq_close(c.router);
}

int main(void) {
    void *ctx = zmq_ctx_new();
    test_hello_welcome_heartbeats(ctx);
    test_retried_refusals(ctx);
    test_final_refusals(ctx);
    test_silence(ctx);
    test_client(ctx);
    test_curve_mismatch(ctx);
    zmq_ctx_term(ctx);
    return kd_test_done("test_session");
}
