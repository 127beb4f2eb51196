// The libmoecomm measurement: the same harness as the baseline, calling the public EP API.
// A call that returns moecommNotSupported is reported as such ("status":"not_supported"),
// never with a number.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "moecomm.h"
#include "platform.h"
#include "report.h"

namespace moecomm_bench {

// NCCL medians of the comparable operations (< 0: no baseline), for "vs NCCL".
struct BaselineTimes {
  double dispatchUs = -1.0;
  double combineUs = -1.0;
};

// What every libmoecomm measurement shares: where it runs and how it reports.
struct RunnerContext {
  moecommComm_t comm = nullptr;
  Platform* platform = nullptr;
  const Options* options = nullptr;
  Reporter* reporter = nullptr;
  int rank = 0;
  int nranks = 1;
  BaselineTimes baseline;
};

// Normal mode: dispatch (worst-case sizing, a fresh handle each call), dispatch_cached (the
// handle reused), combine. Returns false when a check failed.
bool RunLibmoecommNormal(const RunnerContext& context);
// Low-latency mode: ll_dispatch, ll_combine, and with --graph ll_graph (dispatch+combine
// captured in a CUDA graph, replays timed).
bool RunLibmoecommLowLatency(const RunnerContext& context);

// Shared by both runners.
moecommEpConfig_t MakeEpConfig(const RunnerContext& context, moecommEpMode_t mode);
Measurement NewMeasurement(const std::string& op, const std::string& mode);
// Prints "libmoecomm: <op> not supported on this backend yet (<why>)" and reports it; why is
// "<call>: <moecommGetLastError text>", captured right after the call.
void ReportNotSupported(const RunnerContext& context, const std::string& op, const std::string& mode,
                        const std::string& why);
// Kernel-only time: from gated samples (Platform::BeginSample(true)) when given, else the
// whole-call time, and kernelMethod says which.
void SetKernelTime(const RunnerContext& context, Measurement* measurement,
                   const std::vector<double>* gatedUs = nullptr);
// One timed sample: PrepareSample, BeginSample(gated), call, EndSample; the microseconds go
// to *out and the call's result is returned.
moecommResult_t TimeSample(Platform& platform, bool gated, std::vector<double>* out,
                           const std::function<moecommResult_t()>& call);

}  // namespace moecomm_bench
