// libmoecomm, low-latency (decode) mode, and its CUDA-graph variant.
#include <cstdio>

#include "common.h"
#include "moecomm_runner.h"
#include "workload.h"
#if BENCH_HAVE_CUDA
#include "cuda_check.h"
#endif

namespace moecomm_bench {
namespace {

constexpr const char* kMode = "low_latency";

class LowLatencyRunner {
 public:
  explicit LowLatencyRunner(const RunnerContext& context) : c_(context), o_(*context.options), p_(*context.platform) {}
  ~LowLatencyRunner() {
    if (handle_ != nullptr) moecommEpHandleDestroy(handle_);
    if (ep_ != nullptr) moecommEpDestroy(ep_);
  }
  void Run();

 private:
  void Setup();
  moecommResult_t Dispatch();
  moecommResult_t Combine();
  void Fail(const std::string& call, moecommResult_t result) {
    BENCH_FAIL(call, std::string(moecommGetErrorString(result)) + ": " + moecommGetLastError(c_.comm));
  }
  void DestroyHandle() {
    if (handle_ != nullptr) BENCH_MOECOMM(moecommEpHandleDestroy(handle_));
    handle_ = nullptr;
  }
  void RunGraph(const Measurement& dispatch, const Measurement& combine);

  const RunnerContext& c_;
  const Options& o_;
  Platform& p_;
  moecommEp_t ep_ = nullptr;
  moecommEpHandle_t handle_ = nullptr;
  int64_t* topkIdx_ = nullptr;
  float* topkWeights_ = nullptr;
  void* x_ = nullptr;
  void* recvX_ = nullptr;
  void* recvScales_ = nullptr;
  int* recvCount_ = nullptr;
  void* expertOut_ = nullptr;
  void* out_ = nullptr;
};

void LowLatencyRunner::Setup() {
  SetStep("libmoecomm LL: buffers");
  const Routing routing = GenerateRouting(o_, c_.rank);
  const Tokens tokens = GenerateTokens(o_, DispatchType::kBf16, c_.rank);  // LL takes BF16 and casts inside
  const size_t localExperts = o_.experts / c_.nranks;
  const size_t slots = localExperts * c_.nranks * o_.tokens;  // [E/R, R*maxT] rows
  const bool fp8 = o_.dtype == DispatchType::kFp8;
  topkIdx_ = static_cast<int64_t*>(p_.Alloc(routing.topkIdx.size() * 8, "topk_idx"));
  topkWeights_ = static_cast<float*>(p_.Alloc(routing.topkWeights.size() * 4, "topk_weights"));
  x_ = p_.Alloc(tokens.x.size(), "x (bf16)");
  recvX_ = p_.Alloc(slots * o_.hidden * (fp8 ? 1 : 2), "LL recv_x");
  recvScales_ = fp8 ? p_.Alloc(slots * (o_.hidden / 128) * 4, "LL recv scales") : nullptr;
  recvCount_ = static_cast<int*>(p_.Alloc(localExperts * sizeof(int), "LL recv_count"));
  expertOut_ = p_.Alloc(slots * o_.hidden * 2, "LL expert outputs");
  out_ = p_.Alloc(static_cast<size_t>(o_.tokens) * o_.hidden * 2, "LL combined out");
  p_.Upload(topkIdx_, routing.topkIdx.data(), routing.topkIdx.size() * 8);
  p_.Upload(topkWeights_, routing.topkWeights.data(), routing.topkWeights.size() * 4);
  p_.Upload(x_, tokens.x.data(), tokens.x.size());
  p_.Fill(expertOut_, 0x3c, slots * o_.hidden * 2);  // bf16 0x3c3c: a small non-zero value everywhere
  p_.Synchronize();
}

moecommResult_t LowLatencyRunner::Dispatch() {
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  args.numTokens = o_.tokens;
  args.x = x_;
  args.topkIdx = topkIdx_;
  args.topkIdxType = moecommInt64;
  args.recvType = o_.dtype == DispatchType::kFp8 ? moecommFloat8E4M3 : moecommBfloat16;
  args.recvX = recvX_;
  args.recvScales = recvScales_;
  args.recvCount = recvCount_;
  return moecommEpLowLatencyDispatch(ep_, &args, &handle_, p_.Stream());
}

moecommResult_t LowLatencyRunner::Combine() {
  moecommEpLowLatencyCombineArgs_t args = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
  args.x = expertOut_;
  args.topkIdx = topkIdx_;
  args.topkIdxType = moecommInt64;
  args.topkWeights = topkWeights_;
  args.out = out_;
  return moecommEpLowLatencyCombine(ep_, &args, handle_, p_.Stream());
}

void LowLatencyRunner::Run() {
  SetStep("libmoecomm LL: moecommEpCreate");
  moecommEpConfig_t config = MakeEpConfig(c_, moecommEpModeLowLatency);
  moecommResult_t result = moecommEpCreate(c_.comm, &config, &ep_);
  const std::vector<const char*> ops = o_.graph ? std::vector<const char*>{"ll_dispatch", "ll_combine", "ll_graph"}
                                                : std::vector<const char*>{"ll_dispatch", "ll_combine"};
  if (result == moecommNotSupported) {
    const std::string why = std::string("moecommEpCreate: ") + moecommGetLastError(c_.comm);
    for (const char* op : ops) ReportNotSupported(c_, op, kMode, why);
    return;
  }
  if (result != moecommSuccess) Fail("moecommEpCreate", result);
  Setup();

  Measurement dispatch = NewMeasurement("ll_dispatch", kMode), combine = NewMeasurement("ll_combine", kMode);
  const int64_t selections = SelectionCount(GenerateRouting(o_, c_.rank));
  dispatch.bytes = selections * static_cast<int64_t>(LowLatencySelectionBytes(o_.dtype, o_.hidden));
  combine.bytes = selections * 2 * static_cast<int64_t>(o_.hidden);
  dispatch.bytesRule = "valid (token, expert) selections sent x bytes per selection";
  combine.bytesRule = "valid selections x 2H";
  dispatch.baselineUs = c_.baseline.dispatchUs;
  combine.baselineUs = c_.baseline.combineUs;
  if (o_.check) dispatch.check = combine.check = "not implemented";

  SetStep("libmoecomm LL: first moecommEpLowLatencyDispatch");
  result = Dispatch();
  if (result == moecommNotSupported) {
    const std::string why = std::string("moecommEpLowLatencyDispatch: ") + moecommGetLastError(c_.comm);
    for (const char* op : ops) ReportNotSupported(c_, op, kMode, why);
    return;
  }
  if (result != moecommSuccess) Fail("moecommEpLowLatencyDispatch", result);
  SetStep("libmoecomm LL: first moecommEpLowLatencyCombine");
  result = Combine();
  const bool combineSupported = result != moecommNotSupported;
  const std::string combineWhy = std::string("moecommEpLowLatencyCombine: ") + moecommGetLastError(c_.comm);
  if (combineSupported && result != moecommSuccess) Fail("moecommEpLowLatencyCombine", result);
  p_.Synchronize();
  DestroyHandle();

  SetStep("libmoecomm LL: warm-up");
  for (int i = 0; i < o_.warmup; ++i) {
    if ((result = Dispatch()) != moecommSuccess) Fail("moecommEpLowLatencyDispatch", result);
    if (combineSupported && (result = Combine()) != moecommSuccess) Fail("moecommEpLowLatencyCombine", result);
    DestroyHandle();
  }
  p_.Synchronize();
  // Every iteration times each op twice: whole call, then gated (GPU time alone;
  // Platform::BeginSample).
  std::vector<double> dispatchUs, combineUs, dispatchGpuUs, combineGpuUs;
  for (int i = 0; i < o_.iters; ++i) {
    for (const bool gated : {false, true}) {
      SetStep("libmoecomm LL: timed dispatch " + std::to_string(i) + (gated ? " (gated)" : ""));
      result = TimeSample(p_, gated, gated ? &dispatchGpuUs : &dispatchUs, [&] { return Dispatch(); });
      if (result != moecommSuccess) Fail("moecommEpLowLatencyDispatch", result);
      if (combineSupported) {
        SetStep("libmoecomm LL: timed combine " + std::to_string(i) + (gated ? " (gated)" : ""));
        result = TimeSample(p_, gated, gated ? &combineGpuUs : &combineUs, [&] { return Combine(); });
        if (result != moecommSuccess) Fail("moecommEpLowLatencyCombine", result);
      }
      DestroyHandle();
    }
  }
  dispatch.whole = Summarize(dispatchUs);
  SetKernelTime(c_, &dispatch, &dispatchGpuUs);
  c_.reporter->Add(dispatch);
  if (combineSupported) {
    combine.whole = Summarize(combineUs);
    SetKernelTime(c_, &combine, &combineGpuUs);
    c_.reporter->Add(combine);
  } else {
    ReportNotSupported(c_, "ll_combine", kMode, combineWhy);
  }
  if (!o_.graph) return;
  if (!combineSupported) {
    ReportNotSupported(c_, "ll_graph", kMode, combineWhy);
    return;
  }
  RunGraph(dispatch, combine);
}

// Dispatch + combine captured once, the graph's replays timed. The handle made while
// capturing belongs to the graph and is destroyed with it.
void LowLatencyRunner::RunGraph(const Measurement& dispatch, const Measurement& combine) {
  Measurement graph = NewMeasurement("ll_graph", kMode);
  graph.bytes = dispatch.bytes + combine.bytes;
  graph.bytesRule = "ll_dispatch bytes + ll_combine bytes";
  graph.check = dispatch.check;
  if (c_.baseline.dispatchUs > 0) graph.baselineUs = c_.baseline.dispatchUs + c_.baseline.combineUs;
#if BENCH_HAVE_CUDA
  if (!p_.OnGpu()) {
    graph.status = "skipped";
    graph.message = "CUDA graphs need the CUDA backend";
    c_.reporter->Add(graph);
    return;
  }
  SetStep("libmoecomm LL: graph capture");
  cudaStream_t stream = static_cast<cudaStream_t>(p_.Stream());
  BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  moecommResult_t result = Dispatch();
  if (result == moecommSuccess) result = Combine();
  const std::string why = moecommGetLastError(c_.comm);
  cudaGraph_t captured = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &captured);
  if (result != moecommSuccess || ended != cudaSuccess) {
    if (captured != nullptr) cudaGraphDestroy(captured);
    cudaGetLastError();
    graph.status = result == moecommNotSupported ? "not_supported" : "failed";
    graph.message = result != moecommSuccess
                        ? std::string("capturing dispatch+combine: ") + moecommGetErrorString(result) + ": " + why
                        : std::string("cudaStreamEndCapture: ") + cudaGetErrorString(ended);
    if (c_.rank == 0) std::printf("libmoecomm: ll_graph skipped (%s)\n", graph.message.c_str());
    c_.reporter->Add(graph);
    DestroyHandle();
    return;
  }
  cudaGraphExec_t executable = nullptr;
  BENCH_CUDA(cudaGraphInstantiate(&executable, captured, 0));
  SetStep("libmoecomm LL: graph replays");
  for (int i = 0; i < o_.warmup; ++i) BENCH_CUDA(cudaGraphLaunch(executable, stream));
  p_.Synchronize();
  std::vector<double> replayUs;
  for (int i = 0; i < o_.iters; ++i) {
    p_.PrepareSample();
    p_.BeginSample();
    BENCH_CUDA(cudaGraphLaunch(executable, stream));
    replayUs.push_back(p_.EndSample());
  }
  BENCH_CUDA(cudaGraphExecDestroy(executable));
  BENCH_CUDA(cudaGraphDestroy(captured));
  DestroyHandle();
  graph.whole = Summarize(replayUs);
  SetKernelTime(c_, &graph);
  graph.kernelMethod = "same as whole-call (events around each graph replay)";
#else
  graph.status = "skipped";
  graph.message = "built without CUDA";
#endif
  c_.reporter->Add(graph);
}

}  // namespace

bool RunLibmoecommLowLatency(const RunnerContext& context) {
  LowLatencyRunner runner(context);
  runner.Run();
  return true;
}

}  // namespace moecomm_bench
