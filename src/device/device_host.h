// Plain-data parameter structs shared by the host launchers and the CUDA kernels. Kernels
// never see C++ objects from the rest of the library, only these.
#pragma once

#include <cstdint>

namespace moecomm {
namespace device {

struct LayoutParams {
  const void* topkIdx;      // [numTokens, topk] int32 or int64
  int topkIdxIs64;          // 1: int64, 0: int32
  int numTokens;
  int topk;
  int numExperts;
  int numRanks;
  int* tokensPerRank;       // [numRanks] or nullptr
  int* tokensPerExpert;     // [numExperts] or nullptr
  uint8_t* isTokenInRank;   // [numTokens, numRanks] or nullptr
  // Device int, 0 on entry: set to 1 + (t * topk + k) of the first entry found outside
  // [-1, numExperts); the host reads it to report the bad id.
  int* badEntry;
};

}  // namespace device
}  // namespace moecomm
