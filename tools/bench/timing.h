// Summaries of timed samples (microseconds).
#pragma once

#include <vector>

namespace moecomm_bench {

struct Stats {
  int samples = 0;
  double median = 0.0;
  double p10 = 0.0;
  double p90 = 0.0;
};

// Percentiles by nearest rank on the sorted samples; an empty input gives samples == 0.
Stats Summarize(std::vector<double> microseconds);

}  // namespace moecomm_bench
