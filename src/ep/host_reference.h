// The EP contract as plain functions on plain arrays: no communication, no state, no
// allocation visible to the caller. The host backend is these functions applied to the
// arrays its peers published in shared memory; the GPU kernels are tested against them.
// Every function documents its exact arithmetic, including summation order, so a kernel
// can be written to match bit for bit.
//
// Conventions
//  - topkIdx is "normalized": int64 [numTokens, topk], row-major, -1 = no expert. Use
//    widenTopkIdx for int32 input and validateTopkIdx before anything else reads it.
//  - BF16 values are raw uint16_t bits, FP8 e4m3fn values raw uint8_t bits (dtype.h).
//  - Expert e lives on rank e / expertsPerRank; its local id there is e % expertsPerRank.
//  - A token "selects" expert e when e appears in its topk row. Layout counts count topk
//    entries (an expert listed twice by one token counts twice); low-latency placement puts
//    such a token in the expert's rows once.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moecomm.h"

namespace moecomm {
namespace reference {

struct EpShape {
  int numRanks = 1;
  int numExperts = 1;
  int hidden = 0;
  int topk = 1;
  int maxTokensPerRank = 0;

  int expertsPerRank() const { return numExperts / numRanks; }
  int rankOfExpert(int64_t expert) const { return static_cast<int>(expert / expertsPerRank()); }
  // Rows per local expert in the low-latency layout: R * maxTokensPerRank.
  int lowLatencySlotsPerExpert() const { return numRanks * maxTokensPerRank; }
  // FP32 scales per row: one per kFp8ScaleBlock channels (FP8 needs hidden % 128 == 0).
  int scalesPerRow() const { return hidden / 128; }
};

// ---- Expert ids ------------------------------------------------------------------------------

// Copies count ids of type moecommInt32 or moecommInt64 to int64.
void widenTopkIdx(const void* topkIdx, moecommDataType_t type, size_t count, int64_t* out);
// Copies count int64 ids to type moecommInt32 or moecommInt64 (ids are in [-1, E), so int32 fits).
void narrowTopkIdx(const int64_t* topkIdx, size_t count, moecommDataType_t type, void* out);
// moecommInvalidArgument with "topkIdx[t][k] = v is outside [-1, E)" for the first bad entry in
// row-major order, else moecommSuccess.
moecommResult_t validateTopkIdx(const int64_t* topkIdx, int numTokens, int topk, int numExperts);
// True when row[k] equals one of row[0..k): the token already selected that expert.
bool isRepeatedExpert(const int64_t* row, int k);

// ---- Layout ------------------------------------------------------------------------------------

// For one rank's tokens, each output optional (nullptr):
//   isTokenInRank[t][r] = 1 if some topkIdx[t][k] != -1 lives on rank r, else 0;
//   tokensPerRank[r]    = sum over t of isTokenInRank[t][r] (a token counts once per rank);
//   tokensPerExpert[e]  = number of entries (t, k) with topkIdx[t][k] == e.
void computeLayout(const EpShape& shape, const int64_t* topkIdx, int numTokens, int* tokensPerRank,
                   int* tokensPerExpert, uint8_t* isTokenInRank);

// ---- Normal-mode routing, from every rank's layout counts ------------------------------------
// tokensPerRankAll is [R source][R destination] (row s = rank s's tokensPerRank);
// tokensPerExpertAll is [R source][E] (row s = rank s's tokensPerExpert).

// N of rank receivingRank: sum over sources s of tokensPerRankAll[s][receivingRank].
int numRecvTokens(const EpShape& shape, const int* tokensPerRankAll, int receivingRank);
// First received row, on receivingRank, of sourceRank's tokens: sum over s < sourceRank of
// tokensPerRankAll[s][receivingRank] (rows are ordered by source rank).
int recvRowBase(const EpShape& shape, const int* tokensPerRankAll, int receivingRank, int sourceRank);
// ceil(count / alignment) * alignment, alignment >= 1.
int alignUp(int count, int alignment);
// out[le] = alignUp(sum over s of tokensPerExpertAll[s][receivingRank * E_local + le], alignment)
// for each local expert le.
void recvTokensPerExpert(const EpShape& shape, const int* tokensPerExpertAll, int receivingRank, int alignment,
                         int* out);

// ---- Normal dispatch -----------------------------------------------------------------------

// What one source rank sends: its inputs as it passed them. Arrays may be null when
// numTokens == 0; xScales only for FP8; topkIdx / topkWeights only when the matching
// output is wanted.
struct DispatchSource {
  int numTokens = 0;
  const uint8_t* isTokenInRank = nullptr;  // [T, R]
  const uint8_t* x = nullptr;              // [T, xRowBytes]
  const float* xScales = nullptr;          // [T, H/128]
  const int64_t* topkIdx = nullptr;        // [T, K] global expert ids
  const float* topkWeights = nullptr;      // [T, K]
};

// The receiving rank's outputs, each optional (nullptr).
struct DispatchOutput {
  uint8_t* recvX = nullptr;          // [N, xRowBytes]
  float* recvXScales = nullptr;      // [N, H/128]
  int64_t* recvTopkIdx = nullptr;    // [N, K] local ids, -1 for experts elsewhere
  float* recvTopkWeights = nullptr;  // [N, K]
  int* srcRank = nullptr;            // [N]
  int* srcIndex = nullptr;           // [N]
};

// Gathers rank receivingRank's rows from sources[0..R). Rows are taken in the order
// (source rank ascending, source token ascending) for every token with
// isTokenInRank[t][receivingRank] == 1, and each row is copied unchanged:
//   recvX[n]           = x_s[t] (xRowBytes bytes), recvXScales[n] = xScales_s[t],
//   recvTopkIdx[n][k]  = e - receivingRank * E_local if e = topkIdx_s[t][k] is on
//                        receivingRank, else -1,
//   recvTopkWeights[n][k] = topkWeights_s[t][k] where recvTopkIdx[n][k] != -1, else 0.0f,
//   srcRank[n] = s, srcIndex[n] = t.
// Returns N. Writes exactly N rows of every output.
int dispatchGather(const EpShape& shape, int receivingRank, const DispatchSource* sources, size_t xRowBytes,
                   const DispatchOutput& out);

// ---- Normal combine ----------------------------------------------------------------------

// What one receiving rank sends back: one row per token it received (dispatch order).
struct CombineSource {
  const uint16_t* x = nullptr;         // [N_r, H] BF16
  const float* topkWeights = nullptr;  // [N_r, K] or null
};

// Reduces the rows that belong to sourceRank's tokens. For token t, let rows be the ranks r
// with isTokenInRank[t][r] == 1, ascending; token t's row on r is
// recvRowBase(r, sourceRank) + (number of t' < t with isTokenInRank[t'][r] == 1). Then
//   acc = +0.0f; for r in rows: acc = acc + bf16ToFloat(x_r[row][h])   (FP32, one rounding each)
//   if bias: acc = acc + bf16ToFloat(bias[t][h])
//   combinedX[t][h] = floatToBf16(acc)
// and, when combinedTopkWeights is wanted (every r in rows must then have topkWeights):
//   combinedTopkWeights[t][k] = +0.0f + w_r0[row][k] + w_r1[row][k] + ... (ranks ascending).
// A token sent nowhere gets bf16(0 + bias) (or +0) and weights 0.
void combineReduce(const EpShape& shape, int sourceRank, int numTokens, const uint8_t* isTokenInRank,
                   const int* tokensPerRankAll, const CombineSource* receivers, const uint16_t* bias,
                   uint16_t* combinedX, float* combinedTopkWeights);

// ---- FP8 cast (low-latency dispatch) --------------------------------------------------------

// Casts one BF16 row of shape.hidden channels (hidden % 128 == 0). For each block b of 128
// channels:
//   amax  = max over the block of |bf16ToFloat(x)| (fmaxf: a NaN input is ignored), then
//   amax  = max(amax, 1e-4f)
//   scale = amax / 448.0f                                  (FP32 division, round to nearest)
//   if roundScale: scale = 2^ceil(log2(scale))             (roundScaleUpToPowerOfTwo, exact)
//   inverse = 1.0f / scale                                 (FP32 division)
//   q[c]  = floatToE4m3(bf16ToFloat(x[c]) * inverse)       (FP32 multiply, then RNE + saturate)
// Writes q [hidden], and scales[b] = scale (FP32) when scales != nullptr, and
// ue8m0[b] = ue8m0FromPowerOfTwo(scale) when ue8m0 != nullptr (needs roundScale).
void castRowToFp8(const uint16_t* x, int hidden, bool roundScale, uint8_t* q, float* scales, uint8_t* ue8m0);

// ---- Low-latency dispatch ---------------------------------------------------------------------

// One source rank's low-latency inputs.
struct LowLatencySource {
  int numTokens = 0;
  const int64_t* topkIdx = nullptr;  // [T, K]
  const uint16_t* x = nullptr;       // [T, H] BF16
};

// Rows placed per expert by one rank's tokens: countsPerExpert[e] = number of tokens t whose
// row selects e at least once (a repeated expert counts once).
void lowLatencyPlacementCounts(const EpShape& shape, const int64_t* topkIdx, int numTokens, int* countsPerExpert);

struct LowLatencyDispatchOutput {
  moecommDataType_t recvType = moecommFloat8E4M3;  // or moecommBfloat16
  bool roundScale = false;                         // MOECOMM_LL_ROUND_SCALE (implied by ue8m0)
  bool ue8m0 = false;                              // MOECOMM_LL_UE8M0
  void* recvX = nullptr;                           // [E_local, R*maxT, H] of recvType
  void* recvScales = nullptr;                      // FP8: FP32 [E_local, R*maxT, H/128] or UE8M0 bytes [.., H/128]
  int* recvCount = nullptr;                        // [E_local]
  int* recvSrcInfo = nullptr;                      // [E_local, R*maxT] or null
  int* cumulativeRecvStats = nullptr;              // [E_local] or null: recvCount is added
};

// Packs rank receivingRank's expert-major rows. For each local expert le (global e =
// receivingRank * E_local + le), slot 0, 1, ... are filled in the order (source rank s
// ascending, token t ascending) with every token of an unmasked source (rankMask == nullptr or
// rankMask[s] == 0) that selects e, once however often it lists e:
//   recvX[le][slot]       = x_s[t] as BF16, or castRowToFp8(x_s[t]) with its scales,
//   recvSrcInfo[le][slot] = s * maxTokensPerRank + t,
//   recvCount[le]         = slots filled; cumulativeRecvStats[le] += recvCount[le].
// Slots at or beyond recvCount[le] are not written.
void lowLatencyPack(const EpShape& shape, int receivingRank, const LowLatencySource* sources, const int* rankMask,
                    const LowLatencyDispatchOutput& out);

// Where sourceRank's selections were placed: slots[t][k] = the slot of token t in expert
// e = topkIdx[t][k]'s rows on rank r = rankOfExpert(e), or -1 when e == -1 or r masks
// sourceRank. The slot is the number of tokens of unmasked (by r) sources s < sourceRank
// that select e (placementCountsAll[s][e]) plus the number of sourceRank's tokens t' < t that
// select e. masksAll is [R receiving][R source] (row r = rank r's mask) or nullptr (no masks);
// placementCountsAll is [R][E] of lowLatencyPlacementCounts.
void lowLatencySelectionSlots(const EpShape& shape, int sourceRank, const int64_t* topkIdx, int numTokens,
                              const int* placementCountsAll, const int* masksAll, int* slots);

// ---- Low-latency combine ------------------------------------------------------------------------

// The weighted sum itself. rows[t][k] points at the BF16 expert output [H] for selection
// (t, k), or is null when the selection adds nothing. For each token t and channel h:
//   acc = +0.0f
//   for k ascending with rows[t][k] != null:
//     acc = fmaf(topkWeights[t][k], bf16ToFloat(rows[t][k][h]), acc)
//   out[t][h] = floatToBf16(acc)
// fmaf is the fused multiply-add (one rounding), as the GPU's fma instruction computes it.
void lowLatencyCombineRows(const EpShape& shape, int numTokens, const float* topkWeights, const uint16_t* const* rows,
                           uint16_t* out);

// The per-rank form (MOECOMM_LL_PER_RANK_COMBINE): the same selections, summed per expert rank
// first. rows and topkWeights as above; topkIdx names each selection's expert (its rank). For
// each token t and channel h:
//   for each rank r: p_r = +0.0f; for k ascending with rows[t][k] != null and
//     rankOfExpert(topkIdx[t][k]) == r: p_r = fmaf(topkWeights[t][k], bf16ToFloat(rows[t][k][h]), p_r)
//   acc = +0.0f
//   for r ascending with at least one such k: acc = acc + bf16ToFloat(floatToBf16(p_r))
//   out[t][h] = floatToBf16(acc)
void lowLatencyCombineRowsPerRank(const EpShape& shape, int numTokens, const int64_t* topkIdx, const float* topkWeights,
                                  const uint16_t* const* rows, uint16_t* out);

// expertOutputs[r] is rank r's [E_local, R*maxT, H] BF16 expert outputs (dispatch layout).
// For each token t and channel h:
//   acc = +0.0f
//   for k ascending: e = topkIdx[t][k]; skip if e == -1, if slots[t][k] == -1, or if
//     rankMask[rankOfExpert(e)] != 0; else
//     acc = fmaf(topkWeights[t][k], bf16ToFloat(expertOutputs[r][e % E_local][slots[t][k]][h]), acc)
//   out[t][h] = floatToBf16(acc)
// (lowLatencyCombineRows with the row of each selection found through its slot; with perRank,
// lowLatencyCombineRowsPerRank.)
void lowLatencyCombine(const EpShape& shape, int numTokens, const int64_t* topkIdx, const float* topkWeights,
                       const int* slots, const uint16_t* const* expertOutputs, const int* rankMask, uint16_t* out,
                       bool perRank = false);

}  // namespace reference
}  // namespace moecomm
