// libmoecomm, normal mode.
#include "moecomm_runner.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>

#include "check.h"
#include "common.h"
#include "workload.h"

namespace moecomm_bench {
namespace {

constexpr const char* kMode = "normal";

class NormalRunner {
 public:
  explicit NormalRunner(const RunnerContext& context) : c_(context), o_(*context.options), p_(*context.platform) {}
  ~NormalRunner() {
    if (handle_ != nullptr) moecommEpHandleDestroy(handle_);
    if (ep_ != nullptr) moecommEpDestroy(ep_);
    if (symmetric_) {  // collective, as the allocations (those made before a failed one too)
      if (o_.symmetricX && x_ != nullptr) (void)moecommMemFree(c_.comm, x_);
      if (expertIn_ != nullptr) (void)moecommMemFree(c_.comm, expertIn_);
      if (recvX_ != nullptr) (void)moecommMemFree(c_.comm, recvX_);
    }
  }
  bool Run();

 private:
  void Setup();
  moecommResult_t Dispatch(moecommEpHandle_t* handle, bool reuse);
  moecommResult_t Combine(moecommEpHandle_t handle);
  void CheckLayout();
  bool CheckDispatch(Measurement* dispatch);
  bool CheckCombine(Measurement* combine);
  void PrepareCombineInput();
  std::vector<uint8_t> DownloadPacked(int rows);
  void Fail(const std::string& call, moecommResult_t result) {
    BENCH_FAIL(call, std::string(moecommGetErrorString(result)) + ": " + moecommGetLastError(c_.comm));
  }

  const RunnerContext& c_;
  const Options& o_;
  Platform& p_;
  moecommEp_t ep_ = nullptr;
  moecommEpHandle_t handle_ = nullptr;
  size_t xRowBytes_ = 0, scaleRowBytes_ = 0, capacity_ = 0;
  int64_t* topkIdx_ = nullptr;
  void* x_ = nullptr;
  float* scales_ = nullptr;
  void* recvX_ = nullptr;
  float* recvScales_ = nullptr;
  int* numRecv_ = nullptr;
  int* tokensPerRank_ = nullptr;
  uint8_t* packed_ = nullptr;
  void* expertIn_ = nullptr;
  void* combined_ = nullptr;
  bool symmetric_ = false;  // recvX_ and expertIn_ are moecommMemAlloc memory (--buffers symmetric)
};

void NormalRunner::Setup() {
  SetStep("libmoecomm: buffers");
  const bool fp8 = o_.dtype == DispatchType::kFp8;
  xRowBytes_ = fp8 ? o_.hidden : 2 * static_cast<size_t>(o_.hidden);
  scaleRowBytes_ = fp8 ? 4 * static_cast<size_t>(o_.hidden / 128) : 0;
  capacity_ = static_cast<size_t>(c_.nranks) * o_.tokens;  // worst case: always enough
  const Routing routing = GenerateRouting(o_, c_.rank);
  const Tokens tokens = GenerateTokens(o_, o_.dtype, c_.rank);
  topkIdx_ = static_cast<int64_t*>(p_.Alloc(routing.topkIdx.size() * 8, "topk_idx"));
  if (!o_.symmetricX) x_ = p_.Alloc(tokens.x.size(), "x");
  scales_ = static_cast<float*>(p_.Alloc(std::max<size_t>(tokens.scales.size() * 4, 4), "x scales"));
  recvScales_ = static_cast<float*>(p_.Alloc(std::max<size_t>(capacity_ * scaleRowBytes_, 4), "recv_x scales"));
  numRecv_ = static_cast<int*>(p_.Alloc(sizeof(int), "num_recv_tokens"));
  tokensPerRank_ = static_cast<int*>(p_.Alloc(sizeof(int) * c_.nranks, "tokens_per_rank"));
  packed_ = static_cast<uint8_t*>(p_.Alloc(capacity_ * DispatchRowBytes(o_.dtype, o_.hidden), "packed rows"));
  if (o_.symmetricBuffers) {
    symmetric_ = true;
    moecommResult_t result = moecommMemAlloc(c_.comm, &recvX_, capacity_ * xRowBytes_);
    if (result == moecommSuccess) result = moecommMemAlloc(c_.comm, &expertIn_, capacity_ * o_.hidden * 2);
    // (every rank has the same T, so x sits at the same offset everywhere: the pulled dispatch)
    if (result == moecommSuccess && o_.symmetricX) result = moecommMemAlloc(c_.comm, &x_, tokens.x.size());
    if (result != moecommSuccess) Fail("moecommMemAlloc (recv_x, combine input, x)", result);
  } else {
    recvX_ = p_.Alloc(capacity_ * xRowBytes_, "recv_x");
    expertIn_ = p_.Alloc(capacity_ * o_.hidden * 2, "combine input");
  }
  combined_ = p_.Alloc(static_cast<size_t>(o_.tokens) * o_.hidden * 2, "combined_x");
  p_.Upload(topkIdx_, routing.topkIdx.data(), routing.topkIdx.size() * 8);
  p_.Upload(x_, tokens.x.data(), tokens.x.size());
  if (fp8) p_.Upload(scales_, tokens.scales.data(), tokens.scales.size() * 4);
}

moecommResult_t NormalRunner::Dispatch(moecommEpHandle_t* handle, bool reuse) {
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = o_.tokens;
  args.xType = o_.dtype == DispatchType::kFp8 ? moecommFloat8E4M3 : moecommBfloat16;
  args.x = x_;
  args.xScales = o_.dtype == DispatchType::kFp8 ? scales_ : nullptr;
  args.topkIdx = reuse ? nullptr : topkIdx_;  // a reused handle does not read the routing
  args.topkIdxType = moecommInt64;
  args.recvCapacity = static_cast<int>(capacity_);
  args.recvX = recvX_;
  args.recvXScales = o_.dtype == DispatchType::kFp8 ? recvScales_ : nullptr;
  args.numRecvTokens = numRecv_;
  return moecommEpDispatch(ep_, &args, handle, p_.Stream());
}

moecommResult_t NormalRunner::Combine(moecommEpHandle_t handle) {
  moecommEpCombineArgs_t args = MOECOMM_EP_COMBINE_ARGS_INIT;
  args.x = expertIn_;
  args.combinedX = combined_;
  return moecommEpCombine(ep_, &args, handle, p_.Stream());
}

// Not timed: a functional call, checked when -c 1 (a missing implementation is only noted).
void NormalRunner::CheckLayout() {
  SetStep("libmoecomm: moecommEpGetLayout");
  moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
  args.numTokens = o_.tokens;
  args.topkIdx = topkIdx_;
  args.topkIdxType = moecommInt64;
  args.tokensPerRank = tokensPerRank_;
  const moecommResult_t result = moecommEpGetLayout(ep_, &args, p_.Stream());
  if (result == moecommNotSupported) {
    if (c_.rank == 0)
      std::printf("libmoecomm: layout not supported on this backend yet (%s)\n", moecommGetLastError(c_.comm));
    return;
  }
  if (result != moecommSuccess) Fail("moecommEpGetLayout", result);
  if (!o_.check) return;
  std::vector<int> got(c_.nranks);
  p_.Download(got.data(), tokensPerRank_, got.size() * sizeof(int));
  const Routing routing = GenerateRouting(o_, c_.rank);
  for (int r = 0; r < c_.nranks; ++r) {
    int want = 0;
    for (int t = 0; t < o_.tokens; ++t)
      want += (DestinationRanks(routing, t, c_.nranks, o_.experts / c_.nranks) >> r) & 1;
    if (got[r] != want)
      BENCH_FAIL("check of moecommEpGetLayout", "tokensPerRank[" + std::to_string(r) + "] = " + std::to_string(got[r]) +
                                                    ", expected " + std::to_string(want));
  }
}

// recv_x (+ scales) of the first rows, packed as the rows of workload.h.
std::vector<uint8_t> NormalRunner::DownloadPacked(int rows) {
  const size_t rowBytes = xRowBytes_ + scaleRowBytes_;
  std::vector<uint8_t> x(rows * xRowBytes_), scales(rows * scaleRowBytes_), packed(rows * rowBytes);
  p_.Download(x.data(), recvX_, x.size());
  if (!scales.empty()) p_.Download(scales.data(), recvScales_, scales.size());
  for (int row = 0; row < rows; ++row) {
    std::memcpy(&packed[row * rowBytes], &x[row * xRowBytes_], xRowBytes_);
    if (scaleRowBytes_ > 0) {
      std::memcpy(&packed[row * rowBytes + xRowBytes_], &scales[row * scaleRowBytes_], scaleRowBytes_);
    }
  }
  return packed;
}

// The received rows against the reference of the same exchange.
bool NormalRunner::CheckDispatch(Measurement* dispatch) {
  int received = 0;
  p_.Download(&received, numRecv_, sizeof(int));
  int64_t expectedRows = 0;
  const std::vector<uint8_t> expected = ExpectedReceivedRows(o_, c_.nranks, c_.rank, &expectedRows);
  if (received != expectedRows) {
    dispatch->check = "failed";
    dispatch->message = "received " + std::to_string(received) + " rows, expected " + std::to_string(expectedRows);
    return false;
  }
  const size_t rowBytes = xRowBytes_ + scaleRowBytes_;
  const std::vector<uint8_t> packed = DownloadPacked(received);
  const bool ok = CompareRows(packed, expected, received, rowBytes, "dispatch rows", &dispatch->message);
  dispatch->check = ok ? "passed" : "failed";
  return ok;
}

// The combine input: the expert outputs of the received rows (workload.h), made once.
void NormalRunner::PrepareCombineInput() {
  SetStep("libmoecomm: combine input");
  int received = 0;
  p_.Download(&received, numRecv_, sizeof(int));
  if (received < 0 || static_cast<size_t>(received) > capacity_)
    BENCH_FAIL("numRecvTokens after moecommEpDispatch", std::to_string(received) + " is outside [0, R*T]");
  const std::vector<uint8_t> packed = DownloadPacked(received);
  p_.Upload(packed_, packed.data(), packed.size());
  p_.ExpertOutputs(packed_, received, o_.dtype, o_.hidden, c_.rank, expertIn_);
}

bool NormalRunner::CheckCombine(Measurement* combine) {
  std::vector<uint16_t> got(static_cast<size_t>(o_.tokens) * o_.hidden);
  p_.Download(got.data(), combined_, got.size() * 2);
  const bool ok =
      CompareBf16(got, ExpectedCombined(o_, c_.nranks, c_.rank), o_.hidden, "combine output", &combine->message);
  combine->check = ok ? "passed" : "failed";
  return ok;
}

bool NormalRunner::Run() {
  SetStep("libmoecomm: moecommEpCreate");
  moecommEpConfig_t config = MakeEpConfig(c_, moecommEpModeNormal);
  moecommResult_t result = moecommEpCreate(c_.comm, &config, &ep_);
  if (result == moecommNotSupported) {
    for (const char* op : {"dispatch", "dispatch_cached", "combine"})
      ReportNotSupported(c_, op, kMode, std::string("moecommEpCreate: ") + moecommGetLastError(c_.comm));
    return true;
  }
  if (result != moecommSuccess) Fail("moecommEpCreate", result);
  Setup();
  CheckLayout();

  Measurement dispatch = NewMeasurement("dispatch", kMode), cached = NewMeasurement("dispatch_cached", kMode),
              combine = NewMeasurement("combine", kMode);
  const int64_t rows = ReceivedTokenCount(o_, c_.nranks, c_.rank);
  dispatch.bytes = cached.bytes = rows * static_cast<int64_t>(DispatchRowBytes(o_.dtype, o_.hidden));
  combine.bytes = rows * 2 * static_cast<int64_t>(o_.hidden);
  dispatch.bytesRule = cached.bytesRule = "received rows (own included) x bytes per token";
  combine.bytesRule = "received rows x 2H";
  dispatch.baselineUs = cached.baselineUs = c_.baseline.dispatchUs;
  combine.baselineUs = c_.baseline.combineUs;

  SetStep("libmoecomm: first moecommEpDispatch (worst-case sizing, new handle)");
  if (o_.check) p_.Fill(recvX_, 0xff, capacity_ * xRowBytes_);
  result = Dispatch(&handle_, false);
  if (result == moecommNotSupported) {
    for (const char* op : {"dispatch", "dispatch_cached", "combine"})
      ReportNotSupported(c_, op, kMode, std::string("moecommEpDispatch: ") + moecommGetLastError(c_.comm));
    return true;
  }
  if (result != moecommSuccess) Fail("moecommEpDispatch", result);
  p_.Synchronize();
  bool ok = true;
  if (o_.check) ok = CheckDispatch(&dispatch) && ok;
  cached.check = dispatch.check;
  PrepareCombineInput();
  SetStep("libmoecomm: first moecommEpCombine");
  if (o_.check) p_.Fill(combined_, 0xff, static_cast<size_t>(o_.tokens) * o_.hidden * 2);
  result = Combine(handle_);
  const bool combineSupported = result != moecommNotSupported;
  const std::string combineWhy = moecommGetLastError(c_.comm);
  if (combineSupported && result != moecommSuccess) Fail("moecommEpCombine", result);
  p_.Synchronize();
  if (combineSupported && o_.check) ok = CheckCombine(&combine) && ok;

  auto dispatchFresh = [&] {
    BENCH_MOECOMM(moecommEpHandleDestroy(handle_));
    handle_ = nullptr;
    const moecommResult_t r = Dispatch(&handle_, false);
    if (r != moecommSuccess) Fail("moecommEpDispatch", r);
  };
  auto combineChecked = [&] {
    const moecommResult_t r = Combine(handle_);
    if (r != moecommSuccess) Fail("moecommEpCombine", r);
  };
  SetStep("libmoecomm: warm-up");
  for (int i = 0; i < o_.warmup; ++i) {
    dispatchFresh();
    if (combineSupported) combineChecked();
  }
  p_.Synchronize();
  // Every iteration times each op twice: whole call (host issue time included), then gated
  // (GPU time alone; Platform::BeginSample).
  std::vector<double> dispatchUs, cachedUs, combineUs, dispatchGpuUs, cachedGpuUs, combineGpuUs;
  auto sample = [&](bool gated, const std::function<moecommResult_t()>& call, std::vector<double>* out,
                    const char* what) {
    const moecommResult_t r = TimeSample(p_, gated, out, call);
    if (r != moecommSuccess) Fail(what, r);
  };
  for (int i = 0; i < o_.iters; ++i) {
    for (const bool gated : {false, true}) {
      SetStep("libmoecomm: timed dispatch " + std::to_string(i) + (gated ? " (gated)" : ""));
      BENCH_MOECOMM(moecommEpHandleDestroy(handle_));
      handle_ = nullptr;
      sample(
          gated, [&] { return Dispatch(&handle_, false); }, gated ? &dispatchGpuUs : &dispatchUs, "moecommEpDispatch");
      if (!combineSupported) continue;
      SetStep("libmoecomm: timed combine " + std::to_string(i) + (gated ? " (gated)" : ""));
      sample(
          gated, [&] { return Combine(handle_); }, gated ? &combineGpuUs : &combineUs, "moecommEpCombine");
    }
  }
  for (int i = 0; i < o_.iters; ++i) {
    for (const bool gated : {false, true}) {
      SetStep("libmoecomm: timed dispatch with the handle reused " + std::to_string(i) + (gated ? " (gated)" : ""));
      sample(
          gated, [&] { return Dispatch(&handle_, true); }, gated ? &cachedGpuUs : &cachedUs,
          "moecommEpDispatch (handle reused)");
    }
  }
  dispatch.whole = Summarize(dispatchUs);
  cached.whole = Summarize(cachedUs);
  SetKernelTime(c_, &dispatch, &dispatchGpuUs);
  SetKernelTime(c_, &cached, &cachedGpuUs);
  c_.reporter->Add(dispatch);
  c_.reporter->Add(cached);
  if (combineSupported) {
    combine.whole = Summarize(combineUs);
    SetKernelTime(c_, &combine, &combineGpuUs);
    c_.reporter->Add(combine);
  } else {
    ReportNotSupported(c_, "combine", kMode, "moecommEpCombine: " + combineWhy);
  }
  return ok;
}

}  // namespace

bool RunLibmoecommNormal(const RunnerContext& context) {
  NormalRunner runner(context);
  return runner.Run();
}

}  // namespace moecomm_bench
