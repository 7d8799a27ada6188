#!/usr/bin/env bash
# Done-when 4 of the deployment issue: the Kubernetes manifests of deploy/k8s parse, and reference
# only the binaries, flags, ConfigMap keys and ports the project defines (tests/deploy/check_k8s.py
# says what is checked); the checker catches a planted mistake in a copy of deploy/k8s (one wrong
# binary, flag, key, port, selector, recipe value, Dockerfile path or package per copy). Then the
# pods' own commands, shell wrappers included, run as local processes on 127.0.0.1: stop, resume,
# scale-down on SIGTERM and a finished run behave as the manifests' comments say.
# Needs only python3-yaml and the built binaries: no kubectl, no docker, no root.
set -euo pipefail

src=${KD_SRC_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
bin=${KD_BIN_DIR:-$src/build/bin}
python=/usr/bin/python3
checker=$src/tests/deploy/check_k8s.py
mkdir -p "${KD_TEST_TMP:-/tmp}"
tmp=$(mktemp -d "${KD_TEST_TMP:-/tmp}/k8s_manifests.XXXXXX")
mkdir -p "$tmp/logs"

t0=$SECONDS
log() { echo "test_k8s_manifests [$((SECONDS - t0))s]: $*"; }
pods=() # process groups of the pods started in part 3
cleanup() {
    local p
    for p in "${pods[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # so that the EXIT trap cleans up
fail() {
    local f
    echo "FAIL: $*" >&2
    for f in "$tmp"/logs/*.log; do
        [ -f "$f" ] && { echo "--- $f" && tail -n 15 "$f"; } >&2
    done
    exit 1
}

[ -x "$bin/kdist" ] || fail "no kdist in $bin (set KD_BIN_DIR to the build's bin directory)"
"$python" -c 'import yaml' 2>/dev/null ||
    fail "$python has no yaml module: install python3-yaml (scripts/install-deps.sh)"

# ---- 1. The real manifests pass ------------------------------------------------------------
if ! "$python" "$checker" --repo "$src" --manifests "$src/deploy/k8s" --bin-dir "$bin" \
    >"$tmp/real.out" 2>&1; then
    cat "$tmp/real.out" >&2
    fail "deploy/k8s does not pass check_k8s.py"
fi
cat "$tmp/real.out"

# ---- 2. Planted mistakes -------------------------------------------------------------------
# plant NAME FILE OLD NEW EXPECTED: copy deploy/k8s, replace the first OLD in FILE by NEW (OLD
# must be there, so a case cannot silently test nothing), and expect the checker to fail with a
# line containing EXPECTED.
caught=0
plant() {
    local name=$1 file=$2 old=$3 new=$4 expected=$5
    local dir=$tmp/planted/$name
    mkdir -p "$tmp/planted"
    cp -r "$src/deploy/k8s" "$dir"
    "$python" - "$dir/$file" "$old" "$new" <<'PY' || fail "$name: cannot plant the mistake"
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(f"'{old}' is not in {path}")
open(path, "w").write(text.replace(old, new, 1))
PY
    if "$python" "$checker" --repo "$src" --manifests "$dir" --bin-dir "$bin" >"$dir.out" 2>&1; then
        cat "$dir.out" >&2
        fail "$name: the checker passed manifests with $file: '$old' -> '$new'"
    fi
    if ! grep -qF -- "$expected" "$dir.out"; then
        cat "$dir.out" >&2
        fail "$name: the checker failed, but without '$expected'"
    fi
    echo "planted $name: caught: $(grep -F -m1 -- "$expected" "$dir.out")"
    caught=$((caught + 1))
}

plant wrong_binary worker.yaml "command: [kdist-worker]" "command: [kdist-workers]" \
    "runs 'kdist-workers', which is not an executable target of the CMake files"
plant wrong_flag teacher.yaml "--stream-bind" "--stream-bound" \
    "kdist-teacher does not accept the flag '--stream-bound'"
plant wrong_kdist_command coordinator.yaml "[kdist, status," "[kdist, stat," \
    "runs kdist with 'stat', which is not a kdist command"
plant wrong_configmap_key coordinator.yaml "key: recipe.yaml" "key: recipe.yml" \
    "ConfigMap kdist-recipe has no key 'recipe.yml'"
plant wrong_mounted_file teacher.yaml "--recipe /etc/kdist/recipe.yaml" \
    "--recipe /etc/kdist/recipes.yaml" "reads /etc/kdist/recipes.yaml, which no ConfigMap or Secret key"
plant wrong_env_var worker.yaml "\$(POD_NAME)" "\$(POD_NAM)" "\$(POD_NAM) names no env variable"
plant wrong_script_var teacher.yaml '"tcp://$POD_IP:5556"' '"tcp://$POD_ADDR:5556"' \
    "the script uses \$POD_ADDR, which is neither set in the script nor an env variable"
plant wrong_service_port worker.yaml "tcp://kdist-coordinator:5555" "tcp://kdist-coordinator:5556" \
    "Service kdist-coordinator has no port 5556"
plant wrong_bind_port coordinator.yaml "cluster.bind=tcp://0.0.0.0:5555" \
    "cluster.bind=tcp://0.0.0.0:5557" "port 5557 is not a containerPort"
plant wrong_target_port coordinator.yaml "targetPort: control" "targetPort: controller" \
    "targetPort controller is not a containerPort"
plant wrong_host teacher.yaml "tcp://kdist-coordinator:5555" "tcp://coordinator:5555" \
    "'coordinator' is neither this pod nor a Service defined here"
plant wrong_pod_ip teacher.yaml "fieldPath: status.podIP" "fieldPath: status.hostIP" \
    "is not the downward API's status.podIP"
plant wrong_selector worker.yaml "      app.kubernetes.io/component: worker
  template:" "      app.kubernetes.io/component: workers
  template:" "selector app.kubernetes.io/component=workers does not match the pod template"
plant wrong_recipe recipe-configmap.yaml "lr: 0.05" "lr: -0.05" "fails \`kdist recipe check\`"
plant wrong_override coordinator.yaml "cluster.bind=" "cluster.bnd=" "fails \`kdist recipe check\`"
plant wrong_replicas teacher.yaml "replicas: 1" "replicas: 3" \
    "has 3 replicas but ConfigMap kdist-recipe key recipe.yaml sets cluster.teachers: 1"
plant wrong_yaml worker.yaml "  replicas: 2" "  replicas: [2" "does not parse"
plant wrong_copy Dockerfile "COPY teacher_node /src/teacher_node" \
    "COPY teacher /src/teacher_node" "copies teacher, which is not in the repository"
plant wrong_install Dockerfile "/src/build/bin/kdist-worker /usr/local/bin/" "/usr/local/bin/" \
    "runs kdist-worker, which the Dockerfile does not install"
plant wrong_runtime_lib Dockerfile "libzmq5 " "" "links libzmq.so.5 (package libzmq5)"
plant wrong_dataset Dockerfile "dataset-fashion-mnist" "dataset-mnist" \
    "comes from the Debian package dataset-fashion-mnist"
# CurveZMQ: the Secret kdist-keys mounted and used, the recipe encrypted (issue 10)
plant wrong_secret_item worker.yaml "{key: worker.key, path: worker.key}" \
    "{key: workers.key, path: worker.key}" "Secret kdist-keys has no key 'workers.key'"
plant wrong_secret_name teacher.yaml "secretName: kdist-keys" "secretName: kdist-key" \
    "Secret 'kdist-key' is not kdist-keys"
plant wrong_key_file worker.yaml "- /etc/kdist-keys/worker.key" "- /etc/kdist-keys/workr.key" \
    "reads /etc/kdist-keys/workr.key, which no ConfigMap or Secret key is mounted as"
plant missing_key coordinator.yaml "--key /etc/kdist-keys/coordinator.key " "" \
    "runs kdist-coordinator without --key"
plant plaintext recipe-configmap.yaml "curve: true" "curve: false" \
    "leaves cluster.security.curve off"
log "the real manifests pass; $caught planted mistakes caught"

# ---- 3. The pods' commands, run here -------------------------------------------------------
# The image's /etc/kdist is $tmp/etc, every tcp:// endpoint goes to 127.0.0.1 on a free port
# (the pod IP stays $POD_IP, set to 127.0.0.1), $(VAR) is expanded as Kubernetes does, and the
# binaries are on PATH as in the image. The recipe is the ConfigMap's, shrunk to a short run.
cat >"$tmp/pod.py" <<'PY'
"""pod.py MANIFEST KIND NAME command|probe: that container's argv for a local run, NUL-separated.
pod.py CONFIGMAP_MANIFEST recipe OUT: write the ConfigMap's recipe, shrunk; print its name."""
import os, re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
if sys.argv[2] == "recipe":
    r = yaml.safe_load(docs[0]["data"]["recipe.yaml"])
    r["data"].update(train_subset=2000, val_size=500, test_subset=500)
    # a narrower MLP: a step is a tenth of the bytes, and the test paces the run by holding the
    # teacher node, not by how long the run takes
    r["student"]["layers"] = [{"type": "flatten"}, {"type": "linear", "out_features": 128},
                              {"type": "relu"}, {"type": "linear", "out_features": 10}]
    r["train"]["epochs"] = 100  # 1,200 steps (12 an epoch)
    r["checkpoint"] = {"every_steps": 20}
    text = yaml.safe_dump(r).replace("/etc/kdist-keys/", os.environ["KD_KEYS"] + "/")
    open(sys.argv[3], "w").write(text)
    print(r["name"])
    sys.exit(0)
kind, name, what = sys.argv[2:5]
pod = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
c = pod["spec"]["template"]["spec"]["containers"][0]
argv = ((c.get("command") or []) + (c.get("args") or []) if what == "command"
        else c["readinessProbe"]["exec"]["command"])
ports = dict(p.split(":") for p in os.environ["KD_PORTS"].split())
def local(a):
    a = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: os.environ[m.group(1)], a)
    a = re.sub(r"tcp://([^\s:/'\"]+):([0-9]+)", lambda m: "tcp://%s:%s" % (
        m.group(1) if m.group(1).startswith("$") else "127.0.0.1", ports[m.group(2)]), a)
    a = a.replace("/etc/kdist-keys/", os.environ["KD_KEYS"] + "/")
    return a.replace("/etc/kdist/", os.environ["KD_ETC"] + "/")
sys.stdout.write("\0".join(local(str(a)) for a in argv))
PY

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}
control_port=$(free_port)
export KD_PORTS="5555:$control_port 5556:$(free_port)" KD_ETC=$tmp/etc KD_KEYS=$tmp/keys
export PATH=$bin:$PATH
mkdir -p "$tmp/etc"
# the Secret kdist-keys, made as deploy/k8s/README.md says
kdist keygen --cluster "$tmp/keys" >/dev/null 2>&1 || fail "kdist keygen --cluster"

name=$("$python" "$tmp/pod.py" "$src/deploy/k8s/recipe-configmap.yaml" recipe \
    "$tmp/etc/recipe.yaml")
run_dir=$tmp/coordinator/runs/$name

declare -A pids
# start NAME DIR MANIFEST KIND OBJECT [ENV=VALUE ...]: one pod's command, in its own process group
start() {
    local name=$1 dir=$2 manifest=$3 kind=$4 object=$5 argv
    shift 5
    mapfile -d '' argv < <(env "$@" "$python" "$tmp/pod.py" "$src/deploy/k8s/$manifest" \
        "$kind" "$object" command)
    mkdir -p "$dir"
    (cd "$dir" && exec env "$@" setsid "${argv[@]}" >>"$tmp/logs/$name.log" 2>&1) &
    pids[$name]=$!
    pods+=($!)
}
coordinator() {
    start coordinator "$tmp/coordinator" coordinator.yaml StatefulSet kdist-coordinator
}
teacher() {
    start teacher "$tmp/teacher" teacher.yaml StatefulSet kdist-teacher POD_IP=127.0.0.1 \
        POD_NAME=kdist-teacher-0
}
worker() { start "worker$1" "$tmp" worker.yaml Deployment kdist-worker "POD_NAME=kdist-worker-$1"; }
ready() { # the coordinator's readinessProbe
    local argv
    mapfile -d '' argv < <("$python" "$tmp/pod.py" "$src/deploy/k8s/coordinator.yaml" \
        StatefulSet kdist-coordinator probe)
    "${argv[@]}" >/dev/null 2>&1
}
wait_for() { # wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds
    local what=$1 seconds=$2
    local deadline=$((SECONDS + seconds))
    shift 2
    until "$@"; do
        [ $SECONDS -lt $deadline ] || fail "$what: not within $seconds s"
        sleep 0.2
    done
}
gone() { ! kill -0 "${pids[$1]}" 2>/dev/null; }
# expect_exit NAME SECONDS CODE WHY: the pod's command ends within SECONDS with exit code CODE
expect_exit() {
    local rc=0
    wait_for "$1 to exit ($4)" "$2" gone "$1"
    wait "${pids[$1]}" || rc=$?
    [ "$rc" = "$3" ] || fail "$1 exited $rc, not $3 ($4)"
}
running_with() { # EXPR: the run is running and EXPR holds of its members `m` (id: steps)
    kdist status "tcp://127.0.0.1:$control_port" --json --key "$KD_KEYS/client.key" \
        --coordinator-key "$KD_KEYS/coordinator.pub" 2>/dev/null | "$python" -c '
import json, sys
j = json.load(sys.stdin)
m = {member["id"]: member["steps"] for member in j["members"]}
sys.exit(not (j["status"] == "running" and eval(sys.argv[1])))
' "$1"
}
worker_trains() { running_with "m.get('kdist-worker-$1', 0) > 0"; } # kdist-worker-$1 made steps

coordinator
teacher
worker 0
wait_for "the coordinator's readiness probe to pass" 30 ready
checkpointed() { compgen -G "$run_dir/checkpoints/ckpt-*.safetensors" >/dev/null; }
wait_for "a checkpoint in $run_dir/checkpoints" 60 checkpointed
# the teacher held, the run cannot end before the SIGTERM however fast the machine: the first
# checkpoint is at step 20 of 1,200
kill -STOP "${pids[teacher]}"
kill -TERM "${pids[coordinator]}"
kill -CONT "${pids[teacher]}"
expect_exit coordinator 60 0 "SIGTERM stops the run"
grep -q '"status": "stopped"' "$run_dir/summary.json" || fail "summary.json does not say stopped"
expect_exit teacher 30 0 "the stopping coordinator stops the teacher node"
expect_exit worker0 30 0 "the stopping coordinator stops the worker"
log "SIGTERM stopped the coordinator, and it the nodes; restarting the pods"

coordinator
teacher
# Held from the start until both workers are members: in sync every step then has a gradient of
# each, so worker 1 trains in the first step, with the rest of the run still ahead.
kill -STOP "${pids[teacher]}"
worker 0
wait_for "the restarted coordinator to resume" 30 \
    grep -q "COORD-RESUME.*resumed from" "$tmp/logs/coordinator.log"
worker 1 # kubectl scale deployment/kdist-worker --replicas=2
wait_for "both workers to be members" 60 \
    running_with "{'kdist-worker-0', 'kdist-worker-1'} <= set(m)"
kill -CONT "${pids[teacher]}"
wait_for "a second worker to train" 60 worker_trains 1
# Scaled back down while the teacher node is held (SIGSTOP): no batch, no step, so the run
# cannot end before worker 1's own goodbye, however fast the machine.
kill -STOP "${pids[teacher]}"
kill -TERM "${pids[worker1]}"
expect_exit worker1 30 0 "SIGTERM: the step finishes, then a goodbye"
kill -CONT "${pids[teacher]}"
grep -q "WORKER-STOP the coordinator says stop" "$tmp/logs/worker1.log" &&
    fail "worker 1 ended with the run, not on its SIGTERM: make the run longer"
grep -q "COORD-CURVE CurveZMQ on" "$tmp/logs/coordinator.log" ||
    fail "the coordinator did not turn CurveZMQ on with the Secret's keys"
log "the restarted pods resumed (CurveZMQ on); a second worker joined and left on SIGTERM"
expect_exit coordinator 400 0 "the resumed run completes" # a safety net: ~8 s, 40 s under ASan
"$python" - "$run_dir/summary.json" <<'PY' || fail "the resumed run is not complete and exact"
import json, sys
s = json.load(open(sys.argv[1]))
l = s["ledger"]
print(f"summary: {s['status']}, {l['batches_applied']}/{l['batches_expected']} batches applied, "
      f"{l['duplicates_dropped']} duplicates dropped")
sys.exit(not (s["status"] == "completed" and l["batches_applied"] == l["batches_expected"] > 0))
PY
expect_exit teacher 30 0 "the run's end stops the teacher node"
expect_exit worker0 30 0 "the run's end stops the worker"

coordinator # Kubernetes restarts the pod whose coordinator finished
wait_for "the coordinator of a finished run to say so" 30 \
    grep -q "has finished" "$tmp/logs/coordinator.log"
ready && fail "the coordinator of a finished run passes its readiness probe"
kill -TERM "${pids[coordinator]}"
expect_exit coordinator 10 0 "an idle coordinator leaves on SIGTERM"
log "a coordinator restarted after the end idles, unready, and leaves on SIGTERM"
echo "test_k8s_manifests: passed"
