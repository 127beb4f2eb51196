#!/usr/bin/env bash
# Sweep of the normal-mode kernel variants (developer tool; docs/ep-normal-gpu.md, "Variants").
# Needs an existing Release build in build-device with the GPU tests, the launcher and the bench:
#   cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build-device -j
# For each variant (a name and MOECOMM_* assignments), on 2 GPUs: the bitwise GPU test
# (EpCudaNormal.*), then W-prefill FP8 and BF16 at SM 24. One line per (variant, dtype, op):
# whole-call and kernel-only median µs, GB/s on the kernel time, the bench's check, and the
# test verdict. The NCCL baseline and the roofline run once, with the first variant.
#
#   VARIANTS   space-separated list of name[:VAR=value,VAR=value...]; default below
#   RANKS      GPUs (default 2)      ITERS   timed iterations (default 10)
#   TESTS=0    skip the GPU tests    DTYPES  default "fp8 bf16"
#   BUDGET     seconds after which the remaining variants are skipped (default 450), so a
#              hanging variant (each wait gives up after MOECOMM_KERNEL_TIMEOUT, 10 s here)
#              cannot take the whole device call
# Under $OUT (default ./sweep-logs): summary.txt (the table printed last), sweep-<name>.jsonl
# (the bench's JSON lines of that variant), bench-<name>-<dtype>.log, test-<name>.log.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/sweep-logs}
mkdir -p "$out"
build=${BUILD:-build-device}
ranks=${RANKS:-2}
run=$build/tools/moecomm-run
bench=$build/tools/bench/moecomm-bench
tests=$build/tests/moecomm_gpu_tests
for f in "$run" "$bench" "$tests"; do
  [ -x "$f" ] || { echo "variant-sweep: $f is missing; build $build first (see the top of this script)"; exit 1; }
done
# c = MOECOMM_EP_COMBINE_VARIANT, d = MOECOMM_EP_DISPATCH_VARIANT, cs/ds = combine/dispatch
# send warps (of 16), r = ring stages x bytes per receiving warp of the bulk variants, b = the
# tail batch (MOECOMM_EP_SEND_BATCH).
P=MOECOMM_EP
default_variants="base
c2_d1:${P}_COMBINE_VARIANT=2,${P}_DISPATCH_VARIANT=1
c2-cs8_d1-ds12:${P}_COMBINE_VARIANT=2,${P}_COMBINE_SEND_WARPS=8,${P}_DISPATCH_VARIANT=1,${P}_DISPATCH_SEND_WARPS=12
c2-cs4_d2:${P}_COMBINE_VARIANT=2,${P}_COMBINE_SEND_WARPS=4,${P}_DISPATCH_VARIANT=2
c1_d2-ds10:${P}_COMBINE_VARIANT=1,${P}_DISPATCH_VARIANT=2,${P}_DISPATCH_SEND_WARPS=10
b64:${P}_SEND_BATCH=64
c2-cs8_d1-ds12_b64:${P}_COMBINE_VARIANT=2,${P}_COMBINE_SEND_WARPS=8,${P}_DISPATCH_VARIANT=1,${P}_DISPATCH_SEND_WARPS=12,${P}_SEND_BATCH=64
c2-r8x2k_d2-ds8:${P}_COMBINE_VARIANT=2,${P}_RING_STAGES=8,${P}_RING_STAGE_BYTES=2048,${P}_DISPATCH_VARIANT=2,${P}_DISPATCH_SEND_WARPS=8
c0-cs4_d1-ds13-r8:${P}_COMBINE_SEND_WARPS=4,${P}_DISPATCH_VARIANT=1,${P}_DISPATCH_SEND_WARPS=13,${P}_RING_STAGES=8"
variants=${VARIANTS:-$default_variants}
nvidia-smi -L 2>/dev/null | head -"$ranks"
date -u
summary="$out/summary.txt"
printf "%-22s %-5s %-16s %9s %9s %8s %-8s %s\n" variant dtype op whole_us kern_us kGB/s check test > "$summary"
first=1
export MOECOMM_KERNEL_TIMEOUT=${MOECOMM_KERNEL_TIMEOUT:-10000} MOECOMM_BOOTSTRAP_TIMEOUT=30000
for spec in $variants; do
  name=${spec%%:*}
  if [ "$SECONDS" -gt "${BUDGET:-450}" ]; then
    printf "%-22s %s\n" "$name" "skipped: over the time budget (${BUDGET:-450} s)" >> "$summary"
    continue
  fi
  assigns=""
  [ "$spec" != "$name" ] && assigns=${spec#*:}
  envs=()
  IFS=, read -r -a pairs <<< "$assigns"
  for kv in "${pairs[@]}"; do [ -n "$kv" ] && envs+=("$kv"); done
  verdict=skipped
  if [ "${TESTS:-1}" != 0 ]; then
    env "${envs[@]}" timeout 100 "$run" -n "$ranks" -t 90 "$tests" --gtest_filter='EpCudaNormal.*' \
      > "$out/test-$name.log" 2>&1
    rc=$?
    fails=$(grep -c "FAIL" "$out/test-$name.log")
    if [ $rc = 0 ] && grep -q "\[  PASSED  \]" "$out/test-$name.log"; then verdict=pass; else verdict="FAIL(rc=$rc,$fails)"; fi
  fi
  for dt in ${DTYPES:-fp8 bf16}; do
    extra="--no-baseline --no-roofline"
    [ $first = 1 ] && extra=""
    env "${envs[@]}" timeout 70 "$run" -n "$ranks" -t 60 "$bench" -w W-prefill --dtype "$dt" -S 24 -n "${ITERS:-10}" -W 3 \
      -c 1 $extra -J "$out/sweep-$name.jsonl" > "$out/bench-$name-$dt.log" 2>&1
    rc=$?
    [ $first = 1 ] && grep -E "^\[rank 0\] (nccl |# roofline)" "$out/bench-$name-$dt.log" | sed "s/^\[rank 0\] /  $dt /"
    # impl op status median p10 p90 kernel bytes GB/s %roof vs_NCCL check
    lines=$(grep -E "^\[rank 0\] libmoecomm " "$out/bench-$name-$dt.log" | sed 's/^\[rank 0\] //')
    if [ -z "$lines" ]; then
      printf "%-22s %-5s %-16s %s\n" "$name" "$dt" "-" "bench failed (rc=$rc), see bench-$name-$dt.log" >> "$summary"
      continue
    fi
    echo "$lines" | awk -v n="$name" -v d="$dt" -v t="$verdict" '{
      if ($3 != "ok") { printf "%-22s %-5s %-16s %s\n", n, d, $2, $3; next }
      gbps = ($7 > 0) ? $8 / ($7 * 1000.0) : 0;
      printf "%-22s %-5s %-16s %9.1f %9.1f %8.1f %-8s %s\n", n, d, $2, $4, $7, gbps, $NF, t }' >> "$summary"
  done
  first=0
  tail -n +2 "$summary" | grep "^$name " | tail -6
done
echo
echo "elapsed ${SECONDS} s; variants:"
for spec in $variants; do echo "  $spec"; done
echo
cat "$summary"
