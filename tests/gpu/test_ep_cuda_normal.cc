// The CUDA EP backend, normal mode, against the pure host reference (src/ep/host_reference.h),
// element by element and bitwise. Runs under `moecomm-run -n N moecomm_gpu_tests
// --gtest_filter=EpCudaNormal.*`. Every rank generates every rank's inputs from one seed
// (hashed from MOECOMM_UNIQUE_ID), so each can compute its own expected outputs locally.
// One line per case and rank: PASS, or FAIL with the first mismatch.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/comm.h"
#include "ep/dtype.h"
#include "ep/host_reference.h"
#include "gpu/gpu_common.h"
#include "moecomm.h"

namespace moecomm_gpu_test {
namespace {

namespace ref = moecomm::reference;

struct Case {
  int hidden;
  int tokens;
  int topk;
  int experts;
  bool fp8;
  bool idx64;
  int alignment;
  bool exact;
  bool reuse;
  bool bias;
  bool weights;
  bool emptyRank1;  // rank 1 sends no tokens
  std::string Name() const {
    char text[200];
    std::snprintf(text, sizeof(text), "H%d_T%d_K%d_E%d_%s_%s_a%d_%s%s%s%s%s", hidden, tokens, topk, experts,
                  fp8 ? "fp8" : "bf16", idx64 ? "i64" : "i32", alignment, exact ? "exact" : "worst",
                  reuse ? "_reuse" : "", bias ? "_bias" : "", weights ? "_w" : "", emptyRank1 ? "_empty1" : "");
    return text;
  }
};

// Everything one rank feeds in, generated identically on every rank.
struct RankInput {
  int numTokens = 0;
  std::vector<int64_t> topkIdx;  // [T, K]
  std::vector<uint8_t> x;        // [T, rowBytes]
  std::vector<float> scales;     // [T, H/128]
  std::vector<float> weights;    // [T, K]
  std::vector<uint16_t> bias;    // [T, H]
};

uint64_t BaseSeed() {
  const char* id = std::getenv("MOECOMM_UNIQUE_ID");
  return std::hash<std::string>()(id != nullptr ? id : "moecomm");
}

RankInput MakeInput(const Case& c, int rank, int nranks, uint64_t seed) {
  std::mt19937_64 rng(seed * 1315423911u + rank * 7919u + 17);
  RankInput in;
  in.numTokens = (c.emptyRank1 && rank == 1) ? 0 : c.tokens;
  const size_t T = in.numTokens;
  const size_t rowBytes = static_cast<size_t>(c.hidden) * (c.fp8 ? 1 : 2);
  in.topkIdx.resize(T * c.topk);
  for (size_t t = 0; t < T; ++t) {
    for (int k = 0; k < c.topk; ++k) {
      int64_t e = -1;
      if (rng() % 10 != 0) {
        for (int attempt = 0; attempt < 100; ++attempt) {
          e = static_cast<int64_t>(rng() % c.experts);
          bool repeated = false;
          for (int j = 0; j < k; ++j) repeated = repeated || in.topkIdx[t * c.topk + j] == e;
          if (!repeated) break;
          e = -1;
        }
      }
      in.topkIdx[t * c.topk + k] = e;
    }
  }
  in.x.resize(T * rowBytes);
  std::uniform_real_distribution<float> value(-2.0f, 2.0f);
  if (c.fp8) {
    for (auto& b : in.x) {
      b = static_cast<uint8_t>(rng());
      if ((b & 0x7f) == 0x7f) b = 0;
    }
  } else {
    for (size_t i = 0; i < T * c.hidden; ++i) {
      const uint16_t v = moecomm::floatToBf16(value(rng));
      std::memcpy(in.x.data() + 2 * i, &v, 2);
    }
  }
  in.scales.resize(T * (c.hidden / 128));
  for (auto& s : in.scales) s = value(rng);
  in.weights.resize(T * c.topk);
  for (auto& w : in.weights) w = value(rng);
  in.bias.resize(T * c.hidden);
  for (auto& b : in.bias) b = moecomm::floatToBf16(value(rng));
  return in;
}

// What receiving rank r feeds into the combine: [N, H] BF16 and [N, K] weights.
void MakeCombineInput(const Case& c, int rank, int rows, uint64_t seed, std::vector<uint16_t>* x,
                      std::vector<float>* weights) {
  std::mt19937_64 rng(seed * 2654435761u + rank * 104729u + 5);
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  x->resize(static_cast<size_t>(rows) * c.hidden);
  for (auto& v : *x) v = moecomm::floatToBf16(value(rng));
  weights->resize(static_cast<size_t>(rows) * c.topk);
  for (auto& w : *weights) w = value(rng);
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(T) + 16), cudaSuccess);
  if (!host.empty()) {
    EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return static_cast<T*>(p);
}

void* Poisoned(size_t bytes) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, bytes + 16), cudaSuccess);
  EXPECT_EQ(cudaMemset(p, 0xFF, bytes + 16), cudaSuccess);
  return p;
}

// Compares bytes; on mismatch fills *why with the first differing element (elemBytes wide).
bool SameBytes(const char* what, const void* expected, const void* device, size_t bytes, size_t elemBytes,
               std::string* why) {
  std::vector<uint8_t> got(bytes);
  if (bytes > 0 && cudaMemcpy(got.data(), device, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    *why = std::string(what) + ": cudaMemcpy failed";
    return false;
  }
  const uint8_t* want = static_cast<const uint8_t*>(expected);
  for (size_t i = 0; i < bytes; ++i) {
    if (got[i] == want[i]) continue;
    const size_t elem = i / elemBytes;
    uint64_t g = 0, w = 0;
    std::memcpy(&g, got.data() + elem * elemBytes, std::min<size_t>(elemBytes, 8));
    std::memcpy(&w, want + elem * elemBytes, std::min<size_t>(elemBytes, 8));
    char text[256];
    std::snprintf(text, sizeof(text), "%s[%zu]: got 0x%llx expected 0x%llx", what, elem,
                  static_cast<unsigned long long>(g), static_cast<unsigned long long>(w));
    *why = text;
    return false;
  }
  return true;
}

class EpCudaNormal : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Gpu().multiProcess) GTEST_SKIP() << "EpCudaNormal runs under moecomm-run";
    if (!Gpu().multiProcessSkip.empty()) GTEST_SKIP() << Gpu().multiProcessSkip;
    comm_ = Gpu().comm;
    rank_ = comm_->rank;
    nranks_ = comm_->nranks;
    ASSERT_EQ(cudaSetDevice(Gpu().device), cudaSuccess);
  }

  // Runs one case; returns "" on success, else the first mismatch.
  std::string Run(const Case& c, uint64_t seed);

  moecommComm_t comm_ = nullptr;
  int rank_ = 0;
  int nranks_ = 1;
};

#define CASE_REQUIRE(cond, text) \
  do {                           \
    if (!(cond)) {               \
      return text;               \
    }                            \
  } while (0)

std::string EpCudaNormal::Run(const Case& c, uint64_t seed) {
  const int R = nranks_;
  const int maxT = 128;
  ref::EpShape shape;
  shape.numRanks = R;
  shape.numExperts = c.experts;
  shape.hidden = c.hidden;
  shape.topk = c.topk;
  shape.maxTokensPerRank = maxT;
  const int L = c.experts / R;
  const size_t rowBytes = static_cast<size_t>(c.hidden) * (c.fp8 ? 1 : 2);
  const int spr = c.hidden / 128;

  std::vector<RankInput> inputs;
  for (int r = 0; r < R; ++r) inputs.push_back(MakeInput(c, r, R, seed));
  std::vector<int> perRankAll(R * R), perExpertAll(R * c.experts);
  std::vector<std::vector<uint8_t>> inRank(R);
  for (int r = 0; r < R; ++r) {
    inRank[r].resize(static_cast<size_t>(inputs[r].numTokens) * R);
    ref::computeLayout(shape, inputs[r].topkIdx.data(), inputs[r].numTokens, perRankAll.data() + r * R,
                       perExpertAll.data() + r * c.experts, inRank[r].data());
  }
  const int N = ref::numRecvTokens(shape, perRankAll.data(), rank_);
  std::vector<ref::DispatchSource> sources(R);
  for (int r = 0; r < R; ++r) {
    sources[r].numTokens = inputs[r].numTokens;
    sources[r].isTokenInRank = inRank[r].data();
    sources[r].x = inputs[r].x.data();
    sources[r].xScales = inputs[r].scales.data();
    sources[r].topkIdx = inputs[r].topkIdx.data();
    sources[r].topkWeights = inputs[r].weights.data();
  }
  std::vector<uint8_t> wantX(N * rowBytes);
  std::vector<float> wantScales(static_cast<size_t>(N) * spr), wantW(static_cast<size_t>(N) * c.topk);
  std::vector<int64_t> wantIdx64(static_cast<size_t>(N) * c.topk);
  std::vector<int> srcRank(N), srcIndex(N);
  ref::DispatchOutput out;
  out.recvX = wantX.data();
  out.recvXScales = c.fp8 ? wantScales.data() : nullptr;
  out.recvTopkIdx = wantIdx64.data();
  out.recvTopkWeights = wantW.data();
  out.srcRank = srcRank.data();
  out.srcIndex = srcIndex.data();
  ref::dispatchGather(shape, rank_, sources.data(), rowBytes, out);
  std::vector<uint8_t> wantIdx(wantIdx64.size() * (c.idx64 ? 8 : 4));
  ref::narrowTopkIdx(wantIdx64.data(), wantIdx64.size(), c.idx64 ? moecommInt64 : moecommInt32, wantIdx.data());
  std::vector<int> wantPerExpert(L);
  ref::recvTokensPerExpert(shape, perExpertAll.data(), rank_, c.alignment, wantPerExpert.data());

  // Device inputs.
  const RankInput& mine = inputs[rank_];
  const int T = mine.numTokens;
  std::vector<int32_t> idx32(mine.topkIdx.begin(), mine.topkIdx.end());
  void* dIdx = c.idx64 ? static_cast<void*>(ToDevice(mine.topkIdx)) : static_cast<void*>(ToDevice(idx32));
  uint8_t* dX = ToDevice(mine.x);
  float* dScales = ToDevice(mine.scales);
  float* dWeights = ToDevice(mine.weights);
  uint16_t* dBias = ToDevice(mine.bias);
  cudaStream_t stream;
  CASE_REQUIRE(cudaStreamCreate(&stream) == cudaSuccess, "cudaStreamCreate failed");

  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = c.experts;
  config.hidden = c.hidden;
  config.maxTokensPerRank = maxT;
  config.topk = c.topk;
  moecommEp_t ep = nullptr;
  CASE_REQUIRE(moecommEpCreate(comm_, &config, &ep) == moecommSuccess,
               std::string("moecommEpCreate: ") + moecommGetLastError(comm_));

  moecommEpHandle_t handle = nullptr;
  std::string why;
  const int capacity = c.exact ? N : R * maxT;
  if (c.exact) {
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = T;
    args.topkIdx = dIdx;
    args.topkIdxType = c.idx64 ? moecommInt64 : moecommInt32;
    args.expertAlignment = c.alignment;
    int n = -1;
    std::vector<int> perExpert(L, -7);
    CASE_REQUIRE(moecommEpNotifyDispatch(ep, &args, &handle, &n, perExpert.data(), stream) == moecommSuccess,
                 std::string("notify: ") + moecommGetLastError(comm_));
    CASE_REQUIRE(n == N, "notify numRecvTokens " + std::to_string(n) + " expected " + std::to_string(N));
    CASE_REQUIRE(perExpert == wantPerExpert, "notify recvTokensPerExpert differs");
  }
  const int passes = c.reuse ? 2 : 1;
  for (int pass = 0; pass < passes && why.empty(); ++pass) {
    void* rX = Poisoned(capacity * rowBytes);
    float* rScales = static_cast<float*>(Poisoned(static_cast<size_t>(capacity) * spr * 4));
    void* rIdx = Poisoned(static_cast<size_t>(capacity) * c.topk * 8);
    float* rW = static_cast<float*>(Poisoned(static_cast<size_t>(capacity) * c.topk * 4));
    int* rN = static_cast<int*>(Poisoned(4));
    int* rPer = static_cast<int*>(Poisoned(4 * L));
    moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
    args.numTokens = T;
    args.xType = c.fp8 ? moecommFloat8E4M3 : moecommBfloat16;
    args.x = dX;
    args.xScales = c.fp8 ? dScales : nullptr;
    args.topkIdx = dIdx;
    args.topkIdxType = c.idx64 ? moecommInt64 : moecommInt32;
    args.topkWeights = c.weights ? dWeights : nullptr;
    args.expertAlignment = c.alignment;
    args.recvCapacity = capacity;
    args.recvX = rX;
    args.recvXScales = c.fp8 ? rScales : nullptr;
    args.recvTopkIdx = rIdx;
    args.recvTopkWeights = c.weights ? rW : nullptr;
    args.numRecvTokens = rN;
    args.recvTokensPerExpert = rPer;
    if (moecommEpDispatch(ep, &args, &handle, stream) != moecommSuccess) {
      why = std::string("dispatch: ") + moecommGetLastError(comm_);
    } else if (cudaStreamSynchronize(stream) != cudaSuccess) {
      why = "cudaStreamSynchronize after dispatch failed";
    } else {
      moecommResult_t async = moecommSuccess;
      moecommCommGetAsyncError(comm_, &async);
      const std::string tag = "pass" + std::to_string(pass) + " ";
      if (async != moecommSuccess) why = tag + "async error " + std::to_string(async);
      if (why.empty()) SameBytes((tag + "numRecvTokens").c_str(), &N, rN, 4, 4, &why);
      if (why.empty()) SameBytes((tag + "recvTokensPerExpert").c_str(), wantPerExpert.data(), rPer, 4 * L, 4, &why);
      if (why.empty()) SameBytes((tag + "recvX").c_str(), wantX.data(), rX, wantX.size(), c.fp8 ? 1 : 2, &why);
      if (why.empty() && c.fp8) {
        SameBytes((tag + "recvXScales").c_str(), wantScales.data(), rScales, wantScales.size() * 4, 4, &why);
      }
      if (why.empty()) {
        SameBytes((tag + "recvTopkIdx").c_str(), wantIdx.data(), rIdx, wantIdx.size(), c.idx64 ? 8 : 4, &why);
      }
      if (why.empty() && c.weights) {
        SameBytes((tag + "recvTopkWeights").c_str(), wantW.data(), rW, wantW.size() * 4, 4, &why);
      }
    }
    for (void* p : {rX, static_cast<void*>(rScales), rIdx, static_cast<void*>(rW), static_cast<void*>(rN),
                    static_cast<void*>(rPer)}) {
      cudaFree(p);
    }
  }

  // Combine: every receiving rank's input is known everywhere, so the expectation is local.
  if (why.empty()) {
    std::vector<std::vector<uint16_t>> cx(R);
    std::vector<std::vector<float>> cw(R);
    std::vector<ref::CombineSource> receivers(R);
    for (int r = 0; r < R; ++r) {
      MakeCombineInput(c, r, ref::numRecvTokens(shape, perRankAll.data(), r), seed, &cx[r], &cw[r]);
      receivers[r].x = cx[r].data();
      receivers[r].topkWeights = cw[r].data();
    }
    std::vector<uint16_t> wantOut(static_cast<size_t>(T) * c.hidden);
    std::vector<float> wantOutW(static_cast<size_t>(T) * c.topk);
    ref::combineReduce(shape, rank_, T, inRank[rank_].data(), perRankAll.data(), receivers.data(),
                       c.bias ? mine.bias.data() : nullptr, wantOut.data(), c.weights ? wantOutW.data() : nullptr);
    uint16_t* dcx = ToDevice(cx[rank_]);
    float* dcw = ToDevice(cw[rank_]);
    void* outX = Poisoned(wantOut.size() * 2);
    float* outW = static_cast<float*>(Poisoned(wantOutW.size() * 4));
    moecommEpCombineArgs_t args = MOECOMM_EP_COMBINE_ARGS_INIT;
    args.x = dcx;
    args.topkWeights = c.weights ? dcw : nullptr;
    args.bias = c.bias ? dBias : nullptr;
    args.combinedX = outX;
    args.combinedTopkWeights = c.weights ? outW : nullptr;
    if (moecommEpCombine(ep, &args, handle, stream) != moecommSuccess) {
      why = std::string("combine: ") + moecommGetLastError(comm_);
    } else if (cudaStreamSynchronize(stream) != cudaSuccess) {
      why = "cudaStreamSynchronize after combine failed";
    } else {
      moecommResult_t async = moecommSuccess;
      moecommCommGetAsyncError(comm_, &async);
      if (async != moecommSuccess) why = "combine async error " + std::to_string(async);
      if (why.empty()) SameBytes("combinedX", wantOut.data(), outX, wantOut.size() * 2, 2, &why);
      if (why.empty() && c.weights) {
        SameBytes("combinedTopkWeights", wantOutW.data(), outW, wantOutW.size() * 4, 4, &why);
      }
    }
    cudaFree(dcx);
    cudaFree(dcw);
    cudaFree(outX);
    cudaFree(outW);
  }

  if (handle != nullptr) moecommEpHandleDestroy(handle);
  if (moecommEpDestroy(ep) != moecommSuccess && why.empty()) why = std::string("destroy: ") + moecommGetLastError(comm_);
  cudaStreamDestroy(stream);
  for (void* p : {dIdx, static_cast<void*>(dX), static_cast<void*>(dScales), static_cast<void*>(dWeights),
                  static_cast<void*>(dBias)}) {
    cudaFree(p);
  }
  return why;
}

TEST_F(EpCudaNormal, MatchesHostReference) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<Case> cases = {
      // H, T, K, E, fp8, idx64, align, exact, reuse, bias, weights, emptyRank1
      {2048, 128, 8, 16, false, true, 1, false, false, false, true, false},
      {2048, 128, 8, 16, false, false, 4, true, true, true, true, false},
      {2048, 128, 1, 32, true, true, 4, false, true, false, true, false},
      {2048, 128, 8, 32, true, false, 1, true, false, true, false, true},
      {7168, 128, 8, 16, false, true, 4, true, false, true, true, false},
      {7168, 128, 8, 32, true, true, 1, false, false, true, true, true},
      {7168, 100, 1, 16, false, false, 1, false, true, false, false, false},
  };
  const uint64_t seed = BaseSeed();
  int failures = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (cases[i].experts % nranks_ != 0) continue;
    const std::string why = Run(cases[i], seed + i);
    std::printf("[EpCudaNormal rank %d] %s: %s%s\n", rank_, cases[i].Name().c_str(), why.empty() ? "PASS" : "FAIL ",
                why.c_str());
    std::fflush(stdout);
    if (!why.empty()) ++failures;
  }
  EXPECT_EQ(failures, 0);
}

}  // namespace
}  // namespace moecomm_gpu_test
