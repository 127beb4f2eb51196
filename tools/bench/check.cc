#include "check.h"

#include <cstdio>

#include "numeric.h"

namespace moecomm_bench {
namespace {
constexpr int kShownMismatches = 3;
}

bool CompareRows(const std::vector<uint8_t>& got, const std::vector<uint8_t>& expected, int64_t rows, size_t rowBytes,
                 const std::string& what, std::string* message) {
  int64_t mismatches = 0;
  std::string shown;
  const size_t total = static_cast<size_t>(rows) * rowBytes;
  for (size_t i = 0; i < total; ++i) {
    if (got[i] == expected[i]) continue;
    if (mismatches++ < kShownMismatches) {
      char text[96];
      std::snprintf(text, sizeof(text), " [row %zu byte %zu: got 0x%02x want 0x%02x]", i / rowBytes, i % rowBytes,
                    got[i], expected[i]);
      shown += text;
    }
  }
  if (mismatches == 0) return true;
  *message = what + ": " + std::to_string(mismatches) + " of " + std::to_string(total) + " bytes differ" + shown;
  return false;
}

bool CompareBf16(const std::vector<uint16_t>& got, const std::vector<uint16_t>& expected, int hidden,
                 const std::string& what, std::string* message) {
  int64_t mismatches = 0;
  std::string shown;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (got[i] == expected[i]) continue;
    if (mismatches++ < kShownMismatches) {
      char text[128];
      std::snprintf(text, sizeof(text), " [token %zu channel %zu: got %g want %g]", i / hidden, i % hidden,
                    Bf16ToFloat(got[i]), Bf16ToFloat(expected[i]));
      shown += text;
    }
  }
  if (mismatches == 0) return true;
  *message =
      what + ": " + std::to_string(mismatches) + " of " + std::to_string(expected.size()) + " values differ" + shown;
  return false;
}

}  // namespace moecomm_bench
