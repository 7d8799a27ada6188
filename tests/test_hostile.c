/* test_hostile: a real run (coordinator, one teacher node, two workers) while every listening
 * socket (the coordinator's ROUTER, the teacher's PUSH) is sent garbage — lying protobuf
 * headers, wrong versions, unknown bodies, too many, truncated and oversized frames, raw
 * non-ZeroMQ bytes, and old ZMTP 1.0/2.0 greetings that skip ZeroMQ's socket-type check.
 * Every process must survive, no outsider may receive a batch, the run must complete with
 * every batch applied once, and the coordinator must count the garbage (StatusReply,
 * metrics.jsonl, summary.json) and log it rate-limited with the peer. */
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"
#include "kd_wire.h"

#define RECIPE           "../recipes/fashion_mlp_student.yaml"
#define EPOCHS           3 /* train.epochs: the run (~3 s) outlasts the garbage (~1 s) */
#define STR_(x)          #x
#define STR(x)           STR_(x)
#define GARBAGE_ROUNDS   20   /* rounds of every coordinator case: a few hundred messages */
#define GARBAGE_SECONDS  60.0 /* safety net: the garbage phase takes 1-3 s */
#define TEACHER_MESSAGES 100
#define RAW_CONNECTIONS  5
#define BIG_FRAME        ((size_t)4 << 20) /* above KD_WIRE_MAX_HEADER as a header */
#define GREETING_MAX     64                /* a ZMTP 3 greeting; a batch is ~100 KB */

static const char *tmp;
static uint32_t rng_state = 12345u;

static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static void fill_random(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd();
}

/* ---- the cluster -------------------------------------------------------------------------- */

enum { COORD, TEACHER, WORKER0, WORKER1, N_PROCS };
static const char *const proc_names[N_PROCS] = {"coordinator", "teacher-0", "worker-0", "worker-1"};

typedef struct {
    char run_dir[1024];
    char logs[N_PROCS][1300];
    pid_t pids[N_PROCS];
    bool exited[N_PROCS]; /* reaped by all_alive */
    int exit_rc[N_PROCS];
    char endpoint[256];       /* coordinator ROUTER */
    char teacher_stream[256]; /* teacher PUSH */
} cluster_t;

static const char *const overrides[] = {
    "name=hostile",          "data.train_subset=10500",   "data.val_size=500",
    "data.test_subset=1000", "train.epochs=" STR(EPOCHS), "cluster.heartbeat_ms=1000"};
/* cluster.heartbeat_ms is the default 1000 on purpose: libzmq drops a connection when no whole
 * message arrives within 3 heartbeats, and under ASan on a loaded machine a few hundred ms
 * without one is possible, which would cut the test's own connections and lose its garbage. */
#define N_OVERRIDES ((int)(sizeof overrides / sizeof overrides[0]))

/* kill(pid, 0) also succeeds on a zombie, so a process that died is found with waitpid
 * (and reaped here, its exit code kept for finish_cluster). */
static bool all_alive(cluster_t *c) {
    bool ok = true;
    for (int i = 0; i < N_PROCS; i++) {
        if (c->pids[i] > 0 && !c->exited[i]) {
            int status;
            if (waitpid(c->pids[i], &status, WNOHANG) == c->pids[i]) {
                c->exited[i] = true;
                c->exit_rc[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            }
        }
        if (c->pids[i] <= 0 || c->exited[i] || kill(c->pids[i], 0) != 0) {
            fprintf(stderr, "  %s (pid %d) is gone\n", proc_names[i], (int)c->pids[i]);
            ok = false;
        }
    }
    return ok;
}

/* The teacher announces its stream endpoint in its log ("streaming on tcp://..."). */
static bool find_teacher_stream(cluster_t *c, double seconds) {
    double deadline = kd_test_now() + seconds;
    static char text[1 << 16];
    for (;;) {
        if (kd_test_read_text(c->logs[TEACHER], text, sizeof text)) {
            const char *p = strstr(text, "streaming on tcp://");
            if (p) {
                p += strlen("streaming on ");
                size_t n = strcspn(p, ") \n");
                if (n > 0 && n < sizeof c->teacher_stream) {
                    memcpy(c->teacher_stream, p, n);
                    c->teacher_stream[n] = 0;
                    return true;
                }
            }
        }
        if (kd_test_now() > deadline) return false;
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
    }
}

static bool start_cluster(cluster_t *c) {
    snprintf(c->run_dir, sizeof c->run_dir, "%s/run", tmp);
    char logs[1100], err[KD_ERR_LEN];
    snprintf(logs, sizeof logs, "%s/logs", c->run_dir);
    if (kd_mkdirs(logs, err, sizeof err) != 0) return false;
    for (int i = 0; i < N_PROCS; i++) {
        c->pids[i] = -1;
        snprintf(c->logs[i], sizeof c->logs[i], "%s/%s.log", logs, proc_names[i]);
    }

    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)kd_test_bin("kdist-coordinator");
    argv[argc++] = "--recipe";
    argv[argc++] = RECIPE;
    argv[argc++] = "--run-dir";
    argv[argc++] = c->run_dir;
    for (int i = 0; i < N_OVERRIDES; i++) argv[argc++] = (char *)overrides[i];
    argv[argc] = NULL;
    c->pids[COORD] = kd_test_spawn(argv, c->logs[COORD]);
    CHECK(c->pids[COORD] > 0);
    char endpoint_file[1200];
    snprintf(endpoint_file, sizeof endpoint_file, "%s/coordinator.endpoint", c->run_dir);
    bool up = c->pids[COORD] > 0 && kd_test_wait_file(endpoint_file, 60) &&
              kd_test_read_text(endpoint_file, c->endpoint, sizeof c->endpoint);
    c->endpoint[strcspn(c->endpoint, "\r\n")] = 0;
    CHECK(up);
    if (!up) {
        kd_test_show_log(c->logs[COORD]);
        return false;
    }

    argc = 0;
    argv[argc++] = (char *)kd_test_bin("kdist-teacher");
    argv[argc++] = "--coordinator";
    argv[argc++] = c->endpoint;
    argv[argc++] = "--id";
    argv[argc++] = "0";
    argv[argc++] = "--recipe";
    argv[argc++] = RECIPE;
    for (int i = 0; i < N_OVERRIDES; i++) argv[argc++] = (char *)overrides[i];
    argv[argc] = NULL;
    c->pids[TEACHER] = kd_test_spawn(argv, c->logs[TEACHER]);
    for (int w = 0; w < 2; w++) {
        char *wargv[] = {(char *)kd_test_bin("kdist-worker"),
                         "--coordinator",
                         c->endpoint,
                         "--id",
                         w == 0 ? "0" : "1",
                         NULL};
        c->pids[WORKER0 + w] = kd_test_spawn(wargv, c->logs[WORKER0 + w]);
    }
    for (int i = 0; i < N_PROCS; i++) CHECK(c->pids[i] > 0);
    bool found = find_teacher_stream(c, 60);
    CHECK(found);
    if (!found) kd_test_show_log(c->logs[TEACHER]);
    return found;
}

/* Waits for every process; the coordinator must finish the run and everyone exit 0. */
static void finish_cluster(cluster_t *c) {
    for (int i = 0; i < N_PROCS; i++) {
        if (c->pids[i] <= 0) continue;
        int rc = c->exited[i] ? c->exit_rc[i] : kd_test_wait(c->pids[i], i == COORD ? 90 : 15);
        CHECK(rc == 0);
        if (rc != 0) {
            fprintf(stderr, "  %s exited with %d\n", proc_names[i], rc);
            kd_test_show_log(c->logs[i]);
        }
        c->pids[i] = -1;
    }
}

/* ---- garbage builders --------------------------------------------------------------------- */

/* Sends frames as one multipart message; true when ZeroMQ accepted it whole. */
static bool send_frames(void *sock, const void *const *data, const size_t *lens, int n) {
    for (int i = 0; i < n; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < n ? ZMQ_SNDMORE : 0);
        if (zmq_send(sock, data[i], lens[i], flags) < 0) return false;
    }
    return true;
}

static bool send_one(void *sock, const void *data, size_t len) {
    const void *d[1] = {data};
    size_t l[1] = {len};
    return send_frames(sock, d, l, 1);
}

/* Packs env exactly as given (kd_wire_send would fix protocol_version and descriptors). */
static size_t pack(const kd_env_t *env, uint8_t *buf, size_t cap) {
    size_t n = kdist__envelope__get_packed_size(env);
    KD_ASSERT(n <= cap);
    return kdist__envelope__pack(env, buf);
}

/* A PushGradient header describing one "gradient" tensor with the given (lying) descriptor. */
static size_t pack_push(uint32_t version, int64_t *shape, size_t ndim, uint64_t nbytes,
                        uint8_t *buf, size_t cap) {
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.epoch = 0;
    ref.batch_id = 3;
    Kdist__PushGradient p = KDIST__PUSH_GRADIENT__INIT;
    p.ref = &ref;
    p.samples = 128;
    Kdist__TensorDesc td = KDIST__TENSOR_DESC__INIT;
    td.name = "gradient";
    td.dtype = KDIST__DTYPE__F32;
    td.n_shape = ndim;
    td.shape = shape;
    td.nbytes = nbytes;
    Kdist__TensorDesc *tds[1] = {&td};
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.protocol_version = version;
    env.n_tensors = 1;
    env.tensors = tds;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = &p;
    return pack(&env, buf, cap);
}

static size_t pack_hello(uint32_t version, Kdist__Role role, const char *node_id, uint8_t *buf,
                         size_t cap) {
    Kdist__Hello h = KDIST__HELLO__INIT;
    h.role = role;
    h.node_id = (char *)node_id;
    h.incarnation = 1;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.protocol_version = version;
    env.body_case = KDIST__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    return pack(&env, buf, cap);
}

/* Discards whatever the coordinator answered (Refused) so nothing piles up. */
static void drain(void *sock) {
    char buf[4096];
    while (zmq_recv(sock, buf, sizeof buf, ZMQ_DONTWAIT) >= 0) {
    }
}

/* One round of every lying message over the DEALER; returns how many ZeroMQ accepted. Each
 * one is malformed or comes from a non-member, so the coordinator must drop every one. */
static long coordinator_round(void *sock, int round) {
    long sent = 0;
    uint8_t hdr[512], good[512];
    float grad[16] = {0};

    /* random bytes as a header, a valid header cut short, an empty header */
    size_t n = 1 + rnd() % 200;
    fill_random(hdr, n);
    sent += send_one(sock, hdr, n);
    int64_t shape16[1] = {16};
    size_t gn = pack_push(KD_PROTOCOL_VERSION, shape16, 1, sizeof grad, good, sizeof good);
    sent += send_one(sock, good, 1 + (size_t)round % (gn - 1));
    sent += send_one(sock, "", 0);

    /* a valid envelope with protocol version 99, Hellos with wrong versions */
    n = pack_push(99, shape16, 1, sizeof grad, hdr, sizeof hdr);
    const void *d2[2] = {hdr, grad};
    size_t l2[2] = {n, sizeof grad};
    sent += send_frames(sock, d2, l2, 2);
    n = pack_hello(round % 2 ? 2 : 0, KDIST__ROLE__WORKER, "hostile", hdr, sizeof hdr);
    sent += send_one(sock, hdr, n);
    /* current Hellos the coordinator must refuse: a client role, a worker without an id */
    n = pack_hello(KD_PROTOCOL_VERSION, KDIST__ROLE__CLIENT, "hostile", hdr, sizeof hdr);
    sent += send_one(sock, hdr, n);
    n = pack_hello(KD_PROTOCOL_VERSION, KDIST__ROLE__WORKER, "", hdr, sizeof hdr);
    sent += send_one(sock, hdr, n);

    /* no body: protocol_version 1 plus an unknown field number 99 (varint) */
    static const uint8_t unknown[] = {0x08, 0x01, 0x98, 0x06, 0x01};
    sent += send_one(sock, unknown, sizeof unknown);

    /* a well-formed PushGradient from a node that never said hello */
    {
        kd_env_t env = KDIST__ENVELOPE__INIT;
        Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
        Kdist__PushGradient p = KDIST__PUSH_GRADIENT__INIT;
        p.ref = &ref;
        p.samples = 128;
        env.body_case = KDIST__ENVELOPE__BODY_PUSH;
        env.push = &p;
        kd_wire_tensor_t t = {.name = "gradient",
                              .dtype = KD_DTYPE_F32,
                              .ndim = 1,
                              .shape = {16},
                              .data = grad,
                              .nbytes = sizeof grad};
        sent += kd_wire_send(sock, NULL, 0, &env, &t, 1, ZMQ_DONTWAIT) == 0;
    }

    /* descriptors that lie: shape vs nbytes, nbytes vs frame, overflowing shapes, negative
     * dims, too many dims, a descriptor without its frame, a frame without its descriptor */
    int64_t shape_big[2] = {(int64_t)1 << 40, (int64_t)1 << 40};
    int64_t shape_neg[2] = {-4, -4};
    int64_t shape_many[9] = {1, 1, 1, 1, 1, 1, 1, 1, 16};
    n = pack_push(KD_PROTOCOL_VERSION, shape16, 1, 4 * sizeof grad, hdr, sizeof hdr);
    l2[0] = n;
    sent += send_frames(sock, d2, l2, 2); /* 16 x f32 = 64 bytes, nbytes says 256 */
    n = pack_push(KD_PROTOCOL_VERSION, shape16, 1, sizeof grad, hdr, sizeof hdr);
    l2[0] = n;
    l2[1] = 12; /* descriptor right, frame short */
    sent += send_frames(sock, d2, l2, 2);
    l2[1] = sizeof grad;
    n = pack_push(KD_PROTOCOL_VERSION, shape_big, 2, sizeof grad, hdr, sizeof hdr);
    l2[0] = n;
    sent += send_frames(sock, d2, l2, 2);
    n = pack_push(KD_PROTOCOL_VERSION, shape_neg, 2, sizeof grad, hdr, sizeof hdr);
    l2[0] = n;
    sent += send_frames(sock, d2, l2, 2);
    n = pack_push(KD_PROTOCOL_VERSION, shape_many, 9, sizeof grad, hdr, sizeof hdr);
    l2[0] = n;
    sent += send_frames(sock, d2, l2, 2);
    sent += send_one(sock, good, gn);
    const void *d3[3] = {good, grad, grad};
    size_t l3[3] = {gn, sizeof grad, sizeof grad};
    sent += send_frames(sock, d3, l3, 3);

    /* more than 8 payload frames */
    const void *d12[12];
    size_t l12[12];
    d12[0] = good;
    l12[0] = gn;
    for (int i = 1; i < 12; i++) {
        d12[i] = grad;
        l12[i] = sizeof grad;
    }
    sent += send_frames(sock, d12, l12, 12);
    return sent;
}

/* A plain TCP connection to a tcp://host:port endpoint; -1 on failure. */
static int connect_raw(const char *endpoint) {
    const char *hostport = strstr(endpoint, "://");
    if (!hostport) return -1;
    hostport += 3;
    const char *colon = strrchr(hostport, ':');
    if (!colon) return -1;
    char host[64];
    snprintf(host, sizeof host, "%.*s", (int)(colon - hostport), hostport);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Raw bytes on plain TCP connections: random junk, a ZMTP 3 greeting followed by a command
 * claiming an enormous size (above any ZMQ_MAXMSGSIZE), a bare signature and junk, and a
 * greeting cut short. Returns the connections that took the bytes. */
static int raw_tcp(const char *endpoint) {
    int ok = 0;
    for (int k = 0; k < RAW_CONNECTIONS; k++) {
        int fd = connect_raw(endpoint);
        if (fd < 0) return ok;
        uint8_t junk[4096];
        fill_random(junk, sizeof junk);
        /* signature, version 3.0, mechanism NULL, as-server 0, filler */
        uint8_t greeting[64] = {0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0, 'N', 'U', 'L', 'L'};
        static const uint8_t huge_cmd[] = {0x06, 0x7f, 0xff, 0xff, 0xff, 0xff,
                                           0xff, 0xff, 0xff, 0x05, 'R',  'E'};
        ssize_t w = 0;
        switch (k % 4) {
        case 0:
            w = write(fd, junk, sizeof junk);
            break;
        case 1:
            w = write(fd, greeting, sizeof greeting);
            if (w > 0) w = write(fd, huge_cmd, sizeof huge_cmd);
            break;
        case 2:
            w = write(fd, greeting, 10);
            if (w > 0) w = write(fd, junk, 512);
            break;
        default:
            w = write(fd, greeting, 13);
            break;
        }
        ok += w > 0;
        close(fd);
    }
    return ok;
}

/* An outsider speaking an old ZMTP: 1.0 (no greeting, a frame straight away) or 2.0 (claims to
 * be a PULL). These skip or predate ZeroMQ's socket-type check, so unless the listener refuses
 * old peers (a ZAP domain does) a PUSH would deal it batches. Reads what comes back until the
 * listener hangs up or `seconds` pass; returns the bytes received, *closed whether it hung up. */
static long old_zmtp_peer(const char *endpoint, bool v2, double seconds, bool *closed) {
    *closed = false;
    int fd = connect_raw(endpoint);
    if (fd < 0) return -1;
    static const uint8_t v1_hello[] = {0x01, 0x00}; /* an empty identity frame */
    static const uint8_t v2_hello[] = {0xff,         0,    0,   0, 0, 0, 0, 0, 1, 0x7f, 1,
                                       7 /* PULL */, 0x00, 0x00};
    const uint8_t *hello = v2 ? v2_hello : v1_hello;
    size_t len = v2 ? sizeof v2_hello : sizeof v1_hello;
    long got = 0;
    if (write(fd, hello, len) != (ssize_t)len) {
        close(fd);
        return -1;
    }
    double deadline = kd_test_now() + seconds;
    while (kd_test_now() < deadline && got <= GREETING_MAX) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0) continue;
        uint8_t buf[65536];
        ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0) {
            got += r;
        } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
            *closed = true; /* EOF or a reset */
            break;
        }
    }
    close(fd);
    return got;
}

static void *zsock(void *ctx, int type, const char *identity, const char *endpoint) {
    void *s = zmq_socket(ctx, type);
    KD_ASSERT(s);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    if (identity) zmq_setsockopt(s, ZMQ_ROUTING_ID, identity, strlen(identity));
    int rc = zmq_connect(s, endpoint);
    KD_ASSERT(rc == 0);
    return s;
}

typedef struct {
    long dropped, step, total_steps; /* -1: no reply */
    char status[32];
} status_t;

/* Asks the coordinator for its StatusReply (as cli/kd_status.c does). */
static status_t query_status(void *ctx, const char *endpoint, double seconds) {
    status_t st = {-1, -1, -1, ""};
    /* a fresh routing id each time: a ROUTER refuses a second connection under an id whose
     * previous connection it has not yet seen close */
    static int queries = 0;
    char identity[32];
    snprintf(identity, sizeof identity, "hostile-status-%d", queries++);
    void *s = zsock(ctx, ZMQ_DEALER, identity, endpoint);
    kd_env_t env = KDIST__ENVELOPE__INIT;
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__STATUS;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    if (kd_wire_send(s, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) != 0) goto cleanup;
    double deadline = kd_test_now() + seconds;
    while (kd_test_now() < deadline) {
        zmq_pollitem_t item = {s, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 100) <= 0) continue;
        kd_msg_t msg;
        char err[KD_ERR_LEN];
        if (kd_wire_recv(s, false, ZMQ_DONTWAIT, &msg, err, sizeof err) != KD_WIRE_OK) continue;
        if (msg.env->body_case == KDIST__ENVELOPE__BODY_STATUS && msg.env->status->json) {
            json_error_t jerr;
            json_t *j = json_loads(msg.env->status->json, 0, &jerr);
            if (j) {
                st.dropped = (long)json_integer_value(json_object_get(j, "messages_dropped"));
                st.step = (long)json_integer_value(json_object_get(j, "step"));
                st.total_steps = (long)json_integer_value(json_object_get(j, "total_steps"));
                const char *status = json_string_value(json_object_get(j, "status"));
                snprintf(st.status, sizeof st.status, "%s", status ? status : "");
            }
            json_decref(j);
        }
        kd_msg_close(&msg);
        if (st.dropped >= 0) break;
    }
cleanup:
    zmq_close(s);
    return st;
}

/* Polls StatusReply until the coordinator has dropped at least `want` messages (it reads the
 * garbage and the query on different connections, so a reply can overtake the garbage). */
static status_t wait_dropped(void *ctx, const char *endpoint, long want, double seconds) {
    status_t st = {-1, -1, -1, ""};
    double deadline = kd_test_now() + seconds;
    while (kd_test_now() < deadline) {
        st = query_status(ctx, endpoint, 2);
        if (st.dropped >= want) break;
    }
    return st;
}

/* The last value metrics.jsonl recorded for key; -1 when it never did. */
static double last_metric(const char *path, const char *key) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    double value = -1;
    char line[16384];
    while (fgets(line, sizeof line, f)) {
        if (!strstr(line, key)) continue;
        json_error_t jerr;
        json_t *j = json_loads(line, 0, &jerr);
        json_t *v = json_object_get(j, key);
        if (json_is_number(v)) value = json_number_value(v);
        json_decref(j);
    }
    fclose(f);
    return value;
}

static long count_lines(const char *path, const char *needle, const char *also, bool *named) {
    *named = false;
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[4096];
    long n = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle)) {
            n++;
            if (strstr(line, also)) *named = true;
        }
    fclose(f);
    return n;
}

/* ---- the test ----------------------------------------------------------------------------- */

static void test_garbage_during_a_run(void) {
    cluster_t c;
    memset(&c, 0, sizeof c);
    if (!start_cluster(&c)) {
        for (int i = 0; i < N_PROCS; i++)
            if (c.pids[i] > 0) kill(c.pids[i], SIGTERM);
        finish_cluster(&c);
        return;
    }
    fprintf(stderr, "coordinator %s, teacher stream %s\n", c.endpoint, c.teacher_stream);

    void *ctx = zmq_ctx_new();
    KD_ASSERT(ctx);
    void *dealer = zsock(ctx, ZMQ_DEALER, "hostile-1", c.endpoint);
    /* PUSH and DEALER are no valid peers of a PUSH: the handshake fails, the teacher lives */
    void *t_push = zsock(ctx, ZMQ_PUSH, "hostile-push", c.teacher_stream);
    void *t_dealer = zsock(ctx, ZMQ_DEALER, "hostile-dealer", c.teacher_stream);

    /* the garbage must land while the run trains: before it, the run is not over... */
    status_t before = query_status(ctx, c.endpoint, 5);
    fprintf(stderr, "before the garbage: %s, step %ld of %ld\n", before.status, before.step,
            before.total_steps);
    CHECK(before.step >= 0 && before.step < before.total_steps);

    double start = kd_test_now(), deadline = start + GARBAGE_SECONDS;
    long sent = 0, teacher_sent = 0;
    bool alive = true, raw_ok = false;
    int raw_coord = 0, raw_teacher = 0;
    /* old-ZMTP outsiders: bytes each received (-1: never connected) and whether it was cut off */
    enum { OLD_TEACHER_V1, OLD_TEACHER_V2, OLD_COORD_V1, N_OLD };
    static const char *const old_names[N_OLD] = {"ZMTP 1.0 -> teacher", "ZMTP 2.0 -> teacher",
                                                 "ZMTP 1.0 -> coordinator"};
    long old_got[N_OLD] = {-1, -1, -1};
    bool old_closed[N_OLD] = {false, false, false};

    /* a big push from a non-member, and the same bytes as a header: above KD_WIRE_MAX_HEADER.
     * (Above ZMQ_MAXMSGSIZE is raw_tcp's size claim: a real one would be 2 GB of traffic.) */
    uint8_t *big = kd_xmalloc(BIG_FRAME);
    memset(big, 0x5a, BIG_FRAME);
    {
        uint8_t hdr[512];
        int64_t shape[1] = {(int64_t)(BIG_FRAME / 4)};
        size_t n = pack_push(KD_PROTOCOL_VERSION, shape, 1, BIG_FRAME, hdr, sizeof hdr);
        const void *d[2] = {hdr, big};
        size_t l[2] = {n, BIG_FRAME};
        sent += send_frames(dealer, d, l, 2);
        sent += send_one(dealer, big, BIG_FRAME);
    }
    free(big);

    for (int round = 0; round < GARBAGE_ROUNDS && kd_test_now() < deadline; round++) {
        sent += coordinator_round(dealer, round);
        drain(dealer);
        for (int k = 0; k < TEACHER_MESSAGES / GARBAGE_ROUNDS; k++) {
            uint8_t junk[256];
            fill_random(junk, sizeof junk);
            teacher_sent += send_one(t_push, junk, sizeof junk);
            teacher_sent += send_one(t_dealer, junk, sizeof junk);
        }
        /* Raw junk to the coordinator only once it has dropped everything hostile-1 sent so
         * far, so its first (rate-limited) KD-WIRE-DROP line surely names hostile-1. */
        if (round == 5) {
            status_t mid = wait_dropped(ctx, c.endpoint, sent, 15);
            raw_ok = mid.dropped >= sent;
            CHECK(raw_ok);
        }
        if (round % 5 == 0) raw_teacher += raw_tcp(c.teacher_stream);
        if (raw_ok && round % 5 == 0) raw_coord += raw_tcp(c.endpoint);
        /* while the teacher streams, an old-protocol outsider must not be dealt batches */
        if (round == 1)
            old_got[OLD_TEACHER_V1] =
                old_zmtp_peer(c.teacher_stream, false, 3, &old_closed[OLD_TEACHER_V1]);
        if (round == 3)
            old_got[OLD_TEACHER_V2] =
                old_zmtp_peer(c.teacher_stream, true, 3, &old_closed[OLD_TEACHER_V2]);
        if (round == 7)
            old_got[OLD_COORD_V1] = old_zmtp_peer(c.endpoint, false, 3, &old_closed[OLD_COORD_V1]);
        if (!all_alive(&c)) alive = false;
        struct timespec tick = {0, 50 * 1000 * 1000}; /* spread it over the run */
        nanosleep(&tick, NULL);
    }
    double garbage_seconds = kd_test_now() - start;
    CHECK(alive);
    CHECK(all_alive(&c));
    CHECK(sent > 200);
    CHECK(raw_coord > 0);
    CHECK(raw_teacher > 0);
    fprintf(stderr,
            "garbage: %ld messages to the coordinator, %ld to the teacher (ZeroMQ-accepted), "
            "%d + %d raw TCP connections, %.2f s\n",
            sent, teacher_sent, raw_coord, raw_teacher, garbage_seconds);
    for (int i = 0; i < N_OLD; i++) {
        fprintf(stderr, "%s: received %ld bytes, %s\n", old_names[i], old_got[i],
                old_closed[i] ? "cut off" : "still connected");
        CHECK(old_got[i] >= 0 && old_got[i] <= GREETING_MAX); /* no batch, no reply */
        CHECK(old_closed[i]);
    }

    status_t after = wait_dropped(ctx, c.endpoint, sent, 30);
    fprintf(stderr, "after the garbage: %s, step %ld of %ld, StatusReply messages_dropped %ld\n",
            after.status, after.step, after.total_steps, after.dropped);
    if (after.dropped >= 0 || all_alive(&c)) {
        CHECK(after.dropped >= sent);
        CHECK(after.step > before.step); /* ...and training went on under it */
    } /* else the run finished meanwhile: summary.json has the count */

    /* a casualty stalls the run (no teacher, no batches): stop the rest instead of waiting */
    if (!alive || !all_alive(&c))
        for (int i = 0; i < N_PROCS; i++)
            if (c.pids[i] > 0 && !c.exited[i]) kill(c.pids[i], SIGTERM);

    zmq_close(dealer);
    zmq_close(t_push);
    zmq_close(t_dealer);
    zmq_ctx_term(ctx);

    finish_cluster(&c);

    char path[1200];
    snprintf(path, sizeof path, "%s/summary.json", c.run_dir);
    json_error_t jerr;
    json_t *summary = json_load_file(path, 0, &jerr);
    CHECK(summary != NULL);
    if (summary) {
        json_t *ledger = json_object_get(summary, "ledger");
        const char *status = json_string_value(json_object_get(summary, "status"));
        long applied = (long)json_integer_value(json_object_get(ledger, "batches_applied"));
        long expected = (long)json_integer_value(json_object_get(ledger, "batches_expected"));
        long sdropped = (long)json_integer_value(json_object_get(ledger, "messages_dropped"));
        long dups = (long)json_integer_value(json_object_get(ledger, "duplicates_dropped"));
        long restreamed = (long)json_integer_value(json_object_get(ledger, "restreamed"));
        long refused = (long)json_integer_value(json_object_get(ledger, "connections_refused"));
        fprintf(stderr,
                "summary: status %s, batches %ld/%ld, duplicates %ld, restreamed %ld, "
                "messages_dropped %ld, connections_refused %ld\n",
                status ? status : "(none)", applied, expected, dups, restreamed, sdropped, refused);
        /* raw bytes and the old greeting never become messages: libzmq refuses the connection,
         * and the coordinator counts it through its socket monitor */
        CHECK(refused >= 1);
        CHECK(status && strcmp(status, "completed") == 0);
        CHECK(expected == EPOCHS * 79); /* 10000 training samples, batches of 128 */
        CHECK(applied == expected);
        CHECK(dups == 0);
        CHECK(restreamed == 0); /* a stolen batch never comes back and is streamed again */
        CHECK(sdropped >= sent);
        json_decref(summary);
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", c.run_dir);
    double mdropped = last_metric(path, "ledger/messages_dropped");
    fprintf(stderr, "metrics.jsonl: last ledger/messages_dropped %.0f\n", mdropped);
    CHECK(mdropped >= (double)sent);

    bool named = false;
    long lines = count_lines(c.logs[COORD], "KD-WIRE-DROP", "'hostile-1'", &named);
    fprintf(stderr, "coordinator log: %ld KD-WIRE-DROP lines for %ld messages\n", lines, sent);
    CHECK(lines > 0);
    CHECK(named);
    CHECK(lines < sent / 10); /* rate-limited */

    /* the teacher's stream socket: refused connections logged with the peer, and counted */
    lines = count_lines(c.logs[TEACHER], "KD-WIRE-REFUSED", "tcp://127.0.0.1:", &named);
    fprintf(stderr, "teacher log: %ld KD-WIRE-REFUSED lines for %d raw + 2 old-protocol peers\n",
            lines, raw_teacher);
    CHECK(lines > 0 && named);
    long exit_refused = 0;
    char text[1 << 16];
    if (kd_test_read_text(c.logs[TEACHER], text, sizeof text)) {
        const char *exit_line = strstr(text, "TEACHER-EXIT");
        const char *count = exit_line ? strstr(exit_line, "), ") : NULL;
        if (count) exit_refused = strtol(count + 3, NULL, 10);
    }
    CHECK(exit_refused >= 1);
}

int main(void) {
    tmp = kd_test_tmpdir("test_hostile");
    signal(SIGPIPE, SIG_IGN); /* raw writes to a peer that hung up */
    test_garbage_during_a_run();
    return kd_test_done("test_hostile");
}
