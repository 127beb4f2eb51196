// Normal-mode combine, checked bit for bit: FP32 accumulation over receiving ranks in ascending
// order, then the bias, then one rounding to BF16 (nearest even); weights summed likewise.
#include "mp/normal_ops.h"

namespace moecomm_mp {
namespace {

class Combine : public MpTest {
 protected:
  // One dispatch, then every bias/weights combination through its handle.
  void DispatchThenCombineAllCases(const EpShape& shape, const RoutingOptions& options, Sizing sizing,
                                   moecommDataType_t x_type) {
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
    Random random = MakeRandom();
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    DispatchCase dispatch_case;
    dispatch_case.sizing = sizing;
    dispatch_case.xType = x_type;
    ScopedHandle handle;
    DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
    if (HasFatalFailure()) return;
    for (bool with_bias : {false, true}) {
      for (bool with_weights : {false, true}) {
        CombineCase combine_case;
        combine_case.withBias = with_bias;
        combine_case.withWeights = with_weights;
        CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), random);
        if (HasFatalFailure()) return;
      }
    }
  }
};

TEST_F(Combine, BiasAndWeightsAfterWorstCaseDispatch) {
  DispatchThenCombineAllCases(Shape(24, 256, 48, 4), RoutingOptions(), Sizing::kWorstCase, moecommBfloat16);
}

TEST_F(Combine, BiasAndWeightsAfterExactFp8Dispatch) {
  DispatchThenCombineAllCases(Shape(16, 128, 40, 6), RoutingOptions(), Sizing::kExact, moecommFloat8E4M3);
}

TEST_F(Combine, ManyRanksPerToken) {
  // Top-8 of few experts per rank: most tokens reach most ranks, so the rank order of the sum matters.
  RoutingOptions options;
  options.emptyEntryChance = 0.0;
  options.emptyTokenChance = 0.0;
  options.fullBatches = true;
  DispatchThenCombineAllCases(Shape(16, 128, 32, 8), options, Sizing::kWorstCase, moecommBfloat16);
}

TEST_F(Combine, ZeroTokenRanksAndEmptyTokens) {
  // Tokens sent nowhere come back as the bias, or zero without one.
  RoutingOptions options;
  options.zeroTokenRankChance = 0.4;
  options.emptyTokenChance = 0.3;
  options.emptyEntryChance = 0.3;
  DispatchThenCombineAllCases(Shape(16, 64, 32, 3), options, Sizing::kExact, moecommBfloat16);
}

TEST_F(Combine, SkewEveryTokenSelectsOneExpert) {
  RoutingOptions options;
  options.skewExpert = 1;
  options.fullBatches = true;
  DispatchThenCombineAllCases(Shape(24, 128, 48, 2), options, Sizing::kWorstCase, moecommBfloat16);
}

TEST_F(Combine, SameHandleTwiceGivesIdenticalBits) {
  const EpShape shape = Shape(24, 128, 32, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
  Random random = MakeRandom();
  const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
  ScopedHandle handle;
  DispatchAndCheck(ep.get(), shape, all, DispatchCase(), &handle);
  if (HasFatalFailure()) return;
  // The same generator state twice: identical inputs, so identical (and correct) outputs.
  CombineCase combine_case;
  combine_case.withBias = true;
  combine_case.withWeights = true;
  Random first = random;
  CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), first);
  if (HasFatalFailure()) return;
  Random second = random;
  CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), second);
}

}  // namespace
}  // namespace moecomm_mp
