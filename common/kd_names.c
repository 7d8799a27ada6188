/* kd_names: the one place where enum values meet the words recipes and files use for them. */
#include <string.h>

#include "kd_cache.h"
#include "kd_loss.h"
#include "kd_model.h"
#include "kd_optim.h"
#include "kd_recipe.h"

static const char *const layer_kind_names[KD_LAYER_KIND_COUNT] = {
    "flatten", "linear", "conv2d", "maxpool2d", "relu", "gelu", "dropout"};
static const char *const divergence_names[KD_DIV_COUNT] = {"forward_kl", "reverse_kl",
                                                           "symmetric_kl", "js"};
static const char *const opt_kind_names[KD_OPT_COUNT] = {"sgd", "adamw"};
static const char *const sched_kind_names[KD_SCHED_COUNT] = {"constant", "step", "cosine",
                                                             "onecycle"};
static const char *const consistency_names[] = {"sync", "async", "ssp"};
static const char *const data_format_names[] = {"images", "text", "tokens"};
static const char *const wire_format_names[] = {"fp32", "bf16", "fp16"};
static const char *const encoding_names[KD_ENC_COUNT] = {"fp32", "fp16", "int8", "topk", "sampled"};

static const char *name_of(const char *const *names, int count, int value) {
    return (value >= 0 && value < count) ? names[value] : "?";
}

static int parse_name(const char *const *names, int count, const char *name, int *out) {
    for (int i = 0; i < count; i++) {
        if (strcmp(names[i], name) == 0) {
            *out = i;
            return 0;
        }
    }
    return -1;
}

#define NAME_TABLE(type, fn_name, fn_parse, table, count)                                          \
    const char *fn_name(type v) {                                                                  \
        return name_of(table, count, (int)v);                                                      \
    }                                                                                              \
    int fn_parse(const char *name, type *out) {                                                    \
        int v;                                                                                     \
        if (parse_name(table, count, name, &v) != 0) return -1;                                    \
        *out = (type)v;                                                                            \
        return 0;                                                                                  \
    }

NAME_TABLE(kd_layer_kind_t, kd_layer_kind_name, kd_layer_kind_parse, layer_kind_names,
           KD_LAYER_KIND_COUNT)
NAME_TABLE(kd_divergence_t, kd_divergence_name, kd_divergence_parse, divergence_names, KD_DIV_COUNT)
NAME_TABLE(kd_opt_kind_t, kd_opt_kind_name, kd_opt_kind_parse, opt_kind_names, KD_OPT_COUNT)
NAME_TABLE(kd_sched_kind_t, kd_sched_kind_name, kd_sched_kind_parse, sched_kind_names,
           KD_SCHED_COUNT)

NAME_TABLE(kd_consistency_t, kd_consistency_name, kd_consistency_parse, consistency_names, 3)
NAME_TABLE(kd_data_format_t, kd_data_format_name, kd_data_format_parse, data_format_names, 3)
NAME_TABLE(kd_wire_format_t, kd_wire_format_name, kd_wire_format_parse, wire_format_names, 3)
NAME_TABLE(kd_cache_encoding_t, kd_cache_encoding_name, kd_cache_encoding_from_name, encoding_names,
           KD_ENC_COUNT)
