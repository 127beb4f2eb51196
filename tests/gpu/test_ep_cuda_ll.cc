// The CUDA EP backend, low-latency mode, against the pure host reference
// (src/ep/host_reference.h): every element of every output, bitwise (the FP8 cast, its scales
// and the combine's fmaf chain are exact by the spec, so there is no tolerance). Outputs are
// poisoned first and compared whole, which also checks that slots beyond recvCount are not
// written. Runs under `moecomm-run -n N moecomm_gpu_tests --gtest_filter=EpCudaLowLatency.*`.
// Every rank generates every rank's inputs from one seed (hashed from MOECOMM_UNIQUE_ID and a
// fresh per-run value agreed through the unique id), so each computes its expectations locally.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/comm.h"
#include "ep/dtype.h"
#include "ep/host_reference.h"
#include "gpu/ep_ll_common.h"
#include "gpu/gpu_common.h"
#include "gpu/nvlink_kernels.h"
#include "moecomm.h"

namespace moecomm_gpu_test {
namespace {

constexpr int kMaxTokens = 256;

struct LlCase {
  int hidden;
  int tokens;
  int topk;
  int experts;
  bool fp8;
  bool roundScale;
  bool ue8m0;
  bool idx64;
  bool sendOnly;
  bool zeroCopy;
  bool perRank = false;
  int numSms = 0;  // the EP's SM budget (the kernels' grid); 0: the default
  std::string Name() const {
    char text[200];
    std::snprintf(text, sizeof(text), "H%d_T%d_K%d_E%d_%s%s%s_%s%s%s%s%s", hidden, tokens, topk, experts,
                  fp8 ? "fp8" : "bf16", roundScale ? "_round" : "", ue8m0 ? "_ue8m0" : "", idx64 ? "i64" : "i32",
                  sendOnly ? "_sendonly" : "", zeroCopy ? "_zerocopy" : "", perRank ? "_perrank" : "",
                  numSms > 0 ? ("_sm" + std::to_string(numSms)).c_str() : "");
    return text;
  }
};

#define LL_REQUIRE(cond, text) \
  do {                         \
    if (!(cond)) return text;  \
  } while (0)

#define LL_CALL(call) LL_REQUIRE((call) == moecommSuccess, std::string(#call ": ") + moecommGetLastError(comm_))

class EpCudaLowLatency : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Gpu().multiProcess) GTEST_SKIP() << "EpCudaLowLatency runs under moecomm-run";
    if (!Gpu().multiProcessSkip.empty()) GTEST_SKIP() << Gpu().multiProcessSkip;
    comm_ = Gpu().comm;
    rank_ = comm_->rank;
    nranks_ = comm_->nranks;
    ASSERT_EQ(cudaSetDevice(Gpu().device), cudaSuccess);
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  moecommResult_t CreateEp(const ref::EpShape& shape, moecommEp_t* ep) { return CreateLowLatencyEp(comm_, shape, ep); }

  std::string RunCase(const LlCase& c, uint64_t seed);
  std::string RunDoubleBuffered(uint64_t seed);
  std::string RunGraph(uint64_t seed, bool hook, int replays, bool perRank = false);
  std::string RunMasked(uint64_t seed, bool perRank = false, bool oneSided = false);
  std::string RunSilentRank(uint64_t seed);
  std::string RunAbandoned(uint64_t seed);

  void Report(const char* test, const std::string& name, const std::string& why, int* failures) {
    std::printf("[EpCudaLowLatency rank %d] %s %s: %s%s\n", rank_, test, name.c_str(), why.empty() ? "PASS" : "FAIL ",
                why.c_str());
    std::fflush(stdout);
    if (!why.empty()) ++*failures;
  }

  moecommComm_t comm_ = nullptr;
  int rank_ = 0;
  int nranks_ = 1;
  cudaStream_t stream_ = nullptr;
};

std::string EpCudaLowLatency::RunCase(const LlCase& c, uint64_t seed) {
  const ref::EpShape shape = MakeShape(nranks_, c.experts, c.hidden, c.topk, kMaxTokens);
  const int L = shape.expertsPerRank();
  const DispatchFlags f{c.fp8, c.roundScale, c.ue8m0, c.perRank};
  const AllInputs all = MakeAllInputs(shape, c.tokens, seed);
  const RankInput& mine = all.ranks[rank_];
  std::vector<int> cumulativeBefore(L);
  for (int le = 0; le < L; ++le) cumulativeBefore[le] = 3 * le + 1;
  const ExpectedDispatch want = ExpectDispatch(shape, all, rank_, nullptr, f, cumulativeBefore);

  moecommEp_t ep = nullptr;
  LL_CALL(CreateLowLatencyEp(comm_, shape, &ep, c.numSms));
  DeviceInputs in;
  in.Allocate(shape);
  in.Load(mine, c.idx64, stream_);
  DeviceDispatchOut out;
  out.Allocate(shape, f);
  out.Poison(stream_);
  cudaMemcpyAsync(out.cumulative, cumulativeBefore.data(), L * 4, cudaMemcpyHostToDevice, stream_);
  std::string why;
  moecommEpHandle_t handle = nullptr;
  moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(mine.numTokens, in, c.idx64, f, out);
  if (c.sendOnly) dargs.flags |= MOECOMM_LL_SEND_ONLY;
  if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
    why = std::string("dispatch: ") + moecommGetLastError(comm_);
  } else if (c.sendOnly && moecommEpComplete(ep, handle, stream_) != moecommSuccess) {
    why = std::string("complete (dispatch): ") + moecommGetLastError(comm_);
  } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
    why = "cudaStreamSynchronize after dispatch failed";
  }
  if (why.empty()) why = AsyncError(comm_);
  if (why.empty()) why = CompareDispatch("", want, out, f, true, true);

  void* y = nullptr;
  void* combined = nullptr;
  if (why.empty()) {
    const uint64_t ySeed = seed * 31 + 7;
    const std::vector<uint16_t> hostY = ExpertOutputs(shape, ySeed, rank_, want.count.data(), false);
    const std::vector<uint16_t> wantOut = ExpectCombine(shape, all, rank_, nullptr, nullptr, ySeed, c.perRank);
    // The data must tell the two forms apart, or a kernel running the wrong one would pass.
    if (c.perRank && c.tokens >= 16 && c.topk > 1 && nranks_ > 1 &&
        wantOut == ExpectCombine(shape, all, rank_, nullptr, nullptr, ySeed, false)) {
      why = "per-rank and per-expert expectations are identical for this data";
    }
    const void* x = nullptr;
    if (c.zeroCopy) {
      if (moecommEpLowLatencyCombineBuffer(ep, &y) != moecommSuccess || y == nullptr) {
        why = std::string("moecommEpLowLatencyCombineBuffer: ") + moecommGetLastError(comm_);
      } else {
        cudaMemcpyAsync(y, hostY.data(), hostY.size() * 2, cudaMemcpyHostToDevice, stream_);
      }
    } else {
      y = ToDevice(hostY);
      x = y;
    }
    combined = DeviceAlloc(wantOut.size() * 2);
    cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
    moecommEpLowLatencyCombineArgs_t cargs = CombineArgs(x, in, c.idx64, combined, c.perRank);
    cargs.flags = (c.sendOnly ? MOECOMM_LL_SEND_ONLY : 0u) | (c.zeroCopy ? MOECOMM_LL_ZERO_COPY : 0u);
    if (!why.empty()) {
    } else if (moecommEpLowLatencyCombine(ep, &cargs, handle, stream_) != moecommSuccess) {
      why = std::string("combine: ") + moecommGetLastError(comm_);
    } else if (c.sendOnly && moecommEpComplete(ep, handle, stream_) != moecommSuccess) {
      why = std::string("complete (combine): ") + moecommGetLastError(comm_);
    } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
      why = "cudaStreamSynchronize after combine failed";
    }
    if (why.empty()) why = AsyncError(comm_);
    if (why.empty()) why = CompareBytes("combine out", wantOut.data(), combined, wantOut.size() * 2, 2);
    if (!c.zeroCopy) cudaFree(y);
    cudaFree(combined);
  }
  if (handle != nullptr) moecommEpHandleDestroy(handle);
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  in.Free();
  out.Free();
  return why;
}

// Two send-only dispatches in flight, a third refused, completed in reverse order; then two
// send-only combines, completed in order.
std::string EpCudaLowLatency::RunDoubleBuffered(uint64_t seed) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, 128);
  const DispatchFlags f{true, false, false};
  const int L = shape.expertsPerRank();
  AllInputs all[2] = {MakeAllInputs(shape, 128, seed), MakeAllInputs(shape, 100, seed + 1)};
  moecommEp_t ep = nullptr;
  LL_CALL(CreateEp(shape, &ep));
  DeviceInputs in[2];
  DeviceDispatchOut out[2];
  ExpectedDispatch want[2];
  moecommEpHandle_t handles[2] = {nullptr, nullptr};
  std::string why;
  // The second dispatch is completed on another stream, while the caller's stream is still
  // held back by a spin kernel ahead of both send halves: the receive half must wait for its
  // send half (the library orders it after the send half's event), or it reads a slot that
  // holds nothing of this operation yet and the comparison below fails.
  cudaStream_t other = nullptr;
  if (cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking) != cudaSuccess) why = "cudaStreamCreate failed";
  for (int i = 0; i < 2; ++i) {
    in[i].Allocate(shape);
    in[i].Load(all[i].ranks[rank_], true, stream_);
    out[i].Allocate(shape, f);
    out[i].Poison(stream_);
    cudaMemsetAsync(out[i].cumulative, 0, L * 4, stream_);
    want[i] = ExpectDispatch(shape, all[i], rank_, nullptr, f, std::vector<int>(L, 0));
    if (i == 0 && why.empty() && LaunchSpin(stream_, 20000) != 0) why = "spin kernel launch failed";
    moecommEpLowLatencyDispatchArgs_t args = DispatchArgs(all[i].ranks[rank_].numTokens, in[i], true, f, out[i]);
    args.flags |= MOECOMM_LL_SEND_ONLY;
    if (why.empty() && moecommEpLowLatencyDispatch(ep, &args, &handles[i], stream_) != moecommSuccess) {
      why = "dispatch " + std::to_string(i) + ": " + moecommGetLastError(comm_);
    }
  }
  if (why.empty()) {
    moecommEpLowLatencyDispatchArgs_t args = DispatchArgs(all[0].ranks[rank_].numTokens, in[0], true, f, out[0]);
    moecommEpHandle_t third = nullptr;
    const moecommResult_t result = moecommEpLowLatencyDispatch(ep, &args, &third, stream_);
    const std::string text = moecommGetLastError(comm_);
    if (result != moecommInvalidUsage || text.find("already in flight") == std::string::npos) {
      why = "third dispatch in flight: got " + std::string(moecommGetErrorString(result)) + " (" + text + ")";
    }
  }
  for (int i = 1; i >= 0 && why.empty(); --i) {
    if (moecommEpComplete(ep, handles[i], i == 1 ? other : stream_) != moecommSuccess) {
      why = "complete " + std::to_string(i) + ": " + moecommGetLastError(comm_);
    }
  }
  if (why.empty() && (cudaStreamSynchronize(other) != cudaSuccess || cudaStreamSynchronize(stream_) != cudaSuccess)) {
    why = "cudaStreamSynchronize failed";
  }
  if (why.empty()) why = AsyncError(comm_);
  for (int i = 0; i < 2 && why.empty(); ++i) {
    why = CompareDispatch("op" + std::to_string(i) + " ", want[i], out[i], f, true, true);
  }
  void* ys[2] = {nullptr, nullptr};
  void* outs[2] = {nullptr, nullptr};
  std::vector<uint16_t> wantOut[2];
  for (int i = 0; i < 2 && why.empty(); ++i) {
    const uint64_t ySeed = seed * 17 + i;
    ys[i] = ToDevice(ExpertOutputs(shape, ySeed, rank_, want[i].count.data(), false));
    wantOut[i] = ExpectCombine(shape, all[i], rank_, nullptr, nullptr, ySeed);
    outs[i] = DeviceAlloc(wantOut[i].size() * 2);
    cudaMemsetAsync(outs[i], 0xff, wantOut[i].size() * 2, stream_);
    moecommEpLowLatencyCombineArgs_t args = CombineArgs(ys[i], in[i], true, outs[i]);
    args.flags = MOECOMM_LL_SEND_ONLY;
    if (moecommEpLowLatencyCombine(ep, &args, handles[i], stream_) != moecommSuccess) {
      why = "combine " + std::to_string(i) + ": " + moecommGetLastError(comm_);
    }
  }
  for (int i = 0; i < 2 && why.empty(); ++i) {
    if (moecommEpComplete(ep, handles[i], stream_) != moecommSuccess) {
      why = "complete combine " + std::to_string(i) + ": " + moecommGetLastError(comm_);
    }
  }
  if (why.empty() && cudaStreamSynchronize(stream_) != cudaSuccess) why = "cudaStreamSynchronize failed";
  if (why.empty()) why = AsyncError(comm_);
  for (int i = 0; i < 2 && why.empty(); ++i) {
    why = CompareBytes("combine out op" + std::to_string(i), wantOut[i].data(), outs[i], wantOut[i].size() * 2, 2);
  }
  for (int i = 0; i < 2; ++i) {
    if (handles[i] != nullptr) moecommEpHandleDestroy(handles[i]);
    in[i].Free();
    out[i].Free();
    cudaFree(ys[i]);
    cudaFree(outs[i]);
  }
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  if (other != nullptr) cudaStreamDestroy(other);
  return why;
}

// Dispatch + combine captured once (with the hook: send-only + complete for both), replayed
// `replays` times; before each replay the inputs change (cudaMemcpyAsync on the stream) and
// after it every output is checked, cumulative statistics included.
std::string EpCudaLowLatency::RunGraph(uint64_t seed, bool hook, int replays, bool perRank) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, 64);
  const DispatchFlags f{true, true, false, perRank};
  const int L = shape.expertsPerRank();
  const int T = 64;
  moecommEp_t ep = nullptr;
  LL_CALL(CreateEp(shape, &ep));
  DeviceInputs in;
  in.Allocate(shape);
  DeviceDispatchOut out;
  out.Allocate(shape, f);
  const uint64_t ySeed = seed ^ 0x5a5a;
  void* y = ToDevice(ExpertOutputs(shape, ySeed, rank_, nullptr, true));
  void* combined = DeviceAlloc(static_cast<size_t>(shape.maxTokensPerRank) * shape.hidden * 2);
  cudaMemsetAsync(out.cumulative, 0, L * 4, stream_);
  // The graph is captured with the first replay's inputs loaded (T fixed per rank).
  AllInputs all = MakeAllInputs(shape, T, seed);
  in.Load(all.ranks[rank_], true, stream_);
  std::string why;
  if (cudaStreamSynchronize(stream_) != cudaSuccess) why = "cudaStreamSynchronize before capture failed";
  const int myTokens = all.ranks[rank_].numTokens;
  moecommEpHandle_t handle = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (why.empty() && cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    why = "cudaStreamBeginCapture failed";
  }
  if (why.empty()) {
    moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(myTokens, in, true, f, out);
    moecommEpLowLatencyCombineArgs_t cargs = CombineArgs(y, in, true, combined, perRank);
    if (hook) {
      dargs.flags |= MOECOMM_LL_SEND_ONLY;
      cargs.flags |= MOECOMM_LL_SEND_ONLY;
    }
    if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
      why = std::string("captured dispatch: ") + moecommGetLastError(comm_);
    } else if (hook && moecommEpComplete(ep, handle, stream_) != moecommSuccess) {
      why = std::string("captured complete: ") + moecommGetLastError(comm_);
    } else if (moecommEpLowLatencyCombine(ep, &cargs, handle, stream_) != moecommSuccess) {
      why = std::string("captured combine: ") + moecommGetLastError(comm_);
    } else if (hook && moecommEpComplete(ep, handle, stream_) != moecommSuccess) {
      why = std::string("captured complete: ") + moecommGetLastError(comm_);
    }
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    if (why.empty() && ended != cudaSuccess) why = std::string("cudaStreamEndCapture: ") + cudaGetErrorName(ended);
  }
  if (why.empty() && cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) why = "cudaGraphInstantiate failed";
  std::vector<int> cumulative(L, 0);
  int checked = 0;
  std::string firstBad;
  for (int replay = 0; replay < replays && why.empty(); ++replay) {
    if (replay > 0) {
      all = MakeAllInputs(shape, T, seed + 1000003ull * replay);
      in.Load(all.ranks[rank_], true, stream_);
    }
    out.Poison(stream_);
    cudaMemsetAsync(combined, 0xff, static_cast<size_t>(myTokens) * shape.hidden * 2, stream_);
    if (cudaGraphLaunch(exec, stream_) != cudaSuccess) {
      why = "cudaGraphLaunch failed at replay " + std::to_string(replay);
      break;
    }
    const ExpectedDispatch want = ExpectDispatch(shape, all, rank_, nullptr, f, cumulative);
    cumulative = want.cumulative;
    const std::vector<uint16_t> wantOut = ExpectCombine(shape, all, rank_, nullptr, nullptr, ySeed, perRank);
    if (cudaStreamSynchronize(stream_) != cudaSuccess) {
      why = "cudaStreamSynchronize failed at replay " + std::to_string(replay);
      break;
    }
    // A mismatch is recorded but the replays go on, so the peers are not left waiting.
    const std::string tag = "replay " + std::to_string(replay) + " ";
    std::string bad = AsyncError(comm_);
    if (bad.empty()) bad = CompareDispatch(tag, want, out, f, true, true);
    if (bad.empty()) bad = CompareBytes(tag + "combine out", wantOut.data(), combined, wantOut.size() * 2, 2);
    if (bad.empty()) {
      ++checked;
    } else if (firstBad.empty()) {
      firstBad = bad;
    }
  }
  if (why.empty() && !firstBad.empty()) why = firstBad + " (" + std::to_string(replays - checked) + " replays bad)";
  if (why.empty() && checked != replays) why = "only " + std::to_string(checked) + " replays checked";
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (handle != nullptr) moecommEpHandleDestroy(handle);
  cudaStreamSynchronize(stream_);
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  in.Free();
  out.Free();
  cudaFree(y);
  cudaFree(combined);
  return why;
}

// moecommEpSetRankMask: every rank masks the last one, which masks everybody. The others'
// results then leave it out; after moecommEpClearRankMask everything is back.
// oneSided: only rank 0 masks the last rank; the last rank learns it from the flags of rank 0's
// first send half (they say "absent") and masks rank 0 at once, without waiting for
// MOECOMM_LL_TIMEOUT (20 s here; the masked round must take far less), so the effective masks
// are symmetric between those two and the middle ranks mask nobody.
std::string EpCudaLowLatency::RunMasked(uint64_t seed, bool perRank, bool oneSided) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 4096, 8, 128);
  const DispatchFlags f{true, false, true, perRank};
  const int R = nranks_;
  const int L = shape.expertsPerRank();
  const int last = R - 1;
  std::vector<int> masksAll(R * R, 0);  // the masks in effect during the masked round
  std::vector<int> setMask(R, 0);       // what this rank passes to moecommEpSetRankMask
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < R; ++s) {
      masksAll[r * R + s] =
          oneSided ? ((r == 0 && s == last) || (r == last && s == 0) ? 1 : 0) : ((r == last) != (s == last) ? 1 : 0);
    }
  }
  const int* myMask = masksAll.data() + rank_ * R;
  for (int s = 0; s < R; ++s) setMask[s] = oneSided ? (rank_ == 0 && s == last ? 1 : 0) : myMask[s];
  ScopedEnv timeout("MOECOMM_LL_TIMEOUT", "20000");  // read by moecommEpCreate
  moecommEp_t ep = nullptr;
  LL_CALL(CreateEp(shape, &ep));
  std::string why;
  if (moecommEpSetRankMask(ep, setMask.data()) != moecommSuccess)
    why = std::string("SetRankMask: ") + moecommGetLastError(comm_);
  std::vector<int> got(R, -1);
  if (why.empty() && (moecommEpGetRankMask(ep, got.data()) != moecommSuccess ||
                      !std::equal(got.begin(), got.end(), setMask.begin()))) {
    why = "GetRankMask does not return the mask just set";
  }
  const auto started = std::chrono::steady_clock::now();
  DeviceInputs in;
  in.Allocate(shape);
  DeviceDispatchOut out;
  out.Allocate(shape, f);
  for (int pass = 0; pass < 2 && why.empty(); ++pass) {
    const bool masked = pass == 0;
    const AllInputs all = MakeAllInputs(shape, 128, seed + pass);
    in.Load(all.ranks[rank_], false, stream_);
    out.Poison(stream_);
    cudaMemsetAsync(out.cumulative, 0, L * 4, stream_);
    const ExpectedDispatch want =
        ExpectDispatch(shape, all, rank_, masked ? myMask : nullptr, f, std::vector<int>(L, 0));
    moecommEpHandle_t handle = nullptr;
    moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(all.ranks[rank_].numTokens, in, false, f, out);
    const std::string tag = masked ? "masked " : "cleared ";
    if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
      why = tag + "dispatch: " + moecommGetLastError(comm_);
      break;
    }
    const uint64_t ySeed = seed * 5 + pass;
    void* y = nullptr;
    void* combined = nullptr;
    std::vector<uint16_t> wantOut;
    if (cudaStreamSynchronize(stream_) != cudaSuccess) why = tag + "cudaStreamSynchronize failed";
    if (why.empty()) why = AsyncError(comm_);
    if (why.empty()) why = CompareDispatch(tag, want, out, f, true, true);
    if (why.empty()) {
      y = ToDevice(ExpertOutputs(shape, ySeed, rank_, want.count.data(), false));
      wantOut = ExpectCombine(shape, all, rank_, masked ? masksAll.data() : nullptr, masked ? myMask : nullptr, ySeed,
                              perRank);
      combined = DeviceAlloc(wantOut.size() * 2);
      cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
      why = CombineAndCompare(comm_, ep, CombineArgs(y, in, false, combined, perRank), handle, stream_, wantOut, tag);
    }
    cudaFree(y);
    cudaFree(combined);
    moecommEpHandleDestroy(handle);
    if (why.empty() && masked) {
      // Nobody timed out: the mask is exactly the one in effect (one-sided: the last rank now
      // masks rank 0 too), and the round took far less than the timeout. Then clear it.
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      if (moecommEpGetRankMask(ep, got.data()) != moecommSuccess || !std::equal(got.begin(), got.end(), myMask)) {
        why = "GetRankMask after the masked round is not the mask in effect";
      } else if (seconds > 10.0) {
        why = "the masked round took " + std::to_string(seconds) + " s: a rank waited for MOECOMM_LL_TIMEOUT";
      } else if (moecommEpClearRankMask(ep) != moecommSuccess) {
        why = std::string("ClearRankMask: ") + moecommGetLastError(comm_);
      }
    }
  }
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  in.Free();
  out.Free();
  return why;
}

// The last rank stops making low-latency calls (as a hung or dead rank would): the others'
// dispatch times out on it after MOECOMM_LL_TIMEOUT, masks it, and completes without it; the
// combine skips its experts; moecommEpGetRankMask shows it.
std::string EpCudaLowLatency::RunSilentRank(uint64_t seed) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, 64);
  const DispatchFlags f{false, false, false};
  const int R = nranks_;
  const int L = shape.expertsPerRank();
  const int silent = R - 1;
  moecommEp_t ep = nullptr;
  {
    ScopedEnv timeout("MOECOMM_LL_TIMEOUT", "500");  // read by moecommEpCreate
    LL_CALL(CreateEp(shape, &ep));
  }
  DeviceInputs in;
  in.Allocate(shape);
  DeviceDispatchOut out;
  out.Allocate(shape, f);
  std::string why;
  for (int pass = 0; pass < 2 && why.empty(); ++pass) {
    const bool withSilent = pass == 1;
    if (withSilent && rank_ == silent) break;  // skips the operation entirely
    std::vector<int> masksAll(R * R, 0);
    if (withSilent) {
      for (int r = 0; r < R; ++r) masksAll[r * R + silent] = r != silent ? 1 : 0;
    }
    const int* myMask = masksAll.data() + rank_ * R;
    const AllInputs all = MakeAllInputs(shape, 64, seed + pass);
    in.Load(all.ranks[rank_], true, stream_);
    out.Poison(stream_);
    cudaMemsetAsync(out.cumulative, 0, L * 4, stream_);
    const ExpectedDispatch want = ExpectDispatch(shape, all, rank_, myMask, f, std::vector<int>(L, 0));
    const std::string tag = withSilent ? "silent " : "warm-up ";
    moecommEpHandle_t handle = nullptr;
    moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(all.ranks[rank_].numTokens, in, true, f, out);
    if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
      why = tag + "dispatch: " + moecommGetLastError(comm_);
      break;
    }
    if (cudaStreamSynchronize(stream_) != cudaSuccess) why = tag + "cudaStreamSynchronize failed";
    if (why.empty()) why = AsyncError(comm_);
    if (why.empty()) why = CompareDispatch(tag, want, out, f, true, true);
    std::vector<int> gotMask(R, -1);
    if (why.empty() && (moecommEpGetRankMask(ep, gotMask.data()) != moecommSuccess ||
                        !std::equal(gotMask.begin(), gotMask.end(), myMask))) {
      why = tag + "GetRankMask does not show the expected mask (rank " + std::to_string(silent) +
            " masked: " + std::to_string(gotMask[silent]) + ")";
    }
    void* y = nullptr;
    void* combined = nullptr;
    if (why.empty()) {
      const uint64_t ySeed = seed * 3 + pass;
      y = ToDevice(ExpertOutputs(shape, ySeed, rank_, want.count.data(), false));
      const std::vector<uint16_t> wantOut = ExpectCombine(shape, all, rank_, masksAll.data(), myMask, ySeed);
      combined = DeviceAlloc(wantOut.size() * 2);
      cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
      why = CombineAndCompare(comm_, ep, CombineArgs(y, in, true, combined), handle, stream_, wantOut, tag);
    }
    cudaFree(y);
    cudaFree(combined);
    moecommEpHandleDestroy(handle);
  }
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  in.Free();
  out.Free();
  return why;
}

// A send-only dispatch whose handle is destroyed without moecommEpComplete on every rank, then
// two full rounds on the same EP: the abandoned slot must be released on the device (no rank
// times out on it or masks anyone), and both rounds match the reference.
std::string EpCudaLowLatency::RunAbandoned(uint64_t seed) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, 128);
  const DispatchFlags f{true, false, false};
  const int L = shape.expertsPerRank();
  moecommEp_t ep = nullptr;
  {
    ScopedEnv timeout("MOECOMM_LL_TIMEOUT", "2000");  // a failure shows in 2 s, not 10
    LL_CALL(CreateEp(shape, &ep));
  }
  std::string why;
  for (int round = 0; round < 3 && why.empty(); ++round) {
    const AllInputs all = MakeAllInputs(shape, 96 + round, seed + round);
    DeviceInputs in;
    DeviceDispatchOut out;
    PrepareRound(shape, all.ranks[rank_], false, f, stream_, &in, &out);
    moecommEpLowLatencyDispatchArgs_t args = DispatchArgs(all.ranks[rank_].numTokens, in, false, f, out);
    moecommEpHandle_t handle = nullptr;
    if (round == 0) {
      // Abandoned: sent, never received.
      args.flags |= MOECOMM_LL_SEND_ONLY;
      if (moecommEpLowLatencyDispatch(ep, &args, &handle, stream_) != moecommSuccess) {
        why = std::string("send-only dispatch: ") + moecommGetLastError(comm_);
      } else if (moecommEpHandleDestroy(handle) != moecommSuccess) {
        why = std::string("destroying the send-only handle: ") + moecommGetLastError(comm_);
      }
      handle = nullptr;
      if (why.empty() && cudaStreamSynchronize(stream_) != cudaSuccess) why = "cudaStreamSynchronize failed";
    } else {
      const ExpectedDispatch want = ExpectDispatch(shape, all, rank_, nullptr, f, std::vector<int>(L, 0));
      if (moecommEpLowLatencyDispatch(ep, &args, &handle, stream_) != moecommSuccess) {
        why = std::string("dispatch: ") + moecommGetLastError(comm_);
      } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
        why = "cudaStreamSynchronize after dispatch failed";
      }
      if (why.empty()) why = AsyncError(comm_);
      if (why.empty()) why = CompareDispatch("round " + std::to_string(round) + " ", want, out, f, true, true);
      if (why.empty()) {
        const uint64_t ySeed = seed * 13 + round;
        void* y = ToDevice(ExpertOutputs(shape, ySeed, rank_, want.count.data(), false));
        const std::vector<uint16_t> wantOut = ExpectCombine(shape, all, rank_, nullptr, nullptr, ySeed);
        void* combined = DeviceAlloc(wantOut.size() * 2);
        cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
        why = CombineAndCompare(comm_, ep, CombineArgs(y, in, false, combined), handle, stream_, wantOut,
                                "round " + std::to_string(round) + " ");
        cudaFree(y);
        cudaFree(combined);
      }
    }
    if (handle != nullptr) moecommEpHandleDestroy(handle);
    in.Free();
    out.Free();
  }
  std::vector<int> mask(nranks_, -1);
  if (moecommEpGetRankMask(ep, mask.data()) != moecommSuccess && why.empty()) {
    why = std::string("GetRankMask: ") + moecommGetLastError(comm_);
  }
  for (int r = 0; r < nranks_; ++r) {
    if (mask[r] != 0) why += (why.empty() ? "" : "; ") + ("rank " + std::to_string(r) + " is masked");
  }
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty())
    why = std::string("destroy: ") + moecommGetLastError(comm_);
  return why;
}

TEST_F(EpCudaLowLatency, MatchesHostReference) {
  const std::vector<LlCase> cases = {
      // H, T, K, E, fp8, round, ue8m0, idx64, sendOnly, zeroCopy
      {7168, 128, 8, 64, true, false, false, true, false, false},
      {7168, 128, 8, 64, true, true, false, true, true, false},
      {7168, 256, 16, 64, true, false, true, false, false, true},
      {4096, 16, 8, 32, false, false, false, true, true, true},
      {2048, 1, 1, 32, true, false, false, true, false, false},
      {2048, 256, 16, 32, false, false, false, false, false, false},
      {4096, 128, 1, 64, true, false, true, true, true, false},
      {2048, 16, 16, 64, true, true, false, false, false, true},
      {7168, 1, 16, 32, false, false, false, true, true, false},
      {4096, 256, 8, 32, true, false, false, false, true, true},
      // MOECOMM_LL_PER_RANK_COMBINE
      {7168, 128, 8, 64, true, false, false, true, false, false, true},
      {7168, 256, 16, 64, true, false, true, false, true, true, true},
      {4096, 16, 8, 32, false, false, false, true, true, false, true},
      {2048, 1, 1, 32, true, false, false, false, false, false, true},
      {2048, 256, 16, 32, false, false, false, true, false, true, true},
      // One block: the senders' lists span several windows of (expert, chunk) items and the
      // receive copies thousands of rows in batches.
      {2048, 256, 8, 128, true, false, false, true, false, false, false, 1},
      {2048, 256, 8, 128, false, false, false, false, true, false, true, 1},
  };
  const uint64_t seed = BaseSeed();
  int failures = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    LlCase c = cases[i];
    c.experts = ExpertsFor(c.experts, nranks_);  // (so that the name says what ran)
    Report("case", c.Name(), RunCase(c, seed + i), &failures);
  }
  EXPECT_EQ(failures, 0);
}

TEST_F(EpCudaLowLatency, DoubleBufferedSendOnly) {
  int failures = 0;
  Report("double-buffered", "send-only x2 + refused third", RunDoubleBuffered(BaseSeed() + 77), &failures);
  EXPECT_EQ(failures, 0);
}

TEST_F(EpCudaLowLatency, AbandonedSendOnlyIsReleased) {
  int failures = 0;
  Report("abandoned", "send-only handle destroyed, then two rounds", RunAbandoned(BaseSeed() + 55), &failures);
  EXPECT_EQ(failures, 0);
}

TEST_F(EpCudaLowLatency, GraphReplay) {
  int failures = 0;
  Report("graph", "send-only + complete, 1000 replays", RunGraph(BaseSeed() + 101, true, 1000), &failures);
  Report("graph", "plain, 200 replays", RunGraph(BaseSeed() + 202, false, 200), &failures);
  Report("graph", "per-rank combine, send-only + complete, 200 replays", RunGraph(BaseSeed() + 203, true, 200, true),
         &failures);
  EXPECT_EQ(failures, 0);
}

TEST_F(EpCudaLowLatency, RankMask) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  int failures = 0;
  Report("mask", "set / clear", RunMasked(BaseSeed() + 303), &failures);
  Report("mask", "set / clear, per-rank combine", RunMasked(BaseSeed() + 304, true), &failures);
  Report("mask", "one-sided (only rank 0 masks the last rank)", RunMasked(BaseSeed() + 305, false, true), &failures);
  EXPECT_EQ(failures, 0);
}

TEST_F(EpCudaLowLatency, SilentRankIsMasked) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  int failures = 0;
  Report("timeout", "last rank stops calling", RunSilentRank(BaseSeed() + 404), &failures);
  EXPECT_EQ(failures, 0);
}

}  // namespace
}  // namespace moecomm_gpu_test
