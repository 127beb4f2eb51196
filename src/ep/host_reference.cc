#include "ep/host_reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ep/dtype.h"

namespace moecomm {
namespace reference {

// ---- Expert ids ------------------------------------------------------------------------------

void widenTopkIdx(const void* topkIdx, moecommDataType_t type, size_t count, int64_t* out) {
  if (type == moecommInt64) {
    if (count > 0) std::memcpy(out, topkIdx, count * sizeof(int64_t));
    return;
  }
  const int32_t* narrow = static_cast<const int32_t*>(topkIdx);
  for (size_t i = 0; i < count; ++i) out[i] = narrow[i];
}

void narrowTopkIdx(const int64_t* topkIdx, size_t count, moecommDataType_t type, void* out) {
  if (type == moecommInt64) {
    if (count > 0) std::memcpy(out, topkIdx, count * sizeof(int64_t));
    return;
  }
  int32_t* narrow = static_cast<int32_t*>(out);
  for (size_t i = 0; i < count; ++i) narrow[i] = static_cast<int32_t>(topkIdx[i]);
}

moecommResult_t validateTopkIdx(const int64_t* topkIdx, int numTokens, int topk, int numExperts) {
  for (int t = 0; t < numTokens; ++t) {
    for (int k = 0; k < topk; ++k) {
      const int64_t expert = topkIdx[static_cast<size_t>(t) * topk + k];
      MC_REQUIRE(expert >= -1 && expert < numExperts, moecommInvalidArgument,
                 "topkIdx[%d][%d] = %lld is outside [-1, %d)", t, k, static_cast<long long>(expert), numExperts);
    }
  }
  return moecommSuccess;
}

bool isRepeatedExpert(const int64_t* row, int k) {
  for (int j = 0; j < k; ++j) {
    if (row[j] == row[k]) return true;
  }
  return false;
}

// ---- Layout ------------------------------------------------------------------------------------

void computeLayout(const EpShape& shape, const int64_t* topkIdx, int numTokens, int* tokensPerRank,
                   int* tokensPerExpert, uint8_t* isTokenInRank) {
  const int numRanks = shape.numRanks;
  if (tokensPerRank != nullptr) std::fill(tokensPerRank, tokensPerRank + numRanks, 0);
  if (tokensPerExpert != nullptr) std::fill(tokensPerExpert, tokensPerExpert + shape.numExperts, 0);
  std::vector<uint8_t> tokenInRank(numRanks);
  for (int t = 0; t < numTokens; ++t) {
    std::fill(tokenInRank.begin(), tokenInRank.end(), 0);
    const int64_t* row = topkIdx + static_cast<size_t>(t) * shape.topk;
    for (int k = 0; k < shape.topk; ++k) {
      if (row[k] == -1) continue;
      tokenInRank[shape.rankOfExpert(row[k])] = 1;
      if (tokensPerExpert != nullptr) ++tokensPerExpert[row[k]];
    }
    for (int r = 0; r < numRanks; ++r) {
      if (tokensPerRank != nullptr) tokensPerRank[r] += tokenInRank[r];
      if (isTokenInRank != nullptr) isTokenInRank[static_cast<size_t>(t) * numRanks + r] = tokenInRank[r];
    }
  }
}

// ---- Normal-mode routing ------------------------------------------------------------------------

int numRecvTokens(const EpShape& shape, const int* tokensPerRankAll, int receivingRank) {
  return recvRowBase(shape, tokensPerRankAll, receivingRank, shape.numRanks);
}

int recvRowBase(const EpShape& shape, const int* tokensPerRankAll, int receivingRank, int sourceRank) {
  int rows = 0;
  for (int s = 0; s < sourceRank; ++s)
    rows += tokensPerRankAll[static_cast<size_t>(s) * shape.numRanks + receivingRank];
  return rows;
}

int alignUp(int count, int alignment) { return (count + alignment - 1) / alignment * alignment; }

void recvTokensPerExpert(const EpShape& shape, const int* tokensPerExpertAll, int receivingRank, int alignment,
                         int* out) {
  const int localExperts = shape.expertsPerRank();
  for (int le = 0; le < localExperts; ++le) {
    const int expert = receivingRank * localExperts + le;
    int selections = 0;
    for (int s = 0; s < shape.numRanks; ++s)
      selections += tokensPerExpertAll[static_cast<size_t>(s) * shape.numExperts + expert];
    out[le] = alignUp(selections, alignment);
  }
}

// ---- Normal dispatch -----------------------------------------------------------------------

namespace {

// Copies one received row's expert ids (remapped to local ids) and weights.
void copyRecvTopk(const EpShape& shape, int receivingRank, const DispatchSource& source, int t, size_t outRow,
                  const DispatchOutput& out) {
  const int localExperts = shape.expertsPerRank();
  const int64_t firstLocal = static_cast<int64_t>(receivingRank) * localExperts;
  const size_t inRow = static_cast<size_t>(t) * shape.topk;
  for (int k = 0; k < shape.topk; ++k) {
    const int64_t expert = source.topkIdx[inRow + k];
    const bool local = expert >= firstLocal && expert < firstLocal + localExperts;
    if (out.recvTopkIdx != nullptr) out.recvTopkIdx[outRow * shape.topk + k] = local ? expert - firstLocal : -1;
    if (out.recvTopkWeights != nullptr) {
      out.recvTopkWeights[outRow * shape.topk + k] = local ? source.topkWeights[inRow + k] : 0.0f;
    }
  }
}

}  // namespace

int dispatchGather(const EpShape& shape, int receivingRank, const DispatchSource* sources, size_t xRowBytes,
                   const DispatchOutput& out) {
  const size_t scalesPerRow = static_cast<size_t>(shape.scalesPerRow());
  size_t row = 0;
  for (int s = 0; s < shape.numRanks; ++s) {
    const DispatchSource& source = sources[s];
    for (int t = 0; t < source.numTokens; ++t) {
      if (source.isTokenInRank[static_cast<size_t>(t) * shape.numRanks + receivingRank] == 0) continue;
      if (out.recvX != nullptr) std::memcpy(out.recvX + row * xRowBytes, source.x + t * xRowBytes, xRowBytes);
      if (out.recvXScales != nullptr) {
        std::memcpy(out.recvXScales + row * scalesPerRow, source.xScales + t * scalesPerRow,
                    scalesPerRow * sizeof(float));
      }
      if (out.recvTopkIdx != nullptr || out.recvTopkWeights != nullptr) {
        copyRecvTopk(shape, receivingRank, source, t, row, out);
      }
      if (out.srcRank != nullptr) out.srcRank[row] = s;
      if (out.srcIndex != nullptr) out.srcIndex[row] = t;
      ++row;
    }
  }
  return static_cast<int>(row);
}

// ---- Normal combine ----------------------------------------------------------------------

void combineReduce(const EpShape& shape, int sourceRank, int numTokens, const uint8_t* isTokenInRank,
                   const int* tokensPerRankAll, const CombineSource* receivers, const uint16_t* bias,
                   uint16_t* combinedX, float* combinedTopkWeights) {
  const int numRanks = shape.numRanks;
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t topk = static_cast<size_t>(shape.topk);
  // nextRow[r]: the row on rank r of the next of our tokens that went there.
  std::vector<int> nextRow(numRanks);
  for (int r = 0; r < numRanks; ++r) nextRow[r] = recvRowBase(shape, tokensPerRankAll, r, sourceRank);
  std::vector<float> acc(hidden);
  for (int t = 0; t < numTokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    float* weightsOut = combinedTopkWeights != nullptr ? combinedTopkWeights + t * topk : nullptr;
    if (weightsOut != nullptr) std::fill(weightsOut, weightsOut + topk, 0.0f);
    for (int r = 0; r < numRanks; ++r) {
      if (isTokenInRank[static_cast<size_t>(t) * numRanks + r] == 0) continue;
      const size_t row = static_cast<size_t>(nextRow[r]++);
      const uint16_t* x = receivers[r].x + row * hidden;
      for (size_t h = 0; h < hidden; ++h) acc[h] += bf16ToFloat(x[h]);
      if (weightsOut != nullptr) {
        const float* weights = receivers[r].topkWeights + row * topk;
        for (size_t k = 0; k < topk; ++k) weightsOut[k] += weights[k];
      }
    }
    uint16_t* out = combinedX + t * hidden;
    const uint16_t* biasRow = bias != nullptr ? bias + t * hidden : nullptr;
    for (size_t h = 0; h < hidden; ++h) {
      const float sum = biasRow != nullptr ? acc[h] + bf16ToFloat(biasRow[h]) : acc[h];
      out[h] = floatToBf16(sum);
    }
  }
}

// ---- FP8 cast ----------------------------------------------------------------------------------

void castRowToFp8(const uint16_t* x, int hidden, bool roundScale, uint8_t* q, float* scales, uint8_t* ue8m0) {
  for (int block = 0; block * kFp8ScaleBlock < hidden; ++block) {
    const int begin = block * kFp8ScaleBlock;
    float amax = 0.0f;
    for (int c = begin; c < begin + kFp8ScaleBlock; ++c) amax = std::fmax(amax, std::fabs(bf16ToFloat(x[c])));
    amax = std::fmax(amax, kFp8MinAmax);
    float scale = amax / kFp8E4m3Max;
    if (roundScale) scale = roundScaleUpToPowerOfTwo(scale);
    const float inverse = 1.0f / scale;
    for (int c = begin; c < begin + kFp8ScaleBlock; ++c) q[c] = floatToE4m3(bf16ToFloat(x[c]) * inverse);
    if (scales != nullptr) scales[block] = scale;
    if (ue8m0 != nullptr) ue8m0[block] = ue8m0FromPowerOfTwo(scale);
  }
}

// ---- Low-latency dispatch ---------------------------------------------------------------------

void lowLatencyPlacementCounts(const EpShape& shape, const int64_t* topkIdx, int numTokens, int* countsPerExpert) {
  std::fill(countsPerExpert, countsPerExpert + shape.numExperts, 0);
  for (int t = 0; t < numTokens; ++t) {
    const int64_t* row = topkIdx + static_cast<size_t>(t) * shape.topk;
    for (int k = 0; k < shape.topk; ++k) {
      if (row[k] != -1 && !isRepeatedExpert(row, k)) ++countsPerExpert[row[k]];
    }
  }
}

namespace {

// Writes one token into its slot of local expert le.
void placeRow(const EpShape& shape, const LowLatencyDispatchOutput& out, int le, int slot, const uint16_t* x) {
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t row = static_cast<size_t>(le) * shape.lowLatencySlotsPerExpert() + slot;
  if (out.recvType == moecommBfloat16) {
    std::memcpy(static_cast<uint16_t*>(out.recvX) + row * hidden, x, hidden * sizeof(uint16_t));
    return;
  }
  const size_t scalesPerRow = static_cast<size_t>(shape.scalesPerRow());
  uint8_t* q = static_cast<uint8_t*>(out.recvX) + row * hidden;
  float* scales = nullptr;
  uint8_t* exponents = nullptr;
  if (out.ue8m0) {
    exponents = static_cast<uint8_t*>(out.recvScales) + row * scalesPerRow;
  } else {
    scales = static_cast<float*>(out.recvScales) + row * scalesPerRow;
  }
  castRowToFp8(x, shape.hidden, out.roundScale || out.ue8m0, q, scales, exponents);
}

}  // namespace

void lowLatencyPack(const EpShape& shape, int receivingRank, const LowLatencySource* sources, const int* rankMask,
                    const LowLatencyDispatchOutput& out) {
  const int localExperts = shape.expertsPerRank();
  const int64_t firstLocal = static_cast<int64_t>(receivingRank) * localExperts;
  const int slotsPerExpert = shape.lowLatencySlotsPerExpert();
  std::vector<int> filled(localExperts, 0);
  for (int s = 0; s < shape.numRanks; ++s) {
    if (rankMask != nullptr && rankMask[s] != 0) continue;
    const LowLatencySource& source = sources[s];
    for (int t = 0; t < source.numTokens; ++t) {
      const int64_t* row = source.topkIdx + static_cast<size_t>(t) * shape.topk;
      for (int k = 0; k < shape.topk; ++k) {
        if (row[k] < firstLocal || row[k] >= firstLocal + localExperts || isRepeatedExpert(row, k)) continue;
        const int le = static_cast<int>(row[k] - firstLocal);
        const int slot = filled[le]++;
        placeRow(shape, out, le, slot, source.x + static_cast<size_t>(t) * shape.hidden);
        if (out.recvSrcInfo != nullptr) {
          out.recvSrcInfo[static_cast<size_t>(le) * slotsPerExpert + slot] = s * shape.maxTokensPerRank + t;
        }
      }
    }
  }
  for (int le = 0; le < localExperts; ++le) {
    out.recvCount[le] = filled[le];
    if (out.cumulativeRecvStats != nullptr) out.cumulativeRecvStats[le] += filled[le];
  }
}

void lowLatencySelectionSlots(const EpShape& shape, int sourceRank, const int64_t* topkIdx, int numTokens,
                              const int* placementCountsAll, const int* masksAll, int* slots) {
  const int numRanks = shape.numRanks;
  const int numExperts = shape.numExperts;
  auto masks = [&](int receiver, int source) {
    return masksAll != nullptr && masksAll[static_cast<size_t>(receiver) * numRanks + source] != 0;
  };
  // nextSlot[e]: the slot our next token selecting e gets on e's rank.
  std::vector<int> nextSlot(numExperts, 0);
  for (int e = 0; e < numExperts; ++e) {
    const int receiver = shape.rankOfExpert(e);
    for (int s = 0; s < sourceRank; ++s) {
      if (!masks(receiver, s)) nextSlot[e] += placementCountsAll[static_cast<size_t>(s) * numExperts + e];
    }
  }
  for (int t = 0; t < numTokens; ++t) {
    const int64_t* row = topkIdx + static_cast<size_t>(t) * shape.topk;
    int* slotRow = slots + static_cast<size_t>(t) * shape.topk;
    for (int k = 0; k < shape.topk; ++k) {
      const int64_t expert = row[k];
      if (expert == -1 || masks(shape.rankOfExpert(expert), sourceRank)) {
        slotRow[k] = -1;
        continue;
      }
      int j = 0;
      while (row[j] != expert) ++j;  // the first entry of this expert in the row
      slotRow[k] = j < k ? slotRow[j] : nextSlot[expert]++;
    }
  }
}

// ---- Low-latency combine ------------------------------------------------------------------------

void lowLatencyCombineRows(const EpShape& shape, int numTokens, const float* topkWeights, const uint16_t* const* rows,
                           uint16_t* out) {
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t topk = static_cast<size_t>(shape.topk);
  std::vector<float> acc(hidden);
  for (int t = 0; t < numTokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (size_t k = 0; k < topk; ++k) {
      const uint16_t* y = rows[t * topk + k];
      if (y == nullptr) continue;
      const float weight = topkWeights[t * topk + k];
      for (size_t h = 0; h < hidden; ++h) acc[h] = std::fma(weight, bf16ToFloat(y[h]), acc[h]);
    }
    uint16_t* outRow = out + t * hidden;
    for (size_t h = 0; h < hidden; ++h) outRow[h] = floatToBf16(acc[h]);
  }
}

void lowLatencyCombineRowsPerRank(const EpShape& shape, int numTokens, const int64_t* topkIdx, const float* topkWeights,
                                  const uint16_t* const* rows, uint16_t* out) {
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t topk = static_cast<size_t>(shape.topk);
  std::vector<float> partial(hidden);
  std::vector<float> acc(hidden);
  for (int t = 0; t < numTokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int r = 0; r < shape.numRanks; ++r) {
      bool any = false;
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (size_t k = 0; k < topk; ++k) {
        const size_t entry = t * topk + k;
        const uint16_t* y = rows[entry];
        if (y == nullptr || shape.rankOfExpert(topkIdx[entry]) != r) continue;
        any = true;
        const float weight = topkWeights[entry];
        for (size_t h = 0; h < hidden; ++h) partial[h] = std::fma(weight, bf16ToFloat(y[h]), partial[h]);
      }
      if (!any) continue;
      for (size_t h = 0; h < hidden; ++h) acc[h] = acc[h] + bf16ToFloat(floatToBf16(partial[h]));
    }
    uint16_t* outRow = out + t * hidden;
    for (size_t h = 0; h < hidden; ++h) outRow[h] = floatToBf16(acc[h]);
  }
}

void lowLatencyCombine(const EpShape& shape, int numTokens, const int64_t* topkIdx, const float* topkWeights,
                       const int* slots, const uint16_t* const* expertOutputs, const int* rankMask, uint16_t* out,
                       bool perRank) {
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t entries = static_cast<size_t>(numTokens) * shape.topk;
  const size_t slotsPerExpert = static_cast<size_t>(shape.lowLatencySlotsPerExpert());
  std::vector<const uint16_t*> rows(entries, nullptr);
  for (size_t entry = 0; entry < entries; ++entry) {
    const int64_t expert = topkIdx[entry];
    if (expert == -1 || slots[entry] == -1) continue;
    const int rank = shape.rankOfExpert(expert);
    if (rankMask != nullptr && rankMask[rank] != 0) continue;
    const size_t row = static_cast<size_t>(expert % shape.expertsPerRank()) * slotsPerExpert + slots[entry];
    rows[entry] = expertOutputs[rank] + row * hidden;
  }
  if (perRank) {
    lowLatencyCombineRowsPerRank(shape, numTokens, topkIdx, topkWeights, rows.data(), out);
  } else {
    lowLatencyCombineRows(shape, numTokens, topkWeights, rows.data(), out);
  }
}

}  // namespace reference
}  // namespace moecomm
