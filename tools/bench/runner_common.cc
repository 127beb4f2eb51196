#include <chrono>
#include <cstdio>
#include <map>

#include "moecomm_runner.h"

namespace moecomm_bench {

moecommEpConfig_t MakeEpConfig(const RunnerContext& context, moecommEpMode_t mode) {
  const Options& options = *context.options;
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = options.experts;
  config.hidden = options.hidden;
  config.maxTokensPerRank = options.tokens;
  config.topk = options.topk;
  config.mode = mode;
  config.numSms = options.smBudget;
  return config;
}

Measurement NewMeasurement(const std::string& op, const std::string& mode) {
  Measurement measurement;
  measurement.impl = "libmoecomm";
  measurement.op = op;
  measurement.mode = mode;
  measurement.status = "ok";
  measurement.check = "off";
  return measurement;
}

void ReportNotSupported(const RunnerContext& context, const std::string& op, const std::string& mode,
                        const std::string& why) {
  if (context.rank == 0)
    std::printf("libmoecomm: %s not supported on this backend yet (%s)\n", op.c_str(), why.c_str());
  Measurement measurement = NewMeasurement(op, mode);
  measurement.status = "not_supported";
  measurement.message = why;
  context.reporter->Add(measurement);
}

namespace {
// Host time inside the call of every gated sample, by the sample vector it went into.
std::map<const std::vector<double>*, std::vector<double>>& HostCallUs() {
  static std::map<const std::vector<double>*, std::vector<double>> samples;
  return samples;
}
}  // namespace

void SetKernelTime(const RunnerContext& context, Measurement* measurement, const std::vector<double>* gatedUs) {
  auto host = HostCallUs().find(gatedUs);
  if (host != HostCallUs().end()) {
    measurement->hasHost = context.platform->OnGpu();  // (the host backend's call is the whole sample)
    measurement->host = Summarize(host->second);
    HostCallUs().erase(host);
  }
  measurement->hasKernel = true;
  measurement->kernel = measurement->whole;
  if (gatedUs != nullptr && !gatedUs->empty() && context.platform->OnGpu()) {
    measurement->kernel = Summarize(*gatedUs);
    measurement->kernelMethod =
        "caller-stream events with the stream held by a gate kernel until the call returned: GPU time of the "
        "call's work alone, host time to issue it excluded (separate samples from whole-call)";
    return;
  }
  if (context.platform->OnGpu()) {
    // Once the library runs its kernels on an internal stream (with event hand-off), the
    // kernel-only time will come from events around those kernels, through a query the
    // library will expose; until then it is the caller-stream time, and says so.
    measurement->kernelMethod = "same as whole-call (caller-stream events); no kernel-time query in the library yet";
  } else {
    measurement->kernelMethod = "same as whole-call (host clock; the host backend runs synchronously)";
  }
}

moecommResult_t TimeSample(Platform& platform, bool gated, std::vector<double>* out,
                           const std::function<moecommResult_t()>& call) {
  platform.PrepareSample();
  platform.BeginSample(gated);
  const auto start = std::chrono::steady_clock::now();
  const moecommResult_t result = call();
  const double hostUs = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  out->push_back(platform.EndSample());
  // With the stream held by the gate the call's host time is not mixed with GPU time.
  if (gated) HostCallUs()[out].push_back(hostUs);
  return result;
}

}  // namespace moecomm_bench
