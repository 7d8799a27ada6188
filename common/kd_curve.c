/* kd_curve: CurveZMQ key files, authorized keys, socket options, the ZAP handler and the
 * client's reading of its handshakes (see kd_curve.h, docs/security.md). */
#include "kd_curve.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "kd_log.h"
#include "kd_util.h"
#include "kd_wire.h"

#define KEY_FILE_MAX  65536 /* a key file is a few lines; anything larger is not one */
#define ZAP_ENDPOINT  "inproc://zeromq.zap.01"
#define ZAP_MAX_PARTS 16

static const char z85_alphabet[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                   ".-:+=^!/*?&<>()[]{}@%$#";

/* ---- keys and key files --------------------------------------------------------------------- */

bool kd_curve_is_z85(const char *text) {
    if (strlen(text) != KD_CURVE_Z85_LEN || strspn(text, z85_alphabet) != KD_CURVE_Z85_LEN)
        return false;
    uint8_t bin[32];
    return zmq_z85_decode(bin, text) != NULL; /* also refuses 5-character groups over 2^32 */
}

/* Why text is not a Z85 key, for messages. */
static void z85_problem(const char *text, char *out, size_t outlen) {
    size_t len = strlen(text), ok = strspn(text, z85_alphabet);
    if (len != KD_CURVE_Z85_LEN)
        snprintf(out, outlen, "it has %zu characters, a Z85 key has %d", len, KD_CURVE_Z85_LEN);
    else if (ok != len)
        snprintf(out, outlen, "character %zu ('%c') is not in the Z85 alphabet", ok + 1, text[ok]);
    else
        snprintf(out, outlen, "it does not decode as Z85 (a group exceeds 32 bits)");
}

/* "  name = "value"  " -> name and value (quotes optional); false when the line has no '='. */
static bool split_assignment(char *line, char **name, char **value) {
    char *eq = strchr(line, '=');
    if (!eq) return false;
    *eq = 0;
    char *n = line, *v = eq + 1;
    while (*n == ' ' || *n == '\t') n++;
    char *end = n + strlen(n);
    while (end > n && (end[-1] == ' ' || end[-1] == '\t')) *--end = 0;
    while (*v == ' ' || *v == '\t') v++;
    end = v + strlen(v);
    while (end > v && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) *--end = 0;
    if (end - v >= 2 && ((*v == '"' && end[-1] == '"') || (*v == '\'' && end[-1] == '\''))) {
        end[-1] = 0;
        v++;
    }
    *name = n;
    *value = v;
    return true;
}

/* One line of a key file into *pub / *sec; -1 with err set when it is not a key-file line. */
static int parse_key_line(const char *name, size_t lineno, char *line, char *pub, char *sec,
                          char *err, size_t errlen) {
    char *p = line;
    while (*p == ' ' || *p == '\t') p++;
    char *end = p + strlen(p);
    while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) *--end = 0;
    /* a bare public key, as `echo KEY > x.pub` gives; first: Z85 has '#' and '=' in it */
    if (kd_curve_is_z85(p)) {
        if (*pub) return kd_err(err, errlen, "%s:%zu: a second public key", name, lineno);
        memcpy(pub, p, KD_CURVE_Z85_LEN + 1);
        return 0;
    }
    if (!*p || *p == '#') return 0;
    if (strcmp(p, "metadata") == 0 || strcmp(p, "curve") == 0) return 0; /* zcert sections */
    char *key, *value, why[96];
    if (!split_assignment(p, &key, &value)) {
        z85_problem(p, why, sizeof why);
        return kd_err(err, errlen,
                      "%s:%zu: expected `public-key = \"...\"`, `secret-key = \"...\"` or a Z85 "
                      "key, got '%.60s' (%s)",
                      name, lineno, p, why);
    }
    char *dst = strcmp(key, "public-key") == 0 ? pub : strcmp(key, "secret-key") == 0 ? sec : NULL;
    if (!dst) return 0; /* zcert metadata (name = "value"): not ours to judge */
    if (*dst) return kd_err(err, errlen, "%s:%zu: %s is given twice", name, lineno, key);
    if (!kd_curve_is_z85(value)) {
        z85_problem(value, why, sizeof why);
        return kd_err(err, errlen, "%s:%zu: %s is not a Z85 key: %s", name, lineno, key, why);
    }
    memcpy(dst, value, KD_CURVE_Z85_LEN + 1);
    return 0;
}

int kd_curve_parse_keys(const char *name, const char *text, size_t len, kd_curve_pair_t *out,
                        char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (len > KEY_FILE_MAX)
        return kd_err(err, errlen, "%s: %zu bytes is not a key file (at most %d)", name, len,
                      KEY_FILE_MAX);
    if (strlen(text) != len) return kd_err(err, errlen, "%s: contains a NUL byte", name);
    char *copy = kd_xstrdup(text);
    int rc = 0;
    size_t lineno = 1;
    for (char *line = copy, *next; line && rc == 0; line = next, lineno++) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        rc = parse_key_line(name, lineno, line, out->public_z85, out->secret_z85, err, errlen);
    }
    explicit_bzero(copy, len); /* secrets do not linger in freed memory */
    free(copy);
    if (rc) return -1;
    if (!out->public_z85[0] && !out->secret_z85[0])
        return kd_err(err, errlen, "%s: no key in it (expected `public-key = \"...\"`)", name);
    if (out->secret_z85[0]) {
        char derived[KD_CURVE_Z85_LEN + 1];
        if (zmq_curve_public(derived, out->secret_z85) != 0)
            return kd_err(err, errlen, "%s: cannot derive the public key: %s", name,
                          zmq_strerror(errno));
        if (out->public_z85[0] && strcmp(derived, out->public_z85) != 0)
            return kd_err(err, errlen,
                          "%s: public-key does not belong to secret-key (the file was edited or "
                          "mixes two pairs; make a new pair with `kdist keygen`)",
                          name);
        memcpy(out->public_z85, derived, sizeof derived);
    }
    return 0;
}

static int read_key_file(const char *path, kd_curve_pair_t *out, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0)
        return kd_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return kd_err(err, errlen, "%s: not a key file (not a file)", path);
    if (st.st_size > KEY_FILE_MAX)
        return kd_err(err, errlen, "%s: %lld bytes is not a key file (at most %d)", path,
                      (long long)st.st_size, KEY_FILE_MAX);
    uint8_t *data;
    size_t len;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    int rc = kd_curve_parse_keys(path, (const char *)data, len, out, err, errlen);
    explicit_bzero(data, len);
    free(data);
    return rc;
}

int kd_curve_load_pair(const char *path, kd_curve_pair_t *out, char *err, size_t errlen) {
    if (read_key_file(path, out, err, errlen) != 0) return -1;
    if (!out->secret_z85[0])
        return kd_err(err, errlen,
                      "%s holds only a public key: a node needs its key pair (the NAME.key file "
                      "`kdist keygen NAME` wrote, not NAME.pub)",
                      path);
    struct stat st;
    if (stat(path, &st) == 0 && (st.st_mode & 077))
        kd_log(KD_LOG_WARN, "KD-CURVE-KEY-MODE",
               "%s holds a secret key and others may read it (mode %03o): chmod 600 %s", path,
               (unsigned)(st.st_mode & 0777), path);
    return 0;
}

int kd_curve_load_public(const char *z85_or_path, const char *what, char out[KD_CURVE_Z85_LEN + 1],
                         char *err, size_t errlen) {
    if (kd_curve_is_z85(z85_or_path)) {
        memcpy(out, z85_or_path, KD_CURVE_Z85_LEN + 1);
        return 0;
    }
    if (!z85_or_path[0]) return kd_err(err, errlen, "%s is empty", what);
    kd_curve_pair_t pair;
    char why[KD_ERR_LEN];
    if (read_key_file(z85_or_path, &pair, why, sizeof why) != 0) {
        /* forty characters that are not a file: most likely a mistyped key */
        if (strlen(z85_or_path) == KD_CURVE_Z85_LEN && !kd_file_exists(z85_or_path)) {
            z85_problem(z85_or_path, why, sizeof why);
            return kd_err(err, errlen, "%s '%s' is neither a Z85 key (%s) nor a file", what,
                          z85_or_path, why);
        }
        return kd_err(err, errlen, "%s: %s", what, why);
    }
    memcpy(out, pair.public_z85, KD_CURVE_Z85_LEN + 1);
    explicit_bzero(&pair, sizeof pair);
    return 0;
}

/* Writes text to path with mode: exclusively (O_EXCL) unless replace, then through a temp file
 * renamed over it, so a reader never sees half a key. */
static int write_key_file(const char *path, const char *text, mode_t mode, bool replace, char *err,
                          size_t errlen) {
    char tmp[KD_PATH_MAX + 16];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    const char *target = replace ? tmp : path;
    if (replace) unlink(tmp);
    int fd = open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        if (errno == EEXIST)
            return kd_err(err, errlen,
                          "%s exists: key files are never overwritten (give --force to replace "
                          "it, then update every cluster.security.authorized_keys that lists the "
                          "old public key)",
                          path);
        return kd_err(err, errlen, "cannot create %s: %s", target, strerror(errno));
    }
    size_t len = strlen(text);
    bool ok = fchmod(fd, mode) == 0 && write(fd, text, len) == (ssize_t)len && fsync(fd) == 0;
    int e = errno;
    if (close(fd) != 0) ok = false;
    if (ok && replace && rename(tmp, path) != 0) {
        e = errno;
        ok = false;
    }
    if (!ok) {
        unlink(target);
        return kd_err(err, errlen, "cannot write %s: %s", path, strerror(e));
    }
    return 0;
}

int kd_curve_generate(const char *dir, const char *name, bool force, kd_curve_pair_t *out,
                      char *err, size_t errlen) {
    char key_path[KD_PATH_MAX], pub_path[KD_PATH_MAX];
    if (snprintf(key_path, sizeof key_path, "%s/%s.key", dir, name) >= (int)sizeof key_path ||
        snprintf(pub_path, sizeof pub_path, "%s/%s.pub", dir, name) >= (int)sizeof pub_path)
        return kd_err(err, errlen, "the path %s/%s.key is too long", dir, name);
    if (kd_mkdirs(dir, err, errlen) != 0) return -1;
    if (!force && (kd_file_exists(key_path) || kd_file_exists(pub_path)))
        return kd_err(err, errlen,
                      "%s exists: key files are never overwritten (give --force to replace it, "
                      "then update every cluster.security.authorized_keys that lists the old "
                      "public key)",
                      kd_file_exists(key_path) ? key_path : pub_path);
    memset(out, 0, sizeof *out);
    if (zmq_curve_keypair(out->public_z85, out->secret_z85) != 0)
        return kd_err(err, errlen, "cannot make a key pair: %s (libzmq without CURVE support?)",
                      zmq_strerror(errno));
    char text[1024];
    snprintf(text, sizeof text,
             "# kdist CurveZMQ key pair '%s' (kdist keygen). SECRET: keep this file to the node\n"
             "# that uses it (mode 0600). List %s.pub, or the public key below, in\n"
             "# cluster.security.authorized_keys.\n"
             "public-key = \"%s\"\n"
             "secret-key = \"%s\"\n",
             name, name, out->public_z85, out->secret_z85);
    if (write_key_file(key_path, text, 0600, force, err, errlen) != 0) return -1;
    snprintf(text, sizeof text,
             "# kdist CurveZMQ public key '%s' (kdist keygen); the secret half is in %s.key\n"
             "public-key = \"%s\"\n",
             name, name, out->public_z85);
    return write_key_file(pub_path, text, 0644, force, err, errlen);
}

/* ---- the authorized keys ------------------------------------------------------------------ */

static int keyset_add(kd_curve_keyset_t *set, const char *z85, const char *from, char *err,
                      size_t errlen) {
    if (kd_curve_keyset_has(set, z85)) return 0;
    if (set->n == KD_CURVE_MAX_KEYS)
        return kd_err(err, errlen, "%s: more than %d authorized keys", from, KD_CURVE_MAX_KEYS);
    memcpy(set->keys[set->n++], z85, KD_CURVE_Z85_LEN + 1);
    return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

static int is_pub_file(const struct dirent *e) {
    size_t n = strlen(e->d_name);
    return e->d_name[0] != '.' && n > 4 && strcmp(e->d_name + n - 4, ".pub") == 0;
}

/* Every NAME.pub in dir. An empty directory is an error: it authorizes nobody. */
static int keyset_add_dir(kd_curve_keyset_t *set, const char *dir, const char *label, char *err,
                          size_t errlen) {
    struct dirent **list = NULL;
    int n = scandir(dir, &list, is_pub_file, by_name);
    if (n < 0) return kd_err(err, errlen, "%s ('%s'): %s", label, dir, strerror(errno));
    int rc = n == 0 ? kd_err(err, errlen, "%s: the directory %s has no .pub file", label, dir) : 0;
    for (int i = 0; i < n; i++) {
        char path[KD_PATH_MAX + 300], why[KD_ERR_LEN];
        kd_curve_pair_t pair;
        snprintf(path, sizeof path, "%s/%s", dir, list[i]->d_name);
        if (rc == 0 && read_key_file(path, &pair, why, sizeof why) != 0)
            rc = kd_err(err, errlen, "%s: %s", label, why);
        if (rc == 0) rc = keyset_add(set, pair.public_z85, label, err, errlen);
        free(list[i]);
    }
    free(list);
    return rc;
}

/* Adds one recipe list's entries (Z85 keys, key files, directories of .pub files) to set. */
static int keyset_add_entries(kd_curve_keyset_t *set, const char (*entries)[KD_AUTHORIZED_KEY_MAX],
                              int n, const char *list, const char *recipe_name, char *err,
                              size_t errlen) {
    for (int i = 0; i < n; i++) {
        const char *entry = entries[i];
        char label[192];
        snprintf(label, sizeof label, "%s: cluster.security.%s[%d]", recipe_name, list, i);
        struct stat st;
        int rc;
        if (kd_curve_is_z85(entry)) {
            rc = keyset_add(set, entry, label, err, errlen);
        } else if (stat(entry, &st) == 0 && S_ISDIR(st.st_mode)) {
            rc = keyset_add_dir(set, entry, label, err, errlen);
        } else {
            char key[KD_CURVE_Z85_LEN + 1];
            rc = kd_curve_load_public(entry, label, key, err, errlen);
            if (rc == 0) rc = keyset_add(set, key, label, err, errlen);
        }
        if (rc != 0) return -1;
    }
    return 0;
}

/* The recipe's list of keys for role. */
static void role_entries(const kd_recipe_t *r, kd_curve_role_t role,
                         const char (**entries)[KD_AUTHORIZED_KEY_MAX], int *n) {
#define LIST(field)                                                                                \
    do {                                                                                           \
        *entries = (const char(*)[KD_AUTHORIZED_KEY_MAX])r->cluster.security.field;                \
        *n = r->cluster.security.n_##field;                                                        \
    } while (0)
    switch (role) {
    case KD_CURVE_MEMBER:
        LIST(authorized_keys);
        break;
    case KD_CURVE_WORKER:
        LIST(worker_keys);
        break;
    case KD_CURVE_TEACHER:
        LIST(teacher_keys);
        break;
    case KD_CURVE_OPERATOR:
        LIST(operator_keys);
        break;
    default:
        LIST(status_keys);
        break;
    }
#undef LIST
}

const char *kd_curve_role_list(kd_curve_role_t role) {
    static const char *const names[KD_CURVE_ROLES] = {
        "authorized_keys", "worker_keys", "teacher_keys", "operator_keys", "status_keys"};
    return role < KD_CURVE_ROLES ? names[role] : "?";
}

int kd_curve_roles_load(const kd_recipe_t *r, const char *recipe_name, kd_curve_roles_t *out,
                        char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->all = kd_xcalloc(1, sizeof *out->all);
    for (int role = 0; role < KD_CURVE_ROLES; role++) {
        const char(*entries)[KD_AUTHORIZED_KEY_MAX];
        int n;
        role_entries(r, (kd_curve_role_t)role, &entries, &n);
        out->sets[role] = kd_xcalloc(1, sizeof *out->sets[role]);
        if (keyset_add_entries(out->sets[role], entries, n, kd_curve_role_list(role), recipe_name,
                               err, errlen) != 0 ||
            keyset_add_entries(out->all, entries, n, kd_curve_role_list(role), recipe_name, err,
                               errlen) != 0) {
            kd_curve_roles_free(out);
            return -1;
        }
    }
    if (out->all->n == 0) {
        kd_curve_roles_free(out);
        return kd_err(err, errlen,
                      "%s: cluster.security.curve is on but no key may connect: list the public "
                      "keys (Z85, .pub files or a directory of them) of the workers and teachers "
                      "(worker_keys, teacher_keys, or authorized_keys for either role) and of the "
                      "operators (operator_keys) and status readers (status_keys)",
                      recipe_name);
    }
    return 0;
}

void kd_curve_roles_free(kd_curve_roles_t *roles) {
    for (int i = 0; i < KD_CURVE_ROLES; i++) free(roles->sets[i]);
    free(roles->all);
    memset(roles, 0, sizeof *roles);
}

bool kd_curve_role_has(const kd_curve_roles_t *roles, kd_curve_role_t role, const char *z85) {
    return z85 && z85[0] && roles->sets[role] && kd_curve_keyset_has(roles->sets[role], z85);
}

int kd_curve_keyset_load(const kd_recipe_t *r, const char *recipe_name, kd_curve_keyset_t **out,
                         char *err, size_t errlen) {
    *out = NULL;
    kd_curve_roles_t roles;
    if (kd_curve_roles_load(r, recipe_name, &roles, err, errlen) != 0) return -1;
    kd_curve_keyset_t *set = kd_xcalloc(1, sizeof *set);
    /* the keys that may stream from a teacher: workers' */
    for (int role = KD_CURVE_MEMBER; role <= KD_CURVE_WORKER; role++)
        for (int i = 0; i < roles.sets[role]->n; i++)
            keyset_add(set, roles.sets[role]->keys[i], "", err, errlen);
    kd_curve_roles_free(&roles);
    if (set->n == 0) {
        free(set);
        return kd_err(err, errlen,
                      "%s: cluster.security.curve is on but no worker key is listed "
                      "(cluster.security.worker_keys or authorized_keys)",
                      recipe_name);
    }
    *out = set;
    return 0;
}

/* Whether a tcp:// endpoint's host is a loopback address (127.0.0.0/8, ::1, localhost). */
static bool loopback_host(const char *endpoint) {
    const char *host = endpoint + 6; /* after "tcp://" */
    if (strncmp(host, "127.", 4) == 0 || strncmp(host, "localhost:", 10) == 0 ||
        strncmp(host, "[::1]:", 6) == 0)
        return true;
    return false;
}

int kd_curve_check_plaintext_bind(const kd_recipe_t *r, const char *endpoint, const char *what,
                                  char *err, size_t errlen) {
    if (r->cluster.security.curve || r->cluster.security.allow_plaintext) return 0;
    if (strncmp(endpoint, "tcp://", 6) != 0 || loopback_host(endpoint)) return 0;
    return kd_err(
        err, errlen,
        "%s is %s, reachable from other machines, but CurveZMQ is off: anyone who reaches "
        "it could join the run, read the weights or feed it batches. Turn on "
        "cluster.security.curve (docs/security.md), or set "
        "cluster.security.allow_plaintext: true for a deliberately insecure cluster",
        what, endpoint);
}

bool kd_curve_keyset_has(const kd_curve_keyset_t *set, const char *z85) {
    for (int i = 0; i < set->n; i++)
        if (strcmp(set->keys[i], z85) == 0) return true;
    return false;
}

/* ---- the ZAP handler ----------------------------------------------------------------------- */

struct kd_zap {
    pthread_t thread;
    bool started;
    void *pipe;    /* ours: "$TERM" stops the actor */
    void *handler; /* the REP on ZAP_ENDPOINT, moved to the thread */
    void *inner;   /* the actor's end of the pipe */
    kd_curve_keyset_t *keys;
    char log_id[48];
    atomic_long refused;
    atomic_bool dead; /* the actor ended without $TERM */
    kd_log_limit_t limit;
};

/* One request off the REP socket: its frames, at most ZAP_MAX_PARTS (the rest discarded). */
static int zap_receive(void *rep, zmq_msg_t *parts, int *n) {
    *n = 0;
    int more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, rep, 0) < 0) {
            zmq_msg_close(&m);
            return -1;
        }
        more = zmq_msg_more(&m);
        if (*n < ZAP_MAX_PARTS) {
            zmq_msg_init(&parts[*n]);
            zmq_msg_move(&parts[(*n)++], &m); /* zmq_msg_t is moved, never copied */
        }
        zmq_msg_close(&m);
    }
    return 0;
}

static void zap_send_text(void *rep, const char *text, size_t len, bool more) {
    zmq_send(rep, text, len, more ? ZMQ_SNDMORE : 0);
}

static void zap_reply(void *rep, zmq_msg_t *request_id, const char *status, const char *text,
                      const char *user) {
    zap_send_text(rep, "1.0", 3, true);
    zmq_send(rep, request_id ? zmq_msg_data(request_id) : "",
             request_id ? zmq_msg_size(request_id) : 0, ZMQ_SNDMORE);
    zap_send_text(rep, status, strlen(status), true);
    zap_send_text(rep, text, strlen(text), true);
    zap_send_text(rep, user, strlen(user), true);
    zap_send_text(rep, "", 0, false); /* metadata */
}

static bool part_is(zmq_msg_t *m, const char *text) {
    return zmq_msg_size(m) == strlen(text) && memcmp(zmq_msg_data(m), text, strlen(text)) == 0;
}

/* RFC 27: version, request id, domain, address, identity, mechanism, credentials... */
static void zap_handle(kd_zap_t *z, zmq_msg_t *parts, int n) {
    if (n < 6 || !part_is(&parts[0], "1.0")) {
        zap_reply(z->handler, n > 1 ? &parts[1] : NULL, "500", "malformed ZAP request", "");
        return;
    }
    char address[64];
    snprintf(address, sizeof address, "%.*s", (int)zmq_msg_size(&parts[3]),
             (const char *)zmq_msg_data(&parts[3]));
    char key[KD_CURVE_Z85_LEN + 1] = "";
    bool curve = part_is(&parts[5], "CURVE") && n == 7 && zmq_msg_size(&parts[6]) == 32;
    if (curve) zmq_z85_encode(key, zmq_msg_data(&parts[6]), 32);
    if (curve && kd_curve_keyset_has(z->keys, key)) {
        zap_reply(z->handler, &parts[1], "200", "OK", key);
        return;
    }
    long total = atomic_fetch_add(&z->refused, 1) + 1;
    zap_reply(z->handler, &parts[1], "400", curve ? "key not authorized" : "CurveZMQ only", "");
    if (kd_log_allow(&z->limit, 1.0)) {
        if (curve)
            kd_log(KD_LOG_WARN, z->log_id,
                   "refused a CurveZMQ client from %s: its public key %s is not in "
                   "cluster.security.authorized_keys (%ld refused so far)",
                   address, key, total);
        else
            kd_log(KD_LOG_WARN, z->log_id,
                   "refused a client from %s: mechanism %.*s, CurveZMQ is required (%ld refused "
                   "so far)",
                   address, (int)zmq_msg_size(&parts[5]), (const char *)zmq_msg_data(&parts[5]),
                   total);
    }
}

/* Answers ZAP requests until $TERM. If it ends any other way, closing the handler unbinds the
 * ZAP endpoint and, the domain being enforced (kd_wire_curve_server), every later handshake
 * fails: admission stops (fails closed) and the owner sees kd_zap_alive() go false. */
static void *zap_actor(void *arg) {
    kd_zap_t *z = arg;
    const char *died = NULL;
    for (;;) {
        zmq_pollitem_t items[2] = {{z->handler, 0, ZMQ_POLLIN, 0}, {z->inner, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, -1) < 0) {
            if (errno == EINTR) continue;
            died = "poll"; /* ETERM too: the context is going away */
            break;
        }
        if (items[1].revents & ZMQ_POLLIN) break; /* $TERM */
        if (!(items[0].revents & ZMQ_POLLIN)) continue;
        zmq_msg_t parts[ZAP_MAX_PARTS];
        int n = 0;
        if (zap_receive(z->handler, parts, &n) != 0) {
            died = "receive";
            break;
        }
        zap_handle(z, parts, n);
        for (int i = 0; i < n; i++) zmq_msg_close(&parts[i]);
    }
    if (died) {
        atomic_store(&z->dead, true);
        kd_log(KD_LOG_ERROR, z->log_id,
               "the CurveZMQ ZAP handler stopped (%s: %s): no new connection is admitted", died,
               zmq_strerror(errno));
    }
    zmq_close(z->handler);
    zmq_close(z->inner);
    return NULL;
}

kd_zap_t *kd_zap_new(void *ctx, const kd_curve_keyset_t *keys, const char *log_id, char *err,
                     size_t errlen) {
    kd_zap_t *z = kd_xcalloc(1, sizeof *z);
    atomic_init(&z->refused, 0);
    atomic_init(&z->dead, false);
    snprintf(z->log_id, sizeof z->log_id, "%s", log_id);
    z->keys = kd_xmalloc(sizeof *z->keys);
    memcpy(z->keys, keys, sizeof *z->keys);
    char pipe_ep[64];
    snprintf(pipe_ep, sizeof pipe_ep, "inproc://kd-zap-pipe-%p", (void *)z);
    int zero = 0;
    z->pipe = zmq_socket(ctx, ZMQ_PAIR);
    z->inner = zmq_socket(ctx, ZMQ_PAIR);
    z->handler = zmq_socket(ctx, ZMQ_REP);
    if (!z->pipe || !z->inner || !z->handler || zmq_bind(z->inner, pipe_ep) != 0 ||
        zmq_connect(z->pipe, pipe_ep) != 0) {
        kd_err(err, errlen, "cannot start the ZAP handler: %s", zmq_strerror(errno));
        goto fail;
    }
    zmq_setsockopt(z->pipe, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(z->handler, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(z->handler, ZAP_ENDPOINT) != 0) {
        kd_err(err, errlen, "cannot bind the ZAP handler on %s: %s (is another one running?)",
               ZAP_ENDPOINT, zmq_strerror(errno));
        goto fail;
    }
    /* the sockets move to the actor: pthread_create is the memory barrier ZeroMQ asks for */
    if (pthread_create(&z->thread, NULL, zap_actor, z) != 0) {
        kd_err(err, errlen, "cannot start the ZAP handler thread: %s", strerror(errno));
        goto fail;
    }
    z->started = true;
    return z;
fail:
    if (z->handler) zmq_close(z->handler);
    if (z->inner) zmq_close(z->inner);
    if (z->pipe) zmq_close(z->pipe);
    free(z->keys);
    free(z);
    return NULL;
}

bool kd_zap_alive(const kd_zap_t *z) {
    return z && !atomic_load(&((kd_zap_t *)z)->dead);
}

long kd_zap_refused(const kd_zap_t *z) {
    return z ? atomic_load(&((kd_zap_t *)z)->refused) : 0;
}

void kd_zap_destroy(kd_zap_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_zap_t *z = *self_p;
    if (z->started) {
        zmq_send(z->pipe, "$TERM", 5, 0);
        pthread_join(z->thread, NULL);
    }
    zmq_close(z->pipe);
    free(z->keys);
    free(z);
    *self_p = NULL;
}

/* ---- the client's view of its handshakes -------------------------------------------------- */

int kd_curve_watch_start(kd_curve_watch_t *w, void *ctx, void *sock, const char *name, char *err,
                         size_t errlen) {
    memset(w, 0, sizeof *w);
    w->monitor = kd_wire_monitor_events(ctx, sock, name, KD_WIRE_HANDSHAKE_EVENTS, err, errlen);
    return w->monitor ? 0 : -1;
}

void kd_curve_watch_stop(kd_curve_watch_t *w, void *sock) {
    kd_wire_monitor_close(sock, w->monitor);
    memset(w, 0, sizeof *w);
}

/* One monitor event without blocking: 1 with *event and *value, 0 when none is waiting. */
static int next_event(void *monitor, uint16_t *event, uint32_t *value) {
    zmq_msg_t head, addr;
    zmq_msg_init(&head);
    if (zmq_msg_recv(&head, monitor, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&head);
        return 0;
    }
    zmq_msg_init(&addr);
    if (zmq_msg_more(&head)) zmq_msg_recv(&addr, monitor, 0);
    *event = 0;
    *value = 0;
    if (zmq_msg_size(&head) >= 6) {
        memcpy(event, zmq_msg_data(&head), sizeof *event);
        memcpy(value, (const uint8_t *)zmq_msg_data(&head) + 2, sizeof *value);
    }
    zmq_msg_close(&head);
    zmq_msg_close(&addr);
    return 1;
}

int kd_curve_watch_check(kd_curve_watch_t *w, const char *endpoint, const kd_curve_client_t *curve,
                         char *why, size_t whylen) {
    int verdict = KD_CURVE_PENDING;
    uint32_t auth_status = 0;
    uint16_t event;
    uint32_t value;
    while (w->monitor && next_event(w->monitor, &event, &value)) {
        if (event == ZMQ_EVENT_CONNECTED) {
            w->connecting = true;
            w->connected++;
        } else if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
            w->connecting = false;
            if (verdict == KD_CURVE_PENDING) verdict = KD_CURVE_OK;
        } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
            w->connecting = false;
            verdict = KD_CURVE_REFUSED;
            auth_status = value;
        } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                   value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) {
            w->connecting = false;
            if (verdict != KD_CURVE_REFUSED) verdict = KD_CURVE_MISMATCH;
        } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ||
                   event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL ||
                   (event == ZMQ_EVENT_DISCONNECTED && w->connecting)) {
            /* closed without a verdict: a wrong server key looks like this to the client */
            w->connecting = false;
            w->broken++;
        }
    }
    if (verdict == KD_CURVE_REFUSED && curve)
        kd_err(why, whylen,
               "%s refused this node's CurveZMQ public key %s (ZAP status %u): add it, or its "
               ".pub file, to cluster.security.authorized_keys in the recipe",
               endpoint, curve->self.public_z85, auth_status);
    else if (verdict == KD_CURVE_REFUSED)
        kd_err(why, whylen, "%s refused this node (ZAP status %u)", endpoint, auth_status);
    else if (verdict == KD_CURVE_MISMATCH && curve)
        kd_err(why, whylen,
               "%s does not use CurveZMQ but this node was given a key (--key or %s): turn "
               "cluster.security.curve on in the recipe, or start the node without a key",
               endpoint, KD_CURVE_ENV_KEY);
    else if (verdict == KD_CURVE_MISMATCH)
        kd_err(why, whylen,
               "%s uses CurveZMQ (cluster.security.curve is on): give this node its key pair "
               "with --key FILE (or %s) and the coordinator's public key with --coordinator-key "
               "(or %s)",
               endpoint, KD_CURVE_ENV_KEY, KD_CURVE_ENV_SERVER);
    return verdict;
}

/* ---- command-line and environment --------------------------------------------------------- */

int kd_curve_client_from_args(const char *key_opt, const char *server_opt,
                              const char *server_fallback, kd_curve_client_t *out, bool *on,
                              char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    *on = false;
    const char *env_key = getenv(KD_CURVE_ENV_KEY), *env_server = getenv(KD_CURVE_ENV_SERVER);
    const char *key = key_opt ? key_opt : env_key && env_key[0] ? env_key : NULL;
    const char *key_what = key_opt ? "--key" : KD_CURVE_ENV_KEY;
    const char *server = server_opt                              ? server_opt
                         : env_server && env_server[0]           ? env_server
                         : server_fallback && server_fallback[0] ? server_fallback
                                                                 : NULL;
    const char *server_what = server_opt                    ? "--coordinator-key"
                              : env_server && env_server[0] ? KD_CURVE_ENV_SERVER
                                                            : "cluster.security.coordinator_key";
    if (!key && server_opt)
        return kd_err(err, errlen,
                      "--coordinator-key without --key: a CurveZMQ client needs its own key pair "
                      "too (--key FILE or %s)",
                      KD_CURVE_ENV_KEY);
    if (!key) return 0;
    char why[KD_ERR_LEN];
    if (kd_curve_load_pair(key, &out->self, why, sizeof why) != 0)
        return kd_err(err, errlen, "%s: %s", key_what, why);
    if (!server)
        return kd_err(err, errlen,
                      "%s gives this node a CurveZMQ key but the coordinator's public key is "
                      "missing: give --coordinator-key FILE|Z85 (or set %s)",
                      key_what, KD_CURVE_ENV_SERVER);
    if (kd_curve_load_public(server, server_what, out->server_z85, err, errlen) != 0) return -1;
    *on = true;
    return 0;
}
