// The low-latency check (-c 1): what one rank must get from one low-latency dispatch and one
// combine on fresh inputs, computed with the contract's host reference
// (src/ep/host_reference.h) from every rank's inputs, which every rank regenerates
// (workload.h). Outputs are poisoned before the checked call and compared whole, so slots the
// contract leaves unwritten must still hold the poison.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "options.h"
#include "workload.h"

namespace moecomm_bench {

// The byte every low-latency output is filled with before a checked call (for the int
// outputs: -1; for BF16 and FP32: a NaN).
constexpr uint8_t kLowLatencyPoison = 0xff;

// A seed of the check's own, so its inputs differ from the timed runs' (stale outputs of a
// timed run cannot pass for the checked call's). round tells checks of one run apart.
uint64_t LowLatencyCheckSeed(uint64_t seed, int round);

struct LowLatencyExpected {
  Routing routing;                  // this rank's inputs: routing and weights,
  Tokens tokens;                    // and BF16 tokens
  size_t rowsPerExpert = 0;         // R * maxT: the slots of one local expert
  size_t rowBytes = 0;              // recvX bytes per slot: H (FP8) or 2H (BF16)
  size_t scaleBytes = 0;            // recvScales bytes per slot: 4 * H/128 (FP8) or 0
  std::vector<int> recvCount;       // [E_local]
  std::vector<uint8_t> recvX;       // [E_local, R*maxT] slots of rowBytes, poison beyond recvCount
  std::vector<uint8_t> recvScales;  // [E_local, R*maxT] slots of scaleBytes (FP32), poison beyond
  std::vector<int> recvSrcInfo;     // [E_local, R*maxT]: src rank * maxT + src token, -1 beyond
  std::vector<uint16_t> combined;   // [T, H] BF16, with the combine input of LowLatencyExpertRows
                                    // (per expert rank first with options.llPerRank)
};

// options.seed is the check's seed (LowLatencyCheckSeed); options.dtype the type dispatch casts
// to. No rank is masked.
LowLatencyExpected ExpectLowLatency(const Options& options, int nranks, int rank);

// The combine input ("expert outputs") the check feeds on rank `rank`: slot s of local expert
// le holds, in channel h, a BF16 hashed from (seed, rank, le, s, h) in about [-4, 4]. A pure
// function of the row's place, so a selection combined from a wrong row shows; slots at or
// beyond recvCount hold the poison (a BF16 NaN), so reading one shows too.
// Fills *rows with `count` slots [count, H] of local expert le.
void LowLatencyExpertRows(const Options& options, int rank, int localExpert, int count, std::vector<uint16_t>* rows);

// Element-by-element comparison that counts every mismatch and names the first few.
class MismatchLog {
 public:
  // Compares `elements` elements of elementBytes bytes; label(i) names element i.
  template <typename Label>
  void Compare(const void* got, const void* want, size_t elements, size_t elementBytes, const Label& label) {
    const uint8_t* g = static_cast<const uint8_t*>(got);
    const uint8_t* w = static_cast<const uint8_t*>(want);
    for (size_t i = 0; i < elements; ++i) {
      if (Same(g + i * elementBytes, w + i * elementBytes, elementBytes)) continue;
      if (mismatches_++ < kShown) Note(label(i), g + i * elementBytes, w + i * elementBytes, elementBytes);
    }
    compared_ += elements;
  }
  bool Ok() const { return mismatches_ == 0; }
  // "<what>: N of M elements differ [first ...]".
  std::string Message(const std::string& what) const;

 private:
  static constexpr int kShown = 3;
  static bool Same(const uint8_t* a, const uint8_t* b, size_t bytes);
  void Note(const std::string& where, const uint8_t* got, const uint8_t* want, size_t bytes);

  int64_t mismatches_ = 0;
  int64_t compared_ = 0;
  std::string shown_;
};

}  // namespace moecomm_bench
