// moecomm-bench: MoE dispatch/combine bandwidth of libmoecomm against an NCCL baseline and
// the measured link roofline, on the reference workloads of DESIGN.md. docs/bench.md.
//
//   moecomm-run -n 8 moecomm-bench -w W-prefill --dtype fp8 -S 24 -J out.jsonl
//   moecomm-run -n 2 moecomm-bench --host-smoke -J smoke.jsonl      (no GPU: host backend)
//   moecomm-run -n 2 moecomm-bench --host -w W-decode --ll          (no GPU: a workload on the host backend)
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>

#include "common.h"
#include "moecomm_runner.h"
#include "options.h"
#include "platform.h"
#include "report.h"
#if BENCH_HAVE_CUDA
#include "cuda_check.h"
#endif
#if BENCH_HAVE_NCCL
#include "nccl_baseline.h"
#include "nccl_context.h"
#include "roofline.h"
#endif

namespace moecomm_bench {
namespace {

int EnvInt(const char* name, int fallback) {
  const char* text = std::getenv(name);
  return text != nullptr && *text != '\0' ? std::atoi(text) : fallback;
}

RunInfo BaseRunInfo(moecommComm_t comm, bool onGpu) {
  RunInfo info;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &utc);
  info.date = date;
  char host[256] = "unknown";
  gethostname(host, sizeof(host) - 1);
  info.host = host;
  BENCH_MOECOMM(moecommCommUserRank(comm, &info.rank));
  BENCH_MOECOMM(moecommCommCount(comm, &info.nranks));
  int version = 0;
  BENCH_MOECOMM(moecommGetVersion(&version));
  info.libraryVersion =
      std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." + std::to_string(version % 100);
  if (const char* commit = std::getenv("MOECOMM_BENCH_COMMIT")) info.commit = commit;
  if (const char* build = std::getenv("MOECOMM_BENCH_BUILD")) info.build = build;
  info.backend = onGpu ? "cuda" : "host";
  info.rooflineNote = onGpu ? "--no-roofline" : "host backend";
#if BENCH_HAVE_CUDA
  if (onGpu) {
    int device = 0;
    BENCH_CUDA(cudaGetDevice(&device));
    cudaDeviceProp properties{};
    BENCH_CUDA(cudaGetDeviceProperties(&properties, device));
    info.gpuName = properties.name;
    BENCH_CUDA(cudaGetDeviceCount(&info.gpuCount));
  }
#endif
#if BENCH_HAVE_NCCL
  info.ncclBuilt = true;
#endif
  return info;
}

void ReportSkippedBaseline(Reporter& reporter, const std::string& why) {
  for (const char* op : {"dispatch", "combine"}) {
    Measurement measurement;
    measurement.impl = "nccl";
    measurement.op = op;
    measurement.mode = "normal";
    measurement.status = "skipped";
    measurement.message = why;
    reporter.Add(measurement);
  }
}

int Run(const Options& parsed) {
  Options options = parsed;
  [[maybe_unused]] const int localRank = EnvInt("MOECOMM_LOCAL_RANK", 0);
  SetRankForMessages(EnvInt("MOECOMM_RANK", 0));
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  const bool onGpu = !options.hostSmoke && !options.host;
  if (onGpu) {
#if BENCH_HAVE_CUDA
    SetStep("select GPU MOECOMM_LOCAL_RANK=" + std::to_string(localRank));
    int devices = 0;
    const cudaError_t counted = cudaGetDeviceCount(&devices);
    if (counted != cudaSuccess || devices == 0) {
      BENCH_FAIL("the GPU bench", std::string("no usable CUDA device (") +
                                      (counted != cudaSuccess ? cudaGetErrorString(counted) : "0 devices") +
                                      "); --host runs the workload on the host backend");
    }
    BENCH_CUDA(cudaSetDevice(localRank));
    config.backend = moecommBackendCuda;
    config.device = localRank;
#else
    BENCH_FAIL("the GPU bench", "this moecomm-bench was built without CUDA; use --host or --host-smoke");
#endif
  } else {
    config.backend = moecommBackendHost;
  }
  SetStep("moecommCommInitFromEnv");
  moecommComm_t comm = nullptr;
  const moecommResult_t initResult = moecommCommInitFromEnv(&comm, &config);
  if (initResult != moecommSuccess) {
    BENCH_FAIL("moecommCommInitFromEnv", std::string(moecommGetErrorString(initResult)) + ": " +
                                             moecommGetLastError(nullptr) + " (start it with moecomm-run -n N)");
  }
  std::unique_ptr<moecommComm, decltype(&moecommCommDestroy)> commGuard(comm, &moecommCommDestroy);
  RunInfo info = BaseRunInfo(comm, onGpu);
  SetRankForMessages(info.rank);
  ResolveWorkload(info.nranks, &options);

  std::unique_ptr<Platform> platform;
#if BENCH_HAVE_CUDA
  if (onGpu) platform = MakeGpuPlatform(localRank);
#endif
  if (!platform) platform = MakeHostPlatform();
  platform->SetFlushL2(options.flushL2);

  RunnerContext context;
  context.comm = comm;
  context.platform = platform.get();
  context.rank = info.rank;
  context.nranks = info.nranks;
  bool ok = true;

#if BENCH_HAVE_NCCL
  std::unique_ptr<NcclContext> nccl;
  if (onGpu) {
    nccl = NcclContext::Create(info.rank, info.nranks, static_cast<cudaStream_t>(platform->Stream()));
    platform->SetBarrier([&nccl] { nccl->StreamBarrier(); });
    if (options.roofline) {
      const Roofline roofline =
          MeasureRoofline(*nccl, info.rank, info.nranks, localRank, static_cast<cudaStream_t>(platform->Stream()));
      info.rooflineGbps = roofline.rooflineGbps;
      info.linkOneWayGbps = roofline.oneWayGbps;
      info.rooflineNote = roofline.note;
    }
  }
#else
  if (onGpu) info.rooflineNote = "built without NCCL (needed to take turns across processes)";
#endif

  // The host smoke runs both modes; a GPU run the one asked for.
  const std::vector<bool> modes =
      options.hostSmoke ? std::vector<bool>{false, true} : std::vector<bool>{options.lowLatency};
  for (const bool lowLatency : modes) {
    options.lowLatency = lowLatency;
    Reporter reporter(options, info);
    reporter.PrintHeader();
    context.options = &options;
    context.reporter = &reporter;
    context.baseline = BaselineTimes{};
#if BENCH_HAVE_NCCL
    if (onGpu && options.baseline) {
      const std::vector<Measurement> baseline = RunNcclBaseline(*nccl, *platform, options, info.rank, info.nranks);
      for (const Measurement& measurement : baseline) {
        reporter.Add(measurement);
        ok = ok && measurement.check != "failed";
      }
      context.baseline.dispatchUs = baseline[0].whole.median;
      context.baseline.combineUs = baseline[1].whole.median;
    } else {
      ReportSkippedBaseline(reporter, onGpu ? "--no-baseline" : "the NCCL baseline needs GPUs");
    }
#else
    ReportSkippedBaseline(reporter, onGpu ? "NCCL baseline: not built" : "the NCCL baseline needs GPUs");
#endif
    ok = (lowLatency ? RunLibmoecommLowLatency(context) : RunLibmoecommNormal(context)) && ok;
  }
  platform.reset();
#if BENCH_HAVE_NCCL
  nccl.reset();
#endif
  SetStep("moecommCommDestroy");
  BENCH_MOECOMM(moecommCommDestroy(commGuard.release()));
  if (!ok) std::fprintf(stderr, "moecomm-bench rank %d: a check failed (see 'check' above)\n", info.rank);
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace moecomm_bench

int main(int argc, char** argv) {
  moecomm_bench::Options options;
  int exitCode = 0;
  if (!moecomm_bench::ParseOptions(argc, argv, &options, &exitCode)) return exitCode;
  try {
    return moecomm_bench::Run(options);
  } catch (const moecomm_bench::BenchError&) {
    return 1;  // already printed where it was raised
  } catch (const std::exception& error) {
    std::fprintf(stderr, "moecomm-bench: %s\n", error.what());
    return 1;
  }
}
