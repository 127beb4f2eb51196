// Device helpers shared by every kernel family.
#pragma once

#include <cstdint>

namespace moecomm {
namespace device {

__device__ __forceinline__ int64_t loadExpertId(const void* topkIdx, int topkIdxIs64, int64_t index) {
  return topkIdxIs64 ? static_cast<const int64_t*>(topkIdx)[index]
                     : static_cast<int64_t>(static_cast<const int32_t*>(topkIdx)[index]);
}

}  // namespace device
}  // namespace moecomm
