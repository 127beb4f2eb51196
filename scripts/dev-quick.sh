#!/usr/bin/env bash
# Quick GPU iteration (developer tool): build the GPU test and bench targets, run the normal-mode
# GPU test on 2 ranks, then W-prefill benches. Logs and JSON under $OUT.
# Usage: scripts/dev-quick.sh [SM budgets...]   (default: 24)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/dev-logs}; mkdir -p "$out"
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
cmake --build build-device -j "$(nproc)" --target moecomm_gpu_tests moecomm-run moecomm-bench > "$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head; exit 1; }
nvidia-smi -L
cd build-device || exit 1
[ -f ../.bench-commit ] && export MOECOMM_BENCH_COMMIT=$(cat ../.bench-commit)
if [ -z "${SKIP_TEST:-}" ]; then
  MOECOMM_KERNEL_TIMEOUT=5000 timeout 200 tools/moecomm-run -n 2 -t 190 tests/moecomm_gpu_tests --gtest_filter="${TEST_FILTER:-EpCudaNormal.*}" > "$out/test.log" 2>&1; echo "test rc=$?"
  grep -cE ": PASS" "$out/test.log" | sed 's/^/PASS lines: /'; grep -E "FAIL|Timeout|rror" "$out/test.log" | head -20
fi
for sms in ${@:-24}; do
  for dt in ${DTYPES:-fp8 bf16}; do
    timeout 100 tools/moecomm-run -n 2 -t 90 tools/bench/moecomm-bench -w ${WORKLOAD:-W-prefill} --dtype $dt -S $sms -n ${ITERS:-10} -W 3 -c 1 -J "$out/bench.jsonl" 2>&1 | grep -E "^\[rank 0\] (nccl|libmoecomm)" | sed "s/^/S$sms $dt /"
  done
done
