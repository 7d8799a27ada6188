#!/usr/bin/env bash
# Installs every Debian package kdist needs to build, test and run its demo.
# Idempotent and quiet when everything is present; runs as root, or through sudo otherwise.
set -euo pipefail

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
)
# Reference fixtures and comparisons only (tests/data/make_fixtures.py); kdist never needs it.
if [ "${KD_WITH_TORCH:-0}" = 1 ]; then packages+=(python3-torch); fi

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

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
