// Shared by the 1-rank EP API tests (test_ep_api.cc, test_ep_api_low_latency.cc): host
// communicators, an EP fixture that cleans up after itself, and checks that a call failed
// with a given code and left a sentence in moecommGetLastError.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "ep/dtype.h"
#include "ep/ep.h"
#include "ep/host_reference.h"
#include "moecomm.h"

namespace moecomm {
namespace ep_test {

#define EXPECT_FAILS(call, code)                                                  \
  do {                                                                            \
    EXPECT_EQ((call), (code));                                                    \
    EXPECT_STRNE(moecommGetLastError(nullptr), "") << "no error text for " #call; \
  } while (0)

#define ASSERT_OK(call) ASSERT_EQ((call), moecommSuccess) << moecommGetLastError(nullptr)

inline uint16_t bf16(float value) { return floatToBf16(value); }

inline moecommEpConfig_t makeConfig(int experts, int hidden, int maxTokens, int topk, moecommEpMode_t mode) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = experts;
  config.hidden = hidden;
  config.maxTokensPerRank = maxTokens;
  config.topk = topk;
  config.mode = mode;
  return config;
}

inline reference::EpShape shapeOf(int ranks, const moecommEpConfig_t& config) {
  reference::EpShape shape;
  shape.numRanks = ranks;
  shape.numExperts = config.numExperts;
  shape.hidden = config.hidden;
  shape.topk = config.topk;
  shape.maxTokensPerRank = config.maxTokensPerRank;
  return shape;
}

// Communicators of n host ranks in this process; each rank's calls run on its own thread.
class HostRanks {
 public:
  explicit HostRanks(int n) : comms_(n, nullptr) {
    setenv("MOECOMM_BACKEND", "host", 1);
    setenv("MOECOMM_BOOTSTRAP_TIMEOUT", "20000", 1);
    result_ = moecommCommInitAll(comms_.data(), n, nullptr);
  }
  ~HostRanks() {
    for (moecommComm_t comm : comms_) {
      if (comm != nullptr) moecommCommDestroy(comm);
    }
  }
  moecommResult_t result() const { return result_; }
  moecommComm_t comm(int rank) const { return comms_[rank]; }
  int size() const { return static_cast<int>(comms_.size()); }
  // Runs body(rank) for every rank concurrently and waits for all.
  void run(const std::function<void(int)>& body) const {
    std::vector<std::thread> threads;
    for (int r = 0; r < size(); ++r) threads.emplace_back(body, r);
    for (auto& thread : threads) thread.join();
  }

 private:
  std::vector<moecommComm_t> comms_;
  moecommResult_t result_;
};

// One rank, one or two EPs made per test and destroyed after it.
class EpApi : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_OK(ranks_.result()); }
  void TearDown() override {
    for (moecommEp_t ep : eps_) {
      if (ep != nullptr && liveEps().contains(ep)) {
        EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess);
      }
    }
  }
  moecommComm_t comm() const { return ranks_.comm(0); }
  moecommEp_t create(const moecommEpConfig_t& config) {
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comm(), &config, &ep), moecommSuccess) << moecommGetLastError(nullptr);
    eps_.push_back(ep);
    return ep;
  }
  // E 8, H 128, maxT 4, K 2.
  moecommEp_t normalEp() { return create(makeConfig(8, 128, 4, 2, moecommEpModeNormal)); }
  moecommEp_t lowLatencyEp() { return create(makeConfig(8, 128, 4, 2, moecommEpModeLowLatency)); }

  HostRanks ranks_{1};
  std::vector<moecommEp_t> eps_;
};

// A ready-to-run normal dispatch on the E8/H128/maxT4/K2 EP: 3 tokens, all buffers sized.
struct DispatchBuffers {
  std::vector<int64_t> ids = {0, 5, 7, -1, 2, 2};
  std::vector<float> weights = {0.5f, 0.25f, 1.0f, 0.0f, 2.0f, 3.0f};
  std::vector<uint16_t> x = std::vector<uint16_t>(3 * 128);
  std::vector<uint16_t> recvX = std::vector<uint16_t>(4 * 128);
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  moecommEpHandle_t handle = nullptr;
  DispatchBuffers() {
    for (size_t i = 0; i < x.size(); ++i) x[i] = bf16(static_cast<float>(i % 97));
    args.numTokens = 3;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.topkWeights = weights.data();
    args.recvCapacity = 4;
    args.recvX = recvX.data();
  }
};

}  // namespace ep_test
}  // namespace moecomm
