#!/usr/bin/env bash
# GPU check for a lent NVIDIA machine: rollout tok/s, update time and MFU of a Qwen3-0.6B-shaped
# random bf16 model with mlx[cuda] (bench/device_bench.py), in under 5 minutes. No test uses it.
#
# The GPU machine has no network: mlx, mlx-cuda-13 (CUDA 13, the machine's driver) and mlx-lm
# travel with the working tree. Everything else (numpy, tokenizers, transformers, the CUDA
# libraries mlx-cuda-13 links: cublas, cudnn, nccl, cufft, nvrtc, cudart, cusolver) is on the
# machine's image. `pack` unpacks the three wheels here into one site tree and writes it as an
# xz tarball; with mlx-cuda-13 0.32.4 that is 76 MB (stripping libmlx.so saves 1 MB), over the
# 64 MiB one call may carry, so the tarball is split into parts of at most 45 MiB, one folder
# each (DIR/1, DIR/2), carried by two calls in a row:
#
#   here, with PyPI:   bash bench/device.sh pack .whl      # also adds /.whl/ to .git/info/exclude
#   device call 1:     bash bench/device.sh stage .whl/1   # run tool, carry [".whl/1"]: copies
#                                                          # the part to /tmp/mlx-stage there
#   device call 2:     bash bench/device.sh run .whl/2     # carry [".whl/2"], within 30 s of the
#                      # first (the machine stays warm 30 s; a fresh one has lost /tmp/mlx-stage)
#   here, no GPU:      bash bench/device.sh cpu            # the Python part on the CPU, --size tiny
#
# `run DIR [ARGS]` joins the parts of DIR and /tmp/mlx-stage, unpacks them into /tmp/mlx-site
# (once per machine), then runs python -m bench.device_bench ARGS (default: the 0.6B shape, B=8,
# G=8, 256 tokens) under a 280 s timeout. When the parts fit one call, `run .whl` alone works.
set -euo pipefail

MLX_VERSION=${MLX_VERSION:-0.32.4}
MLX_LM_VERSION=${MLX_LM_VERSION:-0.32.2}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PART_BYTES=$((45 * 1024 * 1024))

die() { echo "device.sh: $*" >&2; exit 2; }

pack() {
    local dir=${1:-.whl} py=${PYTHON:-$HERE/.venv/bin/python}
    [ -x "$py" ] || py=python3
    mkdir -p "$dir"
    local tmp
    tmp=$(mktemp -d)
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
        "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
    mkdir -p "$tmp/site"
    for whl in "$tmp"/wheels/*.whl; do
        "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
            "$whl" "$tmp/site"
    done
    rm -rf "${dir:?}"/[0-9]*
    tar -C "$tmp/site" -cf - . | xz -T0 -6 | split -b "$PART_BYTES" -d - "$tmp/mlx-site.tar.xz.part-"
    local i=0 part
    for part in "$tmp"/mlx-site.tar.xz.part-*; do
        i=$((i + 1))
        mkdir -p "$dir/$i"
        mv "$part" "$dir/$i/"
    done
    rm -rf "$tmp"
    echo "device.sh: $i part(s) in $dir/1..$dir/$i: one device call each (see the header)"
    local exclude="$HERE/.git/info/exclude" rel
    rel=$(realpath --relative-to="$HERE" "$dir")
    if [ -d "$HERE/.git" ] && ! grep -qx "/$rel/" "$exclude" 2>/dev/null; then
        echo "/$rel/" >> "$exclude"
    fi
    ls -lR "$dir"
}

stage() {
    local dir=${1:-.whl}
    mkdir -p /tmp/mlx-stage
    cp "$dir"/mlx-site.tar.xz* /tmp/mlx-stage/
    ls -l /tmp/mlx-stage
}

install_site() {
    local dir=$1 site=/tmp/mlx-site
    if [ ! -f "$site/.complete" ]; then
        local parts
        parts=$( (ls "$dir"/mlx-site.tar.xz* "$dir"/*/mlx-site.tar.xz* \
                  /tmp/mlx-stage/mlx-site.tar.xz* 2>/dev/null || true) \
                | awk -F/ '!seen[$NF]++ {print $NF "\t" $0}' | sort | cut -f2)
        [ -n "$parts" ] || die "no $dir/mlx-site.tar.xz.part-*: run 'bash bench/device.sh pack' here"
        mkdir -p "$site"
        # shellcheck disable=SC2086
        cat $parts | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, \
mode='r|xz').extractall(sys.argv[1])" "$site"
        touch "$site/.complete"
    fi
    # libmlx.so finds the CUDA libraries at $ORIGIN/../../nvidia/*/lib (pip's layout): point
    # that at the image's own nvidia packages, and list their lib folders as a fallback
    local nv
    nv=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null) \
        || die "python3 has no nvidia packages (cublas, cudnn, ...) for mlx-cuda-13"
    [ -e "$site/nvidia" ] || ln -s "$nv" "$site/nvidia"
    local libs
    libs=$(find "$nv" -maxdepth 3 -type d -name lib | paste -sd:)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export PYTHONPATH="$site:$HERE${PYTHONPATH:+:$PYTHONPATH}"
}

run() {
    local dir=${1:-.whl}
    shift || true
    install_site "$dir"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device()); \
assert mx.default_device() == mx.gpu, 'mlx sees no GPU'"
    PYTHONUNBUFFERED=1 timeout 280 python3 -m bench.device_bench "$@"
}

cpu() {
    local py=${PYTHON:-$HERE/.venv/bin/python}
    (cd "$HERE" && "$py" -m bench.device_bench --size tiny --repeats 1 "$@")
}

cmd=${1:-}
shift || true
cd "$HERE"
case "$cmd" in
    pack) pack "$@" ;;
    stage) stage "$@" ;;
    run) run "$@" ;;
    cpu) cpu "$@" ;;
    *) die "usage: bash bench/device.sh pack [DIR] | stage [DIR] | run [DIR] [ARGS] | cpu [ARGS]" ;;
esac
