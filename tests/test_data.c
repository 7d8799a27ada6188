/* Tests of kd_data: IDX files built here (raw and gzip) and malformed in every way we know,
 * the real Fashion-MNIST files, the train/val split and per-epoch batching. */
#include "kd_data.h"
#include "kd_rng.h"
#include "kd_util.h"

#include "kd_test.h"

#include <stdint.h>
#include <zlib.h>

#define FMNIST "/usr/share/datasets/fashion-mnist/"

static char tmp[1024];

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

/* Big-endian u32 into b. */
static void be32(uint8_t *b, uint32_t v) {
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static void write_bytes(const char *path, const uint8_t *b, size_t n, int gz) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        if (!f || (n && gzwrite(f, b, (unsigned)n) != (int)n) || gzclose(f) != Z_OK) {
            fprintf(stderr, "cannot write %s\n", path);
            exit(1);
        }
        return;
    }
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(b, 1, n, f) != n) || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

/* An IDX file: magic type/ndims, the given dims, then payload bytes. Returns its length. */
static size_t make_idx(uint8_t *buf, uint8_t type, uint8_t ndims, const uint32_t *dims,
                       const uint8_t *payload, size_t payload_len) {
    buf[0] = 0;
    buf[1] = 0;
    buf[2] = type;
    buf[3] = ndims;
    size_t off = 4;
    for (int d = 0; d < ndims; d++, off += 4) be32(buf + off, dims[d]);
    memcpy(buf + off, payload, payload_len);
    return off + payload_len;
}

/* The synthetic dataset: N images of HxW with pixel (i, r, c) = pix(i, r, c), label lab(i). */
enum { N = 5, H = 3, W = 4 };
static uint8_t pix(int i, int r, int c) {
    return (uint8_t)(i * 50 + r * 7 + c * 3 + 1);
}
static uint8_t lab(int i) {
    return (uint8_t)((i * 3) % 8);
} /* 0 3 6 1 4: max 6 */

static uint8_t img_buf[64 + N * H * W + 16], lab_buf[64 + N + 16];
static size_t img_len, lab_len;

static void build_good(void) {
    uint8_t px[N * H * W], lb[N];
    for (int i = 0; i < N; i++) {
        for (int r = 0; r < H; r++)
            for (int c = 0; c < W; c++) px[(i * H + r) * W + c] = pix(i, r, c);
        lb[i] = lab(i);
    }
    uint32_t di[3] = {N, H, W}, dl[1] = {N};
    img_len = make_idx(img_buf, 0x08, 3, di, px, sizeof px);
    lab_len = make_idx(lab_buf, 0x08, 1, dl, lb, sizeof lb);
}

static void check_good(const kd_dataset_t *ds) {
    CHECK(ds->n == N && ds->channels == 1 && ds->height == H && ds->width == W);
    CHECK(ds->sample_dim == H * W);
    CHECK(ds->num_classes == 7);
    int bad = 0;
    for (int i = 0; i < N; i++) {
        if (ds->labels[i] != lab(i)) bad++;
        for (int r = 0; r < H; r++)
            for (int c = 0; c < W; c++)
                if (ds->pixels[(size_t)i * H * W + r * W + c] != pix(i, r, c)) bad++;
    }
    CHECK(bad == 0);
    /* gather: x = pixels / 255 in the order of ids, y = labels. */
    uint32_t ids[3] = {4, 0, 2};
    float x[3 * H * W];
    int32_t y[3];
    kd_dataset_gather(ds, ids, 3, x, y);
    for (int k = 0; k < 3; k++) {
        CHECK(y[k] == lab((int)ids[k]));
        for (int j = 0; j < H * W; j++)
            CHECK_CLOSE(x[k * H * W + j], pix((int)ids[k], j / W, j % W) / 255.0, 1e-7);
    }
    kd_dataset_gather(ds, ids, 3, x, NULL); /* y is optional */
    CHECK(x[0] == (float)pix(4, 0, 0) / 255.0f);
}

static void test_load_good(void) {
    build_good();
    char err[KD_ERR_LEN] = "";
    for (int gz = 0; gz < 2; gz++) {
        const char *ip = tmp_path(gz ? "good-images.gz" : "good-images");
        const char *lp = tmp_path(gz ? "good-labels.gz" : "good-labels");
        write_bytes(ip, img_buf, img_len, gz);
        write_bytes(lp, lab_buf, lab_len, gz);
        kd_dataset_t *ds = NULL;
        int rc = kd_idx_load(ip, lp, &ds, err, sizeof err);
        CHECK(rc == 0);
        if (rc != 0) {
            fprintf(stderr, "%s\n", err);
            continue;
        }
        check_good(ds);
        kd_dataset_destroy(&ds);
        CHECK(ds == NULL);
        kd_dataset_destroy(&ds); /* NULL-safe */
        kd_dataset_destroy(NULL);
    }
    /* Mixed: gzip images with raw labels. */
    kd_dataset_t *ds = NULL;
    CHECK(kd_idx_load(tmp_path("good-images.gz"), tmp_path("good-labels"), &ds, err, sizeof err) ==
          0);
    if (ds) check_good(ds);
    kd_dataset_destroy(&ds);

    /* All labels zero: still at least two classes. */
    uint8_t lb[N] = {0};
    uint8_t buf[64];
    uint32_t dl[1] = {N};
    size_t n = make_idx(buf, 0x08, 1, dl, lb, N);
    write_bytes(tmp_path("zero-labels"), buf, n, 0);
    CHECK(kd_idx_load(tmp_path("good-images"), tmp_path("zero-labels"), &ds, err, sizeof err) == 0);
    CHECK(ds && ds->num_classes == 2);
    kd_dataset_destroy(&ds);
}

/* Loading must fail, leave *out NULL, and say which file and what is wrong. */
static void expect_fail(const char *images, const char *labels, const char *culprit,
                        const char *needle) {
    kd_dataset_t *ds = (kd_dataset_t *)&ds; /* must be reset to NULL */
    char err[KD_ERR_LEN] = "";
    CHECK(kd_idx_load(images, labels, &ds, err, sizeof err) == -1);
    CHECK(ds == NULL);
    CHECK_ERR_HAS(err, culprit);
    CHECK_ERR_HAS(err, needle);
    if (getenv("KD_TEST_VERBOSE")) fprintf(stderr, "  ok: %s\n", err);
}

static void test_malformed(void) {
    build_good();
    const char *gi = tmp_path("good-images");
    const char *gl = tmp_path("good-labels");
    write_bytes(gi, img_buf, img_len, 0);
    write_bytes(gl, lab_buf, lab_len, 0);
    uint8_t buf[256];
    char p[1200], q[1200];
    for (int gz = 0; gz < 2; gz++) {
        const char *sfx = gz ? ".gz" : "";
#define BAD(name, data, len)                                                                       \
    do {                                                                                           \
        snprintf(p, sizeof p, "%s/%s%s", tmp, name, sfx);                                          \
        write_bytes(p, data, len, gz);                                                             \
    } while (0)
        /* Truncated headers: inside the magic, and inside the dimension sizes. */
        BAD("trunc-magic", img_buf, 3);
        expect_fail(p, gl, p, "truncated IDX header");
        BAD("trunc-dims", img_buf, 10);
        expect_fail(p, gl, p, "truncated IDX header");
        BAD("empty", img_buf, 0);
        expect_fail(p, gl, p, "truncated IDX header");
        /* Truncated data, with the exact counts. */
        BAD("trunc-data", img_buf, img_len - 7);
        expect_fail(p, gl, p, "truncated: expected 60 bytes of image data, found 53");
        BAD("trunc-labels", lab_buf, lab_len - 1);
        expect_fail(gi, p, p, "truncated: expected 5 bytes of label data, found 4");
        /* Trailing bytes. */
        memcpy(buf, img_buf, img_len);
        memset(buf + img_len, 0xAB, 3);
        BAD("trailing", buf, img_len + 3);
        expect_fail(p, gl, p, "3 trailing bytes");
        /* Wrong magic, wrong type byte, wrong dim count, zero dims. */
        memcpy(buf, img_buf, img_len);
        buf[0] = 0x1f;
        BAD("magic", buf, img_len);
        expect_fail(p, gl, p, "not an IDX file");
        memcpy(buf, img_buf, img_len);
        buf[2] = 0x0D;
        BAD("dtype", buf, img_len);
        expect_fail(p, gl, p, "element type 0x0d (float)");
        memcpy(buf, img_buf, img_len);
        buf[3] = 2;
        BAD("ndims", buf, img_len);
        expect_fail(p, gl, p, "must have 3 dimensions, found 2");
        memcpy(buf, lab_buf, lab_len);
        buf[3] = 3;
        BAD("lab-ndims", buf, lab_len);
        expect_fail(gi, p, p, "must have 1 dimension, found 3");
        /* Image and label files swapped. */
        expect_fail(gl, gi, gl, "must have 3 dimensions, found 1");
        memcpy(buf, img_buf, img_len);
        be32(buf + 8, 0);
        BAD("zero-dim", buf, img_len);
        expect_fail(p, gl, p, "zero size in dimension 1");
        /* Lying sizes: absurd (refused before allocating) and merely large (truncated). */
        memcpy(buf, img_buf, img_len);
        be32(buf + 4, 0xFFFFFFFFu);
        BAD("huge", buf, img_len);
        expect_fail(p, gl, p, "refusing");
        memcpy(buf, img_buf, img_len);
        be32(buf + 4, 1000000);
        BAD("large", buf, img_len);
        expect_fail(p, gl, p, "truncated: expected 12000000 bytes of image data, found 60");
        /* Count mismatch: the message names both files and both counts. */
        uint8_t lb[4] = {1, 2, 3, 4};
        uint32_t d4[1] = {4};
        size_t n = make_idx(buf, 0x08, 1, d4, lb, 4);
        BAD("four-labels", buf, n);
        snprintf(q, sizeof q, "%s", p);
        expect_fail(gi, q, gi, "5 images");
        expect_fail(gi, q, q, "4 labels");
#undef BAD
    }
    /* Missing files, for either argument. */
    snprintf(p, sizeof p, "%s/no-such-file.gz", tmp);
    expect_fail(p, gl, p, "cannot open");
    expect_fail(gi, p, p, "cannot open");
    expect_fail(tmp, gl, tmp, "read error"); /* a directory */
}

static void test_corrupt_gzip(void) {
    build_good();
    const char *gl = tmp_path("good-labels");
    write_bytes(gl, lab_buf, lab_len, 0);
    const char *gzp = tmp_path("ref-images.gz");
    write_bytes(gzp, img_buf, img_len, 1);
    uint8_t *raw = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    CHECK(kd_read_file(gzp, &raw, &len, err, sizeof err) == 0);
    CHECK(len > 18 && raw[0] == 0x1f && raw[1] == 0x8b);
    char p[1200];

    /* Bad CRC in the trailer: every byte inflates, the check fails at the end. */
    raw[len - 8] ^= 0xFF;
    snprintf(p, sizeof p, "%s/crc.gz", tmp);
    CHECK(kd_write_file_atomic(p, raw, len, err, sizeof err) == 0);
    expect_fail(p, gl, p, "corrupt gzip stream: incorrect data check");
    raw[len - 8] ^= 0xFF;

    /* A reserved deflate block type (BFINAL=1, BTYPE=11) right after the 10-byte header. */
    uint8_t save = raw[10];
    raw[10] = 0x07;
    snprintf(p, sizeof p, "%s/block.gz", tmp);
    CHECK(kd_write_file_atomic(p, raw, len, err, sizeof err) == 0);
    expect_fail(p, gl, p, "corrupt gzip stream: invalid block type");
    raw[10] = save;

    /* The compressed stream cut short. */
    snprintf(p, sizeof p, "%s/cut.gz", tmp);
    CHECK(kd_write_file_atomic(p, raw, len - 12, err, sizeof err) == 0);
    expect_fail(p, gl, p, "corrupt gzip stream");

    /* Sanity: the untouched copy loads. */
    snprintf(p, sizeof p, "%s/intact.gz", tmp);
    CHECK(kd_write_file_atomic(p, raw, len, err, sizeof err) == 0);
    kd_dataset_t *ds = NULL;
    CHECK(kd_idx_load(p, gl, &ds, err, sizeof err) == 0);
    kd_dataset_destroy(&ds);
    free(raw);
}

/* Reference values computed independently with Python's gzip + numpy. */
static void check_fmnist(const char *split, size_t n, int first_label, uint64_t first_img_sum,
                         uint64_t last_img_sum, uint64_t total_sum) {
    char ip[256], lp[256], err[KD_ERR_LEN] = "";
    snprintf(ip, sizeof ip, FMNIST "%s-images-idx3-ubyte.gz", split);
    snprintf(lp, sizeof lp, FMNIST "%s-labels-idx1-ubyte.gz", split);
    kd_dataset_t *ds = NULL;
    int rc = kd_idx_load(ip, lp, &ds, err, sizeof err);
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "%s (run scripts/install-deps.sh)\n", err);
        return;
    }
    CHECK(ds->n == n);
    CHECK(ds->channels == 1 && ds->height == 28 && ds->width == 28 && ds->sample_dim == 784);
    CHECK(ds->num_classes == 10);
    size_t hist[10] = {0};
    int out_of_range = 0;
    for (size_t i = 0; i < ds->n; i++) {
        if (ds->labels[i] < 0 || ds->labels[i] >= 10)
            out_of_range++;
        else
            hist[ds->labels[i]]++;
    }
    CHECK(out_of_range == 0);
    for (int c = 0; c < 10; c++) CHECK(hist[c] == n / 10);
    CHECK(ds->labels[0] == first_label);
    CHECK(ds->labels[n - 1] == 5);
    uint64_t s0 = 0, s1 = 0, st = 0;
    for (size_t j = 0; j < 784; j++) {
        s0 += ds->pixels[j];
        s1 += ds->pixels[(n - 1) * 784 + j];
    }
    for (size_t j = 0; j < n * 784; j++) st += ds->pixels[j];
    CHECK(s0 == first_img_sum);
    CHECK(s1 == last_img_sum);
    CHECK(st == total_sum);

    if (n == 60000) {
        kd_dataset_t *tr = NULL, *va = NULL;
        CHECK(kd_dataset_split(ds, 5000, 7, &tr, &va, err, sizeof err) == 0);
        CHECK(tr && va && tr->n == 55000 && va->n == 5000);
        CHECK(tr && tr->num_classes == 10 && tr->height == 28 && va->sample_dim == 784);
        kd_dataset_destroy(&tr);
        kd_dataset_destroy(&va);
    }
    kd_dataset_destroy(&ds);
}

/* A dataset whose sample i stores i in its first four pixels, so subsets reveal their ids. */
static kd_dataset_t *id_dataset(size_t n) {
    kd_dataset_t *ds = kd_xcalloc(1, sizeof *ds);
    ds->n = n;
    ds->channels = 1;
    ds->height = 2;
    ds->width = 3;
    ds->sample_dim = 6;
    ds->num_classes = 10;
    ds->pixels = kd_xcalloc(n ? n : 1, 6);
    ds->labels = kd_xcalloc(n ? n : 1, sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        be32(ds->pixels + 6 * i, (uint32_t)i);
        ds->pixels[6 * i + 4] = (uint8_t)(i * 13);
        ds->labels[i] = (int32_t)(i % 10);
    }
    return ds;
}

static uint32_t sample_id(const kd_dataset_t *ds, size_t i) {
    const uint8_t *b = ds->pixels + 6 * i;
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static void test_subset(void) {
    kd_dataset_t *src = id_dataset(20);
    uint32_t ids[4] = {19, 3, 3, 0};
    kd_dataset_t *sub = kd_dataset_subset(src, ids, 4);
    CHECK(sub->n == 4 && sub->sample_dim == 6 && sub->height == 2 && sub->width == 3);
    CHECK(sub->num_classes == 10);
    for (size_t i = 0; i < 4; i++) {
        CHECK(sample_id(sub, i) == ids[i]);
        CHECK(sub->pixels[6 * i + 4] == (uint8_t)(ids[i] * 13));
        CHECK(sub->labels[i] == (int32_t)(ids[i] % 10));
    }
    kd_dataset_destroy(&sub);
    sub = kd_dataset_subset(src, NULL, 0);
    CHECK(sub->n == 0);
    kd_dataset_destroy(&sub);
    kd_dataset_destroy(&src);
}

static void test_split(void) {
    const size_t n = 1001, nv = 137;
    kd_dataset_t *src = id_dataset(n);
    kd_dataset_t *tr = NULL, *va = NULL, *tr2 = NULL, *va2 = NULL;
    char err[KD_ERR_LEN] = "";
    CHECK(kd_dataset_split(src, nv, 42, &tr, &va, err, sizeof err) == 0);
    CHECK(tr && va);
    if (!tr || !va) return;
    CHECK(tr->n == n - nv && va->n == nv);
    /* Disjoint and covering, each side in ascending id order, labels travel with pixels. */
    uint8_t *seen = calloc(n, 1);
    int order_ok = 1, label_ok = 1;
    for (size_t i = 0; i < va->n; i++) {
        uint32_t id = sample_id(va, i);
        if (id < n) seen[id]++;
        if (i && id <= sample_id(va, i - 1)) order_ok = 0;
        if (va->labels[i] != (int32_t)(id % 10)) label_ok = 0;
    }
    for (size_t i = 0; i < tr->n; i++) {
        uint32_t id = sample_id(tr, i);
        if (id < n) seen[id]++;
        if (i && id <= sample_id(tr, i - 1)) order_ok = 0;
        if (tr->labels[i] != (int32_t)(id % 10)) label_ok = 0;
    }
    int cover_ok = 1;
    for (size_t i = 0; i < n; i++)
        if (seen[i] != 1) cover_ok = 0;
    CHECK(cover_ok);
    CHECK(order_ok);
    CHECK(label_ok);
    free(seen);

    /* Deterministic: same seed, same split; another seed, another split. */
    CHECK(kd_dataset_split(src, nv, 42, &tr2, &va2, err, sizeof err) == 0);
    CHECK(va2 && memcmp(va->pixels, va2->pixels, nv * 6) == 0);
    CHECK(tr2 && memcmp(tr->pixels, tr2->pixels, (n - nv) * 6) == 0);
    kd_dataset_destroy(&tr2);
    kd_dataset_destroy(&va2);
    CHECK(kd_dataset_split(src, nv, 43, &tr2, &va2, err, sizeof err) == 0);
    CHECK(va2 && memcmp(va->pixels, va2->pixels, nv * 6) != 0);
    kd_dataset_destroy(&tr2);
    kd_dataset_destroy(&va2);
    /* The validation set is a random sample, not the first or last val_count ids. */
    CHECK(sample_id(va, 0) != 0 || sample_id(va, nv - 1) != nv - 1);
    CHECK(sample_id(va, 0) != n - nv);
    kd_dataset_destroy(&tr);
    kd_dataset_destroy(&va);

    /* Edges: empty validation set, everything in validation, too many. */
    CHECK(kd_dataset_split(src, 0, 1, &tr, &va, err, sizeof err) == 0);
    CHECK(tr && va && tr->n == n && va->n == 0);
    CHECK(tr && memcmp(tr->pixels, src->pixels, n * 6) == 0);
    kd_dataset_destroy(&tr);
    kd_dataset_destroy(&va);
    CHECK(kd_dataset_split(src, n, 1, &tr, &va, err, sizeof err) == 0);
    CHECK(tr && va && tr->n == 0 && va->n == n);
    kd_dataset_destroy(&tr);
    kd_dataset_destroy(&va);
    tr = va = (kd_dataset_t *)&err;
    CHECK(kd_dataset_split(src, n + 1, 1, &tr, &va, err, sizeof err) == -1);
    CHECK(tr == NULL && va == NULL);
    CHECK_ERR_HAS(err, "1002");
    CHECK_ERR_HAS(err, "1001");
    kd_dataset_destroy(&src);
}

static void test_epoch(void) {
    CHECK(kd_epoch_count(1003, 64) == 16);
    CHECK(kd_epoch_count(1024, 64) == 16);
    CHECK(kd_epoch_count(1, 64) == 1);
    CHECK(kd_epoch_count(0, 64) == 0);
    CHECK(kd_epoch_count(64, 1) == 64);

    const size_t n = 1003, b = 64;
    kd_epoch_t *ep = kd_epoch_new(99, 3, n, b);
    CHECK(ep->n_batches == 16 && ep->n_samples == n && ep->batch_size == b);
    CHECK(ep->seed == 99 && ep->epoch == 3);
    /* Every sample exactly once, batches in permutation order, short last batch. */
    uint32_t *ref = malloc(n * sizeof(uint32_t));
    kd_rng_permutation(99, 3, ref, n);
    int *count = calloc(n, sizeof(int));
    size_t pos = 0;
    int order_ok = 1;
    for (size_t k = 0; k < ep->n_batches; k++) {
        const uint32_t *ids = NULL;
        size_t m = kd_epoch_batch(ep, k, &ids);
        CHECK(m == (k + 1 < ep->n_batches ? b : n - 15 * b));
        for (size_t i = 0; i < m; i++, pos++) {
            if (ids[i] < n) count[ids[i]]++;
            if (ids[i] != ref[pos]) order_ok = 0;
        }
    }
    CHECK(pos == n);
    CHECK(order_ok);
    int once = 1;
    for (size_t i = 0; i < n; i++)
        if (count[i] != 1) once = 0;
    CHECK(once);
    /* Out of range. */
    const uint32_t *ids = (const uint32_t *)ref;
    CHECK(kd_epoch_batch(ep, 16, &ids) == 0);
    CHECK(kd_epoch_batch(ep, (size_t)-1, &ids) == 0);

    /* Same (seed, epoch) gives the same batches; another epoch or seed does not. */
    kd_epoch_t *same = kd_epoch_new(99, 3, n, b);
    kd_epoch_t *next = kd_epoch_new(99, 4, n, b);
    kd_epoch_t *other = kd_epoch_new(100, 3, n, b);
    CHECK(memcmp(ep->perm, same->perm, n * sizeof(uint32_t)) == 0);
    CHECK(memcmp(ep->perm, next->perm, n * sizeof(uint32_t)) != 0);
    CHECK(memcmp(ep->perm, other->perm, n * sizeof(uint32_t)) != 0);
    const uint32_t *a0 = NULL, *a1 = NULL;
    size_t m0 = kd_epoch_batch(ep, 5, &a0), m1 = kd_epoch_batch(same, 5, &a1);
    CHECK(m0 == m1 && memcmp(a0, a1, m0 * sizeof(uint32_t)) == 0);
    /* Not the identity: the order is shuffled. */
    size_t fixed = 0;
    for (size_t i = 0; i < n; i++) fixed += ep->perm[i] == i;
    CHECK(fixed < 20);
    kd_epoch_destroy(&same);
    kd_epoch_destroy(&next);
    kd_epoch_destroy(&other);
    kd_epoch_destroy(&ep);
    CHECK(ep == NULL);
    kd_epoch_destroy(&ep);
    kd_epoch_destroy(NULL);

    /* Exact multiple: the last batch is full. Batch larger than the dataset: one batch. */
    ep = kd_epoch_new(1, 0, 640, 64);
    CHECK(ep->n_batches == 10 && kd_epoch_batch(ep, 9, &ids) == 64);
    CHECK(kd_epoch_batch(ep, 10, &ids) == 0);
    kd_epoch_destroy(&ep);
    ep = kd_epoch_new(1, 0, 10, 64);
    CHECK(ep->n_batches == 1 && kd_epoch_batch(ep, 0, &ids) == 10);
    kd_epoch_destroy(&ep);
    ep = kd_epoch_new(1, 0, 0, 64);
    CHECK(ep->n_batches == 0 && kd_epoch_batch(ep, 0, &ids) == 0);
    kd_epoch_destroy(&ep);
    free(ref);
    free(count);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_data"));
    test_load_good();
    test_malformed();
    test_corrupt_gzip();
    check_fmnist("train", 60000, 9, 76247, 16684, 3431114169ULL);
    check_fmnist("t10k", 10000, 9, 33456, 24390, 573469082ULL);
    test_subset();
    test_split();
    test_epoch();
    return kd_test_done("test_data");
}
