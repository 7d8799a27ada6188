/* test_safetensors: round trips through the writer and reader, the PyTorch-written fixtures,
 * and one malformed file per validation rule (each error must name the file and the problem). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_util.h"

static const char *tmp;

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static void test_dtypes(void) {
    kd_dtype_t d;
    for (int i = 0; i < KD_DTYPE_COUNT; i++) {
        CHECK(kd_dtype_parse(kd_dtype_name((kd_dtype_t)i), &d) == 0 && d == (kd_dtype_t)i);
    }
    CHECK(kd_dtype_parse("BOOL", &d) != 0);
    CHECK(kd_dtype_parse("f32", &d) != 0);
    CHECK(strcmp(kd_dtype_name(KD_DTYPE_BF16), "BF16") == 0);
    CHECK(kd_dtype_size(KD_DTYPE_F32) == 4 && kd_dtype_size(KD_DTYPE_F16) == 2 &&
          kd_dtype_size(KD_DTYPE_BF16) == 2 && kd_dtype_size(KD_DTYPE_F64) == 8 &&
          kd_dtype_size(KD_DTYPE_I8) == 1 && kd_dtype_size(KD_DTYPE_U8) == 1 &&
          kd_dtype_size(KD_DTYPE_I32) == 4 && kd_dtype_size(KD_DTYPE_I64) == 8);
}

static void test_round_trip(void) {
    char err[KD_ERR_LEN] = "";
    float f32[6] = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
    double f64[3] = {3.141592653589793, -1e300, 2.5};
    int64_t i64 = -1234567890123ll;
    uint8_t u8[5] = {0, 1, 127, 128, 255};
    uint16_t bf16[4] = {0x3f80, 0xbf80, 0x7f80, 0x0001};
    int32_t i32[2 * 1 * 2] = {-7, 8, 2147483647, -2147483647 - 1};
    int8_t i8dummy = 0;
    const int64_t s_f32[2] = {2, 3}, s_f64[1] = {3}, s_u8[1] = {5}, s_bf16[2] = {2, 2},
                  s_i32[3] = {2, 1, 2}, s_i8[2] = {0, 3};

    kd_st_writer_t *w = kd_st_writer_new();
    kd_st_writer_add(w, "a.f32", KD_DTYPE_F32, 2, s_f32, f32);
    kd_st_writer_add(w, "b.f64", KD_DTYPE_F64, 1, s_f64, f64);
    kd_st_writer_add(w, "c.scalar", KD_DTYPE_I64, 0, NULL, &i64);
    kd_st_writer_add(w, "d.u8", KD_DTYPE_U8, 1, s_u8, u8);
    kd_st_writer_add(w, "e.bf16", KD_DTYPE_BF16, 2, s_bf16, bf16);
    kd_st_writer_add(w, "f.i32", KD_DTYPE_I32, 3, s_i32, i32);
    kd_st_writer_add(w, "g.empty", KD_DTYPE_I8, 2, s_i8, &i8dummy);
    kd_st_writer_metadata(w, "format", "pt");
    kd_st_writer_metadata(w, "note", "first");
    kd_st_writer_metadata(w, "note", "a \"quoted\" value, ünïcode");
    const char *path = tmp_path("round.safetensors");
    CHECK(kd_st_writer_write(w, path, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    CHECK(w == NULL);
    kd_st_writer_destroy(&w); /* NULL-safe */

    /* Header length is padded to 8 with spaces, data follows right after. */
    uint8_t *raw = NULL;
    size_t len = 0;
    CHECK(kd_read_file(path, &raw, &len, err, sizeof err) == 0);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
    CHECK(hlen % 8 == 0);
    CHECK(raw[8] == '{');
    size_t data_bytes = sizeof f32 + sizeof f64 + 8 + 5 + 8 + sizeof i32;
    CHECK(len == 8 + hlen + data_bytes);
    size_t last = 8 + (size_t)hlen - 1;
    while (last > 8 && raw[last] == ' ') last--;
    CHECK(raw[last] == '}');
    CHECK(8 + hlen - 1 - last < 8);
    free(raw);

    kd_safetensors_t *st = NULL;
    CHECK(kd_st_open(path, &st, err, sizeof err) == 0);
    if (!st) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(strcmp(kd_st_path(st), path) == 0);
    CHECK(kd_st_count(st) == 7);
    /* Tensors come back in file order, which is insertion order. */
    const char *order[7] = {"a.f32", "b.f64", "c.scalar", "d.u8", "e.bf16", "f.i32", "g.empty"};
    for (int i = 0; i < 7 && i < kd_st_count(st); i++)
        CHECK(strcmp(kd_st_tensor(st, i)->name, order[i]) == 0);
    CHECK(kd_st_tensor(st, 0)->offset == 0);
    CHECK(kd_st_tensor(st, 1)->offset == sizeof f32);

    const kd_st_tensor_t *t = kd_st_find(st, "a.f32");
    CHECK(t && t->dtype == KD_DTYPE_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    CHECK(t && t->nbytes == sizeof f32 && memcmp(kd_st_data(st, t), f32, sizeof f32) == 0);
    t = kd_st_find(st, "b.f64");
    CHECK(t && t->dtype == KD_DTYPE_F64 && t->ndim == 1 && t->shape[0] == 3);
    CHECK(t && memcmp(kd_st_data(st, t), f64, sizeof f64) == 0);
    t = kd_st_find(st, "c.scalar");
    CHECK(t && t->dtype == KD_DTYPE_I64 && t->ndim == 0 && t->nbytes == 8);
    CHECK(t && memcmp(kd_st_data(st, t), &i64, 8) == 0);
    t = kd_st_find(st, "d.u8");
    CHECK(t && t->dtype == KD_DTYPE_U8 && t->nbytes == 5 && memcmp(kd_st_data(st, t), u8, 5) == 0);
    t = kd_st_find(st, "e.bf16");
    CHECK(t && t->dtype == KD_DTYPE_BF16 && t->ndim == 2 && t->nbytes == 8);
    CHECK(t && memcmp(kd_st_data(st, t), bf16, 8) == 0);
    t = kd_st_find(st, "f.i32");
    CHECK(t && t->dtype == KD_DTYPE_I32 && t->ndim == 3 && t->shape[1] == 1);
    CHECK(t && memcmp(kd_st_data(st, t), i32, sizeof i32) == 0);
    t = kd_st_find(st, "g.empty");
    CHECK(t && t->dtype == KD_DTYPE_I8 && t->ndim == 2 && t->shape[0] == 0 && t->nbytes == 0);
    CHECK(kd_st_find(st, "missing") == NULL);
    CHECK(kd_st_find(st, "__metadata__") == NULL);
    CHECK(kd_st_metadata(st, "format") && strcmp(kd_st_metadata(st, "format"), "pt") == 0);
    CHECK(kd_st_metadata(st, "note") &&
          strcmp(kd_st_metadata(st, "note"), "a \"quoted\" value, ünïcode") == 0);
    CHECK(kd_st_metadata(st, "absent") == NULL);
    kd_st_close(&st);
    CHECK(st == NULL);
    kd_st_close(&st);

    /* An empty file (no tensors, no metadata) is valid too. */
    w = kd_st_writer_new();
    path = tmp_path("empty.safetensors");
    CHECK(kd_st_writer_write(w, path, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    CHECK(kd_st_open(path, &st, err, sizeof err) == 0);
    CHECK(st && kd_st_count(st) == 0 && kd_st_metadata(st, "format") == NULL);
    kd_st_close(&st);

    /* Writing into a missing directory fails with the path in the message. */
    w = kd_st_writer_new();
    kd_st_writer_add(w, "x", KD_DTYPE_F32, 1, s_f64, f32);
    err[0] = 0;
    CHECK(kd_st_writer_write(w, tmp_path("no/such/dir/x.safetensors"), err, sizeof err) != 0);
    CHECK_ERR_HAS(err, "x.safetensors");
    kd_st_writer_destroy(&w);
}

static void test_pytorch_fixture(void) {
    char err[KD_ERR_LEN] = "";
    kd_safetensors_t *st = NULL;
    CHECK(kd_st_open("data/cnn_small.safetensors", &st, err, sizeof err) == 0);
    if (!st) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(kd_st_count(st) == 8);
    CHECK(kd_st_metadata(st, "format") && strcmp(kd_st_metadata(st, "format"), "pt") == 0);
    const kd_st_tensor_t *t = kd_st_find(st, "layers.3.weight");
    CHECK(t && t->dtype == KD_DTYPE_F32 && t->ndim == 4 && t->shape[0] == 8 && t->shape[1] == 4 &&
          t->shape[2] == 3 && t->shape[3] == 3);
    t = kd_st_find(st, "layers.7.weight");
    CHECK(t && t->ndim == 2 && t->shape[0] == 16 && t->shape[1] == 72);
    t = kd_st_find(st, "layers.10.bias");
    CHECK(t && t->ndim == 1 && t->shape[0] == 10 && t->nbytes == 40);
    if (t) {
        /* PyTorch's default init bounds a bias by 1/sqrt(fan_in) = 1/sqrt(16). */
        float b[10];
        memcpy(b, kd_st_data(st, t), sizeof b);
        int nonzero = 0;
        for (int i = 0; i < 10; i++) {
            CHECK(fabsf(b[i]) <= 0.25f);
            nonzero += b[i] != 0.0f;
        }
        CHECK(nonzero > 0);
    }
    kd_st_close(&st);

    CHECK(kd_st_open("data/mlp_small_io.safetensors", &st, err, sizeof err) == 0);
    if (!st) return;
    t = kd_st_find(st, "inputs");
    CHECK(t && t->ndim == 4 && t->shape[0] == 8 && t->shape[1] == 1 && t->shape[2] == 28 &&
          t->shape[3] == 28);
    if (t) {
        /* Pixels scaled to [0, 1]: each is k/255. */
        float x[8 * 784];
        memcpy(x, kd_st_data(st, t), sizeof x);
        int bad = 0;
        for (int i = 0; i < 8 * 784; i++) {
            float k = x[i] * 255.0f;
            if (!(x[i] >= 0.0f && x[i] <= 1.0f) || fabsf(k - roundf(k)) > 1e-3f) bad++;
        }
        CHECK(bad == 0);
    }
    t = kd_st_find(st, "logits");
    CHECK(t && t->ndim == 2 && t->shape[0] == 8 && t->shape[1] == 10);
    kd_st_close(&st);
}

/* Writes the u64 length, the header text as given and data_len bytes of data. */
static const char *write_raw(const char *name, uint64_t hlen, const char *header, size_t data_len) {
    const char *path = tmp_path(name);
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)(hlen >> (8 * i));
    fwrite(le, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i & 0xff), f);
    fclose(f);
    return path;
}

/* The file must be rejected with an error naming it and containing each needle. */
static void expect_reject(const char *path, const char *needle1, const char *needle2) {
    char err[KD_ERR_LEN] = "";
    kd_safetensors_t *st = NULL;
    int rc = kd_st_open(path, &st, err, sizeof err);
    CHECK(rc != 0);
    CHECK(st == NULL);
    CHECK_ERR_HAS(err, path);
    if (getenv("KD_TEST_VERBOSE")) fprintf(stderr, "  rejected: %s\n", err);
    if (needle1) CHECK_ERR_HAS(err, needle1);
    if (needle2) CHECK_ERR_HAS(err, needle2);
    kd_st_close(&st);
}

/* A header whose length field tells the truth. */
static const char *write_hdr(const char *name, const char *header, size_t data_len) {
    return write_raw(name, strlen(header), header, data_len);
}

static void test_malformed(void) {
    const char *path;
    expect_reject(tmp_path("does-not-exist.safetensors"), "cannot open", NULL);

    /* Truncations: shorter than the length field, header cut, data cut. */
    path = tmp_path("short.safetensors");
    FILE *f = fopen(path, "wb");
    fwrite("\x10\0\0\0\0", 1, 5, f);
    fclose(f);
    expect_reject(path, "shorter than the 8-byte", NULL);
    const char *good = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    path = write_raw("header-cut.safetensors", strlen(good), "{\"w\":{\"dtype\":\"F32\"", 0);
    expect_reject(path, "header length", "past the end of the file");
    path = write_hdr("data-cut.safetensors", good, 10);
    expect_reject(path, "'w'", "past the end of the data section");
    path = write_hdr("good.safetensors", good, 16);
    {
        char err[KD_ERR_LEN] = "";
        kd_safetensors_t *st = NULL;
        CHECK(kd_st_open(path, &st, err, sizeof err) == 0); /* the control case */
        kd_st_close(&st);
    }

    /* Header length lying: bigger than the file, or absurd. */
    path = write_raw("len-lies.safetensors", 4096, good, 16);
    expect_reject(path, "header length 4096", "past the end of the file");
    path = write_raw("len-huge.safetensors", 1ull << 62, good, 16);
    expect_reject(path, "larger than the 100000000-byte limit", NULL);

    /* JSON problems. */
    path = write_hdr("bad-json.safetensors", "{\"w\": {\"dtype\": \"F32\",\n \"shape\" [1]}}", 0);
    expect_reject(path, "not valid JSON", "line 2");
    path = write_hdr("not-object.safetensors", "[1, 2]  ", 0);
    expect_reject(path, "not a JSON object", NULL);
    path = write_hdr("dup.safetensors",
                     "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                     "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                     2);
    expect_reject(path, "duplicate", NULL);
    path = write_hdr("entry-not-object.safetensors", "{\"w\": 3}", 0);
    expect_reject(path, "'w'", "not a JSON object");
    path = write_hdr("no-dtype.safetensors", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_reject(path, "'w'", "missing \"dtype\"");
    path =
        write_hdr("no-shape.safetensors", "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4);
    expect_reject(path, "'w'", "missing \"shape\"");
    path = write_hdr("no-offsets.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4);
    expect_reject(path, "'w'", "missing \"data_offsets\"");
    path = write_hdr("shape-float.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4);
    expect_reject(path, "'w'", "shape[0] is not an integer");
    path = write_hdr("shape-string.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,4]}}", 4);
    expect_reject(path, "'w'", "\"shape\" is not an array");
    path = write_hdr("dtype-int.safetensors",
                     "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_reject(path, "'w'", "\"dtype\" is not a string");

    /* Values. */
    path = write_hdr("unknown-dtype.safetensors",
                     "{\"w\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16);
    expect_reject(path, "'w'", "unknown dtype 'F128'");
    path = write_hdr("neg-dim.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1,4],\"data_offsets\":[0,16]}}", 16);
    expect_reject(path, "'w'", "shape[0] = -1 is out of range");
    path = write_hdr("huge-dim.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[99999999999999999],"
                     "\"data_offsets\":[0,16]}}",
                     16);
    expect_reject(path, "'w'", "out of range");
    path = write_hdr("overflow.safetensors",
                     "{\"w\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],"
                     "\"data_offsets\":[0,16]}}",
                     16);
    expect_reject(path, "'w'", "overflows");
    path = write_hdr("too-many-dims.safetensors",
                     "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                     "\"data_offsets\":[0,1]}}",
                     1);
    expect_reject(path, "'w'", "9 dimensions");
    path = write_hdr("offsets-one.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}", 4);
    expect_reject(path, "'w'", "not two integers");
    path = write_hdr("offsets-descending.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8);
    expect_reject(path, "'w'", "not two ascending");
    path = write_hdr("offsets-negative.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8);
    expect_reject(path, "'w'", "not two ascending");
    path = write_hdr("offsets-out.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 12);
    expect_reject(path, "'w'", "past the end of the data section");
    path = write_hdr("size-mismatch.safetensors",
                     "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", 16);
    expect_reject(path, "'w'", "16 bytes of data, but dtype F32 and its shape need 24");

    /* Layout of the data section. */
    path = write_hdr("overlap.safetensors",
                     "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                     16);
    expect_reject(path, "'a' [0, 16) and 'b' [8, 16) overlap", NULL);
    path = write_hdr("gap.safetensors",
                     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                     "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                     12);
    expect_reject(path, "gap in the data section", "'b'");
    path = write_hdr("gap-start.safetensors",
                     "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    expect_reject(path, "bytes [0, 4) before tensor 'a'", NULL);
    path = write_hdr("trailing.safetensors", good, 20);
    expect_reject(path, "4 trailing bytes", NULL);

    /* Metadata. */
    path = write_hdr("meta-int.safetensors",
                     "{\"__metadata__\":{\"format\":\"pt\",\"epoch\":3},"
                     "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                     1);
    expect_reject(path, "__metadata__ 'epoch'", "not a string");
    path = write_hdr("meta-array.safetensors", "{\"__metadata__\":[\"pt\"]}", 0);
    expect_reject(path, "\"__metadata__\" is not a JSON object", NULL);
}

int main(void) {
    tmp = kd_test_tmpdir("test_safetensors");
    test_dtypes();
    test_round_trip();
    test_pytorch_fixture();
    test_malformed();
    return kd_test_done("test_safetensors");
}
