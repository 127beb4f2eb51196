// Small helpers shared by the developer micro-benchmarks (moecomm-copybench,
// moecomm-linkbench): a CUDA check that stops the tool, a median, an integer flag.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// Stops the tool named kToolName (defined by the including file) on a failed CUDA call.
#define DEV_CHECK(call)                                                                                            \
  do {                                                                                                             \
    const cudaError_t err_ = (call);                                                                               \
    if (err_ != cudaSuccess) {                                                                                     \
      std::fprintf(stderr, "%s: %s failed: %s (line %d)\n", kToolName, #call, cudaGetErrorString(err_), __LINE__); \
      std::exit(1);                                                                                                \
    }                                                                                                              \
  } while (0)

namespace moecomm_dev {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// The integer after `name` on the command line, or `fallback`.
inline int argInt(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  }
  return fallback;
}

}  // namespace moecomm_dev
