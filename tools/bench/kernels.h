// The bench's own GPU kernels: the NCCL baseline's layout, permute and unpermute-sum (what a
// user without an EP library writes), and the combine-input generator. Host launchers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moecomm_bench {

constexpr int kMaxBenchRanks = 64;

// Row offsets per rank (an exclusive prefix of counts), passed by value to the kernels.
struct RankOffsets {
  int64_t rows[kMaxBenchRanks];
};

// For every destination rank r: position[t * R + r] = index of token t among this rank's
// tokens bound for r (token order kept), or -1; counts[r] = how many. One token goes once per
// destination rank.
void LaunchRouteLayout(const int64_t* topkIdx, int tokens, int topk, int expertsPerRank, int nranks, int* position,
                       int* counts, cudaStream_t stream);

// sendRows[sendOffsets[r] + position[t,r]] = packed row of token t (x row, then scales row
// when scaleBytesPerRow > 0).
void LaunchPermuteRows(const uint8_t* x, int xBytesPerRow, const float* scales, int scaleBytesPerRow, int tokens,
                       int nranks, const int* position, RankOffsets sendOffsets, uint8_t* sendRows,
                       cudaStream_t stream);

// out[t][h] = bf16(sum over r ascending with position[t,r] >= 0 of float(back[sendOffsets[r]
// + position[t,r]][h])), FP32 accumulation.
void LaunchUnpermuteSum(const uint16_t* back, int tokens, int hidden, int nranks, const int* position,
                        RankOffsets sendOffsets, uint16_t* out, cudaStream_t stream);

// out[row] = bf16(dequantised packed row * (rank + 1)), as ExpertOutputRow on the host.
void LaunchExpertOutputs(const uint8_t* packedRows, int64_t rows, bool fp8, int hidden, int rank, uint16_t* out,
                         cudaStream_t stream);

// A kernel that does nothing: the fixed cost of one launch in a timed sample.
void LaunchEmpty(int blocks, int threads, cudaStream_t stream);

// Holds the stream until *release != 0 (mapped host memory), or 2 s at most: work queued
// behind it then starts back to back, so events around it time the GPU work alone.
void LaunchGate(const volatile int* release, cudaStream_t stream);

}  // namespace moecomm_bench
