#!/usr/bin/env bash
# test_curve_capture.sh: CurveZMQ on the wire (issue 6, Done-when 3). In a network namespace of
# its own (only its lo, so the capture holds nothing but this test's traffic) the same cluster
# runs twice under tcpdump, with cluster.shared_memory=false so tensors cross TCP: once in
# plaintext, once with cluster.security.curve. Known plaintext: the run name (a long,
# recognisable string that Welcome, run ids and StatusReply carry) and windows of the first
# training images (the teacher streams raw pixels). Both must show in the plaintext capture and
# neither in the encrypted one. In the encrypted run a worker whose key is not authorized is
# refused (the coordinator logs its public key, connections_refused > 0), never joins, and the
# run still applies every batch. Each phase runs a hand-started cluster (coordinator, the rogue
# worker while no teacher is there yet, then teacher and worker) and then `kdist run`.
#   env: KD_BIN_DIR (the binaries), KD_SRC_DIR, KD_TEST_TMP. Needs root; exit 77 otherwise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

skip_unless_root "network namespace, tcpdump"
BIN=$KD_BIN_DIR
PY=$KD_PY
DATA=$KD_DATA
require_tools ip tcpdump "$PY"
make_test_dir
NS="kdcurve$$"
NAME="kd-curve-known-plaintext-run-name-7Q2XW9MZ"
unset KDIST_KEY KDIST_COORDINATOR_KEY

# `"${IN_NS[@]}" cmd &` makes $! the command's own pid (ip execs it); a shell function would
# put a subshell in between that signals never pass.
IN_NS=(ip netns exec "$NS")

# Whether a child of ours has exited (gone, or a zombie until we wait for it).
exited() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
    [[ $state == Z* ]]
}

# Waits for a background pid to exit within a deadline; its exit status goes to $EXIT_CODE.
wait_exit() {
    local pid=$1 seconds=$2 what=$3
    wait_for "$seconds" "exit of $what (pid $pid)" exited "$pid"
    EXIT_CODE=0
    wait "$pid" || EXIT_CODE=$?
}

make_netns "$NS"
"${IN_NS[@]}" ip link set lo up

# ---- keys and recipes --------------------------------------------------------------------------
"$BIN/kdist" keygen --cluster "$T/keys" >"$T/keygen.out" 2>"$T/keygen.err" ||
    fail "kdist keygen --cluster: $(cat "$T/keygen.err")"
for role in coordinator teacher worker client; do
    [ "$(stat -c %a "$T/keys/$role.key")" = 600 ] || fail "$T/keys/$role.key is not mode 0600"
done
grep -q "curve: true" "$T/keygen.out" || fail "keygen --cluster printed no recipe lines"
"$BIN/kdist" keygen --cluster "$T/keys" >/dev/null 2>"$T/keygen2.err" &&
    fail "a second keygen --cluster overwrote the keys"
grep -q "never overwritten" "$T/keygen2.err" || fail "keygen: $(cat "$T/keygen2.err")"
"$BIN/kdist" keygen rogue --dir "$T/rogue" >"$T/rogue.pub.txt" 2>/dev/null || fail "keygen rogue"
ROGUE_PUB=$(cat "$T/rogue.pub.txt")

{
    mlp_recipe "$NAME" 5 16 100
    cat <<EOF
data: {dir: $DATA, train_subset: 3000, val_size: 200, test_subset: 500}
logging: {runs_dir: $T/runs}
cluster:
  workers: 1
  teachers: 1
  shared_memory: false
EOF
} >"$T/plain.yaml"
cp "$T/plain.yaml" "$T/curve.yaml"
cat >>"$T/curve.yaml" <<EOF
  security:
    curve: true
    keys_dir: $T/keys
    authorized_keys: [$T/keys/teacher.pub, $T/keys/worker.pub, $T/keys/client.pub]
EOF
"$BIN/kdist" recipe check "$T/curve.yaml" >/dev/null || fail "the curve recipe does not load"

# The known plaintext of the tensors: a 32-byte window (the one with the most distinct values)
# of each of the first 8 training images, as hex.
"$PY" - "$DATA/train-images-idx3-ubyte.gz" >"$T/patterns.txt" <<'EOF'
import gzip, sys
raw = gzip.open(sys.argv[1]).read()
for i in range(8):
    img = raw[16 + 784 * i: 16 + 784 * (i + 1)]
    best = max(range(784 - 32), key=lambda o: (len(set(img[o:o + 32])), -o))
    print(img[best:best + 32].hex())
EOF
[ "$(wc -l <"$T/patterns.txt")" = 8 ] || fail "cannot read the training images"

# ---- one phase: capture a hand-started cluster and a `kdist run` -------------------------------
start_capture() {
    "${IN_NS[@]}" tcpdump -i lo -U -s 0 -Z root -w "$1" tcp >"$1.log" 2>&1 &
    TCPDUMP=$!
    track_pid "$TCPDUMP"
    wait_for 20 "tcpdump listening on lo" grep -q "listening on lo" "$1.log"
}

stop_capture() {
    kill -TERM "$TCPDUMP" # background jobs of a script ignore SIGINT
    wait_exit "$TCPDUMP" 20 tcpdump
    [ -s "$1" ] || fail "the capture $1 is empty"
}

# run_cluster MODE: coordinator, (curve: rogue worker), status, teacher, worker; checks the run.
run_cluster() {
    local mode=$1 dir=$T/$1/manual keys=()
    mkdir -p "$dir"
    # Each node reads the data through a path of its own, as on machines of their own: the
    # coordinator's is gone before the teacher joins, so a teacher that took the coordinator's
    # data.dir along with the rest of its recipe would find no data.
    ln -s "$DATA" "$dir/coordinator_data"
    ln -s "$DATA" "$dir/teacher_data"
    [ "$mode" = curve ] && keys=(--key "$T/keys/coordinator.key")
    "${IN_NS[@]}" "$BIN/kdist-coordinator" --recipe "$T/$mode.yaml" --run-dir "$dir" \
        "${keys[@]}" "data.dir=$dir/coordinator_data" >"$dir/coordinator.log" 2>&1 &
    local coord=$!
    track_pid "$coord"
    wait_for 30 "$dir/coordinator.endpoint" test -s "$dir/coordinator.endpoint"
    rm "$dir/coordinator_data" # read: the coordinator loads its data before it binds
    local ep
    ep=$(cat "$dir/coordinator.endpoint")

    if [ "$mode" = curve ]; then
        # no teacher yet: the run cannot move, so the rogue surely meets a running coordinator
        "${IN_NS[@]}" "$BIN/kdist-worker" --coordinator "$ep" --id rogue \
            --key "$T/rogue/rogue.key" --coordinator-key "$T/keys/coordinator.pub" \
            --log "$dir/rogue.log" >"$dir/rogue.err" 2>&1 &
        local rogue=$!
        track_pid "$rogue"
        wait_exit "$rogue" 30 "the rogue worker"
        [ "$EXIT_CODE" != 0 ] || fail "the rogue worker exited 0"
        grep -qF "refused this node's CurveZMQ public key $ROGUE_PUB" "$dir/rogue.log" ||
            fail "the rogue's log does not say its key was refused: $(tail -3 "$dir/rogue.log")"
        grep -F "COORD-CURVE-REFUSED" "$dir/coordinator.log" | grep -qF -- "$ROGUE_PUB" ||
            fail "the coordinator log does not name the refused key $ROGUE_PUB"
        # a plaintext client is told the run needs CurveZMQ
        if "${IN_NS[@]}" "$BIN/kdist" status "$ep" >"$dir/status_plain.out" 2>&1; then
            fail "kdist status without a key reached a CurveZMQ coordinator"
        fi
        grep -q "uses CurveZMQ" "$dir/status_plain.out" ||
            fail "kdist status without a key: $(cat "$dir/status_plain.out")"
        # the client's keys as options, and as the environment the binaries read
        "${IN_NS[@]}" "$BIN/kdist" status "$ep" --key "$T/keys/client.key" \
            --coordinator-key "$T/keys/coordinator.pub" >"$dir/status_opt.out" 2>&1 ||
            fail "kdist status --key: $(cat "$dir/status_opt.out")"
        KDIST_KEY=$T/keys/client.key KDIST_COORDINATOR_KEY=$T/keys/coordinator.pub \
            "${IN_NS[@]}" "$BIN/kdist" status "$ep" >"$dir/status_env.out" 2>&1 ||
            fail "kdist status with KDIST_KEY: $(cat "$dir/status_env.out")"
    fi
    # the control client: over CurveZMQ it finds client.key through the run directory's recipe
    "${IN_NS[@]}" "$BIN/kdist" status "$dir" --json >"$dir/status.json" 2>"$dir/status.err" ||
        fail "kdist status $dir: $(cat "$dir/status.err")"
    "$PY" - "$dir/status.json" "$mode" <<'EOF' || fail "$mode status: $(cat "$dir/status.json")"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "running", s["status"]
assert all(m["id"] != "rogue" for m in s["members"]), "the rogue is a member"
if sys.argv[2] == "curve":
    assert s["connections_refused"] >= 1, "connections_refused is %d" % s["connections_refused"]
EOF

    local node_keys=()
    [ "$mode" = curve ] && node_keys=(--coordinator-key "$T/keys/coordinator.pub")
    [ "$mode" = curve ] && keys=(--key "$T/keys/teacher.key")
    "${IN_NS[@]}" "$BIN/kdist-teacher" --coordinator "$ep" --id 0 --recipe "$T/$mode.yaml" \
        "${keys[@]}" "${node_keys[@]}" --log "$dir/teacher.log" "data.dir=$dir/teacher_data" \
        >"$dir/teacher.err" 2>&1 &
    local teacher=$!
    track_pid "$teacher"
    [ "$mode" = curve ] && keys=(--key "$T/keys/worker.key")
    "${IN_NS[@]}" "$BIN/kdist-worker" --coordinator "$ep" --id 0 "${keys[@]}" "${node_keys[@]}" \
        --log "$dir/worker.log" >"$dir/worker.err" 2>&1 &
    local worker=$!
    track_pid "$worker"
    local role pid
    for role in coordinator teacher worker; do
        pid=$coord
        [ "$role" = teacher ] && pid=$teacher
        [ "$role" = worker ] && pid=$worker
        wait_exit "$pid" 60 "the $mode $role"
        [ "$EXIT_CODE" = 0 ] ||
            fail "the $mode $role exited $EXIT_CODE: $(tail -5 "$dir/$role.log" "$dir/$role.err")"
    done
    grep -q "WORKER-SHM tensors go over TCP" "$dir/worker.log" ||
        fail "the $mode worker did not use TCP for its tensors"
    grep -qF "data.dir: this node's $dir/teacher_data, not the coordinator's" "$dir/teacher.log" ||
        fail "the $mode teacher does not say it kept its own data.dir: $(cat "$dir/teacher.log")"
    local refused=True
    [ "$mode" = curve ] && refused='l["connections_refused"] >= 1' # the rogue's
    check_summary "$dir/summary.json" 'l["duplicates_dropped"] == 0' \
        's["workers_max"] == 1  # more: the rogue joined' "$refused"
    if grep -q "worker rogue joined" "$dir/coordinator.log"; then fail "the rogue worker joined"; fi
}

# run_launcher MODE: the same recipe through `kdist run` (its control socket, its clients).
run_launcher() {
    local mode=$1 dir=$T/$1/launcher
    "${IN_NS[@]}" "$BIN/kdist" run "$T/$mode.yaml" --run-dir "$dir" >"$T/$mode.run.out" 2>&1 ||
        fail "kdist run ($mode): $(tail -20 "$T/$mode.run.out")"
    grep -q "completed" "$T/$mode.run.out" || fail "kdist run ($mode) did not complete"
    if [ "$mode" = curve ]; then
        local ep
        ep=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["control_endpoint"])' \
            "$dir/launcher.json")
        case "$ep" in ipc://*) ;; *) fail "the launcher's control socket is $ep, not ipc://" ;; esac
        local ipc_dir
        ipc_dir=$(dirname "${ep#ipc://}")
        [ "$(stat -c %a "$ipc_dir")" = 700 ] || fail "$ipc_dir is not mode 0700"
    fi
}

for mode in plain curve; do
    mkdir -p "$T/$mode"
    start_capture "$T/$mode.pcap"
    run_cluster "$mode"
    run_launcher "$mode"
    stop_capture "$T/$mode.pcap"
done

# ---- the captures ------------------------------------------------------------------------------
# TCP payloads reassembled per connection (by sequence number), then searched.
"$PY" - "$T/plain.pcap" "$T/curve.pcap" "$NAME" "$T/patterns.txt" >"$T/captures.txt" <<'EOF'
import struct, sys

def streams(path):
    data = open(path, "rb").read()
    magic = data[:4]
    end = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(end + "I", data[20:24])[0]
    link = {1: 14, 113: 16, 276: 20, 0: 4, 108: 4}[linktype]
    flows, pos = {}, 24
    while pos + 16 <= len(data):
        incl = struct.unpack(end + "I", data[pos + 8:pos + 12])[0]
        pkt = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        ether = pkt[link - 2:link] if linktype == 1 else b"\x08\x00"
        ip = pkt[link:]
        if linktype in (113, 276):
            ether = pkt[14:16] if linktype == 113 else pkt[0:2]
        if ether == b"\x86\xdd":
            if len(ip) < 40 or ip[6] != 6: continue
            src, dst, tcp = ip[8:24], ip[24:40], ip[40:]
        else:
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6: continue
            ihl = (ip[0] & 15) * 4
            total = struct.unpack(">H", ip[2:4])[0]
            src, dst, tcp = ip[12:16], ip[16:20], ip[ihl:total]
        if len(tcp) < 20: continue
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            flows.setdefault((src, sport, dst, dport), []).append((seq, payload))
    out = []
    for segs in flows.values():
        base = segs[0][0]
        buf, end_at = bytearray(), 0
        for seq, p in sorted(segs, key=lambda s: (s[0] - base) % 2**32):
            off = (seq - base) % 2**32
            if off + len(p) <= end_at: continue  # a retransmission
            buf += p[end_at - off:] if off < end_at else p
            end_at = off + len(p)
        out.append(bytes(buf))
    return out

name = sys.argv[3].encode()
patterns = [bytes.fromhex(l) for l in open(sys.argv[4]).read().split()]
for label, path in (("plain", sys.argv[1]), ("curve", sys.argv[2])):
    ss = streams(path)
    total = sum(len(s) for s in ss)
    names = sum(s.count(name) for s in ss)
    images = sum(1 for p in patterns if any(p in s for s in ss))
    curve = sum(s.count(b"CURVE\0") for s in ss)
    null = [s for s in ss if b"NULL\0" in s]
    # bytes of the plaintext (NULL mechanism) connections beyond their 64-byte greeting
    null_data = sum(len(s) - 64 for s in null)
    print(label, len(ss), total, names, images, curve, len(null), null_data)
EOF
cat "$T/captures.txt"
read -r _ plain_streams plain_bytes plain_names plain_images plain_curve _ _ \
    < <(grep ^plain "$T/captures.txt")
read -r _ curve_streams curve_bytes curve_names curve_images curve_curve curve_null \
    curve_null_data < <(grep ^curve "$T/captures.txt")
echo "test_curve_capture: plaintext capture: $plain_streams TCP streams, $plain_bytes bytes;" \
    "the run name $plain_names times, $plain_images of 8 image windows"
echo "test_curve_capture: CurveZMQ capture: $curve_streams TCP streams, $curve_bytes bytes;" \
    "the run name $curve_names times, $curve_images of 8 image windows," \
    "$curve_curve CURVE greetings, $curve_null keyless client greeting(s)"
# the known plaintext is there when nothing encrypts it...
[ "$plain_names" -gt 0 ] || fail "the run name is not in the plaintext capture: it sees nothing"
[ "$plain_images" -ge 5 ] || fail "only $plain_images of 8 image windows in the plaintext capture"
[ "$plain_curve" = 0 ] || fail "the plaintext run spoke CURVE"
# ...and gone when CurveZMQ does, although as much traffic crossed the wire
[ "$curve_bytes" -gt $((plain_bytes / 2)) ] || fail "the CurveZMQ capture is too small to tell"
[ "$curve_curve" -gt 3 ] || fail "no CURVE greetings in the CurveZMQ capture"
# the one plaintext client, the keyless `kdist status`, got no further than its greeting (when it
# sent that much before the server's CURVE greeting made it hang up)
[ "$curve_null_data" -le 0 ] ||
    fail "$curve_null_data bytes crossed plaintext (NULL mechanism) connections in the CurveZMQ run"
[ "$curve_names" = 0 ] || fail "the run name is readable in the CurveZMQ capture"
[ "$curve_images" = 0 ] || fail "$curve_images image windows are readable in the CurveZMQ capture"

log "PASS"
