#!/usr/bin/env bash
# The demo: recipes/fashion_distill.yaml (the CNN teacher distilled into the 784-800-800-10 MLP at
# T = 4, alpha = 0.9), shortened to a few minutes on two cores. `kdist run` trains the teacher
# first (2 epochs on the whole training set instead of 15), distils the student on a
# 10,000-sample subset for 5 epochs, trains the same student alone on the same subset for
# comparison (--baseline) and prints teacher, student alone and distilled student side by side.
# (A student with little data is where a teacher's soft targets help most.) Then `kdist eval`
# of the distilled weights. Outputs: runs/demo_teacher/, runs/demo_distill/ (comparison.json)
# and runs/demo_distill_alone/. The step benchmark is `make bench`.
set -euo pipefail
build=${1:-build}
bin="$build/bin"
cd "$(dirname "$0")/.."
start=$SECONDS

# A fresh teacher every time, so the demo shows the teacher being trained first. (A student
# alone that completed in an earlier demo with the same recipe is reused, and `kdist run` says so.)
rm -rf runs/demo_teacher

echo "== 1. kdist run recipes/fashion_distill.yaml --baseline (shortened: teacher 2 epochs;"
echo "      students 5 epochs on 10,000 samples: data.train_subset=15000 less 5000 for validation) =="
"$bin/kdist" run recipes/fashion_distill.yaml name=demo_distill train.epochs=5 \
    data.train_subset=15000 teacher.checkpoint=runs/demo_teacher/student.safetensors \
    teacher_run.name=demo_teacher teacher_run.train.epochs=2 --baseline
distill_done=$SECONDS

echo
echo "== 2. kdist eval of the distilled student's weights =="
"$bin/kdist" eval runs/demo_distill/student.safetensors --recipe runs/demo_distill/recipe.yaml \
    --split test --dump-logits runs/demo_distill/test_logits.npy

echo
echo "demo: distillation pipeline $((distill_done - start)) s, whole demo $((SECONDS - start)) s" \
    "(the training-step benchmark: make bench)"
