/* test_checkpoint: model <-> safetensors round trip, the refusals that protect a model from a
 * wrong file, and the acceptance check against PyTorch: the fixtures written by
 * tests/data/make_fixtures.py load into kdist and give PyTorch's logits. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kd_checkpoint.h"
#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_util.h"

static const char *tmp;

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static const kd_shape_t MNIST = {1, 28, 28};

/* nn.Sequential(Flatten, Linear(784, 32), ReLU, Linear(32, 10)) */
static const kd_layer_spec_t MLP[] = {
    {.kind = KD_LAYER_FLATTEN},
    {.kind = KD_LAYER_LINEAR, .out_features = 32},
    {.kind = KD_LAYER_RELU},
    {.kind = KD_LAYER_LINEAR, .out_features = 10},
};

/* The CNN of make_fixtures.py. */
static const kd_layer_spec_t CNN[] = {
    {.kind = KD_LAYER_CONV2D, .out_channels = 4, .kernel = 3, .stride = 1, .padding = 1},
    {.kind = KD_LAYER_RELU},
    {.kind = KD_LAYER_MAXPOOL2D, .kernel = 2, .stride = 2},
    {.kind = KD_LAYER_CONV2D, .out_channels = 8, .kernel = 3, .stride = 2, .padding = 1},
    {.kind = KD_LAYER_RELU},
    {.kind = KD_LAYER_MAXPOOL2D, .kernel = 2, .stride = 2},
    {.kind = KD_LAYER_FLATTEN},
    {.kind = KD_LAYER_LINEAR, .out_features = 16},
    {.kind = KD_LAYER_GELU},
    {.kind = KD_LAYER_DROPOUT, .p = 0.3f},
    {.kind = KD_LAYER_LINEAR, .out_features = 10},
};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static kd_model_t *new_model(const kd_layer_spec_t *specs, int n) {
    char err[KD_ERR_LEN] = "";
    kd_model_t *m = NULL;
    if (kd_model_new(specs, n, MNIST, &m, err, sizeof err) != 0) {
        fprintf(stderr, "kd_model_new: %s\n", err);
        exit(1);
    }
    return m;
}

static void test_describe(void) {
    kd_model_t *m = new_model(CNN, N_OF(CNN));
    char desc[512];
    kd_model_describe(m, desc, sizeof desc);
    CHECK(strcmp(desc, "input=1x28x28;conv2d:4,3,1,1;relu;maxpool2d:2,2;conv2d:8,3,2,1;relu;"
                       "maxpool2d:2,2;flatten;linear:16;gelu;dropout:0.3;linear:10") == 0);
    char small[10];
    kd_model_describe(m, small, sizeof small); /* truncates, stays terminated */
    CHECK(strcmp(small, "input=1x2") == 0);
    kd_model_destroy(&m);
}

static void test_round_trip(void) {
    char err[KD_ERR_LEN] = "";
    kd_model_t *a = new_model(CNN, N_OF(CNN));
    kd_model_t *b = new_model(CNN, N_OF(CNN));
    /* Distinct bit patterns everywhere, including a negative zero and a subnormal. */
    for (size_t i = 0; i < a->n_params; i++)
        a->params[i] = (float)((int)(i * 7919 % 2001) - 1000) / 37.0f;
    a->params[0] = -0.0f;
    a->params[1] = 1e-40f;
    const char *path = tmp_path("cnn.safetensors");
    CHECK(kd_checkpoint_save(a, path, err, sizeof err) == 0);
    CHECK(kd_checkpoint_load(b, path, err, sizeof err) == 0);
    CHECK(memcmp(a->params, b->params, a->n_params * sizeof(float)) == 0);

    /* The file is what PyTorch's state_dict would hold. */
    kd_safetensors_t *st = NULL;
    CHECK(kd_st_open(path, &st, err, sizeof err) == 0);
    if (st) {
        CHECK(kd_st_count(st) == 8);
        const kd_st_tensor_t *t = kd_st_find(st, "layers.3.weight");
        CHECK(t && t->dtype == KD_DTYPE_F32 && t->ndim == 4 && t->shape[0] == 8 &&
              t->shape[1] == 4 && t->shape[2] == 3 && t->shape[3] == 3);
        t = kd_st_find(st, "layers.10.bias");
        CHECK(t && t->ndim == 1 && t->shape[0] == 10);
        CHECK(t && memcmp(kd_st_data(st, t), a->params + a->layers[10].bias_offset, 40) == 0);
        CHECK(kd_st_find(st, "layers.1.weight") == NULL); /* relu: no parameters */
        char desc[512];
        kd_model_describe(a, desc, sizeof desc);
        CHECK(kd_st_metadata(st, "kdist.model") &&
              strcmp(kd_st_metadata(st, "kdist.model"), desc) == 0);
        CHECK(kd_st_metadata(st, "format") && strcmp(kd_st_metadata(st, "format"), "pt") == 0);
        kd_st_close(&st);
    }

    /* add_model lets a caller put more tensors in the same file; loading ignores them. */
    kd_st_writer_t *w = kd_st_writer_new();
    kd_checkpoint_add_model(w, a);
    float moments[3] = {1, 2, 3};
    const int64_t three = 3;
    kd_st_writer_add(w, "optim.m", KD_DTYPE_F32, 1, &three, moments);
    path = tmp_path("cnn-extra.safetensors");
    CHECK(kd_st_writer_write(w, path, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    memset(b->params, 0, b->n_params * sizeof(float));
    CHECK(kd_checkpoint_load(b, path, err, sizeof err) == 0);
    CHECK(memcmp(a->params, b->params, a->n_params * sizeof(float)) == 0);

    kd_model_destroy(&a);
    kd_model_destroy(&b);
}

/* load must fail with every needle in the message, and leave m's params untouched. */
static void expect_refused(kd_model_t *m, const char *path, const char *n1, const char *n2,
                           const char *n3) {
    char err[KD_ERR_LEN] = "";
    float *before = kd_xmalloc(m->n_params * sizeof(float));
    for (size_t i = 0; i < m->n_params; i++) m->params[i] = 0.5f + (float)i;
    memcpy(before, m->params, m->n_params * sizeof(float));
    CHECK(kd_checkpoint_load(m, path, err, sizeof err) != 0);
    if (getenv("KD_TEST_VERBOSE")) fprintf(stderr, "  refused: %s\n", err);
    CHECK_ERR_HAS(err, path);
    if (n1) CHECK_ERR_HAS(err, n1);
    if (n2) CHECK_ERR_HAS(err, n2);
    if (n3) CHECK_ERR_HAS(err, n3);
    CHECK(memcmp(before, m->params, m->n_params * sizeof(float)) == 0);
    free(before);
}

static void test_refusals(void) {
    char err[KD_ERR_LEN] = "";
    /* flatten; linear:800; relu; linear:10 saved, then loaded into linear:400. Layer 3 fits,
     * so a loader that copied as it checked would have changed it before failing. */
    kd_layer_spec_t big[] = {{.kind = KD_LAYER_FLATTEN},
                             {.kind = KD_LAYER_LINEAR, .out_features = 800},
                             {.kind = KD_LAYER_RELU},
                             {.kind = KD_LAYER_LINEAR, .out_features = 10}};
    kd_model_t *m800 = new_model(big, 4);
    for (size_t i = 0; i < m800->n_params; i++) m800->params[i] = -1.0f;
    const char *p800 = tmp_path("mlp800.safetensors");
    CHECK(kd_checkpoint_save(m800, p800, err, sizeof err) == 0);

    big[1].out_features = 400;
    kd_model_t *m400 = new_model(big, 4);
    expect_refused(m400, p800, "tensor 'layers.1.weight' has shape [800, 784]",
                   "the recipe's model expects [400, 784]", NULL);

    /* Same parameter shapes at different indices: a different layer list. */
    kd_layer_spec_t shifted[] = {{.kind = KD_LAYER_FLATTEN},
                                 {.kind = KD_LAYER_DROPOUT, .p = 0.1f},
                                 {.kind = KD_LAYER_LINEAR, .out_features = 800},
                                 {.kind = KD_LAYER_RELU},
                                 {.kind = KD_LAYER_LINEAR, .out_features = 10}};
    kd_model_t *ms = new_model(shifted, 5);
    expect_refused(ms, p800, "'layers.2.weight'", "missing", NULL);

    /* Missing tensor: a file with everything but layers.3.bias. */
    kd_st_writer_t *w = kd_st_writer_new();
    const kd_layer_t *l1 = &m800->layers[1], *l3 = &m800->layers[3];
    int64_t b1 = (int64_t)l1->bias_count;
    kd_st_writer_add(w, "layers.1.weight", KD_DTYPE_F32, 2, l1->weight_shape,
                     m800->params + l1->weight_offset);
    kd_st_writer_add(w, "layers.1.bias", KD_DTYPE_F32, 1, &b1, m800->params + l1->bias_offset);
    kd_st_writer_add(w, "layers.3.weight", KD_DTYPE_F32, 2, l3->weight_shape,
                     m800->params + l3->weight_offset);
    const char *p = tmp_path("missing.safetensors");
    CHECK(kd_st_writer_write(w, p, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    expect_refused(m800, p, "tensor 'layers.3.bias' is missing", NULL, NULL);

    /* Wrong dtype: layers.3.bias as F64. */
    w = kd_st_writer_new();
    double b3[10] = {0};
    int64_t ten = 10;
    kd_st_writer_add(w, "layers.1.weight", KD_DTYPE_F32, 2, l1->weight_shape,
                     m800->params + l1->weight_offset);
    kd_st_writer_add(w, "layers.1.bias", KD_DTYPE_F32, 1, &b1, m800->params + l1->bias_offset);
    kd_st_writer_add(w, "layers.3.weight", KD_DTYPE_F32, 2, l3->weight_shape,
                     m800->params + l3->weight_offset);
    kd_st_writer_add(w, "layers.3.bias", KD_DTYPE_F64, 1, &ten, b3);
    p = tmp_path("dtype.safetensors");
    CHECK(kd_st_writer_write(w, p, err, sizeof err) == 0);
    kd_st_writer_destroy(&w);
    expect_refused(m800, p, "tensor 'layers.3.bias' has dtype F64", "F32", NULL);

    /* Unexpected layers.* tensors: a parameter the layer does not have, a layer index past the
     * end, a name that is not a parameter at all. */
    const char *extra[3] = {"layers.2.weight", "layers.4.bias", "layers.x"};
    const char *why[3] = {"layer 2 of the recipe's model is relu", "has 4 layers", "has 4 layers"};
    for (int k = 0; k < 3; k++) {
        w = kd_st_writer_new();
        kd_checkpoint_add_model(w, m800);
        kd_st_writer_add(w, extra[k], KD_DTYPE_F32, 1, &ten, m800->params);
        char name[64];
        snprintf(name, sizeof name, "extra%d.safetensors", k);
        p = tmp_path(name);
        CHECK(kd_st_writer_write(w, p, err, sizeof err) == 0);
        kd_st_writer_destroy(&w);
        char needle[80];
        snprintf(needle, sizeof needle, "unexpected tensor '%s'", extra[k]);
        expect_refused(m800, p, needle, why[k], NULL);
    }

    /* A malformed file: the safetensors error comes through. */
    p = tmp_path("garbage.safetensors");
    CHECK(kd_write_file_atomic(p, "abc", 3, err, sizeof err) == 0);
    expect_refused(m800, p, "shorter than the 8-byte", NULL, NULL);

    kd_model_destroy(&m800);
    kd_model_destroy(&m400);
    kd_model_destroy(&ms);
}

/* Loads PyTorch's weights, runs the kdist forward pass on PyTorch's inputs and compares every
 * logit with PyTorch's: |a - b| <= 1e-4 * max(1, |b|). */
static void check_against_pytorch(const char *name, const kd_layer_spec_t *specs, int n) {
    char err[KD_ERR_LEN] = "", path[256];
    kd_model_t *m = new_model(specs, n);
    snprintf(path, sizeof path, "data/%s.safetensors", name);
    int rc = kd_checkpoint_load(m, path, err, sizeof err);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "%s\n", err);

    kd_safetensors_t *io = NULL;
    snprintf(path, sizeof path, "data/%s_io.safetensors", name);
    CHECK(kd_st_open(path, &io, err, sizeof err) == 0);
    if (!io || rc != 0) {
        fprintf(stderr, "%s\n", err);
        kd_st_close(&io);
        kd_model_destroy(&m);
        return;
    }
    const kd_st_tensor_t *ti = kd_st_find(io, "inputs"), *tl = kd_st_find(io, "logits");
    CHECK(ti && ti->dtype == KD_DTYPE_F32 && ti->nbytes == 8 * 784 * sizeof(float));
    CHECK(tl && tl->dtype == KD_DTYPE_F32 && tl->nbytes == 8 * 10 * sizeof(float));
    if (ti && tl && ti->nbytes == 8 * 784 * sizeof(float) && tl->nbytes == 80 * sizeof(float)) {
        float *x = kd_alloc_floats(8 * 784);
        float want[80];
        memcpy(x, kd_st_data(io, ti), ti->nbytes);
        memcpy(want, kd_st_data(io, tl), sizeof want);
        CHECK(m->num_classes == 10);
        const float *got = kd_model_forward(m, x, 8, false, 0);
        int bad = 0;
        double worst = 0;
        for (int i = 0; i < 80; i++) {
            double d = fabs((double)got[i] - want[i]);
            double tol = 1e-4 * fmax(1.0, fabs(want[i]));
            if (d / tol > worst) worst = d / tol;
            if (!(d <= tol)) {
                if (bad++ < 5)
                    fprintf(stderr, "%s: logit[%d][%d] = %.7g, PyTorch %.7g\n", name, i / 10,
                            i % 10, got[i], want[i]);
            }
        }
        CHECK(bad == 0);
        fprintf(stderr, "%s: %d of 80 logits outside the tolerance; worst error %.3g of it\n", name,
                bad, worst);
        /* The same batch one sample at a time gives the same logits (no batch coupling). */
        const float *one = kd_model_forward(m, x + 7 * 784, 1, false, 0);
        for (int j = 0; j < 10; j++) CHECK_CLOSE(one[j], want[70 + j], 1e-4);
        free(x);
    }
    kd_st_close(&io);
    kd_model_destroy(&m);
}

int main(void) {
    tmp = kd_test_tmpdir("test_checkpoint");
    test_describe();
    test_round_trip();
    test_refusals();
    check_against_pytorch("mlp_small", MLP, N_OF(MLP));
    check_against_pytorch("cnn_small", CNN, N_OF(CNN));
    return kd_test_done("test_checkpoint");
}
