// The EP API on two host ranks (threads of this process, moecommCommInitAll; four as well for
// the per-rank low-latency combine): results checked element by element against the pure
// reference functions, and failures on one rank that must reach the other promptly.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ep/dtype.h"
#include "ep/host_reference.h"
#include "moecomm.h"

namespace moecomm {
namespace {

using reference::EpShape;

constexpr int kRanks = 2;

uint16_t bf16(float value) { return floatToBf16(value); }

std::string lastError() { return moecommGetLastError(nullptr); }

class EpApiTwoRanks : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("MOECOMM_BACKEND", "host", 1);
    setenv("MOECOMM_BOOTSTRAP_TIMEOUT", "20000", 1);
    ASSERT_EQ(moecommCommInitAll(comms_, kRanks, nullptr), moecommSuccess) << lastError();
  }
  // Destroy synchronises with the peers, so every rank destroys on its own thread.
  void TearDown() override {
    if (comms_[0] == nullptr) return;
    run([&](int rank) { EXPECT_EQ(moecommCommDestroy(comms_[rank]), moecommSuccess) << lastError(); });
  }
  // Runs body(rank) on one thread per rank.
  void run(const std::function<void(int)>& body) {
    std::vector<std::thread> threads;
    for (int r = 0; r < kRanks; ++r) threads.emplace_back(body, r);
    for (auto& thread : threads) thread.join();
  }
  moecommEp_t create(int rank, const moecommEpConfig_t& config) {
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comms_[rank], &config, &ep), moecommSuccess) << lastError();
    return ep;
  }

  moecommComm_t comms_[kRanks] = {nullptr, nullptr};
};

moecommEpConfig_t makeConfig(int experts, int hidden, int maxTokens, int topk, moecommEpMode_t mode) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = experts;
  config.hidden = hidden;
  config.maxTokensPerRank = maxTokens;
  config.topk = topk;
  config.mode = mode;
  return config;
}

EpShape shapeOf(const moecommEpConfig_t& config, int ranks = kRanks) {
  EpShape shape;
  shape.numRanks = ranks;
  shape.numExperts = config.numExperts;
  shape.hidden = config.hidden;
  shape.topk = config.topk;
  shape.maxTokensPerRank = config.maxTokensPerRank;
  return shape;
}

// One rank's inputs: random routing with -1 entries and the odd repeated expert.
struct RankInputs {
  int tokens = 0;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  std::vector<uint16_t> x;
  std::vector<uint16_t> bias;
};

std::vector<RankInputs> makeInputs(const EpShape& shape, unsigned seed, const std::vector<int>& tokens) {
  std::mt19937 random(seed);
  std::uniform_int_distribution<int> expert(-1, shape.numExperts - 1);
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  std::vector<RankInputs> all(shape.numRanks);
  for (int r = 0; r < shape.numRanks; ++r) {
    RankInputs& in = all[r];
    in.tokens = tokens[r];
    for (int i = 0; i < in.tokens * shape.topk; ++i) {
      in.ids.push_back(expert(random));
      in.weights.push_back(value(random));
    }
    for (int i = 0; i < in.tokens * shape.hidden; ++i) {
      in.x.push_back(bf16(value(random)));
      in.bias.push_back(bf16(value(random) / 8));
    }
  }
  return all;
}

// What the reference says every rank receives in a normal dispatch.
struct ExpectedDispatch {
  std::vector<std::vector<uint8_t>> isTokenInRank;  // [rank][T, R]
  std::vector<int> tokensPerRankAll, tokensPerExpertAll;
  std::vector<std::vector<uint16_t>> recvX;  // [rank][N, H]
  std::vector<std::vector<int64_t>> recvIds;
  std::vector<std::vector<float>> recvWeights;
  std::vector<int> numRecv;
};

ExpectedDispatch expectDispatch(const EpShape& shape, const std::vector<RankInputs>& all) {
  ExpectedDispatch expected;
  const int numRanks = shape.numRanks;
  expected.isTokenInRank.resize(numRanks);
  expected.tokensPerRankAll.resize(numRanks * numRanks);
  expected.tokensPerExpertAll.resize(numRanks * shape.numExperts);
  std::vector<reference::DispatchSource> sources(numRanks);
  for (int r = 0; r < numRanks; ++r) {
    expected.isTokenInRank[r].resize(all[r].tokens * numRanks);
    reference::computeLayout(shape, all[r].ids.data(), all[r].tokens, &expected.tokensPerRankAll[r * numRanks],
                             &expected.tokensPerExpertAll[r * shape.numExperts], expected.isTokenInRank[r].data());
    sources[r] = {all[r].tokens,
                  expected.isTokenInRank[r].data(),
                  reinterpret_cast<const uint8_t*>(all[r].x.data()),
                  nullptr,
                  all[r].ids.data(),
                  all[r].weights.data()};
  }
  for (int r = 0; r < numRanks; ++r) {
    const int n = reference::numRecvTokens(shape, expected.tokensPerRankAll.data(), r);
    expected.numRecv.push_back(n);
    expected.recvX.emplace_back(static_cast<size_t>(n) * shape.hidden);
    expected.recvIds.emplace_back(static_cast<size_t>(n) * shape.topk);
    expected.recvWeights.emplace_back(static_cast<size_t>(n) * shape.topk);
    reference::DispatchOutput out;
    out.recvX = reinterpret_cast<uint8_t*>(expected.recvX[r].data());
    out.recvTopkIdx = expected.recvIds[r].data();
    out.recvTopkWeights = expected.recvWeights[r].data();
    reference::dispatchGather(shape, r, sources.data(), shape.hidden * 2, out);
  }
  return expected;
}

// The "expert" each rank applies before the combine: deterministic in the row and the rank.
std::vector<uint16_t> expertOutputs(const std::vector<uint16_t>& recvX, int rank) {
  std::vector<uint16_t> y(recvX.size());
  for (size_t i = 0; i < y.size(); ++i) y[i] = bf16(bf16ToFloat(recvX[i]) * 0.75f + static_cast<float>(rank));
  return y;
}

TEST_F(EpApiTwoRanks, NormalDispatchCombineMatchesReference) {
  const moecommEpConfig_t config = makeConfig(8, 256, 16, 4, moecommEpModeNormal);
  const EpShape shape = shapeOf(config);
  const std::vector<RankInputs> all = makeInputs(shape, 42, {13, 9});
  const ExpectedDispatch expected = expectDispatch(shape, all);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    const RankInputs& in = all[rank];
    const int capacity = kRanks * config.maxTokensPerRank;
    std::vector<uint16_t> recvX(capacity * shape.hidden, 0xdead);
    std::vector<int64_t> recvIds(capacity * shape.topk, 99);
    std::vector<float> recvWeights(capacity * shape.topk, 99.0f);
    std::vector<int> perExpert(4, -1);
    int n = -1;
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = in.tokens;
    args.x = in.x.data();
    args.topkIdx = in.ids.data();
    args.topkWeights = in.weights.data();
    args.expertAlignment = 4;
    args.recvCapacity = capacity;
    args.recvX = recvX.data();
    args.recvTopkIdx = recvIds.data();
    args.recvTopkWeights = recvWeights.data();
    args.numRecvTokens = &n;
    args.recvTokensPerExpert = perExpert.data();
    moecommEpHandle_t handle = nullptr;
    // The second round reuses the handle: same routing, same results.
    for (int round = 0; round < 2; ++round) {
      ASSERT_EQ(moecommEpDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
      ASSERT_EQ(n, expected.numRecv[rank]);
      for (size_t i = 0; i < expected.recvX[rank].size(); ++i) ASSERT_EQ(recvX[i], expected.recvX[rank][i]) << i;
      for (size_t i = 0; i < expected.recvIds[rank].size(); ++i) {
        ASSERT_EQ(recvIds[i], expected.recvIds[rank][i]) << i;
        ASSERT_EQ(recvWeights[i], expected.recvWeights[rank][i]) << i;
      }
      std::vector<int> expectedPerExpert(4);
      reference::recvTokensPerExpert(shape, expected.tokensPerExpertAll.data(), rank, 4, expectedPerExpert.data());
      EXPECT_EQ(perExpert, expectedPerExpert);
    }
    // Combine: expected from every rank's expected expert outputs.
    const std::vector<uint16_t> y =
        expertOutputs(std::vector<uint16_t>(recvX.begin(), recvX.begin() + n * shape.hidden), rank);
    std::vector<std::vector<uint16_t>> allY;
    std::vector<reference::CombineSource> receivers(kRanks);
    for (int r = 0; r < kRanks; ++r) allY.push_back(expertOutputs(expected.recvX[r], r));
    for (int r = 0; r < kRanks; ++r) receivers[r] = {allY[r].data(), expected.recvWeights[r].data()};
    std::vector<uint16_t> wantX(in.tokens * shape.hidden);
    std::vector<float> wantWeights(in.tokens * shape.topk);
    reference::combineReduce(shape, rank, in.tokens, expected.isTokenInRank[rank].data(),
                             expected.tokensPerRankAll.data(), receivers.data(), in.bias.data(), wantX.data(),
                             wantWeights.data());
    std::vector<uint16_t> out(in.tokens * shape.hidden, 0xdead);
    std::vector<float> outWeights(in.tokens * shape.topk, -1.0f);
    moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
    combine.x = y.data();
    combine.topkWeights = recvWeights.data();
    combine.bias = in.bias.data();
    combine.combinedX = out.data();
    combine.combinedTopkWeights = outWeights.data();
    ASSERT_EQ(moecommEpCombine(ep, &combine, handle, nullptr), moecommSuccess) << lastError();
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], wantX[i]) << "rank " << rank << " element " << i;
    for (size_t i = 0; i < outWeights.size(); ++i) ASSERT_EQ(outWeights[i], wantWeights[i]) << i;
    EXPECT_EQ(moecommEpHandleDestroy(handle), moecommSuccess);
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

TEST_F(EpApiTwoRanks, NotifyThenFp8DispatchWithInt32Ids) {
  const moecommEpConfig_t config = makeConfig(4, 256, 8, 2, moecommEpModeBoth);
  const EpShape shape = shapeOf(config);
  const std::vector<RankInputs> all = makeInputs(shape, 7, {8, 0});  // rank 1 sends nothing
  const ExpectedDispatch expected = expectDispatch(shape, all);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    const RankInputs& in = all[rank];
    const std::vector<int32_t> ids(in.ids.begin(), in.ids.end());
    std::vector<uint8_t> x(in.tokens * shape.hidden);
    std::vector<float> scales(in.tokens * 2);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i * 3 + rank);
    for (size_t i = 0; i < scales.size(); ++i) scales[i] = 0.5f * i + rank;
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = in.tokens;
    args.xType = moecommFloat8E4M3;
    args.x = in.tokens > 0 ? x.data() : nullptr;
    args.xScales = in.tokens > 0 ? scales.data() : nullptr;
    args.topkIdx = in.tokens > 0 ? ids.data() : nullptr;
    args.topkIdxType = moecommInt32;
    moecommEpHandle_t handle = nullptr;
    int n = -1;
    std::vector<int> perExpert(2);
    ASSERT_EQ(moecommEpNotifyDispatch(ep, &args, &handle, &n, perExpert.data(), nullptr), moecommSuccess)
        << lastError();
    ASSERT_EQ(n, expected.numRecv[rank]);
    std::vector<uint8_t> recvX(n * shape.hidden + 1, 0x5a);
    std::vector<float> recvScales(n * 2 + 1, -1.0f);
    std::vector<int32_t> recvIds(n * shape.topk + 1, 99);
    args.recvCapacity = n;
    args.recvX = recvX.data();
    args.recvXScales = recvScales.data();
    args.recvTopkIdx = recvIds.data();
    ASSERT_EQ(moecommEpDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
    std::vector<int> srcRank(n), srcIndex(n);
    ASSERT_EQ(moecommEpHandleGetSourceInfo(handle, srcRank.data(), srcIndex.data(), n), moecommSuccess);
    for (int row = 0; row < n; ++row) {
      // Only rank 0 has tokens; check each row against the source rank's bytes.
      ASSERT_EQ(srcRank[row], 0);
      const int t = srcIndex[row];
      for (int h = 0; h < shape.hidden; ++h)
        ASSERT_EQ(recvX[row * shape.hidden + h], static_cast<uint8_t>((t * shape.hidden + h) * 3));
      EXPECT_EQ(recvScales[row * 2], 0.5f * (t * 2));
      EXPECT_EQ(recvScales[row * 2 + 1], 0.5f * (t * 2 + 1));
      for (int k = 0; k < shape.topk; ++k) EXPECT_EQ(recvIds[row * 2 + k], expected.recvIds[rank][row * 2 + k]);
    }
    EXPECT_EQ(recvX[n * shape.hidden], 0x5a);  // nothing written past N rows
    EXPECT_EQ(recvIds[n * shape.topk], 99);
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

// Low latency on two ranks: FP8 with power-of-two scales, send-only halves completed later,
// then a round where rank 0 masks rank 1.
TEST_F(EpApiTwoRanks, LowLatencyMatchesReference) {
  const moecommEpConfig_t config = makeConfig(8, 256, 8, 3, moecommEpModeLowLatency);
  const EpShape shape = shapeOf(config);
  const int localExperts = 4, slotsPerExpert = kRanks * 8, scalesPerRow = 2;
  const std::vector<RankInputs> all = makeInputs(shape, 99, {8, 5});
  for (int round = 0; round < 2; ++round) {
    // Round 1: every rank masks rank 1 (the same mask everywhere, as for a rank that died);
    // what the masked rank itself receives is unspecified, so only its return codes count.
    SCOPED_TRACE(round == 0 ? "no mask" : "every rank masks rank 1");
    const std::vector<int> masksAll = round == 0 ? std::vector<int>{0, 0, 0, 0} : std::vector<int>{0, 1, 0, 1};
    const auto checked = [&](int rank) { return round == 0 || rank == 0; };
    // The reference: every rank's pack and every rank's expert outputs.
    std::vector<reference::LowLatencySource> sources(kRanks);
    std::vector<int> countsAll(kRanks * shape.numExperts);
    for (int r = 0; r < kRanks; ++r) {
      sources[r] = {all[r].tokens, all[r].ids.data(), all[r].x.data()};
      reference::lowLatencyPlacementCounts(shape, all[r].ids.data(), all[r].tokens, &countsAll[r * shape.numExperts]);
    }
    std::vector<std::vector<uint8_t>> wantX(kRanks, std::vector<uint8_t>(localExperts * slotsPerExpert * 256));
    std::vector<std::vector<float>> wantScales(kRanks,
                                               std::vector<float>(localExperts * slotsPerExpert * scalesPerRow));
    std::vector<std::vector<int>> wantCount(kRanks, std::vector<int>(localExperts));
    std::vector<std::vector<int>> wantSrc(kRanks, std::vector<int>(localExperts * slotsPerExpert, -1));
    std::vector<std::vector<uint16_t>> y(kRanks, std::vector<uint16_t>(localExperts * slotsPerExpert * 256, 0));
    for (int r = 0; r < kRanks; ++r) {
      reference::LowLatencyDispatchOutput out;
      out.roundScale = true;
      out.recvX = wantX[r].data();
      out.recvScales = wantScales[r].data();
      out.recvCount = wantCount[r].data();
      out.recvSrcInfo = wantSrc[r].data();
      reference::lowLatencyPack(shape, r, sources.data(), &masksAll[r * kRanks], out);
      for (int i = 0; i < localExperts * slotsPerExpert; ++i) {
        if (wantSrc[r][i] < 0) continue;
        for (int h = 0; h < 256; ++h) y[r][i * 256 + h] = bf16(wantSrc[r][i] * 0.25f - h / 64.0f);
      }
    }
    std::vector<const uint16_t*> outputs = {y[0].data(), y[1].data()};
    run([&](int rank) {
      moecommEp_t ep = create(rank, config);
      ASSERT_NE(ep, nullptr);
      ASSERT_EQ(moecommEpSetRankMask(ep, &masksAll[rank * kRanks]), moecommSuccess);
      const RankInputs& in = all[rank];
      std::vector<uint8_t> recvX(wantX[rank].size());
      std::vector<float> recvScales(wantScales[rank].size());
      std::vector<int> count(localExperts), src(localExperts * slotsPerExpert, -1);
      moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
      args.numTokens = in.tokens;
      args.x = in.x.data();
      args.topkIdx = in.ids.data();
      args.flags = MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_SEND_ONLY;
      args.recvX = recvX.data();
      args.recvScales = recvScales.data();
      args.recvCount = count.data();
      args.recvSrcInfo = src.data();
      moecommEpHandle_t handle = nullptr;
      ASSERT_EQ(moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
      ASSERT_EQ(moecommEpComplete(ep, handle, nullptr), moecommSuccess) << lastError();
      if (checked(rank)) {
        ASSERT_EQ(count, wantCount[rank]);
        EXPECT_EQ(src, wantSrc[rank]);
      }
      for (int le = 0; le < localExperts && checked(rank); ++le) {
        for (int slot = 0; slot < count[le]; ++slot) {
          const size_t row = static_cast<size_t>(le) * slotsPerExpert + slot;
          for (int h = 0; h < 256; ++h) ASSERT_EQ(recvX[row * 256 + h], wantX[rank][row * 256 + h]) << row;
          for (int b = 0; b < scalesPerRow; ++b) ASSERT_EQ(recvScales[row * 2 + b], wantScales[rank][row * 2 + b]);
        }
      }
      // Combine against the reference with every rank's slots and this rank's mask.
      std::vector<int> slots(in.tokens * shape.topk);
      reference::lowLatencySelectionSlots(shape, rank, in.ids.data(), in.tokens, countsAll.data(), masksAll.data(),
                                          slots.data());
      std::vector<uint16_t> want(in.tokens * shape.hidden), out(in.tokens * shape.hidden, 0xdead);
      reference::lowLatencyCombine(shape, in.tokens, in.ids.data(), in.weights.data(), slots.data(), outputs.data(),
                                   &masksAll[rank * kRanks], want.data());
      moecommEpLowLatencyCombineArgs_t combine = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
      combine.x = y[rank].data();
      combine.topkIdx = in.ids.data();
      combine.topkWeights = in.weights.data();
      combine.out = out.data();
      combine.flags = MOECOMM_LL_SEND_ONLY;
      ASSERT_EQ(moecommEpLowLatencyCombine(ep, &combine, handle, nullptr), moecommSuccess) << lastError();
      ASSERT_EQ(moecommEpComplete(ep, handle, nullptr), moecommSuccess) << lastError();
      for (size_t i = 0; i < out.size() && checked(rank); ++i) {
        ASSERT_EQ(out[i], want[i]) << "rank " << rank << " element " << i;
      }
      EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
    });
  }
}

// Low-latency dispatch + combine on rank 0 while rank 1 makes no low-latency call. With
// rank 1 masked beforehand nobody waits for it; unmasked, rank 0 waits MOECOMM_LL_TIMEOUT and
// then masks it itself. Either way the results are the reference's with rank 1 masked.
class LowLatencyWithSilentRank : public EpApiTwoRanks, public ::testing::WithParamInterface<bool> {};

TEST_P(LowLatencyWithSilentRank, RankZeroCarriesOn) {
  const bool maskedBeforehand = GetParam();
  const moecommEpConfig_t config = makeConfig(4, 128, 4, 2, moecommEpModeLowLatency);
  const EpShape shape = shapeOf(config);
  const std::vector<RankInputs> all = makeInputs(shape, 5, {4, 4});
  setenv("MOECOMM_LL_TIMEOUT", "300", 1);  // read when the EP is created
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    if (rank == 0) {
      const int mask[2] = {0, maskedBeforehand ? 1 : 0};
      ASSERT_EQ(moecommEpSetRankMask(ep, mask), moecommSuccess);
      const RankInputs& in = all[0];
      std::vector<uint16_t> recvX(2 * 8 * 128);
      std::vector<int> count(2), src(2 * 8, -1);
      moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
      args.numTokens = in.tokens;
      args.x = in.x.data();
      args.topkIdx = in.ids.data();
      args.recvType = moecommBfloat16;
      args.recvX = recvX.data();
      args.recvCount = count.data();
      args.recvSrcInfo = src.data();
      moecommEpHandle_t handle = nullptr;
      const auto start = std::chrono::steady_clock::now();
      ASSERT_EQ(moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
      const auto waited = std::chrono::steady_clock::now() - start;
      if (maskedBeforehand) {
        EXPECT_LT(waited, std::chrono::milliseconds(250));
      }
      int seen[2] = {-1, -1};
      ASSERT_EQ(moecommEpGetRankMask(ep, seen), moecommSuccess);
      EXPECT_EQ(seen[1], 1);
      // Only rank 0's own tokens arrive.
      std::vector<int> wantCount(2, 0);
      for (int t = 0; t < in.tokens; ++t) {
        for (int k = 0; k < 2; ++k) {
          const int64_t e = in.ids[t * 2 + k];
          if (e >= 0 && e < 2 && !(k == 1 && in.ids[t * 2] == e)) ++wantCount[e];
        }
      }
      EXPECT_EQ(count, wantCount);
      std::vector<uint16_t> y(recvX.size()), out(in.tokens * 128), want(in.tokens * 128);
      for (size_t i = 0; i < y.size(); ++i) y[i] = bf16(static_cast<float>(i % 11) - 5.0f);
      moecommEpLowLatencyCombineArgs_t combine = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
      combine.x = y.data();
      combine.topkIdx = in.ids.data();
      combine.topkWeights = in.weights.data();
      combine.out = out.data();
      ASSERT_EQ(moecommEpLowLatencyCombine(ep, &combine, handle, nullptr), moecommSuccess) << lastError();
      std::vector<int> countsAll(2 * 4), slots(in.tokens * 2);
      reference::lowLatencyPlacementCounts(shape, in.ids.data(), in.tokens, countsAll.data());
      const std::vector<int> masksAll = {0, 1, 0, 0};
      reference::lowLatencySelectionSlots(shape, 0, in.ids.data(), in.tokens, countsAll.data(), masksAll.data(),
                                          slots.data());
      const uint16_t* outputs[2] = {y.data(), nullptr};
      reference::lowLatencyCombine(shape, in.tokens, in.ids.data(), in.weights.data(), slots.data(), outputs,
                                   masksAll.data(), want.data());
      EXPECT_EQ(out, want);
    }
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
  unsetenv("MOECOMM_LL_TIMEOUT");
}

INSTANTIATE_TEST_SUITE_P(EpApiTwoRanks, LowLatencyWithSilentRank, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& param) {
                           return param.param ? std::string("MaskedBeforehand") : std::string("MaskedOnTimeout");
                         });

// A bad low-latency argument on one rank reaches the other through the buffer flags at once.
TEST_F(EpApiTwoRanks, LowLatencyBadArgumentOnOneRankFailsEveryRank) {
  const moecommEpConfig_t config = makeConfig(4, 128, 4, 2, moecommEpModeLowLatency);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    std::vector<int64_t> ids = {0, 3, 1, rank == 1 ? 4 : 2};
    std::vector<uint16_t> x(2 * 128), recvX(2 * 8 * 128);
    std::vector<int> count(2);
    moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
    args.numTokens = 2;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.recvType = moecommBfloat16;
    args.recvX = recvX.data();
    args.recvCount = count.data();
    moecommEpHandle_t handle = nullptr;
    const auto start = std::chrono::steady_clock::now();
    const moecommResult_t result = moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr);
    const std::string text = lastError();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
    EXPECT_EQ(result, rank == 1 ? moecommInvalidArgument : moecommRemoteError) << text;
    EXPECT_EQ(handle, nullptr);
    ids[3] = 2;  // the next operation works, in the same slot
    EXPECT_EQ(moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
    int mask[2] = {-1, -1};
    EXPECT_EQ(moecommEpGetRankMask(ep, mask), moecommSuccess);
    EXPECT_EQ(mask[0] + mask[1], 0) << "nobody was masked";
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

// ---- MOECOMM_LL_PER_RANK_COMBINE on 2 and 4 ranks ----------------------------------------------

// GetParam() host ranks, one thread each.
class LowLatencyPerRankCombine : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    setenv("MOECOMM_BACKEND", "host", 1);
    setenv("MOECOMM_BOOTSTRAP_TIMEOUT", "20000", 1);
    comms_.assign(GetParam(), nullptr);
    ASSERT_EQ(moecommCommInitAll(comms_.data(), GetParam(), nullptr), moecommSuccess) << lastError();
  }
  void TearDown() override {
    if (comms_.empty() || comms_[0] == nullptr) return;
    run([&](int rank) { EXPECT_EQ(moecommCommDestroy(comms_[rank]), moecommSuccess) << lastError(); });
  }
  int ranks() const { return static_cast<int>(comms_.size()); }
  void run(const std::function<void(int)>& body) {
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks(); ++r) threads.emplace_back(body, r);
    for (auto& thread : threads) thread.join();
  }

  std::vector<moecommComm_t> comms_;
};

struct PerRankCase {
  const char* name;
  int expertsPerRank, hidden, maxTokens, topk;
  moecommDataType_t recvType;
  // MOECOMM_LL_SEND_ONLY (every half completed with moecommEpComplete; a per-expert operation
  // on the same inputs is kept in flight next to the per-rank one) and/or MOECOMM_LL_ZERO_COPY.
  unsigned flags;
  int maskedRank;     // every rank masks it (it still makes the calls, unchecked); -1: none
  int zeroTokenRank;  // a rank with T = 0; -1: none
  bool int32Ids;
};

// Per-rank combine results, element by element, against reference::lowLatencyCombine(perRank
// = true), on random routing with -1 entries and repeated experts and expert outputs of widely
// varied magnitude (so that rounding each rank's partial shows: for every case with two or more
// unmasked ranks and K > 1 the per-expert result must differ somewhere, which the test
// asserts, so it can tell the two forms apart).
TEST_P(LowLatencyPerRankCombine, MatchesReference) {
  const int n = ranks();
  const PerRankCase cases[] = {
      {"FP8", 2, 256, 8, 4, moecommFloat8E4M3, 0u, -1, -1, false},
      {"send-only next to a per-expert operation", 3, 128, 6, 3, moecommBfloat16, MOECOMM_LL_SEND_ONLY, -1, -1, false},
      {"zero copy, a rank without tokens", 4, 64, 5, 8, moecommBfloat16, MOECOMM_LL_ZERO_COPY, -1, 1, true},
      {"last rank masked", 2, 128, 8, 5, moecommBfloat16, 0u, n - 1, -1, true},
      {"rank 0 masked, send-only", 2, 128, 7, 6, moecommFloat8E4M3, MOECOMM_LL_SEND_ONLY, 0, -1, false},
      {"top-1 (both forms agree)", 2, 128, 4, 1, moecommBfloat16, 0u, -1, -1, false},
  };
  unsigned seed = 1000u * n;
  for (const PerRankCase& c : cases) {
    SCOPED_TRACE(std::string(c.name) + ", " + std::to_string(n) + " ranks");
    const moecommEpConfig_t config =
        makeConfig(c.expertsPerRank * n, c.hidden, c.maxTokens, c.topk, moecommEpModeLowLatency);
    const EpShape shape = shapeOf(config, n);
    const int localExperts = c.expertsPerRank, slotsPerExpert = n * c.maxTokens, H = c.hidden, K = c.topk;
    const size_t slots = static_cast<size_t>(localExperts) * slotsPerExpert;
    std::vector<int> tokens(n);
    for (int r = 0; r < n; ++r) tokens[r] = r == c.zeroTokenRank ? 0 : c.maxTokens - r % 3;
    std::vector<RankInputs> all = makeInputs(shape, ++seed, tokens);
    for (RankInputs& in : all) {  // more repeated experts and -1 entries than chance gives
      for (int t = 0; t < in.tokens && K > 1; ++t) {
        if (t % 4 == 0) in.ids[t * K + K - 1] = in.ids[t * K];
        if (t % 5 == 2) in.ids[t * K + 1] = -1;
      }
    }
    std::vector<int> masksAll(n * n, 0);
    for (int r = 0; r < n && c.maskedRank >= 0; ++r) masksAll[r * n + c.maskedRank] = 1;
    const auto checked = [&](int rank) { return rank != c.maskedRank; };

    // Reference: every rank's placement, its expert outputs (NaN beyond each count), and each
    // rank's combine in both forms.
    std::vector<reference::LowLatencySource> sources(n);
    std::vector<int> countsAll(n * shape.numExperts);
    for (int r = 0; r < n; ++r) {
      sources[r] = {all[r].tokens, all[r].ids.data(), all[r].x.data()};
      reference::lowLatencyPlacementCounts(shape, all[r].ids.data(), all[r].tokens, &countsAll[r * shape.numExperts]);
    }
    std::mt19937 random(seed * 7919u);
    std::uniform_real_distribution<float> mantissa(-2.0f, 2.0f);
    std::uniform_int_distribution<int> exponent(-10, 3);
    std::vector<std::vector<int>> wantCount(n, std::vector<int>(localExperts));
    std::vector<std::vector<int>> wantSrc(n, std::vector<int>(slots, -1));
    std::vector<std::vector<uint16_t>> y(n, std::vector<uint16_t>(slots * H, bf16(std::nanf(""))));
    for (int r = 0; r < n; ++r) {
      std::vector<uint8_t> recvX(slots * H * 2);
      std::vector<float> recvScales(slots * (H / 128 + 1));
      reference::LowLatencyDispatchOutput out;
      out.recvType = c.recvType;
      out.recvX = recvX.data();
      out.recvScales = c.recvType == moecommFloat8E4M3 ? recvScales.data() : nullptr;
      out.recvCount = wantCount[r].data();
      out.recvSrcInfo = wantSrc[r].data();
      reference::lowLatencyPack(shape, r, sources.data(), &masksAll[r * n], out);
      for (size_t i = 0; i < slots; ++i) {
        if (wantSrc[r][i] < 0) continue;
        for (int h = 0; h < H; ++h) y[r][i * H + h] = bf16(std::ldexp(mantissa(random), exponent(random)));
      }
    }
    std::vector<const uint16_t*> outputs;
    for (int r = 0; r < n; ++r) outputs.push_back(y[r].data());
    std::vector<std::vector<uint16_t>> wantPerRank(n), wantPerExpert(n);
    size_t differing = 0;
    for (int r = 0; r < n; ++r) {
      const RankInputs& in = all[r];
      std::vector<int> slotOf(in.tokens * K);
      reference::lowLatencySelectionSlots(shape, r, in.ids.data(), in.tokens, countsAll.data(), masksAll.data(),
                                          slotOf.data());
      wantPerRank[r].resize(in.tokens * H);
      wantPerExpert[r].resize(in.tokens * H);
      reference::lowLatencyCombine(shape, in.tokens, in.ids.data(), in.weights.data(), slotOf.data(), outputs.data(),
                                   &masksAll[r * n], wantPerRank[r].data(), true);
      reference::lowLatencyCombine(shape, in.tokens, in.ids.data(), in.weights.data(), slotOf.data(), outputs.data(),
                                   &masksAll[r * n], wantPerExpert[r].data(), false);
      for (size_t i = 0; i < wantPerRank[r].size() && checked(r); ++i)
        differing += wantPerRank[r][i] != wantPerExpert[r][i];
    }
    const int unmasked = n - (c.maskedRank >= 0 ? 1 : 0);
    if (K == 1) {
      EXPECT_EQ(differing, 0u) << "with one selection per token both forms round once";
    } else if (unmasked >= 2) {
      ASSERT_GT(differing, 0u) << "the data do not tell the per-rank form from the per-expert one";
    }

    run([&](int rank) {
      moecommEp_t ep = nullptr;
      ASSERT_EQ(moecommEpCreate(comms_[rank], &config, &ep), moecommSuccess) << lastError();
      ASSERT_EQ(moecommEpSetRankMask(ep, &masksAll[rank * n]), moecommSuccess);
      const RankInputs& in = all[rank];
      const bool sendOnly = (c.flags & MOECOMM_LL_SEND_ONLY) != 0;
      const std::vector<int32_t> ids32(in.ids.begin(), in.ids.end());
      const size_t rowBytes = c.recvType == moecommFloat8E4M3 ? H : 2 * H;
      // Operation 0 is per-rank; with send-only, operation 1 (per-expert) is in flight beside it.
      const int operations = sendOnly ? 2 : 1;
      std::vector<std::vector<uint8_t>> recvX(operations, std::vector<uint8_t>(slots * rowBytes));
      std::vector<std::vector<float>> recvScales(operations, std::vector<float>(slots * (H / 128)));
      std::vector<std::vector<int>> count(operations, std::vector<int>(localExperts, -1));
      std::vector<std::vector<int>> src(operations, std::vector<int>(slots, -1));
      std::vector<moecommEpHandle_t> handles(operations, nullptr);
      for (int op = 0; op < operations; ++op) {
        moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
        args.numTokens = in.tokens;
        args.x = in.x.data();
        args.topkIdx = c.int32Ids ? static_cast<const void*>(ids32.data()) : in.ids.data();
        args.topkIdxType = c.int32Ids ? moecommInt32 : moecommInt64;
        args.recvType = c.recvType;
        args.recvX = recvX[op].data();
        args.recvScales = c.recvType == moecommFloat8E4M3 ? recvScales[op].data() : nullptr;
        args.recvCount = count[op].data();
        args.recvSrcInfo = src[op].data();
        args.flags = sendOnly ? MOECOMM_LL_SEND_ONLY : 0u;
        if (op == 0) {
          args.flags |= MOECOMM_LL_PER_RANK_COMBINE;
          args.topkWeights = in.weights.data();
        }
        ASSERT_EQ(moecommEpLowLatencyDispatch(ep, &args, &handles[op], nullptr), moecommSuccess) << lastError();
      }
      for (int op = operations - 1; op >= 0 && sendOnly; --op) {
        ASSERT_EQ(moecommEpComplete(ep, handles[op], nullptr), moecommSuccess) << lastError();
      }
      for (int op = 0; op < operations && checked(rank); ++op) {
        EXPECT_EQ(count[op], wantCount[rank]) << "operation " << op;
        EXPECT_EQ(src[op], wantSrc[rank]) << "operation " << op;
      }
      void* zeroCopy = nullptr;
      if ((c.flags & MOECOMM_LL_ZERO_COPY) != 0) {
        ASSERT_EQ(moecommEpLowLatencyCombineBuffer(ep, &zeroCopy), moecommSuccess) << lastError();
        std::memcpy(zeroCopy, y[rank].data(), y[rank].size() * sizeof(uint16_t));
      }
      std::vector<std::vector<uint16_t>> out(operations, std::vector<uint16_t>(in.tokens * H, 0xdead));
      for (int op = 0; op < operations; ++op) {
        moecommEpLowLatencyCombineArgs_t combine = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
        combine.x = zeroCopy != nullptr ? nullptr : y[rank].data();
        combine.topkIdx = c.int32Ids ? static_cast<const void*>(ids32.data()) : in.ids.data();
        combine.topkIdxType = c.int32Ids ? moecommInt32 : moecommInt64;
        combine.topkWeights = op == 0 ? nullptr : in.weights.data();
        combine.out = out[op].data();
        combine.flags = c.flags;
        ASSERT_EQ(moecommEpLowLatencyCombine(ep, &combine, handles[op], nullptr), moecommSuccess) << lastError();
      }
      for (int op = 0; op < operations && sendOnly; ++op) {
        ASSERT_EQ(moecommEpComplete(ep, handles[op], nullptr), moecommSuccess) << lastError();
      }
      for (int op = 0; op < operations && checked(rank); ++op) {
        const std::vector<uint16_t>& want = op == 0 ? wantPerRank[rank] : wantPerExpert[rank];
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(out[op][i], want[i]) << (op == 0 ? "per-rank" : "per-expert") << " combine, rank " << rank
                                         << " token " << i / H << " channel " << i % H;
        }
      }
      for (moecommEpHandle_t handle : handles) EXPECT_EQ(moecommEpHandleDestroy(handle), moecommSuccess);
      EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
    });
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(EpApiRanks, LowLatencyPerRankCombine, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& param) {
                           return std::to_string(param.param) + "Ranks";
                         });

// A bad expert id on rank 1 fails the call on both ranks at once; the next call works.
TEST_F(EpApiTwoRanks, BadArgumentOnOneRankFailsEveryRankPromptly) {
  const moecommEpConfig_t config = makeConfig(4, 128, 4, 2, moecommEpModeNormal);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    std::vector<int64_t> ids = {0, 3, 1, rank == 1 ? 99 : 2};
    std::vector<uint16_t> x(2 * 128), recvX(8 * 128);
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = 2;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.recvCapacity = 8;
    args.recvX = recvX.data();
    moecommEpHandle_t handle = nullptr;
    const auto start = std::chrono::steady_clock::now();
    const moecommResult_t result = moecommEpDispatch(ep, &args, &handle, nullptr);
    const std::string text = lastError();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
    EXPECT_EQ(handle, nullptr);
    if (rank == 1) {
      EXPECT_EQ(result, moecommInvalidArgument);
      EXPECT_NE(text.find("topkIdx[1][1] = 99"), std::string::npos) << text;
    } else {
      EXPECT_EQ(result, moecommRemoteError);
      EXPECT_NE(text.find("rank 1"), std::string::npos) << text;
    }
    ids[3] = 2;
    EXPECT_EQ(moecommEpDispatch(ep, &args, &handle, nullptr), moecommSuccess) << lastError();
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

TEST_F(EpApiTwoRanks, RecvCapacityTooSmallOnOneRankFailsEveryRank) {
  const moecommEpConfig_t config = makeConfig(4, 128, 4, 1, moecommEpModeNormal);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    std::vector<int64_t> ids = {0, 1, 2};  // every rank sends 2 tokens to rank 0, 1 to rank 1
    std::vector<uint16_t> x(3 * 128), recvX(8 * 128);
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = 3;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.recvCapacity = 3;  // rank 0 receives 4
    args.recvX = recvX.data();
    moecommEpHandle_t handle = nullptr;
    const moecommResult_t result = moecommEpDispatch(ep, &args, &handle, nullptr);
    EXPECT_EQ(result, rank == 0 ? moecommInvalidArgument : moecommRemoteError) << lastError();
    EXPECT_EQ(handle, nullptr);
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

TEST_F(EpApiTwoRanks, ConfigMismatchFailsEveryRank) {
  run([&](int rank) {
    const moecommEpConfig_t config = makeConfig(4, rank == 0 ? 128 : 256, 4, 2, moecommEpModeNormal);
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comms_[rank], &config, &ep), moecommInvalidArgument);
    const std::string text = lastError();
    EXPECT_NE(text.find("hidden differs"), std::string::npos) << text;
    EXPECT_NE(text.find("rank 1 passed 256"), std::string::npos) << text;
    EXPECT_EQ(ep, nullptr);
  });
}

TEST_F(EpApiTwoRanks, InvalidConfigOnOneRankFailsEveryRank) {
  run([&](int rank) {
    const moecommEpConfig_t config = makeConfig(4, 128, 4, rank == 0 ? 0 : 2, moecommEpModeNormal);
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comms_[rank], &config, &ep), rank == 0 ? moecommInvalidArgument : moecommRemoteError)
        << lastError();
    EXPECT_STRNE(moecommGetLastError(nullptr), "");
  });
}

TEST_F(EpApiTwoRanks, NumExpertsNotMultipleOfRanks) {
  run([&](int rank) {
    const moecommEpConfig_t config = makeConfig(3, 128, 4, 2, moecommEpModeNormal);
    size_t bytes = 0;
    EXPECT_EQ(moecommEpGetBufferSizeHint(comms_[rank], &config, &bytes), moecommInvalidArgument);
    EXPECT_STRNE(moecommGetLastError(nullptr), "");
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comms_[rank], &config, &ep), moecommInvalidArgument);
  });
}

// Calls made in a different order on the two ranks are reported, not silently mixed up.
TEST_F(EpApiTwoRanks, MismatchedCallsAreReported) {
  const moecommEpConfig_t config = makeConfig(4, 128, 4, 2, moecommEpModeNormal);
  run([&](int rank) {
    moecommEp_t ep = create(rank, config);
    ASSERT_NE(ep, nullptr);
    std::vector<int64_t> ids = {0, 3};
    std::vector<uint16_t> x(128), recvX(8 * 128);
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = 1;
    args.x = x.data();
    args.topkIdx = ids.data();
    args.recvCapacity = 8;
    args.recvX = recvX.data();
    moecommEpHandle_t handle = nullptr;
    moecommResult_t result;
    if (rank == 0) {
      moecommEpLayoutArgs_t layout = MOECOMM_EP_LAYOUT_ARGS_INIT;  // local: no synchronisation
      EXPECT_EQ(moecommEpGetLayout(ep, &layout, nullptr), moecommSuccess);
      int n = 0;
      result = moecommEpNotifyDispatch(ep, &args, &handle, &n, nullptr, nullptr);
    } else {
      result = moecommEpDispatch(ep, &args, &handle, nullptr);
    }
    EXPECT_EQ(result, moecommInvalidUsage) << lastError();
    EXPECT_NE(lastError().find("same order"), std::string::npos) << lastError();
    EXPECT_EQ(handle, nullptr);
    EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << lastError();
  });
}

}  // namespace
}  // namespace moecomm
