// moecomm-linkbench: a developer micro-benchmark of how fast SMs move rows into a peer GPU's
// memory (docs/bench.md, "moecomm-linkbench"). The normal-mode senders push rows over NVLink
// and were measured at 9-18 GB/s per SM; this tool separates the rate one block can reach from
// the kernels around it. Every case copies `rows` rows of `rowBytes` from a source buffer to a
// destination buffer, the rows split into contiguous ranges, one per block, and the warps of a
// block taking rows in turn:
//   push        each warp loads a row into registers (16-byte non-coherent loads, 16 per lane in
//               flight) and stores it into the peer GPU's buffer
//   push-fence  push, plus what a normal-mode channel does every 32 rows: a block barrier, a
//               system fence and a release store of a flag into the peer
//   push-bulk   lane 0 of each warp moves rows through a ring of shared-memory stages with
//               bulk copies (load from local memory, store into the peer's), waiting only until
//               a stage was read before it is reused
//   pull        each warp loads a row from the peer GPU's buffer and stores it locally
//   local       each warp loads a row locally and stores it locally (the receive copy's rate)
//   store       each warp stores a constant into its rows of the peer's buffer (no loads)
//   pull-bulk   push-bulk's ring the other way: bulk loads from the peer's buffer, bulk stores
//               into local memory
//   copy-engine one cudaMemcpyAsync of all the rows into the peer's buffer (no SM; timed by
//               events around it, once, whatever the grids and warps)
//   push-wfence push, plus per warp every 32 / warps rows of its own: __syncwarp, then lane 0's
//               system fence and release store of the warp's flag in the peer (no block barrier)
//   push-afence push-fence's flag every 32 rows, released by a warp that copies nothing while
//               the others go on: the copying warps arrive on a shared-memory barrier per batch
//               and move on (at most one batch ahead of the flag), the last warp waits on it,
//               fences and releases (so warps - 1 warps copy)
// With two or more GPUs, GPUs 0 and 1 run the same case at once, each towards the other (both
// link directions loaded, as in a 2-rank dispatch); with one GPU the "peer" buffer is a second
// buffer on the same GPU and the push and pull cases measure local memory. Reported: the time
// inside the kernel (last block's end minus first block's start, %globaltimer; the slower GPU),
// median over the repetitions, and the bytes copied per GPU over it, and how much later than
// the median block the last block ended (end_spread_us: every block has the same rows, so a
// spread says some SMs move bytes slower than others), and the blocks split by TPC: how many ran
// on an SM whose TPC twin (SM id ^ 1) ran a block of the same launch too (paired), and the median
// block time of those and of the others (paired_us, alone_us: whether two SMs of one TPC
// sharing its path to the memory system push slower). With --blocks 1, each case is followed
// by every block's SM and time of the last repetition, per GPU (b@smS=µs), to see which SMs
// are slow. Nothing here is part of the library.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../src/device/bulk_copy.cuh"
#include "../../src/device/common.cuh"
#include "../dev_common.h"

namespace {

using moecomm::device::bulkCommit;
using moecomm::device::bulkLoad;
using moecomm::device::bulkStore;
using moecomm::device::bulkWait;
using moecomm::device::bulkWaitRead;
using moecomm::device::fenceBarrierInit;
using moecomm::device::mbarrierArrive;
using moecomm::device::mbarrierArriveExpectTx;
using moecomm::device::mbarrierInit;
using moecomm::device::mbarrierTryWait;

constexpr int kUnroll = 16;
constexpr int kFenceBatch = 32;
constexpr int kMaxStages = 8;
constexpr size_t kSharedBudget = 200 * 1024;  // bulk ring per block, at most (less if the device has less)

enum Mode {
  kPush,
  kPushFence,
  kPushBulk,
  kPull,
  kLocal,
  kStore,
  kPullBulk,
  kCopyEngine,
  kPushWarpFence,
  kPushAsyncFence
};
const char* const kModeNames[] = {"push",  "push-fence", "push-bulk",   "pull",        "local",
                                  "store", "pull-bulk",  "copy-engine", "push-wfence", "push-afence"};

constexpr const char* kToolName = "moecomm-linkbench";
#define CHECK(call) DEV_CHECK(call)

// One warp copies one row, kUnroll vectors per lane in flight; every load before any store.
template <bool kNc>
__device__ __forceinline__ void warpRow(const int4* src, int4* dst, int chunks, int lane) {
  for (int base = 0; base < chunks; base += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int i = base + lane + 32 * j;
      if (i < chunks) v[j] = kNc ? moecomm::device::loadStreaming(src + i) : src[i];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int i = base + lane + 32 * j;
      if (i < chunks) dst[i] = v[j];
    }
  }
}

// Per block: its start and end (%globaltimer) and the SM it ran on.
constexpr int kStampWords = 3;
__device__ __forceinline__ void stampStart(unsigned long long* stamps) {
  if (threadIdx.x != 0) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  stamps[kStampWords * blockIdx.x] = moecomm::device::globalTimerNs();
  stamps[kStampWords * blockIdx.x + 2] = sm;
}
__device__ __forceinline__ void stampEnd(unsigned long long* stamps) {
  if (threadIdx.x == 0) stamps[kStampWords * blockIdx.x + 1] = moecomm::device::globalTimerNs();
}

__device__ __forceinline__ void blockRows(int rows, int* first, int* last) {
  const int per = (rows + gridDim.x - 1) / gridDim.x;
  *first = min(rows, static_cast<int>(blockIdx.x) * per);
  *last = min(rows, *first + per);
}

// push / push-fence / push-wfence / pull / local: the register path. `flag` (push-fence: one
// per block; push-wfence: one per warp) lives in the peer.
template <bool kFence, bool kNc, bool kWarpFence = false>
__global__ void copyRegisters(const uint8_t* src, uint8_t* dst, int rows, int rowBytes, unsigned long long* flag,
                              unsigned long long* stamps) {
  stampStart(stamps);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int chunks = rowBytes / 16;
  int first = 0;
  int last = 0;
  blockRows(rows, &first, &last);
  const int batch = kFence || kWarpFence ? kFenceBatch : last - first;
  for (int base = first; base < last; base += max(batch, 1)) {
    const int end = min(last, base + batch);
    for (int r = base + warp; r < end; r += warps) {
      warpRow<kNc>(reinterpret_cast<const int4*>(src + static_cast<size_t>(r) * rowBytes),
                   reinterpret_cast<int4*>(dst + static_cast<size_t>(r) * rowBytes), chunks, lane);
    }
    if (kWarpFence) {
      __syncwarp();
      if (lane == 0) {
        __threadfence_system();
        moecomm::device::storeReleaseSys(reinterpret_cast<uint64_t*>(flag) + blockIdx.x * warps + warp,
                                         static_cast<uint64_t>(end));
      }
    }
    if (kFence) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        moecomm::device::storeReleaseSys(reinterpret_cast<uint64_t*>(flag) + blockIdx.x, static_cast<uint64_t>(end));
      }
    }
  }
  __syncthreads();
  stampEnd(stamps);
}

// Spins on an mbarrier phase, at most 2^26 tries; then flags *failed (the rows are wrong) and
// gives up, so no case hangs.
__device__ void waitPhase(uint64_t* barrier, uint32_t parity, int* failed) {
  for (long spins = 0; !mbarrierTryWait(barrier, parity);) {
    if (++spins > (1l << 26)) {
      atomicExch(failed, 1);
      return;
    }
  }
}

// push-afence: warps - 1 warps copy the block's rows batch by batch (kFenceBatch rows) and
// arrive on full[batch % 2]; the last warp waits on it, fences, releases the block's flag with
// the batch's end and arrives on empty[batch % 2], which the copying warps wait on before they
// reuse that barrier two batches later.
__global__ void copyAsyncFence(const uint8_t* src, uint8_t* dst, int rows, int rowBytes, unsigned long long* flag,
                               int* failed, unsigned long long* stamps) {
  __shared__ uint64_t full[2], empty[2];
  stampStart(stamps);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int copiers = (blockDim.x >> 5) - 1;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      mbarrierInit(&full[i], copiers);
      mbarrierInit(&empty[i], 1);
    }
    fenceBarrierInit();
  }
  __syncthreads();
  const int chunks = rowBytes / 16;
  int first = 0;
  int last = 0;
  blockRows(rows, &first, &last);
  const int batches = (last - first + kFenceBatch - 1) / kFenceBatch;
  for (int k = 0; k < batches; ++k) {
    const int slot = k & 1;
    const int base = first + k * kFenceBatch;
    const int end = min(last, base + kFenceBatch);
    if (warp < copiers) {
      if (k >= 2) waitPhase(&empty[slot], ((k >> 1) - 1) & 1, failed);
      for (int r = base + warp; r < end; r += copiers)
        warpRow<true>(reinterpret_cast<const int4*>(src + static_cast<size_t>(r) * rowBytes),
                      reinterpret_cast<int4*>(dst + static_cast<size_t>(r) * rowBytes), chunks, lane);
      __syncwarp();
      if (lane == 0) mbarrierArrive(&full[slot]);
    } else {
      waitPhase(&full[slot], (k >> 1) & 1, failed);
      if (lane == 0) {
        __threadfence_system();
        moecomm::device::storeReleaseSys(reinterpret_cast<uint64_t*>(flag) + blockIdx.x, static_cast<uint64_t>(end));
        mbarrierArrive(&empty[slot]);
      }
      __syncwarp();
    }
  }
  __syncthreads();
  stampEnd(stamps);
}

// push-bulk: lane 0 of every warp; stages * rowBytes of dynamic shared memory per warp, then
// one mbarrier per stage. A stage is refilled once the bulk store that read it is done reading.
__global__ void copyBulk(const uint8_t* src, uint8_t* dst, int rows, int rowBytes, int stages, int* failed,
                         unsigned long long* stamps) {
  extern __shared__ __align__(128) uint8_t shared[];
  stampStart(stamps);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  uint8_t* ring = shared + static_cast<size_t>(warp) * stages * rowBytes;
  uint64_t* barriers =
      reinterpret_cast<uint64_t*>(shared + static_cast<size_t>(warps) * stages * rowBytes) + warp * kMaxStages;
  int first = 0;
  int last = 0;
  blockRows(rows, &first, &last);
  if (lane == 0) {
    for (int s = 0; s < stages; ++s) mbarrierInit(&barriers[s], 1);
    fenceBarrierInit();
  }
  __syncwarp();
  if (lane == 0) {
    // The warp's k-th row is first + warp + k * warps.
    const int count = first + warp < last ? (last - first - warp + warps - 1) / warps : 0;
    auto rowOf = [&](int k) { return first + warp + k * warps; };
    auto issueLoad = [&](int k) {
      const int s = k % stages;
      mbarrierArriveExpectTx(&barriers[s], rowBytes);
      bulkLoad(ring + static_cast<size_t>(s) * rowBytes, src + static_cast<size_t>(rowOf(k)) * rowBytes, rowBytes,
               &barriers[s]);
    };
    for (int k = 0; k < min(stages, count); ++k) issueLoad(k);
    for (int k = 0; k < count; ++k) {
      const int s = k % stages;
      waitPhase(&barriers[s], (k / stages) & 1, failed);
      bulkStore(dst + static_cast<size_t>(rowOf(k)) * rowBytes, ring + static_cast<size_t>(s) * rowBytes, rowBytes);
      bulkCommit();
      if (k >= 1 && k - 1 + stages < count) {
        bulkWaitRead<1>();  // row k-1's store has read its stage
        issueLoad(k - 1 + stages);
      }
    }
    bulkWait<0>();
  }
  __syncthreads();
  stampEnd(stamps);
}

// store: every warp stores one 16-byte value (every byte `fill`, the source's own fill, so the
// destination still equals the source) into its rows of the peer's buffer: the store path
// alone, without the loads.
__global__ void storeRows(uint8_t* dst, int rows, int rowBytes, uint32_t fill, unsigned long long* stamps) {
  stampStart(stamps);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int chunks = rowBytes / 16;
  const int4 v = make_int4(fill, fill, fill, fill);
  int first = 0;
  int last = 0;
  blockRows(rows, &first, &last);
  for (int r = first + warp; r < last; r += warps) {
    int4* out = reinterpret_cast<int4*>(dst + static_cast<size_t>(r) * rowBytes);
    for (int i = lane; i < chunks; i += 32) out[i] = v;
  }
  __syncthreads();
  stampEnd(stamps);
}

std::vector<int> argList(int argc, char** argv, const char* name, const char* fallback) {
  std::string text = fallback;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) text = argv[i + 1];
  }
  std::vector<int> values;
  size_t at = 0;
  while (at < text.size()) {
    const size_t comma = text.find(',', at);
    values.push_back(std::atoi(text.substr(at, comma - at).c_str()));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return values;
}

struct Gpu {
  int device = 0;
  uint8_t* src = nullptr;  // this GPU's rows
  uint8_t* dst = nullptr;  // this GPU's receive buffer
  unsigned long long* flags = nullptr;
  unsigned long long* stamps = nullptr;
  int* failed = nullptr;
  cudaStream_t stream = nullptr;
};

// Where a GPU's copy of a case reads and writes. Alone, the "peer" buffer is the first half
// of the GPU's destination allocation and the local one the second half.
struct Ends {
  const uint8_t* src;
  uint8_t* dst;
};

Ends endsOf(const std::vector<Gpu>& gpus, int g, int mode, size_t bytes) {
  const bool two = gpus.size() == 2;
  const Gpu& u = gpus[g];
  const Gpu& peer = gpus[(g + 1) % gpus.size()];
  uint8_t* peerBuffer = peer.dst;
  uint8_t* localBuffer = two ? u.dst : u.dst + bytes;
  switch (mode) {
    case kPush:
    case kPushFence:
    case kPushWarpFence:
    case kPushAsyncFence:
    case kPushBulk:
    case kStore:
    case kCopyEngine:
      return {u.src, peerBuffer};
    case kPull:
    case kPullBulk:
      return {two ? peer.src : u.dst, localBuffer};
    default:
      return {u.src, localBuffer};
  }
}

// The first and last rows of a case's destination equal its source's, byte for byte.
bool sameBytes(const std::vector<Gpu>& gpus, int g, int mode, size_t bytes) {
  const Ends e = endsOf(gpus, g, mode, bytes);
  const size_t probe = std::min<size_t>(bytes, 1 << 16);
  std::vector<uint8_t> a(probe), b(probe);
  for (size_t at : {size_t{0}, bytes - probe}) {
    CHECK(cudaMemcpy(a.data(), e.src + at, probe, cudaMemcpyDefault));
    CHECK(cudaMemcpy(b.data(), e.dst + at, probe, cudaMemcpyDefault));
    if (a != b) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const int rows = moecomm_dev::argInt(argc, argv, "--rows", 4096);
  const int rowBytes = moecomm_dev::argInt(argc, argv, "--row-bytes", 7168);
  const int reps = moecomm_dev::argInt(argc, argv, "--reps", 10);
  const std::vector<int> grids = argList(argc, argv, "--grids", "1,2,4,8,12,24,48");
  const std::vector<int> warpCounts = argList(argc, argv, "--warps", "4,8,16");
  const std::vector<int> modes = argList(argc, argv, "--modes", "0,1,2,3,4,5,6,7,8,9");
  const bool oneWay = moecomm_dev::argInt(argc, argv, "--one-way", 0) != 0;
  const bool perBlock = moecomm_dev::argInt(argc, argv, "--blocks", 0) != 0;
  const int cluster = moecomm_dev::argInt(argc, argv, "--cluster", 1);
  if (cluster < 1 || cluster > 8) {
    std::fprintf(stderr, "moecomm-linkbench: --cluster must be 1 to 8\n");
    return 1;
  }
  if (rowBytes % 16 != 0 || rowBytes <= 0 || rows <= 0 || reps <= 0) {
    std::fprintf(stderr, "moecomm-linkbench: --row-bytes must be a positive multiple of 16, --rows and --reps > 0\n");
    return 2;
  }
  int devices = 0;
  const cudaError_t counted = cudaGetDeviceCount(&devices);
  const int n = counted == cudaSuccess ? std::min(devices, 2) : 0;
  if (n == 0) {
    std::printf("moecomm-linkbench: no usable CUDA device (%s); nothing to measure\n",
                counted == cudaSuccess ? "0 devices" : cudaGetErrorString(counted));
    return 0;
  }
  const size_t bytes = static_cast<size_t>(rows) * rowBytes;
  const int active = oneWay ? 1 : n;  // GPUs that copy (with --one-way only GPU 0, towards GPU 1)
  const int maxGrid = *std::max_element(grids.begin(), grids.end());
  std::vector<Gpu> gpus(n);
  size_t sharedBudget = kSharedBudget;
  for (int g = 0; g < n; ++g) {
    Gpu& u = gpus[g];
    u.device = g;
    CHECK(cudaSetDevice(g));
    if (n == 2) {
      int can = 0;
      CHECK(cudaDeviceCanAccessPeer(&can, g, 1 - g));
      if (!can) {
        std::fprintf(stderr, "moecomm-linkbench: GPU %d cannot access GPU %d\n", g, 1 - g);
        return 1;
      }
      CHECK(cudaDeviceEnablePeerAccess(1 - g, 0));
    }
    CHECK(cudaMalloc(&u.src, bytes));
    CHECK(cudaMalloc(&u.dst, n == 2 ? bytes : 2 * bytes));  // one GPU: [peer buffer][local buffer]
    CHECK(cudaMalloc(&u.flags, 8ull * maxGrid * 32));       // push-wfence: one per warp
    CHECK(cudaMalloc(&u.stamps, 8ull * kStampWords * maxGrid));
    CHECK(cudaMalloc(&u.failed, 4));
    CHECK(cudaMemset(u.src, 0x5a + g, bytes));
    CHECK(cudaMemset(u.dst, 0x33 + g, n == 2 ? bytes : 2 * bytes));
    CHECK(cudaMemset(u.failed, 0, 4));
    CHECK(cudaStreamCreateWithFlags(&u.stream, cudaStreamNonBlocking));
    int optin = 0;
    CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, g));
    sharedBudget = std::min(sharedBudget, static_cast<size_t>(optin) - 1024);
    CHECK(cudaFuncSetAttribute(copyBulk, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# moecomm-linkbench: %s x %d (%s), %d rows of %d B (%.1f MB per GPU), %d reps\n", prop.name, n,
              n == 1   ? "one GPU: the peer buffer is local"
              : oneWay ? "GPU 0 towards GPU 1 only"
                       : "GPUs 0 and 1 towards each other at once",
              rows, rowBytes, bytes / 1e6, reps);
  if (cluster > 1) std::printf("# push and push-fence launched in clusters of %d blocks\n", cluster);
  std::printf("%-11s %6s %6s %7s %11s %9s %12s %14s %7s %10s %10s\n", "mode", "blocks", "warps", "stages", "kernel_us",
              "GB/s", "GB/s/block", "end_spread_us", "paired", "paired_us", "alone_us");
  std::vector<unsigned long long> hostStamps(static_cast<size_t>(kStampWords) * maxGrid);
  for (int mode : modes) {
    if (mode < kPush || mode > kPushAsyncFence || mode == kCopyEngine) continue;  // (kCopyEngine: after this loop)
    for (int warps : warpCounts) {
      if (warps < 1 || warps > 32 || (mode == kPushAsyncFence && warps < 2)) continue;
      const int stages = std::min<int>(
          kMaxStages, (sharedBudget - 64ull * warps * kMaxStages) / (static_cast<size_t>(warps) * rowBytes));
      const bool bulk = mode == kPushBulk || mode == kPullBulk;
      if (bulk && stages < 2) {
        std::printf("%-11s %6s %6d %7s %11s  (rows too large for 2 stages per warp)\n", kModeNames[mode], "-", warps,
                    "-", "skipped");
        continue;
      }
      for (int grid : grids) {
        if (grid < 1) continue;
        if (grid % cluster != 0 && (mode == kPush || mode == kPushFence)) continue;  // (clusters: push modes only)
        std::vector<double> us, spreads;
        std::vector<double> pairedUs, aloneUs;  // block times: SMs whose TPC twin (SM id ^ 1) ran a block too, or not
        int paired = 0;
        std::vector<std::string> blockLines(active);  // --blocks: the last repetition's blocks, per GPU
        for (int r = 0; r < reps + 1; ++r) {
          const bool last = r == reps;
          for (int g = 0; g < active; ++g) {
            Gpu& u = gpus[g];
            Gpu& peer = gpus[(g + 1) % n];
            CHECK(cudaSetDevice(u.device));
            const Ends e = endsOf(gpus, g, mode, bytes);
            if (last) CHECK(cudaMemsetAsync(e.dst, 0, bytes, u.stream));  // checked after this run
            const int threads = 32 * warps;
            switch (mode) {
              case kPush:
                CHECK(moecomm::device::launchInClusters(copyRegisters<false, true>, grid, threads, 0, cluster, u.stream,
                                                        e.src, e.dst, rows, rowBytes, peer.flags, u.stamps));
                break;
              case kPushFence:
                CHECK(moecomm::device::launchInClusters(copyRegisters<true, true>, grid, threads, 0, cluster, u.stream,
                                                        e.src, e.dst, rows, rowBytes, peer.flags, u.stamps));
                break;
              case kPushWarpFence:
                copyRegisters<false, true, true>
                    <<<grid, threads, 0, u.stream>>>(e.src, e.dst, rows, rowBytes, peer.flags, u.stamps);
                break;
              case kPushAsyncFence:
                copyAsyncFence<<<grid, threads, 0, u.stream>>>(e.src, e.dst, rows, rowBytes, peer.flags, u.failed,
                                                               u.stamps);
                break;
              case kPushBulk:
              case kPullBulk: {
                const size_t shared = static_cast<size_t>(warps) * stages * rowBytes + 8ull * warps * kMaxStages;
                copyBulk<<<grid, threads, shared, u.stream>>>(e.src, e.dst, rows, rowBytes, stages, u.failed, u.stamps);
                break;
              }
              case kStore: {
                const uint32_t fill = 0x01010101u * static_cast<uint32_t>(0x5a + g);  // the source's bytes
                storeRows<<<grid, threads, 0, u.stream>>>(e.dst, rows, rowBytes, fill, u.stamps);
                break;
              }
              case kPull:
                copyRegisters<false, false>
                    <<<grid, threads, 0, u.stream>>>(e.src, e.dst, rows, rowBytes, nullptr, u.stamps);
                break;
              default:
                copyRegisters<false, true>
                    <<<grid, threads, 0, u.stream>>>(e.src, e.dst, rows, rowBytes, nullptr, u.stamps);
                break;
            }
            CHECK(cudaGetLastError());
          }
          double slowest = 0.0;
          double spread = 0.0;
          for (int g = 0; g < active; ++g) {
            CHECK(cudaSetDevice(gpus[g].device));
            CHECK(cudaStreamSynchronize(gpus[g].stream));
            CHECK(cudaMemcpy(hostStamps.data(), gpus[g].stamps, 8ull * kStampWords * grid, cudaMemcpyDeviceToHost));
            unsigned long long begin = ~0ull, end = 0;
            std::vector<unsigned long long> ends(grid);
            std::vector<char> used(4096, 0);  // SM ids that ran a block of this launch
            for (int b = 0; b < grid; ++b) {
              begin = std::min(begin, hostStamps[kStampWords * b]);
              end = std::max(end, hostStamps[kStampWords * b + 1]);
              ends[b] = hostStamps[kStampWords * b + 1];
              used[hostStamps[kStampWords * b + 2] % used.size()] = 1;
            }
            paired = 0;
            for (int b = 0; b < grid && r > 0; ++b) {
              const unsigned long long sm = hostStamps[kStampWords * b + 2] % used.size();
              const double blockUs = (hostStamps[kStampWords * b + 1] - hostStamps[kStampWords * b]) / 1000.0;
              const bool twin = used[sm ^ 1] != 0;
              paired += twin ? 1 : 0;
              (twin ? pairedUs : aloneUs).push_back(blockUs);
              if (last && perBlock) {
                char text[48];
                std::snprintf(text, sizeof(text), " %d@sm%llu=%.1f", b, sm, blockUs);
                blockLines[g] += text;
              }
            }
            std::sort(ends.begin(), ends.end());
            slowest = std::max(slowest, (end - begin) / 1000.0);
            spread = std::max(spread, (end - ends[grid / 2]) / 1000.0);
          }
          if (r > 0) {  // the first run warms up
            us.push_back(slowest);
            spreads.push_back(spread);
          }
          if (last) {
            for (int g = 0; g < active; ++g) {
              if (!sameBytes(gpus, g, mode, bytes)) {
                std::fprintf(stderr, "moecomm-linkbench: %s on GPU %d (grid %d, %d warps) copied wrong bytes\n",
                             kModeNames[mode], g, grid, warps);
                return 1;
              }
            }
          }
        }
        const double t = moecomm_dev::median(us);
        std::printf("%-11s %6d %6d %7s %11.1f %9.1f %12.2f %14.1f %7d %10.1f %10.1f\n", kModeNames[mode], grid, warps,
                    bulk ? std::to_string(stages).c_str() : "-", t, bytes / t / 1e3, bytes / t / 1e3 / grid,
                    moecomm_dev::median(spreads), paired, moecomm_dev::median(pairedUs), moecomm_dev::median(aloneUs));
        for (int g = 0; g < active && perBlock; ++g) std::printf("  GPU %d blocks:%s\n", g, blockLines[g].c_str());
      }
    }
  }
  if (std::find(modes.begin(), modes.end(), static_cast<int>(kCopyEngine)) != modes.end()) {
    std::vector<cudaEvent_t> begin(active), end(active);
    for (int g = 0; g < active; ++g) {
      CHECK(cudaSetDevice(gpus[g].device));
      CHECK(cudaEventCreate(&begin[g]));
      CHECK(cudaEventCreate(&end[g]));
    }
    std::vector<double> us;
    for (int r = 0; r < reps + 1; ++r) {
      const bool last = r == reps;
      for (int g = 0; g < active; ++g) {
        CHECK(cudaSetDevice(gpus[g].device));
        const Ends e = endsOf(gpus, g, kCopyEngine, bytes);
        if (last) CHECK(cudaMemsetAsync(e.dst, 0, bytes, gpus[g].stream));
        CHECK(cudaEventRecord(begin[g], gpus[g].stream));
        CHECK(cudaMemcpyAsync(e.dst, e.src, bytes, cudaMemcpyDefault, gpus[g].stream));
        CHECK(cudaEventRecord(end[g], gpus[g].stream));
      }
      double slowest = 0.0;
      for (int g = 0; g < active; ++g) {
        CHECK(cudaSetDevice(gpus[g].device));
        CHECK(cudaEventSynchronize(end[g]));
        float ms = 0.0f;
        CHECK(cudaEventElapsedTime(&ms, begin[g], end[g]));
        slowest = std::max(slowest, 1000.0 * ms);
      }
      if (r > 0) us.push_back(slowest);
      for (int g = 0; last && g < active; ++g) {
        if (!sameBytes(gpus, g, kCopyEngine, bytes)) {
          std::fprintf(stderr, "moecomm-linkbench: copy-engine on GPU %d copied wrong bytes\n", g);
          return 1;
        }
      }
    }
    const double t = moecomm_dev::median(us);
    std::printf("%-11s %6s %6s %7s %11.1f %9.1f %12s %14s\n", kModeNames[kCopyEngine], "-", "-", "-", t,
                bytes / t / 1e3, "-", "-");
    for (int g = 0; g < active; ++g) {
      CHECK(cudaSetDevice(gpus[g].device));
      CHECK(cudaEventDestroy(begin[g]));
      CHECK(cudaEventDestroy(end[g]));
    }
  }
  for (int g = 0; g < n; ++g) {
    int failed = 0;
    CHECK(cudaSetDevice(gpus[g].device));
    CHECK(cudaMemcpy(&failed, gpus[g].failed, 4, cudaMemcpyDeviceToHost));
    if (failed) {
      std::fprintf(stderr, "moecomm-linkbench: a shared-memory barrier wait gave up on GPU %d; its rows are wrong\n",
                   g);
      return 1;
    }
  }
  return 0;
}
