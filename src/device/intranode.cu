// Intranode normal-mode EP kernels: a first correct (not yet fast) version. Every collective
// is a chain of launches on the caller's stream:
//   [route]    per destination rank, each token's row in that rank's staging (block scan);
//   send       wait until every destination acknowledged our previous op on this channel,
//              then write counts and rows into the destinations' staging through peer pointers;
//   signal     after the send kernel finished: fence, release-store flag[me] = sequence on
//              every rank (kernel boundary = all blocks' writes done);
//   receive    wait for flag[s] == sequence from every source, read the local staging;
//   ack        release-store ack[me] = sequence on every rank: staging may be reused.
// Waits are bounded by params.timeoutNs; on expiry the kernel records moecommTimeout in the
// mapped error word and goes on (results are then garbage, never a hang or a trap).
#include <cuda_runtime.h>

#include "device/api.h"
#include "device/common.cuh"
#include "ep/dtype.h"

namespace moecomm {
namespace device {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kErrorInvalidArgument = 4;  // moecommInvalidArgument
constexpr int kErrorTimeout = 8;          // moecommTimeout

__device__ void raiseError(const IntranodeParams& p, int code) { atomicCAS(p.error, 0, code); }

__device__ uint64_t* flagAt(const IntranodeParams& p, int owner, int channel, int kind, int slot) {
  return reinterpret_cast<uint64_t*>(p.peers[owner] + p.flagsOffset) + (channel * 2 + kind) * p.numRanks + slot;
}

__device__ int* countsAt(const IntranodeParams& p, int owner, int channel, int source) {
  const int stride = 1 + p.numExperts / p.numRanks;
  return reinterpret_cast<int*>(p.peers[owner] + p.countsOffset) + (channel * p.numRanks + source) * stride;
}

// Bounded spin until *flag >= target. One thread.
__device__ void waitFlag(const IntranodeParams& p, const uint64_t* flag, uint64_t target) {
  const uint64_t start = globalTimerNs();
  while (loadAcquireSys(flag) < target) {
    if (globalTimerNs() - start > p.timeoutNs) {
      raiseError(p, kErrorTimeout);
      return;
    }
  }
}

// Every block: wait for flags[channel][kind][s] >= target for every s (threads 0..R-1).
__device__ void waitAll(const IntranodeParams& p, int channel, int kind, uint64_t target) {
  if (static_cast<int>(threadIdx.x) < p.numRanks) {
    waitFlag(p, flagAt(p, p.rank, channel, kind, threadIdx.x), target);
  }
  __syncthreads();
}

// Copies bytes (a multiple of 8) with one warp; 16-byte vectors when both ends allow.
__device__ void warpCopy(void* dst, const void* src, uint64_t bytes) {
  const int lane = threadIdx.x & 31;
  if (bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 == 0) {
    int4* d = static_cast<int4*>(dst);
    const int4* s = static_cast<const int4*>(src);
    const uint64_t chunks = bytes / 16;
    uint64_t i = lane;
    // Four independent 16-byte loads in flight per lane before the stores: a single
    // load-then-store chain leaves the links and HBM mostly idle.
    for (; i + 96 < chunks; i += 128) {
      const int4 a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
      d[i] = a;
      d[i + 32] = b;
      d[i + 64] = c;
      d[i + 96] = e;
    }
    for (; i < chunks; i += 32) d[i] = s[i];
  } else {
    uint2* d = static_cast<uint2*>(dst);
    const uint2* s = static_cast<const uint2*>(src);
    for (uint64_t i = lane; i < bytes / 8; i += 32) d[i] = s[i];
  }
}

// Block scan: exclusive prefix of `value` over the block's threads; *total gets the sum.
__device__ int blockExclusiveScan(int value, int* total) {
  __shared__ int warpSums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warpSums[warp] = inclusive;
  __syncthreads();
  int before = 0;
  int sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warpSums[w];
    sum += warpSums[w];
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - value;
}

// ---- Routing: block r handles destination rank r ---------------------------------------

__global__ void routeKernel(IntranodeParams p) {
  const int dest = blockIdx.x;
  const int localExperts = p.numExperts / p.numRanks;
  int running = 0;
  for (int base = 0; base < p.numTokens; base += kThreads) {
    const int t = base + threadIdx.x;
    int goes = 0;
    if (t < p.numTokens) {
      for (int k = 0; k < p.topk; ++k) {
        const int64_t e = loadExpertId(p.topkIdx, p.topkIdxIs64, static_cast<int64_t>(t) * p.topk + k);
        const bool valid = e >= 0 && e < p.numExperts;
        if (e < -1 || e >= p.numExperts) raiseError(p, kErrorInvalidArgument);
        if (dest == 0) p.handleIdx[static_cast<int64_t>(t) * p.topk + k] = valid ? e : -1;
        if (valid && e / localExperts == dest) {
          goes = 1;
          atomicAdd(&p.expertCount[e], 1);
        }
      }
    }
    int total = 0;
    const int before = blockExclusiveScan(goes, &total);
    if (t < p.numTokens) p.pos[static_cast<int64_t>(t) * p.numRanks + dest] = goes ? running + before : -1;
    running += total;
  }
  if (threadIdx.x == 0) p.sendCount[dest] = running;
}

// ---- Signals ---------------------------------------------------------------------------

// Publishes flags[channel][kind][me] = sequence on every rank.
__global__ void signalKernel(IntranodeParams p, int channel, int kind) {
  const int r = threadIdx.x;
  if (r >= p.numRanks) return;
  __threadfence_system();
  storeReleaseSys(flagAt(p, r, channel, kind, p.rank), p.sequence);
}

// Writes this rank's counts for every destination into the destination's counts block.
__device__ void sendCounts(const IntranodeParams& p, int channel) {
  const int localExperts = p.numExperts / p.numRanks;
  for (int i = threadIdx.x; i < p.numRanks * (1 + localExperts); i += blockDim.x) {
    const int dest = i / (1 + localExperts);
    const int j = i % (1 + localExperts);
    countsAt(p, dest, channel, p.rank)[j] = j == 0 ? p.sendCount[dest] : p.expertCount[dest * localExperts + j - 1];
  }
}

// ---- Notify ----------------------------------------------------------------------------

__global__ void notifySendKernel(IntranodeParams p) {
  waitAll(p, kChannelNotify, 1, p.sequence - 1);
  sendCounts(p, kChannelNotify);
}

__global__ void notifyReceiveKernel(IntranodeParams p) {
  waitAll(p, kChannelNotify, 0, p.sequence);
  const int localExperts = p.numExperts / p.numRanks;
  for (int j = threadIdx.x; j < 1 + localExperts; j += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < p.numRanks; ++s) sum += countsAt(p, p.rank, kChannelNotify, s)[j];
    p.notifyOut[j] = sum;
    if (j == 0) *p.numRecv = sum;
  }
}

// ---- Dispatch --------------------------------------------------------------------------

__global__ void dispatchSendKernel(IntranodeParams p) {
  waitAll(p, kChannelDispatch, 1, p.sequence - 1);
  if (blockIdx.x == 0) sendCounts(p, kChannelDispatch);
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int scalesPerRow = p.hidden / 128;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * kWarps;
  for (int t = blockIdx.x * kWarps + (threadIdx.x >> 5); t < p.numTokens; t += warps) {
    for (int dest = 0; dest < p.numRanks; ++dest) {
      const int pos = p.pos[static_cast<int64_t>(t) * p.numRanks + dest];
      if (pos < 0) continue;
      uint8_t* row = p.peers[dest] + p.dispatchOffset +
                     (static_cast<uint64_t>(p.rank) * p.maxTokens + pos) * p.dispatchRowBytes;
      warpCopy(row, static_cast<const uint8_t*>(p.x) + t * xBytes, xBytes);
      if (p.xIsFp8) {
        float* scales = reinterpret_cast<float*>(row + p.rowScalesOffset);
        for (int i = lane; i < scalesPerRow; i += 32) scales[i] = p.xScales[static_cast<int64_t>(t) * scalesPerRow + i];
      }
      int64_t* idx = reinterpret_cast<int64_t*>(row + p.rowIdxOffset);
      float* weights = reinterpret_cast<float*>(row + p.rowWeightsOffset);
      for (int k = lane; k < p.topk; k += 32) {
        idx[k] = p.handleIdx[static_cast<int64_t>(t) * p.topk + k];
        weights[k] = p.topkWeights != nullptr ? p.topkWeights[static_cast<int64_t>(t) * p.topk + k] : 0.0f;
      }
      if (lane == 0) *reinterpret_cast<int*>(row + p.rowSrcOffset) = t;
    }
  }
}

__global__ void dispatchReceiveKernel(IntranodeParams p) {
  __shared__ int prefix[kIntranodeMaxRanks + 1];
  waitAll(p, kChannelDispatch, 0, p.sequence);
  const int localExperts = p.numExperts / p.numRanks;
  if (threadIdx.x == 0) {
    prefix[0] = 0;
    for (int s = 0; s < p.numRanks; ++s) prefix[s + 1] = prefix[s] + countsAt(p, p.rank, kChannelDispatch, s)[0];
  }
  __syncthreads();
  const int total = prefix[p.numRanks];
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) {
      *p.numRecv = total;
      if (p.outNumRecv != nullptr) *p.outNumRecv = total;
      if (total > p.recvCapacity) raiseError(p, kErrorInvalidArgument);
    }
    for (int le = threadIdx.x; le < localExperts && p.outPerExpert != nullptr; le += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < p.numRanks; ++s) sum += countsAt(p, p.rank, kChannelDispatch, s)[1 + le];
      p.outPerExpert[le] = (sum + p.alignment - 1) / p.alignment * p.alignment;
    }
  }
  const int rows = total < p.recvCapacity ? total : p.recvCapacity;
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int scalesPerRow = p.hidden / 128;
  const int lane = threadIdx.x & 31;
  const int64_t firstLocal = static_cast<int64_t>(p.rank) * localExperts;
  for (int i = blockIdx.x * kWarps + (threadIdx.x >> 5); i < rows; i += gridDim.x * kWarps) {
    int s = 0;
    while (i >= prefix[s + 1]) ++s;
    const int pos = i - prefix[s];
    const uint8_t* row =
        p.peers[p.rank] + p.dispatchOffset + (static_cast<uint64_t>(s) * p.maxTokens + pos) * p.dispatchRowBytes;
    warpCopy(static_cast<uint8_t*>(p.recvX) + i * xBytes, row, xBytes);
    if (p.xIsFp8 && p.recvXScales != nullptr) {
      const float* scales = reinterpret_cast<const float*>(row + p.rowScalesOffset);
      for (int j = lane; j < scalesPerRow; j += 32) p.recvXScales[static_cast<int64_t>(i) * scalesPerRow + j] = scales[j];
    }
    const int64_t* idx = reinterpret_cast<const int64_t*>(row + p.rowIdxOffset);
    const float* weights = reinterpret_cast<const float*>(row + p.rowWeightsOffset);
    for (int k = lane; k < p.topk; k += 32) {
      const int64_t e = idx[k];
      const bool local = e >= firstLocal && e < firstLocal + localExperts;
      const int64_t out = static_cast<int64_t>(i) * p.topk + k;
      if (p.recvTopkIdx != nullptr) {
        const int64_t id = local ? e - firstLocal : -1;
        if (p.topkIdxIs64) {
          static_cast<int64_t*>(p.recvTopkIdx)[out] = id;
        } else {
          static_cast<int32_t*>(p.recvTopkIdx)[out] = static_cast<int32_t>(id);
        }
      }
      if (p.recvTopkWeights != nullptr) p.recvTopkWeights[out] = local ? weights[k] : 0.0f;
    }
    if (lane == 0) {
      p.srcRank[i] = s;
      p.srcIndex[i] = *reinterpret_cast<const int*>(row + p.rowSrcOffset);
    }
  }
}

// ---- Combine ---------------------------------------------------------------------------

__global__ void combineSendKernel(IntranodeParams p) {
  waitAll(p, kChannelCombine, 1, p.sequence - 1);
  const int rows = *p.numRecv < p.recvCapacity ? *p.numRecv : p.recvCapacity;
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * 2;
  const int lane = threadIdx.x & 31;
  for (int i = blockIdx.x * kWarps + (threadIdx.x >> 5); i < rows; i += gridDim.x * kWarps) {
    const int s = p.srcRank[i];
    const int j = p.srcIndex[i];
    uint8_t* row =
        p.peers[s] + p.combineOffset + (static_cast<uint64_t>(p.rank) * p.maxTokens + j) * p.combineRowBytes;
    warpCopy(row, static_cast<const uint8_t*>(p.combineX) + i * xBytes, xBytes);
    if (p.combineWeights != nullptr) {
      float* weights = reinterpret_cast<float*>(row + xBytes);
      for (int k = lane; k < p.topk; k += 32) weights[k] = p.combineWeights[static_cast<int64_t>(i) * p.topk + k];
    }
  }
}

// Sums one token's rows 16 bytes (8 BF16 channels) at a time: a warp per token, each lane a
// run of 16-byte chunks. The per-element arithmetic and its order (ranks ascending from
// +0.0f, then bias) are exactly those of the scalar path, so results are bitwise equal.
__device__ void combineTokenVectorized(const IntranodeParams& p, const uint8_t* staging, int64_t t, int lane) {
  const int chunks = p.hidden / 8;
  const uint4* bias = static_cast<const uint4*>(p.bias);
  uint4* out = static_cast<uint4*>(p.combinedX);
  for (int c = lane; c < chunks; c += 32) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int r = 0; r < p.numRanks; ++r) {
      if (p.pos[t * p.numRanks + r] < 0) continue;
      const uint4 packed = reinterpret_cast<const uint4*>(
          staging + (static_cast<uint64_t>(r) * p.maxTokens + t) * p.combineRowBytes)[c];
      const uint16_t* values = reinterpret_cast<const uint16_t*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], bf16ToFloat(values[i]));
    }
    if (bias != nullptr) {
      const uint4 packed = bias[t * chunks + c];
      const uint16_t* values = reinterpret_cast<const uint16_t*>(&packed);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], bf16ToFloat(values[i]));
    }
    uint4 result;
    uint16_t* rounded = reinterpret_cast<uint16_t*>(&result);
#pragma unroll
    for (int i = 0; i < 8; ++i) rounded[i] = floatToBf16(acc[i]);
    out[t * chunks + c] = result;
  }
}

__global__ void combineReceiveKernel(IntranodeParams p) {
  waitAll(p, kChannelCombine, 0, p.sequence);
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * 2;
  const uint8_t* staging = p.peers[p.rank] + p.combineOffset;
  const int64_t elements = static_cast<int64_t>(p.numTokens) * p.hidden;
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  uint16_t* out = static_cast<uint16_t*>(p.combinedX);
  const bool aligned = (reinterpret_cast<uintptr_t>(p.combinedX) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(p.bias) % 16 == 0) && (p.combineRowBytes % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(staging) % 16 == 0) && (p.hidden % 8 == 0);
  const int lane = threadIdx.x & 31;
  const int64_t firstToken = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  const int64_t tokenStride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = firstToken; aligned && t < p.numTokens; t += tokenStride) {
    combineTokenVectorized(p, staging, t, lane);
  }
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; !aligned && e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / p.hidden;
    const int64_t h = e % p.hidden;
    float acc = 0.0f;
    for (int r = 0; r < p.numRanks; ++r) {
      if (p.pos[t * p.numRanks + r] < 0) continue;
      const uint16_t* row = reinterpret_cast<const uint16_t*>(
          staging + (static_cast<uint64_t>(r) * p.maxTokens + t) * p.combineRowBytes);
      acc = __fadd_rn(acc, bf16ToFloat(row[h]));
    }
    if (bias != nullptr) acc = __fadd_rn(acc, bf16ToFloat(bias[e]));
    out[e] = floatToBf16(acc);
  }
  if (p.combinedWeights == nullptr) return;
  const int64_t entries = static_cast<int64_t>(p.numTokens) * p.topk;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < entries;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / p.topk;
    const int64_t k = e % p.topk;
    float acc = 0.0f;
    for (int r = 0; r < p.numRanks; ++r) {
      if (p.pos[t * p.numRanks + r] < 0) continue;
      const float* weights = reinterpret_cast<const float*>(
          staging + (static_cast<uint64_t>(r) * p.maxTokens + t) * p.combineRowBytes + xBytes);
      acc = __fadd_rn(acc, weights[k]);
    }
    p.combinedWeights[e] = acc;
  }
}

int signal(const IntranodeParams& p, int channel, int kind, cudaStream_t s) {
  signalKernel<<<1, 32, 0, s>>>(p, channel, kind);
  return cudaGetLastError();
}

int gridOf(const IntranodeParams& p) { return p.numBlocks > 0 ? p.numBlocks : 1; }

int route(const IntranodeParams& p, cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(p.expertCount, 0, sizeof(int) * p.numExperts, s);
  if (err != cudaSuccess) return err;
  routeKernel<<<p.numRanks, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

int launchIntranodeNotify(const IntranodeParams& params, CUstream_st* stream) {
  cudaStream_t s = stream;
  int err = route(params, s);
  if (err != 0) return err;
  notifySendKernel<<<1, kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  if ((err = signal(params, kChannelNotify, 0, s)) != 0) return err;
  notifyReceiveKernel<<<1, kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  return signal(params, kChannelNotify, 1, s);
}

int launchIntranodeDispatch(const IntranodeParams& params, CUstream_st* stream) {
  cudaStream_t s = stream;
  int err = 0;
  if (params.route && (err = route(params, s)) != 0) return err;
  dispatchSendKernel<<<gridOf(params), kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  if ((err = signal(params, kChannelDispatch, 0, s)) != 0) return err;
  dispatchReceiveKernel<<<gridOf(params), kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  return signal(params, kChannelDispatch, 1, s);
}

int launchIntranodeCombine(const IntranodeParams& params, CUstream_st* stream) {
  cudaStream_t s = stream;
  int err = 0;
  combineSendKernel<<<gridOf(params), kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  if ((err = signal(params, kChannelCombine, 0, s)) != 0) return err;
  combineReceiveKernel<<<gridOf(params), kThreads, 0, s>>>(params);
  if ((err = cudaGetLastError()) != 0) return err;
  return signal(params, kChannelCombine, 1, s);
}

}  // namespace device
}  // namespace moecomm
