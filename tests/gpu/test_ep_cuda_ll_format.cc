// Every rank must use the same row format in one low-latency operation: recvType, power-of-two
// scales (MOECOMM_LL_ROUND_SCALE / UE8M0) and MOECOMM_LL_PER_RANK_COMBINE (the sender casts,
// and sends ids and weights only for the per-rank combine). When the last rank uses another
// one, each side must treat the other as absent for that operation: results equal to the host
// reference with exactly those ranks masked (as each rank sees it), nobody masked, the async
// error InvalidArgument, and the next operation with one format complete again.
//
//   moecomm-run -n N moecomm_gpu_tests --gtest_filter=EpCudaLowLatencyFormat.*
//
// (ctest gpu_EpCudaLowLatencyFormat_n<N>). The async error stays raised on the communicator,
// so the suite runs only when the filter names it, in a job of its own; it is checked to turn
// from Success to InvalidArgument at the first mismatch.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "gpu/ep_ll_common.h"
#include "gpu/gpu_common.h"
#include "moecomm.h"

namespace moecomm_gpu_test {
namespace {

constexpr int kTokens = 64;

class EpCudaLowLatencyFormat : public OwnJobTest {
 protected:
  void SetUp() override { Enter("EpCudaLowLatencyFormat", "leaves an async error on the communicator"); }

  // One dispatch + combine with this rank's flags `f`; masksAll: [R][R] what each rank treats
  // as absent (null: nobody); allowed: the async error this rank may already have.
  std::string RunRound(moecommEp_t ep, const ref::EpShape& shape, const std::string& tag, const DispatchFlags& f,
                       const int* masksAll, moecommResult_t allowed, uint64_t seed);
};

std::string EpCudaLowLatencyFormat::RunRound(moecommEp_t ep, const ref::EpShape& shape, const std::string& tag,
                                             const DispatchFlags& f, const int* masksAll, moecommResult_t allowed,
                                             uint64_t seed) {
  const int R = nranks_;
  const int L = shape.expertsPerRank();
  const int* myMask = masksAll != nullptr ? masksAll + rank_ * R : nullptr;
  const AllInputs all = MakeAllInputs(shape, kTokens, seed);
  DeviceInputs in;
  DeviceDispatchOut out;
  PrepareRound(shape, all.ranks[rank_], true, f, stream_, &in, &out);
  const ExpectedDispatch want = ExpectDispatch(shape, all, rank_, myMask, f, std::vector<int>(L, 0));
  std::string why;
  moecommEpHandle_t handle = nullptr;
  moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(all.ranks[rank_].numTokens, in, true, f, out);
  if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
    why = tag + "dispatch: " + moecommGetLastError(comm_);
  } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
    why = tag + "cudaStreamSynchronize after the dispatch failed";
  }
  if (why.empty()) why = AsyncError(comm_, allowed);
  if (why.empty()) why = CompareDispatch(tag, want, out, f, true, true);
  if (why.empty()) {
    const uint64_t ySeed = Mix(seed * 7 + 3);
    void* y = ToDevice(ExpertOutputs(shape, ySeed, rank_, want.count.data(), false));
    const std::vector<uint16_t> wantOut = ExpectCombine(shape, all, rank_, masksAll, myMask, ySeed, f.perRank);
    void* combined = DeviceAlloc(wantOut.size() * 2);
    cudaMemsetAsync(combined, 0xff, wantOut.size() * 2, stream_);
    why = CombineAndCompare(comm_, ep, CombineArgs(y, in, true, combined, f.perRank), handle, stream_, wantOut, tag,
                            allowed);
    cudaFree(y);
    cudaFree(combined);
  }
  std::vector<int> mask(R, -1);
  if (why.empty() && moecommEpGetRankMask(ep, mask.data()) != moecommSuccess) {
    why = tag + "GetRankMask: " + moecommGetLastError(comm_);
  }
  for (int r = 0; r < R && why.empty(); ++r) {
    if (mask[r] != 0) why = tag + "rank " + std::to_string(r) + " is masked (a format mismatch must not mask)";
  }
  if (handle != nullptr) moecommEpHandleDestroy(handle);
  in.Free();
  out.Free();
  std::printf("[EpCudaLowLatencyFormat rank %d] %s: %s\n", rank_, tag.c_str(),
              why.empty() ? "PASS" : ("FAIL " + why).c_str());
  std::fflush(stdout);
  return why;
}

TEST_F(EpCudaLowLatencyFormat, PeersWithAnotherRowFormatAreAbsent) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, kTokens);
  const uint64_t seed = BaseSeed() + 707;
  const int R = nranks_;
  const int odd = R - 1;
  std::vector<int> views(R * R, 0);  // the last rank and the others treat each other as absent
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < R; ++s) views[r * R + s] = (r == odd) != (s == odd) ? 1 : 0;
  }
  const DispatchFlags common{true, false, false, false};
  struct Mismatch {
    const char* name;
    DispatchFlags odd;
  };
  const Mismatch mismatches[] = {{"BF16 rows among FP8", {false, false, false, false}},
                                 {"rounded scales among plain", {true, true, false, false}},
                                 {"per-rank combine among per-entry", {true, false, false, true}}};
  moecommEp_t ep = nullptr;
  ASSERT_EQ(CreateLowLatencyEp(comm_, shape, &ep), moecommSuccess) << moecommGetLastError(comm_);
  std::string why = RunRound(ep, shape, "round 0 (one format)", common, nullptr, moecommSuccess, seed);
  int index = 1;
  for (const Mismatch& m : mismatches) {
    if (!why.empty()) break;
    const DispatchFlags& mine = rank_ == odd ? m.odd : common;
    const std::string tag = "round " + std::to_string(index) + " (" + m.name + ")";
    // The first mismatch must raise InvalidArgument, which AsyncError then allows.
    why = RunRound(ep, shape, tag, mine, views.data(), moecommInvalidArgument, seed + index);
    if (why.empty() && index == 1) {
      moecommResult_t async = moecommSuccess;
      moecommCommGetAsyncError(comm_, &async);
      if (async != moecommInvalidArgument) {
        why = tag + ": async error " + moecommGetErrorString(async) + ", expected InvalidArgument";
      }
    }
    ++index;
    if (why.empty()) {
      why = RunRound(ep, shape, "round " + std::to_string(index) + " (one format again)", common, nullptr,
                     moecommInvalidArgument, seed + index);
    }
    ++index;
  }
  EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << moecommGetLastError(comm_);
  EXPECT_EQ(why, "");
}

}  // namespace
}  // namespace moecomm_gpu_test
