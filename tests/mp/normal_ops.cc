#include "mp/normal_ops.h"

#include <algorithm>

namespace moecomm_mp {

std::string DispatchCase::Describe() const {
  std::string text = xType == moecommFloat8E4M3 ? "FP8" : "BF16";
  text += std::string(", ") + IndexTypeName(indexType) + " topk";
  text += withWeights ? ", weights" : ", no weights";
  if (!withTopkOutputs) text += ", no topk outputs";
  if (sizing == Sizing::kExact) text += ", exact sizing";
  if (sizing == Sizing::kWorstCase) text += ", worst-case sizing";
  if (sizing == Sizing::kReuse) text += ", reused handle";
  text += ", alignment " + std::to_string(expertAlignment);
  return text;
}

std::string CombineCase::Describe() const {
  return std::string(withBias ? "bias" : "no bias") + (withWeights ? ", weights" : ", no weights");
}

RowLabel SourceLabel(const std::vector<SourceToken>& sources) {
  return [&sources](size_t row) {
    if (row >= sources.size()) return std::string("(beyond N)");
    return "(from rank " + std::to_string(sources[row].rank) + " token " + std::to_string(sources[row].token) + ")";
  };
}

namespace {

// The receive buffers of one dispatch, poisoned, with guards behind them.
struct RecvBuffers {
  RecvBuffers(const EpShape& shape, int capacity, moecommDataType_t x_type, moecommDataType_t index_type)
      : xBf16(x_type == moecommBfloat16 ? Rows(capacity, shape.hidden) : 0, kPoisonFloat),
        xFp8(x_type == moecommFloat8E4M3 ? Rows(capacity, shape.hidden) : 0, kPoisonFp8),
        xScales(x_type == moecommFloat8E4M3 ? Rows(capacity, shape.ScaleBlocks()) : 0, kPoisonFloat),
        topkIdx32(index_type == moecommInt32 ? Rows(capacity, shape.topk) : 0, kPoisonInt),
        topkIdx64(index_type == moecommInt64 ? Rows(capacity, shape.topk) : 0, kPoisonInt),
        topkWeights(Rows(capacity, shape.topk), kPoisonFloat),
        numRecvTokens(1, kPoisonInt),
        tokensPerExpert(shape.ExpertsPerRank(), kPoisonInt) {}

  static size_t Rows(int rows, int row_length) { return static_cast<size_t>(rows) * row_length; }

  bool GuardsIntact() const {
    return xBf16.GuardIntact() && xFp8.GuardIntact() && xScales.GuardIntact() && topkIdx32.GuardIntact() &&
           topkIdx64.GuardIntact() && topkWeights.GuardIntact() && numRecvTokens.GuardIntact() &&
           tokensPerExpert.GuardIntact();
  }

  GuardedBuffer<uint16_t> xBf16;
  GuardedBuffer<uint8_t> xFp8;
  GuardedBuffer<float> xScales;
  GuardedBuffer<int32_t> topkIdx32;
  GuardedBuffer<int64_t> topkIdx64;
  GuardedBuffer<float> topkWeights;
  GuardedBuffer<int> numRecvTokens;
  GuardedBuffer<int> tokensPerExpert;
};

void CheckSourceInfo(moecommEpHandle_t handle, const ReferenceDispatch& expected) {
  const int rows = expected.NumRows();
  int handle_rows = -2;
  MP_EXPECT_OK(moecommEpHandleGetNumRecvTokens(handle, &handle_rows));
  EXPECT_EQ(handle_rows, rows) << "[rank " << Mp().rank << "] moecommEpHandleGetNumRecvTokens (host backend knows N)";
  const size_t room = std::max(rows, 1);
  std::vector<int> src_rank(room, static_cast<int>(0xABABABABu));
  std::vector<int> src_index(room, static_cast<int>(0xABABABABu));
  MP_ASSERT_OK(moecommEpHandleGetSourceInfo(handle, src_rank.data(), src_index.data(), static_cast<int>(room)));
  std::vector<int> expected_rank;
  std::vector<int> expected_index;
  for (const SourceToken& source : expected.sources) {
    expected_rank.push_back(source.rank);
    expected_index.push_back(source.token);
  }
  EXPECT_TRUE(SameVectors("handle srcRank", ElementKind::kInt32, src_rank.data(), expected_rank, 1));
  EXPECT_TRUE(SameVectors("handle srcIndex", ElementKind::kInt32, src_index.data(), expected_index, 1));
}

}  // namespace

void DispatchAndCheck(moecommEp_t ep, const EpShape& shape, const std::vector<RankInputs>& all,
                      const DispatchCase& dispatch_case, ScopedHandle* handle) {
  SCOPED_TRACE(dispatch_case.Describe());
  const DispatchCase& c = dispatch_case;
  const int me = Mp().rank;
  const RankInputs& in = all[me];
  const ReferenceDispatch expected = ComputeDispatch(shape, all, me, c.expertAlignment);
  const int rows = expected.NumRows();
  const IndexBuffer indices(in.topkIdx, c.indexType);
  const bool fp8 = c.xType == moecommFloat8E4M3;

  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = in.numTokens;
  args.topkIdx = indices.data();
  args.topkIdxType = c.indexType;
  args.expertAlignment = c.expertAlignment;

  int capacity = shape.nranks * shape.maxTokensPerRank;
  if (c.sizing == Sizing::kExact) {
    ASSERT_EQ(handle->get(), nullptr);
    int notified_rows = -1;
    GuardedBuffer<int> notified_per_expert(shape.ExpertsPerRank(), kPoisonInt);
    MP_ASSERT_OK(
        moecommEpNotifyDispatch(ep, &args, handle->out(), &notified_rows, notified_per_expert.data(), nullptr));
    ASSERT_NE(handle->get(), nullptr);
    ASSERT_EQ(notified_rows, rows) << "[rank " << me << "] moecommEpNotifyDispatch numRecvTokens";
    EXPECT_TRUE(SameVectors("NotifyDispatch recvTokensPerExpert", ElementKind::kInt32, notified_per_expert.data(),
                            expected.tokensPerExpert, 0));
    EXPECT_TRUE(notified_per_expert.GuardIntact()) << "NotifyDispatch wrote past recvTokensPerExpert[E/R]";
    capacity = rows;
  } else if (c.sizing == Sizing::kReuse) {
    ASSERT_NE(handle->get(), nullptr);
    capacity = rows;
  } else {
    ASSERT_EQ(handle->get(), nullptr);
  }

  RecvBuffers recv(shape, capacity, c.xType, c.indexType);
  args.xType = c.xType;
  args.x = fp8 ? static_cast<const void*>(InputData(in.xFp8)) : static_cast<const void*>(InputData(in.xBf16));
  args.xScales = fp8 ? InputData(in.xScales) : nullptr;
  args.topkWeights = c.withWeights ? InputData(in.topkWeights) : nullptr;
  args.recvCapacity = capacity;
  args.recvX = fp8 ? static_cast<void*>(recv.xFp8.data()) : static_cast<void*>(recv.xBf16.data());
  args.recvXScales = fp8 ? recv.xScales.data() : nullptr;
  if (c.withTopkOutputs) {
    args.recvTopkIdx = c.indexType == moecommInt32 ? static_cast<void*>(recv.topkIdx32.data())
                                                   : static_cast<void*>(recv.topkIdx64.data());
    if (c.withWeights) args.recvTopkWeights = recv.topkWeights.data();
  }
  args.numRecvTokens = recv.numRecvTokens.data();
  args.recvTokensPerExpert = recv.tokensPerExpert.data();
  MP_ASSERT_OK(moecommEpDispatch(ep, &args, handle->out(), nullptr));
  ASSERT_NE(handle->get(), nullptr) << "moecommEpDispatch returned no handle";

  EXPECT_EQ(recv.numRecvTokens.data()[0], rows) << "[rank " << me << "] numRecvTokens";
  EXPECT_TRUE(SameVectors("recvTokensPerExpert", ElementKind::kInt32, recv.tokensPerExpert.data(),
                          expected.tokensPerExpert, 0));
  const RowLabel label = SourceLabel(expected.sources);
  if (fp8) {
    EXPECT_TRUE(SameVectors("recvX (FP8)", ElementKind::kFp8, recv.xFp8.data(), expected.xFp8, shape.hidden, label));
    EXPECT_TRUE(SameVectors("recvXScales", ElementKind::kFloat32, recv.xScales.data(), expected.xScales,
                            shape.ScaleBlocks(), label));
  } else {
    EXPECT_TRUE(
        SameVectors("recvX (BF16)", ElementKind::kBf16, recv.xBf16.data(), expected.xBf16, shape.hidden, label));
  }
  if (c.withTopkOutputs) {
    if (c.indexType == moecommInt32) {
      EXPECT_TRUE(SameVectors("recvTopkIdx (int32)", ElementKind::kInt32, recv.topkIdx32.data(),
                              ToInt32(expected.topkIdx), shape.topk, label));
    } else {
      EXPECT_TRUE(SameVectors("recvTopkIdx (int64)", ElementKind::kInt64, recv.topkIdx64.data(), expected.topkIdx,
                              shape.topk, label));
    }
    if (c.withWeights) {
      EXPECT_TRUE(SameVectors("recvTopkWeights", ElementKind::kFloat32, recv.topkWeights.data(), expected.topkWeights,
                              shape.topk, label));
    }
  }
  if (c.sizing != Sizing::kWorstCase) {
    EXPECT_TRUE(recv.GuardsIntact()) << "[rank " << me << "] dispatch wrote past N = " << rows
                                     << " rows of an exactly sized buffer";
  } else {
    // Only the first N rows of every output are written (docs/ep-semantics.md).
    const size_t spare = static_cast<size_t>(capacity - rows);
    const size_t hidden = shape.hidden;
    const size_t blocks = shape.ScaleBlocks();
    const size_t topk = shape.topk;
    EXPECT_TRUE(recv.xBf16.PoisonedFrom(rows * hidden, fp8 ? 0 : spare * hidden) &&
                recv.xFp8.PoisonedFrom(rows * hidden, fp8 ? spare * hidden : 0) &&
                recv.xScales.PoisonedFrom(rows * blocks, fp8 ? spare * blocks : 0))
        << "[rank " << me << "] dispatch wrote recvX / recvXScales rows beyond N = " << rows;
    if (c.withTopkOutputs) {
      EXPECT_TRUE(recv.topkIdx32.PoisonedFrom(rows * topk, c.indexType == moecommInt32 ? spare * topk : 0) &&
                  recv.topkIdx64.PoisonedFrom(rows * topk, c.indexType == moecommInt64 ? spare * topk : 0) &&
                  recv.topkWeights.PoisonedFrom(rows * topk, c.withWeights ? spare * topk : 0))
          << "[rank " << me << "] dispatch wrote recvTopkIdx / recvTopkWeights rows beyond N = " << rows;
    }
  }
  CheckSourceInfo(handle->get(), expected);
}

void CombineAndCheck(moecommEp_t ep, const EpShape& shape, const std::vector<RankInputs>& all,
                     const CombineCase& combine_case, moecommEpHandle_t handle, Random& random) {
  SCOPED_TRACE("combine: " + combine_case.Describe());
  const int me = Mp().rank;
  std::vector<ReferenceDispatch> dispatches;
  for (int r = 0; r < shape.nranks; ++r) dispatches.push_back(ComputeDispatch(shape, all, r, 1));

  // Every rank's expert outputs, weights and bias, drawn in the same order on every rank.
  std::vector<CombineInputs> inputs(shape.nranks);
  std::vector<std::vector<uint16_t>> biases(shape.nranks);
  for (int r = 0; r < shape.nranks; ++r) {
    const size_t rows = static_cast<size_t>(dispatches[r].NumRows());
    inputs[r].x.resize(rows * shape.hidden);
    for (uint16_t& value : inputs[r].x) value = random.Bf16(4.0, Random::kWideOctaves);
    inputs[r].topkWeights.resize(rows * shape.topk);
    for (float& weight : inputs[r].topkWeights) weight = random.Weight();
    biases[r].resize(static_cast<size_t>(all[r].numTokens) * shape.hidden);
    for (uint16_t& value : biases[r]) value = random.Bf16(4.0, Random::kWideOctaves);
  }
  std::vector<uint16_t> expected_x;
  std::vector<float> expected_weights;
  ComputeCombine(shape, all, dispatches, inputs, me, combine_case.withBias ? &biases[me] : nullptr, &expected_x,
                 &expected_weights);

  const int tokens = all[me].numTokens;
  GuardedBuffer<uint16_t> combined_x(static_cast<size_t>(tokens) * shape.hidden, kPoisonFloat);
  GuardedBuffer<float> combined_weights(static_cast<size_t>(tokens) * shape.topk, kPoisonFloat);
  moecommEpCombineArgs_t args = MOECOMM_EP_COMBINE_ARGS_INIT;
  args.x = InputData(inputs[me].x);
  args.topkWeights = combine_case.withWeights ? InputData(inputs[me].topkWeights) : nullptr;
  args.bias = combine_case.withBias ? InputData(biases[me]) : nullptr;
  args.combinedX = combined_x.data();
  args.combinedTopkWeights = combine_case.withWeights ? combined_weights.data() : nullptr;
  MP_ASSERT_OK(moecommEpCombine(ep, &args, handle, nullptr));

  // Which ranks each token went to, for the failure messages.
  const RowLabel label = [&shape, &all, me](size_t token) {
    std::string ranks;
    for (int r = 0; r < shape.nranks; ++r) {
      if (TokenGoesToRank(shape, all[me], static_cast<int>(token), r))
        ranks += (ranks.empty() ? "" : ",") + std::to_string(r);
    }
    return "(token " + std::to_string(token) + ", sent to ranks {" + ranks + "})";
  };
  EXPECT_TRUE(SameVectors("combinedX", ElementKind::kBf16, combined_x.data(), expected_x, shape.hidden, label));
  if (combine_case.withWeights) {
    EXPECT_TRUE(SameVectors("combinedTopkWeights", ElementKind::kFloat32, combined_weights.data(), expected_weights,
                            shape.topk, label));
  }
  EXPECT_TRUE(combined_x.GuardIntact() && combined_weights.GuardIntact())
      << "[rank " << me << "] combine wrote past T = " << tokens << " rows";
}

}  // namespace moecomm_mp
