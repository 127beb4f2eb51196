// Normal-mode dispatch: BF16 and FP8 payloads, int32/int64 indices, with and without weights,
// exact and worst-case sizing, expert alignment, handle reuse and unusual routings.
#include "mp/normal_ops.h"

namespace moecomm_mp {
namespace {

class Dispatch : public MpTest {
 protected:
  // Every combination of index type, weights and sizing for one payload type, fresh inputs each.
  void RunAllVariants(moecommDataType_t x_type) {
    const EpShape shape = Shape(24, 256, 48, 4);
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
    Random random = MakeRandom();
    for (moecommDataType_t index_type : {moecommInt64, moecommInt32}) {
      for (bool with_weights : {true, false}) {
        for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
          DispatchCase dispatch_case;
          dispatch_case.xType = x_type;
          dispatch_case.indexType = index_type;
          dispatch_case.withWeights = with_weights;
          dispatch_case.sizing = sizing;
          const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
          ScopedHandle handle;
          DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
};

TEST_F(Dispatch, Bf16AllVariants) { RunAllVariants(moecommBfloat16); }

TEST_F(Dispatch, Fp8WithScalesAllVariants) { RunAllVariants(moecommFloat8E4M3); }

TEST_F(Dispatch, ExpertAlignmentRoundsPerExpertCounts) {
  const EpShape shape = Shape(16, 128, 40, 3);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  for (int alignment : {1, 4, 128}) {
    for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
      DispatchCase dispatch_case;
      dispatch_case.expertAlignment = alignment;
      dispatch_case.sizing = sizing;
      dispatch_case.xType = alignment == 4 ? moecommFloat8E4M3 : moecommBfloat16;
      const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
      ScopedHandle handle;
      DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
      if (HasFatalFailure()) return;
    }
  }
}

// New x (and weights) through a handle from an earlier call: the routing is reused, the
// payload is fresh. Handles from both NotifyDispatch and a worst-case dispatch are reused, and
// each is reused twice.
TEST_F(Dispatch, HandleReuseWithNewPayload) {
  const EpShape shape = Shape(24, 128, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  for (Sizing first_sizing : {Sizing::kExact, Sizing::kWorstCase}) {
    for (moecommDataType_t x_type : {moecommBfloat16, moecommFloat8E4M3}) {
      std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
      ScopedHandle handle;
      DispatchCase dispatch_case;
      dispatch_case.xType = x_type;
      dispatch_case.indexType = x_type == moecommBfloat16 ? moecommInt64 : moecommInt32;
      dispatch_case.sizing = first_sizing;
      DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
      if (HasFatalFailure()) return;
      for (int again = 0; again < 2; ++again) {
        // Same routing, new payload and weights for every rank.
        for (RankInputs& inputs : all) {
          for (uint16_t& value : inputs.xBf16) value = random.Bf16();
          for (uint8_t& value : inputs.xFp8) value = random.Fp8();
          for (float& scale : inputs.xScales) scale = random.Weight();
          for (float& weight : inputs.topkWeights) weight = random.Weight();
        }
        dispatch_case.sizing = Sizing::kReuse;
        DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
        if (HasFatalFailure()) return;
      }
      // The reused handle still combines correctly.
      CombineCase combine_case;
      combine_case.withWeights = true;
      CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), random);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(Dispatch, RanksWithZeroTokens) {
  const EpShape shape = Shape(16, 64, 24, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.zeroTokenRankChance = 0.0;
  for (int pattern = 0; pattern < 3; ++pattern) {
    std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    // pattern 0: even ranks send nothing; 1: all but rank 0 send nothing; 2: every rank sends nothing.
    for (int r = 0; r < shape.nranks; ++r) {
      const bool empty = pattern == 0 ? r % 2 == 0 : pattern == 1 ? r != 0 : true;
      if (empty) all[r] = RankInputs();
    }
    for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
      DispatchCase dispatch_case;
      dispatch_case.sizing = sizing;
      ScopedHandle handle;
      DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(Dispatch, SkewEveryTokenSelectsOneExpert) {
  const EpShape shape = Shape(24, 128, 48, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.fullBatches = true;
  for (int skew_expert : {0, shape.numExperts - 1}) {
    options.skewExpert = skew_expert;
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    DispatchCase dispatch_case;
    dispatch_case.sizing = Sizing::kExact;
    dispatch_case.expertAlignment = 4;
    ScopedHandle handle;
    DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
    if (HasFatalFailure()) return;
  }
}

TEST_F(Dispatch, TokensWithOnlyEmptyEntries) {
  const EpShape shape = Shape(16, 64, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.emptyTokenChance = 0.5;
  options.emptyEntryChance = 0.3;
  std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
  // Rank 0's tokens are all -1: it sends nothing though T > 0.
  all[0].numTokens = shape.maxTokensPerRank;
  all[0].topkIdx.assign(static_cast<size_t>(all[0].numTokens) * shape.topk, -1);
  all[0].topkWeights.assign(all[0].topkIdx.size(), 0.5f);
  all[0].xBf16.assign(static_cast<size_t>(all[0].numTokens) * shape.hidden, FloatToBf16(1.0f));
  for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
    DispatchCase dispatch_case;
    dispatch_case.sizing = sizing;
    dispatch_case.indexType = moecommInt32;
    ScopedHandle handle;
    DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
    if (HasFatalFailure()) return;
  }
}

// A token listing one expert twice goes once to its rank, both entries remapped, and counts
// twice in recvTokensPerExpert (counts are of selections).
TEST_F(Dispatch, RepeatedExpertInOneToken) {
  const EpShape shape = Shape(16, 128, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.repeatEntryChance = 0.4;
  const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
  DispatchCase dispatch_case;
  dispatch_case.sizing = Sizing::kExact;
  dispatch_case.expertAlignment = 4;
  ScopedHandle handle;
  DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
  if (HasFatalFailure()) return;
  CombineCase combine_case;
  combine_case.withWeights = true;
  CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), random);
}

TEST_F(Dispatch, WithoutTopkOutputs) {
  const EpShape shape = Shape(24, 128, 32, 2);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
  DispatchCase dispatch_case;
  dispatch_case.withTopkOutputs = false;
  ScopedHandle handle;
  DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
}

}  // namespace
}  // namespace moecomm_mp

namespace moecomm_mp {
namespace {

// Every token selects one expert on every rank, so every rank receives every token (N = sum of
// T) and a capacity of N - 1 is too small on all ranks alike. The EP stays usable afterwards.
TEST_F(Dispatch, CapacityBelowNIsInvalidArgument) {
  const EpShape shape = Shape(2 * nranks(), 64, 8, nranks());
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.fullBatches = true;
  std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
  for (RankInputs& inputs : all) {
    for (int t = 0; t < inputs.numTokens; ++t) {
      for (int k = 0; k < shape.topk; ++k) inputs.topkIdx[static_cast<size_t>(t) * shape.topk + k] = 2 * k + t % 2;
    }
  }
  const RankInputs& in = all[rank()];
  const int rows = shape.nranks * shape.maxTokensPerRank;
  std::vector<uint16_t> recv_x(static_cast<size_t>(rows) * shape.hidden);
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = in.numTokens;
  args.x = InputData(in.xBf16);
  args.topkIdx = InputData(in.topkIdx);
  args.recvCapacity = rows - 1;
  args.recvX = recv_x.data();
  ScopedHandle refused;
  EXPECT_EQ(moecommEpDispatch(ep.get(), &args, refused.out(), nullptr), moecommInvalidArgument)
      << "[rank " << rank() << "] N = " << rows << " rows into a capacity of " << rows - 1;
  EXPECT_STRNE(LastError().c_str(), "");
  refused.Reset();
  if (HasFailure()) return;

  ScopedHandle handle;
  DispatchAndCheck(ep.get(), shape, all, DispatchCase(), &handle);
}

// Random shapes, routings and options, one EP each: the generic path for shapes no other test
// names. Everything is drawn from the shared generator, so every rank draws the same shape.
TEST_F(Dispatch, RandomShapesDispatchAndCombine) {
  Random random = MakeRandom();
  constexpr int kRounds = 12;
  for (int round = 0; round < kRounds; ++round) {
    const bool fp8 = random.Chance(0.5);
    const int hidden = fp8 ? 128 * random.Between(1, 4) : 8 * random.Between(1, 64);
    const int experts_per_rank = random.Between(1, 8);
    const int topk = random.Between(1, std::min(experts_per_rank * nranks(), MOECOMM_MAX_TOPK));
    const EpShape shape = Shape(experts_per_rank * nranks(), hidden, random.Between(1, 48), topk);
    DispatchCase dispatch_case;
    dispatch_case.xType = fp8 ? moecommFloat8E4M3 : moecommBfloat16;
    dispatch_case.indexType = random.Chance(0.5) ? moecommInt32 : moecommInt64;
    dispatch_case.withWeights = random.Chance(0.7);
    dispatch_case.sizing = random.Chance(0.5) ? Sizing::kExact : Sizing::kWorstCase;
    const int alignments[] = {1, 2, 4, 8, 128};
    dispatch_case.expertAlignment = alignments[random.Below(5)];
    RoutingOptions options;
    options.emptyEntryChance = 0.3 * random.Unit();
    options.emptyTokenChance = 0.2 * random.Unit();
    options.zeroTokenRankChance = 0.3 * random.Unit();
    options.skewExpert = random.Chance(0.2) ? random.Below(shape.numExperts) : -1;
    CombineCase combine_case;
    combine_case.withBias = random.Chance(0.5);
    combine_case.withWeights = random.Chance(0.5);
    SCOPED_TRACE("round " + std::to_string(round) + ": E=" + std::to_string(shape.numExperts) +
                 " H=" + std::to_string(shape.hidden) + " maxT=" + std::to_string(shape.maxTokensPerRank) +
                 " K=" + std::to_string(shape.topk));

    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    ScopedHandle handle;
    DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
    if (HasFatalFailure()) return;
    CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), random);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace moecomm_mp
