/* kd_metrics: TensorBoard event file + metrics.jsonl for one run (see kd_metrics.h).
 * The event file is TensorFlow's record format: per record a little-endian uint64 length,
 * the masked CRC32C of those 8 bytes, the serialized Event, the masked CRC32C of it. */
#include "kd_metrics.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kd_util.h"
#include "tensorboard.pb-c.h"

#define KD_EVENT_FILE_VERSION "brain.Event:2"
/* GraphDef producer version, as PyTorch's SummaryWriter writes it. */
#define KD_GRAPH_PRODUCER 22

/* ---- CRC32C (Castagnoli), table-driven ---- */

static uint32_t crc32c_table[256];
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[n] = c;
    }
}

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) c = crc32c_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* TFRecord masks the CRC so that a CRC of data that itself holds CRCs stays well mixed. */
static uint32_t crc32c_masked(const uint8_t *p, size_t n) {
    uint32_t c = crc32c(p, n);
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* ---- the writer ---- */

typedef struct {
    char *tag;
    double value;
    bool set; /* given since the last flush */
} kd_metric_slot_t;

struct kd_metrics {
    char events_path[KD_PATH_MAX];
    char jsonl_path[KD_PATH_MAX];
    FILE *events;
    FILE *jsonl;
    /* Tags persist across flushes, so a steady set of tags allocates nothing per step. */
    kd_metric_slot_t *slots;
    int n_slots, cap_slots;
    Tensorboard__Summary__Value *values;      /* (cap_slots) */
    Tensorboard__Summary__Value **value_ptrs; /* (cap_slots) */
    uint8_t *buf;                             /* one framed record */
    size_t buf_cap;
};

/* Frames msg as one record and writes it with a single fwrite, then flushes. */
static int write_record(kd_metrics_t *m, const ProtobufCMessage *msg, char *err, size_t errlen) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    size_t total = 8 + 4 + n + 4;
    if (total > m->buf_cap) {
        size_t cap = m->buf_cap ? m->buf_cap : 256;
        while (cap < total) cap *= 2;
        free(m->buf);
        m->buf = kd_xmalloc(cap);
        m->buf_cap = cap;
    }
    uint8_t *p = m->buf;
    put_le64(p, (uint64_t)n);
    put_le32(p + 8, crc32c_masked(p, 8));
    size_t packed = protobuf_c_message_pack(msg, p + 12);
    KD_ASSERT(packed == n);
    put_le32(p + 12 + n, crc32c_masked(p + 12, n));
    if (fwrite(p, 1, total, m->events) != total || fflush(m->events) != 0)
        return kd_err(err, errlen, "%s: write failed: %s", m->events_path, strerror(errno));
    return 0;
}

kd_metrics_t *kd_metrics_open(const char *run_dir, char *err, size_t errlen) {
    pthread_once(&crc32c_once, crc32c_init);
    if (kd_mkdirs(run_dir, err, errlen) != 0) return NULL;

    char host[256];
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';

    kd_metrics_t *m = kd_xcalloc(1, sizeof *m);
    int n1 = snprintf(m->events_path, sizeof m->events_path, "%s/events.out.tfevents.%lld.%s",
                      run_dir, (long long)time(NULL), host);
    int n2 = snprintf(m->jsonl_path, sizeof m->jsonl_path, "%s/metrics.jsonl", run_dir);
    if (n1 < 0 || (size_t)n1 >= sizeof m->events_path || n2 < 0 ||
        (size_t)n2 >= sizeof m->jsonl_path) {
        kd_err(err, errlen, "%s: run directory path too long", run_dir);
        goto fail;
    }
    /* Appending: a resumed run in the same second continues the same files; the extra
     * file_version record is valid in the middle of an event file. */
    m->events = fopen(m->events_path, "ab");
    if (!m->events) {
        kd_err(err, errlen, "%s: cannot open: %s", m->events_path, strerror(errno));
        goto fail;
    }
    m->jsonl = fopen(m->jsonl_path, "a");
    if (!m->jsonl) {
        kd_err(err, errlen, "%s: cannot open: %s", m->jsonl_path, strerror(errno));
        goto fail;
    }
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = kd_wall_time();
    ev.what_case = TENSORBOARD__EVENT__WHAT_FILE_VERSION;
    ev.file_version = (char *)KD_EVENT_FILE_VERSION;
    if (write_record(m, &ev.base, err, errlen) != 0) goto fail;
    return m;

fail:
    kd_metrics_close(&m);
    return NULL;
}

void kd_metrics_scalar(kd_metrics_t *m, const char *tag, double value) {
    KD_ASSERT(m && tag && *tag);
    KD_ASSERT(strcmp(tag, "step") != 0 && strcmp(tag, "wall_time") != 0);
    for (int i = 0; i < m->n_slots; i++) {
        if (strcmp(m->slots[i].tag, tag) == 0) {
            m->slots[i].value = value;
            m->slots[i].set = true;
            return;
        }
    }
    if (m->n_slots == m->cap_slots) {
        int cap = m->cap_slots ? 2 * m->cap_slots : 32;
        kd_metric_slot_t *slots = kd_xcalloc((size_t)cap, sizeof *slots);
        if (m->n_slots) memcpy(slots, m->slots, (size_t)m->n_slots * sizeof *slots);
        free(m->slots);
        m->slots = slots;
        free(m->values);
        free(m->value_ptrs);
        m->values = kd_xcalloc((size_t)cap, sizeof *m->values);
        m->value_ptrs = kd_xcalloc((size_t)cap, sizeof *m->value_ptrs);
        m->cap_slots = cap;
    }
    m->slots[m->n_slots++] = (kd_metric_slot_t){kd_xstrdup(tag), value, true};
}

json_t *kd_json_number(double v) {
    return isfinite(v) ? json_real(v) : json_null();
}

void kd_json_set_lm_eval(json_t *j, const char *split, double perplexity, double bits_per_byte) {
    char key[64];
    snprintf(key, sizeof key, "%s_perplexity", split);
    json_object_set_new(j, key, kd_json_number(perplexity));
    snprintf(key, sizeof key, "%s_bits_per_byte", split);
    json_object_set_new(j, key, kd_json_number(bits_per_byte));
}

/* One object as one line of metrics.jsonl, flushed; takes the reference. */
static int write_jsonl_line(kd_metrics_t *m, json_t *line, char *err, size_t errlen) {
    int rc = json_dumpf(line, m->jsonl, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(line);
    if (rc != 0 || fputc('\n', m->jsonl) == EOF || fflush(m->jsonl) != 0)
        return kd_err(err, errlen, "%s: write failed: %s", m->jsonl_path, strerror(errno));
    return 0;
}

static int write_jsonl(kd_metrics_t *m, long step, double wall_time, char *err, size_t errlen) {
    json_t *line = json_object();
    json_object_set_new(line, "step", json_integer(step));
    json_object_set_new(line, "wall_time", json_real(wall_time));
    for (int i = 0; i < m->n_slots; i++) {
        const kd_metric_slot_t *s = &m->slots[i];
        if (!s->set) continue;
        json_t *v = kd_json_number(s->value);
        if (json_object_set_new(line, s->tag, v) != 0) {
            json_decref(line);
            return kd_err(err, errlen, "%s: tag \"%s\" is not valid UTF-8", m->jsonl_path, s->tag);
        }
    }
    return write_jsonl_line(m, line, err, errlen);
}

int kd_metrics_flush(kd_metrics_t *m, long step, char *err, size_t errlen) {
    KD_ASSERT(m);
    size_t n = 0;
    for (int i = 0; i < m->n_slots; i++) {
        const kd_metric_slot_t *s = &m->slots[i];
        if (!s->set) continue;
        Tensorboard__Summary__Value *v = &m->values[n];
        tensorboard__summary__value__init(v);
        v->tag = s->tag;
        v->value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_SIMPLE_VALUE;
        v->simple_value = (float)s->value;
        m->value_ptrs[n++] = v;
    }
    if (n == 0) return 0;

    double wall_time = kd_wall_time();
    Tensorboard__Summary summary = TENSORBOARD__SUMMARY__INIT;
    summary.n_value = n;
    summary.value = m->value_ptrs;
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = wall_time;
    ev.step = step;
    ev.what_case = TENSORBOARD__EVENT__WHAT_SUMMARY;
    ev.summary = &summary;
    int rc = write_record(m, &ev.base, err, errlen);
    if (rc == 0) rc = write_jsonl(m, step, wall_time, err, errlen);
    for (int i = 0; i < m->n_slots; i++) m->slots[i].set = false;
    return rc;
}

int kd_metrics_text(kd_metrics_t *m, const char *tag, const char *text, long step, char *err,
                    size_t errlen) {
    KD_ASSERT(m && tag && text);
    /* markdown: a preformatted block, so the text shows as it is (line breaks, #, *, ...) */
    size_t lines = 1;
    for (const char *p = text; *p; p++) lines += *p == '\n';
    char *block = kd_xmalloc(strlen(text) + 4 * lines + 1), *out = block;
    for (const char *p = text; *p; p++) {
        if (p == text || p[-1] == '\n') memcpy(out, "    ", 4), out += 4;
        *out++ = *p;
    }
    *out = '\0';

    Tensorboard__SummaryMetadata__PluginData plugin =
        TENSORBOARD__SUMMARY_METADATA__PLUGIN_DATA__INIT;
    plugin.plugin_name = (char *)"text";
    Tensorboard__SummaryMetadata meta = TENSORBOARD__SUMMARY_METADATA__INIT;
    meta.plugin_data = &plugin;
    Tensorboard__TensorShapeProto scalar = TENSORBOARD__TENSOR_SHAPE_PROTO__INIT;
    ProtobufCBinaryData string_val = {strlen(block), (uint8_t *)block};
    Tensorboard__TensorProto tensor = TENSORBOARD__TENSOR_PROTO__INIT;
    tensor.dtype = TENSORBOARD__DATA_TYPE__DT_STRING;
    tensor.tensor_shape = &scalar;
    tensor.n_string_val = 1;
    tensor.string_val = &string_val;
    Tensorboard__Summary__Value value = TENSORBOARD__SUMMARY__VALUE__INIT;
    value.tag = (char *)tag;
    value.metadata = &meta;
    value.value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_TENSOR;
    value.tensor = &tensor;
    Tensorboard__Summary__Value *values = &value;
    Tensorboard__Summary summary = TENSORBOARD__SUMMARY__INIT;
    summary.n_value = 1;
    summary.value = &values;
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = kd_wall_time();
    ev.step = step;
    ev.what_case = TENSORBOARD__EVENT__WHAT_SUMMARY;
    ev.summary = &summary;
    int rc = write_record(m, &ev.base, err, errlen);
    free(block);
    if (rc != 0) return rc;

    json_t *line = json_object();
    json_object_set_new(line, "step", json_integer(step));
    json_object_set_new(line, "wall_time", json_real(ev.wall_time));
    if (json_object_set_new(line, tag, json_string(text)) != 0) {
        json_decref(line);
        return kd_err(err, errlen, "%s: text \"%s\" is not valid UTF-8", m->jsonl_path, tag);
    }
    return write_jsonl_line(m, line, err, errlen);
}

/* ---- the student's GraphDef ---- */

#define GN_MAX_ATTRS  8
#define GN_MAX_INPUTS 3
#define GN_NAME_LEN   48

/* One NodeDef with all the storage it points into; lives in an array that never moves. */
typedef struct {
    Tensorboard__NodeDef node;
    char name[GN_NAME_LEN];
    char input_names[GN_MAX_INPUTS][GN_NAME_LEN];
    char *inputs[GN_MAX_INPUTS];
    Tensorboard__NodeDef__AttrEntry entries[GN_MAX_ATTRS];
    Tensorboard__NodeDef__AttrEntry *entry_ptrs[GN_MAX_ATTRS];
    Tensorboard__AttrValue values[GN_MAX_ATTRS];
    Tensorboard__AttrValue__ListValue shapes;
    Tensorboard__TensorShapeProto shape;
    Tensorboard__TensorShapeProto *shape_ptr;
    Tensorboard__TensorShapeProto__Dim dims[5];
    Tensorboard__TensorShapeProto__Dim *dim_ptrs[5];
    char desc[160]; /* the "attr" summary string PyTorch's graph writer shows */
} kd_gnode_t;

static void gn_init(kd_gnode_t *g, const char *op, const char *name) {
    tensorboard__node_def__init(&g->node);
    snprintf(g->name, sizeof g->name, "%s", name);
    g->node.name = g->name;
    g->node.op = (char *)op;
    g->node.input = g->inputs;
    g->node.attr = g->entry_ptrs;
}

static void gn_input(kd_gnode_t *g, const char *name) {
    KD_ASSERT(g->node.n_input < GN_MAX_INPUTS);
    char *dst = g->input_names[g->node.n_input];
    snprintf(dst, GN_NAME_LEN, "%s", name);
    g->inputs[g->node.n_input++] = dst;
}

static Tensorboard__AttrValue *gn_attr(kd_gnode_t *g, const char *key) {
    size_t i = g->node.n_attr++;
    KD_ASSERT(i < GN_MAX_ATTRS);
    tensorboard__node_def__attr_entry__init(&g->entries[i]);
    tensorboard__attr_value__init(&g->values[i]);
    g->entries[i].key = (char *)key;
    g->entries[i].value = &g->values[i];
    g->entry_ptrs[i] = &g->entries[i];
    return &g->values[i];
}

static void gn_attr_i(kd_gnode_t *g, const char *key, int64_t v) {
    Tensorboard__AttrValue *a = gn_attr(g, key);
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_I;
    a->i = v;
}

static void gn_attr_f(kd_gnode_t *g, const char *key, float v) {
    Tensorboard__AttrValue *a = gn_attr(g, key);
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_F;
    a->f = v;
}

static void gn_attr_float_dtype(kd_gnode_t *g) {
    Tensorboard__AttrValue *a = gn_attr(g, "dtype");
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_TYPE;
    a->type = TENSORBOARD__DATA_TYPE__DT_FLOAT;
}

/* The "attr" string (bytes) with g->desc, e.g. "{ in_features : 784, out_features : 10 }". */
static void gn_attr_desc(kd_gnode_t *g) {
    Tensorboard__AttrValue *a = gn_attr(g, "attr");
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_S;
    a->s.data = (uint8_t *)g->desc;
    a->s.len = strlen(g->desc);
}

/* Sets the node's shape and its "_output_shapes" (TensorBoard labels edges with it). */
static void gn_shape(kd_gnode_t *g, const int64_t *dims, int ndim) {
    KD_ASSERT(ndim <= 5);
    tensorboard__tensor_shape_proto__init(&g->shape);
    for (int d = 0; d < ndim; d++) {
        tensorboard__tensor_shape_proto__dim__init(&g->dims[d]);
        g->dims[d].size = dims[d];
        g->dim_ptrs[d] = &g->dims[d];
    }
    g->shape.n_dim = (size_t)ndim;
    g->shape.dim = g->dim_ptrs;
    g->shape_ptr = &g->shape;
    tensorboard__attr_value__list_value__init(&g->shapes);
    g->shapes.n_shape = 1;
    g->shapes.shape = &g->shape_ptr;
    Tensorboard__AttrValue *a = gn_attr(g, "_output_shapes");
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_LIST;
    a->list = &g->shapes;
}

/* The "shape" attr of a Placeholder/VariableV2; call after gn_shape. */
static void gn_attr_shape(kd_gnode_t *g) {
    Tensorboard__AttrValue *a = gn_attr(g, "shape");
    a->value_case = TENSORBOARD__ATTR_VALUE__VALUE_SHAPE;
    a->shape = &g->shape;
}

static const char *layer_op(kd_layer_kind_t kind) {
    switch (kind) {
    case KD_LAYER_FLATTEN:
        return "Flatten";
    case KD_LAYER_LINEAR:
        return "Linear";
    case KD_LAYER_CONV2D:
        return "Conv2d";
    case KD_LAYER_MAXPOOL2D:
        return "MaxPool2d";
    case KD_LAYER_RELU:
        return "ReLU";
    case KD_LAYER_GELU:
        return "GELU";
    case KD_LAYER_DROPOUT:
        return "Dropout";
    default:
        KD_ASSERT(!"unknown layer kind");
        return "";
    }
}

/* Output shape with the batch dimension unknown: (-1, C) when flat, else (-1, C, H, W). */
static int batch_shape(kd_shape_t s, bool spatial, int64_t *dims) {
    dims[0] = -1;
    dims[1] = s.c;
    if (!spatial) return 2;
    dims[2] = s.h;
    dims[3] = s.w;
    return 4;
}

static void add_layer_attrs(kd_gnode_t *g, const kd_layer_t *l) {
    const kd_layer_spec_t *s = &l->spec;
    switch (s->kind) {
    case KD_LAYER_LINEAR:
        gn_attr_i(g, "in_features", (int64_t)kd_shape_size(l->in));
        gn_attr_i(g, "out_features", s->out_features);
        snprintf(g->desc, sizeof g->desc, "{ in_features : %zu, out_features : %d }",
                 kd_shape_size(l->in), s->out_features);
        break;
    case KD_LAYER_CONV2D:
        gn_attr_i(g, "in_channels", l->in.c);
        gn_attr_i(g, "out_channels", s->out_channels);
        gn_attr_i(g, "kernel_size", s->kernel);
        gn_attr_i(g, "stride", s->stride);
        gn_attr_i(g, "padding", s->padding);
        snprintf(g->desc, sizeof g->desc,
                 "{ in_channels : %d, out_channels : %d, kernel_size : %d, stride : %d, "
                 "padding : %d }",
                 l->in.c, s->out_channels, s->kernel, s->stride, s->padding);
        break;
    case KD_LAYER_MAXPOOL2D:
        gn_attr_i(g, "kernel_size", s->kernel);
        gn_attr_i(g, "stride", s->stride);
        snprintf(g->desc, sizeof g->desc, "{ kernel_size : %d, stride : %d }", s->kernel,
                 s->stride);
        break;
    case KD_LAYER_DROPOUT:
        gn_attr_f(g, "p", s->p);
        snprintf(g->desc, sizeof g->desc, "{ p : %g }", (double)s->p);
        break;
    case KD_LAYER_FLATTEN:
        gn_attr_i(g, "start_dim", 1);
        snprintf(g->desc, sizeof g->desc, "{ start_dim : 1 }");
        break;
    default:
        snprintf(g->desc, sizeof g->desc, "{}");
        break;
    }
    gn_attr_desc(g);
}

/* A parameter node "layers.<i>.<what>" of the given PyTorch shape; returns its name. */
static const char *add_param(kd_gnode_t *g, int layer, const char *what, const int64_t *dims,
                             int ndim) {
    char name[GN_NAME_LEN];
    snprintf(name, sizeof name, "layers.%d.%s", layer, what);
    gn_init(g, "VariableV2", name);
    gn_attr_float_dtype(g);
    gn_shape(g, dims, ndim);
    gn_attr_shape(g);
    return g->name;
}

int kd_metrics_graph(kd_metrics_t *m, const kd_model_t *model, char *err, size_t errlen) {
    KD_ASSERT(m && model && model->n_layers <= KD_MAX_LAYERS);
    size_t cap = 2 + 3 * (size_t)model->n_layers;
    kd_gnode_t *g = kd_xcalloc(cap, sizeof *g);
    Tensorboard__NodeDef **nodes = kd_xcalloc(cap, sizeof *nodes);
    size_t n = 0;
    int64_t dims[5];

    bool spatial = !(model->input.h == 1 && model->input.w == 1);
    kd_gnode_t *in = &g[n++];
    gn_init(in, "Placeholder", "input");
    gn_attr_float_dtype(in);
    gn_shape(in, dims, batch_shape(model->input, spatial, dims));
    gn_attr_shape(in);
    const char *prev = in->name;

    for (int i = 0; i < model->n_layers; i++) {
        const kd_layer_t *l = &model->layers[i];
        const char *weight = NULL, *bias = NULL;
        if (l->weight_count)
            weight = add_param(&g[n++], i, "weight", l->weight_shape, l->weight_ndim);
        if (l->bias_count) {
            int64_t bdim = (int64_t)l->bias_count;
            bias = add_param(&g[n++], i, "bias", &bdim, 1);
        }
        switch (l->spec.kind) {
        case KD_LAYER_FLATTEN:
        case KD_LAYER_LINEAR:
            spatial = false;
            break;
        case KD_LAYER_CONV2D:
        case KD_LAYER_MAXPOOL2D:
            spatial = true;
            break;
        default:
            break;
        }
        char name[GN_NAME_LEN];
        snprintf(name, sizeof name, "layers.%d", i);
        kd_gnode_t *node = &g[n++];
        gn_init(node, layer_op(l->spec.kind), name);
        gn_input(node, prev);
        if (weight) gn_input(node, weight);
        if (bias) gn_input(node, bias);
        add_layer_attrs(node, l);
        gn_shape(node, dims, batch_shape(l->out, spatial, dims));
        prev = node->name;
    }

    kd_gnode_t *out = &g[n++];
    gn_init(out, "Identity", "output");
    gn_input(out, prev);
    gn_shape(out, dims, batch_shape((kd_shape_t){model->num_classes, 1, 1}, false, dims));
    KD_ASSERT(n <= cap);
    for (size_t k = 0; k < n; k++) nodes[k] = &g[k].node;

    Tensorboard__VersionDef versions = TENSORBOARD__VERSION_DEF__INIT;
    versions.producer = KD_GRAPH_PRODUCER;
    Tensorboard__GraphDef graph = TENSORBOARD__GRAPH_DEF__INIT;
    graph.n_node = n;
    graph.node = nodes;
    graph.versions = &versions;
    size_t len = tensorboard__graph_def__get_packed_size(&graph);
    uint8_t *bytes = kd_xmalloc(len ? len : 1);
    tensorboard__graph_def__pack(&graph, bytes);

    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = kd_wall_time();
    ev.what_case = TENSORBOARD__EVENT__WHAT_GRAPH_DEF;
    ev.graph_def.data = bytes;
    ev.graph_def.len = len;
    int rc = write_record(m, &ev.base, err, errlen);
    free(bytes);
    free(nodes);
    free(g);
    return rc;
}

const char *kd_metrics_events_path(const kd_metrics_t *m) {
    return m->events_path;
}

const char *kd_metrics_jsonl_path(const kd_metrics_t *m) {
    return m->jsonl_path;
}

void kd_metrics_close(kd_metrics_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_metrics_t *m = *self_p;
    if (m->events) fclose(m->events);
    if (m->jsonl) fclose(m->jsonl);
    for (int i = 0; i < m->n_slots; i++) free(m->slots[i].tag);
    free(m->slots);
    free(m->values);
    free(m->value_ptrs);
    free(m->buf);
    free(m);
    *self_p = NULL;
}
