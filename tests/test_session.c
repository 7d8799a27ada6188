/* test_session: a node's session with the coordinator (kd_session.h), driven against a real
 * ROUTER on tcp://127.0.0.1:* that plays the coordinator in this process: Hello and Welcome,
 * heartbeats both ways, each refusal code (say Hello again, back-off then a fresh Hello, a
 * clean end, fatal with the reason), the coordinator's silence, a client's Hello on demand,
 * Goodbye, and a CurveZMQ client meeting a plaintext coordinator. Then a real kdist-worker
 * against that coordinator and two teachers played with PUSH sockets: it follows the teacher
 * set exactly (a teacher no longer listed is disconnected) and nacks the batches it cannot use
 * (NaN teacher logits, a label out of range) and carries on. Every wait is for an event, with
 * a deadline; times are only checked from below (a slow machine only waits longer). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zmq.h>

#include "kd_checkpoint.h"
#include "kd_model.h"
#include "kd_recipe.h"
#include "kd_session.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
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

/* A loopback endpoint nobody listens on: a port the kernel gave and took back (closing a plain
 * socket is synchronous; zmq_close is not). */
static void free_endpoint(char *endpoint, size_t len) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
          getsockname(fd, (struct sockaddr *)&a, &alen) == 0);
    close(fd);
    snprintf(endpoint, len, "tcp://127.0.0.1:%u", ntohs(a.sin_port));
}

/* Whether the next message router receives (peer id, then body) has body `body`, within its
 * receive timeout. */
static bool recv_body(void *router, const char *body) {
    char frame[64];
    int n = zmq_recv(router, frame, sizeof frame, 0); /* the peer's id */
    if (n < 0) return false;
    n = zmq_recv(router, frame, sizeof frame, 0);
    return n == (int)strlen(body) && memcmp(frame, body, (size_t)n) == 0;
}

/* A monitored socket whose monitor is closed, then connects (its coordinator is back): the
 * context's other sockets still reach their peers. libzmq sends monitor events from the I/O
 * thread with a blocking send, so a reader closed before the socket stops monitoring wedged
 * that thread and a restarted coordinator never heard from the node again. */
static void test_monitor_close_keeps_context(void) {
    void *ctx = zmq_ctx_new();
    char endpoint[256];
    free_endpoint(endpoint, sizeof endpoint); /* the coordinator is down; its port is known */
    kd_curve_watch_t watch = {0};
    void *old = kd_socket_dealer_curve(ctx, "worker-7-1", endpoint, 0, NULL, &watch.monitor, err,
                                       sizeof err);
    CHECK(old != NULL);
    CHECK(zmq_send(old, "early", 5, 0) == 5); /* queued until it connects */
    kd_curve_watch_stop(&watch, old);         /* the session gives up on it ... */
    void *back = zmq_socket(ctx, ZMQ_ROUTER); /* ... the coordinator comes back ... */
    int zero = 0;
    zmq_setsockopt(back, ZMQ_LINGER, &zero, sizeof zero);
    int timeout_ms = (int)(DEADLINE * 1000);
    zmq_setsockopt(back, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    CHECK(kd_socket_bind(back, endpoint, NULL, 0, err, sizeof err) == 0);
    CHECK(recv_body(back, "early")); /* the old socket connected (its event was not sent) */
    void *fresh = kd_socket_dealer(ctx, "worker-7-2", endpoint, 0, err, sizeof err);
    CHECK(fresh != NULL);
    CHECK(zmq_send(fresh, "hello", 5, 0) == 5);
    CHECK(recv_body(back, "hello")); /* ... and the context's next socket reaches it */
    zmq_close(old);
    zmq_close(fresh);
    zmq_close(back);
    zmq_ctx_term(ctx);
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

/* ---- a real worker ---------------------------------------------------------------------- */

static const char WORKER_RECIPE[] = "name: session_test\n"
                                    "seed: 1\n"
                                    "student:\n"
                                    "  layers:\n"
                                    "    - {type: flatten}\n"
                                    "    - {type: linear, out_features: 3}\n"
                                    "distill:\n"
                                    "  alpha: 0.5\n"
                                    "train:\n"
                                    "  epochs: 2\n"
                                    "  batch_size: 4\n"
                                    "cluster:\n"
                                    "  heartbeat_ms: 200\n"
                                    "  heartbeat_timeout_ms: 60000\n"
                                    "  shared_memory: false\n";

/* A teacher's stream socket with a monitor of its connections. */
typedef struct {
    void *push, *monitor;
    char endpoint[256];
} teacher_t;

static void teacher_open(teacher_t *t, void *ctx, const char *name) {
    t->push = zmq_socket(ctx, ZMQ_PUSH);
    int zero = 0;
    zmq_setsockopt(t->push, ZMQ_LINGER, &zero, sizeof zero);
    t->monitor = kd_wire_monitor_events(
        ctx, t->push, name, ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED, err, sizeof err);
    CHECK(t->monitor != NULL);
    CHECK(kd_socket_bind(t->push, "tcp://127.0.0.1:*", t->endpoint, sizeof t->endpoint, err,
                         sizeof err) == 0);
}

static void teacher_close(teacher_t *t) {
    kd_wire_monitor_close(t->push, t->monitor);
    zmq_close(t->push);
}

/* Waits for a connection event (ZMQ_EVENT_ACCEPTED, _DISCONNECTED) on t's stream socket. */
static bool teacher_event(teacher_t *t, int want) {
    double deadline = kd_now() + DEADLINE;
    while (kd_now() < deadline) {
        zmq_pollitem_t it = {t->monitor, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 100) <= 0) continue;
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        zmq_msg_init(&addr);
        int n = zmq_msg_recv(&ev, t->monitor, 0);
        if (zmq_msg_more(&ev)) zmq_msg_recv(&addr, t->monitor, 0);
        uint16_t event = 0;
        if (n >= 2) memcpy(&event, zmq_msg_data(&ev), sizeof event);
        zmq_msg_close(&ev);
        zmq_msg_close(&addr);
        if (event == want) return true;
    }
    fprintf(stderr, "no connection event %d on %s within %.0f s\n", want, t->endpoint, DEADLINE);
    return false;
}

/* Batch 0/batch_id of 4 samples (1x2x2 pixels, 3 classes) with these labels and teacher
 * logits. */
static void teacher_send(teacher_t *t, uint32_t batch_id, const int32_t labels[4],
                         const float logits[12]) {
    static const uint8_t pixels[16] = {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110};
    kd_wire_tensor_t tensors[3] = {{.name = "inputs",
                                    .dtype = KD_DTYPE_U8,
                                    .ndim = 4,
                                    .shape = {4, 1, 2, 2},
                                    .data = pixels,
                                    .nbytes = sizeof pixels},
                                   {.name = "labels",
                                    .dtype = KD_DTYPE_I32,
                                    .ndim = 1,
                                    .shape = {4},
                                    .data = labels,
                                    .nbytes = 4 * sizeof *labels},
                                   {.name = "teacher_logits",
                                    .dtype = KD_DTYPE_F32,
                                    .ndim = 2,
                                    .shape = {4, 3},
                                    .data = logits,
                                    .nbytes = 12 * sizeof *logits}};
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.batch_id = batch_id;
    Kdist__Batch batch = KDIST__BATCH__INIT;
    batch.ref = &ref;
    batch.teacher_id = "t";
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_BATCH;
    env.batch = &batch;
    CHECK(kd_wire_send(t->push, NULL, 0, &env, tensors, 3, 0) == 0);
}

static void coord_peers(coord_t *c, const kd_msg_t *to, char **endpoints, size_t n) {
    Kdist__Peers peers = KDIST__PEERS__INIT;
    peers.teacher_endpoints = endpoints;
    peers.n_teacher_endpoints = n;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PEERS;
    env.peers = &peers;
    CHECK(kd_wire_send(c->router, to->peer, to->peer_len, &env, NULL, 0, 0) == 0);
}

/* The Welcome a coordinator of WORKER_RECIPE sends, with the weights and one teacher. */
static bool coord_welcome_worker(coord_t *c, const kd_msg_t *to, char *teacher) {
    kd_recipe_t r;
    kd_model_t *model = NULL;
    const kd_shape_t shape = {1, 2, 2};
    if (kd_recipe_parse("test", WORKER_RECIPE, strlen(WORKER_RECIPE), NULL, 0, &r, err,
                        sizeof err) != 0 ||
        kd_model_new(r.student.layers, r.student.n_layers, shape, &model, err, sizeof err) != 0) {
        fprintf(stderr, "test recipe: %s\n", err);
        CHECK(false);
        return false;
    }
    char spec[1024];
    kd_model_describe(model, spec, sizeof spec);
    Kdist__Shape in = KDIST__SHAPE__INIT;
    in.c = 1, in.h = 2, in.w = 2;
    Kdist__Welcome wel = KDIST__WELCOME__INIT;
    wel.run_id = "test-run";
    wel.recipe_yaml = (char *)WORKER_RECIPE;
    wel.model_spec = spec;
    wel.input = &in;
    wel.num_classes = 3;
    wel.n_params = model->n_params;
    wel.heartbeat_ms = 200;
    wel.teacher_endpoints = &teacher;
    wel.n_teacher_endpoints = 1;
    kd_wire_tensor_t weights = {.name = "weights",
                                .dtype = KD_DTYPE_F32,
                                .ndim = 1,
                                .shape = {(int64_t)model->n_params},
                                .data = model->params,
                                .nbytes = model->n_params * sizeof(float)};
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
    env.welcome = &wel;
    CHECK(kd_wire_send(c->router, to->peer, to->peer_len, &env, &weights, 1, 0) == 0);
    kd_model_destroy(&model);
    return true;
}

/* The next Nack from the worker: its batch and reason. */
static void expect_nack(coord_t *c, uint32_t batch_id, Kdist__NackReason reason,
                        const char *detail) {
    kd_msg_t m;
    if (!coord_expect(c, NULL, KDIST__ENVELOPE__BODY_NACK, &m)) {
        CHECK(false);
        return;
    }
    const Kdist__Nack *n = m.env->nack;
    CHECK(n->ref && n->ref->epoch == 0 && n->ref->batch_id == batch_id);
    CHECK(n->reason == reason);
    CHECK_ERR_HAS(n->detail ? n->detail : "", detail);
    kd_msg_close(&m);
}

static void test_worker(void *ctx) {
    const char *dir = kd_test_tmpdir("test_session");
    char log[1200];
    snprintf(log, sizeof log, "%s/worker.log", dir);
    coord_t c;
    coord_open(&c, ctx);
    teacher_t a, b;
    teacher_open(&a, ctx, "teacher-a");
    teacher_open(&b, ctx, "teacher-b");
    char *argv[] = {
        (char *)kd_test_bin("kdist-worker"), "--coordinator", c.endpoint, "--id", "0", NULL};
    pid_t pid = kd_test_spawn(argv, log);
    CHECK(pid > 0);
    kd_msg_t hello = {0};
    bool ok = pid > 0 && coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_HELLO, &hello) &&
              coord_welcome_worker(&c, &hello, a.endpoint);
    /* the teacher set, followed exactly: A is left when Peers lists only B */
    ok = ok && teacher_event(&a, ZMQ_EVENT_ACCEPTED);
    CHECK(ok);
    if (ok) {
        char *only_b[] = {b.endpoint, b.endpoint}; /* listed twice: followed once */
        coord_peers(&c, &hello, only_b, 2);
        CHECK(teacher_event(&b, ZMQ_EVENT_ACCEPTED));
        CHECK(teacher_event(&a, ZMQ_EVENT_DISCONNECTED));
    }
    if (ok) {
        /* batches the worker cannot use are nacked, one Nack each, and it carries on */
        const int32_t good_labels[4] = {0, 1, 2, 1}, bad_labels[4] = {0, 3, 2, 1};
        float logits[12] = {1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3};
        float nan_logits[12];
        memcpy(nan_logits, logits, sizeof logits);
        nan_logits[7] = NAN;
        teacher_send(&b, 5, good_labels, nan_logits);
        expect_nack(&c, 5, KDIST__NACK_REASON__NACK_TEACHER_LOGITS, "not finite");
        teacher_send(&b, 6, bad_labels, logits);
        expect_nack(&c, 6, KDIST__NACK_REASON__NACK_LABELS, "out of range");
        teacher_send(&b, 7, good_labels, logits);
        kd_msg_t push;
        if (coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_PUSH, &push)) {
            CHECK(push.env->push->ref && push.env->push->ref->batch_id == 7);
            Kdist__Weights w = KDIST__WEIGHTS__INIT;
            w.stop = true;
            kd_env_t env = KDIST__ENVELOPE__INIT;
            env.body_case = KDIST__ENVELOPE__BODY_WEIGHTS;
            env.weights = &w;
            CHECK(kd_wire_send(c.router, push.peer, push.peer_len, &env, NULL, 0, 0) == 0);
            kd_msg_close(&push);
        } else {
            CHECK(false);
        }
        CHECK(kd_test_wait(pid, DEADLINE) == 0);
        pid = 0;
    }
    if (pid > 0) {
        kill(pid, SIGKILL);
        kd_test_wait(pid, DEADLINE);
    }
    if (kd_test_failures) kd_test_show_log(log);
    if (hello.env) kd_msg_close(&hello);
    teacher_close(&a);
    teacher_close(&b);
    zmq_close(c.router);
}

/* A Welcome whose recipe asks for a student far beyond what a weights frame carries: a clear
 * error and exit 1, not an abort in an allocation. */
static void test_worker_hostile_sizes(void *ctx) {
    const char *dir = kd_test_tmpdir("test_session");
    char log[1200];
    snprintf(log, sizeof log, "%s/hostile.log", dir);
    coord_t c;
    coord_open(&c, ctx);
    char *argv[] = {
        (char *)kd_test_bin("kdist-worker"), "--coordinator", c.endpoint, "--id", "1", NULL};
    pid_t pid = kd_test_spawn(argv, log);
    kd_msg_t hello;
    if (pid > 0 && coord_expect(&c, NULL, KDIST__ENVELOPE__BODY_HELLO, &hello)) {
        static const char huge[] = "name: huge\n"
                                   "student:\n"
                                   "  layers:\n"
                                   "    - {type: flatten}\n"
                                   "    - {type: linear, out_features: 16777216}\n"
                                   "    - {type: linear, out_features: 10}\n";
        Kdist__Shape in = KDIST__SHAPE__INIT;
        in.c = 1, in.h = 64, in.w = 64;
        Kdist__Welcome wel = KDIST__WELCOME__INIT;
        wel.recipe_yaml = (char *)huge;
        wel.input = &in;
        wel.num_classes = 10;
        wel.n_params = 1;
        kd_env_t env = KDIST__ENVELOPE__INIT;
        env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
        env.welcome = &wel;
        CHECK(kd_wire_send(c.router, hello.peer, hello.peer_len, &env, NULL, 0, 0) == 0);
        kd_msg_close(&hello);
        CHECK(kd_test_wait(pid, DEADLINE) == 1);
        char text[8192];
        kd_test_slurp(log, text, sizeof text);
        CHECK_ERR_HAS(text, "WORKER-BAD-WELCOME");
        CHECK_ERR_HAS(text, "more than 536870912 parameters");
    } else {
        CHECK(false);
        if (pid > 0) kill(pid, SIGKILL), kd_test_wait(pid, DEADLINE);
    }
    zmq_close(c.router);
}

/* What a node's handlers are asked, and what the session answers for it: a fatal verdict of
 * kd_session_tick (a refused key, say) must end the node, whatever its handler says. */
static int events_seen = 0;
static int count_event(void *node, kd_session_event_t ev, const char *why) {
    (void)node, (void)ev, (void)why;
    events_seen++;
    return KD_SESSION_GO_ON;
}
static int no_message(void *node, kd_msg_t *msg) {
    (void)node, (void)msg;
    return KD_SESSION_FAIL;
}

static void test_answers(void) {
    const kd_session_handlers_t h = {no_message, count_event};
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_IDLE, "") == KD_SESSION_GO_ON);
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_END, "") == KD_SESSION_STOP);
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_FATAL, "refused") == KD_SESSION_FAIL);
    CHECK(events_seen == 0);
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_HELLO, "") == KD_SESSION_GO_ON);
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_LOST, "") == KD_SESSION_GO_ON);
    CHECK(kd_session_answer(&h, NULL, KD_SESSION_BAD, "junk") == KD_SESSION_GO_ON);
    CHECK(events_seen == 3);
}

int main(void) {
    void *ctx = zmq_ctx_new();
    test_answers();
    test_monitor_close_keeps_context();
    test_hello_welcome_heartbeats(ctx);
    test_retried_refusals(ctx);
    test_final_refusals(ctx);
    test_silence(ctx);
    test_client(ctx);
    test_curve_mismatch(ctx);
    test_worker(ctx);
    test_worker_hostile_sizes(ctx);
    zmq_ctx_term(ctx);
    return kd_test_done("test_session");
}
