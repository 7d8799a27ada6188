/* kd_half: IEEE half (fp16) and bfloat16 conversions, rounding to nearest even. One place for
 * the bit patterns the cache's fp16 records and the 16-bit wire (cluster.wire) share. NaN stays
 * NaN and infinity infinity; a float beyond fp16's ±65504 rounds to infinity (callers that want
 * saturation clamp first). bf16 keeps float's range: it is float's upper 16 bits, rounded. */
#ifndef KD_HALF_H
#define KD_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t kd_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN, quiet */
    if (ax >= 0x47800000u) return (uint16_t)(sign | 0x7c00u); /* >= 65536 (or infinite) */
    if (ax < 0x38800000u) /* below 2^-14: a half subnormal; scaling by 2^24 is exact */
        return (uint16_t)(sign | (uint16_t)nearbyintf(fabsf(f) * 16777216.0f));
    uint32_t h = (ax - ((uint32_t)(127 - 15) << 23)) >> 13;
    const uint32_t rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++; /* a carry bumps the exponent */
    return (uint16_t)(sign | h); /* 65520 and above carry into 0x7c00: infinity */
}

static inline float kd_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        const float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    const uint32_t bits =
        e == 31 ? sign | 0x7f800000u | (m << 13) : sign | (e + 112) << 23 | (m << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t kd_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* NaN, quiet */
    x += 0x7fffu + ((x >> 16) & 1u); /* to nearest even; the largest floats round to infinity */
    return (uint16_t)(x >> 16);
}

static inline float kd_bf16_to_f32(uint16_t b) {
    const uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

#endif
