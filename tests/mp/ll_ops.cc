#include "mp/ll_ops.h"

namespace moecomm_mp {

namespace {

constexpr int kUe8m0BlocksPerInt = 4;
constexpr int kPackedScaleChannels = kFp8BlockChannels * kUe8m0BlocksPerInt;  // 512 channels per int32

size_t LowLatencyRows(const EpShape& shape) {
  return static_cast<size_t>(shape.ExpertsPerRank()) * shape.nranks * shape.maxTokensPerRank;
}

std::string SlotLabel(int local_expert, size_t slot, const SourceToken& source) {
  return "(local expert " + std::to_string(local_expert) + " slot " + std::to_string(slot) + ", from rank " +
         std::to_string(source.rank) + " token " + std::to_string(source.token) + ")";
}

}  // namespace

std::string LowLatencyCase::Describe() const {
  std::string text = recvType == moecommFloat8E4M3 ? "FP8" : "BF16";
  if (flags & MOECOMM_LL_ROUND_SCALE) text += ", ROUND_SCALE";
  if (flags & MOECOMM_LL_UE8M0) text += ", UE8M0";
  text += std::string(", ") + IndexTypeName(indexType) + " topk";
  if (!withSrcInfo) text += ", no srcInfo";
  if (!withStats) text += ", no stats";
  if (perRankCombine) text += ", PER_RANK_COMBINE";
  return text;
}

std::vector<ReferenceLowLatency> ComputeAllLowLatencyRows(const EpShape& shape, const std::vector<RankInputs>& all,
                                                          const std::vector<int>& masked,
                                                          const std::vector<std::vector<int>>* views) {
  std::vector<ReferenceLowLatency> per_rank;
  for (int r = 0; r < shape.nranks; ++r) {
    per_rank.push_back(ComputeLowLatencyRows(shape, all, r, views != nullptr ? (*views)[r] : masked));
  }
  return per_rank;
}

LowLatencyDispatch::LowLatencyDispatch(const EpShape& shape, const LowLatencyCase& dispatch_case,
                                       const RankInputs& inputs)
    : shape_(shape),
      case_(dispatch_case),
      inputs_(inputs),
      indices_(inputs.topkIdx, dispatch_case.indexType),
      rowsPerExpert_(static_cast<size_t>(shape.nranks) * shape.maxTokensPerRank),
      recvBf16_(dispatch_case.recvType == moecommBfloat16 ? LowLatencyRows(shape) * shape.hidden : 0, kPoisonFloat),
      recvFp8_(dispatch_case.recvType == moecommFloat8E4M3 ? LowLatencyRows(shape) * shape.hidden : 0, kPoisonFp8),
      recvScales_(dispatch_case.recvType == moecommFloat8E4M3 && !(dispatch_case.flags & MOECOMM_LL_UE8M0)
                      ? LowLatencyRows(shape) * shape.ScaleBlocks()
                      : 0,
                  kPoisonFloat),
      recvPackedScales_(dispatch_case.recvType == moecommFloat8E4M3 && (dispatch_case.flags & MOECOMM_LL_UE8M0)
                            ? LowLatencyRows(shape) * (shape.hidden / kPackedScaleChannels)
                            : 0,
                        kPoisonInt),
      recvCount_(shape.ExpertsPerRank(), kPoisonInt),
      recvSrcInfo_(LowLatencyRows(shape), kPoisonInt) {
  // Stats start from distinct non-zero values so "added to" differs from "written".
  for (int local = 0; local < shape.ExpertsPerRank(); ++local) statsBefore_.push_back(1000 * (local + 1) + Mp().rank);
  stats_ = statsBefore_;
}

moecommResult_t LowLatencyDispatch::Send(moecommEp_t ep, unsigned extra_flags, moecommEpHandle_t* handle) {
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  args.numTokens = inputs_.numTokens;
  args.x = InputData(inputs_.xBf16);
  args.topkIdx = indices_.data();
  args.topkIdxType = case_.indexType;
  args.recvType = case_.recvType;
  args.flags = case_.flags | extra_flags;
  if (case_.perRankCombine) {
    args.flags |= MOECOMM_LL_PER_RANK_COMBINE;
    args.topkWeights = InputData(inputs_.topkWeights);
  }
  if (case_.recvType == moecommFloat8E4M3) {
    args.recvX = recvFp8_.data();
    args.recvScales = (case_.flags & MOECOMM_LL_UE8M0) ? static_cast<void*>(recvPackedScales_.data())
                                                       : static_cast<void*>(recvScales_.data());
  } else {
    args.recvX = recvBf16_.data();
  }
  args.recvCount = recvCount_.data();
  args.recvSrcInfo = case_.withSrcInfo ? recvSrcInfo_.data() : nullptr;
  args.cumulativeRecvStats = case_.withStats ? stats_.data() : nullptr;
  return moecommEpLowLatencyDispatch(ep, &args, handle, nullptr);
}

void LowLatencyDispatch::Check(const std::vector<RankInputs>& all, const std::vector<int>& masked) const {
  SCOPED_TRACE("low-latency dispatch: " + case_.Describe());
  const int me = Mp().rank;
  const int hidden = shape_.hidden;
  const int blocks = shape_.ScaleBlocks();
  const bool fp8 = case_.recvType == moecommFloat8E4M3;
  const bool packed = fp8 && (case_.flags & MOECOMM_LL_UE8M0);
  const bool round_scale = (case_.flags & (MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0)) != 0;
  const ReferenceLowLatency expected = ComputeLowLatencyRows(shape_, all, me, masked);

  std::vector<int> expected_counts;
  for (const auto& rows : expected.rowsPerExpert) expected_counts.push_back(static_cast<int>(rows.size()));
  EXPECT_TRUE(SameVectors("recvCount", ElementKind::kInt32, recvCount_.data(), expected_counts, 0));
  if (case_.withStats) {
    std::vector<int> expected_stats = statsBefore_;
    for (size_t local = 0; local < expected_stats.size(); ++local) expected_stats[local] += expected_counts[local];
    EXPECT_TRUE(SameVectors("cumulativeRecvStats (previous value + recvCount)", ElementKind::kInt32, stats_.data(),
                            expected_stats, 0));
  }

  // The received rows (slots below each count) gathered in slot order next to what they should
  // be, so each output is compared in one pass and the first mismatches are reported by slot.
  const int packed_ints = hidden / kPackedScaleChannels;
  std::vector<std::string> row_labels;
  std::vector<uint16_t> actual_bf16, expected_bf16;
  std::vector<uint8_t> actual_fp8, expected_fp8;
  std::vector<float> actual_scales, expected_scales;
  std::vector<int32_t> actual_packed, expected_packed;
  std::vector<int> actual_src_info, expected_src_info;
  std::vector<uint8_t> fp8_row(hidden);
  std::vector<float> scale_row(blocks);
  for (int local = 0; local < shape_.ExpertsPerRank(); ++local) {
    const auto& rows = expected.rowsPerExpert[local];
    for (size_t slot = 0; slot < rows.size(); ++slot) {
      const SourceToken& source = rows[slot];
      const size_t row = local * rowsPerExpert_ + slot;
      const uint16_t* x = &all[source.rank].xBf16[static_cast<size_t>(source.token) * hidden];
      row_labels.push_back(SlotLabel(local, slot, source));
      actual_src_info.push_back(recvSrcInfo_.data()[row]);
      expected_src_info.push_back(source.rank * shape_.maxTokensPerRank + source.token);
      if (!fp8) {
        actual_bf16.insert(actual_bf16.end(), recvBf16_.data() + row * hidden, recvBf16_.data() + (row + 1) * hidden);
        expected_bf16.insert(expected_bf16.end(), x, x + hidden);
        continue;
      }
      for (int b = 0; b < blocks; ++b) {
        scale_row[b] = CastBlockToFp8(x + b * kFp8BlockChannels, round_scale, &fp8_row[b * kFp8BlockChannels]);
      }
      actual_fp8.insert(actual_fp8.end(), recvFp8_.data() + row * hidden, recvFp8_.data() + (row + 1) * hidden);
      expected_fp8.insert(expected_fp8.end(), fp8_row.begin(), fp8_row.end());
      if (packed) {
        std::vector<uint32_t> packed_row(packed_ints, 0);
        for (int b = 0; b < blocks; ++b) {
          packed_row[b / kUe8m0BlocksPerInt] |= static_cast<uint32_t>(Ue8m0FromPowerOfTwo(scale_row[b]))
                                                << (8 * (b % kUe8m0BlocksPerInt));
        }
        for (uint32_t value : packed_row) expected_packed.push_back(static_cast<int32_t>(value));
        actual_packed.insert(actual_packed.end(), recvPackedScales_.data() + row * packed_ints,
                             recvPackedScales_.data() + (row + 1) * packed_ints);
      } else {
        expected_scales.insert(expected_scales.end(), scale_row.begin(), scale_row.end());
        actual_scales.insert(actual_scales.end(), recvScales_.data() + row * blocks,
                             recvScales_.data() + (row + 1) * blocks);
      }
    }
  }
  const RowLabel label = [&row_labels](size_t row) { return row < row_labels.size() ? row_labels[row] : ""; };
  if (case_.withSrcInfo) {
    EXPECT_TRUE(SameVectors("recvSrcInfo", ElementKind::kInt32, actual_src_info.data(), expected_src_info, 1, label));
  }
  if (fp8) {
    EXPECT_TRUE(SameVectors("recvX (FP8)", ElementKind::kFp8, actual_fp8.data(), expected_fp8, hidden, label));
    if (packed) {
      EXPECT_TRUE(SameVectors("recvScales (UE8M0, 4 per int32)", ElementKind::kInt32, actual_packed.data(),
                              expected_packed, packed_ints, label));
    } else {
      EXPECT_TRUE(SameVectors("recvScales (FP32)", ElementKind::kFloat32, actual_scales.data(), expected_scales, blocks,
                              label));
    }
  } else {
    EXPECT_TRUE(SameVectors("recvX (BF16)", ElementKind::kBf16, actual_bf16.data(), expected_bf16, hidden, label));
  }
  // Slots at or beyond recvCount are not written, in any output (docs/ep-semantics.md).
  const int packed_per_row = fp8 && packed ? packed_ints : 0;
  const int scales_per_row = fp8 && !packed ? blocks : 0;
  for (int local = 0; local < shape_.ExpertsPerRank(); ++local) {
    const size_t first = local * rowsPerExpert_ + expected.rowsPerExpert[local].size();
    const size_t unused = rowsPerExpert_ - expected.rowsPerExpert[local].size();
    EXPECT_TRUE(recvBf16_.PoisonedFrom(first * hidden, fp8 ? 0 : unused * hidden) &&
                recvFp8_.PoisonedFrom(first * hidden, fp8 ? unused * hidden : 0) &&
                recvScales_.PoisonedFrom(first * scales_per_row, unused * scales_per_row) &&
                recvPackedScales_.PoisonedFrom(first * packed_per_row, unused * packed_per_row) &&
                recvSrcInfo_.PoisonedFrom(first, case_.withSrcInfo ? unused : 0))
        << "[rank " << me << "] low-latency dispatch wrote slots of local expert " << local
        << " at or beyond its count " << expected.rowsPerExpert[local].size();
  }
  EXPECT_TRUE(recvBf16_.GuardIntact() && recvFp8_.GuardIntact() && recvScales_.GuardIntact() &&
              recvPackedScales_.GuardIntact() && recvCount_.GuardIntact() && recvSrcInfo_.GuardIntact())
      << "[rank " << me << "] low-latency dispatch wrote past the end of an output";
}

LowLatencyCombine::LowLatencyCombine(const EpShape& shape, const std::vector<RankInputs>& all,
                                     const std::vector<int>& masked, moecommDataType_t index_type, Random& random,
                                     bool per_rank_sum, const std::vector<std::vector<int>>* views)
    : shape_(shape),
      all_(all),
      perRank_(per_rank_sum),
      indices_(all[Mp().rank].topkIdx, index_type),
      out_(static_cast<size_t>(all[Mp().rank].numTokens) * shape.hidden, kPoisonFloat),
      describe_(std::string("low-latency combine, ") + (per_rank_sum ? "per-rank sum, " : "") +
                IndexTypeName(index_type) + " topk") {
  const std::vector<ReferenceLowLatency> per_rank = ComputeAllLowLatencyRows(shape, all, masked, views);
  const size_t rows_per_expert = static_cast<size_t>(shape.nranks) * shape.maxTokensPerRank;
  const uint16_t nan_bits = FloatToBf16(std::nanf(""));
  for (int r = 0; r < shape.nranks; ++r) {
    std::vector<uint16_t> outputs(LowLatencyRows(shape) * shape.hidden, nan_bits);
    for (int local = 0; local < shape.ExpertsPerRank(); ++local) {
      const size_t valid = per_rank[r].rowsPerExpert[local].size() * shape.hidden;
      uint16_t* begin = &outputs[local * rows_per_expert * shape.hidden];
      for (size_t i = 0; i < valid; ++i) begin[i] = random.Bf16(4.0, Random::kWideOctaves);
    }
    expertOutputs_.push_back(std::move(outputs));
  }
  const int me = Mp().rank;
  expected_ = ComputeLowLatencyCombine(shape, all, per_rank, expertOutputs_, all[me].topkWeights, me, masked, perRank_);
  const std::vector<uint16_t> other =
      ComputeLowLatencyCombine(shape, all, per_rank, expertOutputs_, all[me].topkWeights, me, masked, !perRank_);
  for (size_t i = 0; i < expected_.size(); ++i) differing_ += expected_[i] != other[i];
}

moecommResult_t LowLatencyCombine::Send(moecommEp_t ep, unsigned flags, moecommEpHandle_t handle) {
  const int me = Mp().rank;
  moecommEpLowLatencyCombineArgs_t args = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
  args.x = expertOutputs_[me].data();
  if (flags & MOECOMM_LL_ZERO_COPY) {
    void* buffer = nullptr;
    const moecommResult_t result = moecommEpLowLatencyCombineBuffer(ep, &buffer);
    if (result != moecommSuccess) return result;
    std::memcpy(buffer, expertOutputs_[me].data(), expertOutputs_[me].size() * sizeof(uint16_t));
    args.x = buffer;
    describe_ += ", zero copy";
  }
  if (flags & MOECOMM_LL_SEND_ONLY) describe_ += ", send only";
  args.topkIdx = indices_.data();
  args.topkIdxType = indices_.type;
  // A per-rank handle's combine applies the dispatch's weights and must get none.
  args.topkWeights = perRank_ ? nullptr : InputData(all_[me].topkWeights);
  args.out = out_.data();
  args.flags = flags;
  return moecommEpLowLatencyCombine(ep, &args, handle, nullptr);
}

void LowLatencyCombine::Check() const {
  SCOPED_TRACE(describe_);
  const int me = Mp().rank;
  const RankInputs& in = all_[me];
  const EpShape& shape = shape_;
  const RowLabel label = [&in, &shape](size_t token) {
    std::string experts;
    for (int k = 0; k < shape.topk; ++k) {
      experts += (k ? "," : "") + std::to_string(in.topkIdx[token * shape.topk + k]);
    }
    return "(token " + std::to_string(token) + ", experts {" + experts + "})";
  };
  EXPECT_TRUE(SameVectors("low-latency combine out", ElementKind::kBf16, out_.data(), expected_, shape_.hidden, label));
  EXPECT_TRUE(out_.GuardIntact()) << "[rank " << me << "] low-latency combine wrote past T rows";
}

}  // namespace moecomm_mp
