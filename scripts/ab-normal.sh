#!/usr/bin/env bash
# A/B of the normal-mode kernels on one GPU machine (developer tool). Builds an older tree in
# $A (e.g. `git archive <commit> | tar -x -C ab-old`, carried to the device as an ignored path)
# and this tree, then runs W-prefill benches alternately A B A B ..., ROUNDS times (default 2),
# for each line of CASES ("ranks bench-args...", default below), checked (-c 1), without the
# NCCL baseline and the roofline. Prints the kernel medians (µs) of each run, so the two sides
# are compared on the same GPUs within minutes.
#   A        (required) directory of the older tree; A_COMMIT the commit in its JSON (default:
#            $A/.bench-commit, else "A"); this tree's is ./.bench-commit.
#   TESTS    a ctest regex run on this tree's build before the benches (e.g.
#            '^gpu_EpCudaNormal_n(2|4)$').
#   B_ENV    VAR=value,... set on this tree's side only (compare a switch against A = .).
#   PROFILE=1  both sides built with -DMOECOMM_KERNEL_PROFILE (build dirs build-ab-prof and
#            build-prof): each run also prints rank 1's dispatch timelines (docs/ep-normal-gpu.md,
#            "Developer timeline"); the times then include the stamps' cost.
# Everything (logs, $OUT/ab-normal/bench.jsonl) goes into ONE archive, $OUT/ab-normal.tgz: the
# device tool returns a limited number of files.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
a=${A:?set A to the directory of the older tree}
root=${OUT:-$PWD/ab-normal-logs}
o=$root/ab-normal
mkdir -p "$o"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
default_cases="2 --dtype fp8 -S 24 --buffers symmetric
2 --dtype fp8 -S 12 --buffers symmetric"
if [ "$gpus" -ge 4 ]; then
  default_cases="$default_cases
4 --dtype fp8 -S 24 --buffers symmetric
4 --dtype fp8 -S 12 --buffers symmetric"
fi
cases=${CASES:-$default_cases}
b_commit=$(cat .bench-commit 2>/dev/null || echo B)
a_commit=${A_COMMIT:-$(cat "$a/.bench-commit" 2>/dev/null || echo A)}
start=$(date +%s)
a_build="$a/build-ab"; b_build=build-device; flags=""
if [ "${PROFILE:-0}" = 1 ]; then a_build="$a/build-ab-prof"; b_build=build-prof; flags="-DMOECOMM_KERNEL_PROFILE"; fi
echo "A = $a ($a_commit), B = . ($b_commit), $gpus GPUs" | tee "$o/sides.txt"
(cmake -S "$a" -B "$a_build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="$flags" > /dev/null &&
  cmake --build "$a_build" -j "$(($(nproc) / 3 + 1))" --target moecomm-run moecomm-bench > "$o/build-a.log" 2>&1 ||
  echo "A build failed (see build-a.log)") &
if ! cmake -S . -B "$b_build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="$flags" > "$o/configure-b.log" 2>&1 ||
  ! cmake --build "$b_build" -j "$(($(nproc) * 2 / 3 + 1))" --target moecomm_gpu_tests moecomm-run moecomm-bench \
    > "$o/build-b.log" 2>&1; then
  tail -5 "$o/configure-b.log"; grep -A5 error "$o/build-b.log" | head -30; wait; exit 1
fi
wait
echo "built in $(($(date +%s) - start)) s"
if [ -n "${TESTS:-}" ]; then
  (cd "$b_build" && timeout 300 ctest -R "$TESTS" --timeout 280 -V) > "$o/tests.log" 2>&1
  echo "tests rc=$? $(grep -E 'tests passed|tests failed' "$o/tests.log") case lines PASS $(grep -c ': PASS' "$o/tests.log")"
fi
run_side() {  # side build-dir commit ranks name args...
  local side=$1 dir=$2 commit=$3 ranks=$4 name=$5
  shift 5
  local envs=(DEFAULT=1)
  if [ "$side" = B ] && [ -n "${B_ENV:-}" ]; then IFS=, read -r -a envs <<< "$B_ENV"; fi
  [ "${PROFILE:-0}" = 1 ] && envs+=(MOECOMM_DEBUG=WARN)  # (the timelines are logged as warnings)
  env "${envs[@]}" MOECOMM_BENCH_COMMIT="$commit" timeout 100 "$dir/tools/moecomm-run" -n "$ranks" -t 90 \
    "$dir/tools/bench/moecomm-bench" -w W-prefill -n 20 -W 5 -c 1 --no-baseline --no-roofline \
    -J "$o/bench.jsonl" "$@" > "$o/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $(grep -E '^\[rank 0\] libmoecomm' "$o/$name.txt" | awk '{printf "%s %s | ", $4, $9}')"
  if [ "${PROFILE:-0}" = 1 ]; then grep -hE "rank 1 profile dispatch(-routed)? \(" "$o/$name.txt" | sed 's/^.*profile /  /'; fi
}
i=0
while read -r ranks args; do
  [ -z "$ranks" ] && continue
  i=$((i + 1))
  if [ "$ranks" -gt "$gpus" ]; then
    echo "case $i: $ranks ranks, only $gpus GPUs; skipped"
    continue
  fi
  echo "case $i: $ranks ranks, $args"
  for round in $(seq 1 "${ROUNDS:-2}"); do
    # shellcheck disable=SC2086
    run_side A "$a_build" "$a_commit" "$ranks" "c$i-A-r$round" $args
    # shellcheck disable=SC2086
    run_side B "$b_build" "$b_commit" "$ranks" "c$i-B-r$round" $args
  done
done <<< "$cases"
echo "done in $(($(date +%s) - start)) s"
cd "$root" && tar czf ab-normal.tgz ab-normal && rm -rf ab-normal
