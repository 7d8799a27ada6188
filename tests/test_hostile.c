/* test_hostile: a real run (coordinator, one teacher node, two workers) while every listening
 * socket (the coordinator's ROUTER, the teacher's PUSH) is sent garbage — lying protobuf
 * headers, wrong versions, unknown bodies, too many, truncated and oversized frames, raw
 * non-ZeroMQ bytes, and old ZMTP 1.0/2.0 greetings that skip ZeroMQ's socket-type check.
 * Every process must survive, no outsider may receive a batch, the run must complete with
 * every batch applied once, and the coordinator must count the garbage (StatusReply,
 * metrics.jsonl, summary.json) and log it rate-limited with the peer. */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include "kd_curve.h"
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

static const char *const overrides[] = {"data.train_subset=10500", "data.val_size=500",
                                        "data.test_subset=1000", "train.epochs=" STR(EPOCHS),
                                        "cluster.heartbeat_ms=1000"};
/* cluster.heartbeat_ms is the default 1000 on purpose: libzmq drops a connection when no whole
 * message arrives within 3 heartbeats, and under ASan on a loaded machine a few hundred ms
 * without one is possible, which would cut the test's own connections and lose its garbage. */
#define N_OVERRIDES ((int)(sizeof overrides / sizeof overrides[0]))

static int add_overrides(char **argv, int argc, const char *const *extra) {
    for (int i = 0; i < N_OVERRIDES; i++) argv[argc++] = (char *)overrides[i];
    for (int i = 0; extra && extra[i] && argc < 30; i++) argv[argc++] = (char *)extra[i];
    argv[argc] = NULL;
    return argc;
}

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

/* With CurveZMQ on: the directory of every key pair (kd_curve_generate), "" in plaintext. */
static char keys_dir[1200];

/* Under CurveZMQ: --key keys_dir/<name>.key, and for nodes the coordinator's public key. */
static int add_keys(char **argv, int argc, const char *name) {
    static char paths[4][2][1300];
    static int used = 0;
    if (!keys_dir[0]) return argc;
    char(*p)[1300] = paths[used++ % 4];
    snprintf(p[0], sizeof p[0], "%s/%s.key", keys_dir, name);
    snprintf(p[1], sizeof p[1], "%s/coordinator.pub", keys_dir);
    argv[argc++] = "--key";
    argv[argc++] = p[0];
    if (strcmp(name, "coordinator") != 0) {
        argv[argc++] = "--coordinator-key";
        argv[argc++] = p[1];
    }
    argv[argc] = NULL;
    return argc;
}

/* The cluster in <tmp>/<name>, the common overrides and extra (NULL-terminated) on every
 * process. */
static bool start_cluster(cluster_t *c, const char *name, const char *const *extra) {
    snprintf(c->run_dir, sizeof c->run_dir, "%s/%s", tmp, name);
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
    argc = add_keys(argv, argc, "coordinator");
    argc = add_overrides(argv, argc, extra);
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
    argc = add_keys(argv, argc, "teacher");
    argc = add_overrides(argv, argc, extra);
    c->pids[TEACHER] = kd_test_spawn(argv, c->logs[TEACHER]);
    for (int w = 0; w < 2; w++) {
        char *wargv[12] = {(char *)kd_test_bin("kdist-worker"),
                           "--coordinator",
                           c->endpoint,
                           "--id",
                           w == 0 ? "0" : "1",
                           NULL};
        add_keys(wargv, 5, "worker");
        c->pids[WORKER0 + w] = kd_test_spawn(wargv, c->logs[WORKER0 + w]);
    }
    for (int i = 0; i < N_PROCS; i++) CHECK(c->pids[i] > 0);
    bool found = find_teacher_stream(c, 60);
    CHECK(found);
    if (!found) kd_test_show_log(c->logs[TEACHER]);
    return found;
}

/* Waits for every process; the coordinator must finish the run and everyone exit 0. The
 * coordinator's deadline is a safety net, not a pace: under ASan on a loaded machine the rest of
 * the run has taken more than 90 s. */
static void finish_cluster(cluster_t *c) {
    for (int i = 0; i < N_PROCS; i++) {
        if (c->pids[i] <= 0) continue;
        int rc = c->exited[i] ? c->exit_rc[i] : kd_test_wait(c->pids[i], i == COORD ? 400 : 15);
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
    if (!start_cluster(&c, "garbage", NULL)) {
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

/* ---- an outsider and a bad member, while a run trains ----------------------------------- */

/* A DEALER to the coordinator; under CurveZMQ with the pair keys_dir/<key>.key. */
static void *peer_sock(void *ctx, const char *identity, const char *endpoint, const char *key) {
    if (!keys_dir[0]) return zsock(ctx, ZMQ_DEALER, identity, endpoint);
    kd_curve_client_t client;
    kd_curve_pair_t server;
    char path[1400], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/%s.key", keys_dir, key);
    CHECK(kd_curve_load_pair(path, &client.self, err, sizeof err) == 0);
    snprintf(path, sizeof path, "%s/coordinator.key", keys_dir);
    CHECK(kd_curve_load_pair(path, &server, err, sizeof err) == 0);
    snprintf(client.server_z85, sizeof client.server_z85, "%s", server.public_z85);
    void *s = kd_socket_dealer_curve(ctx, identity, endpoint, 0, &client, NULL, err, sizeof err);
    KD_ASSERT(s);
    return s;
}

/* The coordinator's StatusReply as JSON (caller decrefs), or NULL. */
static json_t *status_json(void *ctx, const char *endpoint, double seconds) {
    static int queries = 0;
    char identity[32];
    snprintf(identity, sizeof identity, "intruder-status-%d", queries++);
    void *s = peer_sock(ctx, identity, endpoint, "status");
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__STATUS;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    json_t *j = NULL;
    double deadline = kd_test_now() + seconds;
    if (kd_wire_send(s, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) == 0)
        while (!j && kd_test_now() < deadline) {
            zmq_pollitem_t item = {s, 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&item, 1, 100) <= 0) continue;
            kd_msg_t msg;
            char err[KD_ERR_LEN];
            if (kd_wire_recv(s, false, ZMQ_DONTWAIT, &msg, err, sizeof err) != KD_WIRE_OK) continue;
            if (msg.env->body_case == KDIST__ENVELOPE__BODY_STATUS && msg.env->status->json)
                j = json_loads(msg.env->status->json, 0, NULL);
            kd_msg_close(&msg);
        }
    zmq_close(s);
    return j;
}

static long jlong(json_t *j, const char *key) {
    return (long)json_integer_value(json_object_get(j, key));
}

/* The member of this role and id in a status: its pid and steps; false if absent. */
static bool find_member_in(json_t *status, const char *role, const char *id, long *pid,
                           long *steps) {
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(status, "members"), i, m) {
        const char *r = json_string_value(json_object_get(m, "role"));
        const char *n = json_string_value(json_object_get(m, "id"));
        if (r && n && strcmp(r, role) == 0 && strcmp(n, id) == 0) {
            *pid = jlong(m, "pid");
            *steps = jlong(m, "steps");
            return true;
        }
    }
    return false;
}

/* Polls the status until key reaches at least want (or the deadline); the last value. */
static long wait_counter(void *ctx, const char *endpoint, const char *key, long want,
                         double seconds) {
    long value = -1;
    double deadline = kd_test_now() + seconds;
    while (value < want && kd_test_now() < deadline) {
        json_t *j = status_json(ctx, endpoint, 2);
        if (j) value = jlong(j, key);
        json_decref(j);
    }
    return value;
}

/* The next message on sock within seconds (caller closes); false if none. */
static bool next_message(void *sock, kd_msg_t *msg, double seconds) {
    double deadline = kd_test_now() + seconds;
    while (kd_test_now() < deadline) {
        zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 100) <= 0) continue;
        char err[KD_ERR_LEN];
        if (kd_wire_recv(sock, false, ZMQ_DONTWAIT, msg, err, sizeof err) != KD_WIRE_OK) continue;
        if (msg->env->body_case != KDIST__ENVELOPE__BODY_HEARTBEAT) return true;
        kd_msg_close(msg);
    }
    return false;
}

static void send_hello(void *sock, Kdist__Role role, const char *id, uint64_t incarnation) {
    Kdist__Hello h = KDIST__HELLO__INIT;
    h.role = role;
    h.node_id = (char *)id;
    h.incarnation = incarnation;
    h.host = "intruder-host"; /* not this machine's name: no shared memory */
    if (role == KDIST__ROLE__TEACHER) h.stream_endpoint = "tcp://127.0.0.1:9";
    h.pid = 1;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    CHECK(kd_wire_send(sock, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) == 0);
}

/* The refusal code of the next message, or -1 when it is not a Refused. */
static int next_refusal(void *sock, double seconds) {
    kd_msg_t msg;
    if (!next_message(sock, &msg, seconds)) return -1;
    int code =
        msg.env->body_case == KDIST__ENVELOPE__BODY_REFUSED ? (int)msg.env->refused->code : -1;
    kd_msg_close(&msg);
    return code;
}

/* Control commands other than status from a TCP peer without an operator key (plaintext:
 * every TCP peer, loopback included): refused NOT_AUTHORIZED, counted, and nothing happens. */
static void outsider_controls(void *ctx, const char *endpoint) {
    static const Kdist__Control__Kind kinds[] = {
        KDIST__CONTROL__KIND__STOP, KDIST__CONTROL__KIND__DRAIN, KDIST__CONTROL__KIND__SCALE,
        KDIST__CONTROL__KIND__CHECKPOINT_NOW};
    json_t *before = status_json(ctx, endpoint, 5);
    long refused0 = jlong(before, "control_refused");
    json_decref(before);
    for (int as_client = 0; as_client < 2; as_client++) {
        /* CurveZMQ: a worker's key, then a status-only key; plaintext: any TCP peer */
        void *s = peer_sock(ctx, as_client ? "intruder-client" : "intruder-control", endpoint,
                            as_client ? "status" : "worker");
        if (as_client) { /* introduced as a client first: no more rights */
            send_hello(s, KDIST__ROLE__CLIENT, "intruder", 7);
            kd_msg_t msg;
            if (next_message(s, &msg, 5)) kd_msg_close(&msg);
        }
        for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
            Kdist__Control ctl = KDIST__CONTROL__INIT;
            ctl.kind = kinds[k];
            ctl.target = "0";
            ctl.workers = 1;
            kd_env_t env = KDIST__ENVELOPE__INIT;
            env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
            env.control = &ctl;
            CHECK(kd_wire_send(s, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) == 0);
            int code = next_refusal(s, 10);
            CHECK(code == KDIST__REFUSAL_CODE__NOT_AUTHORIZED);
        }
        zmq_close(s);
    }
    long refused = wait_counter(ctx, endpoint, "control_refused", refused0 + 8, 10);
    fprintf(stderr, "intruder: 8 control commands refused (control_refused %ld -> %ld)\n", refused0,
            refused);
    CHECK(refused == refused0 + 8);
}

/* A Hello for live worker 0 under another connection (a larger incarnation, as a restarted
 * node would say): refused ID_IN_USE, counted, and worker 0 stays the same process. */
static void hijack_hello(void *ctx, const char *endpoint) {
    json_t *before = status_json(ctx, endpoint, 5);
    long pid0 = -1, steps0 = -1, pid1 = -1, steps1 = -1;
    CHECK(find_member_in(before, "worker", "0", &pid0, &steps0));
    long refused0 = jlong(before, "hellos_refused");
    json_decref(before);
    void *s = peer_sock(ctx, "worker-0-99999999999", endpoint, "worker");
    send_hello(s, KDIST__ROLE__WORKER, "0", UINT64_MAX - 1);
    CHECK(next_refusal(s, 10) == KDIST__REFUSAL_CODE__ID_IN_USE);
    zmq_close(s);
    long refused = wait_counter(ctx, endpoint, "hellos_refused", refused0 + 1, 10);
    CHECK(refused == refused0 + 1);
    /* the real worker 0 is still the member, and trains on */
    bool trains = false;
    double deadline = kd_test_now() + 60;
    while (!trains && kd_test_now() < deadline) {
        json_t *now = status_json(ctx, endpoint, 2);
        trains =
            find_member_in(now, "worker", "0", &pid1, &steps1) && pid1 == pid0 && steps1 > steps0;
        json_decref(now);
    }
    fprintf(stderr,
            "intruder: hello as live worker 0 refused; worker 0 (pid %ld) went on from "
            "%ld to %ld steps\n",
            pid0, steps0, steps1);
    CHECK(trains);
}

/* A push of an fp32 gradient of n values, as a member sends it. */
static void send_push(void *s, Kdist__PushGradient *p, float *grad, size_t n) {
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = p;
    kd_wire_tensor_t t = {.name = "gradient",
                          .dtype = KD_DTYPE_F32,
                          .ndim = 1,
                          .shape = {(int64_t)n},
                          .data = grad,
                          .nbytes = n * sizeof *grad};
    CHECK(kd_wire_send(s, NULL, 0, &env, &t, 1, 0) == 0);
}

/* A worker of this id (the "evil" key under CurveZMQ) that said hello and was welcomed: its
 * socket, the weights' size and version. */
static void *join_as_worker(void *ctx, const char *endpoint, const char *id, size_t *n_params,
                            uint64_t *version) {
    char identity[64];
    snprintf(identity, sizeof identity, "worker-%s-1", id);
    void *s = peer_sock(ctx, identity, endpoint, "evil");
    send_hello(s, KDIST__ROLE__WORKER, id, 1);
    kd_msg_t msg;
    bool welcomed =
        next_message(s, &msg, 20) && msg.env->body_case == KDIST__ENVELOPE__BODY_WELCOME;
    CHECK(welcomed);
    *n_params = welcomed && msg.n_tensors == 1 ? msg.env->tensors[0]->nbytes / sizeof(float) : 0;
    *version = welcomed ? msg.env->welcome->weights_version : 0;
    if (welcomed) kd_msg_close(&msg);
    CHECK(*n_params > 0);
    return s;
}

/* A member that pushes NaN, Inf and huge gradients: each rejected (the batch goes back), and
 * the member evicted once honest pushes were accepted meanwhile. */
static void poison_pusher(void *ctx, const char *endpoint) {
    uint64_t version = 0;
    size_t n = 0;
    void *s = join_as_worker(ctx, endpoint, "evil", &n, &version);
    kd_msg_t msg;
    if (n == 0) {
        zmq_close(s);
        return;
    }
    float *grad = kd_xcalloc(n, sizeof *grad);
    int evicted_after = -1;
    for (int push = 0; push < 15 && evicted_after < 0; push++) {
        for (size_t i = 0; i < n; i++) grad[i] = 0.0f;
        if (push % 3 == 0) grad[n / 2] = NAN;
        if (push % 3 == 1) grad[n / 3] = INFINITY;
        if (push % 3 == 2)
            for (size_t i = 0; i < n; i++) grad[i] = 1e3f; /* norm ~1e6 > max_gradient_norm */
        Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
        ref.epoch = 0;
        ref.batch_id = (uint32_t)push;
        Kdist__PushGradient p = KDIST__PUSH_GRADIENT__INIT;
        p.ref = &ref;
        p.samples = 128;
        p.base_version = version;
        send_push(s, &p, grad, n);
        /* the answer: new weights (rejected, go on) or Refused EVICTED */
        if (!next_message(s, &msg, 20)) break;
        if (msg.env->body_case == KDIST__ENVELOPE__BODY_REFUSED &&
            msg.env->refused->code == KDIST__REFUSAL_CODE__EVICTED)
            evicted_after = push + 1;
        else if (msg.env->body_case == KDIST__ENVELOPE__BODY_WEIGHTS)
            version = msg.env->weights->version;
        kd_msg_close(&msg);
        /* eviction needs honest pushes accepted meanwhile (else the run itself diverged) */
        if (evicted_after < 0) wait_counter(ctx, endpoint, "step", (long)version + 2, 30);
    }
    free(grad);
    fprintf(stderr, "intruder: the poisoning member was evicted after %d rejected pushes\n",
            evicted_after);
    CHECK(evicted_after >= 3);
    CHECK(wait_counter(ctx, endpoint, "members_evicted", 1, 10) == 1);
    zmq_close(s);
}

/* A member whose pushes name batches no accumulated gradient can have (the run has
 * cluster.accumulate 2): more than 2, one twice, two epochs, one that does not exist, fewer
 * samples than batches. Each is dropped and answered "not applied"; nothing is counted (the
 * run's ledger ends whole). */
static void overfull_pusher(void *ctx, const char *endpoint) {
    uint64_t version = 0;
    size_t n = 0;
    void *s = join_as_worker(ctx, endpoint, "evil2", &n, &version);
    kd_msg_t msg;
    json_t *st = status_json(ctx, endpoint, 5);
    const uint32_t epoch = (uint32_t)jlong(st, "epoch");
    const long dropped0 = jlong(st, "messages_dropped");
    version = (uint64_t)jlong(st, "version");
    json_decref(st);
    float *grad = kd_xcalloc(n ? n : 1, sizeof *grad);
    const struct {
        uint32_t epoch[3], batch[3];
        size_t refs;
        uint32_t samples;
    } pushes[] = {
        {{epoch, epoch, epoch}, {1, 2, 3}, 3, 384}, /* three batches */
        {{epoch, epoch}, {5, 5}, 2, 256},           /* one twice */
        {{epoch, epoch + 1}, {5, 6}, 2, 256},       /* two epochs */
        {{epoch, epoch}, {5, 100000}, 2, 256},      /* no such batch */
        {{epoch, epoch}, {5, 6}, 2, 1},             /* one sample for two batches */
    };
    const int n_pushes = (int)(sizeof pushes / sizeof pushes[0]);
    int answered_dropped = 0;
    for (int k = 0; k < n_pushes && n > 0; k++) {
        Kdist__BatchRef refs[3], *more[2];
        for (size_t i = 0; i < pushes[k].refs; i++) {
            kdist__batch_ref__init(&refs[i]);
            refs[i].epoch = pushes[k].epoch[i];
            refs[i].batch_id = pushes[k].batch[i];
            if (i) more[i - 1] = &refs[i];
        }
        Kdist__PushGradient p = KDIST__PUSH_GRADIENT__INIT;
        p.ref = &refs[0];
        p.accumulated = more;
        p.n_accumulated = pushes[k].refs - 1;
        p.samples = pushes[k].samples;
        p.base_version = version;
        p.clock = (uint64_t)k + 1;
        send_push(s, &p, grad, n);
        if (!next_message(s, &msg, 20)) break;
        if (msg.env->body_case == KDIST__ENVELOPE__BODY_WEIGHTS && msg.env->weights->duplicate) {
            answered_dropped++;
            version = msg.env->weights->version;
        }
        kd_msg_close(&msg);
    }
    free(grad);
    long dropped = wait_counter(ctx, endpoint, "messages_dropped", dropped0 + n_pushes, 10);
    fprintf(stderr,
            "intruder: %d of %d impossible accumulated pushes answered 'not applied', "
            "%ld dropped\n",
            answered_dropped, n_pushes, dropped - dropped0);
    CHECK(answered_dropped == n_pushes);
    CHECK(dropped - dropped0 >= n_pushes);
    Kdist__Goodbye bye = KDIST__GOODBYE__INIT;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_GOODBYE;
    env.goodbye = &bye;
    kd_wire_send(s, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT);
    zmq_close(s);
}

/* CurveZMQ: a key joins only as its role and an unknown key not at all. A worker key's Hello
 * as a teacher and a status key's Hello as a worker are refused NOT_AUTHORIZED; an operator
 * key's checkpoint-now is obeyed; a key in no list never gets past the handshake. */
static int count_files(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += strstr(e->d_name, ".safetensors") != NULL;
    if (d) closedir(d);
    return n;
}

static void wrong_roles(void *ctx, const char *endpoint, const char *ckpt_dir) {
    void *s = peer_sock(ctx, "teacher-x-1", endpoint, "worker");
    send_hello(s, KDIST__ROLE__TEACHER, "x", 1);
    CHECK(next_refusal(s, 10) == KDIST__REFUSAL_CODE__NOT_AUTHORIZED);
    zmq_close(s);
    s = peer_sock(ctx, "worker-y-1", endpoint, "status");
    send_hello(s, KDIST__ROLE__WORKER, "y", 1);
    CHECK(next_refusal(s, 10) == KDIST__REFUSAL_CODE__NOT_AUTHORIZED);
    zmq_close(s);

    json_t *before = status_json(ctx, endpoint, 5);
    long refused0 = jlong(before, "control_refused"), conns0 = jlong(before, "connections_refused");
    json_decref(before);
    s = peer_sock(ctx, "operator", endpoint, "operator");
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__CHECKPOINT_NOW;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    int files0 = count_files(ckpt_dir);
    CHECK(kd_wire_send(s, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) == 0);
    int files = files0;
    for (double deadline = kd_test_now() + 20; files <= files0 && kd_test_now() < deadline;) {
        files = count_files(ckpt_dir);
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
    }
    CHECK(files > files0); /* the checkpoint was written */
    zmq_close(s);
    kd_msg_t msg;

    s = peer_sock(ctx, "outsider", endpoint, "outsider");
    send_hello(s, KDIST__ROLE__WORKER, "z", 1);
    long conns = wait_counter(ctx, endpoint, "connections_refused", conns0 + 1, 20);
    CHECK(conns >= conns0 + 1);
    CHECK(!next_message(s, &msg, 0.5)); /* never admitted: no answer */
    zmq_close(s);
    json_t *after = status_json(ctx, endpoint, 5);
    CHECK(jlong(after, "control_refused") == refused0); /* the operator was obeyed */
    json_decref(after);
    fprintf(stderr, "intruder: roles held (worker key as teacher, status key as worker refused; "
                    "operator obeyed; unknown key refused at the handshake)\n");
}

/* An outsider and a bad member while a run trains: nothing they send changes the run, which
 * completes with its ledger whole and a normal accuracy, and every refusal is counted. The
 * control and hello checks happen while the teacher node is stopped (SIGSTOP, its heartbeat
 * timeout far away), so the run cannot end before them. */
static void test_intruders_during_a_run(bool curve) {
    static char lists[4][2 * sizeof keys_dir + 64];
    const char *extra[12] = {"cluster.consistency=async", "train.epochs=8",
                             "cluster.heartbeat_timeout_ms=120000", "cluster.accumulate=2", NULL};
    keys_dir[0] = 0;
    if (curve) {
        snprintf(keys_dir, sizeof keys_dir, "%s/keys", tmp);
        static const char *const names[] = {"coordinator", "teacher", "worker",  "evil",
                                            "operator",    "status",  "outsider"};
        char err[KD_ERR_LEN];
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            kd_curve_pair_t pair;
            CHECK(kd_curve_generate(keys_dir, names[i], true, &pair, err, sizeof err) == 0);
        }
        snprintf(lists[0], sizeof lists[0],
                 "cluster.security.worker_keys=%s/worker.pub,%s/evil.pub", keys_dir, keys_dir);
        snprintf(lists[1], sizeof lists[1], "cluster.security.teacher_keys=%s/teacher.pub",
                 keys_dir);
        snprintf(lists[2], sizeof lists[2], "cluster.security.operator_keys=%s/operator.pub",
                 keys_dir);
        snprintf(lists[3], sizeof lists[3], "cluster.security.status_keys=%s/status.pub", keys_dir);
        extra[4] = "cluster.security.curve=true";
        for (int i = 0; i < 4; i++) extra[5 + i] = lists[i];
        extra[9] = NULL;
    }
    cluster_t c;
    memset(&c, 0, sizeof c);
    if (!start_cluster(&c, curve ? "intruders-curve" : "intruders", extra)) {
        for (int i = 0; i < N_PROCS; i++)
            if (c.pids[i] > 0) kill(c.pids[i], SIGTERM);
        finish_cluster(&c);
        return;
    }
    void *ctx = zmq_ctx_new();
    long workers_seen = 0;
    double deadline = kd_test_now() + 60;
    while (workers_seen < 2 && kd_test_now() < deadline) { /* both workers train */
        json_t *j = status_json(ctx, c.endpoint, 2);
        long pid, steps, steps1;
        workers_seen = find_member_in(j, "worker", "0", &pid, &steps) && steps > 0 &&
                               find_member_in(j, "worker", "1", &pid, &steps1) && steps1 > 0
                           ? 2
                           : 0;
        json_decref(j);
    }
    CHECK(workers_seen == 2);
    kill(c.pids[TEACHER], SIGSTOP); /* holds the run: no batch, no step */
    outsider_controls(ctx, c.endpoint);
    char ckpt_dir[1200];
    snprintf(ckpt_dir, sizeof ckpt_dir, "%s/checkpoints", c.run_dir);
    if (curve) wrong_roles(ctx, c.endpoint, ckpt_dir);
    kill(c.pids[TEACHER], SIGCONT);
    hijack_hello(ctx, c.endpoint);
    overfull_pusher(ctx, c.endpoint);
    poison_pusher(ctx, c.endpoint);
    json_t *last = status_json(ctx, c.endpoint, 5);
    CHECK(last && strcmp(json_string_value(json_object_get(last, "status")), "running") == 0);
    json_decref(last);
    zmq_ctx_term(ctx);
    CHECK(all_alive(&c));
    finish_cluster(&c);

    char path[1200];
    snprintf(path, sizeof path, "%s/summary.json", c.run_dir);
    json_t *summary = json_load_file(path, 0, NULL);
    json_t *ledger = json_object_get(summary, "ledger");
    const char *status = json_string_value(json_object_get(summary, "status"));
    double accuracy = json_number_value(json_object_get(summary, "test_accuracy"));
    fprintf(stderr,
            "intruders: %s, test accuracy %.4f, %lld/%lld applied, %lld control refused, %lld "
            "hellos refused, %lld gradients rejected, %lld evicted\n",
            status ? status : "?", accuracy,
            json_integer_value(json_object_get(ledger, "batches_applied")),
            json_integer_value(json_object_get(ledger, "batches_expected")),
            json_integer_value(json_object_get(ledger, "control_refused")),
            json_integer_value(json_object_get(ledger, "hellos_refused")),
            json_integer_value(json_object_get(ledger, "gradients_rejected")),
            json_integer_value(json_object_get(ledger, "members_evicted")));
    CHECK(status && strcmp(status, "completed") == 0);
    CHECK(json_integer_value(json_object_get(ledger, "batches_applied")) ==
          json_integer_value(json_object_get(ledger, "batches_expected")));
    CHECK(json_integer_value(json_object_get(ledger, "batches_expected")) == 8 * 79);
    CHECK(json_integer_value(json_object_get(ledger, "control_refused")) == 8);
    CHECK(json_integer_value(json_object_get(ledger, "hellos_refused")) >= 1);
    CHECK(json_integer_value(json_object_get(ledger, "gradients_rejected")) >= 3);
    CHECK(json_integer_value(json_object_get(ledger, "members_evicted")) == 1);
    CHECK(accuracy > 0.75); /* 8 epochs of this MLP on 10000 samples: ~0.83 */
    json_decref(summary);
}

int main(void) {
    tmp = kd_test_tmpdir("test_hostile");
    signal(SIGPIPE, SIG_IGN); /* raw writes to a peer that hung up */
    test_garbage_during_a_run();
    test_intruders_during_a_run(false);
    test_intruders_during_a_run(true);
    return kd_test_done("test_hostile");
}
