// EpGetLayout on the GPU: per-rank and per-expert token counts and the token-to-rank map.
// Counts are accumulated per block in shared memory and added to global memory once per
// block, so global atomics scale with blocks, not with tokens.
#include <cuda_runtime.h>

#include "device/api.h"
#include "device/common.cuh"

namespace moecomm {
namespace device {
namespace {

constexpr int kThreads = 256;

__global__ void layoutKernel(LayoutParams p) {
  extern __shared__ int sharedCounts[];  // [numExperts] then [numRanks]
  int* expertCounts = sharedCounts;
  int* rankCounts = sharedCounts + p.numExperts;
  for (int i = threadIdx.x; i < p.numExperts + p.numRanks; i += blockDim.x) sharedCounts[i] = 0;
  __syncthreads();

  const int expertsPerRank = p.numExperts / p.numRanks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < p.numTokens; t += gridDim.x * blockDim.x) {
    const int64_t row = static_cast<int64_t>(t) * p.topk;
    uint64_t ranksSeen = 0;  // up to 64 ranks: the ranks this token's earlier entries go to
    for (int k0 = 0; k0 < p.topk; k0 += kIdGroup) {
      int64_t ids[kIdGroup];
      loadIdGroup(ids, k0, p.topk, [&](int k) { return loadExpertId(p.topkIdx, p.topkIdxIs64, row + k); });
#pragma unroll
      for (int u = 0; u < kIdGroup; ++u) {
        const int k = k0 + u;
        const int64_t expert = ids[u];
        if (k >= p.topk || expert == -1) continue;
        if (expert < -1 || expert >= p.numExperts) {
          atomicCAS(p.badEntry, 0, static_cast<int>(row + k) + 1);
          continue;
        }
        atomicAdd(&expertCounts[expert], 1);
        const int rank = static_cast<int>(expert / expertsPerRank);
        // A token goes to a rank once, however many of its experts live there.
        bool seen = false;
        if (p.numRanks <= 64) {
          seen = ((ranksSeen >> rank) & 1) != 0;
          ranksSeen |= 1ull << rank;
        } else {
          for (int j = 0; j < k && !seen; ++j) {
            const int64_t other = loadExpertId(p.topkIdx, p.topkIdxIs64, row + j);
            seen = other >= 0 && other < p.numExperts && other / expertsPerRank == rank;
          }
        }
        if (!seen) {
          atomicAdd(&rankCounts[rank], 1);
          if (p.isTokenInRank) p.isTokenInRank[static_cast<int64_t>(t) * p.numRanks + rank] = 1;
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.numExperts; e += blockDim.x) {
    if (p.tokensPerExpert && expertCounts[e]) atomicAdd(&p.tokensPerExpert[e], expertCounts[e]);
  }
  for (int r = threadIdx.x; r < p.numRanks; r += blockDim.x) {
    if (p.tokensPerRank && rankCounts[r]) atomicAdd(&p.tokensPerRank[r], rankCounts[r]);
  }
}

}  // namespace

int launchLayout(const LayoutParams& params, CUstream_st* stream) {
  cudaStream_t s = stream;
  cudaError_t err = cudaSuccess;
  if (params.tokensPerRank) err = cudaMemsetAsync(params.tokensPerRank, 0, sizeof(int) * params.numRanks, s);
  if (err == cudaSuccess && params.tokensPerExpert) {
    err = cudaMemsetAsync(params.tokensPerExpert, 0, sizeof(int) * params.numExperts, s);
  }
  if (err == cudaSuccess && params.isTokenInRank && params.numTokens > 0) {
    err = cudaMemsetAsync(params.isTokenInRank, 0, static_cast<size_t>(params.numTokens) * params.numRanks, s);
  }
  if (err != cudaSuccess) return err;
  const size_t shared = sizeof(int) * (params.numExperts + params.numRanks);
  if (shared > 48 * 1024) {
    err = cudaFuncSetAttribute(layoutKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  int blocks = (params.numTokens + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > 1024) blocks = 1024;
  layoutKernel<<<blocks, kThreads, shared, s>>>(params);
  return cudaGetLastError();
}

}  // namespace device
}  // namespace moecomm
