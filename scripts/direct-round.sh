#!/usr/bin/env bash
# Direct dispatch/combine round on 2 GPUs, or RANKS (developer tool): build; the normal GPU suite; W-prefill
# benches with symmetric buffers (direct paths) and device buffers at SM 24 and 12; the staged
# combine's send-warp split (COMBINE_SPLITS, default "4 3"); a mutant whose direct dispatch
# stores x rows one row off (its first recv-x=symmetric case, in GraphReplay, must fail). Logs in $OUT/direct.tgz.
#   RANKS=4     4 GPUs (default 2)
#   SHARED4=1   also the normal suite at 4 ranks sharing the GPUs (MOECOMM_TEST_SHARED_GPUS)
#   BENCHES     lines "name bench-args..." instead of the default list (env assignments may
#               precede the name as VAR=value,...)        MUTANT=0  skip the mutant
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f .bench-commit ] && export MOECOMM_BENCH_COMMIT=$(cat .bench-commit)
o=${OUT:-$PWD/direct-logs}/direct; mkdir -p "$o"
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build-device -j "$(nproc)" --target moecomm_gpu_tests moecomm-run moecomm-bench > "$o/build.log" 2>&1 ||
  { grep -B2 -A8 error "$o/build.log" | head -40; exit 1; }
(cd build-device && timeout 240 ctest -R "^gpu_EpCudaNormal_n${RANKS:-2}\$" --timeout 220 -V) > "$o/test.log" 2>&1
echo "test rc=$?"; grep -E "FAIL|tests passed" "$o/test.log" | head -12; echo "cases passed (both ranks): $(grep -c ': PASS' "$o/test.log")"
if [ "${SHARED4:-0}" = 1 ]; then
  (cd build-device && MOECOMM_TEST_SHARED_GPUS=1 timeout 300 ctest -R '^gpu_EpCudaNormal_n4$' --timeout 280 -V) > "$o/test-n4.log" 2>&1
  echo "n4 shared rc=$?"; grep -E "FAIL|tests passed" "$o/test-n4.log" | head -8; echo "cases passed (4 ranks): $(grep -c ': PASS' "$o/test-n4.log")"
fi
b=build-device/tools/bench/moecomm-bench; run=build-device/tools/moecomm-run
bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 100 $run -n "${RANKS:-2}" -t 90 $b -w W-prefill -n 20 -W 5 -c 1 -J "$o/bench.jsonl" "$@" > "$o/bench-$name.txt" 2>&1
  echo "$name rc=$?"
  grep -E "^\[rank 0\] (nccl|libmoecomm)" "$o/bench-$name.txt" | sed 's/^\[rank 0\] //' | awk '{print "   ",$1,$2,$4,$7,$9,$11,$12}'
}
if [ -n "${BENCHES:-}" ]; then
  while read -r first rest; do
    [ -z "$first" ] && continue
    if [[ "$first" == *=* ]]; then
      name=${rest%% *}; args=${rest#* }
      (IFS=, read -r -a kvs <<< "$first"; for kv in "${kvs[@]}"; do export "$kv"; done; bench $name $args)
    else
      bench $first $rest
    fi
  done <<< "$BENCHES"
else
  for dt in fp8 bf16; do
    bench S24-$dt-sym --dtype $dt -S 24 --buffers symmetric
    bench S24-$dt-dev --dtype $dt -S 24 --no-roofline
    bench S12-$dt-sym --dtype $dt -S 12 --buffers symmetric --no-roofline
  done
  for cs in ${COMBINE_SPLITS:-4 3}; do
    MOECOMM_EP_COMBINE_SEND_WARPS=$cs bench S24-fp8-dev-cs$cs --dtype fp8 -S 24 --no-roofline --no-baseline
  done
fi
[ "${MUTANT:-1}" = 0 ] && { cd "$o/.." && tar czf direct.tgz direct && rm -rf direct; exit 0; }
rm -rf mut; mkdir -p mut && tar --exclude=./mut --exclude='./build*' --exclude=./.git -cf - . | tar -xf - -C mut
sed -i 's/(direct\[d\] + ordinal) \* xBytes/(direct[d] + ordinal + 1) * xBytes/' mut/src/device/intranode.cu
echo "mutated lines: $(grep -c 'direct\[d\] + ordinal + 1' mut/src/device/intranode.cu)"
cmake -S mut -B mut/b -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null &&
  cmake --build mut/b -j "$(nproc)" --target moecomm_gpu_tests moecomm-run > "$o/mut-build.log" 2>&1 || echo "mutant build failed"
(cd mut/b && timeout 150 ctest -R "^gpu_EpCudaNormal_n${RANKS:-2}\$" --timeout 140 --output-on-failure) > "$o/mut-test.log" 2>&1
echo "mutant test rc=$?"; grep -E "rank 0\].*(PASS|FAIL)" "$o/mut-test.log" | sed 's/ (.*//' | cut -c1-150 | head -12
cd "$o/.." && tar czf direct.tgz direct && rm -rf direct
