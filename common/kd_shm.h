/* kd_shm: the same-host fast path for weights and gradients (docs/protocol.md, "Shared memory").
 *
 * Over loopback TCP a 5 MB tensor costs ~1.7 ms each way (user -> kernel -> user copies); a
 * worker on the coordinator's machine instead reads the weights from, and writes its gradient
 * into, memory the coordinator shares with it, and the ZeroMQ messages carry only the headers.
 *
 * A segment is an anonymous memfd created by the coordinator, sealed against shrinking (a peer
 * cannot truncate it under the other's mapping), and opened by the worker through
 * /proc/<coordinator pid>/fd/<fd> — which works only on the same machine, in the same pid
 * namespace, for the same user: anywhere else the open fails and the worker stays on TCP.
 * The segment starts with a magic and a random token from the Welcome, so a worker that opened
 * some other process's file (pid reuse in another namespace) notices.
 *
 * A segment holds n_slots tensors of n_floats, each behind a sequence lock: the writer makes
 * the sequence odd, writes, stamps the version and makes it even again; a reader checks the
 * sequence is even and unchanged and the version is the one announced. */
#ifndef KD_SHM_H
#define KD_SHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int fd;
    uint8_t *base;
    size_t bytes;
    uint32_t n_slots;
    size_t n_floats;
} kd_shm_t;

#define KD_SHM_INIT                                                                                \
    { .fd = -1 }

/* Creates a sealed segment of n_slots tensors of n_floats stamped with token. */
int kd_shm_create(kd_shm_t *s, const char *name, uint32_t n_slots, size_t n_floats, uint64_t token,
                  char *err, size_t errlen);

/* Maps another process's segment by pid and fd; checks size, seals, magic and token. */
int kd_shm_open_peer(kd_shm_t *s, uint32_t pid, int32_t fd, uint32_t n_slots, size_t n_floats,
                     uint64_t token, bool writable, char *err, size_t errlen);

void kd_shm_close(kd_shm_t *s);

/* Writes version's tensor into slot. */
void kd_shm_write(kd_shm_t *s, uint32_t slot, uint64_t version, const float *src);

/* Copies slot into dst if it holds version, whole; -1 if it does not (overwritten or torn). */
int kd_shm_read(const kd_shm_t *s, uint32_t slot, uint64_t version, float *dst);

/* In place, without the copies: a writer brackets its writes to kd_shm_slot() with begin/end
 * (end stamps the version); a reader takes kd_shm_stable's sequence (0: the slot does not hold
 * version, or a write is under way), uses the slot, and trusts what it computed only if
 * kd_shm_unchanged then says the sequence is still the same. */
float *kd_shm_slot(const kd_shm_t *s, uint32_t slot);
void kd_shm_begin_write(kd_shm_t *s, uint32_t slot);
void kd_shm_end_write(kd_shm_t *s, uint32_t slot, uint64_t version);
uint64_t kd_shm_stable(const kd_shm_t *s, uint32_t slot, uint64_t version);
bool kd_shm_unchanged(const kd_shm_t *s, uint32_t slot, uint64_t seq);

/* The slot's tensor in place, if it holds version and no write is under way; NULL otherwise.
 * Only for a slot whose writer is waiting for the reader's answer (a worker's gradient). */
float *kd_shm_peek(const kd_shm_t *s, uint32_t slot, uint64_t version);

#endif
