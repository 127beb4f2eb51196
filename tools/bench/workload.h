// Workload generation and the host reference of the exchange.
//
// Every rank runs the same generator: rank r's tokens come from (seed, r) alone, so any rank
// can regenerate any other rank's tokens. That is how the checks compute, in-process, what a
// rank must receive and what its combine must return, element by element.
#pragma once

#include <cstdint>
#include <vector>

#include "options.h"

namespace moecomm_bench {

struct Routing {
  int tokens = 0;
  int topk = 0;
  std::vector<int64_t> topkIdx;    // [T,K], -1 = none
  std::vector<float> topkWeights;  // [T,K], 0 where the index is -1
};

// One rank's tokens. FP8: x is [T,H] e4m3 bytes and scales [T,H/128]; BF16: x is [T,H] as
// 2H bytes per row and scales is empty.
struct Tokens {
  DispatchType type = DispatchType::kBf16;
  int tokens = 0;
  int hidden = 0;
  std::vector<uint8_t> x;
  std::vector<float> scales;
};

Routing GenerateRouting(const Options& options, int rank);
Tokens GenerateTokens(const Options& options, DispatchType type, int rank);

// Bytes of one token on the wire in normal dispatch: BF16 2H, FP8 H + 4H/128.
size_t DispatchRowBytes(DispatchType type, int hidden);
// Low-latency dispatch bytes per (token, expert) selection: FP8 H + 4H/128 + 16, BF16 2H.
size_t LowLatencySelectionBytes(DispatchType type, int hidden);

// Bit r set when token t has an expert on rank r.
uint64_t DestinationRanks(const Routing& routing, int token, int nranks, int expertsPerRank);
// Rows rank `rank` receives in normal dispatch (its own tokens included).
int64_t ReceivedTokenCount(const Options& options, int nranks, int rank);
// Valid (token, expert) entries of one rank's routing.
int64_t SelectionCount(const Routing& routing);

// The packed rows rank `rank` must receive (FP8: H payload bytes then H/128 FP32 scales per
// row; BF16: the 2H bytes), ordered by source rank, then source token. Sets *rows.
std::vector<uint8_t> ExpectedReceivedRows(const Options& options, int nranks, int rank, int64_t* rows);

// The combine input the bench feeds on rank `rank` for one received packed row: the "expert
// output" bf16(dequantised value * (rank + 1)), distinct per rank so a row returned to the
// wrong place or from the wrong rank shows. Writes hidden BF16 values.
void ExpertOutputRow(const uint8_t* packedRow, DispatchType type, int hidden, int rank, uint16_t* out);

// What the combine must return to rank `rank`: for each own token, the FP32 sum over the
// receiving ranks in ascending order of their expert outputs, rounded to BF16. [T,H].
std::vector<uint16_t> ExpectedCombined(const Options& options, int nranks, int rank);

}  // namespace moecomm_bench
