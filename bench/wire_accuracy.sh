#!/usr/bin/env bash
# bench/wire_accuracy.sh: what fewer bytes on the wire cost in accuracy. Runs the 15-epoch MLP
# recipe (recipes/fashion_mlp_student.yaml) as a real cluster over TCP (one sync worker,
# cluster.shared_memory=false, so cluster.wire applies) for each seed, once with fp32 and once
# per compared setting, and the GPT student (recipes/kjv_gpt_student.yaml on a subset) the
# same way; prints test accuracy (MLP) and validation loss (GPT) per seed, their means and the
# differences against fp32. --compare may be given more than once (each a setting of its own).
#
#   bench/wire_accuracy.sh [--seeds 1,2,3] [--compare "cluster.wire=bf16 cluster.accumulate=2"]...
#                          [--models mlp,gpt] [--gpt-windows 3200] [--gpt-epochs 2] [--bin DIR]
#                          [--runs DIR]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
seeds=1,2,3
compares=()
gpt_windows=3200
gpt_epochs=2
models=mlp,gpt
bin="$here/build/bin"
runs=$(mktemp -d /tmp/kd_wire_accuracy.XXXXXX)

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds | --compare | --models | --gpt-windows | --gpt-epochs | --bin | --runs) [ $# -ge 2 ] || usage ;;
    esac
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --compare) compares+=("$2"); shift 2 ;;
        --gpt-windows) gpt_windows=$2; shift 2 ;;
        --gpt-epochs) gpt_epochs=$2; shift 2 ;;
        --models) models=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        *) usage ;;
    esac
done
[ -x "$bin/kdist" ] || { echo "wire_accuracy: no $bin/kdist (build first, or --bin DIR)" >&2; exit 1; }
[[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "wire_accuracy: --seeds wants numbers like 1,2,3" >&2; exit 2; }
[[ $gpt_windows =~ ^[1-9][0-9]*$ && $gpt_epochs =~ ^[1-9][0-9]*$ ]] ||
    { echo "wire_accuracy: --gpt-windows and --gpt-epochs want positive counts" >&2; exit 2; }
mkdir -p "$runs"
[ ${#compares[@]} -gt 0 ] || compares=("cluster.wire=bf16 cluster.accumulate=2")

# One run; prints the summary's value of key (test_accuracy or val_loss).
run_one() { # name recipe key overrides...
    local name=$1 recipe=$2 key=$3
    shift 3
    local log="$runs/$name.log"
    if ! (cd "$here" && "$bin/kdist" run "$recipe" name="$name" logging.runs_dir="$runs" \
        cluster.shared_memory=false "$@") >"$log" 2>&1; then
        echo "wire_accuracy: run $name failed; its log: $log" >&2
        tail -5 "$log" >&2
        exit 1
    fi
    /usr/bin/python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s[sys.argv[2]])' \
        "$runs/$name/summary.json" "$key"
}

# model recipe key extra-overrides: a row per setting, a column per seed, then the mean.
sweep() {
    local model=$1 recipe=$2 key=$3 extra=$4
    local setting label values mean base_mean=""
    for setting in "cluster.wire=fp32" "${compares[@]}"; do
        label=${setting// /, }
        values=()
        for seed in ${seeds//,/ }; do
            local name="wa_${model}_s${seed}_$(echo "$setting" | tr -c 'a-z0-9' '_')"
            # shellcheck disable=SC2086  # the settings are words on purpose
            values+=("$(run_one "$name" "$recipe" "$key" seed="$seed" $extra $setting)")
            echo "wire_accuracy: $model seed $seed ($label): ${values[-1]}" >&2
        done
        mean=$(printf '%s\n' "${values[@]}" | awk '{s += $1} END {printf "%.4f", s / NR}')
        local diff="-"
        if [ -z "$base_mean" ]; then base_mean=$mean; else
            diff=$(awk -v a="$mean" -v b="$base_mean" 'BEGIN {printf "%+.4f", a - b}')
        fi
        echo "| $model | $key | $label | $(printf '%s / ' "${values[@]}" | sed 's| / $||') | $mean | $diff |"
    done
}

echo "| model | measure | setting | per seed ($seeds) | mean | vs fp32 |"
echo "|---|---|---|---|---|---|"
for model in ${models//,/ }; do
    case "$model" in
        mlp) sweep mlp recipes/fashion_mlp_student.yaml test_accuracy "" ;;
        gpt) sweep gpt recipes/kjv_gpt_student.yaml val_loss \
            "data.dir=$here/.deps/kjv data.train_subset=$gpt_windows train.epochs=$gpt_epochs" ;;
        *) echo "wire_accuracy: no model '$model' (mlp, gpt)" >&2; exit 2 ;;
    esac
done
echo "runs and logs: $runs" >&2
