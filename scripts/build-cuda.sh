#!/usr/bin/env bash
# Builds kiln with `--features cuda` on a machine with no CUDA install: a
# CUDA 13.0 toolchain (nvcc, cicc, ptxas, the runtime and crt headers) is
# assembled from pinned PyPI wheels into .tools/cuda (git-ignored; the
# system is untouched), then `cargo build --release --features cuda`.
# CUDA 13.0 matches the GPU machine's driver (580) and libraries. Without
# nvidia-smi, candle needs CUDA_COMPUTE_CAP: 90 (Hopper) by default.
#
# State (issue 14, work in progress): the toolchain assembles and nvcc
# compiles candle's kernels to PTX (ISA 9.0, sm_90); the final link still
# fails. candle-core 0.9.2 builds cudarc with `dynamic-linking`, so the
# binary needs libcudart, libcuda, libnvrtc, libcurand, libcublas and
# libcublasLt at link time (their wheels, or stubs, still to add here) and
# at load time (a CUDA build would not start where no driver is installed).
#   scripts/build-cuda.sh [cargo build arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)/.tools/cuda
cuda=$root/nvidia/cu13
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
if [ ! -x "$cuda/bin/nvcc" ] || [ ! -f "$cuda/include/crt/host_config.h" ]; then
  rm -rf "$root"
  mkdir -p "$root/dl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$root/dl" "${wheels[@]}"
  for wheel in "$root"/dl/*.whl; do python3 -m zipfile -e "$wheel" "$root"; done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
fi
export CUDA_HOME=$cuda CUDA_PATH=$cuda CUDA_ROOT=$cuda PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -n 2
cargo build --release --features cuda "$@"
