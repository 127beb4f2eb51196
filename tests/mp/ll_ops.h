// Low-latency dispatch and combine driven through the public API and checked, every element,
// against the reference in reference.h. Used by the LowLatency and RankMask suites.
//
// The objects own their input and output buffers, so a MOECOMM_LL_SEND_ONLY call can be
// completed (and checked) later while another is in flight.
#pragma once

#include <string>
#include <vector>

#include "mp/mp_common.h"

namespace moecomm_mp {

struct LowLatencyCase {
  moecommDataType_t recvType = moecommFloat8E4M3;
  unsigned flags = 0;  // MOECOMM_LL_ROUND_SCALE, MOECOMM_LL_UE8M0
  moecommDataType_t indexType = moecommInt64;
  bool withSrcInfo = true;
  bool withStats = true;
  // MOECOMM_LL_PER_RANK_COMBINE: the dispatch passes the weights; the handle's combine must be a
  // LowLatencyCombine made with per_rank = true.
  bool perRankCombine = false;
  std::string Describe() const;
};

// All ranks' receive rows (who lands in which expert slot) for one set of inputs.
// views: when given, rank r's rows are computed with (*views)[r] (what r has masked), else
// every rank's with `masked`.
std::vector<ReferenceLowLatency> ComputeAllLowLatencyRows(const EpShape& shape, const std::vector<RankInputs>& all,
                                                          const std::vector<int>& masked,
                                                          const std::vector<std::vector<int>>* views = nullptr);

class LowLatencyDispatch {
 public:
  LowLatencyDispatch(const EpShape& shape, const LowLatencyCase& dispatch_case, const RankInputs& inputs);

  // moecommEpLowLatencyDispatch of this rank's inputs; extra_flags may add MOECOMM_LL_SEND_ONLY.
  moecommResult_t Send(moecommEp_t ep, unsigned extra_flags, moecommEpHandle_t* handle);
  // Checks recvCount, every received row with its scales and source info, and the stats.
  void Check(const std::vector<RankInputs>& all, const std::vector<int>& masked) const;

 private:
  EpShape shape_;
  LowLatencyCase case_;
  const RankInputs& inputs_;
  IndexBuffer indices_;
  size_t rowsPerExpert_;
  GuardedBuffer<uint16_t> recvBf16_;
  GuardedBuffer<uint8_t> recvFp8_;
  GuardedBuffer<float> recvScales_;
  GuardedBuffer<int32_t> recvPackedScales_;
  GuardedBuffer<int> recvCount_;
  GuardedBuffer<int> recvSrcInfo_;
  std::vector<int> statsBefore_;
  std::vector<int> stats_;
};

class LowLatencyCombine {
 public:
  // Draws every rank's expert outputs from `random` (same state on every rank): random BF16 in
  // the slots below each expert's count, NaN in the rest (which no combine may read).
  // per_rank_sum: the handle's dispatch set MOECOMM_LL_PER_RANK_COMBINE, so the combine passes
  // no weights and the per-rank sum is expected. views: when ranks mask different ranks, what
  // each has masked (ComputeAllLowLatencyRows); `masked` is then this rank's view.
  LowLatencyCombine(const EpShape& shape, const std::vector<RankInputs>& all, const std::vector<int>& masked,
                    moecommDataType_t index_type, Random& random, bool per_rank_sum = false,
                    const std::vector<std::vector<int>>* views = nullptr);

  // moecommEpLowLatencyCombine; flags may hold MOECOMM_LL_SEND_ONLY and MOECOMM_LL_ZERO_COPY
  // (then this rank's expert outputs are first copied into moecommEpLowLatencyCombineBuffer).
  moecommResult_t Send(moecommEp_t ep, unsigned flags, moecommEpHandle_t handle);
  void Check() const;
  // Elements of this rank's expected output where the other form (per-rank vs per-entry)
  // gives different bits: tests assert it is non-zero so they can tell the forms apart.
  size_t DifferingFromOtherForm() const { return differing_; }

 private:
  EpShape shape_;
  const std::vector<RankInputs>& all_;
  bool perRank_;
  size_t differing_ = 0;
  IndexBuffer indices_;
  std::vector<std::vector<uint16_t>> expertOutputs_;  // [rank][E/R, R*maxT, H]
  std::vector<uint16_t> expected_;
  GuardedBuffer<uint16_t> out_;
  std::string describe_;
};

}  // namespace moecomm_mp
