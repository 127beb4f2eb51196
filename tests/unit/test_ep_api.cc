// The EP part of the public API on a 1-rank host communicator, normal mode and lifecycle:
// config validation, every kind of bad argument (each its own test: the code and a non-empty
// moecommGetLastError), and results checked element by element. Low-latency calls are in
// test_ep_api_low_latency.cc, two ranks in test_ep_api_ranks.cc.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "unit/ep_api_test_util.h"

namespace moecomm {
namespace ep_test {
namespace {

// ---- Config ------------------------------------------------------------------------------------

class EpApiConfig : public EpApi {
 protected:
  void expectRejected(const moecommEpConfig_t& config) {
    size_t bytes = 0;
    EXPECT_FAILS(moecommEpGetBufferSizeHint(comm(), &config, &bytes), moecommInvalidArgument);
    moecommEp_t ep = nullptr;
    EXPECT_FAILS(moecommEpCreate(comm(), &config, &ep), moecommInvalidArgument);
    EXPECT_EQ(ep, nullptr);
  }
  moecommEpConfig_t good_ = makeConfig(8, 128, 4, 2, moecommEpModeNormal);
};

TEST_F(EpApiConfig, HintCoversEveryMode) {
  size_t normal = 0, lowLatency = 0, both = 0;
  moecommEpConfig_t config = good_;
  ASSERT_OK(moecommEpGetBufferSizeHint(comm(), &config, &normal));
  config.mode = moecommEpModeLowLatency;
  ASSERT_OK(moecommEpGetBufferSizeHint(comm(), &config, &lowLatency));
  config.mode = moecommEpModeBoth;
  ASSERT_OK(moecommEpGetBufferSizeHint(comm(), &config, &both));
  EXPECT_GT(normal, 0u);
  EXPECT_GT(lowLatency, 0u);
  EXPECT_GE(both, normal + lowLatency);
}

TEST_F(EpApiConfig, NullConfig) {
  size_t bytes = 0;
  EXPECT_FAILS(moecommEpGetBufferSizeHint(comm(), nullptr, &bytes), moecommInvalidArgument);
  moecommEp_t ep = nullptr;
  EXPECT_FAILS(moecommEpCreate(comm(), nullptr, &ep), moecommInvalidArgument);
}

TEST_F(EpApiConfig, NullOutputs) {
  EXPECT_FAILS(moecommEpGetBufferSizeHint(comm(), &good_, nullptr), moecommInvalidArgument);
  EXPECT_FAILS(moecommEpCreate(comm(), &good_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiConfig, WrongStructSize) {
  good_.size = sizeof(good_) - 8;
  expectRejected(good_);
}

TEST_F(EpApiConfig, WrongMagic) {
  good_.magic = 0x12345678u;
  expectRejected(good_);
}

TEST_F(EpApiConfig, NumExpertsZero) {
  good_.numExperts = 0;
  expectRejected(good_);
}

TEST_F(EpApiConfig, NumExpertsNotMultipleOfRanks) {
  EXPECT_EQ(validateEpConfig(3, &good_), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("multiple of the 3 ranks"), std::string::npos)
      << moecommGetLastError(nullptr);
}

TEST_F(EpApiConfig, HiddenZero) {
  good_.hidden = 0;
  expectRejected(good_);
}

TEST_F(EpApiConfig, HiddenRowNotMultipleOf16Bytes) {
  good_.hidden = 12;  // 24 bytes per BF16 row
  expectRejected(good_);
}

TEST_F(EpApiConfig, MaxTokensZero) {
  good_.maxTokensPerRank = 0;
  expectRejected(good_);
}

TEST_F(EpApiConfig, TopkZero) {
  good_.topk = 0;
  expectRejected(good_);
}

TEST_F(EpApiConfig, TopkAboveMax) {
  good_.topk = MOECOMM_MAX_TOPK + 1;
  expectRejected(good_);
}

TEST_F(EpApiConfig, ModeInvalid) {
  good_.mode = static_cast<moecommEpMode_t>(7);
  expectRejected(good_);
}

TEST_F(EpApiConfig, NumSmsNegative) {
  good_.numSms = -1;
  expectRejected(good_);
}

TEST_F(EpApiConfig, AbsurdBufferRejected) {
  good_ = makeConfig(1 << 20, 1 << 20, 1 << 20, 8, moecommEpModeBoth);
  expectRejected(good_);
}

TEST_F(EpApiConfig, BufferBytesTooSmall) {
  good_.bufferBytes = 64;
  moecommEp_t ep = nullptr;
  EXPECT_FAILS(moecommEpCreate(comm(), &good_, &ep), moecommInvalidArgument);
}

TEST_F(EpApiConfig, LargerBufferBytesAccepted) {
  size_t hint = 0;
  ASSERT_OK(moecommEpGetBufferSizeHint(comm(), &good_, &hint));
  good_.bufferBytes = hint + 4096;
  create(good_);
}

// ---- Lifecycle and handles ---------------------------------------------------------------------

TEST_F(EpApi, NullEp) {
  moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
  EXPECT_FAILS(moecommEpGetLayout(nullptr, &args, nullptr), moecommInvalidArgument);
  EXPECT_FAILS(moecommEpDestroy(nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DestroyedEp) {
  moecommEp_t ep = normalEp();
  ASSERT_OK(moecommEpDestroy(ep));
  moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
  EXPECT_FAILS(moecommEpGetLayout(ep, &args, nullptr), moecommInvalidUsage);
  DispatchBuffers dispatch;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidUsage);
  EXPECT_FAILS(moecommEpDestroy(ep), moecommInvalidUsage);
}

// moecommCommGetAsyncError polls the comm's EPs (under the comm's mutex) from any thread: it
// must never reach an EP that is being destroyed (an EP leaves the comm's list before its
// backend goes). A thread queries in a loop while this one makes and destroys EPs of both
// modes; ASan (make test-asan) reports any use of a freed EP.
TEST_F(EpApi, AsyncErrorQueriedWhileEpsComeAndGo) {
  std::atomic<bool> stop{false};
  std::atomic<int> queries{0};
  std::atomic<int> bad{0};
  std::thread poller([&] {
    while (!stop.load()) {
      moecommResult_t async = moecommInternalError;
      if (moecommCommGetAsyncError(comm(), &async) != moecommSuccess || async != moecommSuccess) bad.fetch_add(1);
      queries.fetch_add(1);
    }
  });
  bool madeAll = true;
  for (int i = 0; i < 40 && madeAll; ++i) {
    moecommEp_t ep = nullptr;
    const moecommEpConfig_t config =
        makeConfig(8, 128, 4, 2, i % 2 == 0 ? moecommEpModeNormal : moecommEpModeLowLatency);
    madeAll = moecommEpCreate(comm(), &config, &ep) == moecommSuccess && moecommEpDestroy(ep) == moecommSuccess;
  }
  EXPECT_TRUE(madeAll) << moecommGetLastError(nullptr);  // the poller is stopped either way
  // Let the poller see an empty list at least once more, then stop it.
  const int seen = queries.load();
  while (queries.load() < seen + 2) std::this_thread::yield();
  stop.store(true);
  poller.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(queries.load(), 0);
}

TEST_F(EpApi, HandleDestroyNullAndTwice) {
  EXPECT_FAILS(moecommEpHandleDestroy(nullptr), moecommInvalidArgument);
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  ASSERT_OK(moecommEpHandleDestroy(dispatch.handle));
  EXPECT_FAILS(moecommEpHandleDestroy(dispatch.handle), moecommInvalidUsage);
}

TEST_F(EpApi, EpDestroyFreesLeftoverHandles) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  ASSERT_OK(moecommEpDestroy(ep));
  EXPECT_FAILS(moecommEpHandleDestroy(dispatch.handle), moecommInvalidUsage);
}

TEST_F(EpApi, HandleQueries) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  int n = -1;
  ASSERT_OK(moecommEpHandleGetNumRecvTokens(dispatch.handle, &n));
  EXPECT_EQ(n, 3);
  std::vector<int> srcRank(3, -1), srcIndex(3, -1);
  ASSERT_OK(moecommEpHandleGetSourceInfo(dispatch.handle, srcRank.data(), srcIndex.data(), 3));
  EXPECT_EQ(srcRank, (std::vector<int>{0, 0, 0}));
  EXPECT_EQ(srcIndex, (std::vector<int>{0, 1, 2}));
  EXPECT_FAILS(moecommEpHandleGetSourceInfo(dispatch.handle, srcRank.data(), nullptr, 2), moecommInvalidArgument);
  EXPECT_FAILS(moecommEpHandleGetNumRecvTokens(dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, SourceInfoNeedsADispatch) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  int n = -1;
  ASSERT_OK(moecommEpNotifyDispatch(ep, &dispatch.args, &dispatch.handle, &n, nullptr, nullptr));
  EXPECT_EQ(n, 3);
  std::vector<int> srcRank(3);
  EXPECT_FAILS(moecommEpHandleGetSourceInfo(dispatch.handle, srcRank.data(), nullptr, 3), moecommInvalidUsage);
}

// ---- Layout ----------------------------------------------------------------------------------------

class EpApiLayout : public EpApi {
 protected:
  void SetUp() override {
    EpApi::SetUp();
    ep_ = normalEp();
    args_.numTokens = 2;
    args_.topkIdx = ids_.data();
    args_.tokensPerRank = perRank_.data();
    args_.tokensPerExpert = perExpert_.data();
    args_.isTokenInRank = inRank_.data();
  }
  moecommEp_t ep_ = nullptr;
  std::vector<int64_t> ids_ = {3, 7, -1, 3};
  std::vector<int> perRank_ = std::vector<int>(1, -5);
  std::vector<int> perExpert_ = std::vector<int>(8, -5);
  std::vector<uint8_t> inRank_ = std::vector<uint8_t>(2, 9);
  moecommEpLayoutArgs_t args_ = MOECOMM_EP_LAYOUT_ARGS_INIT;
};

TEST_F(EpApiLayout, HandComputed) {
  ASSERT_OK(moecommEpGetLayout(ep_, &args_, nullptr));
  EXPECT_EQ(perRank_, (std::vector<int>{2}));
  EXPECT_EQ(perExpert_, (std::vector<int>{0, 0, 0, 2, 0, 0, 0, 1}));
  EXPECT_EQ(inRank_, (std::vector<uint8_t>{1, 1}));
  const std::vector<int32_t> narrow = {3, 7, -1, 3};
  args_.topkIdx = narrow.data();
  args_.topkIdxType = moecommInt32;
  args_.tokensPerExpert = nullptr;  // outputs are optional
  ASSERT_OK(moecommEpGetLayout(ep_, &args_, nullptr));
  EXPECT_EQ(perRank_, (std::vector<int>{2}));
}

TEST_F(EpApiLayout, NullArgs) { EXPECT_FAILS(moecommEpGetLayout(ep_, nullptr, nullptr), moecommInvalidArgument); }

TEST_F(EpApiLayout, WrongStructSize) {
  args_.size = 8;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, WrongMagic) {
  args_.magic = MOECOMM_EP_DISPATCH_ARGS_MAGIC;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, NegativeNumTokens) {
  args_.numTokens = -1;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, NumTokensAboveMax) {
  args_.numTokens = 5;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, ExpertIdTooLargeWritesNothing) {
  ids_[2] = 8;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("topkIdx[1][0] = 8 is outside [-1, 8)"), std::string::npos)
      << moecommGetLastError(nullptr);
  EXPECT_EQ(perRank_, (std::vector<int>{-5}));
  EXPECT_EQ(inRank_, (std::vector<uint8_t>{9, 9}));
}

TEST_F(EpApiLayout, ExpertIdBelowMinusOne) {
  ids_[1] = -2;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, BadIndexType) {
  args_.topkIdxType = moecommFloat32;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLayout, NullTopkIdx) {
  args_.topkIdx = nullptr;
  EXPECT_FAILS(moecommEpGetLayout(ep_, &args_, nullptr), moecommInvalidArgument);
  args_.numTokens = 0;  // no rows: nothing to read
  EXPECT_EQ(moecommEpGetLayout(ep_, &args_, nullptr), moecommSuccess);
}

// ---- Normal dispatch / combine ------------------------------------------------------------------

TEST_F(EpApi, DispatchCombineOneRank) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  std::vector<int32_t> recvIds(4 * 2, 99);
  std::vector<float> recvWeights(4 * 2, 99.0f);
  std::vector<int> perExpert(8, -1);
  int n = -1;
  const std::vector<int32_t> ids32(dispatch.ids.begin(), dispatch.ids.end());
  dispatch.args.topkIdx = ids32.data();
  dispatch.args.topkIdxType = moecommInt32;
  dispatch.args.recvTopkIdx = recvIds.data();
  dispatch.args.recvTopkWeights = recvWeights.data();
  dispatch.args.numRecvTokens = &n;
  dispatch.args.recvTokensPerExpert = perExpert.data();
  dispatch.args.expertAlignment = 2;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  ASSERT_NE(dispatch.handle, nullptr);
  EXPECT_EQ(n, 3);
  EXPECT_EQ(std::vector<uint16_t>(dispatch.recvX.begin(), dispatch.recvX.begin() + 3 * 128), dispatch.x);
  EXPECT_EQ(std::vector<int32_t>(recvIds.begin(), recvIds.begin() + 6), ids32);  // one rank: ids stay
  EXPECT_EQ(std::vector<float>(recvWeights.begin(), recvWeights.begin() + 6),
            (std::vector<float>{0.5f, 0.25f, 1.0f, 0.0f, 2.0f, 3.0f}));
  EXPECT_EQ(perExpert, (std::vector<int>{2, 0, 2, 0, 0, 2, 0, 2}));  // expert 2 listed twice: 2

  std::vector<uint16_t> y(3 * 128), bias(3 * 128, bf16(0.5f)), out(3 * 128);
  for (size_t i = 0; i < y.size(); ++i) y[i] = bf16(static_cast<float>(i % 13) - 6.0f);
  std::vector<float> combinedWeights(6, -1.0f);
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  combine.x = y.data();
  combine.topkWeights = recvWeights.data();
  combine.bias = bias.data();
  combine.combinedX = out.data();
  combine.combinedTopkWeights = combinedWeights.data();
  ASSERT_OK(moecommEpCombine(ep, &combine, dispatch.handle, nullptr));
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], bf16(0.0f + bf16ToFloat(y[i]) + 0.5f)) << i;
  EXPECT_EQ(combinedWeights, (std::vector<float>{0.5f, 0.25f, 1.0f, 0.0f, 2.0f, 3.0f}));
  ASSERT_OK(moecommEpHandleDestroy(dispatch.handle));
}

TEST_F(EpApi, DispatchFp8CopiesRowsAndScales) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  std::vector<uint8_t> x(3 * 128), recvX(4 * 128, 0);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i * 5);
  std::vector<float> scales = {0.5f, 2.0f, 4.0f}, recvScales(4, 0.0f);
  dispatch.args.xType = moecommFloat8E4M3;
  dispatch.args.x = x.data();
  dispatch.args.xScales = scales.data();
  dispatch.args.recvX = recvX.data();
  dispatch.args.recvXScales = recvScales.data();
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  EXPECT_EQ(std::vector<uint8_t>(recvX.begin(), recvX.begin() + 3 * 128), x);
  EXPECT_EQ(recvScales, (std::vector<float>{0.5f, 2.0f, 4.0f, 0.0f}));
}

TEST_F(EpApi, NotifyThenDispatchWithoutIds) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  int n = -1;
  std::vector<int> perExpert(8, -1);
  ASSERT_OK(moecommEpNotifyDispatch(ep, &dispatch.args, &dispatch.handle, &n, perExpert.data(), nullptr));
  EXPECT_EQ(n, 3);
  EXPECT_EQ(perExpert, (std::vector<int>{1, 0, 2, 0, 0, 1, 0, 1}));
  dispatch.args.topkIdx = nullptr;  // the handle's routing is reused
  dispatch.args.topkWeights = nullptr;
  moecommEpHandle_t reused = dispatch.handle;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  EXPECT_EQ(dispatch.handle, reused);
  EXPECT_EQ(std::vector<uint16_t>(dispatch.recvX.begin(), dispatch.recvX.begin() + 3 * 128), dispatch.x);
}

TEST_F(EpApi, DispatchNullArgs) {
  moecommEp_t ep = normalEp();
  moecommEpHandle_t handle = nullptr;
  EXPECT_FAILS(moecommEpDispatch(ep, nullptr, &handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNullHandlePointer) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, nullptr, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchWrongStructSize) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.size = sizeof(dispatch.args) + 8;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchWrongMagic) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.magic = MOECOMM_EP_COMBINE_ARGS_MAGIC;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNullX) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.x = nullptr;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNullTopkIdxWithoutHandle) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.topkIdx = nullptr;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNegativeNumTokens) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.numTokens = -1;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNumTokensAboveMax) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.numTokens = 5;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchExpertIdTooLarge) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.ids[3] = 300;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("topkIdx[1][1] = 300 is outside [-1, 8)"), std::string::npos)
      << moecommGetLastError(nullptr);
  EXPECT_EQ(dispatch.handle, nullptr);
}

TEST_F(EpApi, DispatchExpertIdBelowMinusOne) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.ids[0] = -5;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchBadXType) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.xType = moecommFloat32;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchBadIndexType) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.topkIdxType = moecommBfloat16;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchFp8NeedsHiddenMultipleOf128) {
  moecommEp_t ep = create(makeConfig(8, 64, 4, 2, moecommEpModeNormal));
  DispatchBuffers dispatch;
  std::vector<float> scales(4), recvScales(4);
  dispatch.args.xType = moecommFloat8E4M3;
  dispatch.args.xScales = scales.data();
  dispatch.args.recvXScales = recvScales.data();
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchFp8NeedsScales) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.xType = moecommFloat8E4M3;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchBf16RejectsScales) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  std::vector<float> scales(3);
  dispatch.args.xScales = scales.data();
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchRecvCapacityTooSmall) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.recvCapacity = 2;  // 3 tokens arrive
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("recvCapacity"), std::string::npos);
  EXPECT_EQ(dispatch.handle, nullptr);
}

TEST_F(EpApi, DispatchNegativeRecvCapacity) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.recvCapacity = -1;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchNullRecvX) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.recvX = nullptr;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchExpertAlignmentZero) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.expertAlignment = 0;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchWaitEventOnHost) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  dispatch.args.waitEvent = reinterpret_cast<moecommEvent_t>(&dispatch);
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("CUDA backend"), std::string::npos);
}

TEST_F(EpApi, DispatchHandleFromAnotherEp) {
  moecommEp_t first = normalEp();
  moecommEp_t second = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(first, &dispatch.args, &dispatch.handle, nullptr));
  EXPECT_FAILS(moecommEpDispatch(second, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
  std::vector<uint16_t> out(3 * 128);
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  combine.x = dispatch.recvX.data();
  combine.combinedX = out.data();
  EXPECT_FAILS(moecommEpCombine(second, &combine, dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchDestroyedHandle) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  ASSERT_OK(moecommEpHandleDestroy(dispatch.handle));
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidUsage);
}

TEST_F(EpApi, DispatchReusedHandleWithOtherRouting) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  dispatch.ids = {-1, -1, 7, -1, 2, 2};  // token 0 now goes nowhere
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, DispatchReusedHandleWithOtherTokenCount) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  dispatch.args.numTokens = 2;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, NotifyNeedsNumRecvTokens) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  EXPECT_FAILS(moecommEpNotifyDispatch(ep, &dispatch.args, &dispatch.handle, nullptr, nullptr, nullptr),
               moecommInvalidArgument);
}

TEST_F(EpApi, CombineNullArgsAndHandle) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  EXPECT_FAILS(moecommEpCombine(ep, nullptr, dispatch.handle, nullptr), moecommInvalidArgument);
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  EXPECT_FAILS(moecommEpCombine(ep, &combine, nullptr, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, CombineNullX) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  std::vector<uint16_t> out(3 * 128);
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  combine.combinedX = out.data();
  EXPECT_FAILS(moecommEpCombine(ep, &combine, dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, CombineWeightsWithoutOutput) {
  moecommEp_t ep = normalEp();
  DispatchBuffers dispatch;
  ASSERT_OK(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr));
  std::vector<uint16_t> out(3 * 128);
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  combine.x = dispatch.recvX.data();
  combine.topkWeights = dispatch.weights.data();
  combine.combinedX = out.data();
  EXPECT_FAILS(moecommEpCombine(ep, &combine, dispatch.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApi, CombineWithLowLatencyHandle) {
  moecommEp_t ep = create(makeConfig(8, 128, 4, 2, moecommEpModeBoth));
  std::vector<int64_t> ids = {1, 2};
  std::vector<uint16_t> x(128), recvX(8 * 4 * 128);
  std::vector<int> count(8);
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  args.numTokens = 1;
  args.x = x.data();
  args.topkIdx = ids.data();
  args.recvType = moecommBfloat16;
  args.recvX = recvX.data();
  args.recvCount = count.data();
  moecommEpHandle_t handle = nullptr;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr));
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  EXPECT_FAILS(moecommEpCombine(ep, &combine, handle, nullptr), moecommInvalidArgument);
  int n = 0;
  EXPECT_FAILS(moecommEpHandleGetNumRecvTokens(handle, &n), moecommInvalidArgument);
}

TEST_F(EpApi, NormalCallOnLowLatencyEp) {
  moecommEp_t ep = lowLatencyEp();
  DispatchBuffers dispatch;
  EXPECT_FAILS(moecommEpDispatch(ep, &dispatch.args, &dispatch.handle, nullptr), moecommInvalidUsage);
}

}  // namespace
}  // namespace ep_test
}  // namespace moecomm
