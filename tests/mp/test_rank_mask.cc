// Rank masking in low-latency mode: a masked rank is skipped. Its tokens are absent from every
// receiver, and combine entries whose expert lives on it add nothing.
//
// RankMask: every rank sets the same mask and every rank, the masked one included, makes the
// low-latency calls; the unmasked ranks' outputs are checked (what the masked rank itself
// receives is not specified by the header, so only its return codes are).
//
// RankMaskAbsent: the masked rank plays a rank that stopped answering. It makes no low-latency
// call at all and goes straight to the (collective) EpDestroy, where the others join it once
// done: "skipped, not waited on". Kept as its own suite so its result reads separately.
//
// Each test uses a fresh EP so that no state of a half-used EP leaks into the next test.
#include "mp/ll_ops.h"

namespace moecomm_mp {
namespace {

class RankMask : public MpTest {
 protected:
  std::vector<int> QueryMask(moecommEp_t ep) {
    std::vector<int> mask(nranks(), static_cast<int>(0xABABABABu));
    const moecommResult_t result = moecommEpGetRankMask(ep, mask.data());
    EXPECT_EQ(result, moecommSuccess) << "moecommEpGetRankMask: " << LastError();
    return mask;
  }

  // masked_rank_calls: whether the masked rank makes the low-latency calls too. per_rank:
  // MOECOMM_LL_PER_RANK_COMBINE (selections on the masked rank add nothing to any partial, and
  // a rank left without selections is skipped).
  void RunWithMaskedRank(int masked_rank, bool masked_rank_calls, bool per_rank = false) {
    const EpShape shape = Shape(24, 256, 16, 4);
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
    Random random = MakeRandom();
    const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
    const std::vector<int> nobody(nranks(), 0);
    EXPECT_TRUE(SameVectors("initial rank mask", ElementKind::kInt32, QueryMask(ep.get()).data(), nobody, 0));

    std::vector<int> mask(nranks(), 0);
    mask[masked_rank] = 1;
    MP_ASSERT_OK(moecommEpSetRankMask(ep.get(), mask.data()));
    EXPECT_TRUE(SameVectors("rank mask after set", ElementKind::kInt32, QueryMask(ep.get()).data(), mask, 0));

    LowLatencyCase dispatch_case;
    dispatch_case.recvType = moecommFloat8E4M3;
    dispatch_case.perRankCombine = per_rank;
    LowLatencyCombine combine(shape, all, mask, dispatch_case.indexType, random, per_rank);
    if (rank() != masked_rank || masked_rank_calls) {
      LowLatencyDispatch dispatch(shape, dispatch_case, all[rank()]);
      ScopedHandle handle;
      MP_ASSERT_OK(dispatch.Send(ep.get(), 0, handle.out()));
      if (rank() != masked_rank) dispatch.Check(all, mask);
      MP_ASSERT_OK(combine.Send(ep.get(), 0, handle.get()));
      if (rank() != masked_rank) combine.Check();
    }
    MP_ASSERT_OK(moecommEpClearRankMask(ep.get()));
    EXPECT_TRUE(SameVectors("rank mask after clear", ElementKind::kInt32, QueryMask(ep.get()).data(), nobody, 0));
  }
};

TEST_F(RankMask, HighestRankMasked) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(nranks() - 1, true);
}

TEST_F(RankMask, RankZeroMasked) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(0, true);
}

TEST_F(RankMask, HighestRankMaskedPerRankCombine) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(nranks() - 1, true, true);
}

TEST_F(RankMask, RankZeroMaskedPerRankCombine) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(0, true, true);
}

// Every rank sets and clears the same mask without a call in between: afterwards every rank
// takes part again and receives everything.
TEST_F(RankMask, ClearedMaskRestoresEveryRank) {
  const EpShape shape = Shape(16, 128, 8, 3);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
  std::vector<int> mask(nranks(), 0);
  mask[nranks() - 1] = 1;
  MP_ASSERT_OK(moecommEpSetRankMask(ep.get(), mask.data()));
  MP_ASSERT_OK(moecommEpClearRankMask(ep.get()));
  Random random = MakeRandom();
  const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
  const std::vector<int> nobody(nranks(), 0);
  LowLatencyCase dispatch_case;
  dispatch_case.recvType = moecommBfloat16;
  LowLatencyDispatch dispatch(shape, dispatch_case, all[rank()]);
  ScopedHandle handle;
  MP_ASSERT_OK(dispatch.Send(ep.get(), 0, handle.out()));
  dispatch.Check(all, nobody);
  LowLatencyCombine combine(shape, all, nobody, dispatch_case.indexType, random);
  MP_ASSERT_OK(combine.Send(ep.get(), 0, handle.get()));
  combine.Check();
}

class RankMaskAbsent : public RankMask {};

TEST_F(RankMaskAbsent, MaskedRankMakesNoCall) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(nranks() - 1, false);
}

TEST_F(RankMaskAbsent, MaskedRankMakesNoCallPerRankCombine) {
  if (nranks() < 2) GTEST_SKIP() << "masking needs at least 2 ranks";
  RunWithMaskedRank(nranks() - 1, false, true);
}

}  // namespace
}  // namespace moecomm_mp
