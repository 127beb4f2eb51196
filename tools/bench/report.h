// Results: one JSON object per measurement (appended to the -J file by every rank) and a
// plain table on stdout (rank 0), headed by the bandwidth definition.
#pragma once

#include <cstdint>
#include <string>

#include "options.h"
#include "timing.h"

namespace moecomm_bench {

struct RunInfo {
  std::string date;  // ISO 8601 UTC
  std::string host;
  std::string gpuName;  // "" on the host backend
  int gpuCount = 0;
  int rank = 0;
  int nranks = 1;
  std::string libraryVersion;
  std::string commit;   // env MOECOMM_BENCH_COMMIT
  std::string build;    // env MOECOMM_BENCH_BUILD: how the library was built, when not the default
  std::string backend;  // "cuda" or "host"
  bool ncclBuilt = false;
  double rooflineGbps = -1.0;  // < 0: not measured
  double linkOneWayGbps = -1.0;
  std::string rooflineNote;
};

struct Measurement {
  std::string impl;    // "libmoecomm" or "nccl"
  std::string op;      // dispatch, dispatch_cached, combine, ll_dispatch, ll_combine, ll_graph
  std::string status;  // ok | not_supported | skipped | failed
  std::string message;
  std::string mode = "normal";  // normal | low_latency
  Stats whole;                  // whole-call time
  bool hasKernel = false;
  Stats kernel;              // kernel-only time
  std::string kernelMethod;  // how "kernel" was taken
  bool hasHost = false;
  Stats host;         // host time inside the API call, taken in the kernel-only samples
  int64_t bytes = 0;  // per DESIGN.md "How to count bandwidth"
  std::string bytesRule;
  double baselineUs = -1.0;   // NCCL median of the comparable op (< 0: none)
  std::string check = "off";  // passed | failed | off | not implemented
};

class Reporter {
 public:
  Reporter(const Options& options, const RunInfo& info);
  void PrintHeader() const;
  void Add(const Measurement& measurement);
  RunInfo& info() { return info_; }

 private:
  std::string JsonLine(const Measurement& measurement) const;
  const Options& options_;
  RunInfo info_;
};

}  // namespace moecomm_bench
