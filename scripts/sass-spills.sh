#!/usr/bin/env bash
# Where kernels spill (developer tool, on the GPU machine: needs cuobjdump and nvdisasm from the
# CUDA toolkit, which this project's build machine lacks). Builds one device object of the
# library with -lineinfo (directory build-sass), disassembles it with source lines, and for each
# kernel whose mangled name matches KERNELS writes:
#   $OUT/sass/all.sass       the whole disassembly (nvdisasm -g), every kernel of the object
#   $OUT/sass/spills.txt     per matching kernel: its local stores and loads (STL / LDL, i.e.
#                            spills and local arrays), counted per source line, then each one
#                            with the line it belongs to
# Env: SOURCE (default intranode: src/device/<SOURCE>.cu), KERNELS (a grep -E regex on mangled
# names; default the normal-mode dispatch kernels <0,32> and <5,32>), OUT (default
# ./sass-logs). Compare with the counts ptxas prints locally (-Xptxas -v): the same bytes, now
# with the place.
set -uo pipefail
root=$PWD
out=${OUT:-$root/sass-logs}/sass
mkdir -p "$out"
source_name=${SOURCE:-intranode}
kernels=${KERNELS:-'dispatchKernelILi(0|5)ELi32'}
for tool in cuobjdump nvdisasm; do
  if ! command -v "$tool" > /dev/null && [ ! -x "/usr/local/cuda/bin/$tool" ]; then
    echo "sass-spills: $tool not found (CUDA toolkit)" >&2
    exit 1
  fi
done
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build-sass -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-lineinfo > "$out/configure.log" 2>&1 ||
  { tail -20 "$out/configure.log"; exit 1; }
object="CMakeFiles/moecomm_objects.dir/src/device/$source_name.cu.o"
ninja -C build-sass "$object" > "$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head; exit 1; }
work=$(mktemp -d)
(cd "$work" && cuobjdump -xelf all "$root/build-sass/$object" > /dev/null) || { echo "sass-spills: cuobjdump failed" >&2; exit 1; }
: > "$out/all.sass"
for cubin in "$work"/*.cubin; do nvdisasm -g "$cubin" >> "$out/all.sass" 2>> "$out/build.log"; done
rm -rf "$work"
# Track the current function (".text.<name>:" labels) and source line ("//## File ..., line N"
# comments of -g); keep the STL / LDL instructions of the matching functions.
awk -v pattern="$kernels" '
  /^[[:space:]]*\.text\.[^:]+:/ { name = $1; sub(/^\.text\./, "", name); sub(/:$/, "", name); keep = name ~ pattern; next }
  /\/\/## File/ {
    f = $0; sub(/^.*File "/, "", f)
    file = f; sub(/".*$/, "", file)
    line = f; sub(/^[^"]*", line /, "", line); sub(/[^0-9].*$/, "", line)
    where = file ":" line; next
  }
  keep && /[[:space:]](STL|LDL)(\.[A-Z0-9.]+)?[[:space:]]/ {
    insn = $0; gsub(/^[[:space:]]+|[[:space:]]+$/, "", insn)
    n = split(where, parts, "/"); short = parts[n]
    count[name "|" short]++; total[name]++
    lines[++k] = name "  " short "  " insn
  }
  END {
    for (f in total) printf "%s: %d local loads/stores\n", f, total[f]
    print ""
    for (key in count) { split(key, kv, "|"); printf "%-40s %4d  %s\n", kv[2], count[key], kv[1] }
    print ""
    for (i = 1; i <= k; ++i) print lines[i]
  }' "$out/all.sass" > "$out/spills.txt"
head -40 "$out/spills.txt"
