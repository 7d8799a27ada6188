/* Tests of kd_npy: round trip, header layout, a fixture written by numpy, and malformed files.
 * When /usr/bin/python3 has numpy, numpy also reads back what kd_npy wrote (skipped otherwise). */
#include "kd_npy.h"
#include "kd_util.h"

#include "kd_test.h"

#include <stdint.h>

static char tmp[1024];

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

/* Writes a file from a header dict (padded to 64 as numpy does) followed by raw data bytes. */
static void write_raw_npy(const char *path, int major, const char *dict, const void *data,
                          size_t data_len) {
    size_t prefix = major == 1 ? 10 : 12;
    size_t hlen = prefix + strlen(dict) + 1;
    hlen = (hlen + 63) / 64 * 64 - prefix;
    size_t total = prefix + hlen + data_len;
    uint8_t *buf = malloc(total);
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (uint8_t)major;
    buf[7] = 0;
    if (major == 1) {
        buf[8] = (uint8_t)hlen;
        buf[9] = (uint8_t)(hlen >> 8);
    } else {
        for (int i = 0; i < 4; i++) buf[8 + i] = (uint8_t)(hlen >> (8 * i));
    }
    memset(buf + prefix, ' ', hlen);
    memcpy(buf + prefix, dict, strlen(dict));
    buf[prefix + hlen - 1] = '\n';
    if (data_len) memcpy(buf + prefix + hlen, data, data_len);
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, buf, total, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    free(buf);
}

static void test_round_trip(void) {
    const size_t R = 7, C = 13;
    float *a = malloc(R * C * sizeof(float));
    for (size_t i = 0; i < R * C; i++) a[i] = (float)((double)i * 0.1 - 3.0) * (i % 2 ? -1 : 1);
    a[5] = 1e-40f; /* subnormal */
    a[6] = -0.0f;
    char p[1200]; /* tmp_path's buffer is reused below */
    snprintf(p, sizeof p, "%s", tmp_path("rt.npy"));
    char err[KD_ERR_LEN] = "";
    CHECK(kd_npy_write_f32(p, a, R, C, err, sizeof err) == 0);
    float *b = NULL;
    size_t r = 0, c = 0;
    CHECK(kd_npy_read_f32(p, &b, &r, &c, err, sizeof err) == 0);
    CHECK(r == R && c == C);
    CHECK(b && memcmp(a, b, R * C * sizeof(float)) == 0);
    free(b);

    /* Header: magic, version 1.0, total header a multiple of 64 ending with '\n', exact dict. */
    uint8_t *raw = NULL;
    size_t len = 0;
    CHECK(kd_read_file(p, &raw, &len, err, sizeof err) == 0);
    CHECK(len > 10 && memcmp(raw, "\x93NUMPY\x01\x00", 8) == 0);
    size_t hlen = (size_t)raw[8] | (size_t)raw[9] << 8;
    CHECK((10 + hlen) % 64 == 0);
    CHECK(raw[10 + hlen - 1] == '\n');
    CHECK(len == 10 + hlen + R * C * 4);
    const char *dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (7, 13), }";
    CHECK(memcmp(raw + 10, dict, strlen(dict)) == 0);
    for (size_t i = 10 + strlen(dict); i < 10 + hlen - 1; i++) CHECK(raw[i] == ' ');
    /* Little-endian data: 1.0f would be 00 00 80 3f; check element 0 (= -3.0f: 00 00 40 c0). */
    CHECK(raw[10 + hlen] == 0x00 && raw[10 + hlen + 2] == 0x40 && raw[10 + hlen + 3] == 0xc0);
    free(raw);

    /* No temporary file left beside it. */
    char tmpname[1300];
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%ld", p, (long)getpid());
    CHECK(!kd_file_exists(tmpname));

    /* Empty and single-row arrays. */
    const char *pe = tmp_path("empty.npy");
    CHECK(kd_npy_write_f32(pe, NULL, 0, 4, err, sizeof err) == 0);
    CHECK(kd_npy_read_f32(pe, &b, &r, &c, err, sizeof err) == 0);
    CHECK(r == 0 && c == 4);
    free(b);
    const char *p1 = tmp_path("one.npy");
    float one = 42.5f;
    CHECK(kd_npy_write_f32(p1, &one, 1, 1, err, sizeof err) == 0);
    CHECK(kd_npy_read_f32(p1, &b, &r, &c, err, sizeof err) == 0);
    CHECK(r == 1 && c == 1 && b && b[0] == 42.5f);
    free(b);

    /* numpy must read it too (optional: CI may lack PyTorch's python). */
    if (access("/usr/bin/python3", X_OK) == 0 &&
        system("/usr/bin/python3 -c 'import numpy' >/dev/null 2>&1") == 0) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd,
                 "/usr/bin/python3 -c \"import numpy as np, sys; a = np.load('%s'); "
                 "i = np.arange(91, dtype=np.float64); "
                 "e = ((i * 0.1 - 3.0).astype(np.float32) * np.where(i %% 2 == 1, -1, 1)).astype("
                 "np.float32); e[5] = np.float32(1e-40); e[6] = np.float32(-0.0); "
                 "sys.exit(0 if a.dtype == np.float32 and a.shape == (7, 13) and "
                 "np.array_equal(a.ravel(), e) and np.signbit(a.ravel()[6]) else 1)\"",
                 p);
        int prc = system(cmd);
        CHECK(prc == 0);
        if (prc != 0) fprintf(stderr, "failed: %s\n", cmd);
    } else {
        fprintf(stderr, "test_npy: /usr/bin/python3 with numpy not found, numpy check skipped\n");
    }
    free(a);
}

/* tests/data/small.npy was written by numpy 1.24:
 *   /usr/bin/python3 -c "import numpy as np; np.save('small.npy', ((np.arange(15,
 *       dtype=np.float64) - 7) / 3.0).astype(np.float32).reshape(3, 5))" */
static void test_numpy_fixture(void) {
    float *b = NULL;
    size_t r = 0, c = 0;
    char err[KD_ERR_LEN] = "";
    int rc = kd_npy_read_f32("data/small.npy", &b, &r, &c, err, sizeof err);
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(r == 3 && c == 5);
    for (int k = 0; k < 15; k++) CHECK(b[k] == (float)((k - 7) / 3.0));
    free(b);
}

static void test_version2(void) {
    float v[6] = {1, 2, 3, 4, 5, 6.5f};
    const char *p = tmp_path("v2.npy");
    /* Also exercises double quotes, no trailing comma, and keys in another order. */
    write_raw_npy(p, 2, "{\"shape\": (2,3), \"fortran_order\": False, \"descr\": \"<f4\"}", v,
                  sizeof v);
    float *b = NULL;
    size_t r = 0, c = 0;
    char err[KD_ERR_LEN] = "";
    CHECK(kd_npy_read_f32(p, &b, &r, &c, err, sizeof err) == 0);
    CHECK(r == 2 && c == 3 && b && memcmp(b, v, sizeof v) == 0);
    free(b);
}

static void expect_fail(const char *name, const char *needle) {
    const char *p = tmp_path(name);
    float *b = (float *)1;
    size_t r = 9, c = 9;
    char err[KD_ERR_LEN] = "";
    CHECK(kd_npy_read_f32(p, &b, &r, &c, err, sizeof err) == -1);
    CHECK(b == NULL && r == 0 && c == 0);
    CHECK_ERR_HAS(err, p);
    CHECK_ERR_HAS(err, needle);
}

static void test_malformed(void) {
    float v[6] = {0};
    char err[KD_ERR_LEN];
    const char *good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

    write_raw_npy(tmp_path("ok.npy"), 1, good, v, sizeof v);
    float *b = NULL;
    size_t r, c;
    CHECK(kd_npy_read_f32(tmp_path("ok.npy"), &b, &r, &c, err, sizeof err) == 0);
    free(b);

    uint8_t *raw;
    size_t len;
    CHECK(kd_read_file(tmp_path("ok.npy"), &raw, &len, err, sizeof err) == 0);
    raw[1] = 'X';
    CHECK(kd_write_file_atomic(tmp_path("magic.npy"), raw, len, err, sizeof err) == 0);
    expect_fail("magic.npy", "magic");
    raw[1] = 'N';
    raw[6] = 3;
    CHECK(kd_write_file_atomic(tmp_path("version.npy"), raw, len, err, sizeof err) == 0);
    expect_fail("version.npy", "version 3.0");
    raw[6] = 1;
    /* Truncated data, truncated header, and trailing bytes. */
    CHECK(kd_write_file_atomic(tmp_path("trunc.npy"), raw, len - 5, err, sizeof err) == 0);
    expect_fail("trunc.npy", "truncated");
    CHECK(kd_write_file_atomic(tmp_path("trunch.npy"), raw, 40, err, sizeof err) == 0);
    expect_fail("trunch.npy", "truncated .npy header");
    CHECK(kd_write_file_atomic(tmp_path("short.npy"), raw, 7, err, sizeof err) == 0);
    expect_fail("short.npy", "too short");
    free(raw);
    {
        uint8_t big[sizeof v + 4] = {0};
        write_raw_npy(tmp_path("trail.npy"), 1, good, big, sizeof big);
    }
    expect_fail("trail.npy", "trailing bytes");

    write_raw_npy(tmp_path("f8.npy"), 1,
                  "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", v, sizeof v);
    expect_fail("f8.npy", "'<f8'");
    write_raw_npy(tmp_path("be.npy"), 1,
                  "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", v, sizeof v);
    expect_fail("be.npy", "'>f4'");
    write_raw_npy(tmp_path("fortran.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", v, sizeof v);
    expect_fail("fortran.npy", "fortran_order");
    write_raw_npy(tmp_path("3d.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", v, sizeof v);
    expect_fail("3d.npy", "3 dimensions, expected 2");
    write_raw_npy(tmp_path("1d.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", v, sizeof v);
    expect_fail("1d.npy", "1 dimension, expected 2");
    write_raw_npy(tmp_path("noshape.npy"), 1, "{'descr': '<f4', 'fortran_order': False, }", v,
                  sizeof v);
    expect_fail("noshape.npy", "malformed .npy header");
    write_raw_npy(tmp_path("garbage.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } x", v, sizeof v);
    expect_fail("garbage.npy", "malformed .npy header");
    write_raw_npy(tmp_path("unterminated.npy"), 1, "{'descr': '<f4", v, sizeof v);
    expect_fail("unterminated.npy", "malformed .npy header");
    write_raw_npy(tmp_path("negshape.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", v, sizeof v);
    expect_fail("negshape.npy", "malformed .npy header");
    write_raw_npy(tmp_path("huge.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
                  v, sizeof v);
    expect_fail("huge.npy", "too large");
    write_raw_npy(tmp_path("lie.npy"), 1,
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000), }", v,
                  sizeof v);
    expect_fail("lie.npy", "truncated");
    expect_fail("missing.npy", "cannot open");

    /* Writing into a directory that does not exist names the file. */
    char bad[1200];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.npy", tmp);
    err[0] = 0;
    CHECK(kd_npy_write_f32(bad, v, 2, 3, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, bad);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_npy"));
    test_round_trip();
    test_numpy_fixture();
    test_version2();
    test_malformed();
    return kd_test_done("test_npy");
}
