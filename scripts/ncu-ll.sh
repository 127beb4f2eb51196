#!/usr/bin/env bash
# Where the low-latency kernels stall (developer tool, one GPU machine with Nsight Compute):
# builds this tree, runs the W-decode bench at one rank (NRANKS to change) under ncu for one
# dispatch and one combine kernel after SKIP launches of them, and writes under $OUT (default
# ./ncu-logs): details.txt (ncu's details page: launch, scheduler and warp-state sections, i.e.
# the stall reasons per instruction issued), top-stalls.txt (the SASS instructions with the
# most warp-state samples, per kernel, with the source line of each where the report has it)
# and the report itself (ll.ncu-rep). Clocks are left alone (--clock-control none); ncu
# flushes the caches before each kernel it measures, as the bench's L2 flush does.
# Also left in $OUT: ncu-run.txt (the bench's output under ncu), source.csv.gz (the whole source
# page), source.err. The report may be larger than what a device call returns; the text files
# are what to read. Env: NRANKS (default 1; with more ranks ncu's replay of one rank's kernel,
# whose peers do not replay theirs, will likely time out on their flags), SKIP (default 20),
# CMAKE_EXTRA (one more configure option), BENCH_ARGS (extra bench options, e.g. --ll-per-rank).
# Exits with ncu's status when the profiled run fails.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/ncu-logs}; mkdir -p "$out"
ncu=${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
[ -x "$ncu" ] || { echo "ncu not found"; exit 1; }
"$ncu" --version | tail -1
# CMAKE_CUDA_FLAGS reset first: build-ncu may be kept from an earlier call, with its cache.
cmake -S . -B build-ncu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS= ${CMAKE_EXTRA:+"$CMAKE_EXTRA"} > "$out/build.log" 2>&1 &&
  cmake --build build-ncu -j "$(nproc)" --target moecomm-run moecomm-bench >> "$out/build.log" 2>&1 ||
  { grep -E "error" "$out/build.log" | head; exit 1; }
rm -f "$out/build.log"
timeout 400 "$ncu" --clock-control none --target-processes all -k 'regex:dispatchKernel|combineKernel' \
  -s "${SKIP:-20}" -c 2 --section LaunchStats --section SchedulerStats --section WarpStateStats \
  --section SourceCounters --section SpeedOfLight --import-source yes -f -o "$out/ll" \
  build-ncu/tools/moecomm-run -n "${NRANKS:-1}" -t 380 build-ncu/tools/bench/moecomm-bench -w W-decode --ll \
  -S 132 -n 30 -W 5 -c 0 --no-baseline --no-roofline ${BENCH_ARGS:-} > "$out/ncu-run.txt" 2>&1
rc=$?
echo "ncu rc=$rc"; tail -5 "$out/ncu-run.txt"
[ "$rc" -eq 0 ] || exit "$rc"
"$ncu" -i "$out/ll.ncu-rep" --page details > "$out/details.txt" 2>&1
grep -E "dispatchKernel|combineKernel|Duration|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|stall" "$out/details.txt" | head -60
# Per-instruction samples: the source page as CSV, SASS with the CUDA line where ncu knows it.
"$ncu" -i "$out/ll.ncu-rep" --page source --csv --print-source sass > "$out/source.csv" 2> "$out/source.err" ||
  head -5 "$out/source.err"
python3 - "$out/source.csv" > "$out/top-stalls.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], newline='')))
starts = [i for i, r in enumerate(rows) if 'Source' in r and ('Address' in r or '# Address' in r)]
if not starts:
    print('no header found; first lines:'); [print(r[:8]) for r in rows[:8]]; sys.exit()
def num(x):
    try: return float(x.replace(',', ''))
    except ValueError: return 0.0
for n, at in enumerate(starts):
    header = rows[at]
    end = starts[n + 1] if n + 1 < len(starts) else len(rows)
    print('== segment', n, '(line', at, ') preceded by', rows[at - 1][:3] if at else '', 'columns:', header)
    def col(*names):
        for name in names:
            for i, h in enumerate(header):
                if h.startswith(name): return i
        return None
    src = header.index('Source'); addr = col('Address', '# Address')
    samp = col('Warp Stall Sampling (All Samples)', 'Warp Stall Sampling')
    if samp is None: print('no sampling column'); continue
    body = [r for r in rows[at + 1:end] if len(r) == len(header)]
    total = sum(num(r[samp]) for r in body)
    print('instructions', len(body), 'samples', total)
    for r in sorted(body, key=lambda r: -num(r[samp]))[:60]:
        print(f"{num(r[samp]):8.0f} {100 * num(r[samp]) / max(total, 1):5.1f}% {r[addr] if addr is not None else ''} {r[src]}")
PY
head -c 3000 "$out/top-stalls.txt"
gzip -f "$out/source.csv"
ls -la "$out"
