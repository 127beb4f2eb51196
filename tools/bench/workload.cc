#include "workload.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "numeric.h"

namespace moecomm_bench {
namespace {

// splitmix64: tiny, fast and the same on every platform (std distributions are not).
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1].
  double Unit() { return (static_cast<double>(Next() >> 11) + 1.0) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

uint64_t StreamSeed(uint64_t seed, int rank, uint64_t purpose) {
  Random mix(seed * 0x100000001b3ull ^ (static_cast<uint64_t>(rank) << 20) ^ purpose);
  return mix.Next();
}

constexpr uint64_t kRoutingStream = 1;
constexpr uint64_t kTokenStream = 2;
constexpr uint64_t kPopularityStream = 3;

// Per-expert sampling weights: 1 (uniform) or Zipf 1/(popularity rank)^s, with popularity
// ranks shuffled by the seed alone so every rank agrees on which experts are hot.
std::vector<double> ExpertWeights(const Options& options) {
  std::vector<double> weights(options.experts, 1.0);
  if (options.zipf <= 0.0) return weights;
  std::vector<int> order(options.experts);
  std::iota(order.begin(), order.end(), 0);
  Random random(StreamSeed(options.seed, -1, kPopularityStream));
  for (int i = options.experts - 1; i > 0; --i) std::swap(order[i], order[random.Next() % (i + 1)]);
  for (int i = 0; i < options.experts; ++i) weights[order[i]] = 1.0 / std::pow(i + 1.0, options.zipf);
  return weights;
}

}  // namespace

Routing GenerateRouting(const Options& options, int rank) {
  const int experts = options.experts, topk = options.topk;
  Routing routing;
  routing.tokens = options.tokens;
  routing.topk = topk;
  routing.topkIdx.assign(static_cast<size_t>(options.tokens) * topk, -1);
  routing.topkWeights.assign(static_cast<size_t>(options.tokens) * topk, 0.0f);
  const std::vector<double> weights = ExpertWeights(options);
  Random random(StreamSeed(options.seed, rank, kRoutingStream));
  std::vector<double> keys(experts);
  std::vector<int> order(experts);
  for (int t = 0; t < options.tokens; ++t) {
    // Top-k of random scores; with weights this samples without replacement in proportion
    // to the weights (key = log(u) / w, larger wins).
    for (int e = 0; e < experts; ++e) keys[e] = std::log(random.Unit()) / weights[e];
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + topk, order.end(),
                      [&](int a, int b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); });
    // A few tokens lose some entries (-1), a rarer few all of them.
    const double drop = random.Unit();
    int valid = topk;
    if (drop <= 0.004) {
      valid = 0;
    } else if (drop <= 0.02) {
      valid = topk - 1 - static_cast<int>(random.Next() % std::max(1, topk / 2));
    }
    float total = 0.0f;
    for (int k = 0; k < valid; ++k) {
      routing.topkIdx[static_cast<size_t>(t) * topk + k] = order[k];
      total += routing.topkWeights[static_cast<size_t>(t) * topk + k] = static_cast<float>(random.Unit());
    }
    for (int k = 0; k < valid; ++k) routing.topkWeights[static_cast<size_t>(t) * topk + k] /= total;
  }
  return routing;
}

Tokens GenerateTokens(const Options& options, DispatchType type, int rank) {
  Tokens tokens;
  tokens.type = type;
  tokens.tokens = options.tokens;
  tokens.hidden = options.hidden;
  const size_t elements = static_cast<size_t>(options.tokens) * options.hidden;
  Random random(StreamSeed(options.seed, rank, kTokenStream));
  if (type == DispatchType::kFp8) {
    tokens.x.resize(elements);
    for (auto& byte : tokens.x) {
      do {
        byte = static_cast<uint8_t>(random.Next() >> 56);
      } while ((byte & 0x7f) == 0x7f);  // no NaN
    }
    tokens.scales.resize(elements / 128);
    for (auto& scale : tokens.scales) scale = static_cast<float>(0.5 + 1.5 * random.Unit());
  } else {
    tokens.x.resize(elements * 2);
    for (size_t i = 0; i < elements; ++i) {
      const uint16_t value = FloatToBf16(static_cast<float>(8.0 * random.Unit() - 4.0));
      std::memcpy(&tokens.x[2 * i], &value, 2);
    }
  }
  return tokens;
}

size_t DispatchRowBytes(DispatchType type, int hidden) {
  return type == DispatchType::kFp8 ? static_cast<size_t>(hidden) + 4 * (hidden / 128)
                                    : 2 * static_cast<size_t>(hidden);
}

size_t LowLatencySelectionBytes(DispatchType type, int hidden) {
  return type == DispatchType::kFp8 ? static_cast<size_t>(hidden) + 4 * (hidden / 128) + 16
                                    : 2 * static_cast<size_t>(hidden);
}

uint64_t DestinationRanks(const Routing& routing, int token, int nranks, int expertsPerRank) {
  uint64_t mask = 0;
  for (int k = 0; k < routing.topk; ++k) {
    const int64_t expert = routing.topkIdx[static_cast<size_t>(token) * routing.topk + k];
    if (expert >= 0) mask |= 1ull << (expert / expertsPerRank);
  }
  (void)nranks;
  return mask;
}

int64_t ReceivedTokenCount(const Options& options, int nranks, int rank) {
  const int expertsPerRank = options.experts / nranks;
  int64_t rows = 0;
  for (int source = 0; source < nranks; ++source) {
    const Routing routing = GenerateRouting(options, source);
    for (int t = 0; t < routing.tokens; ++t) rows += (DestinationRanks(routing, t, nranks, expertsPerRank) >> rank) & 1;
  }
  return rows;
}

int64_t SelectionCount(const Routing& routing) {
  return std::count_if(routing.topkIdx.begin(), routing.topkIdx.end(), [](int64_t e) { return e >= 0; });
}

std::vector<uint8_t> ExpectedReceivedRows(const Options& options, int nranks, int rank, int64_t* rows) {
  const int expertsPerRank = options.experts / nranks, hidden = options.hidden;
  const size_t rowBytes = DispatchRowBytes(options.dtype, hidden);
  std::vector<uint8_t> out;
  *rows = 0;
  for (int source = 0; source < nranks; ++source) {
    const Routing routing = GenerateRouting(options, source);
    const Tokens tokens = GenerateTokens(options, options.dtype, source);
    for (int t = 0; t < routing.tokens; ++t) {
      if (!((DestinationRanks(routing, t, nranks, expertsPerRank) >> rank) & 1)) continue;
      const size_t at = out.size();
      out.resize(at + rowBytes);
      if (options.dtype == DispatchType::kFp8) {
        std::memcpy(&out[at], &tokens.x[static_cast<size_t>(t) * hidden], hidden);
        std::memcpy(&out[at + hidden], &tokens.scales[static_cast<size_t>(t) * (hidden / 128)], 4 * (hidden / 128));
      } else {
        std::memcpy(&out[at], &tokens.x[static_cast<size_t>(t) * 2 * hidden], 2 * hidden);
      }
      ++*rows;
    }
  }
  return out;
}

void ExpertOutputRow(const uint8_t* packedRow, DispatchType type, int hidden, int rank, uint16_t* out) {
  const float factor = static_cast<float>(rank + 1);
  for (int h = 0; h < hidden; ++h) {
    float value;
    if (type == DispatchType::kFp8) {
      float scale;
      std::memcpy(&scale, packedRow + hidden + 4 * (h / 128), 4);
      value = E4m3ToFloat(packedRow[h]) * scale;
    } else {
      uint16_t bits;
      std::memcpy(&bits, packedRow + 2 * h, 2);
      value = Bf16ToFloat(bits);
    }
    out[h] = FloatToBf16(value * factor);
  }
}

std::vector<uint16_t> ExpectedCombined(const Options& options, int nranks, int rank) {
  const int expertsPerRank = options.experts / nranks, hidden = options.hidden;
  const Routing routing = GenerateRouting(options, rank);
  const Tokens tokens = GenerateTokens(options, options.dtype, rank);
  const size_t rowBytes = DispatchRowBytes(options.dtype, hidden);
  std::vector<uint8_t> packed(rowBytes);
  std::vector<uint16_t> expertOutput(hidden), out(static_cast<size_t>(routing.tokens) * hidden);
  std::vector<float> sum(hidden);
  for (int t = 0; t < routing.tokens; ++t) {
    if (options.dtype == DispatchType::kFp8) {
      std::memcpy(packed.data(), &tokens.x[static_cast<size_t>(t) * hidden], hidden);
      std::memcpy(packed.data() + hidden, &tokens.scales[static_cast<size_t>(t) * (hidden / 128)], 4 * (hidden / 128));
    } else {
      std::memcpy(packed.data(), &tokens.x[static_cast<size_t>(t) * 2 * hidden], 2 * hidden);
    }
    std::fill(sum.begin(), sum.end(), 0.0f);
    const uint64_t destinations = DestinationRanks(routing, t, nranks, expertsPerRank);
    for (int r = 0; r < nranks; ++r) {
      if (!((destinations >> r) & 1)) continue;
      ExpertOutputRow(packed.data(), options.dtype, hidden, r, expertOutput.data());
      for (int h = 0; h < hidden; ++h) sum[h] += Bf16ToFloat(expertOutput[h]);
    }
    for (int h = 0; h < hidden; ++h) out[static_cast<size_t>(t) * hidden + h] = FloatToBf16(sum[h]);
  }
  return out;
}

}  // namespace moecomm_bench
