#!/usr/bin/env bash
# moecomm-bench on a GPU machine: the reference workloads of DESIGN.md at SM budgets 24 and 12,
# every measurement appended to $OUT/bench.jsonl (OUT defaults to ./bench-logs), the tables
# to $OUT/bench.txt. Expects a build in build-device (scripts/device-round.sh makes one):
#   cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build-device
# Usage: scripts/bench-device.sh [NRANKS]   (default: every GPU)
# Keeps -n modest so that 4 GPUs finish well under 4 minutes.
set -uo pipefail
out=${OUT:-$PWD/bench-logs}
mkdir -p "$out"
# Never let anything create NVLink multicast objects on the shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOECOMM_BOOTSTRAP_TIMEOUT=${MOECOMM_BOOTSTRAP_TIMEOUT:-60000}
if [ -z "${MOECOMM_BENCH_COMMIT:-}" ]; then
  MOECOMM_BENCH_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  export MOECOMM_BENCH_COMMIT
fi
run=build-device/tools/moecomm-run
bench=build-device/tools/bench/moecomm-bench
for binary in "$run" "$bench"; do
  if [ ! -x "$binary" ]; then echo "bench-device: $binary not built" >&2; exit 1; fi
done
nranks=${1:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$nranks" -lt 1 ]; then echo "bench-device: no GPU found" >&2; exit 1; fi
json="$out/bench.jsonl"
log="$out/bench.txt"
: > "$log"
status=0
failures=()

bench_case() {  # name, then moecomm-bench arguments
  local name=$1
  shift
  echo "=== $name: moecomm-bench $* ===" | tee -a "$log"
  local start=$SECONDS
  if ! "$run" -n "$nranks" -t 150 "$bench" -J "$json" "$@" >> "$log" 2>&1; then
    status=1
    failures+=("$name")
    echo "!!! $name failed (see $log)" | tee -a "$log"
  fi
  echo "--- $name: $((SECONDS - start)) s" | tee -a "$log"
}

for sms in 24 12; do
  bench_case "W-prefill fp8 S$sms" -w W-prefill --dtype fp8 -S "$sms" -n 20 -W 5
  bench_case "W-prefill bf16 S$sms" -w W-prefill --dtype bf16 -S "$sms" -n 20 -W 5
  bench_case "W-skew fp8 S$sms" -w W-skew -S "$sms" -n 20 -W 5
  bench_case "W-decode LL fp8 S$sms" -w W-decode --ll --graph -S "$sms" -n 50 -W 10
  bench_case "H2048 E128 top8 S$sms" -w custom -T 4096 -H 2048 -E 128 -K 8 --dtype fp8 -S "$sms" -n 20 -W 5
  bench_case "H2880 E128 top4 bf16 S$sms" -w custom -T 4096 -H 2880 -E 128 -K 4 --dtype bf16 -S "$sms" -n 20 -W 5
   
done
# Rank 0's tables, the lines that say what ran and what did not.
grep -hE "^\[rank 0\] (impl|nccl|libmoecomm|# roofline)|^(===|---|!!!)" "$log" | sed 's/^\[rank 0\] //'
echo "bench-device: $(wc -l < "$json") JSON lines in $json"
if [ "$status" -ne 0 ]; then echo "bench-device: failed cases: ${failures[*]}"; fi
exit $status
