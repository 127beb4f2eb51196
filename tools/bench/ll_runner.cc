// libmoecomm, low-latency (decode) mode, and its CUDA-graph variant.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "common.h"
#include "ll_check.h"
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
  bool Run();

 private:
  void Setup();
  void UploadInputs(const Routing& routing, const Tokens& tokens);
  moecommResult_t Dispatch(bool withSrcInfo = false);
  moecommResult_t Combine();
  // -c 1 (ll_check.h): fresh inputs for the next checked call, poisoned outputs and the
  // combine input; then the outputs against the reference. CheckOutputs returns the
  // dispatch's and the combine's verdicts ("" = passed, else the first mismatches).
  LowLatencyExpected PrepareCheck(int round);
  void CheckOutputs(const LowLatencyExpected& want, bool withSrcInfo, bool withCombine, std::string* dispatchWhy,
                    std::string* combineWhy);
  bool CheckDirect(Measurement* dispatch, Measurement* combine, bool combineSupported);
  void Fail(const std::string& call, moecommResult_t result) {
    BENCH_FAIL(call, std::string(moecommGetErrorString(result)) + ": " + moecommGetLastError(c_.comm));
  }
  void DestroyHandle() {
    if (handle_ != nullptr) BENCH_MOECOMM(moecommEpHandleDestroy(handle_));
    handle_ = nullptr;
  }
  bool RunGraph(const Measurement& dispatch, const Measurement& combine);
  void TimeEmptyKernel();

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
  int* recvSrcInfo_ = nullptr;
  void* expertOut_ = nullptr;
  void* out_ = nullptr;
};

void LowLatencyRunner::Setup() {
  SetStep("libmoecomm LL: buffers");
  const size_t localExperts = o_.experts / c_.nranks;
  const size_t slots = localExperts * c_.nranks * o_.tokens;  // [E/R, R*maxT] rows
  const size_t selections = static_cast<size_t>(o_.tokens) * o_.topk;
  const bool fp8 = o_.dtype == DispatchType::kFp8;
  topkIdx_ = static_cast<int64_t*>(p_.Alloc(selections * 8, "topk_idx"));
  topkWeights_ = static_cast<float*>(p_.Alloc(selections * 4, "topk_weights"));
  x_ = p_.Alloc(static_cast<size_t>(o_.tokens) * o_.hidden * 2, "x (bf16)");
  recvX_ = p_.Alloc(slots * o_.hidden * (fp8 ? 1 : 2), "LL recv_x");
  recvScales_ = fp8 ? p_.Alloc(slots * (o_.hidden / 128) * 4, "LL recv scales") : nullptr;
  recvCount_ = static_cast<int*>(p_.Alloc(localExperts * sizeof(int), "LL recv_count"));
  if (o_.check) recvSrcInfo_ = static_cast<int*>(p_.Alloc(slots * sizeof(int), "LL recv_src_info"));
  expertOut_ = p_.Alloc(slots * o_.hidden * 2, "LL expert outputs");
  out_ = p_.Alloc(static_cast<size_t>(o_.tokens) * o_.hidden * 2, "LL combined out");
  UploadInputs(GenerateRouting(o_, c_.rank), GenerateTokens(o_, DispatchType::kBf16, c_.rank));
  p_.Fill(expertOut_, 0x3c, slots * o_.hidden * 2);  // bf16 0x3c3c: a small non-zero value everywhere
  p_.Synchronize();
}

// LL takes BF16 tokens and casts inside.
void LowLatencyRunner::UploadInputs(const Routing& routing, const Tokens& tokens) {
  p_.Upload(topkIdx_, routing.topkIdx.data(), routing.topkIdx.size() * 8);
  p_.Upload(topkWeights_, routing.topkWeights.data(), routing.topkWeights.size() * 4);
  p_.Upload(x_, tokens.x.data(), tokens.x.size());
}

moecommResult_t LowLatencyRunner::Dispatch(bool withSrcInfo) {
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  args.numTokens = o_.tokens;
  args.x = x_;
  args.topkIdx = topkIdx_;
  args.topkIdxType = moecommInt64;
  args.recvType = o_.dtype == DispatchType::kFp8 ? moecommFloat8E4M3 : moecommBfloat16;
  args.recvX = recvX_;
  args.recvScales = recvScales_;
  args.recvCount = recvCount_;
  args.recvSrcInfo = withSrcInfo ? recvSrcInfo_ : nullptr;
  if (o_.llPerRank) {
    // The handle's combine sums per expert rank with these weights and takes none itself.
    args.flags |= MOECOMM_LL_PER_RANK_COMBINE;
    args.topkWeights = topkWeights_;
  }
  return moecommEpLowLatencyDispatch(ep_, &args, &handle_, p_.Stream());
}

moecommResult_t LowLatencyRunner::Combine() {
  moecommEpLowLatencyCombineArgs_t args = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
  args.x = expertOut_;
  args.topkIdx = topkIdx_;
  args.topkIdxType = moecommInt64;
  args.topkWeights = o_.llPerRank ? nullptr : topkWeights_;
  args.out = out_;
  return moecommEpLowLatencyCombine(ep_, &args, handle_, p_.Stream());
}

bool LowLatencyRunner::Run() {
  SetStep("libmoecomm LL: moecommEpCreate");
  moecommEpConfig_t config = MakeEpConfig(c_, moecommEpModeLowLatency);
  moecommResult_t result = moecommEpCreate(c_.comm, &config, &ep_);
  const std::vector<const char*> ops = o_.graph ? std::vector<const char*>{"ll_dispatch", "ll_combine", "ll_graph"}
                                                : std::vector<const char*>{"ll_dispatch", "ll_combine"};
  if (result == moecommNotSupported) {
    const std::string why = std::string("moecommEpCreate: ") + moecommGetLastError(c_.comm);
    for (const char* op : ops) ReportNotSupported(c_, op, kMode, why);
    return true;
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

  SetStep("libmoecomm LL: first moecommEpLowLatencyDispatch");
  result = Dispatch();
  if (result == moecommNotSupported) {
    const std::string why = std::string("moecommEpLowLatencyDispatch: ") + moecommGetLastError(c_.comm);
    for (const char* op : ops) ReportNotSupported(c_, op, kMode, why);
    return true;
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
  if (p_.OnGpu()) TimeEmptyKernel();
  bool ok = true;
  if (o_.check) ok = CheckDirect(&dispatch, &combine, combineSupported);
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
  if (!o_.graph) return ok;
  if (!combineSupported) {
    ReportNotSupported(c_, "ll_graph", kMode, combineWhy);
    return ok;
  }
  return RunGraph(dispatch, combine) && ok;
}

LowLatencyExpected LowLatencyRunner::PrepareCheck(int round) {
  SetStep("libmoecomm LL: check " + std::to_string(round) + ": reference");
  Options checked = o_;
  checked.seed = LowLatencyCheckSeed(o_.seed, round);
  LowLatencyExpected want = ExpectLowLatency(checked, c_.nranks, c_.rank);
  SetStep("libmoecomm LL: check " + std::to_string(round) + ": inputs");
  UploadInputs(want.routing, want.tokens);
  const size_t localExperts = want.recvCount.size();
  const size_t slots = localExperts * want.rowsPerExpert;
  p_.Fill(recvX_, kLowLatencyPoison, slots * want.rowBytes);
  if (recvScales_ != nullptr) p_.Fill(recvScales_, kLowLatencyPoison, slots * want.scaleBytes);
  p_.Fill(recvCount_, kLowLatencyPoison, localExperts * sizeof(int));
  p_.Fill(recvSrcInfo_, kLowLatencyPoison, slots * sizeof(int));
  p_.Fill(out_, kLowLatencyPoison, static_cast<size_t>(o_.tokens) * o_.hidden * 2);
  // The combine input: the reference's slots of every local expert hold its expert outputs,
  // the rest NaN (a combine that reads them shows).
  const size_t expertBytes = want.rowsPerExpert * o_.hidden * 2;
  p_.Fill(expertOut_, kLowLatencyPoison, localExperts * expertBytes);
  std::vector<uint16_t> rows;
  for (size_t le = 0; le < localExperts; ++le) {
    LowLatencyExpertRows(checked, c_.rank, static_cast<int>(le), want.recvCount[le], &rows);
    if (!rows.empty()) p_.Upload(static_cast<uint8_t*>(expertOut_) + le * expertBytes, rows.data(), rows.size() * 2);
  }
  p_.Synchronize();
  return want;
}

// Every output, whole: the counts, each local expert's slots (rows, scales, source info; the
// poison beyond its count), then the combined tokens.
void LowLatencyRunner::CheckOutputs(const LowLatencyExpected& want, bool withSrcInfo, bool withCombine,
                                    std::string* dispatchWhy, std::string* combineWhy) {
  SetStep("libmoecomm LL: comparing with the reference");
  const size_t localExperts = want.recvCount.size(), slotsPerExpert = want.rowsPerExpert;
  MismatchLog dispatchLog;
  std::vector<int> count(localExperts);
  p_.Download(count.data(), recvCount_, count.size() * sizeof(int));
  dispatchLog.Compare(count.data(), want.recvCount.data(), localExperts, sizeof(int),
                      [](size_t le) { return "recvCount[" + std::to_string(le) + "]"; });
  const bool fp8 = want.scaleBytes > 0;
  const size_t valueBytes = fp8 ? 1 : 2;  // FP8 byte or BF16
  std::vector<uint8_t> got(slotsPerExpert * std::max(want.rowBytes, want.scaleBytes));
  std::vector<int> gotSrcInfo(slotsPerExpert);
  for (size_t le = 0; le < localExperts; ++le) {
    const size_t firstSlot = le * slotsPerExpert;
    auto where = [&](const char* what, size_t valuesPerSlot) {
      return [what, le, valuesPerSlot](size_t i) {
        return std::string(what) + "[expert " + std::to_string(le) + "][slot " + std::to_string(i / valuesPerSlot) +
               "][" + std::to_string(i % valuesPerSlot) + "]";
      };
    };
    p_.Download(got.data(), static_cast<uint8_t*>(recvX_) + firstSlot * want.rowBytes, slotsPerExpert * want.rowBytes);
    dispatchLog.Compare(got.data(), &want.recvX[firstSlot * want.rowBytes], slotsPerExpert * want.rowBytes / valueBytes,
                        valueBytes, where(fp8 ? "recvX (fp8)" : "recvX (bf16)", want.rowBytes / valueBytes));
    if (fp8) {
      p_.Download(got.data(), static_cast<uint8_t*>(recvScales_) + firstSlot * want.scaleBytes,
                  slotsPerExpert * want.scaleBytes);
      dispatchLog.Compare(got.data(), &want.recvScales[firstSlot * want.scaleBytes],
                          slotsPerExpert * want.scaleBytes / 4, 4, where("recvScales", want.scaleBytes / 4));
    }
    if (withSrcInfo) {
      p_.Download(gotSrcInfo.data(), recvSrcInfo_ + firstSlot, slotsPerExpert * sizeof(int));
      dispatchLog.Compare(gotSrcInfo.data(), &want.recvSrcInfo[firstSlot], slotsPerExpert, sizeof(int),
                          where("recvSrcInfo", 1));
    }
  }
  *dispatchWhy = dispatchLog.Message("ll_dispatch");
  if (!withCombine) return;
  MismatchLog combineLog;
  std::vector<uint16_t> combined(want.combined.size());
  p_.Download(combined.data(), out_, combined.size() * 2);
  const size_t hidden = o_.hidden;
  combineLog.Compare(combined.data(), want.combined.data(), combined.size(), 2, [hidden](size_t i) {
    return "out[token " + std::to_string(i / hidden) + "][channel " + std::to_string(i % hidden) + "]";
  });
  *combineWhy = combineLog.Message("ll_combine");
}

// One dispatch (with recvSrcInfo) and one combine through the library on fresh inputs, after
// the timed runs; then the timed runs' inputs are restored for the graph.
bool LowLatencyRunner::CheckDirect(Measurement* dispatch, Measurement* combine, bool combineSupported) {
  const LowLatencyExpected want = PrepareCheck(0);
  SetStep("libmoecomm LL: checked dispatch");
  moecommResult_t result = Dispatch(true);
  if (result != moecommSuccess) Fail("moecommEpLowLatencyDispatch", result);
  if (combineSupported) {
    SetStep("libmoecomm LL: checked combine");
    if ((result = Combine()) != moecommSuccess) Fail("moecommEpLowLatencyCombine", result);
  }
  p_.Synchronize();
  DestroyHandle();
  std::string dispatchWhy, combineWhy;
  CheckOutputs(want, true, combineSupported, &dispatchWhy, &combineWhy);
  dispatch->check = dispatchWhy.empty() ? "passed" : "failed";
  dispatch->message = dispatchWhy;
  if (combineSupported) {
    combine->check = combineWhy.empty() ? "passed" : "failed";
    combine->message = combineWhy;
  }
  UploadInputs(GenerateRouting(o_, c_.rank), GenerateTokens(o_, DispatchType::kBf16, c_.rank));
  p_.Fill(expertOut_, 0x3c, want.recvCount.size() * want.rowsPerExpert * o_.hidden * 2);
  p_.Synchronize();
  return dispatchWhy.empty() && (!combineSupported || combineWhy.empty());
}

// Dispatch + combine captured once, the graph's replays timed; with -c 1 one more replay on
// fresh inputs is checked. The handle made while capturing belongs to the graph and is
// destroyed with it. Returns false when the check failed.
// The floor under every kernel-only time: a kernel of the LL grid (one block per SM of the
// budget, 512 threads) that does nothing, timed the same way (gate, alignment, events).
void LowLatencyRunner::TimeEmptyKernel() {
  SetStep("empty kernel");
  const int blocks = o_.smBudget > 0 ? o_.smBudget : 1;
  std::vector<double> us;
  for (int i = 0; i < o_.iters; ++i) {
    TimeSample(p_, true, &us, [&] { return p_.LaunchEmpty(blocks, 512) ? moecommSuccess : moecommNotSupported; });
  }
  Measurement floor = NewMeasurement("empty_kernel", kMode);
  floor.impl = "cuda";
  floor.whole = Summarize(us);
  SetKernelTime(c_, &floor, &us);
  floor.message = "a kernel of " + std::to_string(blocks) +
                  " x 512 threads that does nothing, timed as the kernel-only samples: their fixed cost";
  c_.reporter->Add(floor);
}

bool LowLatencyRunner::RunGraph(const Measurement& dispatch, const Measurement& combine) {
  Measurement graph = NewMeasurement("ll_graph", kMode);
  graph.bytes = dispatch.bytes + combine.bytes;
  graph.bytesRule = "ll_dispatch bytes + ll_combine bytes";
  bool ok = true;
  if (c_.baseline.dispatchUs > 0) graph.baselineUs = c_.baseline.dispatchUs + c_.baseline.combineUs;
#if BENCH_HAVE_CUDA
  if (!p_.OnGpu()) {
    graph.status = "skipped";
    graph.message = "CUDA graphs need the CUDA backend";
    c_.reporter->Add(graph);
    return true;
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
    return true;
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
  if (o_.check) {
    // The replay writes no recvSrcInfo (the captured dispatch does not ask for it).
    const LowLatencyExpected want = PrepareCheck(1);
    SetStep("libmoecomm LL: checked graph replay");
    BENCH_CUDA(cudaGraphLaunch(executable, stream));
    p_.Synchronize();
    std::string dispatchWhy, combineWhy;
    CheckOutputs(want, false, true, &dispatchWhy, &combineWhy);
    ok = dispatchWhy.empty() && combineWhy.empty();
    graph.check = ok ? "passed" : "failed";
    graph.message = dispatchWhy.empty()  ? combineWhy
                    : combineWhy.empty() ? dispatchWhy
                                         : dispatchWhy + "; " + combineWhy;
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
  return ok;
}

}  // namespace

bool RunLibmoecommLowLatency(const RunnerContext& context) {
  LowLatencyRunner runner(context);
  return runner.Run();
}

}  // namespace moecomm_bench
