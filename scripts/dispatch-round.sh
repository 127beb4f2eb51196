#!/usr/bin/env bash
# The dispatch senders' variants on 2 GPUs, or RANKS (developer tool): through
# scripts/direct-round.sh the normal suite, then W-prefill benches of the default senders, the
# stealing ones (MOECOMM_EP_DISPATCH_STEAL=1) and the async tails (MOECOMM_EP_DISPATCH_ASYNC_TAILS=1):
# FP8 with symmetric buffers at SM 24 (two rounds) and 12, FP8 with device buffers and BF16 at
# SM 24, tail batches of 128, and the direct combine's variant 3 (SM 24, 12); the normal suite
# with each switch on (and with combine variant 3); a profile build (per
# block: SM id and end) of the direct FP8 dispatch for each; moecomm-linkbench push, push-fence
# and push-afence at 12 and 24 blocks (rates, how late the last block ends). Logs in
# $OUT/direct.tgz and $OUT/p.tgz; carry .bench-commit. QUICK=1 (about 3 device minutes): the
# FP8 symmetric SM 24 rounds, SM 12 and the tail batch only; no suites with the switches.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/dispatch-logs}; mkdir -p "$out/p"
nvidia-smi -L
(cmake -S . -B build-prof -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-DMOECOMM_KERNEL_PROFILE > /dev/null &&
  cmake --build build-prof -j 8 --target moecomm-run moecomm-bench moecomm-linkbench > "$out/p/prof-build.log" 2>&1 ||
  echo "profile build failed") &
S=MOECOMM_EP_DISPATCH_STEAL=1
A=MOECOMM_EP_DISPATCH_ASYNC_TAILS=1
N="--no-baseline --no-roofline"
lines="S24-fp8-sym --dtype fp8 -S 24 --buffers symmetric"
for round in 1 2; do
  for v in base "$S" "$A"; do
    name=S24-fp8-sym-r$round; [ "$v" = "$S" ] && name=$name-steal; [ "$v" = "$A" ] && name=$name-async
    pre=""; [ "$v" != base ] && pre="$v "
    lines="$lines
$pre$name --dtype fp8 -S 24 --buffers symmetric $N"
  done
done
for v in base "$S" "$A"; do
  suffix=""; [ "$v" = "$S" ] && suffix=-steal; [ "$v" = "$A" ] && suffix=-async
  pre=""; [ "$v" != base ] && pre="$v "
  lines="$lines
${pre}S12-fp8-sym$suffix --dtype fp8 -S 12 --buffers symmetric $N"
  [ "${QUICK:-0}" = 1 ] || lines="$lines
${pre}S24-fp8-dev$suffix --dtype fp8 -S 24 $N
${pre}S24-bf16-sym$suffix --dtype bf16 -S 24 --buffers symmetric $N"
done
lines="$lines
MOECOMM_EP_SEND_BATCH=128 S24-fp8-sym-b128 --dtype fp8 -S 24 --buffers symmetric $N
MOECOMM_EP_COMBINE_VARIANT=3 S24-fp8-sym-cv3 --dtype fp8 -S 24 --buffers symmetric $N
MOECOMM_EP_COMBINE_VARIANT=3 S12-fp8-sym-cv3 --dtype fp8 -S 12 --buffers symmetric $N"
export BENCHES="$lines"
MUTANT=0 OUT="$out" bash scripts/direct-round.sh
for v in "$S" "$A" MOECOMM_EP_COMBINE_VARIANT=3; do
  [ "${QUICK:-0}" = 1 ] && break
  (cd build-device && env "$v" timeout 150 ctest -R "^gpu_EpCudaNormal_n${RANKS:-2}\$" --timeout 140 -V \
    > "$out/p/test-${v%%=*}.log" 2>&1; echo "suite with $v rc=$? case lines PASS: $(grep -c ': PASS' "$out/p/test-${v%%=*}.log")")
  gzip -f "$out/p/test-${v%%=*}.log"
done
wait
for v in MOECOMM_EP_DISPATCH_STEAL=0 "$S" "$A"; do
  env "$v" MOECOMM_DEBUG=WARN timeout 100 build-prof/tools/moecomm-run -n "${RANKS:-2}" -t 90 \
    build-prof/tools/bench/moecomm-bench -w W-prefill -n 10 -W 3 -c 1 --dtype fp8 -S 24 --buffers symmetric $N \
    > "$out/p/prof-${v}.txt" 2>&1
  echo "profile $v rc=$?"
  grep -E "profile dispatch" "$out/p/prof-${v}.txt" | tail -4 | sed 's/^.*MOECOMM WARN [^ ]* //' | cut -c1-900
done
timeout 120 build-prof/tools/moecomm-linkbench --modes 0,1,9 --grids 12,24 --warps 8,9 | tee "$out/p/linkbench.txt"
cd "$out" && tar czf p.tgz p && rm -rf p
