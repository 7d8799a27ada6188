/* kd_wire: kdist messages on ZeroMQ sockets (see kd_wire.h). */
#include "kd_wire.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>
#include <unistd.h>

#include "kd_half.h"
#include "kd_log.h"
#include "kd_util.h"

/* kd_dtype_t <-> wire DType; only the types the protocol carries. */
static int dtype_to_wire(kd_dtype_t d) {
    switch (d) {
    case KD_DTYPE_F32:
        return KDIST__DTYPE__F32;
    case KD_DTYPE_F16:
        return KDIST__DTYPE__F16;
    case KD_DTYPE_BF16:
        return KDIST__DTYPE__BF16;
    case KD_DTYPE_I32:
        return KDIST__DTYPE__I32;
    case KD_DTYPE_U8:
        return KDIST__DTYPE__U8;
    case KD_DTYPE_I8:
        return KDIST__DTYPE__I8;
    default:
        return KDIST__DTYPE__DTYPE_UNSPECIFIED;
    }
}

static int dtype_from_wire(int w, kd_dtype_t *out) {
    switch (w) {
    case KDIST__DTYPE__F32:
        *out = KD_DTYPE_F32;
        return 0;
    case KDIST__DTYPE__F16:
        *out = KD_DTYPE_F16;
        return 0;
    case KDIST__DTYPE__BF16:
        *out = KD_DTYPE_BF16;
        return 0;
    case KDIST__DTYPE__I32:
        *out = KD_DTYPE_I32;
        return 0;
    case KDIST__DTYPE__U8:
        *out = KD_DTYPE_U8;
        return 0;
    case KDIST__DTYPE__I8:
        *out = KD_DTYPE_I8;
        return 0;
    default:
        return -1;
    }
}

void kd_env_free(kd_env_t *env) {
    if (env) kdist__envelope__free_unpacked(env, NULL);
}

int kd_wire_decode(const uint8_t *header, size_t header_len, const size_t *frame_lens, int n_frames,
                   kd_env_t **env_out, char *err, size_t errlen) {
    *env_out = NULL;
    if (header_len > KD_WIRE_MAX_HEADER)
        return kd_err(err, errlen, "header of %zu bytes exceeds the %d-byte limit", header_len,
                      KD_WIRE_MAX_HEADER);
    kd_env_t *env = kdist__envelope__unpack(NULL, header_len, header);
    if (!env) return kd_err(err, errlen, "header is not a valid Envelope (%zu bytes)", header_len);
    if (env->protocol_version != KD_PROTOCOL_VERSION) {
        kd_err(err, errlen, "protocol version %u, expected %u", env->protocol_version,
               KD_PROTOCOL_VERSION);
        goto bad;
    }
    if (env->body_case == KDIST__ENVELOPE__BODY__NOT_SET) {
        kd_err(err, errlen, "message has no body (unknown message type?)");
        goto bad;
    }
    if ((int)env->n_tensors != n_frames || n_frames > KD_WIRE_MAX_TENSORS) {
        kd_err(err, errlen, "header declares %zu tensors but %d payload frames came",
               env->n_tensors, n_frames);
        goto bad;
    }
    for (int i = 0; i < n_frames; i++) {
        const Kdist__TensorDesc *t = env->tensors[i];
        kd_dtype_t dt;
        if (dtype_from_wire(t->dtype, &dt) != 0) {
            kd_err(err, errlen, "tensor %d ('%s'): unknown dtype %d", i, t->name, t->dtype);
            goto bad;
        }
        if (t->n_shape < 1 || t->n_shape > KD_WIRE_MAX_DIMS) {
            kd_err(err, errlen, "tensor %d ('%s'): %zu dimensions (1..%d allowed)", i, t->name,
                   t->n_shape, KD_WIRE_MAX_DIMS);
            goto bad;
        }
        uint64_t bytes = kd_dtype_size(dt);
        for (size_t d = 0; d < t->n_shape; d++) {
            int64_t dim = t->shape[d];
            if (dim < 0 || (dim > 0 && bytes > (uint64_t)KD_WIRE_MAX_MESSAGE / (uint64_t)dim)) {
                kd_err(err, errlen, "tensor %d ('%s'): dimension %zu is %lld", i, t->name, d,
                       (long long)dim);
                goto bad;
            }
            bytes *= (uint64_t)dim;
        }
        if (bytes != t->nbytes || t->nbytes != frame_lens[i]) {
            kd_err(err, errlen,
                   "tensor %d ('%s'): shape gives %llu bytes, header says %llu, frame has %zu", i,
                   t->name, (unsigned long long)bytes, (unsigned long long)t->nbytes,
                   frame_lens[i]);
            goto bad;
        }
    }
    *env_out = env;
    return 0;
bad:
    kd_env_free(env);
    return -1;
}

/* Points data[i] at payload i, through an aligned copy when ZeroMQ's frame is unaligned
 * (frames may sit anywhere in its receive buffer; floats must not). */
static void align_payload(kd_msg_t *m, int i) {
    void *d = zmq_msg_data(&m->frames[i]);
    if ((uintptr_t)d % 16 != 0) {
        size_t len = zmq_msg_size(&m->frames[i]);
        m->copies[i] = aligned_alloc(16, (len + 15) & ~(size_t)15);
        KD_ASSERT(m->copies[i]);
        memcpy(m->copies[i], d, len);
        d = m->copies[i];
    }
    m->data[i] = d;
}

static bool more_frames(void *sock) {
    int more = 0;
    size_t len = sizeof more;
    zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len);
    return more != 0;
}

/* Reads and discards the rest of a multipart message. */
static void drain_rest(void *sock) {
    while (more_frames(sock)) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return;
        }
        zmq_msg_close(&f);
    }
}

int kd_wire_recv(void *sock, bool router, int flags, kd_msg_t *msg, char *err, size_t errlen) {
    memset(msg, 0, sizeof *msg);
    zmq_msg_t first;
    zmq_msg_init(&first);
    if (zmq_msg_recv(&first, sock, flags) < 0) {
        int e = errno;
        zmq_msg_close(&first);
        if (e == EAGAIN || e == EINTR) return KD_WIRE_NONE;
        kd_err(err, errlen, "receive failed: %s", zmq_strerror(e));
        return KD_WIRE_CLOSED;
    }
    zmq_msg_t header;
    if (router) {
        size_t n = zmq_msg_size(&first);
        msg->peer_len = n < KD_WIRE_MAX_PEER ? n : KD_WIRE_MAX_PEER;
        memcpy(msg->peer, zmq_msg_data(&first), msg->peer_len);
        zmq_msg_close(&first);
        if (!more_frames(sock)) return kd_err(err, errlen, "empty message"), KD_WIRE_BAD;
        zmq_msg_init(&header);
        if (zmq_msg_recv(&header, sock, 0) < 0) {
            zmq_msg_close(&header);
            kd_err(err, errlen, "receive failed: %s", zmq_strerror(errno));
            return KD_WIRE_CLOSED;
        }
        /* the ZAP handler's verdict travels with every frame of the connection */
        const char *user = zmq_msg_gets(&header, "User-Id");
        if (user) snprintf(msg->user_id, sizeof msg->user_id, "%s", user);
    } else {
        header = first;
    }

    /* Collect the payload frames (at most KD_WIRE_MAX_TENSORS; more is malformed). */
    size_t lens[KD_WIRE_MAX_TENSORS];
    int n = 0;
    int rc = KD_WIRE_BAD;
    while (more_frames(sock)) {
        if (n == KD_WIRE_MAX_TENSORS) {
            drain_rest(sock);
            kd_err(err, errlen, "more than %d payload frames", KD_WIRE_MAX_TENSORS);
            goto fail;
        }
        zmq_msg_init(&msg->frames[n]);
        if (zmq_msg_recv(&msg->frames[n], sock, 0) < 0) {
            zmq_msg_close(&msg->frames[n]);
            kd_err(err, errlen, "receive failed: %s", zmq_strerror(errno));
            rc = KD_WIRE_CLOSED;
            goto fail;
        }
        lens[n] = zmq_msg_size(&msg->frames[n]);
        n++;
    }
    msg->n_tensors = n;
    for (int i = 0; i < n; i++) align_payload(msg, i);
    if (kd_wire_decode(zmq_msg_data(&header), zmq_msg_size(&header), lens, n, &msg->env, err,
                       errlen) != 0)
        goto fail;
    zmq_msg_close(&header);
    return KD_WIRE_OK;
fail:
    zmq_msg_close(&header);
    for (int i = 0; i < n; i++) {
        zmq_msg_close(&msg->frames[i]);
        free(msg->copies[i]);
        msg->copies[i] = NULL;
    }
    msg->n_tensors = 0;
    msg->env = NULL;
    return rc;
}

void kd_msg_close(kd_msg_t *msg) {
    if (!msg) return;
    for (int i = 0; i < msg->n_tensors; i++) {
        zmq_msg_close(&msg->frames[i]);
        free(msg->copies[i]);
        msg->copies[i] = NULL;
    }
    msg->n_tensors = 0;
    kd_env_free(msg->env);
    msg->env = NULL;
}

void kd_msg_move(kd_msg_t *dst, kd_msg_t *src) {
    memcpy(dst, src, sizeof *dst);
    for (int i = 0; i < src->n_tensors; i++) {
        /* zmq_msg_t must be moved, not copied: small frames live inside the struct */
        zmq_msg_init(&dst->frames[i]);
        zmq_msg_move(&dst->frames[i], &src->frames[i]);
        if (!src->copies[i]) align_payload(dst, i); /* inline data moved with the struct */
        zmq_msg_close(&src->frames[i]);
    }
    memset(src, 0, sizeof *src);
}

const kd_layout_t KD_LAYOUT_WEIGHTS = {0, "weights", KD_DTYPE_F32, 1};
const kd_layout_t KD_LAYOUT_GRADIENT = {0, "gradient", KD_DTYPE_F32, 1};
const kd_layout_t KD_LAYOUT_GRADIENT_INDEX = {0, "gradient_index", KD_DTYPE_I32, 1};
const kd_layout_t KD_LAYOUT_GRADIENT_VALUES = {1, "gradient", KD_DTYPE_F32, 1};
const kd_layout_t KD_LAYOUT_INPUTS = {0, "inputs", KD_DTYPE_U8, 4};
const kd_layout_t KD_LAYOUT_LABELS = {1, "labels", KD_DTYPE_I32, 1};
const kd_layout_t KD_LAYOUT_TEACHER_LOGITS = {2, "teacher_logits", KD_DTYPE_F32, 2};
const kd_layout_t KD_LAYOUT_TOKENS = {0, "tokens", KD_DTYPE_I32, 2};
/* a language model's teacher: (windows, positions, record bytes) in the cache's encoding */
const kd_layout_t KD_LAYOUT_TEACHER_RECORDS = {1, "teacher_records", KD_DTYPE_U8, 3};

kd_layout_t kd_layout_as(const kd_layout_t *l, kd_dtype_t dtype) {
    kd_layout_t as = *l;
    as.dtype = dtype;
    return as;
}

kd_dtype_t kd_wire_format_dtype(kd_wire_format_t f) {
    return f == KD_WIRE_BF16 ? KD_DTYPE_BF16 : f == KD_WIRE_FP16 ? KD_DTYPE_F16 : KD_DTYPE_F32;
}

void kd_wire_pack_floats(kd_dtype_t dtype, const float *src, size_t n, void *dst) {
    uint16_t *half = dst;
    switch (dtype) {
    case KD_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) half[i] = kd_f32_to_bf16(src[i]);
        break;
    case KD_DTYPE_F16:
        for (size_t i = 0; i < n; i++) half[i] = kd_f32_to_f16(src[i]);
        break;
    default:
        KD_ASSERT(dtype == KD_DTYPE_F32);
        memcpy(dst, src, n * sizeof(float));
    }
}

void kd_wire_unpack_floats(kd_dtype_t dtype, const void *src, size_t n, float *dst) {
    const uint16_t *half = src;
    switch (dtype) {
    case KD_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = kd_bf16_to_f32(half[i]);
        break;
    case KD_DTYPE_F16:
        for (size_t i = 0; i < n; i++) dst[i] = kd_f16_to_f32(half[i]);
        break;
    default:
        KD_ASSERT(dtype == KD_DTYPE_F32);
        memcpy(dst, src, n * sizeof(float));
    }
}

static void swap_floats(float *a, float *b) {
    float t = *a;
    *a = *b;
    *b = t;
}

/* The k-th largest of v[0..n) (1 <= k <= n, no NaN), reordering v: quickselect with a
 * median-of-three pivot and a three-way partition, so runs of equal values end it. */
static float kth_largest(float *v, size_t n, size_t k) {
    size_t lo = 0, hi = n; /* the k-th is in v[lo, hi) */
    const size_t want = k - 1;
    for (;;) {
        if (hi - lo <= 1) return v[lo];
        const float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
        const float pivot = fmaxf(fminf(a, b), fminf(fmaxf(a, b), c));
        /* [lo, lt) above the pivot, [lt, gt) equal, [gt, hi) below */
        size_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            if (v[i] > pivot)
                swap_floats(&v[lt++], &v[i++]);
            else if (v[i] < pivot)
                swap_floats(&v[i], &v[--gt]);
            else
                i++;
        }
        if (want < lt)
            hi = lt;
        else if (want >= gt)
            lo = gt;
        else
            return pivot;
    }
}

/* Magnitude for the top-k choice: NaN above everything, so that it is sent and rejected. */
static float topk_magnitude(float x) {
    return isnan(x) ? INFINITY : fabsf(x);
}

void kd_wire_pack_topk(kd_dtype_t dtype, float *e, size_t n, size_t k, int32_t *index, void *values,
                       float *scratch) {
    KD_ASSERT(k >= 1 && k <= n && n <= INT32_MAX);
    for (size_t i = 0; i < n; i++) scratch[i] = topk_magnitude(e[i]);
    const float threshold = kth_largest(scratch, n, k);
    size_t above = 0;
    for (size_t i = 0; i < n; i++) above += topk_magnitude(e[i]) > threshold;
    size_t ties = k - above, m = 0;
    for (size_t i = 0; i < n && m < k; i++) {
        const float mag = topk_magnitude(e[i]);
        if (mag > threshold || (mag == threshold && ties > 0)) {
            if (mag == threshold) ties--;
            index[m] = (int32_t)i;
            scratch[m++] = e[i]; /* the values, gathered to pack at once */
        }
    }
    KD_ASSERT(m == k);
    kd_wire_pack_floats(dtype, scratch, k, values);
    kd_wire_unpack_floats(dtype, values, k, scratch); /* what the receiver will see */
    for (size_t j = 0; j < k; j++) e[index[j]] -= scratch[j];
}

int kd_wire_unpack_topk(kd_dtype_t dtype, const int32_t *index, const void *values, size_t m,
                        size_t n, float *dense, char *err, size_t errlen) {
    for (size_t j = 0; j < m; j++)
        if (index[j] < 0 || (size_t)index[j] >= n || (j > 0 && index[j] <= index[j - 1]))
            return kd_err(err, errlen,
                          "top-k gradient index %d at %zu is outside [0, %zu) or not above the "
                          "one before it",
                          index[j], j, n);
    memset(dense, 0, n * sizeof *dense);
    const size_t size = kd_dtype_size(dtype);
    for (size_t j = 0; j < m; j++)
        kd_wire_unpack_floats(dtype, (const uint8_t *)values + j * size, 1, &dense[index[j]]);
    return 0;
}

kd_wire_tensor_t kd_layout_tensor(const kd_layout_t *l, const int64_t *shape) {
    kd_wire_tensor_t t = {.name = l->name, .dtype = l->dtype, .ndim = l->ndim};
    for (int d = 0; d < l->ndim; d++) t.shape[d] = shape[d];
    return t;
}

const void *kd_layout_get(const kd_msg_t *m, const kd_layout_t *l, const int64_t *shape, char *err,
                          size_t errlen) {
    return kd_msg_tensor(m, l->index, l->name, l->dtype, l->ndim, shape, err, errlen);
}

const void *kd_msg_tensor(const kd_msg_t *m, int i, const char *name, kd_dtype_t dtype, int ndim,
                          const int64_t *shape, char *err, size_t errlen) {
    if (i < 0 || i >= m->n_tensors) {
        kd_err(err, errlen, "missing tensor '%s' (message has %d)", name, m->n_tensors);
        return NULL;
    }
    const Kdist__TensorDesc *t = m->env->tensors[i];
    kd_dtype_t got;
    const bool known = dtype_from_wire(t->dtype, &got) == 0;
    if (strcmp(t->name, name) != 0 || !known || got != dtype || (int)t->n_shape != ndim) {
        kd_err(err, errlen, "tensor %d is '%s' %s with %zu dims, expected '%s' %s with %d dims", i,
               t->name, known ? kd_dtype_name(got) : "(unknown dtype)", t->n_shape, name,
               kd_dtype_name(dtype), ndim);
        return NULL;
    }
    for (int d = 0; d < ndim; d++) {
        if (shape[d] >= 0 && t->shape[d] != shape[d]) {
            kd_err(err, errlen, "tensor '%s': dimension %d is %lld, expected %lld", name, d,
                   (long long)t->shape[d], (long long)shape[d]);
            return NULL;
        }
    }
    return m->data[i];
}

void kd_msg_peer_text(const kd_msg_t *m, char *out, size_t outlen) {
    size_t o = 0;
    for (size_t i = 0; i < m->peer_len && o + 5 < outlen; i++) {
        uint8_t c = m->peer[i];
        if (isprint(c) && c != '\\')
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
    }
    if (outlen) out[o < outlen ? o : outlen - 1] = 0;
}

/* Builds the zmq message of one payload; on failure releases zero-copy data and leaves *out
 * an empty (closable) message. */
static int payload_msg(zmq_msg_t *out, const kd_wire_tensor_t *t) {
    if (t->share) { /* zmq_msg_copy releases the destination first: it must be initialised */
        zmq_msg_init(out);
        return zmq_msg_copy(out, t->share);
    }
    if (t->free_fn) {
        if (zmq_msg_init_data(out, (void *)t->data, t->nbytes, t->free_fn, t->hint) == 0) return 0;
        t->free_fn((void *)t->data, t->hint);
        zmq_msg_init(out);
        return -1;
    }
    if (zmq_msg_init_size(out, t->nbytes) != 0) return zmq_msg_init(out), -1;
    if (t->nbytes) memcpy(zmq_msg_data(out), t->data, t->nbytes);
    return 0;
}

int kd_wire_send(void *sock, const uint8_t *peer, size_t peer_len, kd_env_t *env,
                 const kd_wire_tensor_t *tensors, int n_tensors, int flags) {
    KD_ASSERT(n_tensors >= 0 && n_tensors <= KD_WIRE_MAX_TENSORS);
    Kdist__TensorDesc descs[KD_WIRE_MAX_TENSORS];
    Kdist__TensorDesc *desc_ptrs[KD_WIRE_MAX_TENSORS];
    for (int i = 0; i < n_tensors; i++) {
        const kd_wire_tensor_t *t = &tensors[i];
        kdist__tensor_desc__init(&descs[i]);
        descs[i].name = (char *)t->name;
        descs[i].dtype = dtype_to_wire(t->dtype);
        descs[i].n_shape = (size_t)t->ndim;
        descs[i].shape = (int64_t *)t->shape;
        descs[i].nbytes = t->share ? zmq_msg_size(t->share) : t->nbytes;
        desc_ptrs[i] = &descs[i];
    }
    env->protocol_version = KD_PROTOCOL_VERSION;
    env->n_tensors = (size_t)n_tensors;
    env->tensors = desc_ptrs;

    /* Build every frame first, so a failure cannot leave half a message on the socket. */
    zmq_msg_t payloads[KD_WIRE_MAX_TENSORS];
    int built = 0, rc = -1, saved_errno = 0;
    for (; built < n_tensors; built++)
        if (payload_msg(&payloads[built], &tensors[built]) != 0) {
            saved_errno = errno;
            zmq_msg_close(&payloads[built]);
            for (int j = built + 1; j < n_tensors; j++)
                if (tensors[j].free_fn)
                    tensors[j].free_fn((void *)tensors[j].data, tensors[j].hint);
            goto out;
        }
    size_t hlen = kdist__envelope__get_packed_size(env);
    zmq_msg_t header;
    if (zmq_msg_init_size(&header, hlen) != 0) {
        saved_errno = errno;
        goto out;
    }
    kdist__envelope__pack(env, zmq_msg_data(&header));

    int more = n_tensors ? ZMQ_SNDMORE : 0;
    if (peer) {
        zmq_msg_t id;
        zmq_msg_init_size(&id, peer_len);
        memcpy(zmq_msg_data(&id), peer, peer_len);
        if (zmq_msg_send(&id, sock, ZMQ_SNDMORE | flags) < 0) {
            saved_errno = errno;
            zmq_msg_close(&id);
            zmq_msg_close(&header);
            goto out;
        }
    }
    /* Once the first frame is queued, ZeroMQ delivers the message whole: no more failures. */
    if (zmq_msg_send(&header, sock, more | (peer ? 0 : flags)) < 0) {
        saved_errno = errno;
        zmq_msg_close(&header);
        goto out;
    }
    for (int i = 0; i < n_tensors; i++) {
        zmq_msg_send(&payloads[i], sock, i + 1 < n_tensors ? ZMQ_SNDMORE : 0);
        zmq_msg_close(&payloads[i]);
    }
    built = 0;
    rc = 0;
out:
    for (int i = 0; i < built; i++) zmq_msg_close(&payloads[i]);
    env->n_tensors = 0;
    env->tensors = NULL;
    if (rc) errno = saved_errno;
    return rc;
}

static void set_common_options(void *s, int heartbeat_ms) {
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    int64_t max = KD_WIRE_MAX_MESSAGE;
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max, sizeof max);
    if (heartbeat_ms > 0) {
        int timeout = 3 * heartbeat_ms;
        zmq_setsockopt(s, ZMQ_HEARTBEAT_IVL, &heartbeat_ms, sizeof heartbeat_ms);
        zmq_setsockopt(s, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout);
        zmq_setsockopt(s, ZMQ_HEARTBEAT_TTL, &timeout, sizeof timeout);
    }
}

int kd_socket_bind(void *sock, const char *endpoint, char *bound, size_t boundlen, char *err,
                   size_t errlen) {
    if (zmq_bind(sock, endpoint) != 0)
        return kd_err(err, errlen, "cannot bind %s: %s", endpoint, zmq_strerror(errno));
    if (bound) {
        size_t len = boundlen;
        if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, bound, &len) != 0)
            snprintf(bound, boundlen, "%s", endpoint);
    }
    return 0;
}

static int set_curve_opt(void *sock, int opt, const void *val, size_t len, const char *what,
                         char *err, size_t errlen) {
    if (zmq_setsockopt(sock, opt, val, len) == 0) return 0;
    return kd_err(err, errlen, "cannot set %s: %s", what, zmq_strerror(errno));
}

/* A draft option in libzmq 4.3 (zmq.h declares it only with ZMQ_BUILD_DRAFT_API), built into
 * Debian's libzmq5; 4.3.4 answers EINVAL where it is not, and then we refuse to serve. */
#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93
#endif

int kd_wire_curve_server(void *sock, const kd_curve_pair_t *self, char *err, size_t errlen) {
    int one = 1;
    if (!self->secret_z85[0]) return kd_err(err, errlen, "a CurveZMQ server needs a secret key");
    /* Without an enforced ZAP domain, libzmq admits every CURVE key when no ZAP handler
     * answers (a handler that failed to start or died): with it, the handshake fails. */
    if (set_curve_opt(sock, ZMQ_CURVE_SERVER, &one, sizeof one, "ZMQ_CURVE_SERVER", err, errlen) ||
        set_curve_opt(sock, ZMQ_CURVE_SECRETKEY, self->secret_z85, KD_CURVE_Z85_LEN,
                      "ZMQ_CURVE_SECRETKEY", err, errlen) ||
        set_curve_opt(sock, ZMQ_ZAP_DOMAIN, KD_WIRE_ZAP_DOMAIN, strlen(KD_WIRE_ZAP_DOMAIN),
                      "ZMQ_ZAP_DOMAIN", err, errlen) ||
        set_curve_opt(sock, ZMQ_ZAP_ENFORCE_DOMAIN, &one, sizeof one,
                      "ZMQ_ZAP_ENFORCE_DOMAIN (this libzmq cannot make CurveZMQ fail closed)", err,
                      errlen))
        return -1;
    return 0;
}

int kd_wire_curve_client(void *sock, const kd_curve_client_t *c, char *err, size_t errlen) {
    if (set_curve_opt(sock, ZMQ_CURVE_PUBLICKEY, c->self.public_z85, KD_CURVE_Z85_LEN,
                      "ZMQ_CURVE_PUBLICKEY", err, errlen) ||
        set_curve_opt(sock, ZMQ_CURVE_SECRETKEY, c->self.secret_z85, KD_CURVE_Z85_LEN,
                      "ZMQ_CURVE_SECRETKEY", err, errlen))
        return -1;
    return c->server_z85[0] ? kd_wire_curve_server_key(sock, c->server_z85, err, errlen) : 0;
}

int kd_wire_curve_server_key(void *sock, const char *server_z85, char *err, size_t errlen) {
    if (strlen(server_z85) != KD_CURVE_Z85_LEN)
        return kd_err(err, errlen, "the server key '%.60s' is not a Z85 key", server_z85);
    return set_curve_opt(sock, ZMQ_CURVE_SERVERKEY, server_z85, KD_CURVE_Z85_LEN,
                         "ZMQ_CURVE_SERVERKEY (not a Z85 key?)", err, errlen);
}

void *kd_socket_dealer(void *ctx, const char *identity, const char *endpoint, int heartbeat_ms,
                       char *err, size_t errlen) {
    return kd_socket_dealer_curve(ctx, identity, endpoint, heartbeat_ms, NULL, NULL, err, errlen);
}

void *kd_socket_dealer_curve(void *ctx, const char *identity, const char *endpoint,
                             int heartbeat_ms, const kd_curve_client_t *curve, void **monitor,
                             char *err, size_t errlen) {
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    if (!s) return kd_err(err, errlen, "cannot create socket: %s", zmq_strerror(errno)), NULL;
    set_common_options(s, heartbeat_ms);
    zmq_setsockopt(s, ZMQ_ROUTING_ID, identity, strlen(identity));
    if (monitor) *monitor = NULL;
    if ((curve && kd_wire_curve_client(s, curve, err, errlen) != 0) ||
        (monitor && !(*monitor = kd_wire_monitor_events(ctx, s, "dealer", KD_WIRE_HANDSHAKE_EVENTS,
                                                        err, errlen)))) {
        zmq_close(s);
        return NULL;
    }
    if (zmq_connect(s, endpoint) != 0) {
        kd_err(err, errlen, "cannot connect to %s: %s", endpoint, zmq_strerror(errno));
        if (monitor) kd_wire_monitor_close(s, *monitor), *monitor = NULL;
        zmq_close(s);
        return NULL;
    }
    return s;
}

void *kd_socket_router(void *ctx, const char *endpoint, int heartbeat_ms, char *bound,
                       size_t boundlen, char *err, size_t errlen) {
    return kd_socket_router_curve(ctx, endpoint, heartbeat_ms, NULL, bound, boundlen, err, errlen);
}

void *kd_socket_router_curve(void *ctx, const char *endpoint, int heartbeat_ms,
                             const kd_curve_pair_t *server, char *bound, size_t boundlen, char *err,
                             size_t errlen) {
    void *s = zmq_socket(ctx, ZMQ_ROUTER);
    if (!s) return kd_err(err, errlen, "cannot create socket: %s", zmq_strerror(errno)), NULL;
    set_common_options(s, heartbeat_ms);
    if (server && kd_wire_curve_server(s, server, err, errlen) != 0) {
        zmq_close(s);
        return NULL;
    }
    int one = 1;
    zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    /* No ROUTER_HANDOVER: with it, anyone who connects under a member's routing id would take
     * over its pipe. A node whose connection is still held reconnects under a new identity. */
    /* A ZAP domain makes libzmq refuse ZMTP 1.0/2.0 peers, which would otherwise hand raw
     * bytes up as messages; with no ZAP handler, NULL-mechanism (ZMTP 3) peers still join. */
    zmq_setsockopt(s, ZMQ_ZAP_DOMAIN, KD_WIRE_ZAP_DOMAIN, strlen(KD_WIRE_ZAP_DOMAIN));
    if (kd_socket_bind(s, endpoint, bound, boundlen, err, errlen) != 0) {
        zmq_close(s);
        return NULL;
    }
    return s;
}

void kd_socket_close_draining(void *sock) {
    if (!sock) return;
    int linger = KD_WIRE_CLOSE_LINGER_MS;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(sock);
}

void *kd_socket_router_local(void *ctx, const char *endpoint, char *err, size_t errlen) {
    void *s = zmq_socket(ctx, ZMQ_ROUTER);
    if (!s) return kd_err(err, errlen, "cannot create socket: %s", zmq_strerror(errno)), NULL;
    set_common_options(s, 0);
    int one = 1;
    zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    if (kd_socket_bind(s, endpoint, NULL, 0, err, errlen) != 0) {
        zmq_close(s);
        return NULL;
    }
    return s;
}

void kd_wire_identity(char *out, size_t outlen, const char *role, const char *node_id,
                      uint64_t incarnation) {
    snprintf(out, outlen, "%s-%s-%llu", role, node_id, (unsigned long long)incarnation);
}

/* Random, not the time: a clock that steps back must not make a restarted node look older. */
uint64_t kd_wire_new_incarnation(void) {
    uint64_t x = 0;
    if (getrandom(&x, sizeof x, 0) != sizeof x) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        x = ((uint64_t)tv.tv_sec * 1000000u + (uint64_t)tv.tv_usec) ^ ((uint64_t)getpid() << 40);
    }
    return (x >> 1) | 1; /* positive as a signed 64-bit number too, never 0 */
}

int kd_wire_send_refused(void *sock, const uint8_t *peer, size_t peer_len, Kdist__RefusalCode code,
                         const char *reason) {
    Kdist__Refused ref = KDIST__REFUSED__INIT;
    ref.reason = (char *)reason;
    ref.code = code;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_REFUSED;
    env.refused = &ref;
    return kd_wire_send(sock, peer, peer_len, &env, NULL, 0, ZMQ_DONTWAIT);
}

const char *kd_wire_body_name(const kd_env_t *env) {
    switch (env ? env->body_case : KDIST__ENVELOPE__BODY__NOT_SET) {
    case KDIST__ENVELOPE__BODY_HELLO:
        return "hello";
    case KDIST__ENVELOPE__BODY_WELCOME:
        return "welcome";
    case KDIST__ENVELOPE__BODY_REFUSED:
        return "refused";
    case KDIST__ENVELOPE__BODY_HEARTBEAT:
        return "heartbeat";
    case KDIST__ENVELOPE__BODY_BATCH:
        return "batch";
    case KDIST__ENVELOPE__BODY_PUSH:
        return "push";
    case KDIST__ENVELOPE__BODY_WEIGHTS:
        return "weights";
    case KDIST__ENVELOPE__BODY_ASSIGN:
        return "assign";
    case KDIST__ENVELOPE__BODY_CONTROL:
        return "control";
    case KDIST__ENVELOPE__BODY_GOODBYE:
        return "goodbye";
    case KDIST__ENVELOPE__BODY_STATUS:
        return "status";
    case KDIST__ENVELOPE__BODY_PEERS:
        return "peers";
    case KDIST__ENVELOPE__BODY_NACK:
        return "nack";
    case KDIST__ENVELOPE__BODY_GRADIENT_CHUNK:
        return "gradient chunk";
    case KDIST__ENVELOPE__BODY_WEIGHTS_CHUNK:
        return "weights chunk";
    default:
        return "unknown";
    }
}

#define REFUSED_EVENTS                                                                             \
    (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |                  \
     ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

void *kd_wire_monitor(void *ctx, void *socket, const char *name, char *err, size_t errlen) {
    return kd_wire_monitor_events(ctx, socket, name, REFUSED_EVENTS, err, errlen);
}

void *kd_wire_monitor_events(void *ctx, void *socket, const char *name, int events, char *err,
                             size_t errlen) {
    static atomic_long serial; /* a socket closed and another made at its address: new name */
    char endpoint[128];
    snprintf(endpoint, sizeof endpoint, "inproc://kd-monitor-%s-%p-%ld", name, socket,
             atomic_fetch_add(&serial, 1));
    void *pair = NULL;
    int zero = 0;
    if (zmq_socket_monitor(socket, endpoint, events) != 0 || !(pair = zmq_socket(ctx, ZMQ_PAIR)) ||
        zmq_setsockopt(pair, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        /* no high-water mark: libzmq's I/O thread sends events blocking (see below) */
        zmq_setsockopt(pair, ZMQ_RCVHWM, &zero, sizeof zero) != 0 ||
        zmq_connect(pair, endpoint) != 0) {
        kd_err(err, errlen, "cannot monitor the %s socket: %s", name, zmq_strerror(errno));
        zmq_socket_monitor(socket, NULL, 0);
        if (pair) zmq_close(pair);
        return NULL;
    }
    return pair;
}

void kd_wire_monitor_close(void *socket, void *monitor) {
    /* libzmq (4.3.4) sends monitor events from the context's I/O thread with a blocking send:
     * with the reader closed first, the next event (a connection made as the peer comes back)
     * blocks that thread for good, and no socket of the context reaches anyone again. So the
     * socket stops monitoring before its reader goes. */
    if (socket) zmq_socket_monitor(socket, NULL, 0);
    if (monitor) zmq_close(monitor);
}

long kd_wire_refused(void *monitor, const char *what, long *total) {
    static kd_log_limit_t limit;
    long n = 0;
    if (!monitor) return 0;
    for (;;) {
        /* an event is two frames: u16 event + u32 value, then the peer's address */
        zmq_msg_t head, addr;
        zmq_msg_init(&head);
        if (zmq_msg_recv(&head, monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&head);
            break;
        }
        zmq_msg_init(&addr);
        bool complete = zmq_msg_more(&head) && zmq_msg_recv(&addr, monitor, 0) >= 0;
        uint16_t event = 0;
        if (zmq_msg_size(&head) >= sizeof event) memcpy(&event, zmq_msg_data(&head), sizeof event);
        if (complete && (event & REFUSED_EVENTS)) {
            n++;
            (*total)++;
            if (event != ZMQ_EVENT_HANDSHAKE_FAILED_AUTH && kd_log_allow(&limit, 1.0))
                kd_log(KD_LOG_WARN, "KD-WIRE-REFUSED",
                       "%s refused a connection on %.*s: not ZeroMQ 3, plaintext against "
                       "CurveZMQ (or the reverse), or a broken handshake (%ld refused so far)",
                       what, (int)zmq_msg_size(&addr), (const char *)zmq_msg_data(&addr), *total);
        }
        zmq_msg_close(&head);
        zmq_msg_close(&addr);
    }
    return n;
}
