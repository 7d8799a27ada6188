/* kd_rng: deterministic, counter-style randomness. Every random choice in kdist derives from
 * (seed, stream ids), never from which process or thread draws it, so results do not depend
 * on placement (DESIGN §3.2). Stateless helpers are thread-safe; a kd_rng_t is not shared. */
#ifndef KD_RNG_H
#define KD_RNG_H

#include <stddef.h>
#include <stdint.h>

/* splitmix64 finaliser: a bijective 64-bit mix. */
uint64_t kd_rng_mix(uint64_t x);
/* Hash of a seed and two stream ids (epoch, batch id; layer, ...). */
uint64_t kd_rng_key(uint64_t seed, uint64_t a, uint64_t b);

typedef struct {
    uint64_t state;
} kd_rng_t;

void kd_rng_init(kd_rng_t *rng, uint64_t key);
uint64_t kd_rng_next(kd_rng_t *rng);
float kd_rng_uniform(kd_rng_t *rng);              /* [0, 1) */
uint32_t kd_rng_below(kd_rng_t *rng, uint32_t n); /* [0, n), unbiased */
float kd_rng_normal(kd_rng_t *rng);

/* perm[0..n) = a Fisher-Yates permutation of 0..n-1 keyed by (seed, stream). */
void kd_rng_permutation(uint64_t seed, uint64_t stream, uint32_t *perm, size_t n);

#endif
