#!/usr/bin/env bash
# A/B of the low-latency kernels on one GPU machine (developer tool): builds the tree in
# directory $A (an older commit, e.g. `git archive <commit> | tar -x -C ab-old`) and this tree,
# then runs W-decode benches alternately, A B A B ..., ROUNDS times (default 3), in both combine
# forms, checked (-c 1), without the NCCL baseline and the roofline (the A/B is against A, on
# the same GPUs). Prints the kernel-only medians per round; the JSON goes to
# $OUT/ab-<side>.jsonl, every bench's output to $OUT/bench.txt.
# Env: A (required), ROUNDS, GRID (default 132), NRANKS (default: every GPU), TESTS (a ctest
# regex run on B's build before the benches, e.g. "gpu_EpCudaLowLatency_n4"), A_COMMIT (the
# commit written into A's JSON; default $A/.bench-commit; B's is ./.bench-commit), A_CMAKE_EXTRA /
# B_CMAKE_EXTRA (one configure option of one side, passed as one argument, e.g. developer
# switches: B_CMAKE_EXTRA="-DCMAKE_CUDA_FLAGS=-DMOECOMM_LL_DEFERRED_RELEASE=1 -DMOECOMM_LL_COPY_UNROLL=4"
# with A=. compares this tree with and without them). B_VARIANTS: several B builds of this tree
# in one call, options separated by ';' (one configure option each, e.g.
# "-DCMAKE_CUDA_FLAGS=-DMOECOMM_LL_SEND_UNROLL=4;-DCMAKE_CUDA_FLAGS=-DMOECOMM_LL_SPLIT_FORMS=0"):
# sides b1, b2, ... built in parallel with A and benched in turn with it; TESTS run on b1.
# $OUT/variants.txt says which option each side had; the build logs end up in $OUT/build-logs.tgz.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/ab-logs}; mkdir -p "$out"
a=${A:?set A to the directory of the older tree}
n=${NRANKS:-$(nvidia-smi -L | wc -l)}
# Sides and their configure options: a, then b (B_CMAKE_EXTRA) or b1..bN (B_VARIANTS).
sides=(a); options=("${A_CMAKE_EXTRA:-}")
if [ -n "${B_VARIANTS:-}" ]; then
  IFS=';' read -r -a variants <<< "$B_VARIANTS"
  for i in "${!variants[@]}"; do sides+=("b$((i + 1))"); options+=("${variants[$i]}"); done
else
  sides+=(b); options+=("${B_CMAKE_EXTRA:-}")
fi
jobs=$(( $(nproc) / ${#sides[@]} )); [ "$jobs" -lt 1 ] && jobs=1
build() {  # source dir, build dir, log, one extra configure option (or empty)
  # CMAKE_CUDA_FLAGS reset first: a build folder kept from an earlier call keeps its cache.
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOECOMM_BUILD_TESTS=ON -DCMAKE_CUDA_FLAGS= ${4:+"$4"} > "$3" 2>&1 &&
    cmake --build "$2" -j "$jobs" --target moecomm-run moecomm-bench moecomm_gpu_tests >> "$3" 2>&1
}
: > "$out/variants.txt"
pids=()
for i in "${!sides[@]}"; do
  side=${sides[$i]}; src=.; [ "$side" = a ] && src=$a
  echo "$side ${options[$i]:-(default)}" >> "$out/variants.txt"
  build "$src" "build-ab-$side" "$out/build-$side.log" "${options[$i]}" & pids+=($!)
done
for i in "${!sides[@]}"; do
  wait "${pids[$i]}" || { echo "${sides[$i]} build failed"; grep -E "error" "$out/build-${sides[$i]}.log" | head; exit 1; }
done
first_b=${sides[1]}
if [ -n "${TESTS:-}" ]; then
  (cd "build-ab-$first_b" && timeout 300 ctest -R "$TESTS" --timeout 240 --output-on-failure) > "$out/ctest-$first_b.log" 2>&1
  grep -E "Passed|Failed|tests passed|tests failed" "$out/ctest-$first_b.log" | tail -8
fi
: > "$out/bench.txt"  # every bench's output, one file (the device tool returns few files)
for round in $(seq 1 "${ROUNDS:-3}"); do
  for i in "${!sides[@]}"; do
    side=${sides[$i]}
    for form in default per-rank; do
      extra=""; [ "$form" = per-rank ] && extra="--ll-per-rank"
      if [ $side = a ]; then commit=${A_COMMIT:-$(cat "$a/.bench-commit" 2>/dev/null || echo unknown)}; else commit=$(cat .bench-commit 2>/dev/null || echo unknown); fi
      MOECOMM_BENCH_COMMIT=$commit MOECOMM_BENCH_BUILD=${options[$i]} timeout 120 build-ab-$side/tools/moecomm-run -n "$n" -t 110 build-ab-$side/tools/bench/moecomm-bench -w W-decode \
        --ll --graph -S "${GRID:-132}" -n 50 -W 10 -c 1 --no-baseline --no-roofline $extra \
        -J "$out/ab-$side.jsonl" > "$out/run.txt" 2>&1
      line=$(grep -E "^\[rank 0\] libmoecomm" "$out/run.txt" | awk '{printf "%s %s ", $4, $9}')
      echo "round $round $side $form: $line$(grep -c 'check failed' "$out/run.txt") check failures"
      { echo "=== round $round $side $form"; cat "$out/run.txt"; } >> "$out/bench.txt"
    done
  done
done
rm -f "$out/run.txt"
# The build logs as one archive (the device tool brings back few files).
(cd "$out" && tar czf build-logs.tgz build-*.log && rm -f build-*.log)
