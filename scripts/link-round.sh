#!/usr/bin/env bash
# Normal-mode sender round on 2+ GPUs (developer tool): builds, runs moecomm-linkbench (how
# fast a block pushes rows into the peer: register stores, with fences, bulk copies, pulls;
# docs/bench.md), then scripts/variant-sweep.sh over VARIANTS (default: the base kernels;
# dispatch variant 3, the bulk-copy senders, at three send/receive splits and with a tail batch
# of 128; pulled rows, MOECOMM_EP_PULL=3, at two splits and with the bulk-copy receivers),
# W-prefill FP8 and BF16 at SM 24, checked, the NCCL baseline and the roofline with the first
# variant. TESTS=1 also runs the bitwise GPU test per variant (longer).
# PROFILE=1: build with -DMOECOMM_KERNEL_PROFILE into build-prof instead and run the sweep
# there with MOECOMM_DEBUG=WARN, so each bench log ends with the kernels' timeline per block
# (docs/ep-normal-gpu.md, "Developer timeline"); its times include the stamps' cost.
# LINK_ARGS: moecomm-linkbench arguments (default --warps 1,2,4,8,16).
# BUDGET: seconds for the sweep (default 360; later variants are skipped past it).
# LINK_ONLY=1: build and run moecomm-linkbench only (about two minutes of device time).
# RANKS: ranks of the sweep (default 2, as the link bench uses GPUs 0 and 1; RANKS=4 on 4 GPUs).
# Logs under $OUT (default ./link-logs).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-$PWD/link-logs}; mkdir -p "$out"
[ -f .bench-commit ] && export MOECOMM_BENCH_COMMIT=$(cat .bench-commit)
nvidia-smi -L; date -u
build=build-device; extra=()
[ "${PROFILE:-0}" = 1 ] && { build=build-prof; extra=(-DCMAKE_CUDA_FLAGS=-DMOECOMM_KERNEL_PROFILE); export MOECOMM_DEBUG=WARN; }
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${extra[@]}" > "$out/configure.log" 2>&1 &&
  cmake --build "$build" -j "$(nproc)" --target moecomm-linkbench \
    $([ "${LINK_ONLY:-0}" = 1 ] || echo moecomm-bench moecomm-run moecomm_gpu_tests) \
    > "$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head; exit 1; }
if [ "${PROFILE:-0}" != 1 ]; then
  timeout 150 "$build"/tools/moecomm-linkbench ${LINK_ARGS:---warps 1,2,4,8,16} > "$out/linkbench.txt" 2>&1
  echo "linkbench rc=$?"; cat "$out/linkbench.txt"
fi
[ "${LINK_ONLY:-0}" = 1 ] && exit 0
P=MOECOMM_EP
default_variants="base
d3:${P}_DISPATCH_VARIANT=3
d3-ds4-r6:${P}_DISPATCH_VARIANT=3,${P}_DISPATCH_SEND_WARPS=4,${P}_RING_STAGES=6
d3-ds8-r3:${P}_DISPATCH_VARIANT=3,${P}_DISPATCH_SEND_WARPS=8,${P}_RING_STAGES=3
d3-b128:${P}_DISPATCH_VARIANT=3,${P}_SEND_BATCH=128
pull:${P}_PULL=3
pull-ds4-cs4:${P}_PULL=3,${P}_DISPATCH_SEND_WARPS=4,${P}_COMBINE_SEND_WARPS=4
pull-bulk:${P}_PULL=3,${P}_DISPATCH_VARIANT=1,${P}_COMBINE_VARIANT=2"
BUILD="$build" OUT="$out/sweep" VARIANTS="${VARIANTS:-$default_variants}" TESTS="${TESTS:-0}" BUDGET="${BUDGET:-360}" \
  scripts/variant-sweep.sh
