#!/usr/bin/env bash
# Multi-rank GPU tests on a machine with fewer GPUs than ranks (developer tool): builds the
# GPU test binary and runs the multi-process GPU suites at each rank count in NRANKS (default
# "2 4 8") with MOECOMM_TEST_SHARED_GPUS=1, so ranks share the GPUs round-robin (one CUDA
# context per process, time-sliced by the driver). It checks the kernels' logic for rank
# counts the machine cannot give one GPU each; it says nothing about speed, and the tests with
# a wall-clock bound (failure, format: "within 5 s") may miss it when many ranks share a GPU.
# SUITES: the ctest names without _n<N> (default: every LL suite and the normal mode).
# CMAKE_EXTRA: one more configure option (one argument, spaces and all). Logs under $OUT (default ./shared-gpu-logs).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOECOMM_TEST_SHARED_GPUS=1
out=${OUT:-$PWD/shared-gpu-logs}; mkdir -p "$out"
nvidia-smi -L; date -u
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_EXTRA:+"$CMAKE_EXTRA"} > "$out/configure.log" 2>&1 ||
  { tail -20 "$out/configure.log"; exit 1; }
cmake --build build-device -j "$(nproc)" --target moecomm_gpu_tests moecomm-run > "$out/build.log" 2>&1 ||
  { grep -E "error" "$out/build.log" | head; exit 1; }
suites=${SUITES:-"EpCudaLowLatency EpCudaLowLatencyStaged EpCudaLowLatencyKill EpCudaLowLatencyFailure EpCudaLowLatencyFormat EpCudaNormal"}
for n in ${NRANKS:-2 4 8}; do
  filter=""
  for s in $suites; do filter="${filter:+$filter|}^gpu_${s}_n$n\$"; done
  start=$(date +%s)
  (cd build-device && timeout "${ROUND_TIMEOUT:-500}" ctest -R "$filter" --timeout "${TEST_TIMEOUT:-300}" -V) \
     > "$out/ctest-n$n.log" 2>&1
  echo "n=$n rc=$? $(( $(date +%s) - start )) s"
  grep -E "Test +#|tests passed|tests failed" "$out/ctest-n$n.log" | tail -12
  echo "gtest cases on rank 0: $(grep -cE '^[0-9]+: \[rank 0\] \[ +OK \]|^[0-9]+: \[ +OK \]' "$out/ctest-n$n.log") ok," \
    "$(grep -cE '\[ +SKIPPED \]' "$out/ctest-n$n.log") skipped lines"
  grep -hE "\[ +FAILED|Failure|error:" "$out/ctest-n$n.log" | head -10
done
