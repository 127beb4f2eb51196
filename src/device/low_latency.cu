// Low-latency (decode) EP kernels over NVLink. Each operation is two kernels on the caller's
// stream, its send half and its receive half (with MOECOMM_LL_SEND_ONLY the receive half is
// launched later by moecommEpComplete, so nothing occupies SMs in between):
//
//   dispatch send     cast each token once (FP8 with its scales, or BF16) and store it with
//                     16-byte stores into the staging of every rank that holds one of its
//                     experts ([source][token] rows: once per rank, not once per expert), plus
//                     this rank's expert ids and T into every rank; then raise sent[slot][me].
//   dispatch receive  wait for sent[slot][s] of every unmasked source; per local expert, find
//                     the tokens that select it (source ascending, token ascending, a block
//                     scan per source) and copy their rows into the caller's expert-major
//                     output; keep the routing for the combine; raise released[slot][me].
//   combine send      every received row goes back to its token's rank, into [t][k] of its
//                     staging (k = the first entry naming the expert), with a sequence marker.
//   combine receive   per token, acc = fmaf(w_k, y_k, acc) over k ascending from the marked
//                     rows; out = bf16(acc).
//
// Every kernel is one grid of LowLatencyParams::numBlocks blocks; the last block to finish
// (a counter in LowLatencyState) raises the flags, after a system-scope fence. Waits are
// bounded by timeoutNs (MOECOMM_LL_TIMEOUT): a peer that does not answer, or that has already
// moved on to a later operation, is masked in the device mask (and the mapped host copy the
// host reads for moecommEpGetRankMask) and treated as absent. Nothing traps, nothing hangs.
#include <cuda_runtime.h>

#include "device/common.cuh"
#include "device/low_latency.h"
#include "ep/dtype.h"

namespace moecomm {
namespace device {
namespace {

constexpr int kThreads = kLowLatencyThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kErrorInvalidArgument = 4;  // moecommInvalidArgument

// Developer timeline (build with -DMOECOMM_KERNEL_PROFILE): per kernel (kLlKernel*) and block,
// the global timer at fixed points of the last call (see lowLatencyProfile).
#ifdef MOECOMM_KERNEL_PROFILE
constexpr int kProfileBlocks = 256;
__device__ unsigned long long gLowLatencyProfile[kLowLatencyKernels][kProfileBlocks][kLowLatencyProfileEvents];
#define MC_LL_PROFILE(kernel, event)                                   \
  do {                                                                 \
    if (threadIdx.x == 0 && blockIdx.x < kProfileBlocks)               \
      gLowLatencyProfile[kernel][blockIdx.x][event] = globalTimerNs(); \
  } while (0)
#else
#define MC_LL_PROFILE(kernel, event) \
  do {                               \
  } while (0)
#endif

__device__ __forceinline__ uint64_t* sentFlag(const LowLatencyParams& p, int owner, int source) {
  return reinterpret_cast<uint64_t*>(p.peers[owner] + p.sentOffset) + p.slot * p.numRanks + source;
}

__device__ __forceinline__ uint64_t* releasedFlag(const LowLatencyParams& p, int owner, int reader) {
  return reinterpret_cast<uint64_t*>(p.peers[owner] + p.releasedOffset) + p.slot * p.numRanks + reader;
}

__device__ __forceinline__ uint8_t* slotBase(const LowLatencyParams& p, int owner) {
  return p.peers[owner] + p.slotOffset + static_cast<uint64_t>(p.slot) * p.slotBytes;
}

__device__ __forceinline__ int loadVolatile(const int* address) {
  return *reinterpret_cast<const volatile int*>(address);
}

__device__ __forceinline__ uint64_t currentSequence(const LowLatencyParams& p) {
  return *reinterpret_cast<const volatile uint64_t*>(&p.state->slotSequence[p.slot]);
}

__device__ void maskRank(const LowLatencyParams& p, int rank) {
  atomicExch(&p.state->rankMask[rank], 1);
  p.hostMasked[rank] = 1;
  __threadfence_system();
}

// One thread: spins until *flag == target (exact) or >= target. A flag beyond an exact target
// means the peer moved on; that, a timeout, or the peer being masked meanwhile (by another
// block) masks it and returns false.
__device__ bool waitPeer(const LowLatencyParams& p, const uint64_t* flag, uint64_t target, bool exact, int peer) {
  const uint64_t start = globalTimerNs();
  for (uint32_t polls = 0;; ++polls) {
    const uint64_t value = loadAcquireSys(flag);
    if (value == target || (!exact && value > target)) return true;
    if (value > target) {
      maskRank(p, peer);
      return false;
    }
    if ((polls & 63u) == 63u) {
      if (loadVolatile(&p.state->rankMask[peer]) != 0) return false;
      if (globalTimerNs() - start > p.timeoutNs) {
        maskRank(p, peer);
        return false;
      }
    }
  }
}

// Every block, on entry to a send half: the ranks it may write to, i.e. the unmasked ones
// that finished reading what the previous operation on this slot put there.
__device__ uint32_t sendTargets(const LowLatencyParams& p, uint64_t sequence) {
  __shared__ uint32_t targets;
  if (threadIdx.x == 0) targets = 0;
  __syncthreads();
  const int r = threadIdx.x;
  if (r < p.numRanks && loadVolatile(&p.state->rankMask[r]) == 0) {
    if (sequence <= 1 || waitPeer(p, releasedFlag(p, p.rank, r), sequence - 1, false, r)) atomicOr(&targets, 1u << r);
  }
  __syncthreads();
  return targets;
}

// Every block, on entry to a receive half: the unmasked sources whose send half arrived.
__device__ uint32_t arrivedSources(const LowLatencyParams& p, uint64_t sequence) {
  __shared__ uint32_t sources;
  if (threadIdx.x == 0) sources = 0;
  __syncthreads();
  const int r = threadIdx.x;
  if (r < p.numRanks && loadVolatile(&p.state->rankMask[r]) == 0) {
    if (waitPeer(p, sentFlag(p, p.rank, r), sequence, true, r)) atomicOr(&sources, 1u << r);
  }
  __syncthreads();
  return sources;
}

// Every block when done: true in the last block to finish (the counter is reset for the next
// kernel on this slot). Its threads may then raise flags: every block's stores came before.
__device__ bool lastBlock(const LowLatencyParams& p, int half) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    unsigned int* counter = &p.state->blocksDone[p.slot][half];
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) {
      *counter = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return last;
}

// Raises flag(owner) = sequence on every rank in `ranks` (threads 0..R-1 of the last block).
template <typename FlagOf>
__device__ void raiseFlags(const LowLatencyParams& p, uint32_t ranks, uint64_t sequence, FlagOf flagOf) {
  const int r = threadIdx.x;
  if (r < p.numRanks && ((ranks >> r) & 1u) != 0) {
    __threadfence_system();
    storeReleaseSys(flagOf(r), sequence);
  }
}

__device__ __forceinline__ void unpackBf16(const int4& v, uint16_t* out) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = static_cast<uint16_t>(words[i] & 0xffffu);
    out[2 * i + 1] = static_cast<uint16_t>(words[i] >> 16);
  }
}

// ---- Dispatch send ------------------------------------------------------------------------
// Work is flat over (token, 16-byte chunk) across the whole grid, so every SM of the budget
// sends from the first microsecond whatever T is.

// Casts BF16 rows to FP8 (dtype.h arithmetic, as reference::castRowToFp8) and stores the bytes
// and the FP32 scales into every destination's staging row. A thread owns 16 channels; the 8
// lanes of a 128-channel scale block (never split between tokens, since H % 128 == 0) reduce
// their amax with shuffles.
__device__ void sendFp8Rows(const LowLatencyParams& p, const uint32_t* tokenRanks, uint32_t targets) {
  const int chunksPerRow = p.hidden / 16;
  const int total = p.numTokens * chunksPerRow;  // < 2^31: checked when the EP is made
  const int stride = gridDim.x * blockDim.x;
  for (int base = blockIdx.x * blockDim.x; base < total; base += stride) {
    const int g = base + threadIdx.x;
    int t = 0;
    int c = 0;
    uint32_t destinations = 0;
    if (g < total) {
      t = g / chunksPerRow;
      c = g % chunksPerRow;
      destinations = tokenRanks[t] & targets;
    }
    uint16_t values[16];
    float amax = 0.0f;
    if (destinations != 0) {
      const int4* source =
          reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) + static_cast<uint64_t>(t) * p.hidden * 2) +
          2 * c;
      unpackBf16(source[0], values);
      unpackBf16(source[1], values + 8);
#pragma unroll
      for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(bf16ToFloat(values[i])));
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    if (destinations == 0) continue;
    amax = fmaxf(amax, kFp8MinAmax);
    float scale = amax / kFp8E4m3Max;
    if (p.roundScale) scale = roundScaleUpToPowerOfTwo(scale);
    const float inverse = 1.0f / scale;
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        word |= static_cast<uint32_t>(floatToE4m3(bf16ToFloat(values[4 * w + b]) * inverse)) << (8 * b);
      }
      words[w] = word;
    }
    const int4 q = make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                             static_cast<int>(words[3]));
    const uint64_t stagingRow = p.rowsOffset + (static_cast<uint64_t>(p.rank) * p.maxTokens + t) * p.rowPitch;
    for (uint32_t left = destinations; left != 0; left &= left - 1) {
      uint8_t* staged = slotBase(p, __ffs(left) - 1) + stagingRow;
      reinterpret_cast<int4*>(staged)[c] = q;
      if ((c & 7) == 0) reinterpret_cast<float*>(staged + p.hidden)[c / 8] = scale;
    }
  }
}

__device__ void sendBf16Rows(const LowLatencyParams& p, const uint32_t* tokenRanks, uint32_t targets) {
  const int chunksPerRow = p.hidden / 8;
  const int total = p.numTokens * chunksPerRow;
  const int stride = gridDim.x * blockDim.x;
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int t = g / chunksPerRow;
    const int c = g % chunksPerRow;
    const uint32_t destinations = tokenRanks[t] & targets;
    if (destinations == 0) continue;
    const int4 v =
        reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) + static_cast<uint64_t>(t) * p.hidden * 2)[c];
    const uint64_t stagingRow = p.rowsOffset + (static_cast<uint64_t>(p.rank) * p.maxTokens + t) * p.rowPitch;
    for (uint32_t left = destinations; left != 0; left &= left - 1) {
      reinterpret_cast<int4*>(slotBase(p, __ffs(left) - 1) + stagingRow)[c] = v;
    }
  }
}

__global__ void __launch_bounds__(kThreads) dispatchSendKernel(const LowLatencyParams p) {
  extern __shared__ int4 sendShared[];
  uint32_t* tokenRanks = reinterpret_cast<uint32_t*>(sendShared);  // [T]: ranks holding its experts
  MC_LL_PROFILE(kLlKernelDispatchSend, 0);
  const uint64_t sequence = currentSequence(p) + 1;
  const uint32_t targets = sendTargets(p, sequence);
  MC_LL_PROFILE(kLlKernelDispatchSend, 1);
  const int K = p.topk;
  const int T = p.numTokens;
  if (blockIdx.x == 0) {
    const int d = threadIdx.x;
    if (d < p.numRanks && ((targets >> d) & 1u) != 0) {
      reinterpret_cast<int*>(slotBase(p, d) + p.tokensOffset)[p.rank] = T;
    }
    if (threadIdx.x == 0) *p.routing.numRows = 0;  // the receive half appends to it
  }
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    uint32_t ranks = 0;
    for (int k = 0; k < K; ++k) {
      const int64_t expert = loadExpertId(p.topkIdx, p.topkIdxIs64, static_cast<int64_t>(t) * K + k);
      if (expert >= 0 && expert < p.numExperts) ranks |= 1u << static_cast<int>(expert / p.localExperts);
    }
    tokenRanks[t] = ranks;
  }
  // Every rank scans every source's ids to place rows, so the ids go to every target.
  const int64_t entries = static_cast<int64_t>(T) * K;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < entries;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t expert = loadExpertId(p.topkIdx, p.topkIdxIs64, g);
    if (expert < -1 || expert >= p.numExperts) {
      atomicCAS(p.hostError, 0, kErrorInvalidArgument);
      expert = -1;
    }
    for (uint32_t left = targets; left != 0; left &= left - 1) {
      int* topk = reinterpret_cast<int*>(slotBase(p, __ffs(left) - 1) + p.topkOffset);
      topk[static_cast<uint64_t>(p.rank) * p.maxTokens * K + g] = static_cast<int>(expert);
    }
  }
  __syncthreads();
  MC_LL_PROFILE(kLlKernelDispatchSend, 2);
  if (p.fp8) {
    sendFp8Rows(p, tokenRanks, targets);
  } else {
    sendBf16Rows(p, tokenRanks, targets);
  }
  MC_LL_PROFILE(kLlKernelDispatchSend, 3);
  const bool last = lastBlock(p, 0);
  MC_LL_PROFILE(kLlKernelDispatchSend, 4);
  if (last) {
    if (threadIdx.x == 0) p.state->slotSequence[p.slot] = sequence;
    raiseFlags(p, targets, sequence, [&](int r) { return sentFlag(p, r, p.rank); });
    MC_LL_PROFILE(kLlKernelDispatchSend, 5);
  }
}

// ---- Dispatch receive ---------------------------------------------------------------------
// A warp per local expert lists its rows (sources ascending, tokens ascending: a ballot scan
// over the ids, from shared memory when they fit); then the block copies the rows of all its
// experts at once, flat over (row, 16-byte chunk) with several loads in flight per thread.

constexpr int kCopyUnroll = 8;
constexpr int kBatchRows = 128;  // rows whose addresses a block stages in shared memory at once

// One warp: the rows of local expert le, written to the routing (and the caller's srcInfo).
// Returns the count (in every lane).
__device__ int listExpertRows(const LowLatencyParams& p, const int* ids, const int* sourceTokens, int le) {
  const int lane = threadIdx.x & 31;
  const int K = p.topk;
  const int expert = p.rank * p.localExperts + le;
  const uint64_t firstRow = static_cast<uint64_t>(le) * p.numRanks * p.maxTokens;
  int count = 0;
  for (int s = 0; s < p.numRanks; ++s) {
    const int tokens = sourceTokens[s];
    for (int first = 0; first < tokens; first += 32) {
      const int t = first + lane;
      int firstK = -1;
      if (t < tokens) {
        const int* row = ids + (static_cast<uint64_t>(s) * p.maxTokens + t) * K;
        for (int k = 0; k < K; ++k) {
          if (row[k] == expert) {
            firstK = k;
            break;
          }
        }
      }
      const uint32_t ballot = __ballot_sync(0xffffffffu, firstK >= 0);
      if (firstK >= 0) {
        const uint64_t at = firstRow + count + __popc(ballot & ((1u << lane) - 1u));
        const int info = s * p.maxTokens + t;
        p.routing.srcInfo[at] = info;
        p.routing.firstK[at] = static_cast<uint8_t>(firstK);
        if (p.recvSrcInfo != nullptr) p.recvSrcInfo[at] = info;
      }
      count += __popc(ballot);
    }
  }
  if (lane == 0) {
    p.recvCount[le] = count;
    p.routing.recvCount[le] = count;
    if (p.cumulativeRecvStats != nullptr) p.cumulativeRecvStats[le] += count;
  }
  return count;
}

// The whole block: copies rows rows[0..numRows) (ids le * S + slot) from the staging into the
// caller's recvX (and scales). The addresses of a batch of rows go to shared memory first, so
// each 16-byte chunk costs one load, with kCopyUnroll of them in flight per thread.
__device__ void copyRows(const LowLatencyParams& p, const uint8_t* mine, const int* rows, int numRows) {
  __shared__ const uint8_t* batchFrom[kBatchRows];
  __shared__ int batchId[kBatchRows];
  const int rowBytes = p.fp8 ? p.hidden : 2 * p.hidden;
  const int chunksPerRow = rowBytes / 16;
  const int scales = p.hidden / kFp8ScaleBlock;
  uint8_t* recvX = static_cast<uint8_t*>(p.recvX);
  for (int first = 0; first < numRows; first += kBatchRows) {
    const int batch = min(kBatchRows, numRows - first);
    if (static_cast<int>(threadIdx.x) < batch) {
      const int id = rows[first + threadIdx.x];
      batchId[threadIdx.x] = id;
      batchFrom[threadIdx.x] = mine + p.rowsOffset + static_cast<uint64_t>(p.routing.srcInfo[id]) * p.rowPitch;
    }
    __syncthreads();
    const int total = batch * chunksPerRow;
    for (int base = threadIdx.x; base < total; base += blockDim.x * kCopyUnroll) {
      int4 values[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f < total)
          values[u] = __ldcg(reinterpret_cast<const int4*>(batchFrom[f / chunksPerRow]) + f % chunksPerRow);
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f < total) {
          reinterpret_cast<int4*>(recvX + static_cast<uint64_t>(batchId[f / chunksPerRow]) *
                                              rowBytes)[f % chunksPerRow] = values[u];
        }
      }
    }
    if (p.fp8) {
      const int scaleTotal = batch * scales;
      for (int base = threadIdx.x; base < scaleTotal; base += blockDim.x * kCopyUnroll) {
        float values[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int f = base + u * blockDim.x;
          if (f < scaleTotal) {
            values[u] = __ldcg(reinterpret_cast<const float*>(batchFrom[f / scales] + p.hidden) + f % scales);
          }
        }
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int f = base + u * blockDim.x;
          if (f >= scaleTotal) continue;
          const uint64_t at = static_cast<uint64_t>(batchId[f / scales]) * scales + f % scales;
          if (p.ue8m0) {
            static_cast<uint8_t*>(p.recvScales)[at] = ue8m0FromPowerOfTwo(values[u]);
          } else {
            static_cast<float*>(p.recvScales)[at] = values[u];
          }
        }
      }
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) dispatchRecvKernel(const LowLatencyParams p) {
  extern __shared__ int4 recvShared[];
  __shared__ int sourceTokens[kLowLatencyMaxRanks];
  __shared__ int warpCounts[kWarps];
  __shared__ int blockRowBase;
  const int R = p.numRanks;
  const int K = p.topk;
  const int slotsPerExpert = R * p.maxTokens;
  MC_LL_PROFILE(kLlKernelDispatchRecv, 0);
  const uint64_t sequence = currentSequence(p);
  const uint32_t sources = arrivedSources(p, sequence);
  MC_LL_PROFILE(kLlKernelDispatchRecv, 1);
  const uint8_t* mine = slotBase(p, p.rank);
  const int* globalIds = reinterpret_cast<const int*>(mine + p.topkOffset);
  if (static_cast<int>(threadIdx.x) < R) {
    const int s = threadIdx.x;
    const int* tokens = reinterpret_cast<const int*>(mine + p.tokensOffset);
    sourceTokens[s] = ((sources >> s) & 1u) != 0 ? min(max(__ldcg(tokens + s), 0), p.maxTokens) : 0;
  }
  __syncthreads();
  const int* ids = globalIds;
  if (p.topkInShared) {
    int* sharedIds = reinterpret_cast<int*>(recvShared);
    for (int s = 0; s < R; ++s) {
      const uint64_t first = static_cast<uint64_t>(s) * p.maxTokens * K;
      const int count = sourceTokens[s] * K;
      for (int i = threadIdx.x; i < count; i += blockDim.x) sharedIds[first + i] = __ldcg(globalIds + first + i);
    }
    ids = sharedIds;
    __syncthreads();
  }
  MC_LL_PROFILE(kLlKernelDispatchRecv, 2);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int round = 0; round * kWarps * static_cast<int>(gridDim.x) < p.localExperts; ++round) {
    const int le = (round * kWarps + warp) * gridDim.x + blockIdx.x;
    const int count = le < p.localExperts ? listExpertRows(p, ids, sourceTokens, le) : 0;
    if (lane == 0) warpCounts[warp] = count;
    __syncthreads();
    int before = 0;
    int blockRows = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warpCounts[w];
      blockRows += warpCounts[w];
    }
    if (threadIdx.x == 0) blockRowBase = blockRows > 0 ? atomicAdd(p.routing.numRows, blockRows) : 0;
    __syncthreads();
    int* rows = p.routing.rowList + blockRowBase;
    for (int i = lane; i < count; i += 32) rows[before + i] = le * slotsPerExpert + i;
    __syncthreads();
    copyRows(p, mine, rows, blockRows);
    __syncthreads();
  }
  MC_LL_PROFILE(kLlKernelDispatchRecv, 3);
  const bool last = lastBlock(p, 1);
  MC_LL_PROFILE(kLlKernelDispatchRecv, 4);
  if (last) {
    raiseFlags(p, (R == 32 ? 0xffffffffu : (1u << R) - 1u), sequence,
               [&](int r) { return releasedFlag(p, r, p.rank); });
    MC_LL_PROFILE(kLlKernelDispatchRecv, 5);
  }
}

// ---- Combine send -------------------------------------------------------------------------
// Every received row goes to [t][k] of its token's rank, with a marker holding the sequence.

__global__ void __launch_bounds__(kThreads) combineSendKernel(const LowLatencyParams p) {
  __shared__ const int4* batchFrom[kBatchRows];
  __shared__ int4* batchTo[kBatchRows];
  MC_LL_PROFILE(kLlKernelCombineSend, 0);
  const uint64_t sequence = currentSequence(p) + 1;
  const uint32_t targets = sendTargets(p, sequence);
  MC_LL_PROFILE(kLlKernelCombineSend, 1);
  const int K = p.topk;
  const int numRows = *p.routing.numRows;
  const uint64_t rowBytes = 2ull * p.hidden;
  const int chunksPerRow = p.hidden / 8;
  // A contiguous share of the received rows per block, in batches whose addresses (and the
  // sequence markers) are worked out first.
  const int perBlock = (numRows + gridDim.x - 1) / gridDim.x;
  const int begin = min(numRows, static_cast<int>(blockIdx.x) * perBlock);
  const int end = min(numRows, begin + perBlock);
  const uint8_t* outputs = static_cast<const uint8_t*>(p.expertOutputs);
  MC_LL_PROFILE(kLlKernelCombineSend, 2);
  for (int first = begin; first < end; first += kBatchRows) {
    const int batch = min(kBatchRows, end - first);
    if (static_cast<int>(threadIdx.x) < batch) {
      const int id = p.routing.rowList[first + threadIdx.x];
      const int info = p.routing.srcInfo[id];
      const int source = info / p.maxTokens;
      int4* to = nullptr;
      if (((targets >> source) & 1u) != 0) {
        const uint64_t entry = static_cast<uint64_t>(info % p.maxTokens) * K + p.routing.firstK[id];
        uint8_t* base = slotBase(p, source);
        to = reinterpret_cast<int4*>(base + p.combineRowsOffset + entry * rowBytes);
        reinterpret_cast<uint32_t*>(base + p.markersOffset)[entry] = static_cast<uint32_t>(sequence);
      }
      batchFrom[threadIdx.x] = reinterpret_cast<const int4*>(outputs + static_cast<uint64_t>(id) * rowBytes);
      batchTo[threadIdx.x] = to;
    }
    __syncthreads();
    const int total = batch * chunksPerRow;
    for (int base = threadIdx.x; base < total; base += blockDim.x * kCopyUnroll) {
      int4 values[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f < total && batchTo[f / chunksPerRow] != nullptr)
          values[u] = batchFrom[f / chunksPerRow][f % chunksPerRow];
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f >= total) continue;
        int4* to = batchTo[f / chunksPerRow];
        if (to != nullptr) to[f % chunksPerRow] = values[u];
      }
    }
    __syncthreads();
  }
  MC_LL_PROFILE(kLlKernelCombineSend, 3);
  const bool last = lastBlock(p, 0);
  MC_LL_PROFILE(kLlKernelCombineSend, 4);
  if (last) {
    if (threadIdx.x == 0) p.state->slotSequence[p.slot] = sequence;
    raiseFlags(p, targets, sequence, [&](int r) { return sentFlag(p, r, p.rank); });
    MC_LL_PROFILE(kLlKernelCombineSend, 5);
  }
}

// ---- Combine receive ----------------------------------------------------------------------
// Block b reduces tokens b, b + grid, ...: first the row and weight of every (token, k) of a
// round of tokens, then flat over (token, 8-channel chunk) with the K rows' loads in flight
// together and the fmaf chain in k order.

__global__ void __launch_bounds__(kThreads) combineRecvKernel(const LowLatencyParams p) {
  __shared__ const int4* rows[kThreads];
  __shared__ float weights[kThreads];
  __shared__ int ids[kThreads];
  MC_LL_PROFILE(kLlKernelCombineRecv, 0);
  const uint64_t sequence = currentSequence(p);
  const uint32_t sources = arrivedSources(p, sequence);
  MC_LL_PROFILE(kLlKernelCombineRecv, 1);
  const int K = p.topk;
  const int T = p.numTokens;
  const uint8_t* mine = slotBase(p, p.rank);
  const uint32_t* markers = reinterpret_cast<const uint32_t*>(mine + p.markersOffset);
  const int chunks = p.hidden / 8;
  const int tokensPerRound = kThreads / K;
  const int myTokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  for (int round = 0; round < myTokens; round += tokensPerRound) {
    const int slotInRound = threadIdx.x / K;
    const int k = threadIdx.x % K;
    const int j = round + slotInRound;
    const bool mapped = slotInRound < tokensPerRound && j < myTokens;
    const int64_t base = static_cast<int64_t>(blockIdx.x + j * gridDim.x) * K;
    if (slotInRound < tokensPerRound) {
      int64_t expert = mapped ? loadExpertId(p.topkIdx, p.topkIdxIs64, base + k) : -1;
      if (expert < -1 || expert >= p.numExperts) expert = -1;
      ids[threadIdx.x] = static_cast<int>(expert);
    }
    __syncthreads();
    if (slotInRound < tokensPerRound) {
      const int4* row = nullptr;
      float weight = 0.0f;
      const int expert = ids[threadIdx.x];
      if (mapped && expert >= 0 && ((sources >> (expert / p.localExperts)) & 1u) != 0) {
        int first = k;
        for (int i = 0; i < k; ++i) {
          if (ids[threadIdx.x - k + i] == expert) {
            first = i;
            break;
          }
        }
        // Unmarked: the expert's rank did not receive the token (it had masked this rank).
        if (__ldcg(markers + base + first) == static_cast<uint32_t>(sequence)) {
          row = reinterpret_cast<const int4*>(mine + p.combineRowsOffset + (base + first) * 2ull * p.hidden);
          weight = p.topkWeights[base + k];
        }
      }
      rows[threadIdx.x] = row;
      weights[threadIdx.x] = weight;
    }
    __syncthreads();
    const int roundTokens = min(tokensPerRound, myTokens - round);
    for (int f = threadIdx.x; f < roundTokens * chunks; f += blockDim.x) {
      const int slotInRoundF = f / chunks;
      const int c = f % chunks;
      const int4* const* tokenRows = rows + slotInRoundF * K;
      const float* tokenWeights = weights + slotInRoundF * K;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int k0 = 0; k0 < K; k0 += kCopyUnroll) {
        int4 loaded[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int4* row = k0 + u < K ? tokenRows[k0 + u] : nullptr;
          loaded[u] = row != nullptr ? __ldcg(row + c) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          if (k0 + u >= K || tokenRows[k0 + u] == nullptr) continue;
          uint16_t values[8];
          unpackBf16(loaded[u], values);
          const float weight = tokenWeights[k0 + u];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = __fmaf_rn(weight, bf16ToFloat(values[i]), acc[i]);
        }
      }
      uint32_t words[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        words[i] =
            static_cast<uint32_t>(floatToBf16(acc[2 * i])) | (static_cast<uint32_t>(floatToBf16(acc[2 * i + 1])) << 16);
      }
      const int t = blockIdx.x + (round + slotInRoundF) * gridDim.x;
      reinterpret_cast<int4*>(static_cast<uint8_t*>(p.out) + static_cast<uint64_t>(t) * p.hidden * 2)[c] =
          make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                    static_cast<int>(words[3]));
    }
    __syncthreads();
  }
  MC_LL_PROFILE(kLlKernelCombineRecv, 3);
  const bool last = lastBlock(p, 1);
  MC_LL_PROFILE(kLlKernelCombineRecv, 4);
  if (last) {
    const int R = p.numRanks;
    raiseFlags(p, (R == 32 ? 0xffffffffu : (1u << R) - 1u), sequence,
               [&](int r) { return releasedFlag(p, r, p.rank); });
    MC_LL_PROFILE(kLlKernelCombineRecv, 5);
  }
}

}  // namespace

int lowLatencyProfile(int kernel, int blocks, unsigned long long* out) {
#ifdef MOECOMM_KERNEL_PROFILE
  if (kernel < 0 || kernel >= kLowLatencyKernels || blocks > kProfileBlocks) return -1;
  const size_t row = sizeof(unsigned long long) * kLowLatencyProfileEvents;
  const cudaError_t err =
      cudaMemcpyFromSymbol(out, gLowLatencyProfile, row * blocks, row * kProfileBlocks * static_cast<size_t>(kernel));
  return err == cudaSuccess ? kLowLatencyProfileEvents : -1;
#else
  (void)kernel;
  (void)blocks;
  (void)out;
  return -1;
#endif
}

uint64_t lowLatencyDispatchSendSharedBytes(const LowLatencyParams& params) {
  return (static_cast<uint64_t>(params.maxTokens) * sizeof(uint32_t) + 15) / 16 * 16;
}

uint64_t lowLatencyDispatchRecvSharedBytes(const LowLatencyParams& params) {
  if (!params.topkInShared) return 0;
  return static_cast<uint64_t>(params.numRanks) * params.maxTokens * params.topk * sizeof(int);
}

int allowLowLatencySharedMemory(uint64_t maxDynamicSharedBytes) {
  // The attribute is per kernel and process-wide: always the same (largest) value, so EPs of
  // different shapes never lower it under one another.
  cudaError_t err = cudaFuncSetAttribute(dispatchSendKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(maxDynamicSharedBytes));
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaFuncSetAttribute(dispatchRecvKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(maxDynamicSharedBytes));
  return static_cast<int>(err);
}

int launchLowLatencyDispatchSend(const LowLatencyParams& params, CUstream_st* stream) {
  const size_t shared = lowLatencyDispatchSendSharedBytes(params);
  dispatchSendKernel<<<params.numBlocks, kThreads, shared, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

int launchLowLatencyDispatchRecv(const LowLatencyParams& params, CUstream_st* stream) {
  const size_t shared = lowLatencyDispatchRecvSharedBytes(params);
  dispatchRecvKernel<<<params.numBlocks, kThreads, shared, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

int launchLowLatencyCombineSend(const LowLatencyParams& params, CUstream_st* stream) {
  combineSendKernel<<<params.numBlocks, kThreads, 0, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

int launchLowLatencyCombineRecv(const LowLatencyParams& params, CUstream_st* stream) {
  combineRecvKernel<<<params.numBlocks, kThreads, 0, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace device
}  // namespace moecomm
