// A rank of the CUDA low-latency path dies mid-run (SIGKILL, no cleanup of any kind); the
// survivors must mask it, finish their low-latency operations with results equal to the host
// reference computed with that rank masked, report it in moecommEpGetRankMask, and tear down
// (EP destroy, communicator destroy) in bounded time.
//
//   moecomm-run -n N --allow-kill N-1 moecomm_gpu_tests --gtest_filter=EpCudaLowLatencyKill.*
//
// (ctest gpu_EpCudaLowLatencyKill_n<N>). The test kills a rank of the job, so it runs only when
// the filter names its suite, never as part of a wider run, and moecomm-run must be told that
// the death is expected (--allow-kill).
//
// Sequence: every rank prepares all its inputs and expectations, creates the EP with
// MOECOMM_LL_TIMEOUT = kTimeoutMs (the creation is a collective, so the ranks start round 0
// together), and runs round 0 (dispatch + combine, every output checked). The last rank then
// raises SIGKILL on itself before round 1's dispatch: it has finished and released everything
// of round 0, and sends nothing of round 1. The survivors run round 1 (their dispatch's receive
// half times out on the dead rank and masks it) and round 2 (the rank is already masked: no
// wait), both checked against the reference with that rank masked.
//
// What the survivors still hold of the dead rank: their imported cuMem mappings of its
// low-latency buffer. The physical memory lives as long as a mapping does, so their send
// halves' stores into it (round 1, before the mask) land in memory nobody reads; the mappings
// go at EP destroy. Teardown: moecommEpDestroy unmaps the peers and takes a bootstrap barrier,
// which fails at once with moecommRemoteError (the dead rank's TCP connection reads EOF; every
// survivor is connected to it directly, so none waits for the bootstrap timeout); the EP is
// freed anyway. The bootstrap then stays failed, so moecommCommDestroy's barrier returns at
// once too. Both are accepted as Success, RemoteError or Timeout; their time is bounded.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <signal.h>

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

constexpr const char* kTimeoutMs = "2000";  // MOECOMM_LL_TIMEOUT: tolerates launch skew in round 0
constexpr int kRounds = 3;                  // round 0 with every rank, 1 and 2 without the last
constexpr int kTokens = 64;
constexpr double kTeardownBoundSeconds = 40;  // well above a bootstrap timeout; expected: well under 1 s

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool AcceptableTeardown(moecommResult_t result) {
  return result == moecommSuccess || result == moecommRemoteError || result == moecommTimeout;
}

// One round's inputs and what this rank must get, prepared before the EP exists.
struct Round {
  AllInputs all;
  std::vector<int> masksAll;  // [R receiving][R source]
  ExpectedDispatch dispatch;
  std::vector<uint16_t> expertOutputs;  // this rank's combine input [E_local, R*maxT, H]
  std::vector<uint16_t> combined;
  uint64_t ySeed = 0;
};

class EpCudaLowLatencyKill : public OwnJobTest {
 protected:
  void SetUp() override {
    Enter("EpCudaLowLatencyKill", "kills a rank of the job (under moecomm-run --allow-kill N-1)");
    victim_ = nranks_ - 1;
  }

  Round PrepareRound(const ref::EpShape& shape, const DispatchFlags& f, int round, uint64_t seed) const;
  // Dispatch + combine of one round, every output compared; "" when all matched.
  std::string RunRound(moecommEp_t ep, const Round& round, const DispatchFlags& f, int index);
  // Destroys the EP and the communicator; "" when both returned acceptably in bounded time.
  std::string Teardown(moecommEp_t ep);

  void Say(const std::string& what) const {
    std::printf("[EpCudaLowLatencyKill rank %d] %s\n", rank_, what.c_str());
    std::fflush(stdout);
  }

  int victim_ = 0;
  DeviceInputs in_;
  DeviceDispatchOut out_;
};

Round EpCudaLowLatencyKill::PrepareRound(const ref::EpShape& shape, const DispatchFlags& f, int index,
                                         uint64_t seed) const {
  const int R = nranks_;
  Round round;
  round.all = MakeAllInputs(shape, kTokens, seed + index);
  round.masksAll.assign(R * R, 0);
  if (index > 0) {
    for (int r = 0; r < R; ++r) round.masksAll[r * R + victim_] = r != victim_ ? 1 : 0;
  }
  const int* myMask = round.masksAll.data() + rank_ * R;
  round.dispatch = ExpectDispatch(shape, round.all, rank_, myMask, f, std::vector<int>(shape.expertsPerRank(), 0));
  round.ySeed = Mix(seed * 7 + index);
  round.expertOutputs = ExpertOutputs(shape, round.ySeed, rank_, round.dispatch.count.data(), false);
  round.combined = ExpectCombine(shape, round.all, rank_, round.masksAll.data(), myMask, round.ySeed);
  return round;
}

std::string EpCudaLowLatencyKill::RunRound(moecommEp_t ep, const Round& round, const DispatchFlags& f, int index) {
  const std::string tag = "round " + std::to_string(index) + " ";
  const int L = static_cast<int>(round.dispatch.count.size());
  in_.Load(round.all.ranks[rank_], true, stream_);
  out_.Poison(stream_);
  cudaMemsetAsync(out_.cumulative, 0, L * 4, stream_);
  void* y = ToDevice(round.expertOutputs);
  void* combined = DeviceAlloc(round.combined.size() * 2);
  if (y == nullptr || combined == nullptr) return tag + "cudaMalloc failed";
  cudaMemsetAsync(combined, 0xff, round.combined.size() * 2, stream_);

  const auto start = std::chrono::steady_clock::now();
  std::string why;
  moecommEpHandle_t handle = nullptr;
  moecommEpLowLatencyDispatchArgs_t dargs = DispatchArgs(round.all.ranks[rank_].numTokens, in_, true, f, out_);
  if (moecommEpLowLatencyDispatch(ep, &dargs, &handle, stream_) != moecommSuccess) {
    why = tag + "dispatch: " + moecommGetLastError(comm_);
  } else if (cudaStreamSynchronize(stream_) != cudaSuccess) {
    why = tag + "cudaStreamSynchronize after the dispatch failed";
  }
  const double dispatchSeconds = SecondsSince(start);
  if (why.empty()) why = AsyncError(comm_);
  if (why.empty()) why = CompareDispatch(tag, round.dispatch, out_, f, true, true);
  // Round 1's dispatch masked the dead rank; from then on the mask shows it.
  const int* myMask = round.masksAll.data() + rank_ * nranks_;
  std::vector<int> gotMask(nranks_, -1);
  if (why.empty() && (moecommEpGetRankMask(ep, gotMask.data()) != moecommSuccess ||
                      !std::equal(gotMask.begin(), gotMask.end(), myMask))) {
    why = tag + "moecommEpGetRankMask: rank " + std::to_string(victim_) +
          " masked = " + std::to_string(gotMask[victim_]) + ", expected " + std::to_string(myMask[victim_]);
  }
  if (why.empty()) {
    why = CombineAndCompare(comm_, ep, CombineArgs(y, in_, true, combined), handle, stream_, round.combined, tag);
  }
  if (handle != nullptr) moecommEpHandleDestroy(handle);
  cudaFree(y);
  cudaFree(combined);
  char text[160];
  std::snprintf(text, sizeof(text), "%sdispatch took %.3f s (rank %d masked here: %d): %s", tag.c_str(),
                dispatchSeconds, victim_, gotMask[victim_], why.empty() ? "PASS" : "FAIL");
  Say(text);
  return why;
}

std::string EpCudaLowLatencyKill::Teardown(moecommEp_t ep) {
  std::string why;
  auto start = std::chrono::steady_clock::now();
  const moecommResult_t destroyed = moecommEpDestroy(ep);
  const std::string destroyText = destroyed == moecommSuccess ? "" : moecommGetLastError(comm_);
  const double epSeconds = SecondsSince(start);
  Say("moecommEpDestroy -> " + std::string(moecommGetErrorString(destroyed)) + " after " + std::to_string(epSeconds) +
      " s " + destroyText);
  if (!AcceptableTeardown(destroyed)) why = "moecommEpDestroy: " + destroyText;

  moecommComm_t comm = TakeComm();
  comm_ = nullptr;
  start = std::chrono::steady_clock::now();
  const moecommResult_t commDestroyed = moecommCommDestroy(comm);
  const std::string commText = commDestroyed == moecommSuccess ? "" : moecommGetLastError(nullptr);
  const double commSeconds = SecondsSince(start);
  Say("moecommCommDestroy -> " + std::string(moecommGetErrorString(commDestroyed)) + " after " +
      std::to_string(commSeconds) + " s " + commText);
  if (why.empty() && !AcceptableTeardown(commDestroyed)) why = "moecommCommDestroy: " + commText;
  if (why.empty() && epSeconds + commSeconds > kTeardownBoundSeconds) {
    why = "teardown took " + std::to_string(epSeconds + commSeconds) + " s";
  }
  return why;
}

TEST_F(EpCudaLowLatencyKill, SurvivorsMaskKilledRank) {
  const ref::EpShape shape = MakeShape(nranks_, 32, 2048, 8, kTokens);
  const DispatchFlags f{true, false, false};
  const uint64_t seed = BaseSeed() + 505;
  std::vector<Round> rounds;
  for (int index = 0; index < kRounds; ++index) rounds.push_back(PrepareRound(shape, f, index, seed));
  in_.Allocate(shape);
  out_.Allocate(shape, f);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);

  moecommEp_t ep = nullptr;
  {
    ScopedEnv timeout("MOECOMM_LL_TIMEOUT", kTimeoutMs);  // read by moecommEpCreate
    ASSERT_EQ(CreateLowLatencyEp(comm_, shape, &ep), moecommSuccess) << moecommGetLastError(comm_);
  }
  std::string why = RunRound(ep, rounds[0], f, 0);
  if (why.empty() && rank_ == victim_) {
    Say("raising SIGKILL before round 1 (moecomm-run must have --allow-kill " + std::to_string(victim_) + ")");
    raise(SIGKILL);
  }
  for (int index = 1; index < kRounds && why.empty(); ++index) why = RunRound(ep, rounds[index], f, index);
  // Teardown runs whatever happened, so a failing survivor still leaves in bounded time.
  const std::string teardown = Teardown(ep);
  in_.Free();
  out_.Free();
  EXPECT_EQ(why, "");
  EXPECT_EQ(teardown, "");
}

}  // namespace
}  // namespace moecomm_gpu_test
