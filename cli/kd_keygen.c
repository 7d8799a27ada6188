/* kdist keygen: CurveZMQ key pairs (kd_curve.h, docs/security.md). One pair, NAME.key (secret,
 * mode 0600) and NAME.pub, or with --cluster the pairs of every role that `kdist run` finds in
 * cluster.security.keys_dir, plus the recipe lines that turn CurveZMQ on with them. Existing
 * key files are never overwritten without --force. */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "kd_cli.h"
#include "kd_curve.h"
#include "kd_util.h"

const char *const cli_key_roles[CLI_KEY_ROLES] = {
    [CLI_KEY_COORDINATOR] = "coordinator",
    [CLI_KEY_TEACHER] = "teacher",
    [CLI_KEY_WORKER] = "worker",
    [CLI_KEY_CLIENT] = "client",
};

static void keygen_usage(FILE *out) {
    fprintf(out,
            "usage: kdist keygen NAME [--dir DIR] [--force]\n"
            "       kdist keygen --cluster DIR [--force]\n"
            "  NAME: writes DIR/NAME.key (the key pair, mode 0600: keep it on the node that\n"
            "        uses it) and DIR/NAME.pub (the public key, for authorized_keys); DIR\n"
            "        defaults to the current directory\n"
            "  --cluster DIR: a pair for each role of a cluster (coordinator, teacher, worker,\n"
            "        client) in DIR, and on stdout the recipe lines that turn CurveZMQ on\n"
            "        with them (cluster.security; kdist run reads keys_dir)\n"
            "  --force: replace existing key files (then update every authorized_keys list\n"
            "        that named the old public keys)\n");
}

/* A key name becomes a file name: no slashes, no leading dot or dash. */
static bool valid_name(const char *name) {
    if (!name[0] || name[0] == '.' || name[0] == '-' || strlen(name) > 64) return false;
    for (const char *p = name; *p; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '.' || c == '-';
        if (!ok) return false;
    }
    return true;
}

static int one_pair(const char *dir, const char *name, bool force) {
    char err[KD_ERR_LEN];
    kd_curve_pair_t pair;
    if (kd_curve_generate(dir, name, force, &pair, err, sizeof err) != 0) {
        fprintf(stderr, "kdist keygen: %s\n", err);
        return 1;
    }
    fprintf(stderr, "kdist keygen: wrote %s/%s.key (the key pair, mode 0600) and %s/%s.pub\n", dir,
            name, dir, name);
    printf("%s\n", pair.public_z85);
    fprintf(stderr,
            "the public key above goes into the recipe's cluster.security.authorized_keys\n"
            "(as text, or as the path %s/%s.pub); start the node with --key %s/%s.key\n",
            dir, name, dir, name);
    return 0;
}

/* Every role's pair, all or nothing: nothing is written when one file already exists. */
static int cluster_pairs(const char *dir, bool force) {
    char err[KD_ERR_LEN];
    for (int i = 0; i < CLI_KEY_ROLES && !force; i++)
        for (int pub = 0; pub < 2; pub++) {
            char path[KD_PATH_MAX + 32];
            snprintf(path, sizeof path, "%s/%s.%s", dir, cli_key_roles[i], pub ? "pub" : "key");
            if (kd_file_exists(path)) {
                fprintf(stderr,
                        "kdist keygen: %s exists: key files are never overwritten (give --force "
                        "to replace every pair in %s)\n",
                        path, dir);
                return 1;
            }
        }
    kd_curve_pair_t pairs[CLI_KEY_ROLES];
    for (int i = 0; i < CLI_KEY_ROLES; i++)
        if (kd_curve_generate(dir, cli_key_roles[i], force, &pairs[i], err, sizeof err) != 0) {
            fprintf(stderr, "kdist keygen: %s\n", err);
            return 1;
        }
    fprintf(stderr,
            "kdist keygen: wrote the key pairs of a cluster in %s: coordinator, teacher, worker\n"
            "and client (.key: the pair, mode 0600; .pub: the public key). Put these lines in\n"
            "the recipe (merged into its `cluster:` section):\n",
            dir);
    printf("cluster:\n"
           "  security:\n"
           "    curve: true\n"
           "    keys_dir: \"%s\"\n"
           "    coordinator_key: \"%s\"\n"
           "    worker_keys: [\"%s\"]\n"
           "    teacher_keys: [\"%s\"]\n"
           "    operator_keys: [\"%s\"]  # client: stop, drain, checkpoint, status\n",
           dir, pairs[CLI_KEY_COORDINATOR].public_z85, pairs[CLI_KEY_WORKER].public_z85,
           pairs[CLI_KEY_TEACHER].public_z85, pairs[CLI_KEY_CLIENT].public_z85);
    fflush(stdout);
    fprintf(stderr,
            "kdist run then starts every role with its pair from %s; elsewhere start them with\n"
            "--key %s/ROLE.key and --coordinator-key %s/coordinator.pub (docs/security.md)\n",
            dir, dir, dir);
    return 0;
}

int kd_cmd_keygen(int argc, char **argv) {
    const char *name = NULL, *dir = NULL, *cluster = NULL;
    bool force = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            keygen_usage(stdout);
            return 0;
        } else if (strcmp(a, "--force") == 0) {
            force = true;
        } else if ((strcmp(a, "--dir") == 0 || strcmp(a, "--cluster") == 0) && i + 1 < argc) {
            *(strcmp(a, "--dir") == 0 ? &dir : &cluster) = argv[++i];
        } else if (a[0] != '-' && !name) {
            name = a;
        } else {
            fprintf(stderr, "kdist keygen: unexpected argument '%s'\n", a);
            keygen_usage(stderr);
            return 2;
        }
    }
    if (cluster && (name || dir)) {
        fprintf(stderr, "kdist keygen: --cluster DIR makes its own names; drop %s\n",
                name ? name : "--dir");
        return 2;
    }
    if (cluster) return cluster_pairs(cluster, force);
    if (!name) {
        keygen_usage(stderr);
        return 2;
    }
    if (!valid_name(name)) {
        fprintf(stderr,
                "kdist keygen: '%s' cannot name key files: use 1 to 64 of A-Z a-z 0-9 _ . - "
                "(not starting with . or -), and --dir for the directory\n",
                name);
        return 2;
    }
    return one_pair(dir ? dir : ".", name, force);
}
