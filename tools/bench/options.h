// Command-line options of moecomm-bench and the named reference workloads (DESIGN.md).
#pragma once

#include <cstdint>
#include <string>

namespace moecomm_bench {

enum class DispatchType { kFp8, kBf16 };

struct Options {
  std::string workload = "W-prefill";  // W-prefill | W-decode | W-skew | custom
  int tokens = 0;                      // -T tokens per rank (0 = the workload's)
  int hidden = 0;                      // -H
  int topk = 0;                        // -K
  int experts = 0;                     // -E
  double zipf = 0.0;                   // expert popularity exponent (W-skew: 1.2; 0 = uniform)
  DispatchType dtype = DispatchType::kFp8;
  bool dtypeGiven = false;
  uint64_t seed = 1;              // -s
  int iters = 50;                 // -n
  int warmup = 10;                // -W
  int check = 1;                  // -c
  int smBudget = 0;               // -S (0 = the library's default)
  std::string jsonPath;           // -J
  bool lowLatency = false;        // --ll
  bool graph = false;             // --graph
  bool llPerRank = false;         // --ll-per-rank: MOECOMM_LL_PER_RANK_COMBINE (dispatch takes the weights)
  bool symmetricBuffers = false;  // --buffers symmetric: normal-mode recv_x and combine input from moecommMemAlloc
  bool symmetricX = false;        // --buffers symmetric-x: x from moecommMemAlloc too
  bool hostSmoke = false;         // --host-smoke
  bool host = false;              // --host: the host backend on the workload asked for (no GPU needed)
  bool baseline = true;           // --no-baseline turns the NCCL baseline off
  bool roofline = true;           // --no-roofline
  bool flushL2 = true;            // --no-flush keeps the L2 (and its translations) warm between samples
};

// Parses argv; prints usage and returns false on -h or a bad flag (exitCode says which).
bool ParseOptions(int argc, char** argv, Options* options, int* exitCode);

// Fills the workload's shape into the fields not given on the command line, and applies the
// --host-smoke shape. nranks is needed for the smoke's expert count. Throws on bad shapes.
void ResolveWorkload(int nranks, Options* options);

const char* DtypeName(DispatchType type);

}  // namespace moecomm_bench
