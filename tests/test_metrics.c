/* test_metrics: writes scalars and a graph with kd_metrics, then reads the event file back
 * with this file's own reader — a bitwise CRC32C and a hand-written protobuf wire parser, no
 * code shared with the writer — and checks framing, both CRCs of every record, the events,
 * and that metrics.jsonl holds the same scalars. */
#include <dirent.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "kd_metrics.h"
#include "kd_model.h"
#include "kd_test.h"
#include "kd_util.h"

/* ---- an independent TFRecord reader ---- */

static uint32_t t_crc32c(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t t_masked(const uint8_t *p, size_t n) {
    uint32_t c = t_crc32c(p, n);
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

static uint64_t t_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

typedef struct {
    const uint8_t *data;
    size_t len;
} t_rec_t;

/* Splits buf into records, checking lengths and both CRCs. Returns the record count, or -1
 * with why set ("truncated header", "length crc mismatch", ...). */
static int t_read_records(const uint8_t *buf, size_t n, t_rec_t *out, int max, char *why,
                          size_t whylen) {
    size_t off = 0;
    int count = 0;
    while (off < n) {
        if (n - off < 12) {
            snprintf(why, whylen, "truncated header at %zu", off);
            return -1;
        }
        uint64_t len = t_le(buf + off, 8);
        if ((uint32_t)t_le(buf + off + 8, 4) != t_masked(buf + off, 8)) {
            snprintf(why, whylen, "length crc mismatch at %zu", off);
            return -1;
        }
        if (len > n - off - 12 || n - off - 12 - len < 4) {
            snprintf(why, whylen, "truncated record at %zu", off);
            return -1;
        }
        const uint8_t *data = buf + off + 12;
        if ((uint32_t)t_le(data + len, 4) != t_masked(data, (size_t)len)) {
            snprintf(why, whylen, "data crc mismatch at %zu", off);
            return -1;
        }
        if (count == max) {
            snprintf(why, whylen, "more than %d records", max);
            return -1;
        }
        out[count++] = (t_rec_t){data, (size_t)len};
        off += 12 + (size_t)len + 4;
    }
    return count;
}

/* ---- a minimal protobuf wire-format parser ---- */

typedef struct {
    const uint8_t *p, *end;
} t_pb_t;

typedef struct {
    uint32_t field, wire;
    uint64_t u;          /* varint, fixed64, fixed32 */
    const uint8_t *data; /* length-delimited */
    size_t len;
} t_field_t;

static bool t_varint(t_pb_t *r, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) return false;
        uint8_t b = *r->p++;
        *v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

/* Next field; false at the end or on malformed input (*bad set for the latter). */
static bool t_next(t_pb_t *r, t_field_t *f, bool *bad) {
    *bad = false;
    if (r->p >= r->end) return false;
    uint64_t key;
    *bad = true;
    if (!t_varint(r, &key)) return false;
    f->field = (uint32_t)(key >> 3);
    f->wire = (uint32_t)(key & 7);
    f->u = 0;
    f->data = NULL;
    f->len = 0;
    switch (f->wire) {
    case 0:
        if (!t_varint(r, &f->u)) return false;
        break;
    case 1:
        if (r->end - r->p < 8) return false;
        f->u = t_le(r->p, 8);
        r->p += 8;
        break;
    case 5:
        if (r->end - r->p < 4) return false;
        f->u = t_le(r->p, 4);
        r->p += 4;
        break;
    case 2: {
        uint64_t len;
        if (!t_varint(r, &len) || len > (uint64_t)(r->end - r->p)) return false;
        f->data = r->p;
        f->len = (size_t)len;
        r->p += len;
        break;
    }
    default:
        return false;
    }
    *bad = false;
    return true;
}

static double t_f64(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static float t_f32(uint64_t u) {
    uint32_t w = (uint32_t)u;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static bool t_streq(const t_field_t *f, const char *s) {
    return f->wire == 2 && f->len == strlen(s) && memcmp(f->data, s, f->len) == 0;
}

#define T_MAX_VALUES 16
typedef struct {
    char tag[64];
    float value;
    bool has_value;
} t_value_t;

typedef struct {
    double wall_time;
    int64_t step;
    char file_version[32];
    const uint8_t *graph;
    size_t graph_len;
    bool has_summary;
    int n_values;
    t_value_t values[T_MAX_VALUES];
} t_event_t;

static void t_copy(char *dst, size_t cap, const t_field_t *f) {
    size_t n = f->len < cap - 1 ? f->len : cap - 1;
    memcpy(dst, f->data, n);
    dst[n] = '\0';
}

static bool t_decode_value(const uint8_t *p, size_t n, t_value_t *v) {
    t_pb_t r = {p, p + n};
    t_field_t f;
    bool bad;
    memset(v, 0, sizeof *v);
    while (t_next(&r, &f, &bad)) {
        if (f.field == 1 && f.wire == 2) t_copy(v->tag, sizeof v->tag, &f);
        if (f.field == 2 && f.wire == 5) v->value = t_f32(f.u), v->has_value = true;
    }
    return !bad;
}

static bool t_decode_event(const t_rec_t *rec, t_event_t *ev) {
    memset(ev, 0, sizeof *ev);
    t_pb_t r = {rec->data, rec->data + rec->len};
    t_field_t f;
    bool bad;
    while (t_next(&r, &f, &bad)) {
        if (f.field == 1 && f.wire == 1) ev->wall_time = t_f64(f.u);
        if (f.field == 2 && f.wire == 0) ev->step = (int64_t)f.u;
        if (f.field == 3 && f.wire == 2) t_copy(ev->file_version, sizeof ev->file_version, &f);
        if (f.field == 4 && f.wire == 2) ev->graph = f.data, ev->graph_len = f.len;
        if (f.field == 5 && f.wire == 2) {
            ev->has_summary = true;
            t_pb_t s = {f.data, f.data + f.len};
            t_field_t sf;
            bool sbad;
            while (t_next(&s, &sf, &sbad)) {
                if (sf.field != 1 || sf.wire != 2 || ev->n_values == T_MAX_VALUES) return false;
                if (!t_decode_value(sf.data, sf.len, &ev->values[ev->n_values++])) return false;
            }
            if (sbad) return false;
        }
    }
    return !bad;
}

/* ---- GraphDef decoding ---- */

#define T_MAX_NODES 40
typedef struct {
    char name[48], op[32];
    int n_inputs;
    char inputs[4][48];
    /* the attrs the test looks at */
    int64_t out_shape[6];
    int out_ndim; /* -1: no _output_shapes */
    int64_t shape[6];
    int shape_ndim;       /* -1: no shape attr */
    int64_t out_features; /* -1: absent */
    float p;              /* NaN: absent */
    int64_t stride;       /* -1: absent */
    bool has_desc;
} t_node_t;

static bool t_decode_shape(const uint8_t *p, size_t n, int64_t *dims, int *ndim) {
    t_pb_t r = {p, p + n};
    t_field_t f;
    bool bad;
    *ndim = 0;
    while (t_next(&r, &f, &bad)) {
        if (f.field != 2 || f.wire != 2) continue;
        if (*ndim == 6) return false;
        t_pb_t d = {f.data, f.data + f.len};
        t_field_t df;
        bool dbad;
        int64_t size = 0;
        while (t_next(&d, &df, &dbad))
            if (df.field == 1 && df.wire == 0) size = (int64_t)df.u;
        if (dbad) return false;
        dims[(*ndim)++] = size;
    }
    return !bad;
}

static bool t_decode_attr(const uint8_t *p, size_t n, t_node_t *node) {
    t_pb_t r = {p, p + n};
    t_field_t f, key = {0}, value = {0};
    bool bad;
    while (t_next(&r, &f, &bad)) {
        if (f.field == 1) key = f;
        if (f.field == 2) value = f;
    }
    if (bad || !key.data || !value.data) return false;
    t_pb_t v = {value.data, value.data + value.len};
    while (t_next(&v, &f, &bad)) {
        if (t_streq(&key, "_output_shapes") && f.field == 1 && f.wire == 2) {
            t_pb_t l = {f.data, f.data + f.len};
            t_field_t lf;
            bool lbad;
            while (t_next(&l, &lf, &lbad))
                if (lf.field == 7 && lf.wire == 2 &&
                    !t_decode_shape(lf.data, lf.len, node->out_shape, &node->out_ndim))
                    return false;
            if (lbad) return false;
        }
        if (t_streq(&key, "shape") && f.field == 7 && f.wire == 2 &&
            !t_decode_shape(f.data, f.len, node->shape, &node->shape_ndim))
            return false;
        if (t_streq(&key, "out_features") && f.field == 3 && f.wire == 0)
            node->out_features = (int64_t)f.u;
        if (t_streq(&key, "stride") && f.field == 3 && f.wire == 0) node->stride = (int64_t)f.u;
        if (t_streq(&key, "p") && f.field == 4 && f.wire == 5) node->p = t_f32(f.u);
        if (t_streq(&key, "attr") && f.field == 2 && f.wire == 2) node->has_desc = true;
    }
    return !bad;
}

static int t_decode_graph(const uint8_t *p, size_t n, t_node_t *nodes, int max, int64_t *producer) {
    t_pb_t r = {p, p + n};
    t_field_t f;
    bool bad;
    int count = 0;
    *producer = -1;
    while (t_next(&r, &f, &bad)) {
        if (f.field == 4 && f.wire == 2) {
            t_pb_t v = {f.data, f.data + f.len};
            t_field_t vf;
            bool vbad;
            while (t_next(&v, &vf, &vbad))
                if (vf.field == 1 && vf.wire == 0) *producer = (int64_t)vf.u;
            if (vbad) return -1;
        }
        if (f.field != 1 || f.wire != 2) continue;
        if (count == max) return -1;
        t_node_t *node = &nodes[count++];
        memset(node, 0, sizeof *node);
        node->out_ndim = node->shape_ndim = -1;
        node->out_features = node->stride = -1;
        node->p = NAN;
        t_pb_t nr = {f.data, f.data + f.len};
        t_field_t nf;
        bool nbad;
        while (t_next(&nr, &nf, &nbad)) {
            if (nf.wire != 2) continue;
            if (nf.field == 1) t_copy(node->name, sizeof node->name, &nf);
            if (nf.field == 2) t_copy(node->op, sizeof node->op, &nf);
            if (nf.field == 3 && node->n_inputs < 4)
                t_copy(node->inputs[node->n_inputs++], sizeof node->inputs[0], &nf);
            if (nf.field == 5 && !t_decode_attr(nf.data, nf.len, node)) return -1;
        }
        if (nbad) return -1;
    }
    return bad ? -1 : count;
}

static const t_node_t *t_find(const t_node_t *nodes, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(nodes[i].name, name) == 0) return &nodes[i];
    return NULL;
}

static bool t_dims_are(const int64_t *dims, int ndim, int want_ndim, const int64_t *want) {
    if (ndim != want_ndim) return false;
    for (int i = 0; i < ndim; i++)
        if (dims[i] != want[i]) return false;
    return true;
}

/* ---- the tests ---- */

static void test_crc_vector(void) {
    CHECK(t_crc32c((const uint8_t *)"123456789", 9) == 0xE3069283u);
    CHECK(t_crc32c((const uint8_t *)"", 0) == 0);
}

/* What the test wrote, step by step. NaN stands for a value JSON holds as null. */
typedef struct {
    long step;
    int n;
    const char *tags[6];
    double values[6];
} t_step_t;

static const t_step_t STEPS[] = {
    {0, 3, {"loss/train", "lr", "accuracy/val"}, {2.5, 0.1, 0.0}},
    {10, 4, {"loss/train", "lr", "workers", "throughput/samples_per_s"}, {1.25, 0.05, 3, 1234.5}},
    {20, 2, {"loss/train", "memory/rss_mb"}, {NAN, 87.125}},
};
#define N_STEPS ((int)(sizeof STEPS / sizeof STEPS[0]))

static kd_model_t *t_model(void) {
    kd_layer_spec_t specs[] = {
        {.kind = KD_LAYER_CONV2D, .out_channels = 4, .kernel = 3, .stride = 1, .padding = 1},
        {.kind = KD_LAYER_RELU},
        {.kind = KD_LAYER_MAXPOOL2D, .kernel = 2},
        {.kind = KD_LAYER_FLATTEN},
        {.kind = KD_LAYER_LINEAR, .out_features = 32},
        {.kind = KD_LAYER_GELU},
        {.kind = KD_LAYER_DROPOUT, .p = 0.25f},
        {.kind = KD_LAYER_LINEAR, .out_features = 10},
    };
    kd_model_t *model = NULL;
    char err[KD_ERR_LEN];
    if (kd_model_new(specs, 8, (kd_shape_t){1, 28, 28}, &model, err, sizeof err) != 0) {
        fprintf(stderr, "kd_model_new: %s\n", err);
        exit(1);
    }
    return model;
}

static void check_graph(const t_event_t *ev) {
    t_node_t nodes[T_MAX_NODES];
    int64_t producer;
    int n = t_decode_graph(ev->graph, ev->graph_len, nodes, T_MAX_NODES, &producer);
    CHECK(producer == 22);
    /* input, 8 layers, 2 x (weight, bias) for conv and the two linears (3 layers), output */
    CHECK(n == 1 + 8 + 6 + 1);
    if (n <= 0) return;
    CHECK(strcmp(nodes[0].name, "input") == 0 && strcmp(nodes[0].op, "Placeholder") == 0);
    CHECK(t_dims_are(nodes[0].shape, nodes[0].shape_ndim, 4, (int64_t[]){-1, 1, 28, 28}));
    CHECK(strcmp(nodes[n - 1].name, "output") == 0);
    CHECK(nodes[n - 1].n_inputs == 1 && strcmp(nodes[n - 1].inputs[0], "layers.7") == 0);
    CHECK(t_dims_are(nodes[n - 1].out_shape, nodes[n - 1].out_ndim, 2, (int64_t[]){-1, 10}));

    static const char *ops[] = {"Conv2d", "ReLU", "MaxPool2d", "Flatten",
                                "Linear", "GELU", "Dropout",   "Linear"};
    for (int i = 0; i < 8; i++) {
        char name[32];
        snprintf(name, sizeof name, "layers.%d", i);
        const t_node_t *node = t_find(nodes, n, name);
        CHECK(node != NULL);
        if (!node) continue;
        CHECK(strcmp(node->op, ops[i]) == 0);
        CHECK(node->has_desc);
        CHECK(node->out_ndim >= 2);
        char prev[32];
        if (i)
            snprintf(prev, sizeof prev, "layers.%d", i - 1);
        else
            snprintf(prev, sizeof prev, "input");
        CHECK(node->n_inputs >= 1 && strcmp(node->inputs[0], prev) == 0);
        bool params = i == 0 || i == 4 || i == 7;
        CHECK(node->n_inputs == (params ? 3 : 1));
        if (params && node->n_inputs == 3) {
            char w[40], b[40];
            snprintf(w, sizeof w, "layers.%d.weight", i);
            snprintf(b, sizeof b, "layers.%d.bias", i);
            CHECK(strcmp(node->inputs[1], w) == 0 && strcmp(node->inputs[2], b) == 0);
            const t_node_t *wn = t_find(nodes, n, w);
            CHECK(wn && strcmp(wn->op, "VariableV2") == 0);
        }
    }
    const t_node_t *conv_w = t_find(nodes, n, "layers.0.weight");
    CHECK(conv_w && t_dims_are(conv_w->shape, conv_w->shape_ndim, 4, (int64_t[]){4, 1, 3, 3}));
    CHECK(conv_w && t_dims_are(conv_w->out_shape, conv_w->out_ndim, 4, (int64_t[]){4, 1, 3, 3}));
    const t_node_t *lin_w = t_find(nodes, n, "layers.4.weight");
    CHECK(lin_w && t_dims_are(lin_w->shape, lin_w->shape_ndim, 2, (int64_t[]){32, 784}));
    const t_node_t *lin_b = t_find(nodes, n, "layers.7.bias");
    CHECK(lin_b && t_dims_are(lin_b->shape, lin_b->shape_ndim, 1, (int64_t[]){10}));
    const t_node_t *pool = t_find(nodes, n, "layers.2");
    CHECK(pool && t_dims_are(pool->out_shape, pool->out_ndim, 4, (int64_t[]){-1, 4, 14, 14}));
    CHECK(pool && pool->stride == 2);
    const t_node_t *flat = t_find(nodes, n, "layers.3");
    CHECK(flat && t_dims_are(flat->out_shape, flat->out_ndim, 2, (int64_t[]){-1, 784}));
    const t_node_t *lin = t_find(nodes, n, "layers.4");
    CHECK(lin && lin->out_features == 32);
    const t_node_t *drop = t_find(nodes, n, "layers.6");
    CHECK(drop && drop->p == 0.25f);
    CHECK(drop && t_dims_are(drop->out_shape, drop->out_ndim, 2, (int64_t[]){-1, 32}));
}

/* The jsonl line must hold exactly step, wall_time and the event's values. */
static void check_jsonl_line(json_t *line, const t_event_t *ev, const t_step_t *want) {
    CHECK(json_is_object(line));
    if (!json_is_object(line)) return;
    CHECK(json_integer_value(json_object_get(line, "step")) == want->step);
    CHECK(json_real_value(json_object_get(line, "wall_time")) == ev->wall_time);
    CHECK((int)json_object_size(line) == 2 + want->n);
    for (int k = 0; k < ev->n_values; k++) {
        json_t *v = json_object_get(line, ev->values[k].tag);
        CHECK(v != NULL);
        if (!v) continue;
        if (isnan(ev->values[k].value)) {
            CHECK(json_is_null(v));
        } else {
            CHECK(json_is_real(v));
            CHECK((float)json_real_value(v) == ev->values[k].value);
        }
    }
    for (int k = 0; k < want->n; k++) {
        json_t *v = json_object_get(line, want->tags[k]);
        if (isnan(want->values[k]))
            CHECK(json_is_null(v));
        else
            CHECK(json_is_real(v) && json_real_value(v) == want->values[k]);
    }
}

static void test_roundtrip(void) {
    const char *dir = kd_test_tmpdir("test_metrics");
    char run_dir[KD_PATH_MAX], err[KD_ERR_LEN];
    snprintf(run_dir, sizeof run_dir, "%s/runs/r1", dir); /* open creates it */
    double t0 = kd_wall_time();
    kd_metrics_t *m = kd_metrics_open(run_dir, err, sizeof err);
    CHECK(m != NULL);
    if (!m) {
        fprintf(stderr, "kd_metrics_open: %s\n", err);
        return;
    }
    kd_model_t *model = t_model();
    CHECK(kd_metrics_graph(m, model, err, sizeof err) == 0);
    kd_model_destroy(&model);
    for (int s = 0; s < N_STEPS; s++) {
        if (s == 1) kd_metrics_scalar(m, "lr", 99.0); /* overwritten before the flush */
        for (int k = 0; k < STEPS[s].n; k++)
            kd_metrics_scalar(m, STEPS[s].tags[k], STEPS[s].values[k]);
        CHECK(kd_metrics_flush(m, STEPS[s].step, err, sizeof err) == 0);
        CHECK(kd_metrics_flush(m, STEPS[s].step + 1, err, sizeof err) == 0); /* nothing */
    }
    char events_path[KD_PATH_MAX], jsonl_path[KD_PATH_MAX];
    snprintf(events_path, sizeof events_path, "%s", kd_metrics_events_path(m));
    snprintf(jsonl_path, sizeof jsonl_path, "%s", kd_metrics_jsonl_path(m));
    kd_metrics_close(&m);
    CHECK(m == NULL);
    double t1 = kd_wall_time();

    /* The run dir holds exactly the two files, named as TensorBoard expects. */
    char host[256] = "";
    gethostname(host, sizeof host);
    DIR *d = opendir(run_dir);
    CHECK(d != NULL);
    int n_files = 0, n_events = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        n_files++;
        long long secs;
        int used = 0;
        if (sscanf(e->d_name, "events.out.tfevents.%lld.%n", &secs, &used) == 1 && used > 0) {
            n_events++;
            CHECK(strcmp(e->d_name + used, host) == 0);
            CHECK(secs >= (long long)t0 - 1 && secs <= (long long)t1 + 1);
        }
    }
    if (d) closedir(d);
    CHECK(n_files == 2 && n_events == 1);

    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK(kd_read_file(events_path, &buf, &len, err, sizeof err) == 0);
    if (!buf) return;
    t_rec_t recs[16];
    char why[128] = "";
    int n = t_read_records(buf, len, recs, 16, why, sizeof why);
    if (n < 0) fprintf(stderr, "reader: %s\n", why);
    CHECK(n == 2 + N_STEPS); /* file_version, graph, one summary per flush with values */

    json_error_t jerr;
    json_t *lines[N_STEPS] = {0};
    FILE *jf = fopen(jsonl_path, "r");
    CHECK(jf != NULL);
    int n_lines = 0;
    char line[4096];
    while (jf && fgets(line, sizeof line, jf)) {
        CHECK(strchr(line, '\n') != NULL); /* one object per line */
        if (n_lines < N_STEPS) lines[n_lines] = json_loads(line, 0, &jerr);
        n_lines++;
    }
    if (jf) fclose(jf);
    CHECK(n_lines == N_STEPS);

    for (int i = 0; i < n; i++) {
        t_event_t ev;
        CHECK(t_decode_event(&recs[i], &ev));
        CHECK(ev.wall_time >= t0 && ev.wall_time <= t1);
        if (i == 0) {
            CHECK(strcmp(ev.file_version, "brain.Event:2") == 0);
            CHECK(!ev.graph && !ev.has_summary);
        } else if (i == 1) {
            CHECK(ev.graph != NULL && ev.step == 0);
            if (ev.graph) check_graph(&ev);
        } else {
            int s = i - 2;
            const t_step_t *want = &STEPS[s];
            CHECK(ev.has_summary && ev.file_version[0] == '\0');
            CHECK(ev.step == want->step);
            CHECK(ev.n_values == want->n);
            for (int k = 0; k < ev.n_values && k < want->n; k++) {
                CHECK(strcmp(ev.values[k].tag, want->tags[k]) == 0);
                CHECK(ev.values[k].has_value);
                if (isnan(want->values[k]))
                    CHECK(isnan(ev.values[k].value));
                else
                    CHECK(ev.values[k].value == (float)want->values[k]);
            }
            if (s < n_lines) check_jsonl_line(lines[s], &ev, want);
        }
    }
    for (int s = 0; s < N_STEPS; s++) json_decref(lines[s]);

    /* The reader can fail: a flipped data byte, a flipped length byte, a cut-off tail. */
    if (n >= 3) {
        size_t data_byte = (size_t)(recs[2].data - buf) + recs[2].len / 2;
        size_t length_byte = (size_t)(recs[1].data - buf) - 12;
        t_rec_t scratch[16];
        uint8_t *bad = kd_xmalloc(len);
        memcpy(bad, buf, len);
        bad[data_byte] ^= 0x01;
        CHECK(t_read_records(bad, len, scratch, 16, why, sizeof why) == -1);
        CHECK_ERR_HAS(why, "data crc mismatch");
        memcpy(bad, buf, len);
        bad[length_byte] ^= 0x04;
        CHECK(t_read_records(bad, len, scratch, 16, why, sizeof why) == -1);
        CHECK_ERR_HAS(why, "length crc mismatch");
        CHECK(t_read_records(buf, len - 3, scratch, 16, why, sizeof why) == -1);
        CHECK_ERR_HAS(why, "truncated");
        free(bad);
    }
    free(buf);
}

/* A text summary as TensorBoard's text plugin reads it: Summary.Value{tag 1, metadata 9
 * {plugin_data 1 {plugin_name 1}}, tensor 8 {dtype 1 = DT_STRING 7, tensor_shape 2 (a scalar),
 * string_val 8}}, decoded here field by field; and the same text in metrics.jsonl. */
static void test_text(void) {
    const char *dir = kd_test_tmpdir("test_metrics_text");
    char run_dir[KD_PATH_MAX], err[KD_ERR_LEN];
    snprintf(run_dir, sizeof run_dir, "%s/runs/text", dir);
    kd_metrics_t *m = kd_metrics_open(run_dir, err, sizeof err);
    CHECK(m != NULL);
    if (!m) return;
    const char *text = "# In the beginning\nGod created *the heaven*\n";
    CHECK(kd_metrics_text(m, "samples/student", text, 42, err, sizeof err) == 0);
    CHECK(kd_metrics_text(m, "samples/student", "bad \xff byte", 43, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "metrics.jsonl");
    char events_path[KD_PATH_MAX], jsonl_path[KD_PATH_MAX];
    snprintf(events_path, sizeof events_path, "%s", kd_metrics_events_path(m));
    snprintf(jsonl_path, sizeof jsonl_path, "%s", kd_metrics_jsonl_path(m));
    kd_metrics_close(&m);

    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK(kd_read_file(events_path, &buf, &len, err, sizeof err) == 0);
    if (!buf) return;
    t_rec_t recs[4];
    char why[128] = "";
    /* file_version, the text, and the second (refused in JSON, but TensorBoard's copy went) */
    CHECK(t_read_records(buf, len, recs, 4, why, sizeof why) == 3);
    t_event_t ev;
    CHECK(t_decode_event(&recs[1], &ev) && ev.has_summary && ev.step == 42);
    /* the value, by hand */
    t_pb_t r = {recs[1].data, recs[1].data + recs[1].len};
    t_field_t f, sf, vf, tf;
    bool bad = false, found = false;
    while (t_next(&r, &f, &bad))
        if (f.field == 5 && f.wire == 2) {
            t_pb_t sr = {f.data, f.data + f.len};
            CHECK(t_next(&sr, &sf, &bad) && sf.field == 1 && sf.wire == 2);
            t_pb_t vr = {sf.data, sf.data + sf.len};
            char plugin[32] = "", tag[64] = "", value[256] = "";
            uint64_t dtype = 0;
            bool has_shape = false;
            int n_strings = 0;
            while (t_next(&vr, &vf, &bad)) {
                if (vf.field == 1 && vf.wire == 2) t_copy(tag, sizeof tag, &vf);
                if (vf.field == 9 && vf.wire == 2) {
                    t_pb_t mr = {vf.data, vf.data + vf.len};
                    t_field_t mf, pf;
                    while (t_next(&mr, &mf, &bad))
                        if (mf.field == 1 && mf.wire == 2) {
                            t_pb_t pr = {mf.data, mf.data + mf.len};
                            while (t_next(&pr, &pf, &bad))
                                if (pf.field == 1 && pf.wire == 2)
                                    t_copy(plugin, sizeof plugin, &pf);
                        }
                }
                if (vf.field == 8 && vf.wire == 2) {
                    t_pb_t tr = {vf.data, vf.data + vf.len};
                    while (t_next(&tr, &tf, &bad)) {
                        if (tf.field == 1 && tf.wire == 0) dtype = tf.u;
                        if (tf.field == 2 && tf.wire == 2) has_shape = true;
                        if (tf.field == 8 && tf.wire == 2)
                            t_copy(value, sizeof value, &tf), n_strings++;
                    }
                }
            }
            found = true;
            CHECK(strcmp(tag, "samples/student") == 0);
            CHECK(strcmp(plugin, "text") == 0);
            CHECK(dtype == 7 && has_shape && n_strings == 1);
            /* markdown: a preformatted block, every line indented by four spaces */
            CHECK(strcmp(value, "    # In the beginning\n    God created *the heaven*\n") == 0);
        }
    CHECK(found && !bad);
    free(buf);

    FILE *jf = fopen(jsonl_path, "r");
    char line[1024] = "";
    CHECK(jf && fgets(line, sizeof line, jf));
    if (jf) fclose(jf);
    json_t *j = json_loads(line, 0, NULL);
    CHECK(json_integer_value(json_object_get(j, "step")) == 42);
    CHECK(json_string_value(json_object_get(j, "samples/student")) &&
          strcmp(json_string_value(json_object_get(j, "samples/student")), text) == 0);
    json_decref(j);
}

static void test_open_errors(void) {
    const char *dir = kd_test_tmpdir("test_metrics_err");
    char path[KD_PATH_MAX], err[KD_ERR_LEN] = "";
    snprintf(path, sizeof path, "%s/not_a_dir", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) fclose(f);
    CHECK(kd_metrics_open(path, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "not_a_dir");
    kd_metrics_close(NULL);
}

int main(void) {
    test_crc_vector();
    test_roundtrip();
    test_text();
    test_open_errors();
    return kd_test_done("test_metrics");
}
