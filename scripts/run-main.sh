#!/usr/bin/env bash
# The main job behind `make run`: a dispatch/combine run over every GPU present (W-prefill
# through moecomm-bench, results checked against the host reference, NCCL baseline beside
# it), or the C example over host ranks where there is no GPU.
# Usage: scripts/run-main.sh BUILD_DIR
set -euo pipefail
build=${1:-build}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
"$build/tools/moecomm-info" --brief
if [ "$gpus" -ge 2 ] && [ -x "$build/tools/bench/moecomm-bench" ]; then
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  echo "run-main: $gpus GPUs; W-prefill dispatch/combine on the CUDA backend, checked"
  exec "$build/tools/moecomm-run" -n "$gpus" -t 300 "$build/tools/bench/moecomm-bench" -w W-prefill -c 1 -n 20
fi
ranks=4
echo "run-main: no multi-GPU machine here; running the example on $ranks host ranks"
export MOECOMM_BACKEND=host
exec "$build/tools/moecomm-run" -n "$ranks" -t 300 "$build/examples/moecomm_example"
