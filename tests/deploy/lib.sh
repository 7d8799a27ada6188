# shellcheck shell=bash
# tests/deploy/lib.sh: what the deployment tests share. Each test_*.sh sources it right after
# `set -euo pipefail` (this file is not a test: the test_*.sh glob that registers them leaves it
# out). It installs the EXIT trap; a test registers its clean-up with at_exit instead.
#   log, fail               messages with the test's name; fail exits 1
#   skip_unless_root        exit 77 (ctest's "skipped") when not root
#   require_tools, require_binaries
#   make_test_dir           $T under $KD_TEST_TMP: removed when the test passes, kept on failure
#   at_exit, track_pid, make_netns, stop_pid
#                           clean-up that runs however the test ends (last registered first)
#   wait_for                polls a command until it succeeds, with a deadline
#   mlp_recipe              the head of a short training recipe
#   check_summary           a run's summary.json: completed, every batch applied once
#   check_stopped_summary   a run the test stopped after its checks: its ledger is whole so far
# Environment (ctest sets it): KD_BIN_DIR, KD_SRC_DIR, KD_TEST_TMP.

KD_TEST_NAME=$(basename "$0" .sh)
KD_SRC_DIR=${KD_SRC_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
KD_BIN_DIR=${KD_BIN_DIR:-$KD_SRC_DIR/build/bin}
KD_TEST_TMP=${KD_TEST_TMP:-/tmp}
KD_DATA=/usr/share/datasets/fashion-mnist
KD_PY=/usr/bin/python3
KD_T0=$SECONDS
KD_AT_EXIT=()
KD_RC=0 # the exit status, for clean-up steps that only run on a failure
T=''    # the test's directory (make_test_dir)

log() { echo "$KD_TEST_NAME [$((SECONDS - KD_T0))s]: $*"; }

fail() {
    echo "$KD_TEST_NAME: FAIL: $*" >&2
    exit 1
}

skip_unless_root() { # WHY
    [ "$(id -u)" = 0 ] && return 0
    echo "$KD_TEST_NAME: SKIP: needs root ($*)"
    exit 77
}

require_tools() { # TOOL...
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || fail "$tool is not installed (scripts/install-deps.sh)"
    done
}

require_binaries() { # NAME... in $KD_BIN_DIR
    local b
    for b in "$@"; do
        [ -x "$KD_BIN_DIR/$b" ] || fail "$KD_BIN_DIR/$b is missing: build first (KD_BIN_DIR)"
    done
}

# at_exit CMD [ARG...]: runs the command when the test exits, however it exits, after the steps
# registered later (so a step undoes what came before it), with errors ignored.
at_exit() {
    local cmd
    printf -v cmd '%q ' "$@"
    KD_AT_EXIT+=("$cmd")
}

kd_on_exit() {
    KD_RC=$?
    local i
    trap - EXIT
    set +e
    for ((i = ${#KD_AT_EXIT[@]} - 1; i >= 0; i--)); do eval "${KD_AT_EXIT[i]}"; done
    if [ -n "$T" ] && [ -d "$T" ]; then
        if [ "$KD_RC" = 0 ]; then rm -rf "$T"; else echo "$KD_TEST_NAME: files kept in $T" >&2; fi
    fi
    exit "$KD_RC"
}
trap kd_on_exit EXIT
trap 'exit 130' INT TERM

# make_test_dir: T, a fresh absolute directory under $KD_TEST_TMP (mode 0755: daemons that run
# as other users must be able to search it).
make_test_dir() {
    mkdir -p "$KD_TEST_TMP"
    T=$(mktemp -d "$(cd "$KD_TEST_TMP" && pwd)/$KD_TEST_NAME.XXXXXX")
    chmod 755 "$T"
}

kill_and_reap() { # PID, while it is a child of this shell (a pid once reaped may be reused)
    [ "$(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ')" = $$ ] || return 0
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 0
}

# track_pid PID: SIGKILL at exit for a child of this shell that is still there.
track_pid() { at_exit kill_and_reap "$1"; }

netns_destroy() { # NAME: everything in it first
    local p
    for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$1" 2>/dev/null
    return 0
}

# make_netns NAME: a network namespace, removed at exit with every process in it.
make_netns() {
    ip netns add "$1" || fail "cannot create network namespace $1"
    at_exit netns_destroy "$1"
}

# stop_pid PID NAME [GRACE]: SIGTERM, up to GRACE seconds (10) to exit, then SIGKILL.
stop_pid() {
    local pid=$1 grace=${3:-10} deadline
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$2 (pid $pid) ignored SIGTERM for $grace s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

# wait_for SECONDS WHAT CMD [ARG...]: runs CMD every 0.2 s until it succeeds; fails naming WHAT
# after SECONDS. CMD runs in this shell: a check may call fail itself (a process that died).
wait_for() {
    local seconds=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s%N) + seconds * 1000000000))
    until "$@"; do
        [ "$(date +%s%N)" -lt "$deadline" ] || fail "$what: not within $seconds s"
        sleep 0.2
    done
}

# wait_while_growing STALL MAX WHAT FILE COMMAND...: like wait_for, for something that takes as
# long as the machine makes it (a run under ASan on a loaded machine): fails when FILE (a log)
# has not grown for STALL seconds, or after MAX seconds in all.
wait_while_growing() {
    local stall=$1 max=$2 what=$3 file=$4 now size last_size=-1 last_growth end
    shift 4
    now=$(date +%s)
    end=$((now + max))
    last_growth=$now
    until "$@"; do
        now=$(date +%s)
        size=$(stat -c %s "$file" 2>/dev/null || echo 0)
        if [ "$size" != "$last_size" ]; then
            last_size=$size
            last_growth=$now
        fi
        [ $((now - last_growth)) -lt "$stall" ] || fail "$what: $file stopped growing for $stall s"
        [ "$now" -lt "$end" ] || fail "$what: not within $max s"
        sleep 0.2
    done
}

# mlp_recipe NAME SEED HIDDEN [BATCH]: the head of a short recipe, a flatten-linear-relu-linear
# student trained by SGD at a constant rate for one epoch on one thread; the test appends its
# data:, teacher:, cluster: ... sections.
mlp_recipe() {
    cat <<EOF
name: $1
seed: $2
student:
  layers:
    - {type: flatten}
    - {type: linear, out_features: $3}
    - {type: relu}
    - {type: linear, out_features: 10}
optim: {name: sgd, lr: 0.05, momentum: 0.9}
schedule: {name: constant}
train: {epochs: 1, batch_size: ${4:-128}, threads: 1}
EOF
}

# check_summary FILE [EXPR...]: FILE, a run's summary.json, says the run completed and applied
# every batch once; each EXPR, a Python expression over the summary `s` and its ledger `l`,
# holds too. Prints the run's numbers; fails naming the first check that does not hold.
check_summary() {
    local file=$1
    shift
    [ -s "$file" ] || fail "there is no summary $file"
    "$KD_PY" - "$file" "$KD_TEST_NAME" "$@" <<'EOF' || fail "summary $file: $(cat "$file")"
import json, sys
s = json.load(open(sys.argv[1]))
l = s.get("ledger", {})
print(f"{sys.argv[2]}: summary: status {s.get('status')}, {l.get('batches_applied')}/"
      f"{l.get('batches_expected')} batches applied, {l.get('duplicates_dropped')} duplicates "
      f"dropped, {l.get('restreamed')} restreamed, workers_max {s.get('workers_max')}, "
      f"test accuracy {s.get('test_accuracy')}")
checks = ['s.get("status") == "completed"', 'l.get("batches_expected", 0) > 0',
          'l.get("batches_applied") == l.get("batches_expected")',
          'l.get("duplicates_dropped", -1) >= 0'] + sys.argv[3:]
for check in checks:
    if not eval(check):
        sys.exit(f"{sys.argv[2]}: does not hold: {check}")
EOF
}

# check_stopped_summary FILE LOG [EXPR...]: FILE, the summary.json of a run the test stopped (it
# is long enough never to end by itself), says "stopped", and its ledger is whole: LOG, the
# coordinator's log, gives the batches per epoch (COORD-START) and each epoch it completed
# (COORD-EPOCH-DONE, every one with all its batches applied once); the summary counts those
# epochs, batches_expected is one batch set per epoch begun, and batches_applied is every batch
# of the completed epochs plus at most one set of the open one: none applied twice, none lost.
# Each EXPR, over the summary `s` and its ledger `l`, holds too.
check_stopped_summary() {
    local file=$1 log=$2
    shift 2
    [ -s "$file" ] || fail "there is no summary $file"
    [ -s "$log" ] || fail "there is no coordinator log $log"
    "$KD_PY" - "$file" "$log" "$KD_TEST_NAME" "$@" <<'EOF' || fail "summary $file: $(cat "$file")"
import json, re, sys
s = json.load(open(sys.argv[1]))
l = s.get("ledger", {})
text = open(sys.argv[2], errors="replace").read()
starts = re.findall(r"COORD-START .* in ([0-9]+) batches", text)
if not starts:
    sys.exit(f"{sys.argv[3]}: no COORD-START line in {sys.argv[2]}")
n = int(starts[-1])
done = {}
for e, a, o in re.findall(r"COORD-EPOCH-DONE epoch ([0-9]+) complete: ([0-9]+)/([0-9]+)", text):
    done[int(e)] = (int(a), int(o))
expected, applied = l.get("batches_expected", -1), l.get("batches_applied", -1)
epochs = s.get("epochs", -1)
print(f"{sys.argv[3]}: summary: status {s.get('status')}, {epochs} epoch(s) of {n} batches "
      f"completed, {applied}/{expected} batches applied, {l.get('duplicates_dropped')} "
      f"duplicates dropped, {l.get('restreamed')} restreamed, workers_max {s.get('workers_max')}")
checks = ['s.get("status") == "stopped"', 'n > 0 and epochs >= 0',
          'sorted(done) == list(range(epochs))  # every completed epoch logged',
          'all(a == o == n for a, o in done.values())  # each with every batch applied once',
          'expected % n == 0 and expected // n in (epochs, epochs + 1)  # a set per epoch begun',
          'epochs * n <= applied <= expected  # the open epoch: no batch twice',
          'l.get("duplicates_dropped", -1) >= 0'] + sys.argv[4:]
for check in checks:
    if not eval(check):
        sys.exit(f"{sys.argv[3]}: does not hold: {check}")
EOF
}
