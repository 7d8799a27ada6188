/* kdist inventory check|plan: the deployment inventory of deploy/kdist-cluster (YAML: ssh
 * settings, hosts with their paths, roles, what to ship), parsed with libyaml and validated
 * here so the bash script never parses YAML. `plan` prints the inventory (and, given a recipe,
 * what the run needs on each host) as a line format: one record per line, fields separated by
 * one space, no field holds whitespace, "-" means unset. Not thread-safe (one call at a time). */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

#include "kd_cli.h"
#include "kd_recipe.h"
#include "kd_util.h"

#define INV_MAX_HOSTS         256
#define INV_MAX_TEACHERS      64   /* cluster.teachers' bound */
#define INV_MAX_WORKERS       1024 /* cluster.workers' bound */
#define INV_MAX_OVERRIDES     64
#define INV_NAME_MAX          64
#define INV_ADDR_MAX          256
#define INV_WORD_MAX          64
#define INV_PLAN_FORMAT       1
#define INV_DEFAULT_PORT      22
#define INV_DEFAULT_CONNECT_S 10
#define INV_DEFAULT_RESTARTS  3

/* One host: where to reach it and where kdist lives there. */
typedef struct {
    char name[INV_NAME_MAX];
    char address[INV_ADDR_MAX]; /* hostname, IPv4 or IPv6; default: the name */
    char user[INV_WORD_MAX];    /* ssh user; empty = ssh's default */
    long port;                  /* ssh port */
    char install_dir[KD_PATH_MAX], run_dir[KD_PATH_MAX], data_dir[KD_PATH_MAX];
    char supervisor[16]; /* auto | systemd | pidfile */
    long max_restarts;   /* restarts of a crashed role before giving up */
    yaml_mark_t mark;    /* where the host is defined, for messages */
} cli_inv_host_t;

/* A role bound to a host: the coordinator and each teacher listen on a port. */
typedef struct {
    int host; /* index into hosts */
    long port;
} cli_inv_listen_t;

typedef struct {
    int host;
    long count;   /* workers started there by `up` */
    long threads; /* kdist-worker --threads (0 = the library default) */
} cli_inv_workers_t;

typedef struct {
    char path[KD_PATH_MAX]; /* the inventory file */
    struct {
        char user[INV_WORD_MAX];
        long port;
        char identity[KD_PATH_MAX];    /* resolved local path, or empty */
        char known_hosts[KD_PATH_MAX]; /* resolved local path, or empty */
        char strict[16];               /* StrictHostKeyChecking: yes | accept-new | no */
        long connect_timeout;          /* seconds */
    } ssh;
    cli_inv_host_t defaults; /* what a host gets for the keys it leaves out */
    int n_hosts;
    cli_inv_host_t hosts[INV_MAX_HOSTS];
    cli_inv_listen_t coordinator;
    int n_teachers;
    cli_inv_listen_t teachers[INV_MAX_TEACHERS];
    int n_worker_groups;
    cli_inv_workers_t workers[INV_MAX_HOSTS];
    long total_workers;
    char recipe[KD_PATH_MAX];             /* resolved local path, or empty */
    char teacher_checkpoint[KD_PATH_MAX]; /* resolved local path, or empty */
    struct {
        bool binaries, data, teacher_checkpoint;
    } ship;
} cli_inventory_t;

/* ---- errors with the file, line and column (kd_loc_err) ---------------------------------- */

typedef struct {
    const char *file;
    const char *text;
    size_t len;
    yaml_document_t *doc;
    cli_inventory_t *inv;
    char *err;
    size_t errlen;
} inv_ctx_t;

static int inv_err(inv_ctx_t *c, yaml_mark_t m, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int inv_err(inv_ctx_t *c, yaml_mark_t m, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = kd_loc_verr(c->err, c->errlen, c->file, c->text, c->len, m.line, m.column, fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- YAML nodes ---------------------------------------------------------------------------- */

static yaml_node_t *inv_node(inv_ctx_t *c, int id) {
    return yaml_document_get_node(c->doc, id);
}

static const char *inv_kind(const yaml_node_t *n) {
    return n->type == YAML_MAPPING_NODE    ? "a mapping"
           : n->type == YAML_SEQUENCE_NODE ? "a list"
                                           : "a single value";
}

static const char *inv_text(const yaml_node_t *n) {
    return (const char *)n->data.scalar.value;
}

static int inv_expect(inv_ctx_t *c, yaml_node_t *n, yaml_node_type_t type, const char *label) {
    if (n->type == type) return 0;
    const char *want = type == YAML_MAPPING_NODE    ? "a mapping (key: value lines)"
                       : type == YAML_SEQUENCE_NODE ? "a list (- items)"
                                                    : "a single value";
    return inv_err(c, n->start_mark, "%s must be %s, got %s", label, want, inv_kind(n));
}

/* The key of a mapping pair: a scalar, given once in its mapping. NULL with the error set. */
static const char *inv_key(inv_ctx_t *c, yaml_node_t *map, yaml_node_pair_t *pair,
                           const char *where) {
    yaml_node_t *k = inv_node(c, pair->key);
    if (k->type != YAML_SCALAR_NODE) {
        inv_err(c, k->start_mark, "%s: keys must be plain words, got %s", where, inv_kind(k));
        return NULL;
    }
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < pair; q++) {
        yaml_node_t *qk = inv_node(c, q->key);
        if (qk->type == YAML_SCALAR_NODE && strcmp(inv_text(qk), inv_text(k)) == 0) {
            inv_err(c, k->start_mark, "%s: '%s' is given twice (first at line %zu)", where,
                    inv_text(k), (size_t)qk->start_mark.line + 1);
            return NULL;
        }
    }
    return inv_text(k);
}

/* ---- typed fields, one table per mapping ---------------------------------------------------- */

typedef enum {
    V_NAME,   /* [A-Za-z0-9_.-]+ */
    V_ADDR,   /* a hostname or an IP address */
    V_USER,   /* a login name */
    V_PATH,   /* a path without whitespace */
    V_LOCAL,  /* a local path, resolved against the inventory's directory */
    V_LONG,   /* a whole number within [min, max] */
    V_BOOL,   /* true | false */
    V_CHOICE, /* one of choices */
} inv_vkind_t;

typedef struct {
    const char *key;
    inv_vkind_t kind;
    size_t off, size; /* where in the struct; size of a string field */
    long min, max;
    const char *const *choices; /* NULL-terminated, for V_CHOICE */
} inv_field_t;

static const char *const strict_choices[] = {"accept-new", "yes", "no", NULL};
static const char *const supervisor_choices[] = {"auto", "systemd", "pidfile", NULL};

#define SSH_FIELD(k, kind, m, lo, hi, ch)                                                          \
    { k, kind, offsetof(cli_inventory_t, ssh.m), sizeof(((cli_inventory_t *)0)->ssh.m), lo, hi, ch }
static const inv_field_t ssh_fields[] = {
    SSH_FIELD("user", V_USER, user, 0, 0, NULL),
    SSH_FIELD("port", V_LONG, port, 1, 65535, NULL),
    SSH_FIELD("identity", V_LOCAL, identity, 0, 0, NULL),
    SSH_FIELD("known_hosts", V_LOCAL, known_hosts, 0, 0, NULL),
    SSH_FIELD("strict_host_key_checking", V_CHOICE, strict, 0, 0, strict_choices),
    SSH_FIELD("connect_timeout", V_LONG, connect_timeout, 1, 3600, NULL),
};

#define HOST_FIELD(k, kind, m, lo, hi, ch)                                                         \
    { k, kind, offsetof(cli_inv_host_t, m), sizeof(((cli_inv_host_t *)0)->m), lo, hi, ch }
/* The first four only in a host entry; the rest also under `defaults`. */
static const inv_field_t host_fields[] = {
    HOST_FIELD("name", V_NAME, name, 0, 0, NULL),
    HOST_FIELD("address", V_ADDR, address, 0, 0, NULL),
    HOST_FIELD("user", V_USER, user, 0, 0, NULL),
    HOST_FIELD("port", V_LONG, port, 1, 65535, NULL),
    HOST_FIELD("install_dir", V_PATH, install_dir, 0, 0, NULL),
    HOST_FIELD("run_dir", V_PATH, run_dir, 0, 0, NULL),
    HOST_FIELD("data_dir", V_PATH, data_dir, 0, 0, NULL),
    HOST_FIELD("supervisor", V_CHOICE, supervisor, 0, 0, supervisor_choices),
    HOST_FIELD("max_restarts", V_LONG, max_restarts, 0, 100, NULL),
};
#define HOST_ONLY_FIELDS 4

#define LISTEN_FIELD(k, kind, m, lo, hi)                                                           \
    { k, kind, offsetof(cli_inv_listen_t, m), sizeof(((cli_inv_listen_t *)0)->m), lo, hi, NULL }
static const inv_field_t listen_fields[] = {
    {"host", V_NAME, 0, 0, 0, 0, NULL}, /* resolved to an index by the caller */
    LISTEN_FIELD("port", V_LONG, port, 1, 65535),
};

#define WORKERS_FIELD(k, kind, m, lo, hi)                                                          \
    { k, kind, offsetof(cli_inv_workers_t, m), sizeof(((cli_inv_workers_t *)0)->m), lo, hi, NULL }
static const inv_field_t workers_fields[] = {
    {"host", V_NAME, 0, 0, 0, 0, NULL},
    WORKERS_FIELD("count", V_LONG, count, 0, INV_MAX_WORKERS),
    WORKERS_FIELD("threads", V_LONG, threads, 0, 1024),
};

#define SHIP_FIELD(k, m)                                                                           \
    { k, V_BOOL, offsetof(cli_inventory_t, ship.m), sizeof(bool), 0, 0, NULL }
static const inv_field_t ship_fields[] = {
    SHIP_FIELD("binaries", binaries),
    SHIP_FIELD("data", data),
    SHIP_FIELD("teacher_checkpoint", teacher_checkpoint),
};

#define TOP_FIELD(k, m)                                                                            \
    { k, V_LOCAL, offsetof(cli_inventory_t, m), sizeof(((cli_inventory_t *)0)->m), 0, 0, NULL }
static const inv_field_t top_fields[] = {
    TOP_FIELD("recipe", recipe),
    TOP_FIELD("teacher_checkpoint", teacher_checkpoint),
};

static const char *const top_keys[] = {"ssh",    "defaults",          "hosts", "roles", "ship",
                                       "recipe", "teacher_checkpoint"};
static const char *const role_keys[] = {"coordinator", "teachers", "workers"};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static bool inv_name_ok(const char *s) {
    if (!*s) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("_.-", *s)) return false;
    return true;
}

static bool inv_has_space(const char *s) {
    for (; *s; s++)
        if (isspace((unsigned char)*s) || iscntrl((unsigned char)*s)) return true;
    return false;
}

/* A local path: "~/x" is under $HOME, a relative one under the inventory's directory. */
static int inv_local_path(inv_ctx_t *c, const char *v, char *out, size_t outlen) {
    int n;
    const char *home = getenv("HOME");
    if (strncmp(v, "~/", 2) == 0 && home)
        n = snprintf(out, outlen, "%s/%s", home, v + 2);
    else if (v[0] == '/')
        n = snprintf(out, outlen, "%s", v);
    else {
        const char *slash = strrchr(c->inv->path, '/');
        if (slash)
            n = snprintf(out, outlen, "%.*s/%s", (int)(slash - c->inv->path), c->inv->path, v);
        else
            n = snprintf(out, outlen, "%s", v);
    }
    return n >= 0 && (size_t)n < outlen ? 0 : -1;
}

static void inv_choices_text(const char *const *ch, char *out, size_t outlen) {
    size_t used = 0;
    out[0] = 0;
    for (int i = 0; ch[i] && used < outlen; i++)
        used += (size_t)snprintf(out + used, outlen - used, "%s%s", i ? ", " : "", ch[i]);
}

/* One scalar onto its field; label names the key in messages ("hosts[1].port"). */
static int inv_set(inv_ctx_t *c, const inv_field_t *f, void *base, const char *label,
                   yaml_node_t *v) {
    if (v->type != YAML_SCALAR_NODE)
        return inv_err(c, v->start_mark, "%s must be a single value, got %s", label, inv_kind(v));
    const char *t = inv_text(v);
    char *dst = (char *)base + f->off;
    switch (f->kind) {
    case V_LONG: {
        long n;
        if (kd_parse_long(t, &n) != 0)
            return inv_err(c, v->start_mark, "%s must be a whole number, got '%s'", label, t);
        if (n < f->min || n > f->max)
            return inv_err(c, v->start_mark, "%s must be between %ld and %ld, got %ld", label,
                           f->min, f->max, n);
        *(long *)(void *)dst = n;
        return 0;
    }
    case V_BOOL:
        if (strcmp(t, "true") == 0 || strcmp(t, "false") == 0) {
            *(bool *)(void *)dst = t[0] == 't';
            return 0;
        }
        return inv_err(c, v->start_mark, "%s must be true or false, got '%s'", label, t);
    case V_CHOICE:
        for (int i = 0; f->choices[i]; i++)
            if (strcmp(t, f->choices[i]) == 0) {
                snprintf(dst, f->size, "%s", t);
                return 0;
            }
        {
            char all[128], dym[96];
            int n = 0;
            while (f->choices[n]) n++;
            inv_choices_text(f->choices, all, sizeof all);
            kd_did_you_mean(t, f->choices, n, dym, sizeof dym);
            return inv_err(c, v->start_mark, "%s must be one of %s, got '%s'%s", label, all, t,
                           dym);
        }
    default:
        break;
    }
    /* strings */
    if (!*t) return inv_err(c, v->start_mark, "%s is empty", label);
    if (inv_has_space(t))
        return inv_err(c, v->start_mark,
                       "%s must not contain spaces or control characters (kdist-cluster passes it "
                       "on command lines), got '%s'",
                       label, t);
    if (f->kind == V_NAME && !inv_name_ok(t))
        return inv_err(c, v->start_mark,
                       "%s may only hold letters, digits, '_', '.' and '-', got '%s'", label, t);
    if ((f->kind == V_ADDR || f->kind == V_USER) && (t[0] == '-' || strpbrk(t, "@/'\"\\$`;")))
        return inv_err(c, v->start_mark, "%s is not a valid %s: '%s'", label,
                       f->kind == V_ADDR ? "host address" : "user name", t);
    if (f->kind == V_PATH && t[0] == '~')
        return inv_err(c, v->start_mark,
                       "%s: write '%s' without '~' (relative paths are relative to the ssh user's "
                       "home on that host)",
                       label, t);
    if (f->kind == V_LOCAL) {
        if (inv_local_path(c, t, dst, f->size) != 0)
            return inv_err(c, v->start_mark, "%s is too long", label);
        return 0;
    }
    if (strlen(t) >= f->size)
        return inv_err(c, v->start_mark, "%s is too long (%zu bytes at most)", label, f->size - 1);
    snprintf(dst, f->size, "%s", t);
    return 0;
}

static const inv_field_t *inv_find_field(const inv_field_t *fields, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (strcmp(fields[i].key, key) == 0) return &fields[i];
    return NULL;
}

static int inv_unknown_key(inv_ctx_t *c, yaml_node_pair_t *p, const char *where, const char *key,
                           const char *const *names, int n) {
    char dym[96], all[512];
    size_t used = 0;
    all[0] = 0;
    for (int i = 0; i < n && used < sizeof all; i++)
        used += (size_t)snprintf(all + used, sizeof all - used, "%s%s", i ? ", " : "", names[i]);
    kd_did_you_mean(key, names, n, dym, sizeof dym);
    return inv_err(c, inv_node(c, p->key)->start_mark, "unknown key '%s' in %s%s (valid keys: %s)",
                   key, where, dym, all);
}

/* Every pair of map onto fields[0..n); unknown keys are errors. *seen (may be NULL) gets a bit
 * per field given, in table order. "host" keys (roles) are left to the caller via host_out. */
static int inv_fields(inv_ctx_t *c, yaml_node_t *map, const char *where, const inv_field_t *fields,
                      int n, void *base, unsigned *seen, yaml_node_t **host_out) {
    if (inv_expect(c, map, YAML_MAPPING_NODE, where) != 0) return -1;
    const char *names[16];
    for (int i = 0; i < n; i++) names[i] = fields[i].key;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        const char *key = inv_key(c, map, p, where);
        if (!key) return -1;
        const inv_field_t *f = inv_find_field(fields, n, key);
        if (!f) return inv_unknown_key(c, p, where, key, names, n);
        char label[160];
        snprintf(label, sizeof label, "%s.%s", where, key);
        yaml_node_t *v = inv_node(c, p->value);
        if (strcmp(key, "host") == 0 && host_out) {
            if (v->type != YAML_SCALAR_NODE)
                return inv_err(c, v->start_mark, "%s must be a host name, got %s", label,
                               inv_kind(v));
            *host_out = v;
        } else if (inv_set(c, f, base, label, v) != 0) {
            return -1;
        }
        if (seen) *seen |= 1u << (f - fields);
    }
    return 0;
}

/* ---- sections ------------------------------------------------------------------------------ */

static int inv_hosts(inv_ctx_t *c, yaml_node_t *list) {
    cli_inventory_t *inv = c->inv;
    if (inv_expect(c, list, YAML_SEQUENCE_NODE, "hosts") != 0) return -1;
    for (yaml_node_item_t *it = list->data.sequence.items.start; it < list->data.sequence.items.top;
         it++) {
        yaml_node_t *item = inv_node(c, *it);
        char where[32];
        snprintf(where, sizeof where, "hosts[%d]", inv->n_hosts);
        if (inv->n_hosts == INV_MAX_HOSTS)
            return inv_err(c, item->start_mark, "more than %d hosts", INV_MAX_HOSTS);
        cli_inv_host_t *h = &inv->hosts[inv->n_hosts];
        *h = inv->defaults;
        h->name[0] = h->address[0] = 0;
        h->mark = item->start_mark;
        unsigned seen = 0;
        if (inv_fields(c, item, where, host_fields, N_OF(host_fields), h, &seen, NULL) != 0)
            return -1;
        if (!(seen & 1u))
            return inv_err(c, item->start_mark, "%s has no name (every host needs 'name: ...')",
                           where);
        for (int i = 0; i < inv->n_hosts; i++)
            if (strcmp(inv->hosts[i].name, h->name) == 0)
                return inv_err(c, item->start_mark,
                               "%s: host name '%s' is already used by hosts[%d] (line %zu)", where,
                               h->name, i, (size_t)inv->hosts[i].mark.line + 1);
        if (!h->address[0]) memcpy(h->address, h->name, strlen(h->name) + 1); /* a DNS name */
        inv->n_hosts++;
    }
    if (inv->n_hosts == 0)
        return inv_err(c, list->start_mark, "hosts is empty: list at least one host");
    return 0;
}

/* The index of the host a role names, or -1 with an error that lists the hosts. */
static int inv_host_ref(inv_ctx_t *c, yaml_node_t *v, const char *label) {
    const cli_inventory_t *inv = c->inv;
    const char *name = inv_text(v);
    const char *names[INV_MAX_HOSTS];
    char all[256];
    size_t used = 0;
    all[0] = 0;
    for (int i = 0; i < inv->n_hosts; i++) {
        if (strcmp(inv->hosts[i].name, name) == 0) return i;
        names[i] = inv->hosts[i].name;
        if (used < sizeof all - 8)
            used +=
                (size_t)snprintf(all + used, sizeof all - used, "%s%s", i ? ", " : "", names[i]);
    }
    char dym[96];
    kd_did_you_mean(name, names, inv->n_hosts, dym, sizeof dym);
    return inv_err(c, v->start_mark, "%s: no host '%s' in hosts%s (hosts: %s)", label, name, dym,
                   all);
}

/* A role entry with a host and a port (coordinator, teachers[i]). */
static int inv_listen(inv_ctx_t *c, yaml_node_t *map, const char *where, cli_inv_listen_t *out,
                      yaml_mark_t *port_mark) {
    yaml_node_t *host = NULL;
    unsigned seen = 0;
    if (inv_fields(c, map, where, listen_fields, N_OF(listen_fields), out, &seen, &host) != 0)
        return -1;
    char label[64];
    snprintf(label, sizeof label, "%s.host", where);
    if (!host) return inv_err(c, map->start_mark, "%s has no host", where);
    if ((out->host = inv_host_ref(c, host, label)) < 0) return -1;
    if (!(seen & 2u)) return inv_err(c, map->start_mark, "%s has no port", where);
    *port_mark = map->start_mark;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++)
        if (strcmp(inv_text(inv_node(c, p->key)), "port") == 0)
            *port_mark = inv_node(c, p->value)->start_mark;
    return 0;
}

typedef struct {
    int host;
    long port;
    char what[64];
    yaml_mark_t mark;
} inv_port_use_t;

/* Two listeners on one machine (same address) and port cannot both bind. */
static int inv_check_ports(inv_ctx_t *c, const inv_port_use_t *uses, int n) {
    const cli_inventory_t *inv = c->inv;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++) {
            const char *ai = inv->hosts[uses[i].host].address;
            const char *aj = inv->hosts[uses[j].host].address;
            if (uses[i].port == uses[j].port && strcmp(ai, aj) == 0)
                return inv_err(c, uses[i].mark,
                               "%s: port %ld on %s is already taken by %s (line %zu): give one "
                               "of them another port",
                               uses[i].what, uses[i].port, ai, uses[j].what,
                               (size_t)uses[j].mark.line + 1);
        }
    return 0;
}

static int inv_roles(inv_ctx_t *c, yaml_node_t *map) {
    cli_inventory_t *inv = c->inv;
    inv_port_use_t uses[INV_MAX_TEACHERS + 1];
    int n_uses = 0;
    yaml_node_t *coord = NULL, *teachers = NULL, *workers = NULL;
    if (inv_expect(c, map, YAML_MAPPING_NODE, "roles") != 0) return -1;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        const char *key = inv_key(c, map, p, "roles");
        if (!key) return -1;
        yaml_node_t *v = inv_node(c, p->value);
        if (strcmp(key, "coordinator") == 0)
            coord = v;
        else if (strcmp(key, "teachers") == 0)
            teachers = v;
        else if (strcmp(key, "workers") == 0)
            workers = v;
        else
            return inv_unknown_key(c, p, "roles", key, role_keys, N_OF(role_keys));
    }
    if (!coord) return inv_err(c, map->start_mark, "roles has no coordinator");
    if (!teachers) return inv_err(c, map->start_mark, "roles has no teachers (a run needs one)");
    if (!workers) return inv_err(c, map->start_mark, "roles has no workers");

    if (inv_listen(c, coord, "roles.coordinator", &inv->coordinator, &uses[0].mark) != 0) return -1;
    uses[n_uses].host = inv->coordinator.host;
    uses[n_uses].port = inv->coordinator.port;
    snprintf(uses[n_uses++].what, sizeof uses[0].what, "roles.coordinator.port");

    if (inv_expect(c, teachers, YAML_SEQUENCE_NODE, "roles.teachers") != 0) return -1;
    for (yaml_node_item_t *it = teachers->data.sequence.items.start;
         it < teachers->data.sequence.items.top; it++) {
        char where[48];
        snprintf(where, sizeof where, "roles.teachers[%d]", inv->n_teachers);
        if (inv->n_teachers == INV_MAX_TEACHERS)
            return inv_err(c, inv_node(c, *it)->start_mark,
                           "%s: more than %d teachers (cluster.teachers' limit)", where,
                           INV_MAX_TEACHERS);
        cli_inv_listen_t *t = &inv->teachers[inv->n_teachers++];
        if (inv_listen(c, inv_node(c, *it), where, t, &uses[n_uses].mark) != 0) return -1;
        uses[n_uses].host = t->host;
        uses[n_uses].port = t->port;
        snprintf(uses[n_uses++].what, sizeof uses[0].what, "%s.port", where);
    }
    if (inv->n_teachers == 0)
        return inv_err(c, teachers->start_mark, "roles.teachers is empty: a run needs a teacher");
    if (inv_check_ports(c, uses, n_uses) != 0) return -1;

    if (inv_expect(c, workers, YAML_SEQUENCE_NODE, "roles.workers") != 0) return -1;
    for (yaml_node_item_t *it = workers->data.sequence.items.start;
         it < workers->data.sequence.items.top; it++) {
        char where[48];
        snprintf(where, sizeof where, "roles.workers[%d]", inv->n_worker_groups);
        yaml_node_t *item = inv_node(c, *it), *host = NULL;
        if (inv->n_worker_groups == INV_MAX_HOSTS)
            return inv_err(c, item->start_mark, "%s: more than %d worker hosts", where,
                           INV_MAX_HOSTS);
        cli_inv_workers_t *w = &inv->workers[inv->n_worker_groups];
        w->count = 1;
        w->threads = 0;
        if (inv_fields(c, item, where, workers_fields, N_OF(workers_fields), w, NULL, &host) != 0)
            return -1;
        char label[64];
        snprintf(label, sizeof label, "%s.host", where);
        if (!host) return inv_err(c, item->start_mark, "%s has no host", where);
        if ((w->host = inv_host_ref(c, host, label)) < 0) return -1;
        for (int i = 0; i < inv->n_worker_groups; i++)
            if (inv->workers[i].host == w->host)
                return inv_err(c, host->start_mark,
                               "%s.host: host '%s' is already in roles.workers[%d]: give that "
                               "entry a larger count instead",
                               where, inv->hosts[w->host].name, i);
        inv->total_workers += w->count;
        inv->n_worker_groups++;
    }
    if (inv->n_worker_groups == 0)
        return inv_err(c, workers->start_mark,
                       "roles.workers is empty: list the hosts that run workers");
    if (inv->total_workers > INV_MAX_WORKERS)
        return inv_err(c, workers->start_mark, "roles.workers start %ld workers, at most %d",
                       inv->total_workers, INV_MAX_WORKERS);
    return 0;
}

static void inv_defaults(cli_inventory_t *inv) {
    inv->ssh.port = INV_DEFAULT_PORT;
    inv->ssh.connect_timeout = INV_DEFAULT_CONNECT_S;
    snprintf(inv->ssh.strict, sizeof inv->ssh.strict, "accept-new");
    cli_inv_host_t *d = &inv->defaults;
    /* relative: under the ssh user's home on each host */
    snprintf(d->install_dir, sizeof d->install_dir, "kdist");
    snprintf(d->run_dir, sizeof d->run_dir, "kdist/run");
    snprintf(d->data_dir, sizeof d->data_dir, "kdist/data");
    snprintf(d->supervisor, sizeof d->supervisor, "auto");
    d->max_restarts = INV_DEFAULT_RESTARTS;
    inv->ship.binaries = inv->ship.data = inv->ship.teacher_checkpoint = true;
}

static yaml_node_t *inv_lookup(inv_ctx_t *c, yaml_node_t *map, const char *key) {
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = inv_node(c, p->key);
        if (k->type == YAML_SCALAR_NODE && strcmp(inv_text(k), key) == 0)
            return inv_node(c, p->value);
    }
    return NULL;
}

/* ssh and defaults first (hosts inherit from them wherever they are written), then the rest. */
static int inv_root(inv_ctx_t *c) {
    cli_inventory_t *inv = c->inv;
    yaml_node_t *root = yaml_document_get_root_node(c->doc);
    if (!root) {
        yaml_mark_t m = {0, 0, 0};
        return inv_err(c, m, "the inventory is empty (expected hosts: and roles:)");
    }
    if (inv_expect(c, root, YAML_MAPPING_NODE, "an inventory") != 0) return -1;
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        const char *key = inv_key(c, root, p, "the inventory");
        if (!key) return -1;
        bool known = false;
        for (int i = 0; i < N_OF(top_keys); i++) known |= strcmp(key, top_keys[i]) == 0;
        if (!known) return inv_unknown_key(c, p, "the inventory", key, top_keys, N_OF(top_keys));
    }
    /* the sections hosts inherit from and those that stand alone first, then hosts and the
     * roles that refer to them */
    yaml_node_t *n;
    if ((n = inv_lookup(c, root, "ssh")) &&
        inv_fields(c, n, "ssh", ssh_fields, N_OF(ssh_fields), inv, NULL, NULL) != 0)
        return -1;
    if (inv->ssh.identity[0] && !kd_file_exists(inv->ssh.identity))
        return inv_err(c, inv_lookup(c, n, "identity")->start_mark,
                       "ssh.identity: %s: no such file", inv->ssh.identity);
    inv->defaults.port = inv->ssh.port;
    snprintf(inv->defaults.user, sizeof inv->defaults.user, "%s", inv->ssh.user);
    if ((n = inv_lookup(c, root, "defaults")) &&
        inv_fields(c, n, "defaults", host_fields + HOST_ONLY_FIELDS,
                   N_OF(host_fields) - HOST_ONLY_FIELDS, &inv->defaults, NULL, NULL) != 0)
        return -1;
    if ((n = inv_lookup(c, root, "ship")) &&
        inv_fields(c, n, "ship", ship_fields, N_OF(ship_fields), inv, NULL, NULL) != 0)
        return -1;
    for (int i = 0; i < N_OF(top_fields); i++)
        if ((n = inv_lookup(c, root, top_fields[i].key)) &&
            inv_set(c, &top_fields[i], inv, top_fields[i].key, n) != 0)
            return -1;
    if (!(n = inv_lookup(c, root, "hosts")))
        return inv_err(c, root->start_mark, "the inventory has no hosts: list");
    if (inv_hosts(c, n) != 0) return -1;
    if (!(n = inv_lookup(c, root, "roles")))
        return inv_err(c, root->start_mark, "the inventory has no roles: section");
    return inv_roles(c, n);
}

/* Parses and validates an inventory held in memory; file names it in messages and anchors its
 * relative local paths. 0, or -1 with err set ("file:line:col: message" and the line). */
static int cli_inventory_parse(const char *file, const char *text, size_t len, cli_inventory_t *inv,
                               char *err, size_t errlen) {
    memset(inv, 0, sizeof *inv);
    snprintf(inv->path, sizeof inv->path, "%s", file);
    inv_defaults(inv);
    yaml_parser_t ps;
    yaml_document_t doc;
    inv_ctx_t c = {file, text, len, &doc, inv, err, errlen};
    if (!yaml_parser_initialize(&ps))
        return kd_err(err, errlen, "%s: cannot initialise the YAML parser", file);
    yaml_parser_set_input_string(&ps, (const unsigned char *)text, len);
    int rc = -1;
    if (!yaml_parser_load(&ps, &doc)) {
        kd_yaml_syntax_err(&ps, file, text, len, err, errlen);
    } else {
        rc = inv_root(&c);
        yaml_document_delete(&doc);
    }
    yaml_parser_delete(&ps);
    return rc;
}

static int cli_inventory_load(const char *path, cli_inventory_t *inv, char *err, size_t errlen) {
    uint8_t *data;
    size_t len;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    int rc = cli_inventory_parse(path, (const char *)data, len, inv, err, errlen);
    free(data);
    return rc;
}

/* ---- the plan ------------------------------------------------------------------------------ */

static void inv_endpoint(const cli_inventory_t *inv, const cli_inv_listen_t *l, char *out,
                         size_t outlen) {
    const char *a = inv->hosts[l->host].address;
    snprintf(out, outlen, strchr(a, ':') ? "tcp://[%s]:%ld" : "tcp://%s:%ld", a, l->port);
}

static const char *dash(const char *s) {
    return s && *s ? s : "-";
}

static void inv_print_inventory(const cli_inventory_t *inv, FILE *out) {
    fprintf(out,
            "# kdist inventory plan of %s (format %d): one record per line, fields separated by "
            "one space, none holds whitespace, '-' means unset. Read by deploy/kdist-cluster.\n",
            inv->path, INV_PLAN_FORMAT);
    fprintf(out, "format %d\n", INV_PLAN_FORMAT);
    fprintf(out, "ssh %s %ld %s %s\n", inv->ssh.strict, inv->ssh.connect_timeout,
            dash(inv->ssh.identity), dash(inv->ssh.known_hosts));
    for (int i = 0; i < inv->n_hosts; i++) {
        const cli_inv_host_t *h = &inv->hosts[i];
        fprintf(out, "host %s %s %s %ld %s %s %s %s %ld\n", h->name, h->address, dash(h->user),
                h->port, h->install_dir, h->run_dir, h->data_dir, h->supervisor, h->max_restarts);
    }
    char ep[INV_ADDR_MAX + 32];
    inv_endpoint(inv, &inv->coordinator, ep, sizeof ep);
    fprintf(out, "coordinator %s %ld %s\n", inv->hosts[inv->coordinator.host].name,
            inv->coordinator.port, ep);
    for (int i = 0; i < inv->n_teachers; i++) {
        inv_endpoint(inv, &inv->teachers[i], ep, sizeof ep);
        fprintf(out, "teacher %d %s %ld %s\n", i, inv->hosts[inv->teachers[i].host].name,
                inv->teachers[i].port, ep);
    }
    for (int i = 0; i < inv->n_worker_groups; i++)
        fprintf(out, "workers %s %ld %ld\n", inv->hosts[inv->workers[i].host].name,
                inv->workers[i].count, inv->workers[i].threads);
}

/* Keys kdist-cluster sets from the inventory: an override of them would be overwritten. */
static const char *const inv_controlled[] = {"cluster.bind", "cluster.teachers", "cluster.workers"};

static int inv_check_overrides(const cli_inventory_t *inv, const char *const *ov, int n, char *err,
                               size_t errlen) {
    for (int i = 0; i < n; i++) {
        if (!strchr(ov[i], '=') || inv_has_space(ov[i]))
            return kd_err(err, errlen,
                          "override '%s': expected section.key=value without spaces "
                          "(kdist-cluster passes it on remote command lines)",
                          ov[i]);
        for (int k = 0; k < N_OF(inv_controlled); k++) {
            size_t kl = strlen(inv_controlled[k]);
            if (strncmp(ov[i], inv_controlled[k], kl) == 0 && ov[i][kl] == '=')
                return kd_err(err, errlen,
                              "override '%s': %s comes from the inventory %s (roles:), not "
                              "from an override",
                              ov[i], inv_controlled[k], inv->path);
        }
    }
    return 0;
}

/* The dataset files the recipe names, with their recipe keys. */
static const char *const data_keys[] = {"train_images", "train_labels", "test_images",
                                        "test_labels"};

static const char *inv_data_file(const kd_recipe_t *r, int i) {
    return i == 0   ? r->data.train_images
           : i == 1 ? r->data.train_labels
           : i == 2 ? r->data.test_images
                    : r->data.test_labels;
}

static const char *inv_basename(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* p made absolute against the working directory, symlinks kept (rsync copies what they point
 * to); 0, or -1 with err naming what (a recipe key or file) when it is not a readable file. */
static int inv_local_file(const char *p, const char *what, char *out, size_t outlen, char *err,
                          size_t errlen) {
    char cwd[KD_PATH_MAX];
    int n = p[0] == '/'               ? snprintf(out, outlen, "%s", p)
            : getcwd(cwd, sizeof cwd) ? snprintf(out, outlen, "%s/%s", cwd, p)
                                      : -1;
    if (n < 0 || (size_t)n >= outlen) return kd_err(err, errlen, "%s: %s: path too long", what, p);
    if (access(out, R_OK) != 0) return kd_err(err, errlen, "%s: %s: %s", what, p, strerror(errno));
    if (inv_has_space(out))
        return kd_err(err, errlen, "%s: %s: the path must not contain spaces", what, out);
    return 0;
}

/* What the run of recipe (with overrides) needs on each host, after the inventory's records.
 * 0, or -1 with err set (naming the recipe, the file or the inventory key). */
static int inv_print_run(const cli_inventory_t *inv, const char *recipe_path, const char *const *ov,
                         int n_ov, FILE *out, char *err, size_t errlen) {
    if (inv_check_overrides(inv, ov, n_ov, err, errlen) != 0) return -1;
    kd_recipe_t *r = kd_xmalloc(sizeof *r);
    char abs[KD_PATH_MAX], what[KD_PATH_MAX + 64], why[KD_ERR_LEN];
    int rc = -1;
    if (kd_recipe_load(recipe_path, ov, n_ov, r, err, errlen) != 0) goto out;
    if (inv_local_file(recipe_path, "the recipe", abs, sizeof abs, err, errlen) != 0) goto out;
    fprintf(out, "run %s %s\n", r->name, abs);

    /* the dataset: shipped under the recipe's file names into each host's data_dir */
    for (int i = 0; i < N_OF(data_keys) && inv->ship.data; i++) {
        char local[KD_PATH_MAX];
        const char *name = inv_basename(inv_data_file(r, i));
        kd_recipe_data_path(r, inv_data_file(r, i), local, sizeof local);
        snprintf(what, sizeof what, "%s: data.%s", recipe_path, data_keys[i]);
        if (inv_local_file(local, what, abs, sizeof abs, why, sizeof why) != 0) {
            kd_err(err, errlen,
                   "%s (kdist-cluster ships the dataset from this machine; set ship.data: false "
                   "in %s when every host has it in its data_dir)",
                   why, inv->path);
            goto out;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(inv_basename(inv_data_file(r, j)), name) == 0) {
                kd_err(err, errlen,
                       "%s: data.%s and data.%s have the same file name %s: they would "
                       "overwrite each other in the hosts' data_dir",
                       recipe_path, data_keys[j], data_keys[i], name);
                goto out;
            }
        fprintf(out, "data %s %s %s\n", data_keys[i], abs, name);
        fprintf(out, "override data.%s=%s\n", data_keys[i], name);
    }

    /* the teacher's weights, when the run distils from a teacher model */
    bool distils = r->distill.loss.alpha > 0 && !r->cache.import[0];
    if (distils && inv->ship.teacher_checkpoint) {
        bool from_inv = inv->teacher_checkpoint[0] != 0;
        const char *ckpt = from_inv ? inv->teacher_checkpoint : r->teacher.checkpoint;
        if (!ckpt[0]) {
            kd_err(err, errlen,
                   "%s: distill.alpha is %g but teacher.checkpoint is empty: train the teacher "
                   "first, or set teacher_checkpoint in %s",
                   recipe_path, (double)r->distill.loss.alpha, inv->path);
            goto out;
        }
        snprintf(what, sizeof what, "the teacher checkpoint (%s)",
                 from_inv ? "teacher_checkpoint in the inventory"
                          : "the recipe's teacher.checkpoint");
        if (inv_local_file(ckpt, what, abs, sizeof abs, err, errlen) != 0) goto out;
        fprintf(out, "checkpoint %s\n", abs);
    }

    char ep[INV_ADDR_MAX + 32];
    inv_endpoint(inv, &inv->coordinator, ep, sizeof ep);
    fprintf(out, "override cluster.bind=%s\n", ep);
    fprintf(out, "override cluster.teachers=%d\n", inv->n_teachers);
    fprintf(out, "override cluster.workers=%ld\n", inv->total_workers > 0 ? inv->total_workers : 1);

    /* what each host gets: binaries everywhere, recipe, data and weights where they are read */
    for (int h = 0; h < inv->n_hosts; h++) {
        bool reads = inv->coordinator.host == h;
        for (int t = 0; t < inv->n_teachers; t++) reads |= inv->teachers[t].host == h;
        char kinds[64] = "";
        size_t used = 0;
        if (inv->ship.binaries) used += (size_t)snprintf(kinds + used, sizeof kinds - used, "bin,");
        if (reads)
            used += (size_t)snprintf(kinds + used, sizeof kinds - used, "recipe,%s%s",
                                     inv->ship.data ? "data," : "",
                                     distils && inv->ship.teacher_checkpoint ? "checkpoint," : "");
        if (used) kinds[used - 1] = 0;
        fprintf(out, "ship %s %s\n", inv->hosts[h].name, used ? kinds : "-");
    }
    rc = 0;
out:
    free(r);
    return rc;
}

/* ---- kdist inventory ----------------------------------------------------------------------- */

static void inventory_usage(FILE *out) {
    fprintf(out,
            "usage: kdist inventory check INVENTORY [RECIPE [section.key=value ...]]\n"
            "       kdist inventory plan INVENTORY [RECIPE [section.key=value ...]]\n"
            "  check  validate the inventory (and the run of RECIPE on it); say what runs where\n"
            "  plan   print it in the line format deploy/kdist-cluster reads; with RECIPE (or the\n"
            "         inventory's recipe:) also the files to ship and the overrides to apply\n");
}

static void inv_print_summary(const cli_inventory_t *inv) {
    char ep[INV_ADDR_MAX + 32];
    inv_endpoint(inv, &inv->coordinator, ep, sizeof ep);
    printf("%s: ok: %d host%s; coordinator on %s at %s; %d teacher%s; %ld worker%s on %d host%s\n",
           inv->path, inv->n_hosts, inv->n_hosts == 1 ? "" : "s",
           inv->hosts[inv->coordinator.host].name, ep, inv->n_teachers,
           inv->n_teachers == 1 ? "" : "s", inv->total_workers, inv->total_workers == 1 ? "" : "s",
           inv->n_worker_groups, inv->n_worker_groups == 1 ? "" : "s");
}

int kd_cmd_inventory(int argc, char **argv) {
    if (argc >= 1 && (strcmp(argv[0], "-h") == 0 || strcmp(argv[0], "--help") == 0)) {
        inventory_usage(stdout);
        return 0;
    }
    if (argc < 2 || (strcmp(argv[0], "check") != 0 && strcmp(argv[0], "plan") != 0)) {
        inventory_usage(stderr);
        return 2;
    }
    bool plan = strcmp(argv[0], "plan") == 0;
    const char *recipe = argc >= 3 && !strchr(argv[2], '=') ? argv[2] : NULL;
    int first_ov = recipe ? 3 : 2;
    if (argc - first_ov > INV_MAX_OVERRIDES) {
        fprintf(stderr, "kdist inventory: more than %d overrides\n", INV_MAX_OVERRIDES);
        return 2;
    }
    char err[4096];
    cli_inventory_t *inv = kd_xmalloc(sizeof *inv);
    int rc = 1;
    if (cli_inventory_load(argv[1], inv, err, sizeof err) != 0) {
        fprintf(stderr, "kdist inventory: %s\n", err);
        goto out;
    }
    if (!recipe && inv->recipe[0]) recipe = inv->recipe;
    if (!recipe && argc > first_ov) {
        fprintf(stderr, "kdist inventory: overrides need a recipe (none given, none in %s)\n",
                argv[1]);
        rc = 2;
        goto out;
    }
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    inv_print_inventory(inv, out);
    int ok = recipe ? inv_print_run(inv, recipe, (const char *const *)argv + first_ov,
                                    argc - first_ov, out, err, sizeof err)
                    : 0;
    fclose(out);
    if (ok != 0) {
        fprintf(stderr, "kdist inventory: %s\n", err);
    } else if (plan) {
        fputs(text, stdout);
        rc = 0;
    } else {
        inv_print_summary(inv);
        if (recipe) printf("%s: the recipe loads and its files are here to ship\n", recipe);
        rc = 0;
    }
    free(text);
out:
    free(inv);
    return rc;
}
