// Rounding sizes and offsets up to a multiple (buffer layouts, allocation granularity).
#pragma once

#include <cstdint>

#include "core/host_device.h"

namespace moecomm {

// value rounded up to a multiple of `multiple` (> 0). Host and device code.
MC_HOST_DEVICE constexpr uint64_t roundUp(uint64_t value, uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace moecomm
