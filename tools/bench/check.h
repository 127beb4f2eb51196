// Element-by-element comparison of what a run produced with the host reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moecomm_bench {

// Compares rows x rowBytes bytes; on a difference, *message names the first few (row, byte).
bool CompareRows(const std::vector<uint8_t>& got, const std::vector<uint8_t>& expected, int64_t rows, size_t rowBytes,
                 const std::string& what, std::string* message);

// Compares BF16 [rows, hidden] bit for bit; on a difference, *message names the first few.
bool CompareBf16(const std::vector<uint16_t>& got, const std::vector<uint16_t>& expected, int hidden,
                 const std::string& what, std::string* message);

}  // namespace moecomm_bench
