#!/usr/bin/env bash
# Normal-mode sweep of run-time settings on one build (developer tool): builds this tree once
# (build-device), optionally runs TESTS, then runs W-prefill benches for every side of SIDES in
# turn, ROUNDS times (default 2), for each line of CASES ("ranks bench-args...", default: 2
# ranks, FP8 and BF16 at SM 24, symmetric buffers), checked (-c 1), without the NCCL baseline
# and the roofline. Sides alternate within a round, so they are compared on the same GPUs
# within minutes. Prints the kernel medians (µs) of each run.
#   SIDES   ';'-separated sides "name:VAR=value,VAR=value" (required), e.g.
#           "off:MOECOMM_EP_LIGHT_SHARE=100;s80:MOECOMM_EP_LIGHT_SHARE=80".
#   TESTS   a ctest regex run first (e.g. '^gpu_EpCudaNormal_n2$'), with each side's settings
#           of TEST_SIDE (a side's name; default none: the defaults).
#   INFO=1  the first run of each side logs at MOECOMM_DEBUG=INFO (the EP's settings).
#   PROFILE=1  build with -DMOECOMM_KERNEL_PROFILE (build-prof) instead: every run's log ends
#           with the kernels' timeline and each block's SM and end (docs/ep-normal-gpu.md,
#           "Developer timeline"), copied into sweep.txt; its times include the stamps' cost.
# Output: $OUT/sweep.txt (every line printed), $OUT/bench.jsonl, and $OUT/sweep-logs.tgz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
root=${OUT:-$PWD/sweep-logs}
o=$root/sweep
mkdir -p "$o"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
cases=${CASES:-"2 --dtype fp8 -S 24 --buffers symmetric
2 --dtype bf16 -S 24 --buffers symmetric"}
commit=$(cat .bench-commit 2>/dev/null || echo unknown)
IFS=';' read -r -a sides <<< "${SIDES:?set SIDES}"
say() { echo "$*" | tee -a "$root/sweep.txt"; }
start=$(date +%s)
build="build-device"; flags=""
[ "${PROFILE:-0}" = 1 ] && { build="build-prof"; flags="-DMOECOMM_KERNEL_PROFILE"; }
if ! cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOECOMM_BUILD_TESTS=ON -DCMAKE_CUDA_FLAGS="$flags" > "$o/configure.log" 2>&1 ||
  ! cmake --build "$build" -j "$(nproc)" --target moecomm_gpu_tests moecomm-run moecomm-bench > "$o/build.log" 2>&1; then
  tail -5 "$o/configure.log"; grep -A5 error "$o/build.log" | head -30; exit 1
fi
say "built $commit in $(($(date +%s) - start)) s, $gpus GPUs"
envs_of() {  # side -> its VAR=value words
  local spec=${1#*:}
  [ "$spec" = "$1" ] && spec=""
  local words=(DEFAULT=1)
  [ -n "$spec" ] && IFS=, read -r -a words <<< "$spec"
  echo "${words[@]}"
}
if [ -n "${TESTS:-}" ]; then
  test_envs="DEFAULT=1"
  for side in "${sides[@]}"; do [ "${side%%:*}" = "${TEST_SIDE:-}" ] && test_envs=$(envs_of "$side"); done
  # shellcheck disable=SC2086
  (cd "$build" && env $test_envs timeout 400 ctest -R "$TESTS" --timeout 280 -V) > "$o/tests.log" 2>&1
  say "tests ($test_envs) rc=$? $(grep -E 'tests passed|tests failed' "$o/tests.log") case lines PASS $(grep -c ': PASS' "$o/tests.log")"
fi
i=0
while read -r ranks args; do
  [ -z "$ranks" ] && continue
  i=$((i + 1))
  if [ "$ranks" -gt "$gpus" ]; then say "case $i: $ranks ranks, only $gpus GPUs; skipped"; continue; fi
  say "case $i: $ranks ranks, $args"
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in "${sides[@]}"; do
      name=${side%%:*}
      debug=WARN
      [ "${INFO:-0}" = 1 ] && [ "$round" = 1 ] && debug=INFO
      log="$o/c$i-$name-r$round.txt"
      # shellcheck disable=SC2046,SC2086
      env $(envs_of "$side") MOECOMM_DEBUG=$debug MOECOMM_BENCH_COMMIT="$commit" MOECOMM_BENCH_BUILD="$name" \
        timeout 100 "$build"/tools/moecomm-run -n "$ranks" -t 90 "$build"/tools/bench/moecomm-bench \
        -w W-prefill -n 20 -W 5 -c 1 --no-baseline --no-roofline -J "$root/bench.jsonl" $args > "$log" 2>&1
      rc=$?
      [ "${PROFILE:-0}" = 1 ] && grep -hE "profile" "$log" | sed 's/^/  /' >> "$root/sweep.txt"
      [ "$debug" = INFO ] && grep -hE "normal mode:" "$log" | sed 's/^/  /' | tee -a "$root/sweep.txt"
      say "c$i r$round $name rc=$rc $(grep -E '^\[rank 0\] libmoecomm' "$log" | awk '{printf "%s %s | ", $4, $9}')$(grep -c 'check failed' "$log") check failures"
    done
  done
done <<< "$cases"
say "done in $(($(date +%s) - start)) s"
cd "$root" && tar czf sweep-logs.tgz sweep && rm -rf sweep
