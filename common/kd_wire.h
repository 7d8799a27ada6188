/* kd_wire: kdist messages on ZeroMQ sockets. Frame 0 is a protobuf-c Envelope whose tensor
 * descriptors (dtype, shape, byte length) declare the raw payload frames that follow; both are
 * validated before anything is used. Large payloads go out zero-copy. Peers are untrusted: a
 * malformed message is consumed whole, reported and dropped, never trusted or fatal.
 * Functions are thread-safe; a socket and a kd_msg_t belong to one thread. */
#ifndef KD_WIRE_H
#define KD_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "kd_curve.h"
#include "kd_recipe.h"      /* kd_wire_format_t */
#include "kd_safetensors.h" /* kd_dtype_t */
#include "kdist.pb-c.h"

#define KD_PROTOCOL_VERSION 1
#define KD_WIRE_MAX_TENSORS 8
#define KD_WIRE_MAX_DIMS    8
#define KD_WIRE_MAX_HEADER  (1 << 20)          /* Welcome carries the recipe text */
#define KD_WIRE_MAX_MESSAGE ((int64_t)1 << 31) /* ZMQ_MAXMSGSIZE: any single frame */
#define KD_WIRE_MAX_PEER    255
/* Set on listening sockets: libzmq then refuses ZMTP 1.0/2.0 peers. */
#define KD_WIRE_ZAP_DOMAIN "kdist"

typedef Kdist__Envelope kd_env_t;

/* A received message: the unpacked envelope and its validated payload frames. */
typedef struct {
    kd_env_t *env; /* owned; NULL when empty */
    int n_tensors;
    zmq_msg_t frames[KD_WIRE_MAX_TENSORS];
    void *data[KD_WIRE_MAX_TENSORS];   /* each payload, 16-byte aligned (see kd_msg_data) */
    void *copies[KD_WIRE_MAX_TENSORS]; /* owned aligned copies of frames ZeroMQ left unaligned */
    uint8_t peer[KD_WIRE_MAX_PEER];    /* ROUTER sockets: the sender's routing id */
    size_t peer_len;
    /* ROUTER sockets under CurveZMQ: the sender's public key (Z85) as the ZAP handler
     * authenticated it; "" in plaintext */
    char user_id[KD_CURVE_Z85_LEN + 1];
} kd_msg_t;

/* Unpacks and validates a header against the byte lengths of the payload frames that came
 * with it: protocol version, a body set, one descriptor per frame, known dtypes, 1..8 dims,
 * no negative dims, element count x dtype size == declared nbytes == frame length (overflow
 * checked). Pure function (the fuzz target). Caller frees *env with kd_env_free. */
int kd_wire_decode(const uint8_t *header, size_t header_len, const size_t *frame_lens, int n_frames,
                   kd_env_t **env, char *err, size_t errlen);
void kd_env_free(kd_env_t *env);

enum { KD_WIRE_OK = 0, KD_WIRE_NONE = 1, KD_WIRE_BAD = -1, KD_WIRE_CLOSED = -2 };

/* Receives one whole message. router: the first frame is the peer's routing id.
 * Returns KD_WIRE_OK; KD_WIRE_NONE when nothing is ready (flags has ZMQ_DONTWAIT) or a signal
 * interrupted; KD_WIRE_BAD for a malformed message (all its frames consumed, err says why;
 * msg->peer is still set so the caller can name the peer); KD_WIRE_CLOSED when the socket or
 * context is gone. On KD_WIRE_OK the caller must kd_msg_close(msg). */
int kd_wire_recv(void *sock, bool router, int flags, kd_msg_t *msg, char *err, size_t errlen);
void kd_msg_close(kd_msg_t *msg);
/* Moves a message to dst (to keep it past the receive loop); src is left empty. */
void kd_msg_move(kd_msg_t *dst, kd_msg_t *src);

/* Payload i, checked: its name, dtype and shape (a negative expected dim matches any size).
 * Returns the data (frame memory, valid until kd_msg_close) or NULL with err set. */
const void *kd_msg_tensor(const kd_msg_t *m, int i, const char *name, kd_dtype_t dtype, int ndim,
                          const int64_t *shape, char *err, size_t errlen);
/* Payload i's bytes, writable and 16-byte aligned: ZeroMQ may hand out frames at any address
 * inside its receive buffer, so unaligned ones were copied on receipt. Valid until close. */
static inline void *kd_msg_data(const kd_msg_t *m, int i) {
    return m->data[i];
}
/* The peer's routing id as printable text (non-printables escaped). */
void kd_msg_peer_text(const kd_msg_t *m, char *out, size_t outlen);

/* One payload to send. Exactly one of: `share` (a zmq message whose buffer is shared through
 * zmq_msg_copy — one weights snapshot for many replies), `free_fn` (zero-copy: ZeroMQ calls
 * free_fn(data, hint) when done with data), or neither (data is copied now). */
typedef struct {
    const char *name;
    kd_dtype_t dtype;
    int ndim;
    int64_t shape[KD_WIRE_MAX_DIMS];
    const void *data;
    size_t nbytes;
    zmq_msg_t *share;
    zmq_free_fn *free_fn;
    void *hint;
} kd_wire_tensor_t;

/* The payloads of each message, defined once for the sender and the receiver (docs/protocol.md):
 *   Weights   0 weights         F32 (n_params), or BF16/F16 as cluster.wire says
 *   Push      0 gradient        F32 (n_params), or BF16/F16 as cluster.wire says
 *   Batch     0 inputs          U8  (B, C, H, W)
 *             1 labels          I32 (B)
 *             2 teacher_logits  F32 (B, classes)   when the run distils
 *   Batch     0 tokens          I32 (B, context + 1)  a language model's windows
 *             1 teacher_records U8  (B, context, record bytes)  when it distils (kd_cache.h) */
typedef struct {
    int index; /* its place among the message's payloads */
    const char *name;
    kd_dtype_t dtype;
    int ndim;
} kd_layout_t;
/* A top-k gradient (cluster.topk_fraction) is KD_LAYOUT_GRADIENT_INDEX, then its values as
 * KD_LAYOUT_GRADIENT_VALUES (both of k entries). */
extern const kd_layout_t KD_LAYOUT_GRADIENT_INDEX, KD_LAYOUT_GRADIENT_VALUES;
extern const kd_layout_t KD_LAYOUT_WEIGHTS, KD_LAYOUT_GRADIENT, KD_LAYOUT_INPUTS, KD_LAYOUT_LABELS,
    KD_LAYOUT_TEACHER_LOGITS, KD_LAYOUT_TOKENS, KD_LAYOUT_TEACHER_RECORDS;
/* Layout l carried as another dtype: the weights and gradient go as the run's cluster.wire. */
kd_layout_t kd_layout_as(const kd_layout_t *l, kd_dtype_t dtype);
/* The dtype of weights and gradients for cluster.wire (F32, BF16 or F16), and floats packed
 * into / unpacked from a payload of that dtype: rounded to nearest even (kd_half.h), NaN and
 * infinity kept, so a receiver's finiteness checks see what the sender computed. */
kd_dtype_t kd_wire_format_dtype(kd_wire_format_t f);
void kd_wire_pack_floats(kd_dtype_t dtype, const float *src, size_t n, void *dst);
void kd_wire_unpack_floats(kd_dtype_t dtype, const void *src, size_t n, float *dst);
/* Error-feedback top-k: the k entries of e largest in magnitude (NaN first, ties to the lower
 * index), as ascending indices and their values packed in dtype; each sent value, as the
 * receiver unpacks it, is subtracted from e, which keeps what was not sent for the next push.
 * scratch holds n floats. */
void kd_wire_pack_topk(kd_dtype_t dtype, float *e, size_t n, size_t k, int32_t *index, void *values,
                       float *scratch);
/* A top-k payload of m entries scattered into dense (n values, zeroed first). -1 with err set if
 * an index is outside [0, n) or not above the one before it. */
int kd_wire_unpack_topk(kd_dtype_t dtype, const int32_t *index, const void *values, size_t m,
                        size_t n, float *dense, char *err, size_t errlen);
/* A payload of layout l to send: name, dtype and shape (l->ndim values) set, the rest zero. */
kd_wire_tensor_t kd_layout_tensor(const kd_layout_t *l, const int64_t *shape);
/* The received payload of layout l, checked as kd_msg_tensor does. */
const void *kd_layout_get(const kd_msg_t *m, const kd_layout_t *l, const int64_t *shape, char *err,
                          size_t errlen);

/* Closes a socket that sends multipart messages to many peers (the coordinator's ROUTER, a
 * teacher's stream), giving the messages in flight up to KD_WIRE_CLOSE_LINGER_MS to leave.
 * With linger 0, libzmq 4.3.4 can abort in its I/O thread (session_base.cpp clean_pipes,
 * "Resource temporarily unavailable", libzmq #3442) when a peer's connection breaks while
 * its engine is half-way through a message whose pipe the close just cut. */
#define KD_WIRE_CLOSE_LINGER_MS 200
void kd_socket_close_draining(void *sock);

/* Sends env (protocol_version and tensor descriptors are filled in here) and its payloads.
 * peer != NULL on ROUTER sockets. flags: 0 or ZMQ_DONTWAIT. Returns 0, or -1 with errno
 * (EHOSTUNREACH: unknown peer under ZMQ_ROUTER_MANDATORY; EAGAIN: high-water mark). If the
 * send fails, payloads passed with free_fn are still released exactly once. */
int kd_wire_send(void *sock, const uint8_t *peer, size_t peer_len, kd_env_t *env,
                 const kd_wire_tensor_t *tensors, int n_tensors, int flags);

/* Sockets with kdist's options: linger 0, ZMQ_MAXMSGSIZE, ZMTP heartbeats (heartbeat_ms,
 * timeout 3x). dealer: routing id `identity`, connected to endpoint. router: bound to endpoint
 * (a '*' port picks a free one; the actual endpoint goes to bound/boundlen), ROUTER_MANDATORY
 * on, ZAP domain KD_WIRE_ZAP_DOMAIN (ZMTP 1.0/2.0 peers are refused; with no ZAP handler,
 * ZMTP 3 NULL-mechanism peers still join). Return NULL with err set (naming the endpoint) on
 * failure. */
void *kd_socket_dealer(void *ctx, const char *identity, const char *endpoint, int heartbeat_ms,
                       char *err, size_t errlen);
void *kd_socket_router(void *ctx, const char *endpoint, int heartbeat_ms, char *bound,
                       size_t boundlen, char *err, size_t errlen);
/* The same under CurveZMQ (kd_curve.h) when curve is not NULL: the dealer is a CURVE client of
 * curve->server_z85 and, when monitor is not NULL, gets a monitor of its handshakes
 * (KD_WIRE_HANDSHAKE_EVENTS, for kd_curve_watch_t) before it connects; the router is a CURVE
 * server with the pair server (its context needs a ZAP handler, kd_zap_new, started first). */
void *kd_socket_dealer_curve(void *ctx, const char *identity, const char *endpoint,
                             int heartbeat_ms, const kd_curve_client_t *curve, void **monitor,
                             char *err, size_t errlen);
void *kd_socket_router_curve(void *ctx, const char *endpoint, int heartbeat_ms,
                             const kd_curve_pair_t *server, char *bound, size_t boundlen, char *err,
                             size_t errlen);
/* CURVE options on any socket, before bind/connect: a server with its pair; a client with its
 * pair and the server's public key (server_z85 may be "" and come later, per connect, through
 * kd_wire_curve_server_key). 0, or -1 with err set. */
/* A ROUTER for a local ipc:// channel whose directory's permissions are its authentication: no
 * CurveZMQ and no ZAP domain (a context's ZAP handler would otherwise judge its NULL peers). */
void *kd_socket_router_local(void *ctx, const char *endpoint, char *err, size_t errlen);
int kd_wire_curve_server(void *sock, const kd_curve_pair_t *self, char *err, size_t errlen);
int kd_wire_curve_client(void *sock, const kd_curve_client_t *c, char *err, size_t errlen);
int kd_wire_curve_server_key(void *sock, const char *server_z85, char *err, size_t errlen);

/* Connections libzmq refuses before any message reaches kdist (raw non-ZeroMQ bytes, ZMTP
 * 1.0/2.0 greetings, broken handshakes, CurveZMQ keys the ZAP handler refused) are visible only
 * through a socket monitor. kd_wire_monitor starts one on a listening socket (name: for the
 * inproc endpoint) and returns the socket its events arrive on, or NULL with err set.
 * kd_wire_refused drains it without blocking, logs each refusal with the address (at most once a
 * second; refused keys are logged by the ZAP handler, which knows the key) and returns how many
 * there were; *total counts them over the process's life. */
void *kd_wire_monitor(void *ctx, void *socket, const char *name, char *err, size_t errlen);
/* A monitor of other events (ZMQ_EVENT_* mask); the connecting side's handshakes: */
#define KD_WIRE_HANDSHAKE_EVENTS                                                                   \
    (ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |                \
     ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |                  \
     ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
void *kd_wire_monitor_events(void *ctx, void *socket, const char *name, int events, char *err,
                             size_t errlen);
long kd_wire_refused(void *monitor, const char *what, long *total);
/* Stops socket's monitor and closes monitor, in the only safe order; before closing socket.
 * Either may be NULL. */
void kd_wire_monitor_close(void *socket, void *monitor);
/* Binds sock to endpoint, reporting the resolved endpoint (for '*' ports). */
int kd_socket_bind(void *sock, const char *endpoint, char *bound, size_t boundlen, char *err,
                   size_t errlen);

/* "<role>-<id>-<incarnation>", the routing id every node uses. */
void kd_wire_identity(char *out, size_t outlen, const char *role, const char *node_id,
                      uint64_t incarnation);
/* A fresh incarnation number: random, so a restart never depends on the clock. */
uint64_t kd_wire_new_incarnation(void);

/* Refused{code, reason} to peer (ROUTER) or to the other end (peer NULL), without blocking. */
int kd_wire_send_refused(void *sock, const uint8_t *peer, size_t peer_len, Kdist__RefusalCode code,
                         const char *reason);
const char *kd_wire_body_name(const kd_env_t *env); /* "hello", "push", ... for logs */

#endif
