// A low-latency call that fails on one rank only (bad arguments, caught on the host before any
// kernel is queued) must still consume the operation on that rank, so that its next call pairs
// with its peers' next call, and must tell the peers: they finish the operation without that
// rank's part, report moecommRemoteError through moecommCommGetAsyncError, and do not mask it.
//
//   moecomm-run -n N moecomm_gpu_tests --gtest_filter=EpCudaLowLatencyFailure.*
//
// (ctest gpu_EpCudaLowLatencyFailure_n<N>). The async error stays raised on the survivors'
// communicator, so the suite runs only when the filter names it, in a job of its own.
//
// Rounds (the last rank F is the one that fails; MOECOMM_LL_TIMEOUT is 20 s, so a peer that
// waited for F instead of reading its failure notice would take that long and mask F):
//   0  a full round on every rank, every output checked;
//   1  every dispatch succeeds; F's combine has out = NULL (InvalidArgument); the others'
//      combine matches the reference without F's experts, promptly, masking nobody, and their
//      async error turns from Success (after the dispatch) to RemoteError;
//   2  a full round (F in step again);
//   3  F's dispatch has numTokens > maxTokensPerRank (InvalidArgument); the others' dispatch
//      matches the reference without F's tokens, promptly, masking nobody (their async error
//      is RemoteError already); they destroy their handles without combining;
//   4  a full round again.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu/ep_ll_common.h"
#include "gpu/gpu_common.h"
#include "moecomm.h"

namespace moecomm_gpu_test {
namespace {

constexpr int kTokens = 64;
constexpr double kPromptSeconds = 5;  // far below the 20 s timeout: the notice arrived

class EpCudaLowLatencyFailure : public OwnJobTest {
 protected:
  void SetUp() override {
    Enter("EpCudaLowLatencyFailure", "leaves an async error on the communicator");
    failing_ = nranks_ - 1;
  }

  // One round; failDispatch / failCombine: the failing rank's call of that kind is bad.
  std::string RunRound(moecommEp_t ep, const ref::EpShape& shape, int index, bool failDispatch, bool failCombine,
                       uint64_t seed);

  void Say(const std::string& what) const {
    std::printf("[EpCudaLowLatencyFailure rank %d] %s\n", rank_, what.c_str());
    std::fflush(stdout);
  }

  int failing_ = 0;
  bool survivorSawFailure_ = false;  // a survivor that has seen RemoteError (sticky) from then on
};

std::string EpCudaLowLatencyFailure::RunRound(moecommEp_t ep, const ref::EpShape& shape, int index, bool failDispatch,
                                              bool failCombine, uint64_t seed) {
  const DispatchFlags f{true, false, false};
  const int R = nranks_;
  const int L = shape.expertsPerRank();
  const bool iFail = rank_ == failing_;
  const std::string tag = "round " + std::to_string(index) + " ";
  const AllInputs all = MakeAllInputs(shape, kTokens, seed);
  // The survivors see the failing rank's part as absent in the failing call's operation.
  std::vector<int> absent(R, 0);
  if ((failDispatch || failCombine) && !iFail) absent[failing_] = 1;
  const moecommResult_t allowed = survivorSawFailure_ || (failDispatch && !iFail) ? moecommRemoteError : moecommSuccess;
  DeviceInputs in;
  DeviceDispatchOut out;
  PrepareRound(shape, all.ranks[rank_], true, f, stream_, &in, &out);
  const ExpectedDispatch want =
      ExpectDispatch(shape, all, rank_, failDispatch ? absent.data() : nullptr, f, std::vector<int>(L, 0));

  std::string why;
  moecommEpHandle_t handle = nullptr;
  moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(all.ranks[rank_].numTokens, in, true, f, out);
  if (failDispatch && iFail) dargs.numTokens = shape.maxTokensPerRank + 1;
  const auto start = std::chrono::steady_clock::now();
  const moecommResult_t dispatched = moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_);
  const bool synced = cudaStreamSynchronize(stream_) == cudaSuccess;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failDispatch && iFail) {
    if (dispatched != moecommInvalidArgument) {
      why = tag + "the bad dispatch returned " + moecommGetErrorString(dispatched) + ", not InvalidArgument";
    } else if (handle != nullptr) {
      why = tag + "the bad dispatch returned a handle";
    }
  } else if (dispatched != moecommSuccess) {
    why = tag + "dispatch: " + moecommGetLastError(comm_);
  }
  if (why.empty() && !synced) why = tag + "cudaStreamSynchronize after the dispatch failed";
  if (why.empty() && seconds > kPromptSeconds) why = tag + "the dispatch took " + std::to_string(seconds) + " s";
  if (why.empty()) why = AsyncError(comm_, allowed);
  if (why.empty() && !(failDispatch && iFail)) why = CompareDispatch(tag, want, out, f, true, true);
  std::vector<int> mask(R, -1);
  if (why.empty() && moecommEpGetRankMask(ep, mask.data()) != moecommSuccess) {
    why = tag + "GetRankMask: " + moecommGetLastError(comm_);
  }
  for (int r = 0; r < R && why.empty(); ++r) {
    if (mask[r] != 0) why = tag + "rank " + std::to_string(r) + " is masked after the dispatch";
  }
  double combineSeconds = 0;
  if (why.empty() && !failDispatch) {
    const uint64_t ySeed = Mix(seed * 5 + index);
    void* y = ToDevice(ExpertOutputs(shape, ySeed, rank_, want.count.data(), false));
    const std::vector<uint16_t> wantOut =
        ExpectCombine(shape, all, rank_, nullptr, failCombine ? absent.data() : nullptr, ySeed);
    void* combined = DeviceAlloc(wantOut.size() * 2);
    cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
    if (failCombine && iFail) {
      moecommEpLowLatencyCombineArgs_t cargs = CombineArgs(y, in, true, nullptr);
      const moecommResult_t combinedResult = moecommEpLowLatencyCombine(ep, &cargs, handle, stream_);
      if (combinedResult != moecommInvalidArgument) {
        why = tag + "the bad combine returned " + moecommGetErrorString(combinedResult) + ", not InvalidArgument";
      } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
        why = tag + "cudaStreamSynchronize after the bad combine failed";
      }
    } else {
      const auto combineStart = std::chrono::steady_clock::now();
      why = CombineAndCompare(comm_, ep, CombineArgs(y, in, true, combined), handle, stream_, wantOut, tag,
                              failCombine ? moecommRemoteError : allowed);
      combineSeconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - combineStart).count();
      if (why.empty() && combineSeconds > kPromptSeconds) {
        why = tag + "the combine took " + std::to_string(combineSeconds) + " s";
      }
      if (why.empty() && failCombine && !survivorSawFailure_) {
        // The first failure this rank hears of: the async error must say so now.
        moecommResult_t async = moecommSuccess;
        moecommCommGetAsyncError(comm_, &async);
        if (async != moecommRemoteError) {
          why = tag + "async error " + moecommGetErrorString(async) + " after the combine, expected RemoteError";
        }
        survivorSawFailure_ = true;
      }
      if (why.empty() && moecommEpGetRankMask(ep, mask.data()) != moecommSuccess) {
        why = tag + "GetRankMask: " + moecommGetLastError(comm_);
      }
      for (int r = 0; r < R && why.empty(); ++r) {
        if (mask[r] != 0) why = tag + "rank " + std::to_string(r) + " is masked after the combine";
      }
    }
    cudaFree(y);
    cudaFree(combined);
  }
  if (handle != nullptr) moecommEpHandleDestroy(handle);
  in.Free();
  out.Free();
  char text[200];
  std::snprintf(text, sizeof(text), "%s(%s) dispatch %.3f s, combine %.3f s: %s", tag.c_str(),
                failDispatch  ? "bad dispatch on the last rank"
                : failCombine ? "bad combine on the last rank"
                              : "full",
                seconds, combineSeconds, why.empty() ? "PASS" : ("FAIL " + why).c_str());
  Say(text);
  return why;
}

TEST_F(EpCudaLowLatencyFailure, PeersLearnOfALocalFailure) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, kTokens);
  const uint64_t seed = BaseSeed() + 606;
  moecommEp_t ep = nullptr;
  {
    ScopedEnv timeout("MOECOMM_LL_TIMEOUT", "20000");  // read by moecommEpCreate
    ASSERT_EQ(CreateLowLatencyEp(comm_, shape, &ep), moecommSuccess) << moecommGetLastError(comm_);
  }
  std::string why = RunRound(ep, shape, 0, false, false, seed);
  if (why.empty()) why = RunRound(ep, shape, 1, false, true, seed + 1);
  if (why.empty()) why = RunRound(ep, shape, 2, false, false, seed + 2);
  if (why.empty()) why = RunRound(ep, shape, 3, true, false, seed + 3);
  if (why.empty()) why = RunRound(ep, shape, 4, false, false, seed + 4);
  EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << moecommGetLastError(comm_);
  EXPECT_EQ(why, "");
}

}  // namespace
}  // namespace moecomm_gpu_test
