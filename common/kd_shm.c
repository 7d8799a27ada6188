/* kd_shm: sealed memfd segments shared between the coordinator and same-host workers. */
#include "kd_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_util.h"

#define SHM_MAGIC     "KDSHM-1"
#define SHM_PAGE      4096
#define SHM_MAX_SLOTS ((SHM_PAGE - 64) / 64)
#define SHM_SEALS     (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

typedef struct {
    char magic[8];
    uint64_t token;
    uint64_t n_slots;
    uint64_t n_floats;
} shm_header_t;

typedef struct {
    _Atomic uint64_t seq; /* odd while a write is under way */
    _Atomic uint64_t version;
} shm_slot_t;

static size_t slot_stride(size_t n_floats) {
    return (n_floats * sizeof(float) + SHM_PAGE - 1) / SHM_PAGE * SHM_PAGE;
}

static size_t segment_bytes(uint32_t n_slots, size_t n_floats) {
    return SHM_PAGE + (size_t)n_slots * slot_stride(n_floats);
}

static shm_slot_t *slot_header(const kd_shm_t *s, uint32_t slot) {
    return (shm_slot_t *)(s->base + 64 + (size_t)slot * 64);
}

static float *slot_data(const kd_shm_t *s, uint32_t slot) {
    return (float *)(s->base + SHM_PAGE + (size_t)slot * slot_stride(s->n_floats));
}

static int map(kd_shm_t *s, int fd, size_t bytes, bool writable, char *err, size_t errlen) {
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *base = mmap(NULL, bytes, prot, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        close(fd);
        return kd_err(err, errlen, "cannot map %zu bytes of shared memory: %s", bytes, strerror(e));
    }
    s->fd = fd;
    s->base = base;
    s->bytes = bytes;
    return 0;
}

int kd_shm_create(kd_shm_t *s, const char *name, uint32_t n_slots, size_t n_floats, uint64_t token,
                  char *err, size_t errlen) {
    *s = (kd_shm_t)KD_SHM_INIT;
    if (n_slots < 1 || n_slots > SHM_MAX_SLOTS || n_floats == 0)
        return kd_err(err, errlen, "shared memory %s: %u slots of %zu floats", name, n_slots,
                      n_floats);
    const size_t bytes = segment_bytes(n_slots, n_floats);
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return kd_err(err, errlen, "memfd_create(%s): %s", name, strerror(errno));
    if (ftruncate(fd, (off_t)bytes) != 0 || fcntl(fd, F_ADD_SEALS, SHM_SEALS) != 0) {
        int e = errno;
        close(fd);
        return kd_err(err, errlen, "shared memory %s (%zu bytes): %s", name, bytes, strerror(e));
    }
    if (map(s, fd, bytes, true, err, errlen) != 0) return -1;
    s->n_slots = n_slots;
    s->n_floats = n_floats;
    shm_header_t *h = (shm_header_t *)s->base;
    memcpy(h->magic, SHM_MAGIC, sizeof h->magic);
    h->token = token;
    h->n_slots = n_slots;
    h->n_floats = n_floats;
    return 0;
}

int kd_shm_open_peer(kd_shm_t *s, uint32_t pid, int32_t fd_number, uint32_t n_slots,
                     size_t n_floats, uint64_t token, bool writable, char *err, size_t errlen) {
    *s = (kd_shm_t)KD_SHM_INIT;
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/fd/%d", pid, fd_number);
    if (n_slots < 1 || n_slots > SHM_MAX_SLOTS || n_floats == 0 || fd_number < 0)
        return kd_err(err, errlen, "%s: %u slots of %zu floats", path, n_slots, n_floats);
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return kd_err(err, errlen, "%s: %s", path, strerror(errno));
    const size_t bytes = segment_bytes(n_slots, n_floats);
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != bytes || seals < 0 ||
        (seals & F_SEAL_SHRINK) == 0) {
        close(fd);
        return kd_err(err, errlen, "%s is not a sealed segment of %zu bytes", path, bytes);
    }
    if (map(s, fd, bytes, writable, err, errlen) != 0) return -1;
    s->n_slots = n_slots;
    s->n_floats = n_floats;
    const shm_header_t *h = (const shm_header_t *)s->base;
    if (memcmp(h->magic, SHM_MAGIC, sizeof h->magic) != 0 || h->token != token ||
        h->n_slots != n_slots || h->n_floats != n_floats) {
        kd_shm_close(s);
        return kd_err(err, errlen, "%s is not the segment announced (magic or token differ)", path);
    }
    return 0;
}

void kd_shm_close(kd_shm_t *s) {
    if (s->base) { /* a zeroed kd_shm_t (fd 0, no mapping) owns nothing */
        munmap(s->base, s->bytes);
        close(s->fd);
    }
    *s = (kd_shm_t)KD_SHM_INIT;
}

float *kd_shm_slot(const kd_shm_t *s, uint32_t slot) {
    KD_ASSERT(slot < s->n_slots);
    return slot_data(s, slot);
}

void kd_shm_begin_write(kd_shm_t *s, uint32_t slot) {
    KD_ASSERT(slot < s->n_slots);
    shm_slot_t *h = slot_header(s, slot);
    const uint64_t seq = atomic_load_explicit(&h->seq, memory_order_relaxed);
    atomic_store_explicit(&h->seq, seq | 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

void kd_shm_end_write(kd_shm_t *s, uint32_t slot, uint64_t version) {
    shm_slot_t *h = slot_header(s, slot);
    const uint64_t seq = atomic_load_explicit(&h->seq, memory_order_relaxed);
    atomic_store_explicit(&h->version, version, memory_order_relaxed);
    atomic_store_explicit(&h->seq, (seq | 1) + 1, memory_order_release);
}

void kd_shm_write(kd_shm_t *s, uint32_t slot, uint64_t version, const float *src) {
    kd_shm_begin_write(s, slot);
    memcpy(slot_data(s, slot), src, s->n_floats * sizeof(float));
    kd_shm_end_write(s, slot, version);
}

/* The slot's sequence if it is stable and holds version; 0 (never a stable value) if not. */
static uint64_t stable_seq(const kd_shm_t *s, uint32_t slot, uint64_t version) {
    if (slot >= s->n_slots) return 0;
    shm_slot_t *h = slot_header(s, slot);
    const uint64_t seq = atomic_load_explicit(&h->seq, memory_order_acquire);
    if ((seq & 1) || atomic_load_explicit(&h->version, memory_order_relaxed) != version) return 0;
    return seq;
}

uint64_t kd_shm_stable(const kd_shm_t *s, uint32_t slot, uint64_t version) {
    return stable_seq(s, slot, version);
}

bool kd_shm_unchanged(const kd_shm_t *s, uint32_t slot, uint64_t seq) {
    atomic_thread_fence(memory_order_acquire);
    return slot < s->n_slots &&
           atomic_load_explicit(&slot_header(s, slot)->seq, memory_order_relaxed) == seq;
}

int kd_shm_read(const kd_shm_t *s, uint32_t slot, uint64_t version, float *dst) {
    const uint64_t seq = stable_seq(s, slot, version);
    if (seq == 0) return -1;
    memcpy(dst, slot_data(s, slot), s->n_floats * sizeof(float));
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&slot_header(s, slot)->seq, memory_order_relaxed) == seq ? 0 : -1;
}

float *kd_shm_peek(const kd_shm_t *s, uint32_t slot, uint64_t version) {
    return stable_seq(s, slot, version) ? slot_data(s, slot) : NULL;
}
