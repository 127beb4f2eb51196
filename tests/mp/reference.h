// The multi-process tests' own model of the EP contract in include/moecomm.h: number formats,
// a seeded generator, routing generation and plain reference implementations of layout,
// dispatch, combine and the low-latency pair.
//
// Written from the header's comments alone, independently of src/ep, and deliberately simple:
// every function loops over all ranks' inputs, which every test process builds in full.
// Nothing here is fast and nothing needs to be.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace moecomm_mp {

// ---------------------------------------------------------------------------------------
// Number formats. BF16 and FP8 values are kept as their raw bits (uint16_t / uint8_t).
// ---------------------------------------------------------------------------------------

inline uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float FloatFromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float Bf16ToFloat(uint16_t bf16) { return FloatFromBits(static_cast<uint32_t>(bf16) << 16); }

// Round to nearest, ties to even, on the 16 bits that are dropped. NaN stays a quiet NaN.
inline uint16_t FloatToBf16(float value) {
  const uint32_t bits = FloatBits(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  uint32_t kept = bits >> 16;
  const uint32_t dropped = bits & 0xFFFFu;
  const bool kept_is_odd = (kept & 1u) != 0;
  if (dropped > 0x8000u || (dropped == 0x8000u && kept_is_odd)) ++kept;  // may carry into inf: correct
  return static_cast<uint16_t>(kept);
}

// FP8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN;
// the largest finite magnitude is 448 (0x7E).
constexpr float kFp8E4m3Max = 448.0f;
constexpr uint8_t kFp8NanBits = 0x7F;

inline float Fp8E4m3ToFloat(uint8_t bits) {
  const bool negative = (bits & 0x80u) != 0;
  const int exponent_field = (bits >> 3) & 0xF;
  const int mantissa_field = bits & 0x7;
  if (exponent_field == 0xF && mantissa_field == 0x7) return std::nanf("");
  double magnitude;
  if (exponent_field == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa_field), -9);  // subnormal: m/8 * 2^-6
  } else {
    magnitude = std::ldexp(1.0 + mantissa_field / 8.0, exponent_field - 7);
  }
  return static_cast<float>(negative ? -magnitude : magnitude);
}

// Round to nearest even, saturating to +-448 (the cvt.rn.satfinite behaviour: infinities and
// every finite value beyond 448 become 448 with their sign; NaN stays NaN).
inline uint8_t FloatToFp8E4m3(float value) {
  if (std::isnan(value)) return kFp8NanBits;
  const uint8_t sign = std::signbit(value) ? 0x80u : 0x00u;
  const double magnitude = std::fabs(static_cast<double>(value));
  if (magnitude >= kFp8E4m3Max) return static_cast<uint8_t>(sign | 0x7Eu);
  const double min_normal = std::ldexp(1.0, -6);
  if (magnitude < min_normal) {
    // Steps of 2^-9; a result of 8 steps is the smallest normal, whose encoding is also 8.
    const double steps = std::nearbyint(magnitude * 512.0);
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(steps));
  }
  int exponent;
  const double fraction = std::frexp(magnitude, &exponent);  // magnitude = fraction * 2^exponent, fraction in [0.5,1)
  int unbiased = exponent - 1;                               // magnitude = (2 * fraction) * 2^unbiased
  double mantissa_steps = std::nearbyint((2.0 * fraction - 1.0) * 8.0);
  if (mantissa_steps == 8.0) {
    mantissa_steps = 0.0;
    ++unbiased;
  }
  // magnitude < 448 cannot round past 448 (= 1.75 * 2^8), so no NaN pattern is produced.
  return static_cast<uint8_t>(sign | ((unbiased + 7) << 3) | static_cast<int>(mantissa_steps));
}

// The smallest power of two >= value (value > 0, finite, normal).
inline float PowerOfTwoCeil(float value) {
  int exponent;
  const float fraction = std::frexp(value, &exponent);  // value = fraction * 2^exponent
  if (fraction == 0.5f) return value;                   // already a power of two
  return std::ldexp(1.0f, exponent);
}

// The low-latency dispatch's FP8 cast of one 128-channel block, as the header specifies it:
// amax clamped to >= 1e-4, scale = amax / 448, optionally rounded up to a power of two, then
// q = e4m3_rne_satfinite(x * (1 / scale)). Returns the scale; writes 128 FP8 values.
constexpr int kFp8BlockChannels = 128;
constexpr float kFp8MinAmax = 1e-4f;

inline float CastBlockToFp8(const uint16_t* bf16_block, bool round_scale, uint8_t* fp8_block) {
  float amax = 0.0f;
  for (int c = 0; c < kFp8BlockChannels; ++c) amax = std::fmax(amax, std::fabs(Bf16ToFloat(bf16_block[c])));
  amax = std::fmax(amax, kFp8MinAmax);
  float scale = amax / kFp8E4m3Max;
  if (round_scale) scale = PowerOfTwoCeil(scale);
  const float inverse_scale = 1.0f / scale;
  for (int c = 0; c < kFp8BlockChannels; ++c) {
    const float scaled = Bf16ToFloat(bf16_block[c]) * inverse_scale;
    fp8_block[c] = FloatToFp8E4m3(scaled);
  }
  return scale;
}

// The UE8M0 byte of a power-of-two scale: its biased binary exponent.
inline uint8_t Ue8m0FromPowerOfTwo(float power_of_two) {
  return static_cast<uint8_t>((FloatBits(power_of_two) >> 23) & 0xFFu);
}

// ---------------------------------------------------------------------------------------
// A seeded generator (splitmix64): the same sequence on every rank and every platform.
// ---------------------------------------------------------------------------------------

class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t mixed = state_;
    mixed = (mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9ull;
    mixed = (mixed ^ (mixed >> 27)) * 0x94D049BB133111EBull;
    return mixed ^ (mixed >> 31);
  }
  // Uniform in [0, bound), bound > 0 (the tiny modulo bias does not matter here).
  int Below(int bound) { return static_cast<int>(Next() % static_cast<uint64_t>(bound)); }
  // Uniform in [low, high].
  int Between(int low, int high) { return low + Below(high - low + 1); }
  // Uniform in [0, 1).
  double Unit() { return static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0); }
  bool Chance(double probability) { return Unit() < probability; }

  // A BF16 value of varied magnitude, never zero or negative zero (so sums of them have one
  // possible sign of zero whatever order they start in).
  // Magnitudes span `octaves` powers of two below max_magnitude; a wide span (kWideOctaves) makes
  // FP32 sums of a few values round, so a different summation order gives different bits.
  static constexpr double kWideOctaves = 30.0;
  uint16_t Bf16(double max_magnitude = 4.0, double octaves = 6.0) {
    for (;;) {
      const double magnitude = max_magnitude * std::pow(2.0, -octaves * Unit());
      const double value = Chance(0.5) ? -magnitude : magnitude;
      const uint16_t bits = FloatToBf16(static_cast<float>(value));
      if ((bits & 0x7FFFu) != 0) return bits;
    }
  }
  // Any FP8 e4m3fn bit pattern except NaN.
  uint8_t Fp8() {
    for (;;) {
      const uint8_t bits = static_cast<uint8_t>(Next() & 0xFFu);
      if ((bits & 0x7Fu) != kFp8NanBits) return bits;
    }
  }
  // A positive weight in (0, 1].
  float Weight() { return static_cast<float>(1.0 - Unit()); }

 private:
  uint64_t state_;
};

inline uint64_t HashText(uint64_t hash, const std::string& text) {
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}
constexpr uint64_t kHashStart = 1469598103934665603ull;

// ---------------------------------------------------------------------------------------
// Shapes, routing and per-rank inputs.
// ---------------------------------------------------------------------------------------

struct EpShape {
  int nranks = 1;
  int numExperts = 0;
  int hidden = 0;
  int maxTokensPerRank = 0;
  int topk = 0;

  int ExpertsPerRank() const { return numExperts / nranks; }
  int OwnerOf(int64_t expert) const { return static_cast<int>(expert / ExpertsPerRank()); }
  int ScaleBlocks() const { return hidden / kFp8BlockChannels; }
};

struct RoutingOptions {
  double emptyEntryChance = 0.1;      // an entry of topk_idx is -1
  double emptyTokenChance = 0.05;     // all K entries of a token are -1
  double zeroTokenRankChance = 0.15;  // a rank has T = 0
  int skewExpert = -1;                // >= 0: every token selects this expert (in a random slot)
  bool fullBatches = false;           // every rank has T = maxTokensPerRank
  double repeatEntryChance = 0.0;     // an entry repeats an earlier entry's expert (legal, if unusual)
};

// Everything one rank passes to dispatch and combine, generated identically on every rank.
struct RankInputs {
  int numTokens = 0;
  std::vector<int64_t> topkIdx;    // [T,K]
  std::vector<float> topkWeights;  // [T,K]
  std::vector<uint16_t> xBf16;     // [T,H]
  std::vector<uint8_t> xFp8;       // [T,H]
  std::vector<float> xScales;      // [T,H/128]
};

inline void GenerateRouting(const EpShape& shape, const RoutingOptions& options, Random& random, RankInputs* inputs) {
  const int topk = shape.topk;
  inputs->topkIdx.assign(static_cast<size_t>(inputs->numTokens) * topk, -1);
  std::vector<int64_t> experts(shape.numExperts);
  for (int t = 0; t < inputs->numTokens; ++t) {
    int64_t* row = &inputs->topkIdx[static_cast<size_t>(t) * topk];
    if (random.Chance(options.emptyTokenChance)) continue;  // stays all -1
    // K distinct experts: a partial Fisher-Yates shuffle, the skewed expert forced first.
    for (int e = 0; e < shape.numExperts; ++e) experts[e] = e;
    int first = 0;
    if (options.skewExpert >= 0) {
      std::swap(experts[0], experts[options.skewExpert]);
      first = 1;
    }
    for (int k = first; k < topk; ++k) std::swap(experts[k], experts[random.Between(k, shape.numExperts - 1)]);
    for (int k = 0; k < topk; ++k) row[k] = experts[k];
    // Move the forced expert to a random slot so its position varies.
    if (options.skewExpert >= 0) std::swap(row[0], row[random.Below(topk)]);
    for (int k = 0; k < topk; ++k) {
      if (row[k] != options.skewExpert && random.Chance(options.emptyEntryChance)) row[k] = -1;
    }
    for (int k = 1; k < topk; ++k) {
      if (random.Chance(options.repeatEntryChance)) row[k] = row[random.Below(k)];
    }
  }
}

// Routing, weights and both payload formats for one rank.
inline RankInputs GenerateRankInputs(const EpShape& shape, const RoutingOptions& options, Random& random) {
  RankInputs inputs;
  if (options.fullBatches) {
    inputs.numTokens = shape.maxTokensPerRank;
  } else if (random.Chance(options.zeroTokenRankChance)) {
    inputs.numTokens = 0;
  } else {
    inputs.numTokens = random.Between(1, shape.maxTokensPerRank);
  }
  GenerateRouting(shape, options, random, &inputs);
  const size_t entries = static_cast<size_t>(inputs.numTokens) * shape.topk;
  inputs.topkWeights.resize(entries);
  for (size_t i = 0; i < entries; ++i) inputs.topkWeights[i] = random.Weight();
  const size_t elements = static_cast<size_t>(inputs.numTokens) * shape.hidden;
  inputs.xBf16.resize(elements);
  for (size_t i = 0; i < elements; ++i) inputs.xBf16[i] = random.Bf16();
  if (shape.hidden % kFp8BlockChannels == 0) {
    inputs.xFp8.resize(elements);
    for (size_t i = 0; i < elements; ++i) inputs.xFp8[i] = random.Fp8();
    inputs.xScales.resize(static_cast<size_t>(inputs.numTokens) * shape.ScaleBlocks());
    for (float& scale : inputs.xScales)
      scale = static_cast<float>(std::ldexp(1.0 + random.Unit(), random.Between(-12, 4)));
  }
  return inputs;
}

inline std::vector<RankInputs> GenerateAllRanks(const EpShape& shape, const RoutingOptions& options, Random& random) {
  std::vector<RankInputs> all;
  for (int r = 0; r < shape.nranks; ++r) all.push_back(GenerateRankInputs(shape, options, random));
  return all;
}

// The same index values as int32, for the int32 variants of the calls.
inline std::vector<int32_t> ToInt32(const std::vector<int64_t>& values) {
  return std::vector<int32_t>(values.begin(), values.end());
}

// ---------------------------------------------------------------------------------------
// Layout.
// ---------------------------------------------------------------------------------------

struct ReferenceLayout {
  std::vector<int> tokensPerRank;      // [R]
  std::vector<int> tokensPerExpert;    // [E]
  std::vector<uint8_t> isTokenInRank;  // [T,R]
};

inline ReferenceLayout ComputeLayout(const EpShape& shape, const RankInputs& inputs) {
  ReferenceLayout layout;
  layout.tokensPerRank.assign(shape.nranks, 0);
  layout.tokensPerExpert.assign(shape.numExperts, 0);
  layout.isTokenInRank.assign(static_cast<size_t>(inputs.numTokens) * shape.nranks, 0);
  for (int t = 0; t < inputs.numTokens; ++t) {
    for (int k = 0; k < shape.topk; ++k) {
      const int64_t expert = inputs.topkIdx[static_cast<size_t>(t) * shape.topk + k];
      if (expert < 0) continue;
      ++layout.tokensPerExpert[expert];
      layout.isTokenInRank[static_cast<size_t>(t) * shape.nranks + shape.OwnerOf(expert)] = 1;
    }
    for (int r = 0; r < shape.nranks; ++r)
      layout.tokensPerRank[r] += layout.isTokenInRank[static_cast<size_t>(t) * shape.nranks + r];
  }
  return layout;
}

inline bool TokenGoesToRank(const EpShape& shape, const RankInputs& inputs, int token, int rank) {
  for (int k = 0; k < shape.topk; ++k) {
    const int64_t expert = inputs.topkIdx[static_cast<size_t>(token) * shape.topk + k];
    if (expert >= 0 && shape.OwnerOf(expert) == rank) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------
// Normal dispatch and combine.
// ---------------------------------------------------------------------------------------

struct SourceToken {
  int rank;
  int token;
};

// What one rank receives from a normal dispatch.
struct ReferenceDispatch {
  std::vector<SourceToken> sources;  // [N]: ordered by source rank, then token
  std::vector<uint16_t> xBf16;       // [N,H]
  std::vector<uint8_t> xFp8;         // [N,H]
  std::vector<float> xScales;        // [N,H/128]
  std::vector<int64_t> topkIdx;      // [N,K]: local expert ids, others -1
  std::vector<float> topkWeights;    // [N,K]: 0 where topkIdx is -1
  std::vector<int> tokensPerExpert;  // [E/R], rounded up to the alignment
  int NumRows() const { return static_cast<int>(sources.size()); }
};

inline ReferenceDispatch ComputeDispatch(const EpShape& shape, const std::vector<RankInputs>& all, int receiver,
                                         int expert_alignment) {
  ReferenceDispatch out;
  const int local_experts = shape.ExpertsPerRank();
  const int first_local = receiver * local_experts;
  const int blocks = shape.ScaleBlocks();
  out.tokensPerExpert.assign(local_experts, 0);
  for (int src = 0; src < shape.nranks; ++src) {
    const RankInputs& in = all[src];
    for (int t = 0; t < in.numTokens; ++t) {
      if (!TokenGoesToRank(shape, in, t, receiver)) continue;
      out.sources.push_back({src, t});
      const size_t x_begin = static_cast<size_t>(t) * shape.hidden;
      out.xBf16.insert(out.xBf16.end(), in.xBf16.begin() + x_begin, in.xBf16.begin() + x_begin + shape.hidden);
      if (!in.xFp8.empty()) {
        out.xFp8.insert(out.xFp8.end(), in.xFp8.begin() + x_begin, in.xFp8.begin() + x_begin + shape.hidden);
        const size_t s_begin = static_cast<size_t>(t) * blocks;
        out.xScales.insert(out.xScales.end(), in.xScales.begin() + s_begin, in.xScales.begin() + s_begin + blocks);
      }
      for (int k = 0; k < shape.topk; ++k) {
        const size_t entry = static_cast<size_t>(t) * shape.topk + k;
        const int64_t expert = in.topkIdx[entry];
        const bool local = expert >= 0 && shape.OwnerOf(expert) == receiver;
        out.topkIdx.push_back(local ? expert - first_local : -1);
        out.topkWeights.push_back(local ? in.topkWeights[entry] : 0.0f);
        if (local) ++out.tokensPerExpert[expert - first_local];
      }
    }
  }
  for (int& count : out.tokensPerExpert) count = (count + expert_alignment - 1) / expert_alignment * expert_alignment;
  return out;
}

// Inputs of a normal combine on one rank: one row per received token.
struct CombineInputs {
  std::vector<uint16_t> x;         // [N,H]
  std::vector<float> topkWeights;  // [N,K]
};

// combined[t] = bf16(sum over receiving ranks r ascending of float(x_r[row]) (+ float(bias[t]))),
// accumulated in FP32 from 0; the weights likewise without bias.
inline void ComputeCombine(const EpShape& shape, const std::vector<RankInputs>& all,
                           const std::vector<ReferenceDispatch>& dispatches, const std::vector<CombineInputs>& inputs,
                           int home, const std::vector<uint16_t>* bias, std::vector<uint16_t>* combined_x,
                           std::vector<float>* combined_weights) {
  const int tokens = all[home].numTokens;
  const int hidden = shape.hidden;
  combined_x->assign(static_cast<size_t>(tokens) * hidden, 0);
  combined_weights->assign(static_cast<size_t>(tokens) * shape.topk, 0.0f);
  std::vector<float> sum(hidden);
  std::vector<float> weight_sum(shape.topk);
  for (int t = 0; t < tokens; ++t) {
    std::fill(sum.begin(), sum.end(), 0.0f);
    std::fill(weight_sum.begin(), weight_sum.end(), 0.0f);
    for (int r = 0; r < shape.nranks; ++r) {
      const ReferenceDispatch& received = dispatches[r];
      for (int row = 0; row < received.NumRows(); ++row) {
        if (received.sources[row].rank != home || received.sources[row].token != t) continue;
        for (int h = 0; h < hidden; ++h) sum[h] += Bf16ToFloat(inputs[r].x[static_cast<size_t>(row) * hidden + h]);
        for (int k = 0; k < shape.topk; ++k)
          weight_sum[k] += inputs[r].topkWeights[static_cast<size_t>(row) * shape.topk + k];
      }
    }
    for (int h = 0; h < hidden; ++h) {
      float total = sum[h];
      if (bias != nullptr) total += Bf16ToFloat((*bias)[static_cast<size_t>(t) * hidden + h]);
      (*combined_x)[static_cast<size_t>(t) * hidden + h] = FloatToBf16(total);
    }
    for (int k = 0; k < shape.topk; ++k) (*combined_weights)[static_cast<size_t>(t) * shape.topk + k] = weight_sum[k];
  }
}

// ---------------------------------------------------------------------------------------
// Low-latency dispatch and combine.
// ---------------------------------------------------------------------------------------

// What one rank receives from a low-latency dispatch: per local expert, the (source rank,
// token) of every row in slot order. masked[r] = 1 leaves rank r's tokens out.
struct ReferenceLowLatency {
  std::vector<std::vector<SourceToken>> rowsPerExpert;  // [E/R][count]
};

inline ReferenceLowLatency ComputeLowLatencyRows(const EpShape& shape, const std::vector<RankInputs>& all, int receiver,
                                                 const std::vector<int>& masked) {
  ReferenceLowLatency out;
  const int local_experts = shape.ExpertsPerRank();
  out.rowsPerExpert.resize(local_experts);
  for (int local = 0; local < local_experts; ++local) {
    const int64_t expert = static_cast<int64_t>(receiver) * local_experts + local;
    for (int src = 0; src < shape.nranks; ++src) {
      if (masked[src]) continue;
      for (int t = 0; t < all[src].numTokens; ++t) {
        for (int k = 0; k < shape.topk; ++k) {
          if (all[src].topkIdx[static_cast<size_t>(t) * shape.topk + k] == expert) {
            out.rowsPerExpert[local].push_back({src, t});
            break;
          }
        }
      }
    }
  }
  return out;
}

// The slot of (home, token) in expert `expert`'s rows on its owner, or -1.
inline int FindLowLatencySlot(const EpShape& shape, const std::vector<ReferenceLowLatency>& per_rank, int64_t expert,
                              int home, int token) {
  const int owner = shape.OwnerOf(expert);
  const auto& rows = per_rank[owner].rowsPerExpert[expert % shape.ExpertsPerRank()];
  for (size_t slot = 0; slot < rows.size(); ++slot) {
    if (rows[slot].rank == home && rows[slot].token == token) return static_cast<int>(slot);
  }
  return -1;
}

// out[t] = bf16(acc) with acc = +0.0f, then for k ascending acc = fmaf(w[t,k], float(x_owner[local
// expert, slot]), acc), skipping -1 entries and experts on masked ranks. expert_outputs[r] is rank
// r's combine input in the dispatch layout [E/R, R*maxT, H].
//
// per_rank (MOECOMM_LL_PER_RANK_COMBINE; w are then the dispatch's weights): the same entries,
// summed per owner rank first. partial_r = that chain over only the entries whose expert is on
// rank r, rounded to BF16; out[t] = bf16(((+0.0f + partial_r0) + partial_r1) + ...) over the
// ranks r ascending that have at least one such entry.
inline std::vector<uint16_t> ComputeLowLatencyCombine(const EpShape& shape, const std::vector<RankInputs>& all,
                                                      const std::vector<ReferenceLowLatency>& per_rank,
                                                      const std::vector<std::vector<uint16_t>>& expert_outputs,
                                                      const std::vector<float>& weights, int home,
                                                      const std::vector<int>& masked, bool per_rank_sum = false) {
  const RankInputs& in = all[home];
  const int hidden = shape.hidden;
  const size_t rows_per_expert = static_cast<size_t>(shape.nranks) * shape.maxTokensPerRank;
  std::vector<uint16_t> out(static_cast<size_t>(in.numTokens) * hidden);
  // [owner rank][H] partial sums (the per-entry form uses owner 0 for everything).
  const int partials = per_rank_sum ? shape.nranks : 1;
  std::vector<std::vector<float>> sum(partials, std::vector<float>(hidden));
  std::vector<bool> used(partials);
  for (int t = 0; t < in.numTokens; ++t) {
    for (int p = 0; p < partials; ++p) {
      std::fill(sum[p].begin(), sum[p].end(), 0.0f);
      used[p] = false;
    }
    for (int k = 0; k < shape.topk; ++k) {
      const size_t entry = static_cast<size_t>(t) * shape.topk + k;
      const int64_t expert = in.topkIdx[entry];
      if (expert < 0 || masked[shape.OwnerOf(expert)]) continue;
      const int owner = shape.OwnerOf(expert);
      const int slot = FindLowLatencySlot(shape, per_rank, expert, home, t);
      if (slot < 0) continue;  // not placed: only when home itself is masked (its outputs are not checked)
      const size_t row = (static_cast<size_t>(expert % shape.ExpertsPerRank()) * rows_per_expert + slot) * hidden;
      std::vector<float>& target = sum[per_rank_sum ? owner : 0];
      used[per_rank_sum ? owner : 0] = true;
      for (int h = 0; h < hidden; ++h) {
        // One fused multiply-add per entry (a single rounding), as a GPU's fma computes it.
        target[h] = std::fma(weights[entry], Bf16ToFloat(expert_outputs[owner][row + h]), target[h]);
      }
    }
    for (int h = 0; h < hidden; ++h) {
      float total = sum[0][h];
      if (per_rank_sum) {
        total = 0.0f;
        for (int r = 0; r < shape.nranks; ++r) {
          if (used[r]) total += Bf16ToFloat(FloatToBf16(sum[r][h]));
        }
      }
      out[static_cast<size_t>(t) * hidden + h] = FloatToBf16(total);
    }
  }
  return out;
}

}  // namespace moecomm_mp
