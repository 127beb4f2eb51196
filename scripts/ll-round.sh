#!/usr/bin/env bash
# Low-latency GPU round (developer tool): build; the LL GPU tests (nvlink and staged
# transports), the killed-rank, local-failure and row-format tests and the normal-mode test on
# every GPU present (CTEST_FILTER overrides);
# then W-decode LL benches, checked (-c 1), with graph replay, at each grid in GRIDS (default
# "132 24"), in both combine forms when the bench has --ll-per-rank. Logs and JSON under $OUT (default ./ll-logs); uses
# .bench-commit (if carried) as the commit in the JSON. SKIP_TEST=1 runs only the benches.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/ll-logs}; mkdir -p "$out"
[ -f .bench-commit ] && export MOECOMM_BENCH_COMMIT=$(cat .bench-commit)
nvidia-smi -L; date -u
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_EXTRA:-} > "$out/configure.log" 2>&1 &&
  cmake --build build-device -j "$(nproc)" --target moecomm_gpu_tests moecomm-run moecomm-bench > "$out/build.log" 2>&1 ||
  { grep -E "error" "$out/build.log" | head; exit 1; }
n=$(nvidia-smi -L | wc -l)
if [ -z "${SKIP_TEST:-}" ]; then
  filter=${CTEST_FILTER:-"gpu_EpCudaLowLatency_n$n|gpu_EpCudaLowLatencyStaged_n$n|gpu_EpCudaLowLatencyKill_n$n|gpu_EpCudaLowLatencyFailure_n$n|gpu_EpCudaLowLatencyFormat_n$n|gpu_EpCudaNormal_n$n"}
  (cd build-device && timeout 400 ctest -R "$filter" --timeout 300 --output-on-failure) > "$out/ctest-gpu.log" 2>&1
  grep -E "tests passed|tests failed|Passed|Failed|\*\*\*" "$out/ctest-gpu.log" | tail -8
  grep -hE "FAIL" "$out/ctest-gpu.log" | head -10
fi
forms="default"
build-device/tools/bench/moecomm-bench --help 2>&1 | grep -q -- "--ll-per-rank" && forms="default per-rank"
for grid in ${GRIDS:-132 24}; do
  for form in $forms; do
    extra=""; [ "$form" = per-rank ] && extra="--ll-per-rank"
    timeout 120 build-device/tools/moecomm-run -n "$n" -t 110 build-device/tools/bench/moecomm-bench -w W-decode --ll \
      --graph -S "$grid" -n ${ITERS:-50} -W 10 -c 1 $extra -J "$out/bench.jsonl" > "$out/bench-$grid-$form.txt" 2>&1
    echo "rc=$? grid $grid $form"
    grep -E "^\[rank 0\] (nccl|libmoecomm|# roofline)|check failed" "$out/bench-$grid-$form.txt" | sed "s/^/S$grid $form /"
  done
done
