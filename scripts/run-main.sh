#!/usr/bin/env bash
# The main job behind `make run`: a dispatch/combine run over every GPU present, or over
# host ranks where there is none. Usage: scripts/run-main.sh BUILD_DIR
set -euo pipefail
build=${1:-build}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
"$build/tools/moecomm-info" --brief
if [ "$gpus" -gt 0 ]; then
  ranks=$gpus
  echo "run-main: $gpus GPU(s) found; the CUDA EP kernels are not built yet, so this run uses $ranks host ranks"
else
  ranks=4
  echo "run-main: no GPU found; running $ranks host ranks"
fi
export MOECOMM_BACKEND=host
exec "$build/tools/moecomm-run" -n "$ranks" -t 300 "$build/examples/moecomm_example"
