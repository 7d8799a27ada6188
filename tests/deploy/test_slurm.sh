#!/usr/bin/env bash
# Done-when 2 of the deployment issue: a one-node Slurm cluster of our own (munged, slurmctld,
# slurmd on 127.0.0.1, every path and port private to this test) runs deploy/slurm/kdist.sbatch
# with CurveZMQ on: the job makes the run's key set in RUN_DIR/keys (0700, keys 0600) and every
# role uses it, and a keyless client is refused. A second job (kdist-workers.sbatch) adds a
# worker that joins with the run's worker key and pushes gradients; `scancel` of that job makes
# the worker drain (a goodbye, not a heartbeat timeout). The run is far too long to end by
# itself: each check waits for its event, never for the machine's speed, and then `scancel
# --signal=TERM` of the run's job stops it: the job ends with the coordinator's status 0, the
# summary says stopped and the ledger is whole (every batch of the completed epochs applied
# once, none twice). Needs root (munged runs as munge, slurmd starts jobs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

START_DEADLINE=30  # seconds for the daemons to come up and the node to be idle
EVENT_DEADLINE=60  # seconds for one step of the scenario (endpoint, a worker training, ...)
STOP_DEADLINE=90   # seconds for the stopped job to end (the coordinator evaluates, checkpoints)
EPOCHS=100000      # hours of training: the run ends when the test stops it, after its checks

skip_unless_root "munged runs as the munge user, slurmd starts jobs"
require_tools munged slurmctld slurmd sbatch squeue scancel sinfo setpriv python3
id munge >/dev/null 2>&1 || fail "there is no munge user (install the munge package)"
require_binaries kdist kdist-coordinator kdist-teacher kdist-worker
kdist=$KD_BIN_DIR/kdist

# Slurm variables of an enclosing job would redirect our client commands.
for v in $(compgen -v SLURM_ || true); do unset "$v"; done

make_test_dir
mkdir -p "$T"/{munge,state,spool,log,work}
run=$T/work/run
node=$(hostname -s)
# Every process this test starts (daemons, job steps) inherits this tag: the clean-up finds
# stragglers by it, and by nothing broader.
export KD_SLURM_TEST_TAG=$T
export SLURM_CONF=$T/slurm.conf

slurmctld_pid='' slurmd_pid='' jobs=()

# Prints the logs a failure needs, at most the last lines of each.
show_logs() {
    local f
    [ "$KD_RC" != 0 ] || return 0
    for f in "$T"/log/slurmctld.log "$T"/log/slurmd.log "$T"/munge/munged.log "$T"/work/*.out \
        "$run"/logs/*.log; do
        [ -f "$f" ] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

pids_tagged() {
    local p env
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        env=$({ tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null) || continue
        grep -qxF "KD_SLURM_TEST_TAG=$T" <<<"$env" && echo "$p"
    done
    return 0
}

# The jobs, the daemons, then job steps that outlived their slurmd (only on a failure).
stop_slurm() {
    local p _
    if [ ${#jobs[@]} -gt 0 ] && [ -n "$slurmctld_pid" ] && kill -0 "$slurmctld_pid" 2>/dev/null; then
        scancel --quiet "${jobs[@]}" 2>/dev/null
        for _ in $(seq 40); do # KillWait is 20 s
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    stop_pid "$slurmd_pid" slurmd
    stop_pid "$slurmctld_pid" slurmctld
    if [ -s "$T/munge/munged.pid" ]; then
        stop_pid "$(cat "$T/munge/munged.pid")" munged
    fi
    for p in $(pids_tagged); do
        log "killing leftover process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"
        kill -KILL "$p" 2>/dev/null
    done
}
at_exit stop_slurm
at_exit show_logs

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- munge -----------------------------------------------------------------------------------
# Its own key, socket, pid, log and seed files: a system munged, if any, is left alone.
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$T/munge"
chmod 0755 "$T/munge" # the socket's directory must be searchable by everyone
chmod 0400 "$T/munge/munge.key"
setpriv --reuid=munge --regid=munge --init-groups munged \
    --socket="$T/munge/munge.socket" --key-file="$T/munge/munge.key" \
    --pid-file="$T/munge/munged.pid" --log-file="$T/munge/munged.log" \
    --seed-file="$T/munge/munged.seed" ||
    fail "munged did not start: $(tail -n 3 "$T/munge/munged.log" 2>/dev/null)"
wait_for "$START_DEADLINE" "munged's socket $T/munge/munge.socket" test -S "$T/munge/munge.socket"

# ---- slurmctld and slurmd ---------------------------------------------------------------------
# This machine as slurmd sees it (CPUs, sockets, memory), so the node registers as idle.
hw=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
[[ $hw == *CPUs=* ]] || fail "slurmd -C did not describe this machine: $(slurmd -C 2>&1 | head -n 2)"
ctld_port=$(free_port)
slurmd_port=$(free_port)
[ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$(free_port)
cat >"$SLURM_CONF" <<EOF
# A one-node cluster for tests/deploy/test_slurm.sh: loopback only, private paths and ports.
ClusterName=kdtest$$
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.socket
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Between scancel's SIGTERM and SIGKILL: ample for a worker to finish its step and say goodbye.
KillWait=20
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
# Jobs share the node's CPUs: the run's job and the worker-only job run side by side.
PartitionName=kdtest Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
slurmctld -D -f "$SLURM_CONF" >"$T/log/slurmctld.out" 2>&1 &
slurmctld_pid=$!
slurmd -D -f "$SLURM_CONF" >"$T/log/slurmd.out" 2>&1 &
slurmd_pid=$!
node_idle() {
    kill -0 "$slurmctld_pid" 2>/dev/null || fail "slurmctld exited: $(tail -n 5 "$T/log/slurmctld.out")"
    kill -0 "$slurmd_pid" 2>/dev/null || fail "slurmd exited: $(tail -n 5 "$T/log/slurmd.out")"
    [ "$(sinfo -h -n "$node" -o %t 2>/dev/null)" = idle ]
}
wait_for "$START_DEADLINE" "node $node idle in sinfo" node_idle
log "one-node Slurm cluster up (slurmctld :$ctld_port, slurmd :$slurmd_port)"

# ---- the run --------------------------------------------------------------------------------
{
    mlp_recipe slurm_test 5 64
    cat <<'EOF'
distill:
  alpha: 0.0
data:
  train_subset: 12000
  val_size: 1000
  test_subset: 1000
cluster:
  # a drained worker's prefetched batches come back this soon
  restream_timeout_ms: 3000
  heartbeat_timeout_ms: 4000
EOF
} >"$T/work/recipe.yaml"

submit() { # sbatch ARGS...: prints the job id
    local id
    id=$(cd "$T/work" && sbatch --parsable --export=ALL,KDIST_BIN_DIR="$KD_BIN_DIR" "$@") ||
        fail "sbatch $* was refused"
    id=${id%%;*}
    [[ $id =~ ^[0-9]+$ ]] || fail "sbatch printed '$id', not a job id"
    echo "$id"
}
job_running() { [ "$(squeue -h -j "$1" -o %T 2>/dev/null)" = RUNNING ]; }
job_gone() { [ -z "$(squeue -h -j "$1" -o %T 2>/dev/null)" ]; }

main_job=$(submit --output="$T/work/kdist-%j.out" "$KD_SRC_DIR/deploy/slurm/kdist.sbatch" \
    --run-dir "$run" recipe.yaml train.epochs=$EPOCHS)
jobs+=("$main_job")
log "submitted the run as job $main_job"
endpoint_written() {
    job_gone "$main_job" && fail "job $main_job ended before its coordinator wrote $run/coordinator.endpoint"
    [ -s "$run/coordinator.endpoint" ]
}
wait_for "$EVENT_DEADLINE" "$run/coordinator.endpoint" endpoint_written
endpoint=$(cat "$run/coordinator.endpoint")
[[ $endpoint =~ ^tcp://127\.0\.0\.1:[0-9]+$ ]] || fail "coordinator endpoint '$endpoint' is not tcp://127.0.0.1:PORT"
log "coordinator at $endpoint"
# CurveZMQ: the job made the run's keys, and the coordinator uses them
[ "$(stat -c %a "$run/keys")" = 700 ] || fail "$run/keys is not mode 0700"
for role in coordinator teacher worker client; do
    [ "$(stat -c %a "$run/keys/$role.key")" = 600 ] || fail "$run/keys/$role.key is not mode 0600"
done
grep -q "made a CurveZMQ key set in $run/keys" "$T/work/kdist-$main_job.out" ||
    fail "job $main_job did not say it made the keys: $(cat "$T/work/kdist-$main_job.out")"
wait_for "$EVENT_DEADLINE" "the coordinator saying CurveZMQ is on" \
    grep -q "COORD-CURVE CurveZMQ on" "$run/logs/coordinator.log"
if "$kdist" status "$endpoint" >"$T/plain_status.out" 2>&1; then
    fail "a client without keys got the coordinator's status"
fi
grep -q "uses CurveZMQ" "$T/plain_status.out" || fail "a keyless client: $(cat "$T/plain_status.out")"
log "CurveZMQ on: keys in $run/keys; a keyless client is refused"

# status_check PY_EXPR: true when the expression holds for the coordinator's StatusReply `s`
# (members by (role, id) in `m`, events in `ev`).
status_check() {
    "$kdist" status "$run" --json 2>/dev/null >"$T/status.json" || return 1
    python3 - "$T/status.json" "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
m = {(x.get("role"), x.get("id")): x for x in s.get("members", [])}
ev = [(e.get("event"), e.get("role"), e.get("id")) for e in s.get("events", [])]
sys.exit(0 if eval(sys.argv[2]) else 1)
EOF
}
steps_of() { # the steps of worker $1 in the last status
    python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(next((x.get("steps", 0) for x in s.get("members", [])
            if x.get("role") == "worker" and x.get("id") == sys.argv[2]), -1))' "$T/status.json" "$1"
}
running_with() {
    job_running "$main_job" || fail "job $main_job ended before the test stopped it"
    [ ! -e "$run/summary.json" ] || fail "the run ended by itself: $(cat "$run/summary.json")"
    status_check "$1"
}

w0=j$main_job-0
wait_for "$EVENT_DEADLINE" "worker $w0 and teacher j$main_job-0 training" running_with \
    "m.get(('worker', '$w0'), {}).get('steps', 0) > 0 and ('teacher', 'j$main_job-0') in m"
log "worker $w0 and teacher j$main_job-0 of job $main_job are training"

# ---- scale up: a worker-only job -------------------------------------------------------------
worker_job=$(submit --output="$T/work/workers-%j.out" \
    "$KD_SRC_DIR/deploy/slurm/kdist-workers.sbatch" "$run")
jobs+=("$worker_job")
w1=j$worker_job-0
log "submitted worker job $worker_job"
wait_for "$EVENT_DEADLINE" "worker $w1 of job $worker_job joined and pushing" running_with \
    "m.get(('worker', '$w1'), {}).get('steps', 0) > 0 and m.get(('worker', '$w0'), {}).get('steps', 0) > 0"
first=$(steps_of "$w1")
wait_for "$EVENT_DEADLINE" "worker $w1's steps growing past $((first + 50))" running_with \
    "m.get(('worker', '$w1'), {}).get('steps', 0) > $first + 50"
log "worker $w1 joined and pushes: steps $first -> $(steps_of "$w1")"
job_running "$worker_job" || fail "worker job $worker_job is not running"

# ---- scale down: scancel ---------------------------------------------------------------------
scancel "$worker_job"
wait_for "$EVENT_DEADLINE" "worker job $worker_job gone from squeue after scancel" job_gone "$worker_job"
wait_for "$EVENT_DEADLINE" "worker $w1 gone from the coordinator's members" running_with \
    "('worker', '$w1') not in m"
status_check "('leave', 'worker', '$w1') in ev" ||
    fail "worker $w1 did not say goodbye (events: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("events"))' "$T/status.json"))"
status_check "('dead', 'worker', '$w1') not in ev" || fail "worker $w1 was declared dead"
grep -q "COORD-MEMBER-GONE worker $w1 (.*) leave" "$run/logs/coordinator.log" ||
    fail "the coordinator's log does not show worker $w1 leaving"
grep -q "WORKER-EXIT" "$run/logs/worker-$w1.log" ||
    fail "worker $w1 did not reach its clean exit (log $run/logs/worker-$w1.log)"
grep -q "worker(s) (CurveZMQ) on" "$T/work/workers-$worker_job.out" ||
    fail "the worker job did not use the run's keys: $(cat "$T/work/workers-$worker_job.out")"
grep -q "workers exited with status 0" "$T/work/workers-$worker_job.out" ||
    fail "the workers of job $worker_job did not exit 0"
status_check "m.get(('worker', '$w0'), {}).get('steps', 0) > 0" || fail "worker $w0 is gone too"
log "scancel $worker_job: worker $w1 drained (goodbye, exit 0); $w0 trains on"

# ---- the end of the run: stopped by the test ---------------------------------------------------
# SIGTERM to every step, as the job's --signal does near its time limit: the coordinator stops
# the run (evaluates, checkpoints, writes summary.json), the nodes leave, the job ends.
[ ! -e "$run/summary.json" ] || fail "the run ended by itself before the test stopped it"
scancel --signal=TERM "$main_job"
main_ended() { job_gone "$main_job"; }
wait_for "$STOP_DEADLINE" "job $main_job to end after scancel --signal=TERM" main_ended
grep -q "coordinator exited with status 0" "$T/work/kdist-$main_job.out" ||
    fail "job $main_job did not report the coordinator's status 0"
[ ! -e "$run/coordinator.endpoint" ] || fail "the finished job left $run/coordinator.endpoint behind"
# A dropped duplicate needs a second copy of its batch, which only a restream makes.
check_stopped_summary "$run/summary.json" "$run/logs/coordinator.log" \
    'l["duplicates_dropped"] <= l["restreamed"]' 's.get("workers_max") == 2'
for f in "$run/logs/worker-$w0.log" "$run/logs/teacher-j$main_job-0.log"; do
    grep -Eq "WORKER-EXIT|TEACHER-EXIT" "$f" || fail "$f shows no clean exit"
done
log "PASS"
