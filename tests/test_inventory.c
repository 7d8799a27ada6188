/* test_inventory: the deployment inventory of deploy/kdist-cluster (cli/kd_inventory.c). The
 * documented example parses to what it says; defaults fill what an inventory leaves out; every
 * mistake is an error naming the file, line, column and key (unknown keys with a did-you-mean,
 * wrong types and ranges, roles on undefined hosts, port clashes, duplicates, bad YAML); the
 * plan lists hosts, roles, the files each host needs and the overrides kdist-cluster applies.
 * The parser's functions are file-private, so the test compiles cli/kd_inventory.c in. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_test.h"
#include "../cli/kd_inventory.c"

static char tmp[1024];
static char err[4096];
static cli_inventory_t inv;

static int parse(const char *text) {
    err[0] = 0;
    char path[1100];
    snprintf(path, sizeof path, "%s/inv.yaml", tmp);
    return cli_inventory_parse(path, text, strlen(text), &inv, err, sizeof err);
}

/* The parse fails and its message holds every given piece (NULL-terminated). */
static void expect_error(const char *text, ...) {
    int rc = parse(text);
    CHECK(rc == -1);
    va_list ap;
    va_start(ap, text);
    for (const char *s; (s = va_arg(ap, const char *));) CHECK_ERR_HAS(err, s);
    va_end(ap);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

#define HOSTS3                                                                                     \
    "hosts:\n"                                                                                     \
    "  - {name: h1, address: 10.0.0.1}\n"                                                          \
    "  - {name: h2, address: 10.0.0.2}\n"                                                          \
    "  - {name: h3, address: 10.0.0.3}\n"

#define ROLES3                                                                                     \
    "roles:\n"                                                                                     \
    "  coordinator: {host: h1, port: 5555}\n"                                                      \
    "  teachers:\n"                                                                                \
    "    - {host: h2, port: 5556}\n"                                                               \
    "  workers:\n"                                                                                 \
    "    - {host: h3, count: 2}\n"

static void test_example(void) {
    /* the example names ~/.ssh/kdist_ed25519, which must exist to validate */
    char home[1100], ssh_dir[1200], key[1300];
    snprintf(home, sizeof home, "%s/home", tmp);
    snprintf(ssh_dir, sizeof ssh_dir, "%s/.ssh", home);
    snprintf(key, sizeof key, "%s/kdist_ed25519", ssh_dir);
    mkdir(home, 0700);
    mkdir(ssh_dir, 0700);
    write_file(key, "not a real key\n");
    const char *old_home = getenv("HOME");
    char *saved = old_home ? strdup(old_home) : NULL;
    setenv("HOME", home, 1);
    int rc = cli_inventory_load("../deploy/inventory.example.yaml", &inv, err, sizeof err);
    if (rc != 0) fprintf(stderr, "%s\n", err);
    CHECK(rc == 0);
    CHECK(inv.n_hosts == 4);
    CHECK(strcmp(inv.ssh.user, "kdist") == 0);
    CHECK(strcmp(inv.ssh.identity, key) == 0);
    CHECK(strcmp(inv.ssh.strict, "accept-new") == 0);
    CHECK(strcmp(inv.hosts[0].name, "head") == 0);
    CHECK(strcmp(inv.hosts[0].install_dir, "/opt/kdist") == 0); /* from defaults */
    CHECK(strcmp(inv.hosts[1].data_dir, "/scratch/kdist/data") == 0);
    CHECK(strcmp(inv.hosts[0].data_dir, "/var/lib/kdist/data") == 0);
    CHECK(strcmp(inv.hosts[2].user, "ubuntu") == 0);
    CHECK(strcmp(inv.hosts[3].user, "kdist") == 0); /* ssh.user */
    CHECK(inv.coordinator.host == 0 && inv.coordinator.port == 5555);
    CHECK(inv.n_teachers == 1 && inv.teachers[0].host == 1 && inv.teachers[0].port == 5556);
    CHECK(inv.n_worker_groups == 2 && inv.total_workers == 4);
    CHECK(inv.workers[0].threads == 4 && inv.workers[1].threads == 0);
    CHECK(inv.ship.binaries && inv.ship.data && inv.ship.teacher_checkpoint);
    if (saved) {
        setenv("HOME", saved, 1);
        free(saved);
    }
}

static void test_defaults(void) {
    int rc = parse("hosts:\n"
                   "  - name: solo\n" ROLES3);
    CHECK(rc == -1); /* h1.. are not defined: the roles name hosts that do not exist */
    CHECK_ERR_HAS(err, "no host 'h1'");
    rc = parse("hosts:\n"
               "  - name: solo\n"
               "roles:\n"
               "  coordinator: {host: solo, port: 5555}\n"
               "  teachers: [{host: solo, port: 5556}]\n"
               "  workers: [{host: solo}]\n");
    if (rc) fprintf(stderr, "%s\n", err);
    CHECK(rc == 0);
    CHECK(strcmp(inv.hosts[0].address, "solo") == 0); /* the name, for DNS */
    CHECK(inv.hosts[0].user[0] == 0 && inv.hosts[0].port == 22);
    CHECK(strcmp(inv.hosts[0].install_dir, "kdist") == 0);
    CHECK(strcmp(inv.hosts[0].run_dir, "kdist/run") == 0);
    CHECK(strcmp(inv.hosts[0].supervisor, "auto") == 0 && inv.hosts[0].max_restarts == 3);
    CHECK(inv.workers[0].count == 1 && inv.total_workers == 1);
    CHECK(inv.ssh.connect_timeout == 10 && strcmp(inv.ssh.strict, "accept-new") == 0);
    /* defaults written after the hosts still apply to them */
    rc = parse(HOSTS3 ROLES3 "defaults: {run_dir: /srv/kd, max_restarts: 0}\n"
                             "ssh: {port: 2222, user: ops}\n");
    CHECK(rc == 0);
    CHECK(strcmp(inv.hosts[2].run_dir, "/srv/kd") == 0 && inv.hosts[2].max_restarts == 0);
    CHECK(inv.hosts[1].port == 2222 && strcmp(inv.hosts[1].user, "ops") == 0);
}

static void test_errors(void) {
    expect_error("hots: []\n", "inv.yaml:1:1:", "unknown key 'hots' in the inventory",
                 "did you mean 'hosts'?", NULL);
    expect_error(HOSTS3 ROLES3 "ship:\n  dta: false\n",
                 "inv.yaml:12:3:", "unknown key 'dta' in ship (did you mean 'data'?)", NULL);
    expect_error("hosts:\n  - {name: h1, adress: 10.0.0.1}\n",
                 "inv.yaml:2:16:", "unknown key 'adress' in hosts[0] (did you mean 'address'?)",
                 NULL);
    expect_error("hosts:\n  - {name: h1, port: twenty}\n",
                 "inv.yaml:2:22:", "hosts[0].port must be a whole number, got 'twenty'", NULL);
    expect_error("hosts:\n  - {name: h1, port: 70000}\n",
                 "hosts[0].port must be between 1 and 65535", NULL);
    expect_error("hosts:\n  name: h1\n", "inv.yaml:2:3:", "hosts must be a list", NULL);
    expect_error("hosts:\n  - {name: 'h 1'}\n", "hosts[0].name must not contain spaces", NULL);
    expect_error("hosts:\n  - {name: h/1}\n", "hosts[0].name may only hold letters", NULL);
    expect_error("hosts:\n  - {address: 10.0.0.1}\n", "hosts[0] has no name", NULL);
    expect_error("hosts:\n  - {name: h1}\n  - {name: h1}\n",
                 "inv.yaml:3:5:", "host name 'h1' is already used by hosts[0] (line 2)", NULL);
    expect_error("ssh: {port: 22, port: 23}\n", "'port' is given twice (first at line 1)", NULL);
    expect_error("ssh: {strict_host_key_checking: maybe}\n",
                 "ssh.strict_host_key_checking must be one of accept-new, yes, no, got 'maybe'",
                 NULL);
    expect_error("defaults: {supervisor: sytemd}\n", "did you mean 'systemd'?", NULL);
    expect_error("defaults: {run_dir: '~/kdist'}\n", "without '~'", NULL);
    expect_error("defaults: {data_dir: '/my data'}\n", "defaults.data_dir must not contain spaces",
                 NULL);
    expect_error("ship: {data: maybe}\n", "ship.data must be true or false", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n  teachers: []\n"
                        "  workers: [{host: h3}]\n",
                 "roles.teachers is empty", NULL);
    expect_error(HOSTS3 "roles:\n  teachers: [{host: h2, port: 1}]\n  workers: [{host: h3}]\n",
                 "roles has no coordinator", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n"
                        "  teachers: [{host: gpu2, port: 5556}]\n  workers: [{host: h3}]\n",
                 "inv.yaml:7:21:", "roles.teachers[0].host: no host 'gpu2' in hosts",
                 "(hosts: h1, h2, h3)", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n"
                        "  teachers: [{host: h2, port: 5556}]\n  workers: [{host: h4}]\n",
                 "roles.workers[0].host: no host 'h4' in hosts (did you mean 'h1'?)", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1}\n  teachers: [{host: h2, port: 1}]\n"
                        "  workers: [{host: h3}]\n",
                 "roles.coordinator has no port", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n"
                        "  teachers:\n    - {host: h2, port: 5556}\n    - {host: h1, port: 5555}\n"
                        "  workers: [{host: h3}]\n",
                 "inv.yaml:9:24:",
                 "roles.teachers[1].port: port 5555 on 10.0.0.1 is already taken by "
                 "roles.coordinator.port (line 6)",
                 NULL);
    /* two names for one machine share its ports */
    expect_error("hosts:\n  - {name: a, address: 10.0.0.9}\n  - {name: b, address: 10.0.0.9}\n"
                 "roles:\n  coordinator: {host: a, port: 5555}\n"
                 "  teachers: [{host: b, port: 5555}]\n  workers: [{host: a}]\n",
                 "port 5555 on 10.0.0.9 is already taken", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n"
                        "  teachers: [{host: h2, port: 5556}]\n"
                        "  workers: [{host: h3}, {host: h3, count: 4}]\n",
                 "roles.workers[1].host: host 'h3' is already in roles.workers[0]", NULL);
    expect_error(HOSTS3
                 "roles:\n  coordinator: {host: h1, port: 5555}\n"
                 "  teachers: [{host: h2, port: 5556}]\n  workers: [{host: h3, count: -1}]\n",
                 "roles.workers[0].count must be between 0 and 1024", NULL);
    expect_error(HOSTS3 "roles:\n  coordinator: {host: h1, port: 5555}\n  schedulers: []\n",
                 "unknown key 'schedulers' in roles", NULL);
    expect_error("hosts: [\n", "inv.yaml:2:1:", "invalid YAML", NULL);
    expect_error("", "the inventory is empty", NULL);
    expect_error("- a\n- b\n", "an inventory must be a mapping", NULL);
    expect_error("ssh: {identity: /nonexistent/key}\n",
                 "ssh.identity: /nonexistent/key: no such file", NULL);
    /* the message shows the line and a caret under the column, as the recipe's do */
    expect_error("hosts:\n  - {name: h1, port: twenty}\n", "\n  - {name: h1, port: twenty}\n",
                 "\n                     ^", NULL);
}

/* Truncated, oversized and malformed input: an error (never a crash), and never a silent
 * success for an inventory cut short before its roles. */
static void test_hostile(void) {
    uint8_t *data;
    size_t len;
    CHECK(kd_read_file("../deploy/inventory.example.yaml", &data, &len, err, sizeof err) == 0);
    char *cut = kd_xmalloc(len + 1);
    int parsed = 0, refused = 0;
    for (size_t n = 0; n < len; n += 7) {
        memcpy(cut, data, n);
        cut[n] = 0;
        int rc = cli_inventory_parse("cut.yaml", cut, n, &inv, err, sizeof err);
        rc == 0 ? parsed++ : refused++;
        if (rc != 0) CHECK(strncmp(err, "cut.yaml:", 9) == 0);
    }
    CHECK(refused > 0 && parsed == 0); /* the identity file is missing here: never complete */
    free(cut);
    free(data);

    char big[6000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    char text[8000];
    snprintf(text, sizeof text, "hosts:\n  - {name: h1, address: %.300s}\n", big);
    expect_error(text, "hosts[0].address is too long (255 bytes at most)", NULL);
    snprintf(text, sizeof text, "hosts:\n  - {name: %s}\n", big);
    expect_error(text, "hosts[0].name is too long", NULL);
    /* a long line is shown cut, the caret still under its column */
    snprintf(text, sizeof text, "hosts:\n  - {name: h1, port: %.200s}\n", big);
    expect_error(text, "hosts[0].port must be a whole number", NULL);
    expect_error("hosts:\n  - {name: h1, port: 99999999999999999999999}\n", "whole number", NULL);
    expect_error("hosts: !!binary aGk=\n", "hosts must be a list", NULL);
    expect_error("{hosts: [{name: [a]}]}\n", "hosts[0].name must be a single value, got a list",
                 NULL);
    expect_error("? [a, b]\n: c\n", "keys must be plain words", NULL);
    expect_error("hosts: &h [{name: a}]\nroles: *h\n", "roles must be a mapping", NULL);
    expect_error("hosts: [{name: a}]\n---\nhosts: []\n", "the inventory has no roles", NULL);
    expect_error("hosts: \xc3\x28\n", "invalid YAML", NULL); /* not UTF-8 */
    /* the caret counts characters as libyaml does, not bytes */
    expect_error("ssh: {user: \xc3\xa9t\xc3\xa9, port: x}\n", "ssh.port must be a whole number",
                 "\n                       ^", NULL);
    expect_error("hosts:\n\t- a\n", "invalid YAML", NULL);
    /* more hosts than fit */
    char *many = kd_xmalloc(40 * (INV_MAX_HOSTS + 2) + 64);
    size_t used = (size_t)sprintf(many, "hosts:\n");
    for (int i = 0; i <= INV_MAX_HOSTS; i++)
        used += (size_t)sprintf(many + used, "  - {name: h%d}\n", i);
    expect_error(many, "more than 256 hosts", NULL);
    free(many);
}

static char *plan_text(const char *recipe, const char *const *ov, int n_ov, int *rc) {
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    inv_print_inventory(&inv, out);
    *rc = recipe ? inv_print_run(&inv, recipe, ov, n_ov, out, err, sizeof err) : 0;
    fclose(out);
    return text;
}

static void test_plan(void) {
    char data[1100], recipe[1100], ckpt[1100], path[1200];
    snprintf(data, sizeof data, "%s/data", tmp);
    mkdir(data, 0755);
    const char *files[] = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", data, files[i]);
        write_file(path, "x"); /* the plan checks that they are there, not what they hold */
    }
    snprintf(recipe, sizeof recipe, "%s/r.yaml", tmp);
    snprintf(ckpt, sizeof ckpt, "%s/teacher.safetensors", tmp);
    char text[4096];
    snprintf(text, sizeof text,
             "name: planned\n"
             "student:\n  layers: [{type: flatten}, {type: linear, out_features: 10}]\n"
             "teacher:\n  checkpoint: %s\n  layers: [{type: flatten}, {type: linear, "
             "out_features: 10}]\n"
             "distill: {alpha: 0.5}\n"
             "data: {dir: %s}\n",
             ckpt, data);
    write_file(recipe, text);

    CHECK(parse(HOSTS3 ROLES3 "ssh: {user: root}\n") == 0);
    int rc;
    char *p = plan_text(recipe, NULL, 0, &rc);
    CHECK(rc == -1); /* the teacher's weights are not there yet */
    CHECK_ERR_HAS(err, "teacher.safetensors");
    CHECK_ERR_HAS(err, "the recipe's teacher.checkpoint");
    free(p);

    write_file(ckpt, "w");
    const char *ov[] = {"train.epochs=3"};
    p = plan_text(recipe, ov, 1, &rc);
    if (rc) fprintf(stderr, "%s\n", err);
    CHECK(rc == 0);
    CHECK_ERR_HAS(p, "\nformat 1\n");
    CHECK_ERR_HAS(p, "\nssh accept-new 10 - -\n");
    CHECK_ERR_HAS(p, "\nhost h1 10.0.0.1 root 22 kdist kdist/run kdist/data auto 3\n");
    CHECK_ERR_HAS(p, "\ncoordinator h1 5555 tcp://10.0.0.1:5555\n");
    CHECK_ERR_HAS(p, "\nteacher 0 h2 5556 tcp://10.0.0.2:5556\n");
    CHECK_ERR_HAS(p, "\nworkers h3 2 0\n");
    snprintf(text, sizeof text, "\nrun planned %s\n", recipe);
    CHECK_ERR_HAS(p, text);
    snprintf(text, sizeof text, "\ndata train_images %s/%s %s\n", data, files[0], files[0]);
    CHECK_ERR_HAS(p, text);
    CHECK_ERR_HAS(p, "\noverride data.test_labels=t10k-labels-idx1-ubyte.gz\n");
    snprintf(text, sizeof text, "\ncheckpoint %s\n", ckpt);
    CHECK_ERR_HAS(p, text);
    CHECK_ERR_HAS(p, "\noverride cluster.bind=tcp://10.0.0.1:5555\n");
    CHECK_ERR_HAS(p, "\noverride cluster.teachers=1\n");
    CHECK_ERR_HAS(p, "\noverride cluster.workers=2\n");
    CHECK_ERR_HAS(p, "\nship h1 bin,recipe,data,checkpoint\n");
    CHECK_ERR_HAS(p, "\nship h2 bin,recipe,data,checkpoint\n");
    CHECK_ERR_HAS(p, "\nship h3 bin\n");
    /* every record is space-separated words: no field holds whitespace */
    for (char *line = strtok(p, "\n"); line; line = strtok(NULL, "\n"))
        CHECK(line[0] == '#' || !strstr(line, "  "));
    free(p);

    /* overrides the inventory decides are refused; a wrong one is the recipe loader's error */
    const char *bind[] = {"cluster.bind=tcp://0.0.0.0:1"};
    free(plan_text(recipe, bind, 1, &rc));
    CHECK(rc == -1);
    CHECK_ERR_HAS(err, "cluster.bind comes from the inventory");
    const char *typo[] = {"train.epocs=3"};
    free(plan_text(recipe, typo, 1, &rc));
    CHECK(rc == -1);
    CHECK_ERR_HAS(err, "did you mean 'train.epochs'?");
    const char *spaced[] = {"name=a b"};
    free(plan_text(recipe, spaced, 1, &rc));
    CHECK(rc == -1);
    CHECK_ERR_HAS(err, "without spaces");

    /* nothing shipped that the hosts already have; a missing dataset file is named */
    CHECK(parse(HOSTS3 ROLES3
                "ship: {data: false, teacher_checkpoint: false, binaries: false}\n") == 0);
    p = plan_text(recipe, NULL, 0, &rc);
    CHECK(rc == 0);
    CHECK(!strstr(p, "\ndata ") && !strstr(p, "\ncheckpoint "));
    CHECK_ERR_HAS(p, "\nship h1 recipe\n");
    CHECK_ERR_HAS(p, "\nship h3 -\n");
    free(p);
    snprintf(path, sizeof path, "%s/%s", data, files[2]);
    remove(path);
    CHECK(parse(HOSTS3 ROLES3) == 0);
    free(plan_text(recipe, NULL, 0, &rc));
    CHECK(rc == -1);
    CHECK_ERR_HAS(err, "data.test_images");
    CHECK_ERR_HAS(err, "ship.data: false");

    /* IPv6 endpoints are bracketed; the inventory's local paths are relative to its directory */
    CHECK(parse("hosts:\n  - {name: v6, address: 'fd00::5'}\n"
                "roles:\n  coordinator: {host: v6, port: 5555}\n"
                "  teachers: [{host: v6, port: 5556}]\n  workers: [{host: v6}]\n"
                "recipe: r.yaml\nteacher_checkpoint: weights/t.safetensors\n") == 0);
    p = plan_text(NULL, NULL, 0, &rc);
    CHECK_ERR_HAS(p, "\ncoordinator v6 5555 tcp://[fd00::5]:5555\n");
    free(p);
    snprintf(path, sizeof path, "%s/r.yaml", tmp);
    CHECK(strcmp(inv.recipe, path) == 0);
    snprintf(path, sizeof path, "%s/weights/t.safetensors", tmp);
    CHECK(strcmp(inv.teacher_checkpoint, path) == 0);
}

static void test_command(void) {
    char path[1100];
    snprintf(path, sizeof path, "%s/cmd.yaml", tmp);
    write_file(path, HOSTS3 ROLES3);
    char *check[] = {"check", path, NULL};
    CHECK(kd_cmd_inventory(2, check) == 0);
    char *usage[] = {"frobnicate", path, NULL};
    CHECK(kd_cmd_inventory(2, usage) == 2);
    write_file(path, "hosts: 3\n");
    CHECK(kd_cmd_inventory(2, check) == 1);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_inventory"));
    test_example();
    test_defaults();
    test_errors();
    test_hostile();
    test_plan();
    test_command();
    return kd_test_done("test_inventory");
}
