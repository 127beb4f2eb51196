// The CUDA EP backend, normal mode, against the pure host reference (src/ep/host_reference.h),
// element by element and bitwise. Runs under `moecomm-run -n N moecomm_gpu_tests
// --gtest_filter=EpCudaNormal.*` (ctest: gpu_EpCudaNormal_n2, gpu_EpCudaNormal_n4).
//
// Every rank generates every rank's inputs from one seed (hashed from MOECOMM_UNIQUE_ID, or
// MOECOMM_TEST_EP_SEED to replay a run), so each computes its own expected outputs locally.
// Each round of a case uses fresh data; every output buffer is poisoned first (kPoison) and
// read back whole afterwards: the first N rows must equal the reference, and everything after
// them, up to a guard past the end of the allocation, must still hold the poison.
//
// Suites (one gtest test each, run in this order; a failing test makes its rank exit, so the
// graph test, which needs device-side sequence numbers, runs last):
//   DtypesAndWeights  BF16 / FP8 x dispatch weights / combine weights x bias
//   Shapes            H in {2048, 2880 (BF16), 4096, 7168} x top-k in {1, 4, 8}, int32 and
//                     int64 ids, exact and worst-case sizing, expert alignment, SM budgets
//   Routing           every token to one expert, a hot expert, ranks with T = 0, tokens (or
//                     whole ranks) whose top-k entries are all -1
//   HandleReuse       several dispatch + combine rounds on one handle, fresh data each round
//   GenericShapes     16-byte rows, H not a multiple of 128, top-k 3 and 32, odd alignment
//   GraphReplay       dispatch (handle reuse) + combine captured in a CUDA graph, replayed
//                     with fresh inputs copied into the same buffers, every replay checked
// One line per case and rank: PASS, or FAIL with the first mismatch.
//
// Knobs (environment, the same on every rank):
//   MOECOMM_TEST_EP_SEED=N            replay the data of an earlier run (its seed is printed)
//   MOECOMM_TEST_EP_CASES=REGEX       run only the cases whose name matches (std::regex_search)
//   MOECOMM_TEST_EP_MAX_TOKENS=N      cap maxTokensPerRank of every case (scripts/gpu-sanitize.sh)
//   MOECOMM_TEST_EP_GRAPH_REPLAYS=N   replays per graph case (default 20)
//   MOECOMM_TEST_EP_CAPTURE_MODE=M    thread (default), relaxed or global
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "core/comm.h"
#include "core/env.h"
#include "core/log.h"
#include "ep/dtype.h"
#include "ep/host_reference.h"
#include "gpu/gpu_common.h"
#include "gpu/nvlink_kernels.h"
#include "moecomm.h"

namespace moecomm_gpu_test {
namespace {

namespace ref = moecomm::reference;

// Every output byte starts as 0xA5. No expected element can equal the poison: generated BF16
// and FP32 values (and every sum of them) have a high byte in 0x30..0x41 or 0xB0..0xC1 (or are
// zero), expert ids are -1 or small, counts are small and non-negative, FP8 inputs never
// contain the byte 0xA5. So an element the kernel did not write is always a mismatch. (0xFF
// would not do: it reads as expert id -1.)
constexpr uint8_t kPoison = 0xA5;
// Allocated after every device buffer and checked to be still poisoned.
constexpr size_t kGuardBytes = 256;
// Case::combineMemory
constexpr int kCudaMalloc = 0;
constexpr int kSymmetric = 1;
constexpr int kSymmetricShifted = 2;
constexpr int kSymmetricXOnly = 3;

// ---- Deterministic data -----------------------------------------------------------------

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A key for one stream of random data: (seed, what, iteration, rank, row).
uint64_t Key(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0, uint64_t d = 0) {
  uint64_t h = Mix(seed);
  for (uint64_t v : {a, b, c, d}) h = Mix(h ^ v);
  return h;
}

struct Rng {
  uint64_t state;
  uint64_t Next() {
    state += 0x9e3779b97f4a7c15ull;
    return Mix(state);
  }
  int Below(int n) { return static_cast<int>(Next() % static_cast<uint64_t>(n)); }
};

enum Tag : uint64_t { kTagRoute = 1, kTagX, kTagScales, kTagWeights, kTagBias, kTagCombineX, kTagCombineW };

// BF16 of magnitude in [2^-7, 2): sign, exponent 120..127, 7 mantissa bits.
uint16_t Bf16Value(uint64_t bits) {
  const uint16_t u = static_cast<uint16_t>(bits);
  return static_cast<uint16_t>((u & 0x8000u) | ((120u + ((u >> 7) & 7u)) << 7) | (u & 0x7fu));
}

// FP32 of magnitude in [2^-7, 2) with a random 23-bit mantissa.
float FloatValue(uint64_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits);
  const uint32_t word = (u & 0x80000000u) | ((120u + ((u >> 23) & 7u)) << 23) | (u & 0x7fffffu);
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}

void FillBf16(uint64_t key, uint16_t* out, size_t n) {
  Rng rng{key};
  for (size_t i = 0; i < n; i += 4) {
    const uint64_t bits = rng.Next();
    for (size_t j = 0; j < 4 && i + j < n; ++j) out[i + j] = Bf16Value(bits >> (16 * j));
  }
}

void FillFloats(uint64_t key, float* out, size_t n) {
  Rng rng{key};
  for (size_t i = 0; i < n; i += 2) {
    const uint64_t bits = rng.Next();
    out[i] = FloatValue(bits);
    if (i + 1 < n) out[i + 1] = FloatValue(bits >> 32);
  }
}

// Any e4m3 byte but NaN (0x7f, 0xff) and the poison.
void FillFp8(uint64_t key, uint8_t* out, size_t n) {
  Rng rng{key};
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t bits = rng.Next();
    for (size_t j = 0; j < 8 && i + j < n; ++j) {
      uint8_t b = static_cast<uint8_t>(bits >> (8 * j));
      if ((b & 0x7f) == 0x7f || b == kPoison) b ^= 1;
      out[i + j] = b;
    }
  }
}

// ---- Cases -------------------------------------------------------------------------------

enum class Route {
  kRandom,     // distinct random experts, about 1 entry in 10 is -1
  kHot,        // like kRandom, but every token also selects expert 1
  kOneExpert,  // every token of every rank selects only expert E-1 (its other entries are -1)
  kSomeNone,   // like kRandom, but about a quarter of the tokens have every entry -1
  kAllNone,    // every entry of every token is -1
};

constexpr unsigned kLastRank = 1u << 31;  // in rank masks: the last rank, whatever R is
constexpr unsigned kAllRanks = ~0u;

struct Case {
  int hidden = 2048;
  int tokens = 256;  // maxTokensPerRank; rank 0 has this many tokens, the others a few fewer
  int topk = 8;
  int experts = 32;
  bool fp8 = false;
  bool idx64 = true;
  int alignment = 1;
  bool exact = false;  // moecommEpNotifyDispatch, then recvCapacity = N; else worst case R * maxT
  bool bias = false;
  bool dispatchWeights = false;  // dispatch topkWeights -> recvTopkWeights
  bool combineWeights = false;   // combine topkWeights -> combinedTopkWeights
  Route route = Route::kRandom;
  unsigned emptyRanks = 0;    // ranks with T = 0
  unsigned silentRanks = 0;   // ranks whose tokens have every entry -1
  int iterations = 1;         // dispatch + combine rounds on one handle, fresh data each round
  bool freshRouting = false;  // (worst-case sizing) each round after the first destroys the handle
                              // and dispatches a new routing on a new one, which takes the
                              // previous handle's pooled routing block (zeroed again)
  bool minimal = false;       // optional outputs NULL; reused-handle rounds pass topkIdx = NULL
  int numSms = 0;             // EP config SM budget (0: MOECOMM_EP_NUM_SMS)
  // Where the combine input and weights live: kCudaMalloc, or moecommMemAlloc memory at the
  // same offset on every rank (kSymmetric: direct combine), at an offset that differs per
  // rank (kSymmetricShifted: staged), or the input there and the weights not
  // (kSymmetricXOnly: staged when the case passes combine weights, direct when it passes
  // none). Results must not depend on it.
  int combineMemory = 0;
  // Where recvX lives: kCudaMalloc, kSymmetric (direct dispatch) or kSymmetricShifted (staged).
  int recvMemory = 0;
  // Where x lives (kCudaMalloc, kSymmetric, kSymmetricShifted), and whether the case runs with
  // MOECOMM_EP_DISPATCH_PULL_X=1: with x at the same offset everywhere the receivers then pull
  // the x rows (pulled dispatch), else the senders push them.
  int xMemory = 0;
  bool pullX = false;
  // Runs with MOECOMM_EP_BALANCED_DISPATCH set (the default is 1): 1 makes a direct dispatch
  // claim tokens across blocks instead of sending each channel's from the channel's own block.
  // With unbalancedRank >= 0 that rank sets 0 and the others 1 (the ranks then agree not to
  // balance); with kEveryRank every rank sets 0.
  static constexpr int kEveryRank = -2;
  bool balanced = false;
  int unbalancedRank = -1;
  // Each round combines twice back to back, with no synchronisation between: first from
  // cudaMalloc copies of the inputs into other outputs (staged), then as configured (with
  // CombineIn(kSymmetric), direct); both results are checked.
  bool stagedCombineFirst = false;
  // Each round dispatches twice back to back, with no synchronisation between: first as
  // configured, then from other inputs (the next round's data) into cudaMalloc outputs, so
  // staged; both results are checked. After a balanced dispatch this is the reuse hazard the
  // balanced protocol must survive (docs/ep-normal-gpu.md, "Balanced dispatch").
  bool stagedDispatchAfter = false;

  Case& Fp8() {
    fp8 = true;
    return *this;
  }
  Case& I32() {
    idx64 = false;
    return *this;
  }
  Case& Align(int a) {
    alignment = a;
    return *this;
  }
  Case& Exact() {
    exact = true;
    return *this;
  }
  Case& Bias() {
    bias = true;
    return *this;
  }
  Case& W(bool dispatch, bool combine) {
    dispatchWeights = dispatch;
    combineWeights = combine;
    return *this;
  }
  Case& Routed(Route r) {
    route = r;
    return *this;
  }
  Case& Empty(unsigned mask) {
    emptyRanks = mask;
    return *this;
  }
  Case& Silent(unsigned mask) {
    silentRanks = mask;
    return *this;
  }
  Case& Rounds(int n) {
    iterations = n;
    return *this;
  }
  Case& FreshRouting() {
    freshRouting = true;
    return *this;
  }
  Case& Minimal() {
    minimal = true;
    return *this;
  }
  Case& Sms(int n) {
    numSms = n;
    return *this;
  }
  Case& CombineIn(int memory) {
    combineMemory = memory;
    return *this;
  }
  Case& RecvIn(int memory) {
    recvMemory = memory;
    return *this;
  }
  Case& PullX(int memory) {
    xMemory = memory;
    pullX = true;
    return *this;
  }
  Case& Balanced(int exceptRank = -1) {
    balanced = true;
    unbalancedRank = exceptRank;
    return *this;
  }
  Case& Unbalanced() { return Balanced(kEveryRank); }
  Case& StagedCombineFirst() {
    stagedCombineFirst = true;
    return *this;
  }
  Case& StagedDispatchAfter() {
    stagedDispatchAfter = true;
    return *this;
  }

  std::string Name() const {
    static const char* const kRoutes[] = {"random", "hot", "one-expert", "some-none", "all-none"};
    auto mask = [](unsigned m) {
      if (m == kAllRanks) return std::string("all");
      std::string text;
      for (int r = 0; r < 31; ++r) {
        if ((m >> r & 1u) != 0) text += (text.empty() ? "" : ",") + std::to_string(r);
      }
      if ((m & kLastRank) != 0) text += text.empty() ? "last" : ",last";
      return text;
    };
    std::string name = "H" + std::to_string(hidden) + " T" + std::to_string(tokens) + " K" + std::to_string(topk) +
                       " E" + std::to_string(experts) + (fp8 ? " fp8" : " bf16") + (idx64 ? " i64" : " i32") + " a" +
                       std::to_string(alignment) + (exact ? " exact" : " worst");
    name += std::string(" w=") + (dispatchWeights ? "d" : "") + (combineWeights ? "c" : "") +
            (dispatchWeights || combineWeights ? "" : "none");
    if (bias) name += " bias";
    name += std::string(" route=") + kRoutes[static_cast<int>(route)];
    if (emptyRanks != 0) name += " empty=" + mask(emptyRanks);
    if (silentRanks != 0) name += " silent=" + mask(silentRanks);
    if (iterations > 1) name += " rounds=" + std::to_string(iterations);
    if (freshRouting) name += " fresh-routing";
    if (minimal) name += " minimal";
    if (numSms != 0) name += " sms=" + std::to_string(numSms);
    static const char* const kMemory[] = {"", " combine-in=symmetric", " combine-in=shifted", " combine-in=x-only"};
    name += kMemory[combineMemory];
    static const char* const kRecvMemory[] = {"", " recv-x=symmetric", " recv-x=shifted"};
    name += kRecvMemory[recvMemory];
    static const char* const kXMemory[] = {"", " x=symmetric", " x=shifted"};
    if (pullX) name += std::string(" pull-x") + kXMemory[xMemory];
    if (balanced) name += unbalancedRank == kEveryRank ? " unbalanced" : " balanced";
    if (unbalancedRank >= 0) name += "-but-rank" + std::to_string(unbalancedRank);
    if (stagedCombineFirst) name += " staged-combine-first";
    if (stagedDispatchAfter) name += " staged-dispatch-after";
    return name;
  }
};

Case C(int hidden, int tokens, int topk, int experts) {
  Case c;
  c.hidden = hidden;
  c.tokens = tokens;
  c.topk = topk;
  c.experts = experts;
  return c;
}

bool InMask(unsigned mask, int rank, int nranks) {
  return (rank < 31 && (mask >> rank & 1u) != 0) || ((mask & kLastRank) != 0 && rank == nranks - 1);
}

int TokensOf(const Case& c, int rank, int nranks) {
  if (InMask(c.emptyRanks, rank, nranks)) return 0;
  return c.tokens - (rank * 37) % (c.tokens / 8 + 1);
}

// ---- The routing of a case: every rank's topkIdx and layout, known on every rank --------

struct Routing {
  std::vector<int> tokens;                   // [R]
  std::vector<std::vector<int64_t>> idx;     // [R][T_r * K]
  std::vector<std::vector<uint8_t>> inRank;  // [R][T_r * R]
  std::vector<int> perRankAll;               // [R source][R destination]
  std::vector<int> perExpertAll;             // [R source][E]
  std::vector<int> recv;                     // [R]: N of each rank
};

Routing MakeRouting(const Case& c, const ref::EpShape& shape, uint64_t seed) {
  const int R = shape.numRanks;
  const int K = c.topk;
  const int64_t hotExpert = 1 % c.experts;
  const int64_t oneExpert = c.experts - 1;
  Routing routing;
  routing.tokens.resize(R);
  routing.idx.resize(R);
  routing.inRank.resize(R);
  routing.perRankAll.resize(static_cast<size_t>(R) * R);
  routing.perExpertAll.resize(static_cast<size_t>(R) * c.experts);
  routing.recv.resize(R);
  for (int r = 0; r < R; ++r) {
    const int T = TokensOf(c, r, R);
    routing.tokens[r] = T;
    std::vector<int64_t>& idx = routing.idx[r];
    idx.assign(static_cast<size_t>(T) * K, -1);
    Rng rng{Key(seed, kTagRoute, r)};
    for (int t = 0; t < T; ++t) {
      int64_t* row = idx.data() + static_cast<size_t>(t) * K;
      const bool none = InMask(c.silentRanks, r, R) || c.route == Route::kAllNone ||
                        (c.route == Route::kSomeNone && rng.Below(4) == 0);
      if (none) continue;
      if (c.route == Route::kOneExpert) {
        row[rng.Below(K)] = oneExpert;
        continue;
      }
      if (c.route == Route::kHot) row[rng.Below(K)] = hotExpert;
      for (int k = 0; k < K; ++k) {
        if (row[k] != -1 || rng.Below(10) == 0) continue;
        for (int attempt = 0; attempt < 100; ++attempt) {
          const int64_t e = rng.Below(c.experts);
          if (std::find(row, row + K, e) == row + K) {
            row[k] = e;
            break;
          }
        }
      }
    }
    routing.inRank[r].resize(static_cast<size_t>(T) * R);
    ref::computeLayout(shape, idx.data(), T, routing.perRankAll.data() + static_cast<size_t>(r) * R,
                       routing.perExpertAll.data() + static_cast<size_t>(r) * c.experts, routing.inRank[r].data());
  }
  for (int r = 0; r < R; ++r) routing.recv[r] = ref::numRecvTokens(shape, routing.perRankAll.data(), r);
  return routing;
}

// ---- One round: this rank's inputs and expected outputs ----------------------------------

struct RoundData {
  // This rank's inputs.
  std::vector<uint8_t> x;          // [T, rowBytes]
  std::vector<float> scales;       // [T, H/128] (FP8)
  std::vector<float> weights;      // [T, K] (dispatch weights)
  std::vector<uint16_t> bias;      // [T, H]
  std::vector<uint16_t> combineX;  // [N, H]
  std::vector<float> combineW;     // [N, K] (combine weights)
  // Expected outputs.
  std::vector<int> perExpert;      // [E/R], aligned
  std::vector<uint8_t> recvX;      // [N, rowBytes]
  std::vector<float> recvScales;   // [N, H/128]
  std::vector<uint8_t> recvIdx;    // [N, K] of the case's index type
  std::vector<float> recvWeights;  // [N, K]
  std::vector<int> srcRank;        // [N] the handle's source of each received row
  std::vector<int> srcIndex;       // [N]
  std::vector<uint16_t> combined;  // [T, H]
  std::vector<float> combinedW;    // [T, K]
};

// Rows of the other ranks are generated only where this rank reads them (row content depends
// only on (seed, round, owner rank, row), so every rank sees the same data).
void MakeRound(const Case& c, const ref::EpShape& shape, const Routing& routing, int me, uint64_t seed, int round,
               RoundData* d) {
  const int R = shape.numRanks;
  const int K = c.topk;
  const int H = c.hidden;
  const size_t rowBytes = static_cast<size_t>(H) * (c.fp8 ? 1 : 2);
  const int spr = H / 128;
  const int N = routing.recv[me];
  const int T = routing.tokens[me];

  // Dispatch: every source's rows bound for this rank (all of them for this rank itself).
  std::vector<std::unique_ptr<uint8_t[]>> xs(R);
  std::vector<std::vector<float>> scales(R), weights(R);
  std::vector<ref::DispatchSource> sources(R);
  for (int s = 0; s < R; ++s) {
    const int Ts = routing.tokens[s];
    xs[s].reset(new uint8_t[std::max<size_t>(1, Ts * rowBytes)]);
    for (int t = 0; t < Ts; ++t) {
      if (s != me && routing.inRank[s][static_cast<size_t>(t) * R + me] == 0) continue;
      uint8_t* row = xs[s].get() + t * rowBytes;
      const uint64_t key = Key(seed, kTagX, round, s, t);
      if (c.fp8) {
        FillFp8(key, row, rowBytes);
      } else {
        FillBf16(key, reinterpret_cast<uint16_t*>(row), H);
      }
    }
    if (c.fp8) {
      scales[s].resize(static_cast<size_t>(Ts) * spr);
      FillFloats(Key(seed, kTagScales, round, s), scales[s].data(), scales[s].size());
    }
    if (c.dispatchWeights) {
      weights[s].resize(static_cast<size_t>(Ts) * K);
      FillFloats(Key(seed, kTagWeights, round, s), weights[s].data(), weights[s].size());
    }
    sources[s].numTokens = Ts;
    sources[s].isTokenInRank = routing.inRank[s].data();
    sources[s].x = xs[s].get();
    sources[s].xScales = c.fp8 ? scales[s].data() : nullptr;
    sources[s].topkIdx = routing.idx[s].data();
    sources[s].topkWeights = c.dispatchWeights ? weights[s].data() : nullptr;
  }
  d->recvX.assign(N * rowBytes, 0);
  d->recvScales.assign(c.fp8 ? static_cast<size_t>(N) * spr : 0, 0.0f);
  std::vector<int64_t> recvIdx64(static_cast<size_t>(N) * K);
  d->recvWeights.assign(c.dispatchWeights ? static_cast<size_t>(N) * K : 0, 0.0f);
  ref::DispatchOutput out;
  out.recvX = d->recvX.data();
  out.recvXScales = c.fp8 ? d->recvScales.data() : nullptr;
  out.recvTopkIdx = recvIdx64.data();
  out.recvTopkWeights = c.dispatchWeights ? d->recvWeights.data() : nullptr;
  d->srcRank.assign(N, -1);
  d->srcIndex.assign(N, -1);
  out.srcRank = d->srcRank.data();
  out.srcIndex = d->srcIndex.data();
  ref::dispatchGather(shape, me, sources.data(), rowBytes, out);
  d->recvIdx.resize(recvIdx64.size() * (c.idx64 ? 8 : 4));
  ref::narrowTopkIdx(recvIdx64.data(), recvIdx64.size(), c.idx64 ? moecommInt64 : moecommInt32, d->recvIdx.data());
  d->perExpert.resize(shape.expertsPerRank());
  ref::recvTokensPerExpert(shape, routing.perExpertAll.data(), me, c.alignment, d->perExpert.data());

  // This rank's dispatch inputs.
  d->x.assign(xs[me].get(), xs[me].get() + T * rowBytes);
  d->scales = scales[me];
  d->weights = weights[me];
  d->bias.resize(c.bias ? static_cast<size_t>(T) * H : 0);
  FillBf16(Key(seed, kTagBias, round, me), d->bias.data(), d->bias.size());

  // Combine: each receiver's rows that hold this rank's tokens (all rows for this rank).
  std::vector<std::unique_ptr<uint16_t[]>> cx(R);
  std::vector<std::vector<float>> cw(R);
  std::vector<ref::CombineSource> receivers(R);
  for (int r = 0; r < R; ++r) {
    const int Nr = routing.recv[r];
    cx[r].reset(new uint16_t[std::max<size_t>(1, static_cast<size_t>(Nr) * H)]);
    const int first = r == me ? 0 : ref::recvRowBase(shape, routing.perRankAll.data(), r, me);
    const int count = r == me ? Nr : routing.perRankAll[me * R + r];
    for (int n = first; n < first + count; ++n) {
      FillBf16(Key(seed, kTagCombineX, round, r, n), cx[r].get() + static_cast<size_t>(n) * H, H);
    }
    if (c.combineWeights) {
      cw[r].resize(static_cast<size_t>(Nr) * K);
      FillFloats(Key(seed, kTagCombineW, round, r), cw[r].data(), cw[r].size());
    }
    receivers[r].x = cx[r].get();
    receivers[r].topkWeights = c.combineWeights ? cw[r].data() : nullptr;
  }
  d->combined.assign(static_cast<size_t>(T) * H, 0);
  d->combinedW.assign(c.combineWeights ? static_cast<size_t>(T) * K : 0, 0.0f);
  ref::combineReduce(shape, me, T, routing.inRank[me].data(), routing.perRankAll.data(), receivers.data(),
                     c.bias ? d->bias.data() : nullptr, d->combined.data(),
                     c.combineWeights ? d->combinedW.data() : nullptr);
  d->combineX.assign(cx[me].get(), cx[me].get() + static_cast<size_t>(N) * H);
  d->combineW = cw[me];
}

// ---- Device buffers ------------------------------------------------------------------------

std::string CudaText(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// `bytes` usable bytes followed by kGuardBytes of guard; never a null pointer, even for 0 bytes.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (symmetricComm_ != nullptr) {
      (void)moecommMemFree(symmetricComm_, symmetricBase_);  // collective: every rank frees its own
    } else if (ptr_ != nullptr && cudaFree(ptr_) != cudaSuccess) {
      (void)cudaGetLastError();
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  cudaError_t Allocate(size_t bytes) {
    bytes_ = bytes;
    return cudaMalloc(&ptr_, bytes + kGuardBytes);
  }
  // Collective: `bytes` at `shift` bytes into moecommMemAlloc memory of `allocBytes` plus the
  // guard (the same size on every rank; shift + bytes must fit in allocBytes). The error text
  // is moecommGetLastError's.
  std::string AllocateSymmetric(moecommComm_t comm, size_t bytes, size_t allocBytes, size_t shift) {
    bytes_ = bytes;
    if (moecommMemAlloc(comm, &symmetricBase_, allocBytes + kGuardBytes) != moecommSuccess)
      return std::string("moecommMemAlloc: ") + moecommGetLastError(comm);
    symmetricComm_ = comm;
    ptr_ = static_cast<uint8_t*>(symmetricBase_) + shift;
    return "";
  }
  cudaError_t Poison(cudaStream_t stream) const { return cudaMemsetAsync(ptr_, kPoison, bytes_ + kGuardBytes, stream); }
  template <typename T>
  cudaError_t Upload(const std::vector<T>& host, cudaStream_t stream) const {
    const size_t bytes = host.size() * sizeof(T);
    if (bytes > bytes_) return cudaErrorInvalidValue;
    return bytes == 0 ? cudaSuccess : cudaMemcpyAsync(ptr_, host.data(), bytes, cudaMemcpyHostToDevice, stream);
  }
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  moecommComm_t symmetricComm_ = nullptr;  // set: ptr_ lies in moecommMemAlloc memory at symmetricBase_
  void* symmetricBase_ = nullptr;
};

std::string Hex(const uint8_t* bytes, size_t n) {
  uint64_t v = 0;
  std::memcpy(&v, bytes, std::min<size_t>(n, 8));
  char text[32];
  std::snprintf(text, sizeof(text), "0x%0*llx", static_cast<int>(2 * std::min<size_t>(n, 8)),
                static_cast<unsigned long long>(v));
  return text;
}

// Reads back all of `buffer` (its bytes and the guard). The first wantBytes must equal `want`,
// compared per element of elemBytes (rowElems per row, for the message); every byte after
// them must still be the poison. Returns "" or the first difference.
std::string CompareOutput(const std::string& what, const void* want, size_t wantBytes, size_t elemBytes,
                          size_t rowElems, const DeviceBuffer& buffer) {
  const size_t total = buffer.bytes() + kGuardBytes;
  if (wantBytes > buffer.bytes()) return what + ": test error, buffer smaller than the expected output";
  std::vector<uint8_t> got(total);
  const cudaError_t err = cudaMemcpy(got.data(), buffer.get(), total, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) return what + ": cudaMemcpy to the host failed: " + CudaText(err);
  const uint8_t* expected = static_cast<const uint8_t*>(want);
  size_t wrong = 0, first = 0;
  for (size_t e = 0; e < wantBytes / elemBytes; ++e) {
    if (std::memcmp(got.data() + e * elemBytes, expected + e * elemBytes, elemBytes) == 0) continue;
    if (wrong++ == 0) first = e;
  }
  if (wrong > 0) {
    const std::string at = rowElems > 1
                               ? "[" + std::to_string(first / rowElems) + "][" + std::to_string(first % rowElems) + "]"
                               : "[" + std::to_string(first) + "]";
    const uint8_t* g = got.data() + first * elemBytes;
    const bool poisoned = std::all_of(g, g + elemBytes, [](uint8_t b) { return b == kPoison; });
    return what + at + ": got " + Hex(g, elemBytes) + (poisoned ? " (never written)" : "") + " expected " +
           Hex(expected + first * elemBytes, elemBytes) + " (" + std::to_string(wrong) + " of " +
           std::to_string(wantBytes / elemBytes) + " elements differ)";
  }
  for (size_t i = wantBytes; i < total; ++i) {
    if (got[i] == kPoison) continue;
    return what + ": byte " + std::to_string(i) + " is written (" + Hex(&got[i], 1) + ") but only the first " +
           std::to_string(wantBytes) + " bytes may be" +
           (i >= buffer.bytes() ? " (past the end of the buffer, in the guard)" : " (rows beyond N)");
  }
  return "";
}

// ---- Test-side agreement between ranks (through the communicator's bootstrap) -------------

// True when every rank passes true; *firstBad gets the lowest rank that passed false.
bool AllRanks(moecommComm_t comm, bool mine, int* firstBad) {
  std::vector<int32_t> all(comm->nranks, 0);
  const int32_t flag = mine ? 1 : 0;
  *firstBad = -1;
  if (comm->bootstrap->allgather(&flag, all.data(), sizeof(int32_t)) != moecommSuccess) return false;
  for (int r = 0; r < comm->nranks; ++r) {
    if (all[r] == 0) {
      *firstBad = r;
      return false;
    }
  }
  return true;
}

const char* EnvText(const char* name) {
  const char* text = std::getenv(name);
  return text != nullptr && *text != '\0' ? text : nullptr;
}

// The library's EP log of one case, at INFO, into a file of this process: the normal calls log
// when they start or stop taking the direct paths ("normal combine is direct ..."), which is how
// a case learns which path ran (the results are the same by design). Inactive when the caller
// set MOECOMM_DEBUG (its logging is left alone); restores the variables it changed.
class EpLogCapture {
 public:
  explicit EpLogCapture(bool wanted) : active_(wanted && EnvText("MOECOMM_DEBUG") == nullptr) {
    if (!active_) return;
    path_ = ::testing::TempDir() + "moecomm_ep_log_" + std::to_string(getpid()) + ".txt";
    std::remove(path_.c_str());
    for (const char* name : {"MOECOMM_DEBUG_SUBSYS", "MOECOMM_DEBUG_FILE"}) {
      const char* old = std::getenv(name);
      saved_.emplace_back(name, old != nullptr ? std::make_unique<std::string>(old) : nullptr);
    }
    setenv("MOECOMM_DEBUG", "INFO", 1);
    setenv("MOECOMM_DEBUG_SUBSYS", "EP", 1);
    setenv("MOECOMM_DEBUG_FILE", path_.c_str(), 1);
    moecomm::logReconfigure();
  }
  ~EpLogCapture() { (void)Finish(); }
  EpLogCapture(const EpLogCapture&) = delete;
  EpLogCapture& operator=(const EpLogCapture&) = delete;
  bool active() const { return active_; }
  // Stops capturing (once) and returns what was logged.
  std::string Finish() {
    if (!active_ || finished_) return text_;
    finished_ = true;
    unsetenv("MOECOMM_DEBUG");
    for (const auto& entry : saved_) {
      if (entry.second != nullptr) {
        setenv(entry.first.c_str(), entry.second->c_str(), 1);
      } else {
        unsetenv(entry.first.c_str());
      }
    }
    moecomm::logReconfigure();  // closes the file: everything is written
    if (FILE* file = std::fopen(path_.c_str(), "r")) {
      char buffer[4096];
      size_t n = 0;
      while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) text_.append(buffer, n);
      std::fclose(file);
    }
    std::remove(path_.c_str());
    return text_;
  }

 private:
  bool active_ = false;
  bool finished_ = false;
  std::string path_;
  std::string text_;
  std::vector<std::pair<std::string, std::unique_ptr<std::string>>> saved_;
};

// Sets an environment variable for its lifetime (name nullptr: nothing), then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name != nullptr ? name : "") {
    if (name == nullptr) return;
    const char* old = std::getenv(name);
    if (old != nullptr) old_ = std::make_unique<std::string>(old);
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (name_.empty()) return;
    if (old_ != nullptr) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::unique_ptr<std::string> old_;
};

int EnvInt(const char* name, int fallback) {
  const char* text = EnvText(name);
  return text != nullptr ? std::atoi(text) : fallback;
}

// ---- One case ------------------------------------------------------------------------------

class CaseRunner {
 public:
  CaseRunner(moecommComm_t comm, const Case& c, uint64_t seed)
      : comm_(comm), c_(c), seed_(seed), R_(comm->nranks), me_(comm->rank) {
    shape_.numRanks = R_;
    shape_.numExperts = c.experts;
    shape_.hidden = c.hidden;
    shape_.topk = c.topk;
    shape_.maxTokensPerRank = c.tokens;
    L_ = c.experts / R_;
    rowBytes_ = static_cast<size_t>(c.hidden) * (c.fp8 ? 1 : 2);
    spr_ = c.hidden / 128;
    idxBytes_ = c.idx64 ? 8 : 4;
  }
  ~CaseRunner() {
    if (graphExec_ != nullptr) cudaGraphExecDestroy(graphExec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
    if (handle_ != nullptr) moecommEpHandleDestroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  CaseRunner(const CaseRunner&) = delete;
  CaseRunner& operator=(const CaseRunner&) = delete;

  // Dispatch + combine rounds (with the layout check and, for exact sizing, the notify).
  std::string Run();
  // After Run or RunGraph, given the case's EP log (EpLogCapture): whether the dispatch and
  // combine took the direct paths exactly when this case's buffers, routing and the
  // environment say they must (docs/ep-normal-gpu.md, "Direct dispatch and combine"); the
  // first mismatch, or "".
  std::string CheckDirectPaths(const std::string& log) const;
  // Eager dispatch + combine, then a captured dispatch (reusing the handle) + combine
  // replayed `replays` times with fresh inputs, then one more eager round.
  std::string RunGraph(int replays, cudaStreamCaptureMode mode);

 private:
  bool Setup();
  void Finish();
  void Fail(const std::string& text) {
    if (why_.empty()) why_ = text;
  }
  void Check(const std::string& text) {
    if (!text.empty()) Fail(text);
  }
  void CudaCheck(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) Fail(what + ": " + CudaText(err));
  }
  void CheckAsync(const std::string& tag);
  void CheckLayout();
  void Notify();
  void Prepare(int round);     // fresh data uploaded, outputs poisoned (async on stream_)
  void NewRouting(int round);  // Case::freshRouting: the handle destroyed, round's routing uploaded
  void UploadTopkIdx();
  // second: the stagedDispatchAfter call's inputs and outputs.
  moecommEpDispatchArgs_t DispatchArgs(bool passTopkIdx, bool second = false) const;
  // plain: the cudaMalloc copies of the combine inputs and their own outputs (stagedCombineFirst).
  moecommEpCombineArgs_t CombineArgs(bool plain = false) const;
  bool Dispatch(const std::string& tag, bool passTopkIdx, bool second = false);
  bool Combine(const std::string& tag, bool plain = false);
  void CheckDispatch(const std::string& tag, bool second = false);
  void CheckSources(const std::string& tag);
  void CheckCombine(const std::string& tag, bool plain = false);
  int Capacity() const { return c_.exact ? N_ : R_ * c_.tokens; }

  moecommComm_t comm_;
  Case c_;
  uint64_t seed_;
  int R_, me_;
  ref::EpShape shape_;
  int L_ = 1;
  size_t rowBytes_ = 0;
  int spr_ = 0;
  size_t idxBytes_ = 8;
  Routing routing_;
  int T_ = 0, N_ = 0;
  RoundData d_;
  RoundData d2_;  // stagedDispatchAfter: the second dispatch's data
  std::string why_;
  moecommResult_t asyncBefore_ = moecommSuccess;

  cudaStream_t stream_ = nullptr;
  moecommEp_t ep_ = nullptr;
  moecommEpHandle_t handle_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t graphExec_ = nullptr;
  // Inputs.
  DeviceBuffer idx_, x_, scales_, weights_, bias_, combineX_, combineW_;
  // Outputs.
  DeviceBuffer recvX_, recvScales_, recvIdx_, recvW_, numRecv_, perExpert_, combined_, combinedW_;
  // stagedCombineFirst: cudaMalloc copies of the combine inputs, and that combine's outputs.
  DeviceBuffer plainX_, plainW_, plainCombined_, plainCombinedW_;
  // stagedDispatchAfter: the second dispatch's inputs and its cudaMalloc outputs.
  DeviceBuffer x2_, scales2_, weights2_, recvX2_, recvScales2_, recvIdx2_, recvW2_;
  DeviceBuffer layoutRank_, layoutExpert_, layoutInRank_;
};

bool CaseRunner::Setup() {
  if (c_.freshRouting && c_.exact) {
    Fail("a fresh-routing case needs worst-case sizing (its buffers are sized once)");
    return false;
  }
  routing_ = MakeRouting(c_, shape_, seed_);
  T_ = routing_.tokens[me_];
  N_ = routing_.recv[me_];
  moecommCommGetAsyncError(comm_, &asyncBefore_);
  CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");

  const size_t T = T_, K = c_.topk, H = c_.hidden, cap = Capacity();
  struct Plan {
    DeviceBuffer* buffer;
    size_t bytes;
  };
  const Plan plans[] = {
      {&idx_, T * K * idxBytes_},
      {&x_, T * rowBytes_},
      {&scales_, T * spr_ * 4},
      {&weights_, T * K * 4},
      {&bias_, T * H * 2},
      {&combineX_, cap * H * 2},
      {&combineW_, cap * K * 4},
      {&recvX_, cap * rowBytes_},
      {&recvScales_, cap * spr_ * 4},
      {&recvIdx_, cap * K * idxBytes_},
      {&recvW_, cap * K * 4},
      {&numRecv_, 4},
      {&perExpert_, 4 * static_cast<size_t>(L_)},
      {&combined_, T * H * 2},
      {&combinedW_, T * K * 4},
      {&plainX_, c_.stagedCombineFirst ? cap * H * 2 : 0},
      {&plainW_, c_.stagedCombineFirst ? cap * K * 4 : 0},
      {&plainCombined_, c_.stagedCombineFirst ? T * H * 2 : 0},
      {&plainCombinedW_, c_.stagedCombineFirst ? T * K * 4 : 0},
      {&x2_, c_.stagedDispatchAfter ? T * rowBytes_ : 0},
      {&scales2_, c_.stagedDispatchAfter ? T * spr_ * 4 : 0},
      {&weights2_, c_.stagedDispatchAfter ? T * K * 4 : 0},
      {&recvX2_, c_.stagedDispatchAfter ? cap * rowBytes_ : 0},
      {&recvScales2_, c_.stagedDispatchAfter ? cap * spr_ * 4 : 0},
      {&recvIdx2_, c_.stagedDispatchAfter ? cap * K * idxBytes_ : 0},
      {&recvW2_, c_.stagedDispatchAfter ? cap * K * 4 : 0},
      {&layoutRank_, 4 * static_cast<size_t>(R_)},
      {&layoutExpert_, 4 * static_cast<size_t>(c_.experts)},
      {&layoutInRank_, T * R_},
  };
  for (const Plan& plan : plans) {
    if (c_.combineMemory != kCudaMalloc && (plan.buffer == &combineX_ || plan.buffer == &combineW_)) continue;
    if (c_.recvMemory != kCudaMalloc && plan.buffer == &recvX_) continue;
    if (c_.xMemory != kCudaMalloc && plan.buffer == &x_) continue;
    CudaCheck(plan.buffer->Allocate(plan.bytes), "cudaMalloc");
  }
  // Collective allocations of `rows` rows, the same size everywhere (room for `most` rows, the
  // most any rank can need); shifted: rank r's buffer starts 256 * (r + 1) bytes in, so no two
  // ranks' offsets match.
  auto symmetric = [&](DeviceBuffer* buffer, int memory, size_t rowBytes, size_t rows, size_t most) {
    const bool shifted = memory == kSymmetricShifted;
    const size_t shift = shifted ? 256 * static_cast<size_t>(me_ + 1) : 0;
    const size_t room = shifted ? 256 * static_cast<size_t>(R_) : 0;
    const std::string failed = buffer->AllocateSymmetric(comm_, rows * rowBytes, most * rowBytes + room, shift);
    if (!failed.empty()) Fail(failed);
  };
  const size_t mostRecv = static_cast<size_t>(R_) * c_.tokens;  // the largest capacity, R * maxT rows
  if (c_.combineMemory != kCudaMalloc) {
    symmetric(&combineX_, c_.combineMemory, H * 2, cap, mostRecv);
    if (c_.combineMemory == kSymmetricXOnly) {
      CudaCheck(combineW_.Allocate(cap * K * 4), "cudaMalloc");
    } else {
      symmetric(&combineW_, c_.combineMemory, K * 4, cap, mostRecv);
    }
  }
  if (c_.recvMemory != kCudaMalloc) symmetric(&recvX_, c_.recvMemory, rowBytes_, cap, mostRecv);
  // x: this rank's T rows, room for the most tokens any rank has
  if (c_.xMemory != kCudaMalloc) symmetric(&x_, c_.xMemory, rowBytes_, T, c_.tokens);
  UploadTopkIdx();
  // Local trouble (an allocation) stops the case on every rank before the first collective.
  int bad = -1;
  if (!AllRanks(comm_, why_.empty(), &bad)) {
    Fail("setup failed on rank " + std::to_string(bad));
    return false;
  }

  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = c_.experts;
  config.hidden = c_.hidden;
  config.maxTokensPerRank = c_.tokens;
  config.topk = c_.topk;
  config.numSms = c_.numSms;
  if (moecommEpCreate(comm_, &config, &ep_) != moecommSuccess) {
    Fail(std::string("moecommEpCreate: ") + moecommGetLastError(comm_));
    ep_ = nullptr;
    return false;
  }
  return true;
}

void CaseRunner::Finish() {
  if (handle_ != nullptr) {
    if (moecommEpHandleDestroy(handle_) != moecommSuccess) {
      Fail(std::string("moecommEpHandleDestroy: ") + moecommGetLastError(comm_));
    }
    handle_ = nullptr;
  }
  if (ep_ != nullptr && moecommEpDestroy(ep_) != moecommSuccess) {
    Fail(std::string("moecommEpDestroy: ") + moecommGetLastError(comm_));
  }
  ep_ = nullptr;
}

void CaseRunner::CheckAsync(const std::string& tag) {
  moecommResult_t now = moecommSuccess;
  moecommCommGetAsyncError(comm_, &now);
  if (now != moecommSuccess && now != asyncBefore_) {
    Fail(tag + ": moecommCommGetAsyncError reports " + moecommGetErrorString(now));
  }
}

void CaseRunner::CheckLayout() {
  CudaCheck(layoutRank_.Poison(stream_), "poison");
  CudaCheck(layoutExpert_.Poison(stream_), "poison");
  CudaCheck(layoutInRank_.Poison(stream_), "poison");
  moecommEpLayoutArgs_t args = MOECOMM_EP_LAYOUT_ARGS_INIT;
  args.numTokens = T_;
  args.topkIdx = idx_.get();
  args.topkIdxType = c_.idx64 ? moecommInt64 : moecommInt32;
  args.tokensPerRank = layoutRank_.as<int>();
  args.tokensPerExpert = layoutExpert_.as<int>();
  args.isTokenInRank = layoutInRank_.as<uint8_t>();
  if (moecommEpGetLayout(ep_, &args, stream_) != moecommSuccess) {
    Fail(std::string("moecommEpGetLayout: ") + moecommGetLastError(comm_));
    return;
  }
  CudaCheck(cudaStreamSynchronize(stream_), "cudaStreamSynchronize after moecommEpGetLayout");
  Check(CompareOutput("layout tokensPerRank", routing_.perRankAll.data() + static_cast<size_t>(me_) * R_,
                      4 * static_cast<size_t>(R_), 4, 1, layoutRank_));
  Check(CompareOutput("layout tokensPerExpert", routing_.perExpertAll.data() + static_cast<size_t>(me_) * c_.experts,
                      4 * static_cast<size_t>(c_.experts), 4, 1, layoutExpert_));
  Check(CompareOutput("layout isTokenInRank", routing_.inRank[me_].data(), routing_.inRank[me_].size(), 1, R_,
                      layoutInRank_));
}

void CaseRunner::Notify() {
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = T_;
  args.topkIdx = idx_.get();
  args.topkIdxType = c_.idx64 ? moecommInt64 : moecommInt32;
  args.expertAlignment = c_.alignment;
  int n = -1;
  std::vector<int> perExpert(L_, -7);
  if (moecommEpNotifyDispatch(ep_, &args, &handle_, &n, perExpert.data(), stream_) != moecommSuccess) {
    Fail(std::string("moecommEpNotifyDispatch: ") + moecommGetLastError(comm_));
    handle_ = nullptr;
    return;
  }
  std::vector<int> want(L_);
  ref::recvTokensPerExpert(shape_, routing_.perExpertAll.data(), me_, c_.alignment, want.data());
  if (n != N_) Fail("notify numRecvTokens " + std::to_string(n) + ", expected " + std::to_string(N_));
  for (int le = 0; le < L_; ++le) {
    if (perExpert[le] != want[le]) {
      Fail("notify recvTokensPerExpert[" + std::to_string(le) + "] = " + std::to_string(perExpert[le]) + ", expected " +
           std::to_string(want[le]));
      break;
    }
  }
  int handleN = -2;
  if (moecommEpHandleGetNumRecvTokens(handle_, &handleN) != moecommSuccess || handleN != N_) {
    Fail("moecommEpHandleGetNumRecvTokens after notify: " + std::to_string(handleN) + ", expected " +
         std::to_string(N_));
  }
}

void CaseRunner::NewRouting(int round) {
  if (handle_ != nullptr && moecommEpHandleDestroy(handle_) != moecommSuccess) {
    Fail(std::string("moecommEpHandleDestroy: ") + moecommGetLastError(comm_));
  }
  handle_ = nullptr;
  routing_ = MakeRouting(c_, shape_, seed_ + 7919ull * round);
  N_ = routing_.recv[me_];
  UploadTopkIdx();
}

// This rank's topkIdx of routing_, in the case's index type; waits for the copy.
void CaseRunner::UploadTopkIdx() {
  std::vector<int32_t> idx32(routing_.idx[me_].begin(), routing_.idx[me_].end());
  CudaCheck(c_.idx64 ? idx_.Upload(routing_.idx[me_], stream_) : idx_.Upload(idx32, stream_), "upload topkIdx");
  CudaCheck(cudaStreamSynchronize(stream_), "cudaStreamSynchronize after the topkIdx upload");
}

void CaseRunner::Prepare(int round) {
  MakeRound(c_, shape_, routing_, me_, seed_, round, &d_);
  for (const DeviceBuffer* b :
       {&x_,          &scales_,      &weights_,       &bias_,           &combineX_,  &combineW_, &recvX_,
        &recvScales_, &recvIdx_,     &recvW_,         &numRecv_,        &perExpert_, &combined_, &combinedW_,
        &plainX_,     &plainW_,      &plainCombined_, &plainCombinedW_, &x2_,        &scales2_,  &weights2_,
        &recvX2_,     &recvScales2_, &recvIdx2_,      &recvW2_}) {
    CudaCheck(b->Poison(stream_), "poison");
  }
  CudaCheck(x_.Upload(d_.x, stream_), "upload x");
  CudaCheck(scales_.Upload(d_.scales, stream_), "upload xScales");
  CudaCheck(weights_.Upload(d_.weights, stream_), "upload topkWeights");
  CudaCheck(bias_.Upload(d_.bias, stream_), "upload bias");
  CudaCheck(combineX_.Upload(d_.combineX, stream_), "upload combine x");
  CudaCheck(combineW_.Upload(d_.combineW, stream_), "upload combine topkWeights");
  if (c_.stagedCombineFirst) {
    CudaCheck(plainX_.Upload(d_.combineX, stream_), "upload combine x (plain copy)");
    CudaCheck(plainW_.Upload(d_.combineW, stream_), "upload combine topkWeights (plain copy)");
  }
  if (c_.stagedDispatchAfter) {
    // Other data on the same routing: rounds past the case's own never repeat one of them.
    MakeRound(c_, shape_, routing_, me_, seed_, c_.iterations + round, &d2_);
    CudaCheck(x2_.Upload(d2_.x, stream_), "upload second x");
    CudaCheck(scales2_.Upload(d2_.scales, stream_), "upload second xScales");
    CudaCheck(weights2_.Upload(d2_.weights, stream_), "upload second topkWeights");
  }
}

moecommEpDispatchArgs_t CaseRunner::DispatchArgs(bool passTopkIdx, bool second) const {
  const bool rows = Capacity() > 0;  // exact sizing with N = 0: every row output may be NULL
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = T_;
  args.xType = c_.fp8 ? moecommFloat8E4M3 : moecommBfloat16;
  args.x = (second ? x2_ : x_).get();
  args.xScales = c_.fp8 ? (second ? scales2_ : scales_).as<float>() : nullptr;
  args.topkIdx = passTopkIdx ? idx_.get() : nullptr;
  args.topkIdxType = c_.idx64 ? moecommInt64 : moecommInt32;
  args.topkWeights = c_.dispatchWeights ? (second ? weights2_ : weights_).as<float>() : nullptr;
  args.expertAlignment = c_.alignment;
  args.recvCapacity = Capacity();
  args.recvX = rows ? (second ? recvX2_ : recvX_).get() : nullptr;
  args.recvXScales = c_.fp8 && rows ? (second ? recvScales2_ : recvScales_).as<float>() : nullptr;
  args.recvTopkIdx = !c_.minimal && rows ? (second ? recvIdx2_ : recvIdx_).get() : nullptr;
  args.recvTopkWeights = !c_.minimal && rows && c_.dispatchWeights ? (second ? recvW2_ : recvW_).as<float>() : nullptr;
  args.numRecvTokens = c_.minimal ? nullptr : numRecv_.as<int>();
  args.recvTokensPerExpert = c_.minimal ? nullptr : perExpert_.as<int>();
  return args;
}

moecommEpCombineArgs_t CaseRunner::CombineArgs(bool plain) const {
  moecommEpCombineArgs_t args = MOECOMM_EP_COMBINE_ARGS_INIT;
  args.x = (plain ? plainX_ : combineX_).get();
  args.topkWeights = c_.combineWeights ? (plain ? plainW_ : combineW_).as<float>() : nullptr;
  args.bias = c_.bias ? bias_.get() : nullptr;
  args.combinedX = (plain ? plainCombined_ : combined_).get();
  args.combinedTopkWeights = c_.combineWeights ? (plain ? plainCombinedW_ : combinedW_).as<float>() : nullptr;
  return args;
}

bool CaseRunner::Dispatch(const std::string& tag, bool passTopkIdx, bool second) {
  const moecommEpDispatchArgs_t args = DispatchArgs(passTopkIdx, second);
  moecommEpHandle_t before = handle_;
  if (moecommEpDispatch(ep_, &args, &handle_, stream_) != moecommSuccess) {
    Fail(tag + " moecommEpDispatch: " + moecommGetLastError(comm_));
    handle_ = before;
    return false;
  }
  if (before != nullptr && handle_ != before) Fail(tag + " moecommEpDispatch replaced the reused handle");
  return true;
}

bool CaseRunner::Combine(const std::string& tag, bool plain) {
  const moecommEpCombineArgs_t args = CombineArgs(plain);
  if (moecommEpCombine(ep_, &args, handle_, stream_) != moecommSuccess) {
    Fail(tag + " moecommEpCombine: " + moecommGetLastError(comm_));
    return false;
  }
  return true;
}

void CaseRunner::CheckDispatch(const std::string& tag, bool second) {
  const size_t N = N_, K = c_.topk;
  const RoundData& d = second ? d2_ : d_;
  if (!c_.minimal) {
    Check(CompareOutput(tag + " numRecvTokens", &N_, 4, 4, 1, numRecv_));
    Check(CompareOutput(tag + " recvTokensPerExpert", d.perExpert.data(), 4 * d.perExpert.size(), 4, 1, perExpert_));
  }
  if (Capacity() == 0) return;  // NULL row outputs; the buffers must be untouched
  Check(CompareOutput(tag + " recvX", d.recvX.data(), N * rowBytes_, c_.fp8 ? 1 : 2, static_cast<size_t>(c_.hidden),
                      second ? recvX2_ : recvX_));
  if (c_.fp8) {
    Check(CompareOutput(tag + " recvXScales", d.recvScales.data(), N * spr_ * 4, 4, spr_,
                        second ? recvScales2_ : recvScales_));
  }
  CheckSources(tag);
  if (!c_.minimal) {
    Check(CompareOutput(tag + " recvTopkIdx", d.recvIdx.data(), N * K * idxBytes_, idxBytes_, K,
                        second ? recvIdx2_ : recvIdx_));
    if (c_.dispatchWeights) {
      Check(CompareOutput(tag + " recvTopkWeights", d.recvWeights.data(), N * K * 4, 4, K, second ? recvW2_ : recvW_));
    }
  }
}

// The handle's per-row sources (moecommEpHandleGetSourceInfo) against the host reference's.
void CaseRunner::CheckSources(const std::string& tag) {
  std::vector<int> rank(std::max(1, Capacity()), -2), index(std::max(1, Capacity()), -2);
  if (moecommEpHandleGetSourceInfo(handle_, rank.data(), index.data(), Capacity()) != moecommSuccess) {
    Fail(tag + " moecommEpHandleGetSourceInfo: " + moecommGetLastError(comm_));
    return;
  }
  for (int n = 0; n < N_; ++n) {
    if (rank[n] != d_.srcRank[n] || index[n] != d_.srcIndex[n]) {
      Fail(tag + " source of received row " + std::to_string(n) + " of " + std::to_string(N_) + ": rank " +
           std::to_string(rank[n]) + " token " + std::to_string(index[n]) + ", expected rank " +
           std::to_string(d_.srcRank[n]) + " token " + std::to_string(d_.srcIndex[n]));
      return;
    }
  }
}

void CaseRunner::CheckCombine(const std::string& tag, bool plain) {
  Check(CompareOutput(tag + " combinedX", d_.combined.data(), d_.combined.size() * 2, 2, static_cast<size_t>(c_.hidden),
                      plain ? plainCombined_ : combined_));
  if (c_.combineWeights) {
    Check(CompareOutput(tag + " combinedTopkWeights", d_.combinedW.data(), d_.combinedW.size() * 4, 4,
                        static_cast<size_t>(c_.topk), plain ? plainCombinedW_ : combinedW_));
  }
}

std::string CaseRunner::CheckDirectPaths(const std::string& log) const {
  if (log.empty()) return "the EP log is empty or its file could not be read, so the path taken is unknown";
  // Every rank passes a receive buffer (with exact sizing a rank that receives nothing passes
  // none, and then no rank goes direct).
  bool everyRankHolds = true;
  for (size_t r = 0; r < routing_.recv.size() && c_.exact; ++r) everyRankHolds = everyRankHolds && routing_.recv[r] > 0;
  // The library's own reading of the switches (config file included).
  const bool combine = R_ > 1 && everyRankHolds && moecomm::envInt(moecomm::Env::EpDirectCombine) != 0 &&
                       (c_.combineMemory == kSymmetric || (c_.combineMemory == kSymmetricXOnly && !c_.combineWeights));
  // Developer kernel variants decide direct dispatch too (and may be changed by the library
  // when their rings do not fit): with either set, the dispatch is not checked.
  // (set anywhere the library looks: the environment or MOECOMM_CONFIG_FILE)
  const auto setAnywhere = [](moecomm::Env id) { return std::strcmp(moecomm::envLookup(id).source, "default") != 0; };
  const bool variantsSet = setAnywhere(moecomm::Env::EpDispatchVariant) || setAnywhere(moecomm::Env::EpPull);
  // The pulled dispatch (x at the same offset everywhere, switched on) replaces the direct one.
  const bool pull =
      R_ > 1 && !variantsSet && moecomm::envInt(moecomm::Env::EpDispatchPullX) != 0 && c_.xMemory == kSymmetric;
  const bool dispatch = R_ > 1 && everyRankHolds && moecomm::envInt(moecomm::Env::EpDirectDispatch) != 0 &&
                        c_.recvMemory == kSymmetric && !pull;
  // (logged when it changes, the first call included)
  const bool pulled = log.find("normal dispatch pulls x rows") != std::string::npos;
  const bool pushedAfter = log.find("normal dispatch pushes x rows") != std::string::npos;
  if (pulled != pull && !variantsSet) {
    return std::string("the dispatch ") + (pulled ? "pulled x rows" : "never pulled x rows") + " but this case " +
           (pull ? "should" : "should not");
  }
  if (pull && pushedAfter && !variantsSet) return "the dispatch pulled x rows but pushed them again in a later call";
  // The balanced dispatch runs exactly when the dispatch is direct and it is switched on (on
  // every rank: one rank that switched it off turns it off for all).
  const bool balance = dispatch && moecomm::envInt(moecomm::Env::EpBalancedDispatch) != 0 && c_.unbalancedRank == -1;
  const bool balanced = log.find("normal dispatch claims tokens across blocks") != std::string::npos;
  if (balanced != balance && !variantsSet) {
    return std::string("the dispatch ") + (balanced ? "was balanced" : "was never balanced") + " but this case " +
           (balance ? "should" : "should not") + " be";
  }
  const struct {
    const char* op;
    bool expected;
    bool check;
    bool mayStage;  // the case also makes staged calls of this op on purpose
  } ops[] = {{"combine", combine, true, c_.stagedCombineFirst},
             {"dispatch", dispatch, !variantsSet, c_.stagedDispatchAfter}};
  for (const auto& op : ops) {
    if (!op.check) continue;
    // The library logs when an op starts or stops going direct (the first call included).
    const bool direct = log.find(std::string("normal ") + op.op + " is direct") != std::string::npos;
    const bool staged = log.find(std::string("normal ") + op.op + " stages its rows") != std::string::npos;
    std::string why;
    if (direct != op.expected) {
      why = std::string("the ") + op.op + (direct ? " went direct" : " never went direct") + " but this case " +
            (op.expected ? "should" : "should not");
    } else if (op.expected && staged && !op.mayStage) {
      why = std::string("the ") + op.op + " went direct but fell back to staged rows in a later call";
    }
    if (!why.empty()) {
      const size_t keep = 1500;
      return why + "; EP log" + (log.size() > keep ? " (end)" : "") + ": " +
             (log.size() > keep ? log.substr(log.size() - keep) : log);
    }
  }
  return "";
}

std::string CaseRunner::Run() {
  if (!Setup()) return why_;
  CheckLayout();
  if (c_.exact) Notify();
  // Every rank makes the same calls whatever it found so far, so one rank's mismatch never
  // leaves the others waiting in a collective.
  for (int round = 0; round < c_.iterations; ++round) {
    const std::string tag = c_.iterations > 1 ? "round " + std::to_string(round) : "dispatch";
    if (round > 0 && c_.freshRouting) NewRouting(round);
    const bool reused = handle_ != nullptr;
    Prepare(round);
    if (c_.exact && !reused) break;  // the notify failed on every rank
    if (!Dispatch(tag, !(c_.minimal && reused))) break;
    // stagedDispatchAfter: at once (no sync) a staged dispatch of other data, reusing the handle.
    if (c_.stagedDispatchAfter && !Dispatch(tag + " staged after", !c_.minimal, true)) break;
    CudaCheck(cudaStreamSynchronize(stream_), tag + " cudaStreamSynchronize after the dispatch");
    CheckAsync(tag + " dispatch");
    CheckDispatch(tag);
    if (c_.stagedDispatchAfter) CheckDispatch(tag + " staged after", true);
    // stagedCombineFirst: a staged combine, and at once (no sync) the configured one.
    if (c_.stagedCombineFirst && !Combine(tag + " staged first", true)) break;
    if (!Combine(c_.iterations > 1 ? tag : "combine")) break;
    CudaCheck(cudaStreamSynchronize(stream_), tag + " cudaStreamSynchronize after the combine");
    CheckAsync(tag + " combine");
    if (c_.stagedCombineFirst) CheckCombine(tag + " staged first", true);
    CheckCombine(c_.iterations > 1 ? tag : "combine");
  }
  Finish();
  return why_;
}

std::string CaseRunner::RunGraph(int replays, cudaStreamCaptureMode mode) {
  if (!Setup()) return why_;
  // Round 0, eager: creates the handle (worst-case sizing, no host sync inside the calls).
  Prepare(0);
  if (Dispatch("eager", true)) {
    CudaCheck(cudaStreamSynchronize(stream_), "eager cudaStreamSynchronize");
    CheckAsync("eager dispatch");
    CheckDispatch("eager");
    if (Combine("eager")) {
      CudaCheck(cudaStreamSynchronize(stream_), "eager cudaStreamSynchronize");
      CheckAsync("eager combine");
      CheckCombine("eager");
    }
  }
  int bad = -1;
  if (!AllRanks(comm_, why_.empty() && handle_ != nullptr, &bad)) {
    Finish();
    return why_.empty() ? "eager round failed on rank " + std::to_string(bad) : why_;
  }

  // Capture dispatch (reusing the handle) + combine. The calls still agree with the peers on
  // the host during the capture; only their kernels go into the graph.
  bool captured = false;
  cudaError_t err = cudaStreamBeginCapture(stream_, mode);
  if (err != cudaSuccess) {
    Fail("cudaStreamBeginCapture: " + CudaText(err));
  } else {
    const moecommEpDispatchArgs_t dispatchArgs = DispatchArgs(true);
    const moecommEpCombineArgs_t combineArgs = CombineArgs();
    moecommEpHandle_t reused = handle_;
    const moecommResult_t dispatched = moecommEpDispatch(ep_, &dispatchArgs, &handle_, stream_);
    if (dispatched != moecommSuccess) Fail(std::string("captured moecommEpDispatch: ") + moecommGetLastError(comm_));
    if (handle_ != reused) Fail("captured moecommEpDispatch replaced the reused handle");
    handle_ = reused;
    const moecommResult_t combined = moecommEpCombine(ep_, &combineArgs, handle_, stream_);
    if (combined != moecommSuccess) Fail(std::string("captured moecommEpCombine: ") + moecommGetLastError(comm_));
    err = cudaStreamEndCapture(stream_, &graph_);
    if (err != cudaSuccess) {
      Fail("cudaStreamEndCapture: " + CudaText(err));
      (void)cudaGetLastError();
      graph_ = nullptr;
    } else if (dispatched == moecommSuccess && combined == moecommSuccess) {
      err = cudaGraphInstantiate(&graphExec_, graph_, 0);
      if (err != cudaSuccess) {
        Fail("cudaGraphInstantiate: " + CudaText(err));
        graphExec_ = nullptr;
      } else {
        captured = true;
      }
    }
  }
  if (!AllRanks(comm_, captured, &bad)) {
    Finish();
    return why_.empty() ? "capture failed on rank " + std::to_string(bad) : "capture: " + why_;
  }

  // Replays: fresh inputs into the same buffers, outputs poisoned, every output checked. One
  // rank starts each replay 20 ms late, so a replay that does not wait for its peers (for
  // instance one that reuses the sequence numbers baked in at capture) reads stale rows.
  for (int replay = 1; replay <= replays; ++replay) {
    const std::string tag = "replay " + std::to_string(replay) + "/" + std::to_string(replays);
    Prepare(replay);
    if (me_ == replay % R_) usleep(20000);
    err = cudaGraphLaunch(graphExec_, stream_);
    if (err != cudaSuccess) Fail(tag + " cudaGraphLaunch: " + CudaText(err));
    CudaCheck(cudaStreamSynchronize(stream_), tag + " cudaStreamSynchronize");
    CheckAsync(tag);
    CheckDispatch(tag);
    CheckCombine(tag);
    // Stop at the first failing replay on every rank: later replays would only repeat it, and
    // a replay that waits on a peer that stopped would burn the kernel timeout.
    if (!AllRanks(comm_, why_.empty(), &bad)) {
      if (why_.empty()) Fail(tag + ": rank " + std::to_string(bad) + " failed; stopped");
      break;
    }
  }

  // One more eager round on the same handle: the host's view of the sequence must still
  // match the device's after the replays.
  if (why_.empty()) {
    const std::string tag = "eager after the replays";
    Prepare(replays + 1);
    if (Dispatch(tag, true)) {
      CudaCheck(cudaStreamSynchronize(stream_), tag + " cudaStreamSynchronize");
      CheckAsync(tag + " dispatch");
      CheckDispatch(tag);
      if (Combine(tag)) {
        CudaCheck(cudaStreamSynchronize(stream_), tag + " cudaStreamSynchronize");
        CheckAsync(tag + " combine");
        CheckCombine(tag);
      }
    }
  }
  Finish();
  return why_;
}

// ---- The fixture ---------------------------------------------------------------------------

class EpCudaNormal : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Gpu().multiProcess) GTEST_SKIP() << "EpCudaNormal runs under moecomm-run";
    if (!Gpu().multiProcessSkip.empty()) GTEST_SKIP() << Gpu().multiProcessSkip;
    comm_ = Gpu().comm;
    rank_ = comm_->rank;
    nranks_ = comm_->nranks;
    if (nranks_ < 2) GTEST_SKIP() << "EpCudaNormal needs at least 2 ranks";
    ASSERT_EQ(cudaSetDevice(Gpu().device), cudaSuccess);
  }

  static uint64_t BaseSeed() {
    if (const char* text = EnvText("MOECOMM_TEST_EP_SEED")) return std::strtoull(text, nullptr, 0);
    const char* id = std::getenv("MOECOMM_UNIQUE_ID");
    return std::hash<std::string>()(id != nullptr ? id : "moecomm");
  }

  // Runs every case (whatever the others found) and prints one line per case; `graph` runs
  // RunGraph instead of Run. Fails the test if any case failed.
  void RunCases(const char* suite, std::vector<Case> cases, bool graph = false) {
    const uint64_t base = BaseSeed();
    const int maxTokens = EnvInt("MOECOMM_TEST_EP_MAX_TOKENS", 0);
    const int replays = EnvInt("MOECOMM_TEST_EP_GRAPH_REPLAYS", 20);
    const char* filterText = EnvText("MOECOMM_TEST_EP_CASES");
    std::regex filter;
    try {
      filter.assign(filterText != nullptr ? filterText : "");
    } catch (const std::regex_error& error) {
      FAIL() << "MOECOMM_TEST_EP_CASES is not a valid regular expression: " << error.what();
    }
    const char* modeText = EnvText("MOECOMM_TEST_EP_CAPTURE_MODE");
    const std::string modeName = modeText != nullptr ? modeText : "thread";
    cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal;
    if (modeName == "relaxed") mode = cudaStreamCaptureModeRelaxed;
    if (modeName == "global") mode = cudaStreamCaptureModeGlobal;
    if (rank_ == 0) {
      std::printf("[EpCudaNormal] %s: %zu cases on %d ranks, seed %llu (MOECOMM_TEST_EP_SEED=%llu replays it)%s\n",
                  suite, cases.size(), nranks_, static_cast<unsigned long long>(base),
                  static_cast<unsigned long long>(base), graph ? (", capture mode " + modeName).c_str() : "");
      std::fflush(stdout);
    }
    int failures = 0, ran = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
      Case c = cases[i];
      if (maxTokens > 0) c.tokens = std::min(c.tokens, maxTokens);
      // Any rank count runs every case: the expert count is rounded up to a multiple of it
      // (3 or 6 ranks change most cases, 8 ranks only E12).
      c.experts = ExpertsFor(c.experts, nranks_);
      const std::string name = (graph ? "graph " : "") + c.Name();
      if (filterText != nullptr && !std::regex_search(name, filter)) continue;
      const uint64_t seed = Key(base, std::hash<std::string>()(suite), i);
      const auto start = std::chrono::steady_clock::now();
      const ScopedEnv pullX(c.pullX ? "MOECOMM_EP_DISPATCH_PULL_X" : nullptr, "1");
      const ScopedEnv balanced(c.balanced ? "MOECOMM_EP_BALANCED_DISPATCH" : nullptr,
                               c.unbalancedRank == rank_ || c.unbalancedRank == Case::kEveryRank ? "0" : "1");
      CaseRunner runner(comm_, c, seed);
      const bool symmetric = c.combineMemory != kCudaMalloc || c.recvMemory != kCudaMalloc || c.xMemory != kCudaMalloc;
      EpLogCapture log(symmetric);
      if (symmetric && !log.active() && rank_ == 0)
        std::printf("[EpCudaNormal] %s: MOECOMM_DEBUG is set, so which path ran is not checked\n", name.c_str());
      std::string why = graph ? runner.RunGraph(replays, mode) : runner.Run();
      if (why.empty() && log.active()) why = runner.CheckDirectPaths(log.Finish());
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("[EpCudaNormal rank %d] %s%s: %s (%.2f s)%s%s\n", rank_, name.c_str(),
                  graph ? (" replays=" + std::to_string(replays)).c_str() : "", why.empty() ? "PASS" : "FAIL", seconds,
                  why.empty() ? "" : " ", why.c_str());
      std::fflush(stdout);
      ++ran;
      if (!why.empty()) ++failures;
    }
    EXPECT_EQ(failures, 0) << failures << " of " << ran << " cases failed on rank " << rank_;
    if (ran == 0 && filterText == nullptr) ADD_FAILURE() << suite << ": no case ran on " << nranks_ << " ranks";
    if (ran == 0 && filterText != nullptr && rank_ == 0)
      std::printf("[EpCudaNormal] %s: no case selected by MOECOMM_TEST_EP_CASES\n", suite);
  }

  moecommComm_t comm_ = nullptr;
  int rank_ = 0;
  int nranks_ = 1;
};

// BF16 and FP8, each with no weights, dispatch weights, combine weights and both, with and
// without bias, both index types, both sizings.
TEST_F(EpCudaNormal, DtypesAndWeights) {
  RunCases("DtypesAndWeights", {
                                   C(2048, 512, 8, 32),
                                   C(2048, 512, 8, 32).I32().Bias().W(true, false),
                                   C(2048, 512, 4, 32).Exact().Align(4).Bias().W(false, true),
                                   C(2048, 512, 4, 32).I32().Exact().W(true, true),
                                   C(2048, 512, 8, 32).Fp8(),
                                   C(2048, 512, 8, 32).Fp8().I32().Align(8).Bias().W(true, true),
                                   C(2048, 512, 4, 32).Fp8().Exact().W(true, false),
                                   C(2048, 512, 4, 32).Fp8().I32().Exact().Bias().W(false, true),
                               });
}

// Every H of the issue with both dtypes (2880 BF16 only: FP8 needs H % 128 == 0), every top-k
// with both dtypes, the reference workloads' shapes (W-prefill with T = 4096, W-decode's
// T = 128, H 2048 E 128 top-8, H 2880 E 128 top-4), alignments up to 128, SM budgets 1 and 3.
TEST_F(EpCudaNormal, Shapes) {
  RunCases("Shapes", {
                         C(2880, 1024, 4, 128).Bias().W(true, true),
                         C(2880, 256, 1, 16).I32().Exact().Align(4).W(true, false),
                         C(2880, 256, 8, 64).I32().Sms(3).Bias(),
                         C(4096, 1024, 1, 16).Exact().Bias().W(true, true),
                         C(4096, 1024, 1, 16).Fp8().I32().Align(2).W(true, true),
                         C(4096, 512, 4, 64).Fp8().Exact().Align(16).Bias().W(true, false),
                         C(4096, 512, 8, 64).I32().Sms(1).W(false, true),
                         C(7168, 4096, 8, 256).Fp8().Bias().W(true, true),
                         C(7168, 4096, 8, 256).I32().Exact().Align(128).W(true, false),
                         C(7168, 256, 4, 32),
                         C(7168, 256, 1, 16).Fp8().I32().Exact().Sms(1).Bias().W(false, true),
                         C(7168, 128, 8, 256).Fp8().W(true, true),
                         C(2048, 4096, 8, 128).Fp8().I32().Align(4).W(true, true),
                     });
}

// Skewed and degenerate routing.
TEST_F(EpCudaNormal, Routing) {
  RunCases("Routing",
           {
               // Every token to expert E-1: the last rank receives every token, the others none.
               C(2048, 1024, 8, 64).Routed(Route::kOneExpert).Bias().W(true, true),
               // The same with exact sizing: ranks with N = 0 pass NULL row outputs.
               C(4096, 512, 4, 32).Fp8().I32().Exact().Align(4).Routed(Route::kOneExpert).W(true, false),
               // Every token also selects expert 1 (rank 0 receives every token).
               C(4096, 1024, 4, 32).Fp8().Routed(Route::kHot).Bias().W(true, true),
               C(7168, 512, 8, 64).I32().Exact().Routed(Route::kHot).W(false, true),
               // Ranks with T = 0.
               C(2048, 512, 8, 32).Exact().Empty(1u << 1).Bias().W(true, true),
               C(2048, 512, 8, 32).Fp8().I32().Empty(1u | kLastRank).Bias().W(true, true),
               C(2048, 256, 4, 32).Empty(kAllRanks).Bias().W(true, true),
               C(2048, 256, 4, 32).Fp8().Exact().Empty(kAllRanks).W(true, true),
               // Tokens whose entries are all -1: a quarter of them, every token of rank 1, all.
               C(2880, 1024, 8, 64).Routed(Route::kSomeNone).Bias().W(true, true),
               C(4096, 512, 4, 32).Fp8().I32().Exact().Align(4).Routed(Route::kSomeNone).Bias().W(true, true),
               C(2048, 512, 8, 32).Exact().Silent(1u << 1).Bias().W(true, true),
               C(7168, 256, 8, 64).Routed(Route::kAllNone).Bias().W(true, true),
           });
}

// Several dispatch + combine rounds on one handle (worst case: the first round makes it; exact:
// the notify does), fresh data each round; `minimal` passes topkIdx = NULL on reuse.
TEST_F(EpCudaNormal, HandleReuse) {
  RunCases("HandleReuse",
           {
               C(2048, 512, 8, 32).Rounds(4).Bias().W(true, true),
               C(7168, 512, 4, 64).Fp8().I32().Exact().Align(4).Rounds(3).W(true, false),
               C(4096, 256, 8, 32).Fp8().Rounds(3).Minimal().Bias().W(true, true),
               C(2048, 256, 1, 16).Routed(Route::kHot).Empty(1u << 1).Rounds(3).W(false, true),
               C(2880, 512, 4, 32).I32().Exact().Routed(Route::kOneExpert).Rounds(3).Bias().W(true, true),
               C(7168, 512, 8, 64).Fp8().Rounds(4).FreshRouting().W(true, true),
               C(2048, 256, 4, 32).I32().Routed(Route::kSomeNone).Rounds(3).FreshRouting().Bias().W(false, true),
           });
}

// The generic path: the smallest row (16 bytes), H not a multiple of 128, odd top-k, top-k
// 32, an odd alignment, an odd expert count per rank.
TEST_F(EpCudaNormal, GenericShapes) {
  RunCases("GenericShapes", {
                                C(8, 64, 2, 8).Bias().W(true, true),
                                C(136, 300, 3, 12).I32().Exact().Bias().W(true, true),
                                C(256, 200, 32, 64).Fp8().I32().Exact().Align(3).Bias().W(true, true),
                                C(1024, 1000, 6, 48).Fp8().Sms(2).W(true, true),
                            });
}

// Worst-case sizing, handle from an eager dispatch, then dispatch (handle reuse) + combine
// captured into a CUDA graph and replayed MOECOMM_TEST_EP_GRAPH_REPLAYS (20) times with fresh
// inputs in the same buffers; every output of every replay is checked.
TEST_F(EpCudaNormal, GraphReplay) {
  RunCases("GraphReplay",
           {
               C(7168, 512, 8, 64).Fp8().I32().Bias().W(true, true),
               C(2880, 256, 4, 32).Align(4).W(true, false),
               C(7168, 512, 8, 64).Fp8().W(true, true).RecvIn(kSymmetric).CombineIn(kSymmetric),
           },
           /*graph=*/true);
}

// The shapes of the direct and pulled dispatch suites; `place` puts each case's buffers where
// its suite wants them (fallback: the last case, whose buffers sit at offsets that differ per
// rank, so that every rank falls back to the pushed or staged path).
std::vector<Case> PlacedDispatchCases(const std::function<void(Case*, bool fallback, size_t i)>& place) {
  std::vector<Case> cases = {
      C(7168, 1024, 8, 64).Fp8().W(true, true).CombineIn(kSymmetric),
      C(2048, 512, 8, 32).I32().Bias().W(true, false),
      C(4096, 512, 4, 32).Exact().Align(4).W(true, true),
      C(2048, 512, 8, 64).Routed(Route::kOneExpert).W(true, true),
      C(2048, 256, 4, 32).Fp8().Exact().Empty(1u << 1).W(true, true),
      C(2880, 512, 4, 32).Rounds(3).W(true, true).CombineIn(kSymmetric),
      C(7168, 256, 8, 64).Fp8().Rounds(3).FreshRouting(),
      C(136, 300, 3, 12).I32().Exact().Routed(Route::kSomeNone).Bias().W(true, true),
      C(1024, 1000, 6, 48).Fp8().Sms(2).W(true, true),
      C(2048, 512, 8, 32).W(true, true),
  };
  for (size_t i = 0; i < cases.size(); ++i) place(&cases[i], i + 1 == cases.size(), i);
  return cases;
}

// The direct dispatch's cases (PlacedDispatchCases) and two graph cases with recvX in symmetric
// memory, each then set by `set` (a dispatch switch): {eager cases, graph cases}.
std::pair<std::vector<Case>, std::vector<Case>> SwitchedDispatchCases(const std::function<void(Case*)>& set) {
  std::vector<Case> graph = {
      C(7168, 512, 8, 64).Fp8().W(true, true).RecvIn(kSymmetric).CombineIn(kSymmetric),
      C(2048, 300, 4, 32).W(true, false).RecvIn(kSymmetric),
  };
  for (Case& c : graph) set(&c);
  return {PlacedDispatchCases([&](Case* c, bool fallback, size_t) {
            c->RecvIn(fallback ? kSymmetricShifted : kSymmetric);
            set(c);
          }),
          graph};
}

// recvX in moecommMemAlloc memory: the senders store x rows straight into the destination's
// recvX when every rank has it at the same offset (docs/ep-normal-gpu.md, "Direct dispatch and
// combine"), staged when the offsets differ; the results are the same either way.
TEST_F(EpCudaNormal, DirectDispatch) {
  RunCases("DirectDispatch", PlacedDispatchCases([](Case* c, bool fallback, size_t) {
             c->RecvIn(fallback ? kSymmetricShifted : kSymmetric);
           }));
}

// The direct dispatch's cases with MOECOMM_EP_BALANCED_DISPATCH=1 (the default, set here so
// the suite does not depend on it): every block's sending warps claim the rank's tokens one at
// a time (docs/ep-normal-gpu.md, "Balanced dispatch"); the fallback case stages its rows (recvX
// at offsets that differ), which the switch does not change. The results are the same either
// way.
TEST_F(EpCudaNormal, BalancedDispatch) {
  const auto cases = SwitchedDispatchCases([](Case* c) { c->Balanced(); });
  RunCases("BalancedDispatch", cases.first);
  RunCases("BalancedDispatch", cases.second, /*graph=*/true);
  // Rank 0 sets 0, the others 1: no rank balances, and the results are the same.
  RunCases("BalancedDispatch", {
                                   C(4096, 512, 8, 32).Fp8().W(true, true).RecvIn(kSymmetric).Balanced(0),
                                   C(2048, 300, 4, 32).Exact().W(true, false).RecvIn(kSymmetric).Balanced(0),
                               });
  // A staged dispatch of other data right after each balanced one, with no synchronisation:
  // its senders wait only for their own channel's ack, while other blocks of the balanced call
  // may still copy parts out of the staging slots (timing-dependent, so several rounds).
  RunCases("BalancedDispatch",
           {
               C(7168, 1024, 8, 64).Fp8().W(true, true).RecvIn(kSymmetric).Balanced().StagedDispatchAfter().Rounds(4),
               C(4096, 1024, 8, 32).W(true, false).RecvIn(kSymmetric).Balanced().StagedDispatchAfter().Rounds(4),
           });
}

// The direct dispatch's cases with MOECOMM_EP_BALANCED_DISPATCH=0 on every rank: each block
// sends its own channel's tokens.
TEST_F(EpCudaNormal, UnbalancedDispatch) {
  const auto cases = SwitchedDispatchCases([](Case* c) { c->Unbalanced(); });
  RunCases("UnbalancedDispatch", cases.first);
  RunCases("UnbalancedDispatch", cases.second, /*graph=*/true);
}

// x in moecommMemAlloc memory with MOECOMM_EP_DISPATCH_PULL_X=1: the receivers read the x rows
// from the sources' x when every rank has it at the same offset (docs/ep-normal-gpu.md,
// "Pulled dispatch"), the senders push them when the offsets differ; the results are the same
// either way. Every other case also has recvX where a direct dispatch could use it (the pulled
// one takes precedence), and so does the fallback case (which then goes direct).
TEST_F(EpCudaNormal, PulledDispatch) {
  RunCases("PulledDispatch", PlacedDispatchCases([](Case* c, bool fallback, size_t i) {
             c->PullX(fallback ? kSymmetricShifted : kSymmetric);
             if (fallback || i % 2 == 1) c->RecvIn(kSymmetric);
           }));
  RunCases("PulledDispatch",
           {
               C(7168, 512, 8, 64).Fp8().W(true, true).PullX(kSymmetric).CombineIn(kSymmetric),
           },
           /*graph=*/true);
}

// Combine input and weights in moecommMemAlloc memory: read directly by the peers when every
// rank has them at the same offset (docs/ep-normal-gpu.md, "Direct combine"), staged when the
// offsets differ or only the input is there; the results are the same either way.
TEST_F(EpCudaNormal, DirectCombine) {
  RunCases("DirectCombine",
           {
               C(7168, 1024, 8, 64).Fp8().W(true, true).CombineIn(kSymmetric),
               C(2048, 512, 8, 32).I32().Bias().W(false, true).CombineIn(kSymmetric),
               C(4096, 512, 4, 32).Exact().Align(4).W(true, false).CombineIn(kSymmetric),
               C(2048, 512, 8, 64).Routed(Route::kOneExpert).W(true, true).CombineIn(kSymmetric),
               C(2048, 256, 4, 32).Fp8().Empty(1u << 1).Bias().W(true, true).CombineIn(kSymmetric),
               C(2880, 512, 4, 32).Rounds(3).W(true, true).CombineIn(kSymmetric),
               C(7168, 256, 8, 64).Fp8().Rounds(3).FreshRouting().W(false, true).CombineIn(kSymmetric),
               C(136, 300, 3, 12).I32().Exact().Routed(Route::kSomeNone).Bias().W(true, true).CombineIn(kSymmetric),
               C(1024, 1000, 6, 48).Fp8().Sms(2).W(true, true).CombineIn(kSymmetric),
               C(2048, 512, 8, 32).W(true, true).CombineIn(kSymmetricShifted),
               C(2048, 512, 8, 32).Fp8().W(false, true).CombineIn(kSymmetricXOnly),
               C(2048, 512, 8, 32).W(true, false).CombineIn(kSymmetricXOnly),
               // A staged combine right before a direct one on the same EP (no sync between):
               // the direct one must not disturb the words the staged one's reducers still read.
               C(7168, 2048, 8, 64).Fp8().W(true, true).CombineIn(kSymmetric).StagedCombineFirst().Rounds(3),
               C(2048, 512, 4, 32).Bias().W(false, true).CombineIn(kSymmetric).StagedCombineFirst().Rounds(2),
           });
}

constexpr int kSmallT = 64, kSmallH = 2048, kSmallK = 4;

// The small EP of the handle tests: T kSmallT, H kSmallH, top-kSmallK of 8 experts per rank,
// 4 SMs.
moecommEpConfig_t SmallEpConfig(int nranks) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = 8 * nranks;
  config.hidden = kSmallH;
  config.maxTokensPerRank = kSmallT;
  config.topk = kSmallK;
  config.numSms = 4;
  return config;
}

// A BF16 dispatch of numTokens tokens with int64 ids into recvX (capacity nranks x numTokens
// rows); idx nullptr: again with *handle's routing.
moecommResult_t DispatchBf16(moecommEp_t ep, int nranks, int numTokens, const void* x, const void* idx, void* recvX,
                             moecommEpHandle_t* handle, cudaStream_t stream) {
  moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
  args.numTokens = numTokens;
  args.xType = moecommBfloat16;
  args.x = x;
  args.topkIdx = idx;
  args.topkIdxType = moecommInt64;
  args.recvCapacity = nranks * numTokens;
  args.recvX = recvX;
  return moecommEpDispatch(ep, &args, handle, stream);
}

// A small normal-mode EP for the handle-lifetime tests: BF16 x of zeros, every token to K
// distinct experts, worst-case sizing; two streams, and a gate kernel that holds a stream
// until the host opens it (or 15 s pass, long enough for a late peer in a call's agreement).
class GatedEp {
 public:
  static constexpr int kT = kSmallT, kH = kSmallH, kK = kSmallK;

  explicit GatedEp(moecommComm_t comm) : comm_(comm), nranks_(comm->nranks) {}
  ~GatedEp() {
    if (ep_ != nullptr) {
      EXPECT_EQ(moecommEpDestroy(ep_), moecommSuccess) << moecommGetLastError(comm_);
    }
    if (words_ != nullptr) {
      EXPECT_EQ(cudaFreeHost(words_), cudaSuccess);
    }
    for (cudaStream_t s : streams_) {
      if (s != nullptr) {
        EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
      }
    }
  }

  void Setup() {
    const moecommEpConfig_t config = SmallEpConfig(nranks_);
    const int E = config.numExperts;
    moecommCommGetAsyncError(comm_, &asyncBefore_);
    ASSERT_EQ(moecommEpCreate(comm_, &config, &ep_), moecommSuccess) << moecommGetLastError(comm_);
    for (cudaStream_t& s : streams_) ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(x_.Allocate(static_cast<size_t>(kT) * kH * 2), cudaSuccess);
    ASSERT_EQ(idx_.Allocate(static_cast<size_t>(kT) * kK * 8), cudaSuccess);
    ASSERT_EQ(recvX_.Allocate(static_cast<size_t>(nranks_) * kT * kH * 2), cudaSuccess);
    ids_.resize(static_cast<size_t>(kT) * kK);
    for (int t = 0; t < kT; ++t) {
      for (int k = 0; k < kK; ++k) ids_[static_cast<size_t>(t) * kK + k] = (t + k * (E / kK)) % E;  // distinct
    }
    ASSERT_EQ(idx_.Upload(ids_, streams_[0]), cudaSuccess);
    ASSERT_EQ(cudaMemsetAsync(x_.get(), 0, x_.bytes(), streams_[0]), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(streams_[0]), cudaSuccess);
    ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&words_), 2 * sizeof(int), cudaHostAllocMapped), cudaSuccess);
    words_[0] = 0;  // the gate's flag
    words_[1] = 0;  // its status: 1 opened by the host, 2 timed out
    ASSERT_EQ(cudaHostGetDevicePointer(reinterpret_cast<void**>(&deviceWords_), words_, 0), cudaSuccess);
  }

  cudaStream_t Stream(int i) const { return streams_[i]; }
  void CloseGate(int stream) {
    words_[0] = 0;
    words_[1] = 0;
    ASSERT_EQ(LaunchHostGate(streams_[stream], deviceWords_, deviceWords_ + 1, 15000000), 0);
  }
  void OpenGate() { *reinterpret_cast<volatile int*>(&words_[0]) = 1; }
  int GateStatus() const { return *reinterpret_cast<volatile int*>(&words_[1]); }

  // A dispatch with a new handle on stream `stream`.
  moecommResult_t Dispatch(int stream, moecommEpHandle_t* handle) {
    *handle = nullptr;
    return DispatchBf16(ep_, nranks_, kT, x_.get(), idx_.get(), recvX_.get(), handle, streams_[stream]);
  }

  // No asynchronous error appeared since Setup.
  void ExpectNoNewAsyncError() const {
    moecommResult_t now = moecommSuccess;
    moecommCommGetAsyncError(comm_, &now);
    EXPECT_TRUE(now == moecommSuccess || now == asyncBefore_) << moecommGetErrorString(now);
  }

 private:
  moecommComm_t comm_;
  int nranks_;
  moecommEp_t ep_ = nullptr;
  cudaStream_t streams_[2] = {nullptr, nullptr};
  DeviceBuffer x_, idx_, recvX_;
  std::vector<int64_t> ids_;
  int* words_ = nullptr;
  int* deviceWords_ = nullptr;
  moecommResult_t asyncBefore_ = moecommSuccess;
};

// moecommEpHandleDestroy does not wait for the device: with the stream held by the gate, a
// fresh dispatch is queued behind it and its handle destroyed, then the host opens the gate. A
// destroy that waited for the device (cudaFree of the routing) would return only after the
// gate's timeout, which the gate reports. The next handle takes the pooled routing block
// behind the queued dispatch; its round must still succeed.
TEST_F(EpCudaNormal, HandleDestroyDoesNotWaitForTheDevice) {
  GatedEp gated(comm_);
  ASSERT_NO_FATAL_FAILURE(gated.Setup());
  moecommEpHandle_t handle = nullptr;
  ASSERT_EQ(gated.Dispatch(0, &handle), moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(moecommEpHandleDestroy(handle), moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(cudaStreamSynchronize(gated.Stream(0)), cudaSuccess);
  ASSERT_NO_FATAL_FAILURE(gated.CloseGate(0));
  const moecommResult_t dispatched = gated.Dispatch(0, &handle);
  const moecommResult_t destroyed = dispatched == moecommSuccess ? moecommEpHandleDestroy(handle) : dispatched;
  gated.OpenGate();
  ASSERT_EQ(dispatched, moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(destroyed, moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(cudaStreamSynchronize(gated.Stream(0)), cudaSuccess);
  EXPECT_EQ(gated.GateStatus(), 1) << "moecommEpHandleDestroy returned only after the gate kernel timed out: it "
                                      "waited for the device";
  ASSERT_EQ(gated.Dispatch(0, &handle), moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(moecommEpHandleDestroy(handle), moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(cudaStreamSynchronize(gated.Stream(0)), cudaSuccess);
  gated.ExpectNoNewAsyncError();
}

// A pooled routing block taken on another stream waits (on the device) for the last launch
// that used it: handle A's dispatch is held on stream 0 by the gate and A destroyed; handle B
// then takes A's block for a dispatch on stream 1, which must not run before the gate opens
// (after 200 ms stream 1 is still busy), and both finish once it opens.
TEST_F(EpCudaNormal, PooledRoutingWaitsForItsLastUseOnAnotherStream) {
  GatedEp gated(comm_);
  ASSERT_NO_FATAL_FAILURE(gated.Setup());
  moecommEpHandle_t a = nullptr, b = nullptr;
  ASSERT_NO_FATAL_FAILURE(gated.CloseGate(0));
  const moecommResult_t dispatchedA = gated.Dispatch(0, &a);
  const moecommResult_t destroyedA = dispatchedA == moecommSuccess ? moecommEpHandleDestroy(a) : dispatchedA;
  const moecommResult_t dispatchedB = destroyedA == moecommSuccess ? gated.Dispatch(1, &b) : destroyedA;
  usleep(200000);
  const cudaError_t early = cudaStreamQuery(gated.Stream(1));
  gated.OpenGate();
  ASSERT_EQ(dispatchedA, moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(destroyedA, moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(dispatchedB, moecommSuccess) << moecommGetLastError(comm_);
  EXPECT_EQ(early, cudaErrorNotReady) << "stream 1's dispatch ran while the block's last use on stream 0 was held";
  ASSERT_EQ(cudaStreamSynchronize(gated.Stream(0)), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(gated.Stream(1)), cudaSuccess);
  EXPECT_EQ(gated.GateStatus(), 1);
  EXPECT_EQ(moecommEpHandleDestroy(b), moecommSuccess) << moecommGetLastError(comm_);
  gated.ExpectNoNewAsyncError();
}

// moecommEpGetBufferSizeHint on a CUDA communicator describes the CUDA backend's buffers:
// create refuses bufferBytes one below it (on every rank) and accepts it, and the device
// memory an EP takes is at least the hint and not far above it (routing pools, state). The
// shape is W-decode's, where the host backend's segment would be ~1 GB.
TEST_F(EpCudaNormal, BufferSizeHint) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = 128 * nranks_;
  config.hidden = 7168;
  config.maxTokensPerRank = 128;
  config.topk = 8;
  config.numSms = 24;
  config.mode = moecommEpModeNormal;
  size_t normal = 0;
  ASSERT_EQ(moecommEpGetBufferSizeHint(comm_, &config, &normal), moecommSuccess) << moecommGetLastError(comm_);
  config.mode = moecommEpModeBoth;
  size_t both = 0;
  ASSERT_EQ(moecommEpGetBufferSizeHint(comm_, &config, &both), moecommSuccess) << moecommGetLastError(comm_);
  EXPECT_GT(normal, 0u);
  EXPECT_GT(both, normal);  // the low-latency buffer comes on top
  std::printf("[EpCudaNormal rank %d] hint: normal %zu bytes, both %zu bytes\n", rank_, normal, both);
  moecommEp_t ep = nullptr;
  config.bufferBytes = both - 1;
  EXPECT_EQ(moecommEpCreate(comm_, &config, &ep), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(comm_)).find("bufferBytes"), std::string::npos)
      << moecommGetLastError(comm_);
  config.bufferBytes = both;
  size_t freeBefore = 0, freeAfter = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&freeBefore, &total), cudaSuccess);
  ASSERT_EQ(moecommEpCreate(comm_, &config, &ep), moecommSuccess) << moecommGetLastError(comm_);
  ASSERT_EQ(cudaMemGetInfo(&freeAfter, &total), cudaSuccess);
  const int64_t used = static_cast<int64_t>(freeBefore) - static_cast<int64_t>(freeAfter);
  std::printf("[EpCudaNormal rank %d] EP create took %lld bytes of device memory\n", rank_,
              static_cast<long long>(used));
  const int64_t bound = static_cast<int64_t>(both) + (int64_t{256} << 20);
  if (Gpu().ranksOnDevice == 1) {
    EXPECT_GE(used, static_cast<int64_t>(both));
    EXPECT_LT(used, bound);
  } else {
    // Ranks sharing this GPU (MOECOMM_TEST_SHARED_GPUS) allocate and free at the same time,
    // and cudaMemGetInfo counts theirs too: only the bound over all of them holds.
    EXPECT_LT(used, Gpu().ranksOnDevice * bound);
  }
  EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << moecommGetLastError(comm_);
}

// Ranks that reuse handles of different routings (a misuse, docs/ep-semantics.md) are told:
// two handles are made, routing A (every token to the last rank's experts) and routing B
// (every token to rank 0's); then rank 0 dispatches again with A and the others with B, recvX
// in moecommMemAlloc memory at one offset (direct dispatch, whose receivers take the spans
// from the handle). Rank 0 expects no rows from the others (its handle A) and gets every
// token of each; the last rank expects none from rank 0 (B) and gets all of them: both
// report moecommInvalidArgument. A rank in between finds what its handle says, so no error.
// The call still ends (no timeout). Kept last: the communicator's asynchronous error stays set.
TEST_F(EpCudaNormal, MismatchedHandlesAreReported) {
  constexpr int kT = kSmallT, kH = kSmallH, kK = kSmallK;
  moecommResult_t before = moecommSuccess;
  moecommCommGetAsyncError(comm_, &before);
  ASSERT_EQ(before, moecommSuccess) << "an earlier test left an asynchronous error; this one needs none";
  const moecommEpConfig_t config = SmallEpConfig(nranks_);
  const int E = config.numExperts;
  moecommEp_t ep = nullptr;
  ASSERT_EQ(moecommEpCreate(comm_, &config, &ep), moecommSuccess) << moecommGetLastError(comm_);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    DeviceBuffer x, idxA, idxB, recvX;
    const size_t recvBytes = static_cast<size_t>(nranks_) * kT * kH * 2;
    ASSERT_EQ(x.Allocate(static_cast<size_t>(kT) * kH * 2), cudaSuccess);
    ASSERT_EQ(idxA.Allocate(static_cast<size_t>(kT) * kK * 8), cudaSuccess);
    ASSERT_EQ(idxB.Allocate(static_cast<size_t>(kT) * kK * 8), cudaSuccess);
    ASSERT_EQ(recvX.AllocateSymmetric(comm_, recvBytes, recvBytes, 0), "");
    std::vector<int64_t> a(static_cast<size_t>(kT) * kK), b(a.size());
    for (int t = 0; t < kT; ++t) {
      for (int k = 0; k < kK; ++k) {
        a[static_cast<size_t>(t) * kK + k] = E - kK + k;  // the last rank's experts only
        b[static_cast<size_t>(t) * kK + k] = k;           // rank 0's experts only
      }
    }
    ASSERT_EQ(idxA.Upload(a, stream), cudaSuccess);
    ASSERT_EQ(idxB.Upload(b, stream), cudaSuccess);
    ASSERT_EQ(cudaMemsetAsync(x.get(), 0, x.bytes(), stream), cudaSuccess);
    auto dispatch = [&](const DeviceBuffer* idx, moecommEpHandle_t* handle) {
      return DispatchBf16(ep, nranks_, kT, x.get(), idx != nullptr ? idx->get() : nullptr, recvX.get(), handle, stream);
    };
    moecommEpHandle_t handleA = nullptr, handleB = nullptr;
    ASSERT_EQ(dispatch(&idxA, &handleA), moecommSuccess) << moecommGetLastError(comm_);
    ASSERT_EQ(dispatch(&idxB, &handleB), moecommSuccess) << moecommGetLastError(comm_);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    moecommResult_t now = moecommSuccess;
    moecommCommGetAsyncError(comm_, &now);
    ASSERT_EQ(now, moecommSuccess) << "the two routing dispatches reported " << moecommGetErrorString(now);
    moecommEpHandle_t mine = rank_ == 0 ? handleA : handleB;
    EXPECT_EQ(dispatch(nullptr, &mine), moecommSuccess) << moecommGetLastError(comm_);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    moecommCommGetAsyncError(comm_, &now);
    const bool told = rank_ == 0 || rank_ == nranks_ - 1;
    EXPECT_EQ(now, told ? moecommInvalidArgument : moecommSuccess) << moecommGetErrorString(now);
    EXPECT_EQ(moecommEpHandleDestroy(handleA), moecommSuccess);
    EXPECT_EQ(moecommEpHandleDestroy(handleB), moecommSuccess);
  }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_EQ(moecommEpDestroy(ep), moecommSuccess) << moecommGetLastError(comm_);
}

}  // namespace
}  // namespace moecomm_gpu_test
