/* test_shm: the shared-memory segments of the same-host fast path — opened through /proc by
 * pid and fd like a worker does, versions read back whole, overwritten or half-written slots
 * refused, and segments that are not the announced one (token, size, seals) rejected. */
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kd_shm.h"
#include "kd_test.h"

#define N     1000
#define SLOTS 3
#define TOKEN 0x5eed5eed12345678ull

static void fill(float *x, float base) {
    for (int i = 0; i < N; i++) x[i] = base + (float)i;
}

static void test_write_read_through_proc(void) {
    char err[256];
    kd_shm_t owner, peer;
    CHECK(kd_shm_create(&owner, "test-weights", SLOTS, N, TOKEN, err, sizeof err) == 0);
    CHECK(kd_shm_open_peer(&peer, (uint32_t)getpid(), owner.fd, SLOTS, N, TOKEN, false, err,
                           sizeof err) == 0);
    float src[N], dst[N];
    fill(src, 1.0f);
    /* never written: nothing to read */
    CHECK(kd_shm_read(&peer, 0, 0, dst) == -1);
    kd_shm_write(&owner, 1, 7, src);
    CHECK(kd_shm_read(&peer, 1, 7, dst) == 0);
    CHECK(memcmp(src, dst, sizeof src) == 0);
    /* the wrong version, the wrong slot, a slot out of range */
    CHECK(kd_shm_read(&peer, 1, 8, dst) == -1);
    CHECK(kd_shm_read(&peer, 0, 7, dst) == -1);
    CHECK(kd_shm_read(&peer, SLOTS, 7, dst) == -1);
    /* overwritten by a later version: the old one is gone, the new one reads whole */
    fill(src, 100.0f);
    kd_shm_write(&owner, 1, 9, src);
    CHECK(kd_shm_read(&peer, 1, 7, dst) == -1);
    CHECK(kd_shm_read(&peer, 1, 9, dst) == 0);
    CHECK(dst[N - 1] == 100.0f + N - 1);
    /* in place, as the coordinator reads a worker's gradient */
    const float *in_place = kd_shm_peek(&peer, 1, 9);
    CHECK(in_place && in_place[5] == 105.0f);
    CHECK(kd_shm_peek(&peer, 1, 10) == NULL);
    kd_shm_close(&peer);
    kd_shm_close(&owner);
    CHECK(owner.base == NULL && owner.fd == -1);
}

/* A reader that meets a write under way (odd sequence) refuses the slot. */
static void test_half_written_slot_refused(void) {
    char err[256];
    kd_shm_t owner;
    CHECK(kd_shm_create(&owner, "test-torn", 1, N, TOKEN, err, sizeof err) == 0);
    float src[N], dst[N];
    fill(src, 0.0f);
    kd_shm_write(&owner, 0, 3, src);
    CHECK(kd_shm_read(&owner, 0, 3, dst) == 0);
    /* the slot header: 64 bytes into the first page; its sequence comes first */
    _Atomic uint64_t *seq = (_Atomic uint64_t *)(owner.base + 64);
    atomic_fetch_add(seq, 1);
    CHECK(kd_shm_read(&owner, 0, 3, dst) == -1);
    CHECK(kd_shm_peek(&owner, 0, 3) == NULL);
    atomic_fetch_add(seq, 1);
    CHECK(kd_shm_read(&owner, 0, 3, dst) == 0);
    kd_shm_close(&owner);
}

static void test_wrong_segments_rejected(void) {
    char err[256];
    kd_shm_t owner, peer;
    CHECK(kd_shm_create(&owner, "test-check", SLOTS, N, TOKEN, err, sizeof err) == 0);
    const uint32_t pid = (uint32_t)getpid();
    CHECK(kd_shm_open_peer(&peer, pid, owner.fd, SLOTS, N, TOKEN + 1, false, err, sizeof err) ==
          -1);
    CHECK(strstr(err, "token") != NULL);
    CHECK(kd_shm_open_peer(&peer, pid, owner.fd, SLOTS, 4 * N, TOKEN, false, err, sizeof err) ==
          -1);
    CHECK(strstr(err, "bytes") != NULL);
    CHECK(kd_shm_open_peer(&peer, pid, 9999, SLOTS, N, TOKEN, false, err, sizeof err) == -1);
    CHECK(strstr(err, "/proc/") != NULL);
    CHECK(kd_shm_open_peer(&peer, pid, -1, SLOTS, N, TOKEN, false, err, sizeof err) == -1);
    CHECK(kd_shm_create(&peer, "test-bad", 0, N, TOKEN, err, sizeof err) == -1);
    CHECK(kd_shm_create(&peer, "test-bad", 1000, N, TOKEN, err, sizeof err) == -1);
    /* the segment is sealed: nobody can shrink it under a mapping (no SIGBUS for the other) */
    CHECK(ftruncate(owner.fd, 4096) == -1);
    /* an unsealed file of the right size is refused */
    int plain = memfd_create("test-plain", MFD_CLOEXEC);
    CHECK(plain >= 0 && ftruncate(plain, (off_t)owner.bytes) == 0);
    CHECK(kd_shm_open_peer(&peer, pid, plain, SLOTS, N, TOKEN, false, err, sizeof err) == -1);
    CHECK(strstr(err, "sealed") != NULL);
    close(plain);
    /* a handle without a mapping (as in a zeroed struct) owns nothing: its fd stays open */
    kd_shm_t unmapped;
    memset(&unmapped, 0, sizeof unmapped);
    const int keep = dup(STDERR_FILENO);
    unmapped.fd = keep;
    kd_shm_close(&unmapped);
    CHECK(unmapped.fd == -1 && fcntl(keep, F_GETFD) != -1);
    close(keep);
    kd_shm_close(&owner);
}

int main(void) {
    test_write_read_through_proc();
    test_half_written_slot_refused();
    test_wrong_segments_rejected();
    return kd_test_done("test_shm");
}
