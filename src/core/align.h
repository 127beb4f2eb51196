// Rounding sizes and offsets up to a multiple (buffer layouts, allocation granularity).
#pragma once

#include <cstdint>

namespace moecomm {

// value rounded up to a multiple of `multiple` (> 0).
constexpr uint64_t roundUp(uint64_t value, uint64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace moecomm
