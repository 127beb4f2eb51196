#!/usr/bin/env bash
# compute-sanitizer (memcheck, then racecheck) on the normal-mode CUDA EP test, 2 GPUs:
#   moecomm-run -n 2 <compute-sanitizer per rank> moecomm_gpu_tests --gtest_filter=EpCudaNormal.*
# with small shapes (MOECOMM_TEST_EP_MAX_TOKENS, default 32) so each tool finishes in a few
# minutes. Logs go to $OUT (default ./sanitize-logs):
#   <tool>.log               the test's output (every case's PASS/FAIL line, both ranks)
#   <tool>.rank<R>.log       compute-sanitizer's report for rank R
#   summary.txt              one line per tool and rank
# Exit status: 0 clean; 1 a sanitizer reported an error (or did not finish); 2 the sanitizers
# were clean but the test itself failed, timed out or ran no case (no GPU). The low-latency
# test works too (SANITIZE_FILTER='EpCudaLowLatency.*-EpCudaLowLatency.GraphReplay:
# EpCudaLowLatency.SilentRankIsMasked': its graph test replays 1000 times and its timeout test
# relies on a 500 ms budget, both too slow under the sanitizers).
#
# Usage: scripts/gpu-sanitize.sh        (from the repository root, on the GPU machine)
# Environment:
#   BUILD_DIR          build directory (default build-device, as scripts/device-round.sh); the
#                      script configures it if needed and builds moecomm_gpu_tests + moecomm-run
#   SANITIZE_TOOLS     default "memcheck racecheck" (initcheck, synccheck work too)
#   SANITIZE_FILTER    gtest filter (default EpCudaNormal.*)
#   SANITIZE_NRANKS    default 2
#   SANITIZE_TIMEOUT   seconds per tool, for moecomm-run -t (default 540)
#   SANITIZE_MODE      rank (default): compute-sanitizer runs inside moecomm-run, one per rank,
#                      with a log per rank; wrap: compute-sanitizer --target-processes all
#                      wraps moecomm-run and follows the ranks it forks (one log)
#   SANITIZE_ARGS      extra compute-sanitizer options for every tool
#   COMPUTE_SANITIZER  path (default: compute-sanitizer on PATH, else /usr/local/cuda/bin)
#   MOECOMM_TEST_EP_MAX_TOKENS (32), MOECOMM_TEST_EP_GRAPH_REPLAYS (3), MOECOMM_TEST_EP_CASES
#                      (a regex on case names): see tests/gpu/test_ep_cuda_normal.cc
#   MOECOMM_NVLINK_SHARE=ipc  legacy CUDA IPC instead of cuMem handles for the peer mappings
set -uo pipefail

# Per-rank wrapper: moecomm-run starts this script once per rank with --rank-wrapper.
if [ "${1:-}" = "--rank-wrapper" ]; then
  tool=$2 logbase=$3
  shift 3
  # shellcheck disable=SC2086  # SANITIZE_TOOL_ARGS is a list of options
  exec "$COMPUTE_SANITIZER" --tool "$tool" --log-file "$logbase.rank${MOECOMM_RANK:-x}.log" --error-exitcode 86 \
    $SANITIZE_TOOL_ARGS "$@"
fi

out=${OUT:-$PWD/sanitize-logs}
mkdir -p "$out"
# Never let anything create NVLink multicast objects on the shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

build=${BUILD_DIR:-build-device}
tools=${SANITIZE_TOOLS:-memcheck racecheck}
filter=${SANITIZE_FILTER:-EpCudaNormal.*}
nranks=${SANITIZE_NRANKS:-2}
timeout=${SANITIZE_TIMEOUT:-540}
mode=${SANITIZE_MODE:-rank}
sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$sanitizer" ]; then
  echo "gpu-sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 1
fi
export COMPUTE_SANITIZER=$sanitizer
# Small shapes; instrumented kernels are slow, so the spin-wait and bootstrap budgets grow.
export MOECOMM_TEST_EP_MAX_TOKENS=${MOECOMM_TEST_EP_MAX_TOKENS:-32}
export MOECOMM_TEST_EP_GRAPH_REPLAYS=${MOECOMM_TEST_EP_GRAPH_REPLAYS:-3}
export MOECOMM_KERNEL_TIMEOUT=${MOECOMM_KERNEL_TIMEOUT:-120000}
export MOECOMM_BOOTSTRAP_TIMEOUT=${MOECOMM_BOOTSTRAP_TIMEOUT:-180000}

{
  date -u
  nvidia-smi -L 2>/dev/null
  "$sanitizer" --version 2>&1 | tail -2
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit unknown (no .git)"
  echo "filter $filter; mode $mode; ranks $nranks; MOECOMM_TEST_EP_MAX_TOKENS=$MOECOMM_TEST_EP_MAX_TOKENS" \
    "MOECOMM_TEST_EP_GRAPH_REPLAYS=$MOECOMM_TEST_EP_GRAPH_REPLAYS MOECOMM_TEST_EP_CASES=${MOECOMM_TEST_EP_CASES:-}"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ ! -f "$build/build.ninja" ] && ! cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"
  exit 1
fi
if ! cmake --build "$build" -j "$(nproc)" --target moecomm_gpu_tests moecomm-run > "$out/build.log" 2>&1; then
  grep -E "error|FAILED" "$out/build.log" | head -30
  exit 1
fi
run=$build/tools/moecomm-run
tests=$build/tests/moecomm_gpu_tests
self=$(readlink -f "$0")

sanitizer_errors=0
test_failed=0
: > "$out/summary.txt"
for tool in $tools; do
  rm -f "$out/$tool".rank*.log "$out/$tool.wrap.log"
  case $tool in
    memcheck) tool_args="--leak-check full" ;;
    *) tool_args="" ;;
  esac
  export SANITIZE_TOOL_ARGS="$tool_args ${SANITIZE_ARGS:-}"
  echo "=== $tool: $filter on $nranks ranks ($mode mode) ==="
  start=$SECONDS
  if [ "$mode" = wrap ]; then
    # shellcheck disable=SC2086
    "$sanitizer" --tool "$tool" --target-processes all --require-cuda-init no --log-file "$out/$tool.wrap.log" \
      --error-exitcode 86 $SANITIZE_TOOL_ARGS "$run" -n "$nranks" -t "$timeout" "$tests" --gtest_filter="$filter" \
      > "$out/$tool.log" 2>&1
  else
    "$run" -n "$nranks" -t "$timeout" "$self" --rank-wrapper "$tool" "$out/$tool" "$tests" --gtest_filter="$filter" \
      > "$out/$tool.log" 2>&1
  fi
  code=$?
  echo "--- $tool: moecomm-run exit $code after $((SECONDS - start)) s (86: a sanitizer error; 1: a test failure; 124: timeout)"
  # Case lines: "...: PASS (0.02 s)" (normal-mode test) or "...: PASS" / "...: FAIL why" (LL test).
  echo "    cases passed (lines of all ranks): $(grep -cE ': PASS( \(|$)' "$out/$tool.log")," \
    "failed: $(grep -cE ': FAIL( |$)' "$out/$tool.log")"
  grep -E ': FAIL( |$)' "$out/$tool.log" | head -5 | sed 's/^/    /'

  # Every sanitizer log must end with its summary; any error counted there fails the run. A
  # log without one belongs to a rank stopped because another failed the test or timed out
  # (exit 1 or 124), or to a sanitizer that did not finish.
  tool_errors=0
  found=0
  for log in "$out/$tool".rank*.log "$out/$tool.wrap.log"; do
    [ -f "$log" ] || continue
    found=$((found + 1))
    errors=$(grep -oE "ERROR SUMMARY: [0-9]+ error|\([0-9]+ errors" "$log" | grep -oE "[0-9]+" | awk '{s += $1} END {print s + 0}')
    warnings=$(grep -oE "[0-9]+ warnings\)" "$log" | grep -oE "[0-9]+" | awk '{s += $1} END {print s + 0}')
    summaries=$(grep -cE "ERROR SUMMARY|RACECHECK SUMMARY" "$log")
    line="$tool $(basename "$log"): $errors errors, $warnings warnings"
    if [ "$summaries" -eq 0 ]; then
      line="$line, no summary (stopped before the end)"
      if [ "$code" -eq 0 ] || [ "$code" -eq 86 ]; then tool_errors=$((tool_errors + 1)); fi
    fi
    tool_errors=$((tool_errors + errors))
    echo "    $line"
    echo "$line" >> "$out/summary.txt"
    if [ "$errors" -gt 0 ]; then
      grep -m 10 -E "^========= (Invalid|Error|Race|Leaked|Program hit|Warning)" "$log" | sed 's/^/      /'
    fi
  done
  if [ "$found" -eq 0 ]; then
    echo "    $tool: no sanitizer log was written" | tee -a "$out/summary.txt"
    tool_errors=$((tool_errors + 1))
  fi
  if [ "$code" -eq 86 ] && [ "$tool_errors" -eq 0 ]; then tool_errors=1; fi
  if grep -q MOECOMM_GPU_TESTS_SKIPPED "$out/$tool.log" || ! grep -qE ': PASS( \(|$)' "$out/$tool.log"; then
    echo "    $tool: no case ran (skipped: see $out/$tool.log)" | tee -a "$out/summary.txt"
    test_failed=1
  fi
  if [ "$code" -ne 0 ] && [ "$code" -ne 86 ]; then test_failed=1; fi
  echo "$tool: exit $code, $tool_errors sanitizer problems" >> "$out/summary.txt"
  sanitizer_errors=$((sanitizer_errors + tool_errors))
done

if [ "$sanitizer_errors" -gt 0 ]; then
  echo "gpu-sanitize: FAILED: the sanitizers reported problems (see $out/summary.txt)"
  exit 1
fi
if [ "$test_failed" -ne 0 ]; then
  echo "gpu-sanitize: sanitizers clean, but the test failed, timed out or ran no case (see $out/*.log)"
  exit 2
fi
echo "gpu-sanitize: clean ($tools)"
exit 0
