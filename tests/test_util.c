/* Tests of the small shared utilities: kd_util (files, parsing, allocation, errors), kd_rng
 * (reference values, permutations, range and uniformity of the samplers) and kd_half (fp16 and
 * bf16 rounding against a nearest-value search, NaN and infinity, the wire's float packing and
 * its error-feedback top-k). */
#include "kd_half.h"
#include "kd_rng.h"
#include "kd_util.h"
#include "kd_wire.h"

#include "kd_test.h"

#include <dirent.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <sys/stat.h>

static char tmp[1024];

/* Number of entries in dir whose name contains needle. */
static int count_entries(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, needle)) n++;
    closedir(d);
    return n;
}

static void test_files(void) {
    char p[1200], err[KD_ERR_LEN] = "";
    snprintf(p, sizeof p, "%s/atomic.bin", tmp);
    uint8_t data[3000];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 31 + 7);
    CHECK(kd_write_file_atomic(p, data, sizeof data, err, sizeof err) == 0);
    CHECK(kd_file_exists(p));
    uint8_t *back = NULL;
    size_t len = 0;
    CHECK(kd_read_file(p, &back, &len, err, sizeof err) == 0);
    CHECK(len == sizeof data && back && memcmp(back, data, len) == 0);
    CHECK(back && back[len] == 0); /* NUL one past the end */
    free(back);
    /* Overwrite with shorter content: the old bytes are gone, not just overwritten in place. */
    CHECK(kd_write_file_atomic(p, "hello", 5, err, sizeof err) == 0);
    CHECK(kd_read_file(p, &back, &len, err, sizeof err) == 0);
    CHECK(len == 5 && back && memcmp(back, "hello", 6) == 0);
    free(back);
    /* Empty file. */
    snprintf(p, sizeof p, "%s/empty.bin", tmp);
    CHECK(kd_write_file_atomic(p, "", 0, err, sizeof err) == 0);
    CHECK(kd_read_file(p, &back, &len, err, sizeof err) == 0);
    CHECK(len == 0 && back && back[0] == 0);
    free(back);
    /* No temporary file left behind. */
    CHECK(count_entries(tmp, ".tmp") == 0);
    CHECK(count_entries(tmp, "atomic.bin") == 1);

    /* Unwritable destinations: a missing directory, and a regular file used as a directory
     * (root may write anywhere, so permission bits cannot be relied on here). */
    snprintf(p, sizeof p, "%s/no/such/dir/out.bin", tmp);
    err[0] = 0;
    CHECK(kd_write_file_atomic(p, data, 10, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, p);
    snprintf(p, sizeof p, "%s/atomic.bin/out.bin", tmp);
    err[0] = 0;
    CHECK(kd_write_file_atomic(p, data, 10, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, p);
    CHECK_ERR_HAS(err, "Not a directory");

    /* kd_read_file errors name the path; *data is reset. */
    snprintf(p, sizeof p, "%s/missing.bin", tmp);
    back = (uint8_t *)p;
    err[0] = 0;
    CHECK(kd_read_file(p, &back, &len, err, sizeof err) == -1);
    CHECK(back == NULL && len == 0);
    CHECK_ERR_HAS(err, p);
    CHECK_ERR_HAS(err, "cannot open");
    err[0] = 0;
    CHECK(kd_read_file(tmp, &back, &len, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, tmp);
    CHECK_ERR_HAS(err, "not a regular file");
    CHECK(!kd_file_exists(p));
}

static void test_mkdirs(void) {
    char p[1200], err[KD_ERR_LEN] = "";
    struct stat st;
    snprintf(p, sizeof p, "%s/a/b/c", tmp);
    CHECK(kd_mkdirs(p, err, sizeof err) == 0);
    CHECK(stat(p, &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(kd_mkdirs(p, err, sizeof err) == 0); /* already there */
    snprintf(p, sizeof p, "%s/a/d/e/", tmp);   /* trailing slash */
    CHECK(kd_mkdirs(p, err, sizeof err) == 0);
    CHECK(stat(p, &st) == 0 && S_ISDIR(st.st_mode));
    /* A regular file in the way of an intermediate component. */
    snprintf(p, sizeof p, "%s/a/file", tmp);
    CHECK(kd_write_file_atomic(p, "x", 1, err, sizeof err) == 0);
    snprintf(p, sizeof p, "%s/a/file/sub/dir", tmp);
    err[0] = 0;
    CHECK(kd_mkdirs(p, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "/a/file");
    CHECK_ERR_HAS(err, "is not a directory");
    /* The path itself is an existing regular file. */
    snprintf(p, sizeof p, "%s/a/file", tmp);
    err[0] = 0;
    CHECK(kd_mkdirs(p, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "exists and is not a directory");
    /* Too long. */
    char longp[KD_PATH_MAX + 100];
    memset(longp, 'x', sizeof longp - 1);
    longp[0] = '/';
    longp[sizeof longp - 1] = 0;
    char big_err[2 * KD_PATH_MAX]; /* the message quotes the whole path first */
    CHECK(kd_mkdirs(longp, big_err, sizeof big_err) == -1);
    CHECK_ERR_HAS(big_err, "path too long");
}

static void test_parse(void) {
    long l = 123;
    CHECK(kd_parse_long("42", &l) == 0 && l == 42);
    CHECK(kd_parse_long("-7", &l) == 0 && l == -7);
    CHECK(kd_parse_long("+3", &l) == 0 && l == 3);
    CHECK(kd_parse_long("0", &l) == 0 && l == 0);
    l = 99;
    CHECK(kd_parse_long("", &l) == -1);
    CHECK(kd_parse_long(NULL, &l) == -1);
    CHECK(kd_parse_long("12abc", &l) == -1);
    CHECK(kd_parse_long("12 ", &l) == -1);
    CHECK(kd_parse_long(" 12", &l) == -1);
    CHECK(kd_parse_long("1.5", &l) == -1);
    CHECK(kd_parse_long("0x10", &l) == -1);
    CHECK(kd_parse_long("abc", &l) == -1);
    CHECK(kd_parse_long("-", &l) == -1);
    CHECK(kd_parse_long("99999999999999999999999", &l) == -1);
    CHECK(l == 99); /* untouched on failure */

    double d = 0.25;
    CHECK(kd_parse_double("1.5", &d) == 0 && d == 1.5);
    CHECK(kd_parse_double("-2e-3", &d) == 0 && d == -2e-3);
    CHECK(kd_parse_double("7", &d) == 0 && d == 7.0);
    CHECK(kd_parse_double(".5", &d) == 0 && d == 0.5);
    d = 0.25;
    CHECK(kd_parse_double("", &d) == -1);
    CHECK(kd_parse_double(NULL, &d) == -1);
    CHECK(kd_parse_double("1.5x", &d) == -1);
    CHECK(kd_parse_double("1.5 ", &d) == -1);
    CHECK(kd_parse_double("x", &d) == -1);
    CHECK(kd_parse_double("nan", &d) == -1);
    CHECK(kd_parse_double("1e999", &d) == -1); /* overflow */
    CHECK(kd_parse_double("inf", &d) == -1);
    CHECK(kd_parse_double(" 1", &d) == -1);
    CHECK(d == 0.25);
    CHECK(kd_parse_double("1e-310", &d) == 0 && d > 0 && d < 1e-300); /* subnormal */
}

static void test_misc(void) {
    char small[8];
    CHECK(kd_err(small, sizeof small, "%s:%d", "abcdefgh", 12) == -1);
    CHECK(strcmp(small, "abcdefg") == 0); /* truncated, terminated */
    CHECK(kd_err(NULL, 0, "x") == -1);
    char *s = kd_xstrdup("kdist");
    CHECK(strcmp(s, "kdist") == 0);
    free(s);
    float *f = kd_alloc_floats(1000);
    CHECK(((uintptr_t)f % 64) == 0);
    int zero = 1;
    for (int i = 0; i < 1000; i++)
        if (f[i] != 0.0f) zero = 0;
    CHECK(zero);
    free(f);
    double t0 = kd_now(), t1 = kd_now();
    CHECK(t1 >= t0);
    CHECK(kd_wall_time() > 1.5e9); /* after 2017 */
}

static void test_rng_reference(void) {
    /* Published splitmix64 outputs for state 0 (Vigna's splitmix64.c). */
    kd_rng_t r;
    kd_rng_init(&r, 0);
    CHECK(kd_rng_next(&r) == 0xe220a8397b1dcdafULL);
    CHECK(kd_rng_next(&r) == 0x6e789e6aa1b965f4ULL);
    CHECK(kd_rng_next(&r) == 0x06c45d188009454fULL);
    CHECK(kd_rng_mix(0) == 0xe220a8397b1dcdafULL);
    /* Keys separate streams. */
    CHECK(kd_rng_key(1, 2, 3) == kd_rng_key(1, 2, 3));
    CHECK(kd_rng_key(1, 2, 3) != kd_rng_key(1, 3, 2));
    CHECK(kd_rng_key(1, 2, 3) != kd_rng_key(2, 2, 3));
}

static void test_permutation(void) {
    size_t sizes[] = {0, 1, 2, 3, 17, 1000};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        uint32_t *p = malloc((n ? n : 1) * sizeof(uint32_t));
        uint32_t *q = malloc((n ? n : 1) * sizeof(uint32_t));
        uint8_t *seen = calloc(n ? n : 1, 1);
        kd_rng_permutation(5, 9, p, n);
        int ok = 1;
        for (size_t i = 0; i < n; i++) {
            if (p[i] >= n || seen[p[i]])
                ok = 0;
            else
                seen[p[i]] = 1;
        }
        CHECK(ok);
        kd_rng_permutation(5, 9, q, n);
        CHECK(n == 0 || memcmp(p, q, n * sizeof(uint32_t)) == 0);
        if (n >= 17) {
            kd_rng_permutation(5, 10, q, n);
            CHECK(memcmp(p, q, n * sizeof(uint32_t)) != 0);
            kd_rng_permutation(6, 9, q, n);
            CHECK(memcmp(p, q, n * sizeof(uint32_t)) != 0);
        }
        free(p);
        free(q);
        free(seen);
    }
    /* Fisher-Yates must make every permutation of 3 equally likely: chi-square, 5 dof. The
     * bound 40 is far beyond p = 1e-6 (about 35.9), yet a biased shuffle (e.g. j drawn from
     * [0, n) each step) gives thousands. */
    enum { TRIALS = 60000 };
    int counts[6] = {0};
    for (uint64_t t = 0; t < TRIALS; t++) {
        uint32_t p[3];
        kd_rng_permutation(77, t, p, 3);
        int code = (int)(p[0] * 3 + p[1]); /* (p0,p1) identifies the permutation */
        static const int index_of[9] = {-1, 0, 1, 2, -1, 3, 4, 5, -1};
        if (code < 9 && index_of[code] >= 0) counts[index_of[code]]++;
    }
    double chi = 0, e = TRIALS / 6.0;
    for (int i = 0; i < 6; i++) chi += (counts[i] - e) * (counts[i] - e) / e;
    CHECK(chi < 40.0);
}

static void test_samplers(void) {
    kd_rng_t r;
    kd_rng_init(&r, kd_rng_key(2024, 1, 2));
    /* Range, including the edges. */
    uint32_t ns[] = {1, 2, 3, 7, 1000, 0x80000001u, 0xFFFFFFFFu};
    int in_range = 1;
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++)
        for (int i = 0; i < 10000; i++)
            if (kd_rng_below(&r, ns[k]) >= ns[k]) in_range = 0;
    CHECK(in_range);
    CHECK(kd_rng_below(&r, 0) == 0);

    /* Chi-square over 10 bins, 9 dof: p = 1e-6 is about 45; 60 is generous. */
    enum { DRAWS = 200000 };
    int bins[10] = {0};
    for (int i = 0; i < DRAWS; i++) bins[kd_rng_below(&r, 10)]++;
    double chi = 0, e = DRAWS / 10.0;
    for (int i = 0; i < 10; i++) chi += (bins[i] - e) * (bins[i] - e) / e;
    CHECK(chi < 60.0);
    /* A large non-power-of-two n where modulo reduction would be visibly biased: with
     * n = 3 * 2^30, values below 2^31 must be 2/3 of the draws (x % n on 32 bits gives 3/4). */
    int low = 0;
    for (int i = 0; i < DRAWS; i++) low += kd_rng_below(&r, 3u << 30) < (1u << 31);
    CHECK(fabs((double)low / DRAWS - 2.0 / 3.0) < 0.01);

    /* Uniform floats in [0, 1) with mean 1/2 and variance 1/12. */
    double sum = 0, sum2 = 0, mn = 1, mx = 0;
    for (int i = 0; i < DRAWS; i++) {
        double u = kd_rng_uniform(&r);
        sum += u;
        sum2 += u * u;
        if (u < mn) mn = u;
        if (u > mx) mx = u;
    }
    CHECK(mn >= 0.0 && mx < 1.0);
    CHECK(mn < 0.001 && mx > 0.999);
    double mean = sum / DRAWS, var = sum2 / DRAWS - mean * mean;
    CHECK(fabs(mean - 0.5) < 0.005);
    CHECK(fabs(var - 1.0 / 12.0) < 0.002);
    /* The largest value it can return is still below 1. */
    kd_rng_t hi = {0};
    int below_one = 1;
    for (int i = 0; i < 1000; i++)
        if (kd_rng_uniform(&hi) >= 1.0f) below_one = 0;
    CHECK(below_one);

    /* Normals: mean 0, variance 1, finite. */
    sum = sum2 = 0;
    int finite = 1;
    for (int i = 0; i < DRAWS; i++) {
        double z = kd_rng_normal(&r);
        if (!isfinite(z)) finite = 0;
        sum += z;
        sum2 += z * z;
    }
    CHECK(finite);
    mean = sum / DRAWS;
    CHECK(fabs(mean) < 0.015);
    CHECK(fabs(sum2 / DRAWS - mean * mean - 1.0) < 0.02);

    /* Same key, same stream. */
    kd_rng_t a, b;
    kd_rng_init(&a, 123);
    kd_rng_init(&b, 123);
    int same = 1;
    for (int i = 0; i < 100; i++)
        if (kd_rng_next(&a) != kd_rng_next(&b)) same = 0;
    CHECK(same);
}

/* Naive references: the nearest representable value by search, ties to the even pattern. */
static double half_value(uint16_t h) { /* finite, non-negative patterns only */
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    return e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
}

static uint16_t naive_f16(float f) {
    const double x = fabs((double)f);
    const uint16_t sign = signbit(f) ? 0x8000 : 0;
    if (x >= 65520.0) return sign | 0x7c00; /* past the midpoint of 65504 and 2^16 */
    uint16_t lo = 0, hi = 0x7bff;           /* largest pattern with value <= x, by bisection */
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if (half_value(mid) <= x)
            lo = mid;
        else
            hi = (uint16_t)(mid - 1);
    }
    if (lo == 0x7bff) return sign | lo;
    const double below = x - half_value(lo), above = half_value((uint16_t)(lo + 1)) - x;
    if (above < below || (above == below && (lo & 1))) lo++;
    return sign | lo;
}

static uint16_t naive_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t down = bits & 0xffff0000u;
    float lo_f, hi_f;
    memcpy(&lo_f, &down, sizeof lo_f);
    const uint32_t up = down + 0x10000u;
    memcpy(&hi_f, &up, sizeof hi_f);
    const double x = fabs((double)f), lo = fabs((double)lo_f);
    const double hi = isinf(hi_f) ? ldexp(1.0, 128) : fabs((double)hi_f); /* what infinity rounds */
    if (hi - x < x - lo || (hi - x == x - lo && ((down >> 16) & 1))) return (uint16_t)(up >> 16);
    return (uint16_t)(down >> 16);
}

static void test_half(void) {
    /* every half pattern decodes to what it means and encodes back to itself */
    int roundtrip_bad = 0, bf16_roundtrip_bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        const float f = kd_f16_to_f32((uint16_t)h);
        const bool nan = ((h >> 10) & 0x1f) == 31 && (h & 0x3ff);
        if (nan) {
            roundtrip_bad += !isnan(f) || !isnan(kd_f16_to_f32(kd_f32_to_f16(f)));
        } else {
            double want = ((h >> 10) & 0x1f) == 31 ? INFINITY : half_value(h & 0x7fff);
            if (h & 0x8000) want = -want;
            roundtrip_bad += (double)f != want || kd_f32_to_f16(f) != h;
        }
        const float b = kd_bf16_to_f32((uint16_t)h);
        bf16_roundtrip_bad +=
            isnan(b) ? !isnan(kd_bf16_to_f32(kd_f32_to_bf16(b))) : kd_f32_to_bf16(b) != h;
    }
    CHECK(roundtrip_bad == 0);
    CHECK(bf16_roundtrip_bad == 0);

    /* random floats of every magnitude, and the midpoints between neighbours (the ties) */
    kd_rng_t rng;
    kd_rng_init(&rng, 11);
    int f16_bad = 0, bf16_bad = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = (uint32_t)kd_rng_next(&rng);
        if (i % 4 == 1)
            bits = (bits & 0x807fe000u) | 0x00001000u | ((uint32_t)(103 + i % 40) << 23);
        if (i % 4 == 2) bits = (bits & 0xffff0000u) | 0x8000u; /* a bf16 tie */
        float f;
        memcpy(&f, &bits, sizeof f);
        if (!isfinite(f)) continue;
        f16_bad += kd_f32_to_f16(f) != naive_f16(f);
        bf16_bad += kd_f32_to_bf16(f) != naive_bf16(f);
    }
    CHECK(f16_bad == 0);
    CHECK(bf16_bad == 0);
    if (f16_bad || bf16_bad) fprintf(stderr, "fp16: %d wrong, bf16: %d wrong\n", f16_bad, bf16_bad);

    /* the edges: the largest halves, overflow, the subnormals' ties, NaN and infinity kept */
    CHECK(kd_f32_to_f16(65504.0f) == 0x7bff);
    CHECK(kd_f32_to_f16(65519.996f) == 0x7bff);
    CHECK(kd_f32_to_f16(65520.0f) == 0x7c00);
    CHECK(kd_f32_to_f16(-1e30f) == 0xfc00);
    CHECK(kd_f32_to_f16(ldexpf(1, -25)) == 0); /* half the smallest: to even, 0 */
    CHECK(kd_f32_to_f16(ldexpf(3, -25)) == 2); /* 1.5 smallest: to even, 2 */
    CHECK(isnan(kd_f16_to_f32(kd_f32_to_f16(NAN))));
    CHECK(isinf(kd_bf16_to_f32(kd_f32_to_bf16(-INFINITY))) && kd_f32_to_bf16(-INFINITY) == 0xff80);
    CHECK(isnan(kd_bf16_to_f32(kd_f32_to_bf16(NAN))));
    CHECK(kd_f32_to_bf16(FLT_MAX) == 0x7f80); /* past the largest bf16's midpoint: infinity */
    CHECK(kd_f32_to_bf16(1.0f + ldexpf(1, -8)) == 0x3f80); /* a tie: to even */

    /* the wire's packing: fp32 exact, 16 bits as the scalar conversions, NaN kept */
    float src[5] = {1.0f / 3, -2.5e-6f, 70000.0f, NAN, -0.0f}, back[5];
    uint16_t packed[5];
    kd_wire_pack_floats(KD_DTYPE_BF16, src, 5, packed);
    kd_wire_unpack_floats(KD_DTYPE_BF16, packed, 5, back);
    for (int i = 0; i < 5; i++)
        CHECK(isnan(src[i]) ? isnan(back[i]) : back[i] == kd_bf16_to_f32(kd_f32_to_bf16(src[i])));
    kd_wire_pack_floats(KD_DTYPE_F16, src, 5, packed);
    kd_wire_unpack_floats(KD_DTYPE_F16, packed, 5, back);
    CHECK(isinf(back[2]) && isnan(back[3]) && signbit(back[4]) && back[0] == kd_f16_to_f32(0x3555));
    float exact[5];
    kd_wire_pack_floats(KD_DTYPE_F32, src, 5, exact);
    CHECK(memcmp(exact, src, sizeof src) == 0);
}

/* The naive top-k order: larger magnitude first (NaN above all), the lower index on ties. */
static const float *topk_values;
static float naive_magnitude(float x) {
    return isnan(x) ? INFINITY : fabsf(x);
}
static int by_magnitude(const void *a, const void *b) {
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    const float x = naive_magnitude(topk_values[i]), y = naive_magnitude(topk_values[j]);
    return x > y ? -1 : x < y ? 1 : (i > j) - (i < j);
}
static int ascending(const void *a, const void *b) {
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    return (i > j) - (i < j);
}

/* Error-feedback top-k against a full sort, with ties (values from a small set) and a NaN; what
 * is sent plus what stays is the input exactly; over pushes, everything sent plus the residual
 * is the sum of the inputs; the receiver refuses indices out of range or out of order. */
static void test_topk(void) {
    enum { N = 10007 };
    static float e[N], before[N], scratch[N], dense[N], sent_sum[N], input_sum[N];
    static int32_t index[N], naive[N];
    static uint16_t values16[N];
    static float values32[N];
    kd_rng_t rng;
    kd_rng_init(&rng, 42);
    const size_t ks[] = {1, 10, 500, N};
    for (size_t t = 0; t < sizeof ks / sizeof ks[0]; t++) {
        const size_t k = ks[t];
        for (int d = 0; d < 2; d++) {
            const kd_dtype_t dtype = d ? KD_DTYPE_BF16 : KD_DTYPE_F32;
            void *values = d ? (void *)values16 : (void *)values32;
            for (size_t i = 0; i < N; i++)
                e[i] = (float)((int)kd_rng_below(&rng, 41) - 20) * 0.37f +
                       kd_rng_normal(&rng) * (kd_rng_below(&rng, 2) ? 1e-3f : 0.0f);
            e[N / 2] = NAN;
            memcpy(before, e, sizeof e);
            kd_wire_pack_topk(dtype, e, N, k, index, values, scratch);
            for (size_t i = 0; i < N; i++) naive[i] = (int32_t)i;
            topk_values = before;
            qsort(naive, N, sizeof *naive, by_magnitude);
            qsort(naive, k, sizeof *naive, ascending);
            CHECK(memcmp(index, naive, k * sizeof *index) == 0);
            char err[KD_ERR_LEN];
            CHECK(kd_wire_unpack_topk(dtype, index, values, k, N, dense, err, sizeof err) == 0);
            bool whole = true;
            for (size_t i = 0; i < N; i++)
                whole = whole && (isnan(before[i]) ? isnan(dense[i]) && isnan(e[i])
                                                   : dense[i] + e[i] == before[i]);
            CHECK(whole);
        }
    }
    /* over pushes, in fp32: sent + residual = inputs (to rounding of the sums) */
    memset(e, 0, sizeof e);
    memset(sent_sum, 0, sizeof sent_sum);
    memset(input_sum, 0, sizeof input_sum);
    for (int push = 0; push < 20; push++) {
        for (size_t i = 0; i < N; i++) {
            const float g = kd_rng_normal(&rng);
            input_sum[i] += g;
            e[i] += g;
        }
        kd_wire_pack_topk(KD_DTYPE_F32, e, N, N / 100, index, values32, scratch);
        char err[KD_ERR_LEN];
        CHECK(kd_wire_unpack_topk(KD_DTYPE_F32, index, values32, N / 100, N, dense, err,
                                  sizeof err) == 0);
        for (size_t i = 0; i < N; i++) sent_sum[i] += dense[i];
    }
    double worst = 0;
    for (size_t i = 0; i < N; i++)
        worst = fmax(worst, fabs((double)sent_sum[i] + e[i] - input_sum[i]));
    CHECK(worst < 1e-4);
    /* the receiver's checks */
    char err[KD_ERR_LEN];
    const int32_t outside[2] = {3, N}, backwards[2] = {5, 5};
    CHECK(kd_wire_unpack_topk(KD_DTYPE_F32, outside, values32, 2, N, dense, err, sizeof err) == -1);
    CHECK(strstr(err, "outside") != NULL);
    CHECK(kd_wire_unpack_topk(KD_DTYPE_F32, backwards, values32, 2, N, dense, err, sizeof err) ==
          -1);
    const int32_t negative[1] = {-1};
    CHECK(kd_wire_unpack_topk(KD_DTYPE_F32, negative, values32, 1, N, dense, err, sizeof err) ==
          -1);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_util"));
    test_files();
    test_mkdirs();
    test_parse();
    test_misc();
    test_rng_reference();
    test_permutation();
    test_samplers();
    test_half();
    test_topk();
    return kd_test_done("test_util");
}
