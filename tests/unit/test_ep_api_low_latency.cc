// The low-latency part of the EP API on a 1-rank host communicator: FP8 casts, send-only
// halves, the in-flight limit, zero copy, the rank mask, and every kind of bad argument.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "unit/ep_api_test_util.h"

namespace moecomm {
namespace ep_test {
namespace {

class EpApiLowLatency : public EpApi {};

// ---- Low latency -------------------------------------------------------------------------------

// A ready-to-run low-latency dispatch on the E8/H128/maxT4/K2 EP (1 rank: 8 local experts).
struct LowLatencyBuffers {
  std::vector<int64_t> ids = {3, 1, -1, 3, 6, 6};
  std::vector<float> weights = {0.5f, 2.0f, 9.0f, 1.5f, 0.25f, 0.75f};
  std::vector<uint16_t> x = std::vector<uint16_t>(3 * 128);
  std::vector<uint8_t> recvX = std::vector<uint8_t>(8 * 4 * 128 * 2);
  std::vector<float> recvScales = std::vector<float>(8 * 4 * 1);
  std::vector<int> count = std::vector<int>(8, -1);
  std::vector<int> srcInfo = std::vector<int>(8 * 4, -1);
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  moecommEpHandle_t handle = nullptr;
  LowLatencyBuffers() {
    for (size_t i = 0; i < x.size(); ++i) x[i] = bf16(static_cast<float>(i % 29) * 0.375f - 5.0f);
    args.numTokens = 3;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.recvX = recvX.data();
    args.recvScales = recvScales.data();
    args.recvCount = count.data();
    args.recvSrcInfo = srcInfo.data();
  }
  // Combine arguments for this dispatch's handle: expert outputs y, output out, the dispatch's
  // ids and weights.
  moecommEpLowLatencyCombineArgs_t combineArgs(const void* y, void* out) const {
    moecommEpLowLatencyCombineArgs_t combine = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
    combine.x = y;
    combine.topkIdx = ids.data();
    combine.topkWeights = weights.data();
    combine.out = out;
    return combine;
  }
};

TEST_F(EpApiLowLatency, LowLatencyOneRankMatchesReference) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  std::vector<int> stats(8, 100);
  ll.args.flags = MOECOMM_LL_ROUND_SCALE;
  ll.args.cumulativeRecvStats = stats.data();
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  EXPECT_EQ(ll.count, (std::vector<int>{0, 1, 0, 2, 0, 0, 1, 0}));
  EXPECT_EQ(stats, (std::vector<int>{100, 101, 100, 102, 100, 100, 101, 100}));
  EXPECT_EQ(ll.srcInfo[3 * 4 + 0], 0);
  EXPECT_EQ(ll.srcInfo[3 * 4 + 1], 1);
  EXPECT_EQ(ll.srcInfo[6 * 4 + 0], 2);
  std::vector<uint8_t> q(128);
  std::vector<float> scale(1);
  reference::castRowToFp8(ll.x.data() + 128, 128, true, q.data(), scale.data(), nullptr);
  EXPECT_EQ(std::vector<uint8_t>(ll.recvX.begin() + (3 * 4 + 1) * 128, ll.recvX.begin() + (3 * 4 + 2) * 128), q);
  EXPECT_EQ(ll.recvScales[3 * 4 + 1], scale[0]);

  std::vector<uint16_t> y(8 * 4 * 128, bf16(0.0f)), out(3 * 128);
  for (int le = 0; le < 8; ++le) {
    for (int slot = 0; slot < ll.count[le]; ++slot) {
      for (int h = 0; h < 128; ++h)
        y[(le * 4 + slot) * 128 + h] = bf16(static_cast<float>(le * 10 + slot) + h / 128.0f);
    }
  }
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
  for (int h = 0; h < 128; ++h) {
    const float y31 = 31.0f + h / 128.0f, y30 = 30.0f + h / 128.0f, y10 = 10.0f + h / 128.0f;
    const float y60 = bf16ToFloat(bf16(60.0f + h / 128.0f));
    EXPECT_EQ(out[h], bf16(std::fma(2.0f, bf16ToFloat(bf16(y10)), 0.5f * bf16ToFloat(bf16(y30))))) << h;
    EXPECT_EQ(out[128 + h], bf16(1.5f * bf16ToFloat(bf16(y31)))) << h;
    EXPECT_EQ(out[256 + h], bf16(std::fma(0.75f, y60, 0.25f * y60))) << h;
  }
}

TEST_F(EpApiLowLatency, LowLatencyUe8m0Bf16AndSendOnly) {
  moecommEp_t ep = create(makeConfig(8, 512, 4, 2, moecommEpModeLowLatency));
  LowLatencyBuffers ll;
  std::vector<uint16_t> x(3 * 512);
  for (size_t i = 0; i < x.size(); ++i) x[i] = bf16(static_cast<float>(i % 31) - 15.0f);
  std::vector<uint8_t> recvX(8 * 4 * 512);
  std::vector<int32_t> packed(8 * 4 * 1, 0);
  ll.args.x = x.data();
  ll.args.recvX = recvX.data();
  ll.args.recvScales = packed.data();
  ll.args.flags = MOECOMM_LL_UE8M0 | MOECOMM_LL_SEND_ONLY;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  ASSERT_OK(moecommEpComplete(ep, ll.handle, nullptr));
  std::vector<uint8_t> q(512), exponents(4);
  reference::castRowToFp8(x.data() + 2 * 512, 512, true, q.data(), nullptr, exponents.data());
  EXPECT_EQ(std::vector<uint8_t>(recvX.begin() + (6 * 4) * 512, recvX.begin() + (6 * 4 + 1) * 512), q);
  int32_t expected = 0;
  std::memcpy(&expected, exponents.data(), 4);  // block 4i + j in byte j
  EXPECT_EQ(packed[6 * 4], expected);

  std::vector<uint16_t> recvBf16(8 * 4 * 512);
  LowLatencyBuffers second;
  second.args.x = x.data();
  second.args.recvType = moecommBfloat16;
  second.args.recvX = recvBf16.data();
  second.args.recvScales = nullptr;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &second.args, &second.handle, nullptr));
  EXPECT_EQ(std::vector<uint16_t>(recvBf16.begin() + (6 * 4) * 512, recvBf16.begin() + (6 * 4 + 1) * 512),
            std::vector<uint16_t>(x.begin() + 2 * 512, x.end()));
}

TEST_F(EpApiLowLatency, LowLatencyThirdInFlightOperation) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers a, b, c;
  for (LowLatencyBuffers* ll : {&a, &b, &c}) ll->args.flags = MOECOMM_LL_SEND_ONLY;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &a.args, &a.handle, nullptr));
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &b.args, &b.handle, nullptr));
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &c.args, &c.handle, nullptr), moecommInvalidUsage);
  EXPECT_EQ(c.handle, nullptr);
  ASSERT_OK(moecommEpComplete(ep, b.handle, nullptr));
  // Operation 3 reuses operation 1's slot (operations alternate between the two slots, so every
  // rank picks the same one whatever order it completes in), and a still holds it.
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &c.args, &c.handle, nullptr), moecommInvalidUsage);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("operation #3 uses buffer slot 1, which operation #1 still"),
            std::string::npos)
      << moecommGetLastError(nullptr);
  EXPECT_EQ(c.handle, nullptr);
  ASSERT_OK(moecommEpComplete(ep, a.handle, nullptr));
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &c.args, &c.handle, nullptr));
  ASSERT_OK(moecommEpComplete(ep, c.handle, nullptr));
  EXPECT_EQ(a.count, c.count);
}

TEST_F(EpApiLowLatency, LowLatencyUe8m0NeedsHiddenMultipleOf512) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.flags = MOECOMM_LL_UE8M0;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyFp8NeedsHiddenMultipleOf128) {
  moecommEp_t ep = create(makeConfig(8, 64, 4, 2, moecommEpModeLowLatency));
  LowLatencyBuffers ll;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyUnknownFlags) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.flags = MOECOMM_LL_ZERO_COPY;  // a combine flag
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyBf16RejectsScales) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.recvType = moecommBfloat16;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyNullRecvCount) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.recvCount = nullptr;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyExpertIdOutOfRange) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.ids[5] = 8;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_EQ(ll.handle, nullptr);
}

TEST_F(EpApiLowLatency, LowLatencyWaitEventOnHost) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.waitEvent = reinterpret_cast<moecommEvent_t>(&ll);
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyCallOnNormalEp) {
  moecommEp_t ep = normalEp();
  LowLatencyBuffers ll;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidUsage);
  void* buffer = nullptr;
  EXPECT_FAILS(moecommEpLowLatencyCombineBuffer(ep, &buffer), moecommInvalidUsage);
}

TEST_F(EpApiLowLatency, LowLatencyCombineBeforeComplete) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.flags = MOECOMM_LL_SEND_ONLY;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<uint16_t> y(8 * 4 * 128), out(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidUsage);
  ASSERT_OK(moecommEpComplete(ep, ll.handle, nullptr));
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
}

TEST_F(EpApiLowLatency, CompleteWithoutPendingOperation) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  EXPECT_FAILS(moecommEpComplete(ep, ll.handle, nullptr), moecommInvalidUsage);
  EXPECT_FAILS(moecommEpComplete(ep, nullptr, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyCombineTopkMismatch) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<int64_t> other = ll.ids;
  other[0] = 4;
  std::vector<uint16_t> y(8 * 4 * 128), out(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  combine.topkIdx = other.data();
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, LowLatencyCombineUnknownFlags) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<uint16_t> y(8 * 4 * 128), out(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  combine.flags = MOECOMM_LL_UE8M0;
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, ZeroCopyNeedsTheBuffer) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<uint16_t> out(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(nullptr, out.data());
  combine.flags = MOECOMM_LL_ZERO_COPY;
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidUsage);
  EXPECT_FAILS(moecommEpLowLatencyCombineBuffer(ep, nullptr), moecommInvalidArgument);
}

TEST_F(EpApiLowLatency, ZeroCopyCombineMatchesCopyingCombine) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  void* buffer = nullptr;
  ASSERT_OK(moecommEpLowLatencyCombineBuffer(ep, &buffer));
  ASSERT_NE(buffer, nullptr);
  std::vector<uint16_t> y(8 * 4 * 128);
  for (size_t i = 0; i < y.size(); ++i) y[i] = bf16(static_cast<float>(i % 17) - 3.0f);
  std::memcpy(buffer, y.data(), y.size() * sizeof(uint16_t));
  std::vector<uint16_t> copied(3 * 128), zeroCopy(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), copied.data());
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
  combine.x = nullptr;
  combine.flags = MOECOMM_LL_ZERO_COPY;
  combine.out = zeroCopy.data();
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
  EXPECT_EQ(copied, zeroCopy);
  combine.x = y.data();  // neither NULL nor the buffer
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidArgument);
}

// ---- MOECOMM_LL_PER_RANK_COMBINE: argument checks ------------------------------------------

// The last error sentence, for checks that it names the field at fault.
std::string lastErrorText() { return moecommGetLastError(nullptr); }

#define EXPECT_ERROR_MENTIONS(...)                                                              \
  do {                                                                                          \
    const std::string text_ = lastErrorText();                                                  \
    for (const char* word_ : {__VA_ARGS__})                                                     \
      EXPECT_NE(text_.find(word_), std::string::npos) << "'" << word_ << "' not in: " << text_; \
  } while (0)

TEST_F(EpApiLowLatency, PerRankCombineDispatchNeedsWeights) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.flags = MOECOMM_LL_PER_RANK_COMBINE;
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_ERROR_MENTIONS("topkWeights", "MOECOMM_LL_PER_RANK_COMBINE", "NULL");
  EXPECT_EQ(ll.handle, nullptr);
  // Zero tokens need no weights.
  ll.args.numTokens = 0;
  ll.args.x = nullptr;
  ll.args.topkIdx = nullptr;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  EXPECT_EQ(ll.count, std::vector<int>(8, 0));
}

TEST_F(EpApiLowLatency, DispatchWeightsWithoutPerRankFlag) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.topkWeights = ll.weights.data();
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_ERROR_MENTIONS("topkWeights", "MOECOMM_LL_PER_RANK_COMBINE");
  EXPECT_EQ(ll.handle, nullptr);
  ll.args.flags = MOECOMM_LL_SEND_ONLY;  // another flag does not make them legal
  EXPECT_FAILS(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_ERROR_MENTIONS("topkWeights", "MOECOMM_LL_PER_RANK_COMBINE");
  EXPECT_EQ(ll.handle, nullptr);
}

// A per-rank handle's combine takes no weights (the dispatch's apply); a refused combine
// leaves the handle usable.
TEST_F(EpApiLowLatency, PerRankCombineRejectsCombineWeights) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ll.args.flags = MOECOMM_LL_PER_RANK_COMBINE;
  ll.args.topkWeights = ll.weights.data();
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<uint16_t> y(8 * 4 * 128), out(3 * 128);
  for (size_t i = 0; i < y.size(); ++i) y[i] = bf16(static_cast<float>(i % 23) * 0.125f - 1.0f);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_ERROR_MENTIONS("topkWeights must be NULL", "MOECOMM_LL_PER_RANK_COMBINE");
  combine.topkWeights = nullptr;
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
  // One rank holds every expert, so the per-rank sum has a single partial: the k-order chain
  // over the dispatch's weights, rounded once.
  const reference::EpShape shape = shapeOf(1, makeConfig(8, 128, 4, 2, moecommEpModeLowLatency));
  std::vector<int> counts(8), slots(6);
  reference::lowLatencyPlacementCounts(shape, ll.ids.data(), 3, counts.data());
  reference::lowLatencySelectionSlots(shape, 0, ll.ids.data(), 3, counts.data(), nullptr, slots.data());
  const uint16_t* outputs[1] = {y.data()};
  std::vector<uint16_t> want(3 * 128);
  reference::lowLatencyCombine(shape, 3, ll.ids.data(), ll.weights.data(), slots.data(), outputs, nullptr, want.data(),
                               true);
  EXPECT_EQ(out, want);
}

// A normal handle's combine still needs its weights.
TEST_F(EpApiLowLatency, CombineWithoutWeightsOnNormalHandle) {
  moecommEp_t ep = lowLatencyEp();
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  std::vector<uint16_t> y(8 * 4 * 128), out(3 * 128);
  moecommEpLowLatencyCombineArgs_t combine = ll.combineArgs(y.data(), out.data());
  combine.topkWeights = nullptr;
  EXPECT_FAILS(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr), moecommInvalidArgument);
  EXPECT_ERROR_MENTIONS("topkWeights is NULL");
  combine.topkWeights = ll.weights.data();
  ASSERT_OK(moecommEpLowLatencyCombine(ep, &combine, ll.handle, nullptr));
}

TEST_F(EpApiLowLatency, RankMaskGetSetClear) {
  moecommEp_t ep = lowLatencyEp();
  int mask = -1;
  ASSERT_OK(moecommEpGetRankMask(ep, &mask));
  EXPECT_EQ(mask, 0);
  const int masked = 5;  // any non-zero value masks
  ASSERT_OK(moecommEpSetRankMask(ep, &masked));
  ASSERT_OK(moecommEpGetRankMask(ep, &mask));
  EXPECT_EQ(mask, 1);
  // Masking the only rank: its own tokens are absent on receive.
  LowLatencyBuffers ll;
  ASSERT_OK(moecommEpLowLatencyDispatch(ep, &ll.args, &ll.handle, nullptr));
  EXPECT_EQ(ll.count, std::vector<int>(8, 0));
  ASSERT_OK(moecommEpClearRankMask(ep));
  ASSERT_OK(moecommEpGetRankMask(ep, &mask));
  EXPECT_EQ(mask, 0);
  EXPECT_FAILS(moecommEpGetRankMask(ep, nullptr), moecommInvalidArgument);
  EXPECT_FAILS(moecommEpSetRankMask(ep, nullptr), moecommInvalidArgument);
}

}  // namespace
}  // namespace ep_test
}  // namespace moecomm
