#!/usr/bin/env bash
# Stealing dispatch senders on 2 GPUs, or RANKS (developer tool): through scripts/direct-round.sh,
# the normal suite, then W-prefill FP8/BF16 benches with and without MOECOMM_EP_DISPATCH_STEAL=1
# (symmetric and device buffers, SM 24 and 12, two rounds of the FP8 pair) and tail batches of
# 64 and 128; the normal suite again with the switch on; then a profile build (per block: SM id
# and end) of the direct FP8 dispatch with and without it, twice; last moecomm-linkbench push,
# push-fence and push-wfence at 12 and 24 blocks of 8 warps (rates and how late the last block
# ends). Logs in $OUT/direct.tgz and $OUT/p.tgz; carry .bench-commit.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/steal-logs}; mkdir -p "$out/p"
nvidia-smi -L
(cmake -S . -B build-prof -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-DMOECOMM_KERNEL_PROFILE > /dev/null &&
  cmake --build build-prof -j 8 --target moecomm-run moecomm-bench moecomm-linkbench > "$out/p/prof-build.log" 2>&1 || echo "profile build failed") &
S=MOECOMM_EP_DISPATCH_STEAL=1
N="--no-baseline --no-roofline"
export BENCHES="S24-fp8-sym --dtype fp8 -S 24 --buffers symmetric
$S S24-fp8-sym-steal --dtype fp8 -S 24 --buffers symmetric $N
S24-fp8-sym-2 --dtype fp8 -S 24 --buffers symmetric $N
$S S24-fp8-sym-steal-2 --dtype fp8 -S 24 --buffers symmetric $N
S24-fp8-dev --dtype fp8 -S 24 $N
$S S24-fp8-dev-steal --dtype fp8 -S 24 $N
S12-fp8-sym --dtype fp8 -S 12 --buffers symmetric $N
$S S12-fp8-sym-steal --dtype fp8 -S 12 --buffers symmetric $N
S24-bf16-sym --dtype bf16 -S 24 --buffers symmetric $N
$S S24-bf16-sym-steal --dtype bf16 -S 24 --buffers symmetric $N
MOECOMM_EP_SEND_BATCH=64 S24-fp8-sym-b64 --dtype fp8 -S 24 --buffers symmetric $N
MOECOMM_EP_SEND_BATCH=128 S24-fp8-sym-b128 --dtype fp8 -S 24 --buffers symmetric $N"
MUTANT=0 OUT="$out" bash scripts/direct-round.sh
(cd build-device && MOECOMM_EP_DISPATCH_STEAL=1 timeout 150 ctest -R "^gpu_EpCudaNormal_n${RANKS:-2}\$" --timeout 140 -V \
  > "$out/p/steal-test.log" 2>&1; echo "suite with steal rc=$? case lines PASS: $(grep -c ': PASS' "$out/p/steal-test.log")")
wait
for st in 0 1 0 1; do
  MOECOMM_EP_DISPATCH_STEAL=$st MOECOMM_DEBUG=WARN timeout 100 build-prof/tools/moecomm-run -n "${RANKS:-2}" -t 90 \
    build-prof/tools/bench/moecomm-bench -w W-prefill -n 10 -W 3 -c 1 --dtype fp8 -S 24 --buffers symmetric $N \
    >> "$out/p/prof-steal$st.txt" 2>&1
  echo "profile steal=$st rc=$?"
  grep -E "profile dispatch" "$out/p/prof-steal$st.txt" | tail -4 | sed 's/^.*MOECOMM WARN [^ ]* //' | cut -c1-900
done
timeout 120 build-prof/tools/moecomm-linkbench --modes 0,1,8 --grids 12,24 --warps 8 | tee "$out/p/linkbench.txt"
gzip -f "$out/p/steal-test.log"
cd "$out" && tar czf p.tgz p && rm -rf p
