#!/usr/bin/python3
"""Checks the Kubernetes manifests and Dockerfile of deploy/k8s against what the project defines.

    check_k8s.py --repo SRC_DIR --manifests DIR --bin-dir BIN_DIR

Every YAML document parses and has apiVersion, kind and metadata.name. Every kdist program a
container runs (command, args, a `sh -c` script, probes) is an executable target of the CMake
files, is built in BIN_DIR and installed by the Dockerfile, and every flag it is given appears in
its --help/usage output. Every ConfigMap, key and file path a pod reads exists; the recipe passes
`kdist recipe check` with the overrides the pods add. Every tcp:// endpoint is either this pod
(its port a containerPort of the container) or a Service defined here (its port a port of that
Service), every containerPort is bound by the container, every Service's selector picks a pod
template and its targetPorts are ports of those pods, every workload's selector matches its
template. The Dockerfile copies only paths of the repository, builds the binaries it installs,
and installs the Debian packages of their shared libraries and of the recipe's dataset.

CurveZMQ (issue 10): every kdist program that speaks to another pod is given its key pair with
--key, a file of the Secret kdist-keys that its pod mounts; the Secret's items are files that
`kdist keygen --cluster` makes (the README's way to create the Secret); and the recipe turns
cluster.security.curve on, since the coordinator and the teachers bind addresses other pods
reach (they refuse plaintext there).

Prints one line per problem, naming the file and object, and exits 1 when there is any.
Needs only python3-yaml and the built binaries (no kubectl, no docker).
"""
import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}
# What a container's shell script may run besides the project's programs: shell builtins and the
# utilities of every Debian base image.
SHELL_COMMANDS = {
    "[", ":", "cat", "cd", "echo", "exec", "exit", "export", "grep", "mkdir", "printf", "rm",
    "sed", "set", "sleep", "test", "trap", "true", "false", "wait",
}
SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi", "while", "until", "do", "done", "for", "!"}
SEPARATORS = {";", "&&", "||", "|", "(", ")", "&", "\n"}
REDIRECTIONS = {">", ">>", "<", ">&", "<&", "2>", "2>&1"}
SELF_HOSTS = {"0.0.0.0", "127.0.0.1", "localhost", "*"}
SANITIZER_LIBS = re.compile(r"^lib(asan|ubsan|tsan|lsan)\.so")
ENDPOINT = re.compile(r"tcp://([^\s:/'\"]+):([0-9]+|\*)")
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")
KEYS_SECRET = "kdist-keys"  # deploy/k8s/README.md, "Keys": kubectl create secret generic ...
# programs that connect to or bind for other pods: under CurveZMQ each needs its pair
NETWORK_PROGRAMS = {"kdist-coordinator", "kdist-teacher", "kdist-worker"}


class Checker:
    def __init__(self, repo, manifests, bin_dir):
        self.repo, self.manifests, self.bin_dir = repo, manifests, bin_dir
        self.errors = []
        self.docs = []  # (where, doc) in file order
        self.by_kind = {}  # kind -> {name: (where, doc)}
        self.help_cache = {}
        self.targets = self.cmake_targets()
        self.used_binaries = {}  # binary -> where first used
        self.recipe_uses = []  # (where, configmap, key, overrides)
        self.dataset_dirs = set()
        self.images = {}  # image -> where first used
        self.keygen_files = self.cluster_key_files()

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    # ---- the project ----------------------------------------------------------------------

    def cluster_key_files(self):
        """The files `kdist keygen --cluster DIR` writes: what the Secret may hold."""
        with tempfile.TemporaryDirectory() as tmp:
            keys = os.path.join(tmp, "keys")
            p = subprocess.run([os.path.join(self.bin_dir, "kdist"), "keygen", "--cluster", keys],
                               capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                self.fail(self.bin_dir, f"kdist keygen --cluster fails: {p.stderr.strip()}")
                return set()
            return set(os.listdir(keys))

    def cmake_targets(self):
        targets = set()
        for root, dirs, files in os.walk(self.repo):
            dirs[:] = [d for d in dirs if not d.startswith((".", "build"))]
            if "CMakeLists.txt" in files:
                with open(os.path.join(root, "CMakeLists.txt")) as f:
                    text = re.sub(r"#.*", "", f.read())
                targets.update(re.findall(r"add_executable\(\s*([A-Za-z0-9_.+-]+)", text))
        return targets

    def help_text(self, argv):
        """The usage a program prints for --help, whatever its exit code."""
        key = tuple(argv)
        if key not in self.help_cache:
            try:
                p = subprocess.run([os.path.join(self.bin_dir, argv[0])] + argv[1:] + ["--help"],
                                   capture_output=True, text=True, timeout=30)
                self.help_cache[key] = p.stdout + p.stderr
            except OSError as e:
                self.help_cache[key] = ""
                self.fail(argv[0], f"cannot run {self.bin_dir}/{argv[0]} --help: {e}")
        return self.help_cache[key]

    @staticmethod
    def flags_in(text):
        return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))

    # ---- manifests ------------------------------------------------------------------------

    def load(self):
        files = sorted(glob.glob(os.path.join(self.manifests, "*.yaml")) +
                       glob.glob(os.path.join(self.manifests, "*.yml")))
        if not files:
            self.fail(self.manifests, "no *.yaml manifests")
        for path in files:
            name = os.path.relpath(path, self.manifests)
            try:
                with open(path) as f:
                    docs = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                self.fail(name, f"does not parse: {e}")
                continue
            for i, doc in enumerate(docs):
                if doc is None:
                    continue
                where = f"{name} document {i + 1}"
                if not isinstance(doc, dict):
                    self.fail(where, "is not a mapping")
                    continue
                missing = [k for k in ("apiVersion", "kind", "metadata") if not doc.get(k)]
                if missing:
                    self.fail(where, f"has no {', '.join(missing)}")
                    continue
                meta = doc["metadata"]
                if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
                    self.fail(where, "metadata has no name")
                    continue
                kind, obj = doc["kind"], meta["name"]
                where = f"{name}: {kind} {obj}"
                if obj in self.by_kind.setdefault(kind, {}):
                    self.fail(where, f"is defined twice (also in {self.by_kind[kind][obj][0]})")
                self.by_kind[kind][obj] = (where, doc)
                self.docs.append((where, doc))

    def objects(self, kind):
        return self.by_kind.get(kind, {}).items()

    def workloads(self):
        for kind in sorted(WORKLOAD_KINDS):
            for _, (where, doc) in sorted(self.objects(kind)):
                yield where, doc

    # ---- workloads --------------------------------------------------------------------------

    def check_workload(self, where, doc):
        spec = doc.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        if not match:
            self.fail(where, "has no spec.selector.matchLabels")
        for k, v in match.items():
            if labels.get(k) != v:
                self.fail(where, f"selector {k}={v} does not match the pod template's labels "
                                 f"{labels}")
        if doc["kind"] == "StatefulSet":
            svc = spec.get("serviceName")
            if svc not in self.by_kind.get("Service", {}):
                self.fail(where, f"serviceName '{svc}' is not a Service defined here")
        pod = template.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        claims = {(c.get("metadata") or {}).get("name") for c in spec.get("volumeClaimTemplates")
                  or []}
        for v in volumes.values():
            cm = v.get("configMap")
            if cm:
                self.check_configmap_volume(f"{where} volume {v['name']}", cm)
            if v.get("secret"):
                self.check_secret_volume(f"{where} volume {v['name']}", v["secret"])
        containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
        if not containers:
            self.fail(where, "has no containers")
        for c in containers:
            self.check_container(f"{where} container {c.get('name')}", c, volumes, claims)

    def configmap_data(self, name):
        entry = self.by_kind.get("ConfigMap", {}).get(name)
        return None if entry is None else (entry[1].get("data") or {})

    def check_configmap_volume(self, where, cm):
        data = self.configmap_data(cm.get("name"))
        if data is None:
            self.fail(where, f"ConfigMap '{cm.get('name')}' is not defined here")
            return
        for item in cm.get("items") or []:
            if item.get("key") not in data:
                self.fail(where, f"ConfigMap {cm['name']} has no key '{item.get('key')}' "
                                 f"(keys: {', '.join(sorted(data))})")

    def check_secret_volume(self, where, secret):
        if secret.get("secretName") != KEYS_SECRET:
            self.fail(where, f"Secret '{secret.get('secretName')}' is not {KEYS_SECRET}, the one "
                             "deploy/k8s/README.md creates")
        if not secret.get("items"):
            self.fail(where, f"mounts all of Secret {KEYS_SECRET}: list the items the pod needs "
                             "(its own .key, the .pub files), so no pod holds another's secret key")
        for item in secret.get("items") or []:
            if item.get("key") not in self.keygen_files:
                self.fail(where, f"Secret {KEYS_SECRET} has no key '{item.get('key')}' (`kdist "
                                 f"keygen --cluster` makes {', '.join(sorted(self.keygen_files))})")

    def secret_files(self, mount, volume):
        """Files a Secret volume mount provides: {absolute path: (secret, key)}."""
        items = volume["secret"].get("items") or []
        return {os.path.join(mount["mountPath"], i.get("path")): (KEYS_SECRET, i.get("key"))
                for i in items if i.get("key") in self.keygen_files}

    def mounted_files(self, mount, volume):
        """Files a ConfigMap volume mount provides: {absolute path: (configmap, key)}."""
        cm = volume.get("configMap")
        data = self.configmap_data(cm.get("name")) if cm else None
        if data is None:
            return {}
        items = cm.get("items")
        # an item whose key is missing provides nothing (check_configmap_volume names it)
        files = ({i.get("path"): i.get("key") for i in items if i.get("key") in data} if items
                 else {k: k for k in data})
        sub = mount.get("subPath")
        if sub:
            return {mount["mountPath"]: (cm["name"], files[sub])} if sub in files else {}
        return {os.path.join(mount["mountPath"], p): (cm["name"], k) for p, k in files.items()}

    def check_container(self, where, c, volumes, claims):
        image = c.get("image")
        if not image:
            self.fail(where, "has no image")
        self.images.setdefault(image, where)
        ports = {}
        for p in c.get("ports") or []:
            ports[p.get("containerPort")] = p.get("name")
        env = {}
        for e in c.get("env") or []:
            env[e.get("name")] = e
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                data = self.configmap_data(ref.get("name"))
                if data is None or ref.get("key") not in data:
                    self.fail(where, f"env {e['name']}: ConfigMap {ref.get('name')} key "
                                     f"'{ref.get('key')}' is not defined here")
        for e in c.get("envFrom") or []:
            ref = e.get("configMapRef")
            if ref and self.configmap_data(ref.get("name")) is None:
                self.fail(where, f"envFrom: ConfigMap '{ref.get('name')}' is not defined here")
        files, cm_mounts = {}, []
        for m in c.get("volumeMounts") or []:
            name = m.get("name")
            if name not in volumes and name not in claims:
                self.fail(where, f"volumeMount '{name}' is neither a volume nor a "
                                 "volumeClaimTemplate of the pod")
                continue
            vol = volumes.get(name) or {}
            if vol.get("configMap"):
                provided = self.mounted_files(m, vol)
                if m.get("subPath") and not provided:
                    self.fail(where, f"volumeMount '{name}' subPath '{m['subPath']}' is not a "
                                     f"file of ConfigMap {vol['configMap'].get('name')}")
                files.update(provided)
                cm_mounts.append(m["mountPath"])
            if vol.get("secret"):
                files.update(self.secret_files(m, vol))
                cm_mounts.append(m["mountPath"])
        ctx = {"where": where, "ports": ports, "env": env, "files": files,
               "cm_mounts": cm_mounts, "bound": set()}
        self.check_command(ctx, "command/args",
                           (c.get("command") or []) + (c.get("args") or []))
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if probe:
                self.check_probe(ctx, probe_name, probe)
        for hook in ("postStart", "preStop"):
            cmd = (((c.get("lifecycle") or {}).get(hook) or {}).get("exec") or {}).get("command")
            if cmd:
                self.check_command(ctx, hook, cmd)
        for port, name in ports.items():
            if port not in ctx["bound"]:
                self.fail(where, f"containerPort {port} ({name}) is bound by no endpoint the "
                                 "container's command gives")

    def check_probe(self, ctx, name, probe):
        for kind in ("tcpSocket", "httpGet", "grpc"):
            if kind in probe:
                port = probe[kind].get("port")
                if port not in ctx["ports"] and port not in ctx["ports"].values():
                    self.fail(ctx["where"], f"{name} {kind} port {port} is not a containerPort")
        cmd = (probe.get("exec") or {}).get("command")
        if cmd:
            self.check_command(ctx, name, cmd)

    # ---- commands -------------------------------------------------------------------------

    def check_command(self, ctx, what, argv):
        where = f"{ctx['where']} {what}"
        if not argv:
            return
        argv = [str(a) for a in argv]
        for a in argv:  # Kubernetes' own $(VAR) expansion
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                if var not in ctx["env"]:
                    self.fail(where, f"$({var}) names no env variable of the container")
        if os.path.basename(argv[0]) in {os.path.basename(s) for s in SHELLS}:
            if len(argv) >= 3 and argv[1] == "-c":
                self.check_script(ctx, where, argv[2])
            else:
                self.fail(where, f"runs {argv[0]} without -c SCRIPT")
            return
        self.check_invocation(ctx, where, argv[0], argv[1:])

    def check_script(self, ctx, where, script):
        script = re.sub(r"\\\n", " ", script)
        assigned = set(re.findall(r"(?:^|[\s;(])([A-Za-z_][A-Za-z0-9_]*)=", script))
        for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script):
            if var not in assigned and var not in ctx["env"] and var not in {"PWD", "HOME"}:
                self.fail(where, f"the script uses ${var}, which is neither set in the script "
                                 "nor an env variable of the container")
        for line in script.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                tokens = list(lexer)
            except ValueError as e:
                self.fail(where, f"cannot split the script line '{line}': {e}")
                continue
            self.check_script_tokens(ctx, where, tokens)

    def check_script_tokens(self, ctx, where, tokens):
        i, at_command = 0, True
        while i < len(tokens):
            t = tokens[i]
            if t in SEPARATORS or t in SHELL_KEYWORDS:
                at_command = True
                i += 1
                continue
            if not at_command or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", t) or t.startswith("$"):
                i += 1  # an argument, an assignment, or a command substitution's opening
                continue
            at_command = False
            if t == "exec":
                at_command = True
                i += 1
                continue
            j = i + 1
            while j < len(tokens) and tokens[j] not in SEPARATORS:
                j += 1
            args = [a for a in tokens[i + 1:j] if a not in REDIRECTIONS]
            if t.startswith("kdist") or t in self.targets:
                self.check_invocation(ctx, where, t, args)
            elif t not in SHELL_COMMANDS:
                self.fail(where, f"the script runs '{t}', which is neither a kdist program nor a "
                                 "shell utility of the image")
            i = j

    def check_invocation(self, ctx, where, program, args):
        base = os.path.basename(program)
        for a in [program] + args:
            self.check_endpoints(ctx, where, a)
        if base not in self.targets:
            ours = ", ".join(sorted(t for t in self.targets if t.startswith("kdist")))
            self.fail(where, f"runs '{program}', which is not an executable target of the CMake "
                             f"files (targets: {ours})")
            return
        if not os.access(os.path.join(self.bin_dir, base), os.X_OK):
            self.fail(where, f"runs '{base}', which is not built in {self.bin_dir}")
            return
        self.used_binaries.setdefault(base, where)
        usage = self.help_text([base])
        if base == "kdist":  # a subcommand, then its own flags
            commands = set(re.findall(r"^  ([a-z]+)\b", usage, re.M))
            if not args or args[0] not in commands:
                self.fail(where, f"runs kdist with '{args[0] if args else ''}', which is not a "
                                 f"kdist command ({', '.join(sorted(commands))})")
                return
            usage += self.help_text([base, args[0]])
        allowed = self.flags_in(usage)
        for a in args:
            if a.startswith("--") and a.split("=")[0] not in allowed:
                self.fail(where, f"{base} does not accept the flag '{a}' (its usage lists "
                                 f"{', '.join(sorted(allowed))})")
        overrides = [a for a in args if OVERRIDE.match(a)]
        for a in args:  # a file the pod reads: it must be in a ConfigMap it mounts
            if a.startswith("/") and any(a.startswith(m + "/") for m in ctx["cm_mounts"]):
                if a not in ctx["files"]:
                    mounted = ", ".join(sorted(ctx["files"])) or "none"
                    self.fail(where, f"reads {a}, which no ConfigMap or Secret key is mounted "
                                     f"as (mounted: {mounted})")
        speaks = base in NETWORK_PROGRAMS or (base == "kdist" and args[0] == "status" and
                                              any(a.startswith("tcp://") for a in args))
        if speaks:
            key = args[args.index("--key") + 1] if "--key" in args[:-1] else None
            if not key:
                self.fail(where, f"runs {base} without --key: under CurveZMQ it needs its pair "
                                 f"from Secret {KEYS_SECRET}")
            elif ctx["files"].get(key, (None,))[0] != KEYS_SECRET:
                self.fail(where, f"--key {key} is not a file of Secret {KEYS_SECRET} mounted in "
                                 "the pod")
        recipe = None
        if "--recipe" in args and args.index("--recipe") + 1 < len(args):
            recipe = args[args.index("--recipe") + 1]
        elif base == "kdist" and args[0] == "recipe" and len(args) > 2:
            recipe = args[2]
        if recipe:
            if recipe in ctx["files"]:
                cm, key = ctx["files"][recipe]
                self.recipe_uses.append((where, cm, key, overrides))
            else:
                self.fail(where, f"the recipe {recipe} is not a file of a mounted ConfigMap")

    def check_endpoints(self, ctx, where, text):
        for host, port in ENDPOINT.findall(text):
            var = re.match(r"^\$[({]?([A-Za-z_][A-Za-z0-9_]*)[)}]?$", host)
            if host in SELF_HOSTS or var:
                if var:  # the downward API's pod IP, the address this pod is reached at
                    src = (ctx["env"].get(var.group(1)) or {}).get("valueFrom") or {}
                    if (src.get("fieldRef") or {}).get("fieldPath") != "status.podIP":
                        self.fail(where, f"tcp://{host}:{port}: ${var.group(1)} is not the "
                                         "downward API's status.podIP")
                if port == "*" or int(port) not in ctx["ports"]:
                    self.fail(where, f"tcp://{host}:{port}: port {port} is not a containerPort "
                                     f"of the container ({sorted(ctx['ports'])})")
                else:
                    ctx["bound"].add(int(port))
                continue
            svc_name = host.split(".")[0]
            svc = self.by_kind.get("Service", {}).get(svc_name)
            if svc is None:
                self.fail(where, f"tcp://{host}:{port}: '{host}' is neither this pod nor a "
                                 "Service defined here")
                continue
            svc_ports = [p.get("port") for p in (svc[1].get("spec") or {}).get("ports") or []]
            if port == "*" or int(port) not in svc_ports:
                self.fail(where, f"tcp://{host}:{port}: Service {svc_name} has no port {port} "
                                 f"(ports: {svc_ports})")

    # ---- services ---------------------------------------------------------------------------

    def check_service(self, where, doc):
        spec = doc.get("spec") or {}
        selector = spec.get("selector") or {}
        if not selector:
            self.fail(where, "has no selector")
            return
        picked = []
        for wl_where, wl in self.workloads():
            template = (wl.get("spec") or {}).get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            if all(labels.get(k) == v for k, v in selector.items()):
                picked.append((wl_where, template.get("spec") or {}))
        if not picked:
            self.fail(where, f"selector {selector} matches no pod template defined here")
        for p in spec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for wl_where, pod in picked:
                ports = [cp for c in pod.get("containers") or [] for cp in c.get("ports") or []]
                if not any(target in (cp.get("containerPort"), cp.get("name")) for cp in ports):
                    self.fail(where, f"port {p.get('name')} targetPort {target} is not a "
                                     f"containerPort of {wl_where}")

    # ---- the recipe -------------------------------------------------------------------------

    def check_recipes(self):
        if not self.recipe_uses:
            self.fail(self.manifests, "no container reads a recipe from a ConfigMap")
        with tempfile.TemporaryDirectory() as tmp:
            for where, cm, key, overrides in self.recipe_uses:
                path = os.path.join(tmp, f"{cm}-{key}")
                text = self.configmap_data(cm)[key]
                with open(path, "w") as f:
                    f.write(text)
                p = subprocess.run([os.path.join(self.bin_dir, "kdist"), "recipe", "check", path]
                                   + overrides, capture_output=True, text=True, timeout=60)
                if p.returncode != 0:
                    self.fail(where, f"ConfigMap {cm} key {key} with {' '.join(overrides) or 'no'} "
                                     f"overrides fails `kdist recipe check`: "
                                     f"{(p.stderr or p.stdout).strip()}")
                    continue
                security = p.stdout.split("\ncluster:\n", 1)[-1].split("\n  security:\n", 1)
                if len(security) < 2 or not re.search(r"^    curve: true$", security[1], re.M):
                    self.fail(where, f"ConfigMap {cm} key {key} leaves cluster.security.curve "
                                     "off, but the pods bind addresses other pods reach: the "
                                     "coordinator and teachers refuse that in plaintext")
                m = re.search(r'^  dir: "(.*)"$', p.stdout.split("\ndata:\n", 1)[-1], re.M)
                if m:
                    self.dataset_dirs.add((m.group(1), f"ConfigMap {cm} key {key}"))
                self.check_replicas(cm, key, p.stdout)

    def check_replicas(self, cm, key, resolved):
        """cluster.teachers and cluster.workers against the replicas that run those roles."""
        for role, program in (("teachers", "kdist-teacher"), ("workers", "kdist-worker")):
            m = re.search(rf"^  {role}: ([0-9]+)$", resolved.split("\ncluster:\n", 1)[-1], re.M)
            for wl_where, wl in self.workloads():
                if self.used_binaries.get(program, "").startswith(wl_where + " ") and m:
                    replicas = (wl.get("spec") or {}).get("replicas", 1)
                    if replicas != int(m.group(1)):
                        self.fail(wl_where, f"has {replicas} replicas but ConfigMap {cm} key "
                                            f"{key} sets cluster.{role}: {m.group(1)}")

    # ---- the Dockerfile ---------------------------------------------------------------------

    def dockerfile_instructions(self, path):
        """[(line number, instruction)] with continuation lines joined and comments dropped."""
        out, pending, start = [], "", 0
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                if not pending:
                    start = n
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                out.append((start, (pending + line).strip()))
                pending = ""
        return out

    def check_dockerfile(self):
        path = os.path.join(self.manifests, "Dockerfile")
        if not os.path.exists(path):
            self.fail(self.manifests, "has no Dockerfile")
            return
        stages, installed, packages, copied = [], {}, {}, set()
        built = None
        for n, line in self.dockerfile_instructions(path):
            word, rest = (line.split(None, 1) + [""])[:2]
            word = word.upper()
            where = f"Dockerfile line {n} ({word})"
            if word == "FROM":
                m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
                base, name = m.group(1), m.group(2)
                if base not in ("debian:12", "debian:bookworm") and base not in stages:
                    self.fail(where, f"builds on {base}: the project supports debian:12")
                stages.append(name or f"stage{len(stages)}")
                packages[stages[-1]] = set()
            elif not stages:
                self.fail(where, "comes before any FROM")
            elif word in ("COPY", "ADD"):
                self.check_copy(where, rest, stages, installed, copied)
            elif word == "RUN":
                for m in re.finditer(r"apt-get install([^&;|]*)", rest):
                    packages[stages[-1]].update(w for w in m.group(1).split()
                                                if not w.startswith("-"))
                m = re.search(r"cmake --build\s[^&;|]*", rest)
                if m:
                    t = re.search(r"--target\s+([^&;|-][^&;|]*?)(?:\s+--|\s*$)", m.group(0))
                    built = set(t.group(1).split()) if t else set(self.targets)
        if not stages:
            self.fail("Dockerfile", "has no FROM")
            return
        self.check_build_sources(copied)
        for binary in installed:
            if built is not None and binary not in built:
                self.fail("Dockerfile", f"copies {binary} from the build stage, but its cmake "
                                        "--build does not build it")
        for binary, where in self.used_binaries.items():
            if installed.get(binary) not in ("/usr/local/bin", "/usr/bin", "/bin"):
                self.fail(where, f"runs {binary}, which the Dockerfile does not install on the "
                                 "image's PATH")
        final = packages[stages[-1]]
        for d, where in self.dataset_dirs:
            m = re.match(r"^/usr/share/datasets/([^/]+)", d)
            if m and f"dataset-{m.group(1)}" not in final:
                self.fail(where, f"data.dir {d} comes from the Debian package "
                                 f"dataset-{m.group(1)}, which the image's last stage does not "
                                 "install")
        self.check_runtime_libraries(installed, final)

    def check_build_sources(self, copied):
        """The build needs the top-level CMakeLists.txt and every directory it adds."""
        with open(os.path.join(self.repo, "CMakeLists.txt")) as f:
            text = re.sub(r"#.*", "", f.read())
        needed = ["CMakeLists.txt"] + re.findall(r"add_subdirectory\(\s*([^\s)]+)", text)
        for d in needed:
            if "." not in copied and d not in copied:
                self.fail("Dockerfile", f"does not copy {d}, which the top-level "
                                        "CMakeLists.txt needs")

    def check_copy(self, where, rest, stages, installed, copied):
        words = shlex.split(rest)
        opts = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if len(paths) < 2:
            self.fail(where, "needs a source and a destination")
            return
        srcs, dest = paths[:-1], paths[-1].rstrip("/") or "/"
        stage = next((o.split("=", 1)[1] for o in opts if o.startswith("--from=")), None)
        if stage is None:  # from the build context: the repository root
            for s in srcs:
                copied.add(os.path.normpath(s))
                matches = glob.glob(os.path.join(self.repo, s))
                if not matches:
                    self.fail(where, f"copies {s}, which is not in the repository")
                for m in matches:
                    if os.path.isdir(m) and not any(files for _, _, files in os.walk(m)):
                        self.fail(where, f"copies {s}, an empty directory (git does not keep it)")
            return
        if stage not in stages:
            self.fail(where, f"copies from stage '{stage}', which is not defined before it")
            return
        for s in srcs:
            b = os.path.basename(s)
            if b in self.targets:
                installed[b] = dest

    def check_runtime_libraries(self, installed, packages):
        """Each shared library a binary links (NEEDED) comes from a package the image installs."""
        if not shutil.which("readelf") or not shutil.which("dpkg"):
            print("check_k8s: readelf or dpkg missing: runtime libraries not checked")
            return
        links = []  # (binary, library, its path here)
        for binary in sorted(installed):
            path = os.path.join(self.bin_dir, binary)
            if not os.path.exists(path):
                continue
            needed = re.findall(r"\(NEEDED\).*\[(.+)\]",
                                subprocess.run(["readelf", "-d", path], capture_output=True,
                                               text=True).stdout)
            ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
            for lib in needed:
                if not SANITIZER_LIBS.match(lib):  # a sanitizer build's runtime, not the image's
                    m = re.search(rf"^\s*{re.escape(lib)} => (\S+)", ldd, re.M)
                    links.append((binary, lib, m.group(1) if m else None))
        owners = self.packages_of({p for _, _, p in links if p})
        for binary, lib, path in links:
            pkg = owners.get(path)
            if pkg is None:
                self.fail("Dockerfile", f"{binary} links {lib}, whose Debian package is unknown")
            elif pkg not in packages and pkg != "libc6":
                self.fail("Dockerfile", f"{binary} links {lib} (package {pkg}), which the "
                                        "image's last stage does not install")

    @staticmethod
    def packages_of(paths):
        """{path: Debian package}, asking dpkg once; merged /usr means a library found at
        /lib/... may be registered under /usr/lib/... or through its symlink's target."""
        candidates = {}
        for p in paths:
            real = os.path.realpath(p)
            for c in (p, real, re.sub(r"^/lib/", "/usr/lib/", p),
                      re.sub(r"^/lib/", "/usr/lib/", real)):
                candidates.setdefault(c, set()).add(p)
        out = subprocess.run(["dpkg", "-S"] + sorted(candidates), capture_output=True,
                             text=True).stdout
        owners = {}
        for line in out.splitlines():
            m = re.match(r"^([^:\s]+)(?::[a-z0-9]+)?: (/\S+)$", line)
            if m:
                for p in candidates.get(m.group(2), ()):
                    owners.setdefault(p, m.group(1))
        return owners

    # ---- all --------------------------------------------------------------------------------

    def run(self):
        self.load()
        for where, doc in self.docs:
            if doc["kind"] in WORKLOAD_KINDS:
                self.check_workload(where, doc)
        for where, doc in self.docs:
            if doc["kind"] == "Service":
                self.check_service(where, doc)
        if len(self.images) > 1:
            self.fail(self.manifests, f"containers run different images: {sorted(self.images)}")
        for role in ("kdist-coordinator", "kdist-teacher", "kdist-worker"):
            if role not in self.used_binaries:
                self.fail(self.manifests, f"no container runs {role}")
        self.check_recipes()
        self.check_dockerfile()
        return self.errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="the repository root (the image's context)")
    ap.add_argument("--manifests", required=True, help="deploy/k8s or a copy of it")
    ap.add_argument("--bin-dir", required=True, help="the built binaries (KD_BIN_DIR)")
    a = ap.parse_args()
    errors = Checker(a.repo, a.manifests, a.bin_dir).run()
    for e in errors:
        print(f"FAIL {e}")
    if errors:
        print(f"check_k8s: {len(errors)} problem(s) in {a.manifests}")
        return 1
    print(f"check_k8s: {a.manifests}: manifests and Dockerfile reference only what the project "
          "defines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
