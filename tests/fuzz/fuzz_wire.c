/* fuzz_wire: libFuzzer target for kd_wire_decode, the first code to see a peer's bytes.
 * Input: byte 0 = number of payload frames (mod 9), then one 4-byte little-endian length per
 * frame, then the Envelope header. Rejections must be clean; acceptances must keep the promises
 * of kd_wire.h, checked independently here, and re-pack cleanly. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kd_wire.h"

#define CHECK_OR_TRAP(cond)                                                                        \
    do {                                                                                           \
        if (!(cond)) __builtin_trap();                                                             \
    } while (0)

/* Wire dtype sizes, restated rather than taken from kd_wire.c so a decoder bug cannot hide. */
static uint64_t wire_dtype_size(int dtype) {
    switch (dtype) {
    case KDIST__DTYPE__F32:
    case KDIST__DTYPE__I32:
        return 4;
    case KDIST__DTYPE__F16:
    case KDIST__DTYPE__BF16:
        return 2;
    case KDIST__DTYPE__U8:
    case KDIST__DTYPE__I8:
        return 1;
    default:
        return 0;
    }
}

static void check_accepted(const kd_env_t *env, const size_t *lens, int n) {
    CHECK_OR_TRAP(env != NULL);
    CHECK_OR_TRAP(env->protocol_version == KD_PROTOCOL_VERSION);
    CHECK_OR_TRAP(env->body_case != KDIST__ENVELOPE__BODY__NOT_SET);
    CHECK_OR_TRAP(env->n_tensors == (size_t)n && n <= KD_WIRE_MAX_TENSORS);
    for (int i = 0; i < n; i++) {
        const Kdist__TensorDesc *t = env->tensors[i];
        CHECK_OR_TRAP(t != NULL && t->name != NULL);
        uint64_t bytes = wire_dtype_size(t->dtype);
        CHECK_OR_TRAP(bytes != 0);
        CHECK_OR_TRAP(t->n_shape >= 1 && t->n_shape <= KD_WIRE_MAX_DIMS);
        for (size_t d = 0; d < t->n_shape; d++) {
            CHECK_OR_TRAP(t->shape[d] >= 0);
            /* the frame length bounds every partial product, so overflow means a bug */
            CHECK_OR_TRAP(!__builtin_mul_overflow(bytes, (uint64_t)t->shape[d], &bytes));
        }
        CHECK_OR_TRAP(bytes == t->nbytes && t->nbytes == lens[i]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int n = data[0] % (KD_WIRE_MAX_TENSORS + 1);
    size_t off = 1;
    size_t lens[KD_WIRE_MAX_TENSORS] = {0};
    for (int i = 0; i < n; i++) {
        if (size - off < 4) return 0;
        lens[i] = (size_t)data[off] | (size_t)data[off + 1] << 8 | (size_t)data[off + 2] << 16 |
                  (size_t)data[off + 3] << 24;
        off += 4;
    }
    /* An exact-size heap copy so ASan sees any read past the header's end. */
    size_t hlen = size - off;
    uint8_t *header = malloc(hlen ? hlen : 1);
    if (!header) return 0;
    memcpy(header, data + off, hlen);

    char err[512];
    err[0] = 0;
    kd_env_t *env = NULL;
    if (kd_wire_decode(header, hlen, lens, n, &env, err, sizeof err) != 0) {
        CHECK_OR_TRAP(env == NULL);
        CHECK_OR_TRAP(err[0] != 0 && memchr(err, 0, sizeof err) != NULL);
        free(header);
        return 0;
    }
    check_accepted(env, lens, n);

    /* Re-encoding what we accepted must not touch freed or uninitialised memory. (Re-decoding
     * it is not checked: protobuf-c merges duplicated sub-messages on unpack and can then emit
     * bytes it rejects itself; kdist never re-sends a received envelope.) */
    size_t plen = kdist__envelope__get_packed_size(env);
    uint8_t *packed = malloc(plen ? plen : 1);
    if (packed) {
        CHECK_OR_TRAP(kdist__envelope__pack(env, packed) == plen);
        free(packed);
    }
    kd_env_free(env);
    free(header);
    return 0;
}
