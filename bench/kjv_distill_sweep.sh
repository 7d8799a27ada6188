#!/bin/sh
# The cache-encoding sweep of recipes/kjv_distill.yaml (README, "Distilling a language model"):
# for each seed, the student alone (distill.alpha=0) and the student distilled through each
# encoding (dense fp16, top-k 8 and 32, sampled 12), the same data and steps; then one table
# of validation bits per byte (mean over the seeds), the share of the alone-to-teacher gap each
# closes, calibration, cache bytes per token and wall times (bench/kjv_sweep_table.py).
# The teacher's logits are computed once per encoding and read from the cache afterwards.
# A run that completed before is kept: rerun after a crash and the sweep goes on.
#   usage: bench/kjv_distill_sweep.sh [SEED...]      (default: 1 2 3; KDIST=build/bin/kdist)
set -eu
cd "$(dirname "$0")/.."
KDIST=${KDIST:-build/bin/kdist}
SEEDS=${*:-1 2 3}
ENCODINGS=${ENCODINGS:-fp16 topk8 topk32 sampled12}
RECIPE=recipes/kjv_distill.yaml

completed() { grep -q '"status": "completed"' "runs/$1/summary.json" 2>/dev/null; }

run() { # NAME OVERRIDES...
    name=$1
    shift
    if completed "$name"; then
        echo "== $name: completed before, kept"
        return
    fi
    echo "== $name: $*"
    "$KDIST" run "$RECIPE" name="$name" "$@"
}

for seed in $SEEDS; do
    run "kjv_alone_s$seed" seed="$seed" distill.alpha=0
    for enc in $ENCODINGS; do
        case $enc in
        topk*) how="cache.encoding=topk cache.topk=${enc#topk}" ;;
        sampled*) how="cache.encoding=sampled cache.samples=${enc#sampled}" ;;
        *) how="cache.encoding=$enc" ;;
        esac
        # shellcheck disable=SC2086 # $how is two overrides
        run "kjv_distill_${enc}_s$seed" seed="$seed" $how
    done
done
/usr/bin/python3 bench/kjv_sweep_table.py --runs runs --teacher runs/kjv_gpt_teacher \
    --encodings "$ENCODINGS" --seeds "$SEEDS"
