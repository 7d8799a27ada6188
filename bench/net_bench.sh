#!/usr/bin/env bash
# bench/net_bench.sh: kdist across a network that is not loopback. It builds hosts out of network
# namespaces on a bridge (the coordinator, one teacher node, one host per worker), shapes the
# coordinator's link with tc tbf in both directions, runs a recipe with N workers over TCP
# (cluster.shared_memory=false, one thread per worker) and prints, from one invocation, the
# training rate, the wire bytes per sample that the coordinator's interface counted each way,
# how busy its link was and the rate of the same run unshaped. Every run must complete with a
# whole ledger. The namespaces, the bridge and the processes are removed however it ends.
#
#   bench/net_bench.sh [--models mlp,cnn,gpt] [--workers 1,2] [--links unshaped,1gbit,200mbit]
#                      [--consistency sync] [--samples 19200] [--epochs 2] [--gpt-windows 3200]
#                      [--bin DIR] [--keep DIR] [--set section.key=value]...
#
# A link is `unshaped` or a tc rate (`1gbit`, `200mbit`, `500mbit`); the rate column of a shaped
# run is compared with the unshaped run of the same model and workers when that is in the sweep
# (it is run first), and the final weights with its: one sync worker gives the same bits on any
# link; with more, which worker's batch lands in which step depends on timing. Models: `mlp` (recipes/fashion_mlp_student.yaml, 784-800-800-10), `cnn`
# (recipes/fashion_cnn_teacher.yaml), `gpt` (recipes/kjv_gpt_student.yaml on the first
# --gpt-windows training windows; a sample is a window of 256 tokens). tc's netem, for delay, is
# not in every kernel (not in this machine's): links here differ in rate only. Needs root
# (namespaces, tc) and the built binaries.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
bin=$src/build/bin
models=mlp workers=1,2 links=unshaped,1gbit,200mbit consistency=sync
samples=19200 epochs=2 gpt_windows=3200 keep='' extra=()
usage() { sed -n '10,12p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case $1 in
    --models) models=$2 ;;
    --workers) workers=$2 ;;
    --links) links=$2 ;;
    --consistency) consistency=$2 ;;
    --samples) samples=$2 ;;
    --epochs) epochs=$2 ;;
    --gpt-windows) gpt_windows=$2 ;;
    --bin) bin=$(cd "$2" && pwd) ;;
    --keep) keep=$2 ;;
    --set) extra+=("$2") ;;
    *) usage ;;
    esac
    shift 2
done
[ "$(id -u)" = 0 ] || { echo "net_bench: needs root (network namespaces, tc)" >&2; exit 1; }
for b in kdist-coordinator kdist-teacher kdist-worker; do
    [ -x "$bin/$b" ] || { echo "net_bench: no $bin/$b (build first, or --bin DIR)" >&2; exit 1; }
done
for l in ${links//,/ }; do
    [[ $l == unshaped || $l =~ ^[0-9]+[kmg]bit$ ]] ||
        { echo "net_bench: link '$l' is neither 'unshaped' nor a rate such as 1gbit" >&2; exit 2; }
done
for v in "samples=$samples" "epochs=$epochs" "gpt-windows=$gpt_windows"; do
    [[ ${v#*=} =~ ^[1-9][0-9]{0,6}$ ]] || { echo "net_bench: --${v%%=*} takes a count, not '${v#*=}'" >&2; exit 2; }
done
[[ $consistency =~ ^(sync|async|ssp)$ ]] ||
    { echo "net_bench: --consistency is sync, async or ssp, not '$consistency'" >&2; exit 2; }
max_workers=0
for n in ${workers//,/ }; do
    [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "net_bench: --workers takes counts, not '$n'" >&2; exit 2; }
    [ "$n" -gt "$max_workers" ] && max_workers=$n
done
py=/usr/bin/python3

tag=$(($$ % 10000))
br=kdnb${tag}br net=10.118.60
tmp=$(mktemp -d /tmp/net_bench.XXXXXX)
hosts=(c t)
for ((i = 1; i <= max_workers; i++)); do hosts+=("w$i"); done
ns_of() { echo "kdnb$tag$1"; }

cleanup() {
    local h p
    set +e
    for h in "${hosts[@]}"; do
        for p in $(ip netns pids "$(ns_of "$h")" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$(ns_of "$h")" 2>/dev/null
    done
    ip link del "$br" 2>/dev/null
    if [ -n "$keep" ]; then mkdir -p "$keep" && cp -r "$tmp"/. "$keep"/; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- hosts: one namespace each, eth0 on the bridge ---------------------------------------------
ip link add "$br" type bridge
ip link set "$br" up
addr=1
for h in "${hosts[@]}"; do
    ns=$(ns_of "$h")
    ip netns add "$ns"
    ip link add "kdnb$tag$h" type veth peer name eth0 netns "$ns"
    ip link set "kdnb$tag$h" master "$br" up
    ip -n "$ns" addr add "$net.$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    eval "ip_$h=$net.$addr"
    addr=$((addr + 1))
done

# shape RATE: the coordinator's link, both ways (its eth0 sends, the bridge's port to it sends to
# it); `unshaped` removes the shaping. The bucket holds 4 ms at the rate (at least 64 KB), enough
# for the kernel's timer to keep a gigabit line full.
link_bits() { # RATE -> bits per second (unshaped: 0)
    local bits=${1%bit}
    case $bits in
    *k) echo $((${bits%k} * 1000)) ;; *m) echo $((${bits%m} * 1000000)) ;;
    *g) echo $((${bits%g} * 1000000000)) ;; unshaped) echo 0 ;; *) echo "$bits" ;;
    esac
}
shape() {
    local ns dev
    ns=$(ns_of c) dev=kdnb${tag}c
    tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
    tc qdisc del dev "$dev" root 2>/dev/null || true
    [ "$1" = unshaped ] && return 0
    local burst=$(($(link_bits "$1") / 8 / 250))
    [ "$burst" -ge 65536 ] || burst=65536
    tc -n "$ns" qdisc add dev eth0 root tbf rate "$1" burst "$burst" latency 50ms
    tc qdisc add dev "$dev" root tbf rate "$1" burst "$burst" latency 50ms
}
counters() { # the coordinator's eth0: "rx_bytes tx_bytes"
    ip netns exec "$(ns_of c)" sh -c 'cat /sys/class/net/eth0/statistics/rx_bytes \
        /sys/class/net/eth0/statistics/tx_bytes' | tr '\n' ' '
}

# wait_exit PID SECONDS WHAT: the process ends within SECONDS with status 0
wait_exit() {
    local deadline=$((SECONDS + $2)) rc=0
    while kill -0 "$1" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            echo "net_bench: $3 still running after $2 s" >&2
            return 1
        fi
        sleep 0.2
    done
    wait "$1" || rc=$?
    [ "$rc" = 0 ] || echo "net_bench: $3 exited $rc" >&2
    return "$rc"
}

# run MODEL LINK WORKERS: one run; appends its row's numbers to $tmp/rows
run() {
    local model=$1 link=$2 n=$3 dir=$tmp/$1-$2-$3 recipe ovr=()
    mkdir -p "$dir"
    case $model in
    mlp | cnn)
        recipe=$src/recipes/fashion_mlp_student.yaml
        [ "$model" = cnn ] && recipe=$src/recipes/fashion_cnn_teacher.yaml
        ovr=(data.val_size=1000 "data.train_subset=$((samples + 1000))" "train.epochs=$epochs")
        ;;
    gpt)
        recipe=$src/recipes/kjv_gpt_student.yaml
        ovr=("data.dir=$src/.deps/kjv" "data.train_subset=$gpt_windows" eval.every_steps=0)
        ;;
    *) echo "net_bench: no model '$model' (mlp, cnn, gpt)" >&2 && exit 2 ;;
    esac
    ovr+=("cluster.workers=$n" "cluster.consistency=$consistency" cluster.shared_memory=false
        cluster.security.allow_plaintext=true train.threads=1 checkpoint.every_steps=0
        "cluster.bind=tcp://$ip_c:5555" "logging.runs_dir=$dir" "${extra[@]}")
    shape "$link"
    local before after
    before=$(counters)
    ip netns exec "$(ns_of c)" "$bin/kdist-coordinator" --recipe "$recipe" --run-dir "$dir/run" \
        "${ovr[@]}" >"$dir/coordinator.log" 2>&1 &
    local coord=$!
    local deadline=$((SECONDS + 60))
    until [ -s "$dir/run/coordinator.endpoint" ]; do
        kill -0 "$coord" 2>/dev/null && [ $SECONDS -lt $deadline ] ||
            { echo "net_bench: the coordinator did not start: $(tail -3 "$dir/coordinator.log")" >&2 && exit 1; }
        sleep 0.1
    done
    local ep pids=() i
    ep=$(cat "$dir/run/coordinator.endpoint")
    ip netns exec "$(ns_of t)" "$bin/kdist-teacher" --coordinator "$ep" --id 0 --recipe "$recipe" \
        --stream-bind "tcp://$ip_t:*" --log "$dir/teacher.log" "${ovr[@]}" >"$dir/teacher.err" 2>&1 &
    pids+=($!)
    for ((i = 1; i <= n; i++)); do
        ip netns exec "$(ns_of "w$i")" "$bin/kdist-worker" --coordinator "$ep" --id "$i" --threads 1 \
            --log "$dir/worker$i.log" >"$dir/worker$i.err" 2>&1 &
        pids+=($!)
    done
    wait_exit "$coord" 3600 "the coordinator ($model, $link, $n workers)" ||
        { tail -5 "$dir/coordinator.log" >&2 && exit 1; }
    after=$(counters)
    for i in "${pids[@]}"; do wait_exit "$i" 60 "a node ($model, $link, $n workers)" || exit 1; done
    "$py" - "$dir/run/summary.json" "$model" "$link" "$n" "$before" "$after" \
        "$(link_bits "$link")" "$dir/run" >>"$tmp/rows" <<'PY'
import glob, hashlib, json, sys
path, model, link, n, before, after, bits, run = sys.argv[1:]
s = json.load(open(path))
l = s["ledger"]
if s["status"] != "completed" or l["batches_applied"] != l["batches_expected"]:
    sys.exit(f"net_bench: {model} {link} {n}: {s['status']}, ledger {l}")
rx0, tx0 = map(int, before.split())
rx1, tx1 = map(int, after.split())
weights = run + "/student.safetensors"
digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()[:12]
print(json.dumps(dict(model=model, link=link, workers=int(n), rate=s["samples_per_sec"],
                      samples=s["samples_trained"], up=rx1 - rx0, down=tx1 - tx0,
                      bits=int(bits), weights=digest, wall=s["wall_seconds"])))
PY
    echo "net_bench: $model, $link, $n worker(s): done" >&2
}

for model in ${models//,/ }; do
    for n in ${workers//,/ }; do
        for link in ${links//,/ }; do run "$model" "$link" "$n"; done
    done
done
"$py" - "$tmp/rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| model | coordinator link | workers | samples/s | KB/sample up / down "
      "| link busy up / down | of unshaped | weights |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    base = next((b for b in rows if b["model"] == r["model"] and b["workers"] == r["workers"]
                 and b["link"] == "unshaped"), None)
    # bytes a sample, each way, as the coordinator's interface counted them (headers included)
    up, down = r["up"] / r["samples"], r["down"] / r["samples"]
    # busy: the bits of the training time the link could carry that it did carry
    seconds = r["samples"] / r["rate"]
    busy = (f"{r['up'] * 8 / seconds / r['bits']:.0%} / {r['down'] * 8 / seconds / r['bits']:.0%}"
            if r["bits"] else "-")
    of = f"{r['rate'] / base['rate']:.0%}" if base and base is not r else "-"
    same = "" if not base or base is r else (" (=)" if base["weights"] == r["weights"] else " (differ)")
    rate = f"{r['rate']:,.0f}" + (f" ({r['rate'] * 256:,.0f} tokens/s)" if r["model"] == "gpt" else "")
    print(f"| {r['model']} | {r['link']} | {r['workers']} | {rate} | "
          f"{up / 1e3:.1f} / {down / 1e3:.1f} | {busy} | {of} | {r['weights']}{same} |")
PY
