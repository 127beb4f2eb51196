#!/usr/bin/env bash
# A dispatch sender switch against the default on 2 GPUs, or RANKS (developer tool): through
# scripts/direct-round.sh the normal suite, then W-prefill benches of the default senders and
# of SWITCH (a VAR=value the kernels read, e.g. MOECOMM_EP_SEND_BATCH=64) side by side: FP8 with symmetric buffers
# at SM 24 (two rounds) and 12, BF16 at SM 24; the normal suite with SWITCH on; a profile build
# (per block: SM id and end) of the direct FP8 dispatch with and without it. Logs in
# $OUT/direct.tgz and $OUT/p.tgz; carry .bench-commit. QUICK=1: no BF16, no suite with SWITCH.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/dispatch-logs}; mkdir -p "$out/p"
sw=${SWITCH:?"SWITCH=VAR=value: the setting to measure against the default"}
nvidia-smi -L
(cmake -S . -B build-prof -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-DMOECOMM_KERNEL_PROFILE > /dev/null &&
  cmake --build build-prof -j 8 --target moecomm-run moecomm-bench > "$out/p/prof-build.log" 2>&1 ||
  echo "profile build failed") &
N="--no-baseline --no-roofline"
lines="S24-fp8-sym --dtype fp8 -S 24 --buffers symmetric"
add() { lines="$lines
$1"; }
for round in 1 2; do
  add "S24-fp8-sym-r$round --dtype fp8 -S 24 --buffers symmetric $N"
  add "$sw S24-fp8-sym-r$round-sw --dtype fp8 -S 24 --buffers symmetric $N"
done
add "S12-fp8-sym --dtype fp8 -S 12 --buffers symmetric $N"
add "$sw S12-fp8-sym-sw --dtype fp8 -S 12 --buffers symmetric $N"
if [ "${QUICK:-0}" != 1 ]; then
  add "S24-bf16-sym --dtype bf16 -S 24 --buffers symmetric $N"
  add "$sw S24-bf16-sym-sw --dtype bf16 -S 24 --buffers symmetric $N"
fi
export BENCHES="$lines"
MUTANT=0 OUT="$out" bash scripts/direct-round.sh
if [ "${QUICK:-0}" != 1 ]; then
  (cd build-device && env "$sw" timeout 150 ctest -R "^gpu_EpCudaNormal_n${RANKS:-2}\$" --timeout 140 -V \
    > "$out/p/test-switch.log" 2>&1; echo "suite with $sw rc=$? case lines PASS: $(grep -c ': PASS' "$out/p/test-switch.log")")
  gzip -f "$out/p/test-switch.log"
fi
wait
for v in DEFAULT=1 "$sw"; do
  env "$v" MOECOMM_DEBUG=WARN timeout 100 build-prof/tools/moecomm-run -n "${RANKS:-2}" -t 90 \
    build-prof/tools/bench/moecomm-bench -w W-prefill -n 10 -W 3 -c 1 --dtype fp8 -S 24 --buffers symmetric $N \
    > "$out/p/prof-${v}.txt" 2>&1
  echo "profile $v rc=$?"
  grep -E "profile dispatch|dispatch .*passed|dispatch .*FAILED" "$out/p/prof-${v}.txt" | tail -6 | sed 's/^.*MOECOMM WARN [^ ]* //' | cut -c1-900
done
cd "$out" && tar czf p.tgz p && rm -rf p
