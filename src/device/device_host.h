// Plain-data parameter structs shared by the host launchers and the CUDA kernels. Kernels
// never see C++ objects from the rest of the library, only these.
#pragma once

#include <cstdint>

namespace moecomm {
namespace device {

struct LayoutParams {
  const void* topkIdx;  // [numTokens, topk] int32 or int64
  int topkIdxIs64;      // 1: int64, 0: int32
  int numTokens;
  int topk;
  int numExperts;
  int numRanks;
  int* tokensPerRank;      // [numRanks] or nullptr
  int* tokensPerExpert;    // [numExperts] or nullptr
  uint8_t* isTokenInRank;  // [numTokens, numRanks] or nullptr
  // Device int, 0 on entry: set to 1 + (t * topk + k) of the first entry found outside
  // [-1, numExperts); the host reads it to report the bad id.
  int* badEntry;
};

// Intranode normal-mode EP (intranode.cu). One struct for every kernel of the family; the
// fields a kernel does not use are ignored. Symmetric buffer regions (offsets from each
// rank's base): flags uint64 [3 channels][2: data flag, ack][R]; counts int [2 channels:
// notify, dispatch][R source][1 + E/R]; dispatch staging [R source][maxT] rows of
// dispatchRowBytes; combine staging [R receiver][maxT] rows of combineRowBytes.
constexpr int kIntranodeMaxRanks = 8;
constexpr int kChannelNotify = 0;
constexpr int kChannelDispatch = 1;
constexpr int kChannelCombine = 2;

struct IntranodeParams {
  uint8_t* peers[kIntranodeMaxRanks];  // every rank's symmetric buffer, as this rank maps it
  int rank;
  int numRanks;
  int numExperts;
  int hidden;
  int topk;
  int maxTokens;
  int numBlocks;  // grid size of the data kernels (the SM budget)
  uint64_t flagsOffset;
  uint64_t countsOffset;
  uint64_t dispatchOffset;
  uint64_t dispatchRowBytes;
  uint64_t combineOffset;
  uint64_t combineRowBytes;
  // Offsets inside a dispatch row.
  uint64_t rowScalesOffset;
  uint64_t rowIdxOffset;
  uint64_t rowWeightsOffset;
  uint64_t rowSrcOffset;
  uint64_t sequence;   // this call's sequence number on its channel (from 1)
  uint64_t timeoutNs;  // bound of every spin-wait
  int* error;          // mapped host int: first error code (moecommResult_t) of any kernel

  // The handle's device routing.
  int* pos;            // [maxT, R]: row of token t in rank r's staging, -1 if not sent
  int* sendCount;      // [R]
  int* expertCount;    // [E]: this rank's selections per expert
  int64_t* handleIdx;  // [maxT, K] normalized expert ids (-1: none)
  int* srcRank;        // [R * maxT]
  int* srcIndex;       // [R * maxT]
  int* numRecv;        // [1]
  int* notifyOut;      // notify: [1 + E/R] N and raw per-local-expert sums (mapped host)

  // Dispatch call.
  int numTokens;
  int xIsFp8;
  const void* x;
  const float* xScales;
  const void* topkIdx;
  int topkIdxIs64;
  const float* topkWeights;
  int alignment;
  int recvCapacity;
  void* recvX;
  float* recvXScales;
  void* recvTopkIdx;
  float* recvTopkWeights;
  int* outNumRecv;
  int* outPerExpert;
  int route;  // 1: compute the routing from topkIdx first

  // Combine call.
  const void* combineX;
  const float* combineWeights;
  const void* bias;
  void* combinedX;
  float* combinedWeights;
};

}  // namespace device
}  // namespace moecomm
