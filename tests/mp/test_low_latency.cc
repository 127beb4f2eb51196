// Low-latency mode: expert-major receive layout, the FP8 cast inside the dispatch (plain,
// power-of-two and UE8M0 scales), recvCount / recvSrcInfo / cumulativeRecvStats, the weighted
// combine (bitwise) in both forms (per entry, and per rank with MOECOMM_LL_PER_RANK_COMBINE),
// zero-copy combine, and send-only calls completed later, two in flight.
#include <algorithm>

#include "mp/ll_ops.h"

namespace moecomm_mp {
namespace {

const std::vector<int>& NoneMasked() {
  static const std::vector<int> kNone(1024, 0);
  return kNone;
}

class LowLatency : public MpTest {
 protected:
  // Dispatch, check, combine through the same handle, check. *differing (if given) gets the
  // number of elements of this rank's combine where the other combine form gives other bits.
  void DispatchAndCombine(moecommEp_t ep, const EpShape& shape, const std::vector<RankInputs>& all,
                          const LowLatencyCase& dispatch_case, unsigned combine_flags, Random& random,
                          size_t* differing = nullptr) {
    LowLatencyDispatch dispatch(shape, dispatch_case, all[rank()]);
    ScopedHandle handle;
    MP_ASSERT_OK(dispatch.Send(ep, 0, handle.out()));
    ASSERT_NE(handle.get(), nullptr) << "moecommEpLowLatencyDispatch returned no handle";
    dispatch.Check(all, NoneMasked());
    LowLatencyCombine combine(shape, all, NoneMasked(), dispatch_case.indexType, random, dispatch_case.perRankCombine);
    MP_ASSERT_OK(combine.Send(ep, combine_flags, handle.get()));
    combine.Check();
    if (differing != nullptr) *differing += combine.DifferingFromOtherForm();
  }

  // *differing (if given) gets the sum of DispatchAndCombine's counts.
  void RunCases(const EpShape& shape, const RoutingOptions& options, const std::vector<LowLatencyCase>& cases,
                unsigned combine_flags = 0, size_t* differing = nullptr) {
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
    Random random = MakeRandom();
    for (const LowLatencyCase& dispatch_case : cases) {
      const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
      DispatchAndCombine(ep.get(), shape, all, dispatch_case, combine_flags, random, differing);
      if (HasFatalFailure()) return;
    }
  }
};

LowLatencyCase Case(moecommDataType_t recv_type, unsigned flags, moecommDataType_t index_type) {
  LowLatencyCase dispatch_case;
  dispatch_case.recvType = recv_type;
  dispatch_case.flags = flags;
  dispatch_case.indexType = index_type;
  return dispatch_case;
}

TEST_F(LowLatency, Bf16DispatchAndWeightedCombine) {
  RunCases(Shape(24, 256, 16, 4), RoutingOptions(),
           {Case(moecommBfloat16, 0, moecommInt64), Case(moecommBfloat16, 0, moecommInt32)});
}

TEST_F(LowLatency, Fp8CastPlainRoundedAndUe8m0Scales) {
  RunCases(Shape(24, 512, 16, 4), RoutingOptions(),
           {Case(moecommFloat8E4M3, 0, moecommInt64), Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt32),
            Case(moecommFloat8E4M3, MOECOMM_LL_UE8M0, moecommInt64),
            Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0, moecommInt32)});
}

// Rows whose blocks are zero, tiny (amax below the 1e-4 clamp), huge, or of mixed magnitude.
TEST_F(LowLatency, Fp8CastEdgeRows) {
  const EpShape shape = Shape(16, 1024, 16, 3);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
  Random random = MakeRandom();
  RoutingOptions options;
  options.fullBatches = true;
  std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
  for (RankInputs& inputs : all) {
    for (int t = 0; t < inputs.numTokens; ++t) {
      for (int h = 0; h < shape.hidden; ++h) {
        uint16_t& value = inputs.xBf16[static_cast<size_t>(t) * shape.hidden + h];
        const float original = Bf16ToFloat(value);
        const int block = h / kFp8BlockChannels;
        switch ((t + block) % 5) {
          case 0:
            value = FloatToBf16(0.0f);
            break;
          case 1:
            value = FloatToBf16(original * 1e-7f);
            break;
          case 2:
            value = FloatToBf16(original * 1e30f);
            break;
          case 3:
            value = FloatToBf16(h % 2 ? original * 1e-3f : original * 1e3f);
            break;
          default:
            break;
        }
      }
    }
  }
  for (unsigned flags : {0u, unsigned{MOECOMM_LL_ROUND_SCALE}, unsigned{MOECOMM_LL_UE8M0}}) {
    DispatchAndCombine(ep.get(), shape, all, Case(moecommFloat8E4M3, flags, moecommInt64), 0, random);
    if (HasFatalFailure()) return;
  }
}

TEST_F(LowLatency, ZeroTokenRanksAndEmptyEntries) {
  RoutingOptions options;
  options.zeroTokenRankChance = 0.4;
  options.emptyTokenChance = 0.3;
  options.emptyEntryChance = 0.3;
  RunCases(Shape(16, 256, 16, 4), options,
           {Case(moecommFloat8E4M3, 0, moecommInt64), Case(moecommBfloat16, 0, moecommInt32)});
}

TEST_F(LowLatency, SkewEveryTokenSelectsOneExpert) {
  RoutingOptions options;
  options.skewExpert = 2;
  options.fullBatches = true;
  RunCases(Shape(24, 128, 16, 4), options, {Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt64)});
}

// A token listing one expert twice is placed once in that expert's rows; both of its combine
// entries read that row, so both weights apply.
TEST_F(LowLatency, RepeatedExpertInOneToken) {
  RoutingOptions options;
  options.repeatEntryChance = 0.4;
  RunCases(Shape(16, 256, 16, 4), options,
           {Case(moecommBfloat16, 0, moecommInt64), Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt32)});
}

TEST_F(LowLatency, WithoutSrcInfoAndStats) {
  LowLatencyCase dispatch_case = Case(moecommBfloat16, 0, moecommInt64);
  dispatch_case.withSrcInfo = false;
  dispatch_case.withStats = false;
  RunCases(Shape(16, 128, 8, 2), RoutingOptions(), {dispatch_case});
}

TEST_F(LowLatency, ZeroCopyCombine) {
  RunCases(Shape(24, 256, 16, 4), RoutingOptions(), {Case(moecommBfloat16, 0, moecommInt64)}, MOECOMM_LL_ZERO_COPY);
}

TEST_F(LowLatency, Hidden2048Experts128Top8Fp8) {
  RunCases(Shape(128, 2048, 4, 8), RoutingOptions(), {Case(moecommFloat8E4M3, MOECOMM_LL_UE8M0, moecommInt32)});
}

TEST_F(LowLatency, Hidden2880Bf16) {
  RunCases(Shape(128, 2880, 4, 4), RoutingOptions(), {Case(moecommBfloat16, 0, moecommInt64)});
}

TEST_F(LowLatency, Top32) {
  RunCases(Shape(64, 128, 8, MOECOMM_MAX_TOPK), RoutingOptions(), {Case(moecommFloat8E4M3, 0, moecommInt64)});
}

// Two send-only dispatches in flight, a third refused, both completed and checked; then two
// send-only combines in flight, completed and checked.
TEST_F(LowLatency, SendOnlyTwoInFlightThenComplete) {
  const EpShape shape = Shape(24, 256, 16, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
  Random random = MakeRandom();
  const std::vector<RankInputs> first_inputs = GenerateAllRanks(shape, RoutingOptions(), random);
  const std::vector<RankInputs> second_inputs = GenerateAllRanks(shape, RoutingOptions(), random);
  const LowLatencyCase first_case = Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt64);
  const LowLatencyCase second_case = Case(moecommBfloat16, 0, moecommInt32);
  LowLatencyDispatch first(shape, first_case, first_inputs[rank()]);
  LowLatencyDispatch second(shape, second_case, second_inputs[rank()]);
  ScopedHandle first_handle;
  ScopedHandle second_handle;
  MP_ASSERT_OK(first.Send(ep.get(), MOECOMM_LL_SEND_ONLY, first_handle.out()));
  MP_ASSERT_OK(second.Send(ep.get(), MOECOMM_LL_SEND_ONLY, second_handle.out()));

  LowLatencyDispatch third(shape, first_case, first_inputs[rank()]);
  ScopedHandle third_handle;
  EXPECT_EQ(third.Send(ep.get(), MOECOMM_LL_SEND_ONLY, third_handle.out()), moecommInvalidUsage)
      << "[rank " << rank() << "] a third low-latency operation in flight must be refused";
  third_handle.Reset();
  if (HasFailure()) return;

  MP_ASSERT_OK(moecommEpComplete(ep.get(), first_handle.get(), nullptr));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), second_handle.get(), nullptr));
  first.Check(first_inputs, NoneMasked());
  second.Check(second_inputs, NoneMasked());

  LowLatencyCombine first_combine(shape, first_inputs, NoneMasked(), first_case.indexType, random);
  LowLatencyCombine second_combine(shape, second_inputs, NoneMasked(), second_case.indexType, random);
  MP_ASSERT_OK(first_combine.Send(ep.get(), MOECOMM_LL_SEND_ONLY, first_handle.get()));
  MP_ASSERT_OK(second_combine.Send(ep.get(), MOECOMM_LL_SEND_ONLY, second_handle.get()));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), first_handle.get(), nullptr));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), second_handle.get(), nullptr));
  first_combine.Check();
  second_combine.Check();
}

// ---- MOECOMM_LL_PER_RANK_COMBINE ---------------------------------------------------------------

LowLatencyCase PerRankCase(moecommDataType_t recv_type, unsigned flags, moecommDataType_t index_type) {
  LowLatencyCase dispatch_case = Case(recv_type, flags, index_type);
  dispatch_case.perRankCombine = true;
  return dispatch_case;
}

// Every token's selections summed per expert rank (the dispatch's weights, the combine passing
// none). Full batches of K = 4 over every rank: with two or more ranks the per-entry form gives
// other bits somewhere (expert outputs span 30 octaves), which is asserted, so a backend that
// ignored the flag could not pass.
TEST_F(LowLatency, PerRankCombine) {
  RoutingOptions options;
  options.fullBatches = true;
  size_t differing = 0;
  RunCases(Shape(24, 256, 16, 4), options,
           {PerRankCase(moecommBfloat16, 0, moecommInt64), PerRankCase(moecommFloat8E4M3, 0, moecommInt32)}, 0,
           &differing);
  if (nranks() >= 2 && !HasFatalFailure()) {
    EXPECT_GT(differing, 0u) << "[rank " << rank() << "] the per-rank and per-entry forms agreed on every element";
  }
}

TEST_F(LowLatency, PerRankCombineRepeatedExpertsAndEmptyEntries) {
  RoutingOptions options;
  options.repeatEntryChance = 0.4;
  options.emptyEntryChance = 0.3;
  options.emptyTokenChance = 0.2;
  options.zeroTokenRankChance = 0.3;
  RunCases(Shape(16, 128, 16, 6), options,
           {PerRankCase(moecommBfloat16, 0, moecommInt64),
            PerRankCase(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt32)});
}

TEST_F(LowLatency, PerRankCombineZeroCopy) {
  RunCases(Shape(24, 256, 16, 8), RoutingOptions(), {PerRankCase(moecommBfloat16, 0, moecommInt64)},
           MOECOMM_LL_ZERO_COPY);
}

// A per-rank and a per-entry operation in flight together, each half sent alone and completed
// later: each handle keeps its own form.
TEST_F(LowLatency, PerRankCombineSendOnlyNextToPerEntry) {
  const EpShape shape = Shape(24, 256, 16, 4);
  ScopedEp ep;
  MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
  Random random = MakeRandom();
  const std::vector<RankInputs> per_rank_inputs = GenerateAllRanks(shape, RoutingOptions(), random);
  const std::vector<RankInputs> per_entry_inputs = GenerateAllRanks(shape, RoutingOptions(), random);
  const LowLatencyCase per_rank_case = PerRankCase(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt32);
  const LowLatencyCase per_entry_case = Case(moecommBfloat16, 0, moecommInt64);
  LowLatencyDispatch per_rank(shape, per_rank_case, per_rank_inputs[rank()]);
  LowLatencyDispatch per_entry(shape, per_entry_case, per_entry_inputs[rank()]);
  ScopedHandle per_rank_handle;
  ScopedHandle per_entry_handle;
  MP_ASSERT_OK(per_rank.Send(ep.get(), MOECOMM_LL_SEND_ONLY, per_rank_handle.out()));
  MP_ASSERT_OK(per_entry.Send(ep.get(), MOECOMM_LL_SEND_ONLY, per_entry_handle.out()));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), per_entry_handle.get(), nullptr));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), per_rank_handle.get(), nullptr));
  per_rank.Check(per_rank_inputs, NoneMasked());
  per_entry.Check(per_entry_inputs, NoneMasked());

  LowLatencyCombine per_rank_combine(shape, per_rank_inputs, NoneMasked(), per_rank_case.indexType, random, true);
  LowLatencyCombine per_entry_combine(shape, per_entry_inputs, NoneMasked(), per_entry_case.indexType, random);
  MP_ASSERT_OK(per_entry_combine.Send(ep.get(), MOECOMM_LL_SEND_ONLY, per_entry_handle.get()));
  MP_ASSERT_OK(per_rank_combine.Send(ep.get(), MOECOMM_LL_SEND_ONLY, per_rank_handle.get()));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), per_rank_handle.get(), nullptr));
  MP_ASSERT_OK(moecommEpComplete(ep.get(), per_entry_handle.get(), nullptr));
  per_rank_combine.Check();
  per_entry_combine.Check();
}

// Every rank must use the same row format in one operation (recvType, power-of-two scales,
// MOECOMM_LL_PER_RANK_COMBINE: on the CUDA backend the sender casts). Here the last rank uses
// another one, once per kind: each side treats the other as absent for that operation (the
// results are checked against the reference with exactly those ranks masked, as each rank sees
// it), the async error turns InvalidArgument, and the next operation, with one format, pairs up
// and is complete. A suite of its own: the async error stays on the communicator (sticky), so
// it is checked to turn from Success to InvalidArgument in the first mismatch only.
class LowLatencyFormat : public LowLatency {
 protected:
  void SetUp() override {
    if (GTEST_FLAG_GET(filter).find("LowLatencyFormat") == std::string::npos) {
      GTEST_SKIP() << "leaves an async error on the communicator: runs only when selected, with "
                      "--gtest_filter=LowLatencyFormat.*";
    }
  }
  void RunMismatch(const LowLatencyCase& common, const LowLatencyCase& odd_case, bool first) {
    const EpShape shape = Shape(32, 256, 12, 4);
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
    Random random = MakeRandom();
    const int odd = nranks() - 1;
    std::vector<std::vector<int>> views(nranks(), std::vector<int>(nranks(), 0));
    for (int r = 0; r < nranks(); ++r) {
      for (int s = 0; s < nranks(); ++s) views[r][s] = (r == odd) != (s == odd) ? 1 : 0;
    }
    const std::vector<RankInputs> all = GenerateAllRanks(shape, RoutingOptions(), random);
    const LowLatencyCase& mine = rank() == odd ? odd_case : common;
    LowLatencyDispatch dispatch(shape, mine, all[rank()]);
    moecommResult_t async_error = moecommInternalError;
    MP_ASSERT_OK(moecommCommGetAsyncError(comm(), &async_error));
    if (first) {
      EXPECT_EQ(async_error, moecommSuccess) << "the communicator had an async error before the test";
    }
    ScopedHandle handle;
    MP_ASSERT_OK(dispatch.Send(ep.get(), 0, handle.out()));
    dispatch.Check(all, views[rank()]);
    LowLatencyCombine combine(shape, all, views[rank()], mine.indexType, random, mine.perRankCombine, &views);
    MP_ASSERT_OK(combine.Send(ep.get(), 0, handle.get()));
    combine.Check();
    MP_ASSERT_OK(moecommCommGetAsyncError(comm(), &async_error));
    EXPECT_EQ(async_error, moecommInvalidArgument) << "a peer with another row format must be reported";
    std::vector<int> mask(nranks(), 1);
    MP_ASSERT_OK(moecommEpGetRankMask(ep.get(), mask.data()));
    EXPECT_EQ(std::count(mask.begin(), mask.end(), 0), nranks()) << "a format mismatch must not mask a rank";
    const std::vector<RankInputs> next = GenerateAllRanks(shape, RoutingOptions(), random);
    DispatchAndCombine(ep.get(), shape, next, common, 0, random);
  }
};

TEST_F(LowLatencyFormat, PeersWithAnotherRowFormatAreAbsent) {
  if (nranks() < 2) GTEST_SKIP() << "needs two ranks";
  RunMismatch(Case(moecommFloat8E4M3, 0, moecommInt64), Case(moecommBfloat16, 0, moecommInt64), true);
  if (HasFatalFailure()) return;
  RunMismatch(Case(moecommFloat8E4M3, 0, moecommInt32), Case(moecommFloat8E4M3, MOECOMM_LL_ROUND_SCALE, moecommInt32),
              false);
  if (HasFatalFailure()) return;
  LowLatencyCase per_rank = Case(moecommFloat8E4M3, 0, moecommInt64);
  per_rank.perRankCombine = true;
  RunMismatch(Case(moecommFloat8E4M3, 0, moecommInt64), per_rank, false);
}

// One EP serves many rounds, switching payload type, scale format and index type between them.
TEST_F(LowLatency, RepeatedRoundsOnOneEp) {
  RunCases(Shape(16, 512, 8, 2), RoutingOptions(),
           {Case(moecommBfloat16, 0, moecommInt64), Case(moecommFloat8E4M3, 0, moecommInt64),
            Case(moecommBfloat16, 0, moecommInt32), Case(moecommFloat8E4M3, MOECOMM_LL_UE8M0, moecommInt32),
            Case(moecommBfloat16, 0, moecommInt64)});
}

}  // namespace
}  // namespace moecomm_mp

namespace moecomm_mp {
namespace {

// Random shapes, routings and formats, one EP each; everything from the shared generator.
TEST_F(LowLatency, RandomShapesDispatchAndCombine) {
  Random random = MakeRandom("shapes");
  constexpr int kRounds = 10;
  for (int round = 0; round < kRounds; ++round) {
    const bool fp8 = random.Chance(0.6);
    const bool ue8m0 = fp8 && random.Chance(0.4);
    const int hidden = ue8m0 ? 512 * random.Between(1, 2)
                       : fp8 ? 128 * random.Between(1, 4)
                             : 8 * random.Between(1, 64);
    const int experts_per_rank = random.Between(1, 6);
    const int topk = random.Between(1, std::min(experts_per_rank * nranks(), MOECOMM_MAX_TOPK));
    const EpShape shape = Shape(experts_per_rank * nranks(), hidden, random.Between(1, 16), topk);
    LowLatencyCase dispatch_case;
    dispatch_case.recvType = fp8 ? moecommFloat8E4M3 : moecommBfloat16;
    dispatch_case.flags = ue8m0 ? MOECOMM_LL_UE8M0 : (fp8 && random.Chance(0.5) ? MOECOMM_LL_ROUND_SCALE : 0u);
    dispatch_case.indexType = random.Chance(0.5) ? moecommInt32 : moecommInt64;
    dispatch_case.withSrcInfo = random.Chance(0.8);
    dispatch_case.withStats = random.Chance(0.8);
    RoutingOptions options;
    options.emptyEntryChance = 0.3 * random.Unit();
    options.emptyTokenChance = 0.2 * random.Unit();
    options.zeroTokenRankChance = 0.3 * random.Unit();
    options.skewExpert = random.Chance(0.2) ? random.Below(shape.numExperts) : -1;
    const unsigned combine_flags = random.Chance(0.3) ? MOECOMM_LL_ZERO_COPY : 0u;
    dispatch_case.perRankCombine = random.Chance(0.3);
    SCOPED_TRACE("round " + std::to_string(round) + ": E=" + std::to_string(shape.numExperts) +
                 " H=" + std::to_string(shape.hidden) + " maxT=" + std::to_string(shape.maxTokensPerRank) +
                 " K=" + std::to_string(shape.topk));

    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(shape, moecommEpModeLowLatency));
    const std::vector<RankInputs> all = GenerateAllRanks(shape, options, random);
    DispatchAndCombine(ep.get(), shape, all, dispatch_case, combine_flags, random);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace moecomm_mp
