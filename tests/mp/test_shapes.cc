// Shapes other than the small defaults: H = 2880 (BF16 only: not a multiple of 128), H = 2048
// with 128 experts top-8, top-1 and top-32. Token counts stay small so 8 ranks on 2 cores finish.
#include "mp/normal_ops.h"

namespace moecomm_mp {
namespace {

class Shapes : public MpTest {
 protected:
  void DispatchAndCombine(const EpShape& shape, const RoutingOptions& options, const DispatchCase& dispatch_case,
                          const CombineCase& combine_case) {
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeNormal));
    Random random = MakeRandom(dispatch_case.Describe());
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    ScopedHandle handle;
    DispatchAndCheck(ep.get(), shape, all, dispatch_case, &handle);
    if (HasFatalFailure()) return;
    CombineAndCheck(ep.get(), shape, all, combine_case, handle.get(), random);
  }
};

TEST_F(Shapes, Hidden2880Experts128Top4Bf16) {
  DispatchCase dispatch_case;
  dispatch_case.sizing = Sizing::kExact;
  CombineCase combine_case;
  combine_case.withBias = true;
  combine_case.withWeights = true;
  DispatchAndCombine(Shape(128, 2880, 8, 4), RoutingOptions(), dispatch_case, combine_case);
}

TEST_F(Shapes, Hidden2048Experts128Top8) {
  for (moecommDataType_t x_type : {moecommFloat8E4M3, moecommBfloat16}) {
    DispatchCase dispatch_case;
    dispatch_case.xType = x_type;
    dispatch_case.indexType = moecommInt32;
    dispatch_case.expertAlignment = 128;
    CombineCase combine_case;
    combine_case.withWeights = true;
    DispatchAndCombine(Shape(128, 2048, 8, 8), RoutingOptions(), dispatch_case, combine_case);
    if (HasFatalFailure()) return;
  }
}

TEST_F(Shapes, Top1) {
  DispatchCase dispatch_case;
  CombineCase combine_case;
  combine_case.withBias = true;
  DispatchAndCombine(Shape(16, 128, 32, 1), RoutingOptions(), dispatch_case, combine_case);
}

TEST_F(Shapes, Top1AllTokensToTheLastExpert) {
  const EpShape shape = Shape(16, 128, 32, 1);
  RoutingOptions options;
  options.skewExpert = shape.numExperts - 1;
  options.fullBatches = true;
  DispatchCase dispatch_case;
  dispatch_case.sizing = Sizing::kExact;
  dispatch_case.expertAlignment = 4;
  CombineCase combine_case;
  combine_case.withWeights = true;
  DispatchAndCombine(shape, options, dispatch_case, combine_case);
}

TEST_F(Shapes, Top32) {
  DispatchCase dispatch_case;
  dispatch_case.xType = moecommFloat8E4M3;
  CombineCase combine_case;
  combine_case.withBias = true;
  combine_case.withWeights = true;
  DispatchAndCombine(Shape(64, 128, 16, MOECOMM_MAX_TOPK), RoutingOptions(), dispatch_case, combine_case);
}

TEST_F(Shapes, SmallestHidden) {
  // A BF16 row of 16 bytes is the smallest the header allows.
  DispatchCase dispatch_case;
  dispatch_case.sizing = Sizing::kExact;
  CombineCase combine_case;
  combine_case.withBias = true;
  DispatchAndCombine(Shape(8, 8, 16, 2), RoutingOptions(), dispatch_case, combine_case);
}

}  // namespace
}  // namespace moecomm_mp
