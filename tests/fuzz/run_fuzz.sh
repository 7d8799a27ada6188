#!/bin/sh
# run_fuzz.sh FUZZER WORK_DIR SEED_CORPUS SECONDS: one bounded libFuzzer run on a fresh scratch
# copy of the seeds (libFuzzer adds to the corpus it is given; the repository's stays as
# committed). A failure is reported with its input in hex and replayed alone: an input that
# crashes again is a bug and fails the test. A failure that leaves no input or does not replay
# (the sanitizer runtime dying on a loaded machine) is shown in full and the run is retried
# once; failing again fails the test.
set -u
fuzzer=$1 work=$2 seeds=$3 seconds=$4

run_once() {
    rm -rf "$work" && mkdir -p "$work/corpus" && cp "$seeds"/* "$work/corpus/" || return 2
    "$fuzzer" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=1024 \
        -artifact_prefix="$work/" "$work/corpus" > "$work/log" 2>&1
}

for attempt in 1 2; do
    if run_once; then
        tail -n 12 "$work/log"
        exit 0
    fi
    echo "run_fuzz: $(basename "$fuzzer") failed (attempt $attempt); its output:"
    cat "$work/log"
    found=no
    for input in "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-*; do
        [ -f "$input" ] || continue
        found=yes
        echo "run_fuzz: failing input $input ($(wc -c < "$input") bytes):"
        od -A d -c "$input" | head -n 64
        if ! "$fuzzer" -timeout=10 -rss_limit_mb=1024 "$input" > "$work/replay.log" 2>&1; then
            echo "run_fuzz: the input fails again when replayed alone:"
            cat "$work/replay.log"
            exit 1
        fi
        echo "run_fuzz: the input passes when replayed alone"
    done
    [ "$found" = no ] && echo "run_fuzz: no failing input was written"
done
echo "run_fuzz: $(basename "$fuzzer") failed twice"
exit 1
