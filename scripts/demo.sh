#!/usr/bin/env bash
# The demo of what exists so far: train the 784-800-800-10 MLP for two epochs on a local
# cluster (coordinator, a teacher node streaming batches, two workers), evaluate the weights it
# saved with `kdist eval` (dumping the logits), then the step benchmark.
set -euo pipefail
build=${1:-build}
bin="$build/bin"
cd "$(dirname "$0")/.."

echo "== 1. kdist run recipes/fashion_mlp_student.yaml: 2 epochs, 2 workers (sync) =="
"$bin/kdist" run recipes/fashion_mlp_student.yaml name=demo_mlp train.epochs=2 cluster.workers=2

echo
echo "== 2. kdist eval of the saved weights =="
"$bin/kdist" eval runs/demo_mlp/student.safetensors --recipe runs/demo_mlp/recipe.yaml \
    --split test --dump-logits runs/demo_mlp/test_logits.npy

echo
echo "== 3. Training-step benchmark against cblas_sgemm on the same shapes =="
"$bin/kd_bench_step"
