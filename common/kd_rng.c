/* kd_rng: splitmix64-based deterministic randomness (see kd_rng.h). */
#include "kd_rng.h"

#include <math.h>

uint64_t kd_rng_mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

uint64_t kd_rng_key(uint64_t seed, uint64_t a, uint64_t b) {
    return kd_rng_mix(kd_rng_mix(kd_rng_mix(seed) ^ a) ^ b);
}

void kd_rng_init(kd_rng_t *rng, uint64_t key) {
    rng->state = key;
}

uint64_t kd_rng_next(kd_rng_t *rng) {
    rng->state += 0x9e3779b97f4a7c15ULL;
    uint64_t z = rng->state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

float kd_rng_uniform(kd_rng_t *rng) {
    /* 24 random bits: every value is exactly representable and < 1. */
    return (float)(kd_rng_next(rng) >> 40) * (1.0f / 16777216.0f);
}

uint32_t kd_rng_below(kd_rng_t *rng, uint32_t n) {
    if (n <= 1) return 0;
    /* Lemire's multiply-shift with rejection: unbiased. */
    uint64_t m = (kd_rng_next(rng) >> 32) * (uint64_t)n;
    uint32_t low = (uint32_t)m;
    if (low < n) {
        uint32_t threshold = (uint32_t)(-n) % n;
        while (low < threshold) {
            m = (kd_rng_next(rng) >> 32) * (uint64_t)n;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

float kd_rng_normal(kd_rng_t *rng) {
    /* Box-Muller; u1 in (0, 1] so the log is finite. */
    double u1 = ((double)(kd_rng_next(rng) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(kd_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

void kd_rng_permutation(uint64_t seed, uint64_t stream, uint32_t *perm, size_t n) {
    for (size_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    kd_rng_t rng;
    kd_rng_init(&rng, kd_rng_key(seed, stream, 0x7065726dULL /* "perm" */));
    for (size_t i = n; i > 1; i--) {
        uint32_t j = kd_rng_below(&rng, (uint32_t)i);
        uint32_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}
