#!/usr/bin/env bash
# test_cluster_ssh (issue 6, Done-when 1): deploy/kdist-cluster over real ssh. Three network
# namespaces are the hosts (veth pairs on a bridge, 10.118.46-49.0/24, each with its own hostname
# and sshd), each with its own install and run directories so the rsync copies are real. `up`
# makes a CurveZMQ key set and brings up a coordinator on h1, a teacher node on h2 (distilling
# from a teacher checkpoint it ships) and two workers on h3, every connection encrypted: each
# host holds only its roles' keys (0600, in a 0700 directory) and a keyless client is refused.
# While it trains, `scale` goes to four workers, `drain` removes one and `scale` goes back to
# one, each seen in `status` with the run moving on. The run is far too long to end by itself:
# the checks are paced by what they wait for, never by the machine's speed. `down` then stops
# it (status stopped, every batch of the completed epochs applied once, none twice) and leaves
# nothing running. An inventory whose host has no sshd makes `up` fail naming that host and the
# step. Needs root; about a minute.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

skip_unless_root "network namespaces, sshd"
BIN=$KD_BIN_DIR
CLUSTER=$KD_SRC_DIR/deploy/kdist-cluster
DATA=$KD_DATA
EPOCHS=100000    # hours of training: the run ends when the test stops it, after its checks
STEP_WAIT=60     # seconds for the run to move on after a change (one step, however loaded)

require_tools ip sshd ssh ssh-keygen rsync setsid unshare flock python3
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || fail "no Fashion-MNIST in $DATA (dataset-fashion-mnist)"

# One of this test's four subnets, held with a lock so that concurrent runs (two build trees)
# never share addresses, routes or ssh connections.
SUBNET=""
for n in 46 47 48 49; do
    exec {LOCK_FD}>"/tmp/kdist-test-cluster-ssh-10.118.$n.lock"
    if flock -n "$LOCK_FD" && ! ip -br addr | grep -q " 10\.118\.$n\."; then
        SUBNET=10.118.$n
        break
    fi
    exec {LOCK_FD}>&-
done
[ -n "$SUBNET" ] || fail "10.118.46-49.0/24, this test's subnets, are all in use (other runs of it?)"

make_test_dir
TAG=$$
BR=kdsb$TAG
NS=()
export XDG_STATE_HOME=$T/state # kdist-cluster's local state goes here

# Pids whose command line holds the text $1 (one grep for all of them; the grep itself, which
# matches too, is gone when its output is read).
pids_matching() {
    local p
    for p in $(grep -lsaF -- "$1" /proc/[0-9]*/cmdline 2>/dev/null | sed -E 's#^/proc/([0-9]+)/cmdline$#\1#'); do
        [ "$p" != $$ ] && [ -e "/proc/$p" ] && echo "$p"
    done
    return 0
}
# Processes of this test that left its process tree (the supervisors run in sessions of their
# own): every command line that names this test's directory.
test_pids() { pids_matching "$T/"; }
# The cluster's processes: binaries and kdist-node live under the hosts' directories $T/h*.
role_pids() { pids_matching "$T/h"; }

# The hosts are namespaces of one machine, where the training (every role busy as it can be)
# would starve the test's own ssh sessions, kdist-node and status commands, which on real hosts
# run on other machines: the roles and their supervisors (restarts inherit it) run at nice 10.
# It changes how fast the run trains, not what the checks see.
lower_roles() {
    local p
    for p in $(role_pids); do
        case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
        */bin/kdist-coordinator* | */bin/kdist-teacher* | */bin/kdist-worker* | *" supervise "*)
            renice -n 10 -p "$p" >/dev/null 2>&1 || true
            ;;
        esac
    done
}

kill_test_pids() {
    local p
    for p in $(test_pids); do kill -KILL "$p" 2>/dev/null; done
    return 0
}

# ---- three hosts ------------------------------------------------------------------------------

ip link add "$BR" type bridge
at_exit ip link del "$BR"
ip addr add "$SUBNET.254/24" dev "$BR"
ip link set "$BR" up
for i in 1 2 3; do
    ns=kdssh$TAG-h$i
    make_netns "$ns" # with everything in it: sshd and its sessions, the roles
    NS+=("$ns")
    ip link add "kd${TAG}v$i" type veth peer name "kd${TAG}p$i"
    ip link set "kd${TAG}p$i" netns "$ns"
    ip link set "kd${TAG}v$i" master "$BR" up
    ip -n "$ns" link set "kd${TAG}p$i" name eth0
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done

mkdir -p "$T/ssh"
ssh-keygen -q -t ed25519 -N '' -C kdist-test-host -f "$T/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -C kdist-test-client -f "$T/ssh/client_key"
cp "$T/ssh/client_key.pub" "$T/ssh/authorized_keys"
if [ ! -d /run/sshd ]; then
    mkdir -p /run/sshd # sshd's privilege-separation directory
    at_exit rmdir /run/sshd
fi
for i in 1 2 3; do
    cat >"$T/ssh/sshd_h$i.conf" <<EOF
ListenAddress $SUBNET.$i:22
HostKey $T/ssh/host_key
PidFile $T/ssh/sshd_h$i.pid
AuthorizedKeysFile $T/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
EOF
    # its own hostname (UTS namespace), so each host looks like a machine of its own
    ip netns exec "kdssh$TAG-h$i" unshare --uts sh -c \
        "hostname h$i && exec /usr/sbin/sshd -D -f '$T/ssh/sshd_h$i.conf' -E '$T/ssh/sshd_h$i.log'" &
    track_pid $!
    disown # no job report when the clean-up kills it
done
at_exit kill_test_pids # the roles' supervisors, which left this test's process tree
for i in 1 2 3; do
    wait_for 20 "sshd on h$i listening" bash -c "exec 2>/dev/null 3<>/dev/tcp/$SUBNET.$i/22"
done

# ---- inventory, teacher, recipe ---------------------------------------------------------------

inventory() { # FILE [h2 port]
    cat >"$1" <<EOF
ssh:
  user: root
  identity: $T/ssh/client_key
  known_hosts: $T/ssh/known_hosts
  connect_timeout: 5
defaults:
  supervisor: auto
  max_restarts: 2
hosts:
  - {name: h1, address: $SUBNET.1, install_dir: $T/h1/opt, run_dir: $T/h1/run, data_dir: $T/h1/data}
  - {name: h2, address: $SUBNET.2, install_dir: $T/h2/opt, run_dir: $T/h2/run, data_dir: $T/h2/data, port: ${2:-22}}
  - {name: h3, address: $SUBNET.3, install_dir: $T/h3/opt, run_dir: $T/h3/run, data_dir: $T/h3/data}
roles:
  coordinator: {host: h1, port: 5555}
  teachers:
    - {host: h2, port: 5556}
  workers:
    - {host: h3, count: 2, threads: 1}
EOF
}
inventory "$T/cluster.yaml"
inventory "$T/no_sshd.yaml" 2222 # nothing listens there on h2

# A small teacher, trained here, that the cluster ships to h1 and h2.
mkdir -p "$T/teacher"
{
    mlp_recipe ssh_teacher 2 128
    cat <<EOF
data: {dir: $DATA, train_subset: 6000, val_size: 500, test_subset: 500}
logging: {runs_dir: $T/teacher/runs}
EOF
} >"$T/teacher/teacher.yaml"
(cd "$T/teacher" && "$BIN/kdist" train teacher.yaml >"$T/teacher/train.log" 2>&1) ||
    fail "training the teacher failed: $(tail -n 5 "$T/teacher/train.log")"
TEACHER=$T/teacher/runs/ssh_teacher/student.safetensors
[ -f "$TEACHER" ] || fail "kdist train wrote no $TEACHER"

# The student run: long enough (epochs) never to end before `down` stops it.
{
    mlp_recipe ssh_cluster 5 64
    cat <<EOF
teacher:
  checkpoint: $TEACHER
  layers:
    - {type: flatten}
    - {type: linear, out_features: 128}
    - {type: relu}
    - {type: linear, out_features: 10}
distill: {alpha: 0.5, temperature: 4}
data: {dir: $DATA, train_subset: 12000, val_size: 1000, test_subset: 1000}
cluster:
  restream_timeout_ms: 3000
  heartbeat_timeout_ms: 4000
EOF
} >"$T/recipe.yaml"

kc() { "$CLUSTER" "$T/cluster.yaml" "$@" --bin-dir "$BIN"; }

# ---- a clear error: a host without sshd ---------------------------------------------------------

if "$CLUSTER" "$T/no_sshd.yaml" up "$T/recipe.yaml" --bin-dir "$BIN" >"$T/no_sshd.out" 2>&1; then
    fail "up succeeded against a host without sshd"
fi
grep -q "host h2 ($SUBNET.2): ssh connection (root@$SUBNET.2, port 2222) failed: .*Connection refused" \
    "$T/no_sshd.out" || fail "up's error does not name host h2 and the ssh step: $(cat "$T/no_sshd.out")"
grep -q "nothing was started" "$T/no_sshd.out" || fail "up did not say that nothing started"
log "ok: up against a host without sshd: $(grep 'host h2' "$T/no_sshd.out")"

# ---- up ---------------------------------------------------------------------------------------

t0=$SECONDS
kc up "$T/recipe.yaml" train.epochs=$EPOCHS >"$T/up.out" 2>&1 || fail "up failed: $(cat "$T/up.out")"
lower_roles
cat "$T/up.out"
grep -Eq "^h1 +$SUBNET.1 +coordinator +0 +[0-9]+ +tcp://$SUBNET.1:5555" "$T/up.out" ||
    fail "up does not show the coordinator on h1 at tcp://$SUBNET.1:5555"
grep -Eq "^h2 +$SUBNET.2 +teacher +0 +[0-9]+ +tcp://$SUBNET.2:5556" "$T/up.out" ||
    fail "up does not show the teacher on h2"
[ "$(grep -Ec "^h3 +$SUBNET.3 +worker " "$T/up.out")" = 2 ] || fail "up does not show two workers on h3"
# the rsync copies are real: each host got what it reads, and only that
for f in h1/opt/bin/kdist-coordinator h1/data/train-images-idx3-ubyte.gz h1/opt/teachers/ssh_cluster.safetensors \
    h2/opt/bin/kdist-teacher h2/data/train-images-idx3-ubyte.gz h2/opt/teachers/ssh_cluster.safetensors \
    h3/opt/bin/kdist-worker h2/opt/recipes/ssh_cluster.yaml; do
    [ -f "$T/$f" ] || fail "up did not copy $f"
done
[ ! -e "$T/h3/data/train-images-idx3-ubyte.gz" ] || fail "up copied the dataset to h3, which runs only workers"
cmp -s "$TEACHER" "$T/h2/opt/teachers/ssh_cluster.safetensors" || fail "the teacher checkpoint on h2 differs"
# CurveZMQ: the key set up made, and on each host only what its roles use
grep -q "CurveZMQ on: keys from $T/state/kdist-cluster/" "$T/up.out" || fail "up did not say CurveZMQ is on"
keys_on() { # HOST: the key files in its run directory
    (cd "$T/$1/run/ssh_cluster/keys" && ls | paste -sd' ' -)
}
[ "$(keys_on h1)" = "client.key client.pub coordinator.key coordinator.pub teacher.pub worker.pub" ] ||
    fail "h1 (coordinator) holds the keys '$(keys_on h1)'"
[ "$(keys_on h2)" = "client.pub coordinator.pub teacher.key teacher.pub worker.pub" ] ||
    fail "h2 (teacher) holds the keys '$(keys_on h2)'"
[ "$(keys_on h3)" = "coordinator.pub worker.key" ] || fail "h3 (workers) holds the keys '$(keys_on h3)'"
for h in h1 h2 h3; do
    [ "$(stat -c %a "$T/$h/run/ssh_cluster/keys")" = 700 ] || fail "$h: the keys directory is not 0700"
    for f in "$T/$h"/run/ssh_cluster/keys/*.key; do
        [ "$(stat -c %a "$f")" = 600 ] || fail "$f is not mode 0600"
    done
done
grep -q "COORD-CURVE CurveZMQ on" "$T/h1/run/ssh_cluster/logs/coordinator-0.log" ||
    fail "the coordinator does not say CurveZMQ is on"
if "$BIN/kdist" status "tcp://$SUBNET.1:5555" >"$T/plain_status.out" 2>&1; then
    fail "a client without keys got the coordinator's status"
fi
grep -q "uses CurveZMQ" "$T/plain_status.out" || fail "a keyless client: $(cat "$T/plain_status.out")"
log "ok: CurveZMQ: h1, h2 and h3 hold only their roles' keys; a keyless client is refused"
if kc up "$T/recipe.yaml" >"$T/up2.out" 2>&1; then fail "a second up succeeded"; fi
grep -q "a cluster is up already" "$T/up2.out" || fail "a second up does not say the cluster is up: $(cat "$T/up2.out")"

# ---- status and scaling while it trains --------------------------------------------------------

SUMMARY=$T/h1/run/ssh_cluster/summary.json
status() { kc status >"$T/status.out" 2>&1 || true; }
# "N live at the coordinator, M running on the hosts"
workers_line() { grep -E '^workers: ' "$T/status.out" || true; }
step_now() { sed -nE 's/^progress .* step ([0-9]+)\/.*/\1/p' "$T/status.out" | head -n 1; }

expect_workers() { # N WHEN
    status
    [ ! -f "$SUMMARY" ] || fail "the run ended by itself before the check '$2': $(cat "$SUMMARY")"
    workers_line | grep -q "^workers: $1 live at the coordinator, $1 running on the hosts" ||
        fail "$2: status does not show $1 live and running workers: $(workers_line)
$(cat "$T/status.out")"
    log "ok: $2: $(workers_line)"
}

# steps grow: the run goes on after each change
step_grew() {
    status
    step_after=$(step_now)
    [ ! -f "$SUMMARY" ] || fail "$1: the run ended by itself: $(cat "$SUMMARY")"
    [ -n "$step_after" ] && [ "$step_after" -gt "$step_before" ]
}
expect_progress() { # WHEN: from the step in the status expect_workers has just taken
    step_before=$(step_now)
    [ -n "$step_before" ] || fail "$1: no progress line in status: $(cat "$T/status.out")"
    wait_for "$STEP_WAIT" "$1: the run moving on from step $step_before" step_grew
    log "ok: $1: the run goes on (step $step_before -> ${step_after:-end})"
}

expect_workers 2 "after up"
grep -Eq "^h2 +teacher +0 +running" "$T/status.out" || fail "status does not show the teacher running on h2"

kc scale --workers 4 >"$T/scale4.out" 2>&1 || fail "scale --workers 4 failed: $(cat "$T/scale4.out")"
lower_roles
cat "$T/scale4.out"
expect_workers 4 "after scale --workers 4"
expect_progress "with 4 workers"

kc drain 3 >"$T/drain.out" 2>&1 || fail "drain 3 failed: $(cat "$T/drain.out")"
expect_workers 3 "after drain 3"

kc scale --workers 1 >"$T/scale1.out" 2>&1 || fail "scale --workers 1 failed: $(cat "$T/scale1.out")"
cat "$T/scale1.out"
[ "$(grep -Ec 'h3: worker-[12] stopped stopped:0' "$T/scale1.out")" = 2 ] ||
    fail "scale --workers 1 did not drain workers 1 and 2 cleanly (exit 0)"
expect_workers 1 "after scale --workers 1"
grep -Eq "^h3 +worker +3 +exited:0 " "$T/status.out" || fail "drained worker 3 did not exit 0"
expect_progress "with 1 worker"
kc logs worker 0 -n 5 >"$T/logs.out" 2>&1 || fail "logs worker 0 failed: $(cat "$T/logs.out")"
[ -s "$T/logs.out" ] || fail "logs worker 0 printed nothing"
log "ok: scaled 2 -> 4 -> 3 -> 1 workers in $((SECONDS - t0))s after up"

# ---- down stops the run: its ledger is whole, nothing is left running -----------------------

[ ! -f "$SUMMARY" ] || fail "the run ended by itself before down: $(cat "$SUMMARY")"
kc down --timeout 60 >"$T/down.out" 2>&1 || fail "down failed: $(cat "$T/down.out")"
cat "$T/down.out"
grep -q "down: nothing of run ssh_cluster runs on h1 h2 h3 any more" "$T/down.out" || fail "down did not report the end"
grep -q "h1: coordinator-0 stopped stopped:0" "$T/down.out" ||
    fail "the coordinator did not stop cleanly on down's SIGTERM"
check_stopped_summary "$SUMMARY" "$T/h1/run/ssh_cluster/logs/coordinator-0.log" \
    's.get("workers_max") == 4'
# no role crashed on the way (a supervisor would have restarted it) nor tripped a sanitizer
if grep -lE "exited with [0-9]+.*restart|AddressSanitizer|runtime error:" "$T"/h*/run/ssh_cluster/logs/*.log; then
    fail "a role crashed or a sanitizer complained (the logs above)"
fi
left=$(role_pids)
[ -z "$left" ] || fail "processes left after down: $(for p in $left; do tr '\0' ' ' <"/proc/$p/cmdline"; echo; done)"
for ns in "${NS[@]}"; do
    for p in $(ip netns pids "$ns"); do
        case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in
        *kdist*) fail "a kdist process is left in $ns: $(tr '\0' ' ' <"/proc/$p/cmdline")" ;;
        esac
    done
done
kc status >"$T/status.out" 2>&1 || true
[ "$(awk '$4=="running"' "$T/status.out" | wc -l)" = 0 ] || fail "status after down shows running roles"
log "ok: down: nothing left running; test_cluster_ssh passed in $((SECONDS - t0))s after up"
