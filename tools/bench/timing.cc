#include "timing.h"

#include <algorithm>
#include <cmath>

namespace moecomm_bench {

Stats Summarize(std::vector<double> microseconds) {
  Stats stats;
  stats.samples = static_cast<int>(microseconds.size());
  if (microseconds.empty()) return stats;
  std::sort(microseconds.begin(), microseconds.end());
  auto at = [&](double fraction) {
    const double index = std::round(fraction * static_cast<double>(microseconds.size() - 1));
    return microseconds[static_cast<size_t>(index)];
  };
  stats.p10 = at(0.1);
  stats.p90 = at(0.9);
  const size_t n = microseconds.size();
  stats.median = n % 2 == 1 ? microseconds[n / 2] : 0.5 * (microseconds[n / 2 - 1] + microseconds[n / 2]);
  return stats;
}

}  // namespace moecomm_bench
