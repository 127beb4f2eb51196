// moecommEpGetLayout: tokens per rank, tokens per expert and isTokenInRank against the
// reference, on random routing with -1 entries, for int64 and int32 indices.
#include "mp/mp_common.h"

namespace moecomm_mp {
namespace {

class Layout : public MpTest {
 protected:
  // Runs the layout on this rank's inputs and checks all three outputs.
  void CheckLayout(moecommEp_t ep, const EpShape& shape, const RankInputs& inputs, moecommDataType_t index_type) {
    SCOPED_TRACE(std::string("topk index type ") + IndexTypeName(index_type) +
                 ", T=" + std::to_string(inputs.numTokens));
    const ReferenceLayout expected = ComputeLayout(shape, inputs);
    const IndexBuffer indices(inputs.topkIdx, index_type);
    GuardedBuffer<int> tokens_per_rank(shape.nranks, kPoisonInt);
    GuardedBuffer<int> tokens_per_expert(shape.numExperts, kPoisonInt);
    GuardedBuffer<uint8_t> is_token_in_rank(static_cast<size_t>(inputs.numTokens) * shape.nranks, kPoisonInt);

    moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
    args.numTokens = inputs.numTokens;
    args.topkIdx = indices.data();
    args.topkIdxType = index_type;
    args.tokensPerRank = tokens_per_rank.data();
    args.tokensPerExpert = tokens_per_expert.data();
    args.isTokenInRank = is_token_in_rank.data();
    MP_ASSERT_OK(moecommEpGetLayout(ep, &args, nullptr));

    EXPECT_TRUE(SameVectors("tokensPerRank", ElementKind::kInt32, tokens_per_rank.data(), expected.tokensPerRank, 0));
    EXPECT_TRUE(
        SameVectors("tokensPerExpert", ElementKind::kInt32, tokens_per_expert.data(), expected.tokensPerExpert, 0));
    EXPECT_TRUE(SameVectors("isTokenInRank", ElementKind::kUint8, is_token_in_rank.data(), expected.isTokenInRank,
                            shape.nranks, [](size_t row) { return "(token " + std::to_string(row) + ")"; }));
    EXPECT_TRUE(tokens_per_rank.GuardIntact() && tokens_per_expert.GuardIntact() && is_token_in_rank.GuardIntact())
        << "[rank " << rank() << "] the layout wrote past the end of an output";
  }
};

TEST_F(Layout, RandomRoutingWithEmptyEntries) {
  const EpShape shape = Shape(48, 256, 64, 6);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.emptyEntryChance = 0.2;
  options.emptyTokenChance = 0.1;
  for (int round = 0; round < 4; ++round) {
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    CheckLayout(ep.get(), shape, all[rank()], round % 2 == 0 ? moecommInt64 : moecommInt32);
  }
}

// A token may list one expert twice: it counts twice per expert, once per rank.
TEST_F(Layout, RepeatedExpertInOneToken) {
  const EpShape shape = Shape(16, 64, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions options;
  options.repeatEntryChance = 0.4;
  const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
  CheckLayout(ep.get(), shape, all[rank()], moecommInt32);
}

TEST_F(Layout, FullBatchAndZeroTokens) {
  const EpShape shape = Shape(16, 64, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  RoutingOptions full;
  full.fullBatches = true;
  CheckLayout(ep.get(), shape, GenerateAllRanks(shape, full, random)[rank()], moecommInt64);
  RankInputs empty;  // T = 0
  CheckLayout(ep.get(), shape, empty, moecommInt32);
}

TEST_F(Layout, OptionalOutputsMayBeNull) {
  const EpShape shape = Shape(24, 64, 16, 3);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  const RankInputs inputs = GenerateAllRanks(shape, RoutingOptions(), random)[rank()];
  const ReferenceLayout expected = ComputeLayout(shape, inputs);
  const IndexBuffer indices(inputs.topkIdx, moecommInt64);
  GuardedBuffer<int> tokens_per_expert(shape.numExperts, kPoisonInt);
  moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
  args.numTokens = inputs.numTokens;
  args.topkIdx = indices.data();
  args.topkIdxType = moecommInt64;
  args.tokensPerExpert = tokens_per_expert.data();
  MP_ASSERT_OK(moecommEpGetLayout(ep.get(), &args, nullptr));
  EXPECT_TRUE(
      SameVectors("tokensPerExpert", ElementKind::kInt32, tokens_per_expert.data(), expected.tokensPerExpert, 0));
}

TEST_F(Layout, ExpertOutOfRangeIsRejectedBeforeAnyOutput) {
  const EpShape shape = Shape(16, 64, 8, 2);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  const int64_t bad_values[] = {shape.numExperts, -2, 1 << 20};
  for (int64_t bad : bad_values) {
    SCOPED_TRACE("bad expert id " + std::to_string(bad));
    std::vector<int64_t> topk_idx = {0, 1, 1, bad};  // T = 2, K = 2; the bad id is last
    const IndexBuffer indices(topk_idx, moecommInt64);
    GuardedBuffer<int> tokens_per_rank(shape.nranks, kPoisonInt);
    GuardedBuffer<int> tokens_per_expert(shape.numExperts, kPoisonInt);
    GuardedBuffer<uint8_t> is_token_in_rank(2 * static_cast<size_t>(shape.nranks), kPoisonInt);
    moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
    args.numTokens = 2;
    args.topkIdx = indices.data();
    args.topkIdxType = moecommInt64;
    args.tokensPerRank = tokens_per_rank.data();
    args.tokensPerExpert = tokens_per_expert.data();
    args.isTokenInRank = is_token_in_rank.data();
    EXPECT_EQ(moecommEpGetLayout(ep.get(), &args, nullptr), moecommInvalidArgument);
    EXPECT_STRNE(LastError().c_str(), "");
    const std::vector<int> untouched_ranks(shape.nranks, static_cast<int>(0xABABABABu));
    const std::vector<int> untouched_experts(shape.numExperts, static_cast<int>(0xABABABABu));
    const std::vector<uint8_t> untouched_flags(2 * static_cast<size_t>(shape.nranks), kPoisonInt);
    EXPECT_TRUE(SameVectors("tokensPerRank (must be untouched)", ElementKind::kInt32, tokens_per_rank.data(),
                            untouched_ranks, 0));
    EXPECT_TRUE(SameVectors("tokensPerExpert (must be untouched)", ElementKind::kInt32, tokens_per_expert.data(),
                            untouched_experts, 0));
    EXPECT_TRUE(SameVectors("isTokenInRank (must be untouched)", ElementKind::kUint8, is_token_in_rank.data(),
                            untouched_flags, 0));
  }
}

}  // namespace
}  // namespace moecomm_mp
