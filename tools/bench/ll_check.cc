#include "ll_check.h"

#include <cstdio>
#include <cstring>

#include "ep/host_reference.h"
#include "numeric.h"

namespace moecomm_bench {
namespace {

namespace ref = moecomm::reference;

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint16_t ExpertValue(uint64_t seed, int rank, int localExpert, int slot, int channel) {
  const uint64_t bits =
      Mix(Mix(seed ^ (static_cast<uint64_t>(rank) << 48) ^ (static_cast<uint64_t>(localExpert) << 32)) ^
          (static_cast<uint64_t>(slot) << 24) ^ static_cast<uint64_t>(channel));
  return FloatToBf16(static_cast<float>(static_cast<int>(bits & 0xffff) - 32768) / 8192.0f);
}

ref::EpShape Shape(const Options& options, int nranks) {
  ref::EpShape shape;
  shape.numRanks = nranks;
  shape.numExperts = options.experts;
  shape.hidden = options.hidden;
  shape.topk = options.topk;
  shape.maxTokensPerRank = options.tokens;
  return shape;
}

std::vector<uint16_t> Bf16Values(const Tokens& tokens) {
  std::vector<uint16_t> values(tokens.x.size() / 2);
  if (!values.empty()) std::memcpy(values.data(), tokens.x.data(), tokens.x.size());
  return values;
}

// The combine of rank `rank`: each valid selection (t, k) of expert e on rank r adds the
// expert output of the slot its token took in e's rows there (the reference's slot
// arithmetic over every rank's placement counts), in the reference's fmaf order; with
// --ll-per-rank summed per expert rank first (lowLatencyCombineRowsPerRank).
std::vector<uint16_t> ExpectCombined(const Options& options, const ref::EpShape& shape, int rank,
                                     const std::vector<Routing>& routings) {
  const int R = shape.numRanks, E = shape.numExperts, L = shape.expertsPerRank(), H = shape.hidden;
  std::vector<int> placementAll(static_cast<size_t>(R) * E);
  for (int r = 0; r < R; ++r) {
    ref::lowLatencyPlacementCounts(shape, routings[r].topkIdx.data(), routings[r].tokens,
                                   placementAll.data() + static_cast<size_t>(r) * E);
  }
  const Routing& mine = routings[rank];
  const size_t selections = static_cast<size_t>(mine.tokens) * shape.topk;
  std::vector<int> slots(selections);
  ref::lowLatencySelectionSlots(shape, rank, mine.topkIdx.data(), mine.tokens, placementAll.data(), nullptr,
                                slots.data());
  std::vector<uint16_t> storage(selections * H);
  std::vector<const uint16_t*> rows(selections, nullptr);
  for (size_t i = 0; i < selections; ++i) {
    const int64_t expert = mine.topkIdx[i];
    if (expert < 0 || slots[i] < 0) continue;
    uint16_t* row = &storage[i * H];
    for (int h = 0; h < H; ++h) {
      row[h] = ExpertValue(options.seed, shape.rankOfExpert(expert), static_cast<int>(expert % L), slots[i], h);
    }
    rows[i] = row;
  }
  std::vector<uint16_t> out(static_cast<size_t>(mine.tokens) * H);
  if (options.llPerRank) {
    ref::lowLatencyCombineRowsPerRank(shape, mine.tokens, mine.topkIdx.data(), mine.topkWeights.data(), rows.data(),
                                      out.data());
  } else {
    ref::lowLatencyCombineRows(shape, mine.tokens, mine.topkWeights.data(), rows.data(), out.data());
  }
  return out;
}

}  // namespace

uint64_t LowLatencyCheckSeed(uint64_t seed, int round) {
  return Mix(seed ^ 0x6c6c2d636865636bull) + static_cast<uint64_t>(round);  // "ll-check"
}

LowLatencyExpected ExpectLowLatency(const Options& options, int nranks, int rank) {
  const ref::EpShape shape = Shape(options, nranks);
  const bool fp8 = options.dtype == DispatchType::kFp8;
  std::vector<Routing> routings;
  std::vector<std::vector<uint16_t>> xs;
  std::vector<ref::LowLatencySource> sources(nranks);
  for (int r = 0; r < nranks; ++r) {
    routings.push_back(GenerateRouting(options, r));
    xs.push_back(Bf16Values(GenerateTokens(options, DispatchType::kBf16, r)));
  }
  for (int r = 0; r < nranks; ++r) {
    sources[r].numTokens = routings[r].tokens;
    sources[r].topkIdx = routings[r].topkIdx.data();
    sources[r].x = xs[r].data();
  }

  LowLatencyExpected want;
  want.routing = routings[rank];
  want.tokens = GenerateTokens(options, DispatchType::kBf16, rank);
  want.rowsPerExpert = static_cast<size_t>(shape.lowLatencySlotsPerExpert());
  want.rowBytes = static_cast<size_t>(options.hidden) * (fp8 ? 1 : 2);
  want.scaleBytes = fp8 ? 4 * static_cast<size_t>(shape.scalesPerRow()) : 0;
  const size_t slots = static_cast<size_t>(shape.expertsPerRank()) * want.rowsPerExpert;
  want.recvCount.assign(shape.expertsPerRank(), -1);
  want.recvX.assign(slots * want.rowBytes, kLowLatencyPoison);
  want.recvScales.assign(slots * want.scaleBytes, kLowLatencyPoison);
  want.recvSrcInfo.assign(slots, -1);

  ref::LowLatencyDispatchOutput out;
  out.recvType = fp8 ? moecommFloat8E4M3 : moecommBfloat16;
  out.recvX = want.recvX.data();
  out.recvScales = fp8 ? want.recvScales.data() : nullptr;
  out.recvCount = want.recvCount.data();
  out.recvSrcInfo = want.recvSrcInfo.data();
  ref::lowLatencyPack(shape, rank, sources.data(), nullptr, out);
  want.combined = ExpectCombined(options, shape, rank, routings);
  return want;
}

void LowLatencyExpertRows(const Options& options, int rank, int localExpert, int count, std::vector<uint16_t>* rows) {
  rows->resize(static_cast<size_t>(count) * options.hidden);
  for (int slot = 0; slot < count; ++slot) {
    for (int h = 0; h < options.hidden; ++h) {
      (*rows)[static_cast<size_t>(slot) * options.hidden + h] = ExpertValue(options.seed, rank, localExpert, slot, h);
    }
  }
}

bool MismatchLog::Same(const uint8_t* a, const uint8_t* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

void MismatchLog::Note(const std::string& where, const uint8_t* got, const uint8_t* want, size_t bytes) {
  uint64_t g = 0, w = 0;
  std::memcpy(&g, got, bytes < 8 ? bytes : 8);
  std::memcpy(&w, want, bytes < 8 ? bytes : 8);
  char text[96];
  std::snprintf(text, sizeof(text), ": got 0x%llx want 0x%llx]", static_cast<unsigned long long>(g),
                static_cast<unsigned long long>(w));
  shown_ += " [" + where + text;
}

std::string MismatchLog::Message(const std::string& what) const {
  if (mismatches_ == 0) return "";
  return what + ": " + std::to_string(mismatches_) + " of " + std::to_string(compared_) + " elements differ" + shown_;
}

}  // namespace moecomm_bench
