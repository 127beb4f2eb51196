#!/usr/bin/env bash
# One round on a GPU machine: build with every core, run the whole test suite (GPU tests run
# for real there), run the main job, and leave logs under $OUT (or ./device-logs).
# Usage: scripts/device-round.sh [extra ctest args...]
set -uo pipefail
out=${OUT:-$PWD/device-logs}
mkdir -p "$out"
# Never let anything create NVLink multicast objects on the shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{
  date -u; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -12; nproc
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit unknown (no .git)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
build=build-device
if ! cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"; exit 1
fi
if ! cmake --build $build -j "$(nproc)" > "$out/build.log" 2>&1; then
  grep -E "error|FAILED" "$out/build.log" | head -30; exit 1
fi
grep -c warning "$out/build.log" | sed 's/^/build warnings: /'
(cd $build && ctest -j 8 --timeout 600 --output-on-failure "$@") > "$out/ctest.log" 2>&1
status=$?
grep -E "tests passed|tests failed|Failed|\*\*\*|Not Run|SKIPPED" "$out/ctest.log" | tail -40
(cd $build && ctest -L gpu -V --timeout 600) > "$out/ctest-gpu-verbose.log" 2>&1 || true
exit $status
