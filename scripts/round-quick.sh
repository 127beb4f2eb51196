#!/usr/bin/env bash
# Short GPU validation + bench round (developer tool): build, the normal-mode GPU tests on 2 and
# (when present) 4 GPUs, then W-prefill FP8/BF16 at SM 24 on every GPU and FP8 on 2 GPUs
# (ALSO_RANKS=none skips the 2-GPU bench).
# JSON and logs under $OUT. Uses .bench-commit (if carried) as the commit in the JSON.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/round-logs}; mkdir -p "$out"
[ -f .bench-commit ] && export MOECOMM_BENCH_COMMIT=$(cat .bench-commit)
nvidia-smi -L; date -u
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 &&
  cmake --build build-device -j "$(nproc)" --target moecomm_gpu_tests moecomm-run moecomm-bench > "$out/build.log" 2>&1 ||
  { grep error "$out/build.log" | head; exit 1; }
(cd build-device && timeout 200 ctest -R "gpu_EpCudaNormal" --timeout 190 --output-on-failure) > "$out/ctest-gpu.log" 2>&1
grep -E "tests passed|tests failed|Passed|Failed|Skipped" "$out/ctest-gpu.log" | tail -6
n=$(nvidia-smi -L | wc -l)
for ranks in $n ${ALSO_RANKS:-2}; do
  [ "$ranks" = none ] && break
  for dt in ${DTYPES:-fp8 bf16}; do
    [ "$ranks" = 2 ] && [ "$n" = 2 ] && break 2
    timeout 100 build-device/tools/moecomm-run -n $ranks -t 90 build-device/tools/bench/moecomm-bench -w W-prefill --dtype $dt \
      -S 24 -n ${ITERS:-10} -W 3 -c 1 -J "$out/bench.jsonl" 2>&1 | grep -E "^\[rank 0\] (nccl|libmoecomm|# roofline)" | sed "s/^/R$ranks $dt /"
    [ "$ranks" = 2 ] && break
  done
done
