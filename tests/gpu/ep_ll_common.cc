// Shared by the CUDA low-latency tests (test_ep_cuda_ll.cc and the own-job suites _kill,
// _failure, _format): every rank's inputs from one seed, the host-reference expectations,
// device buffers and checks.
#include "gpu/ep_ll_common.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>

#include "core/comm.h"
#include "ep/dtype.h"
#include "ep/ep.h"
#include "gpu/gpu_common.h"

namespace moecomm_gpu_test {

uint64_t BaseSeed() {
  const char* id = std::getenv("MOECOMM_UNIQUE_ID");
  return std::hash<std::string>()(id != nullptr ? id : "moecomm-ll");
}

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

ref::EpShape MakeShape(int nranks, int experts, int hidden, int topk, int maxTokens) {
  ref::EpShape shape;
  shape.numRanks = nranks;
  shape.numExperts = ExpertsFor(experts, nranks);
  shape.hidden = hidden;
  shape.topk = topk;
  shape.maxTokensPerRank = maxTokens;
  return shape;
}

RankInput MakeRankInput(const ref::EpShape& shape, int tokens, int rank, uint64_t seed) {
  std::mt19937_64 rng(Mix(seed * 1315423911u + rank * 7919u + 17));
  RankInput in;
  in.numTokens = rank % 2 == 0 ? tokens : std::max(1, tokens / 2);
  const size_t T = in.numTokens;
  const int K = shape.topk;
  in.topkIdx.resize(T * K);
  for (size_t t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      int64_t e = -1;
      const uint64_t roll = rng() % 100;
      if (roll < 3 && k > 0) {
        e = in.topkIdx[t * K + rng() % k];  // a repeated expert (may be -1)
      } else if (roll >= 10) {
        for (int attempt = 0; attempt < 100; ++attempt) {
          e = static_cast<int64_t>(rng() % shape.numExperts);
          bool repeated = false;
          for (int j = 0; j < k; ++j) repeated = repeated || in.topkIdx[t * K + j] == e;
          if (!repeated) break;
          e = -1;
        }
      }
      in.topkIdx[t * K + k] = e;
    }
  }
  in.x.resize(T * shape.hidden);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  for (size_t t = 0; t < T; ++t) {
    for (int block = 0; block < shape.hidden / 128; ++block) {
      const uint64_t kind = rng() % 50;
      const float magnitude = kind == 0 ? 0.0f : std::ldexp(1.0f, static_cast<int>(rng() % 24) - 12);
      for (int c = block * 128; c < (block + 1) * 128; ++c) {
        in.x[t * shape.hidden + c] = moecomm::floatToBf16(value(rng) * magnitude);
      }
    }
  }
  in.weights.resize(T * K);
  for (auto& w : in.weights) w = value(rng);
  return in;
}

AllInputs MakeAllInputs(const ref::EpShape& shape, int tokens, uint64_t seed) {
  AllInputs all;
  all.placementAll.resize(static_cast<size_t>(shape.numRanks) * shape.numExperts);
  for (int r = 0; r < shape.numRanks; ++r) {
    all.ranks.push_back(MakeRankInput(shape, tokens, r, seed));
    ref::lowLatencyPlacementCounts(shape, all.ranks[r].topkIdx.data(), all.ranks[r].numTokens,
                                   all.placementAll.data() + static_cast<size_t>(r) * shape.numExperts);
  }
  return all;
}

// The expert output a rank's "experts" produce for its row (le, slot): a pure function.
uint16_t ExpertValue(uint64_t seed, int rank, int le, int slot, int h) {
  const uint64_t bits = Mix(seed ^ (static_cast<uint64_t>(rank) << 56) ^ (static_cast<uint64_t>(le) << 40) ^
                            (static_cast<uint64_t>(slot) << 20) ^ static_cast<uint64_t>(h));
  // A BF16 in about [-4, 4] with a random mantissa.
  const float v = static_cast<float>(static_cast<int>(bits & 0xffff) - 32768) / 8192.0f;
  return moecomm::floatToBf16(v);
}

// Rows [le][slot] for slot < counts[le] filled with ExpertValue, the rest 0xffff (a NaN, so a
// row read by mistake shows up in the combine).
std::vector<uint16_t> ExpertOutputs(const ref::EpShape& shape, uint64_t seed, int rank, const int* counts,
                                    bool fillAll) {
  const int L = shape.expertsPerRank();
  const int S = shape.lowLatencySlotsPerExpert();
  std::vector<uint16_t> y(static_cast<size_t>(L) * S * shape.hidden, 0xffff);
  for (int le = 0; le < L; ++le) {
    const int rows = fillAll ? S : counts[le];
    for (int slot = 0; slot < rows; ++slot) {
      uint16_t* row = y.data() + (static_cast<size_t>(le) * S + slot) * shape.hidden;
      for (int h = 0; h < shape.hidden; ++h) row[h] = ExpertValue(seed, rank, le, slot, h);
    }
  }
  return y;
}

size_t RecvRowBytes(const ref::EpShape& shape, bool fp8) { return static_cast<size_t>(shape.hidden) * (fp8 ? 1 : 2); }
size_t ScaleBytesPerRow(const ref::EpShape& shape, const DispatchFlags& f) {
  return f.fp8 ? static_cast<size_t>(shape.hidden / 128) * (f.ue8m0 ? 1 : 4) : 0;
}

ExpectedDispatch ExpectDispatch(const ref::EpShape& shape, const AllInputs& in, int me, const int* myMask,
                                const DispatchFlags& f, const std::vector<int>& cumulativeBefore) {
  const size_t rows = static_cast<size_t>(shape.expertsPerRank()) * shape.lowLatencySlotsPerExpert();
  ExpectedDispatch want;
  want.x.assign(rows * RecvRowBytes(shape, f.fp8), 0xff);
  want.scales.assign(rows * ScaleBytesPerRow(shape, f), 0xff);
  want.count.assign(shape.expertsPerRank(), 0);
  want.srcInfo.assign(rows, -1);
  want.cumulative = cumulativeBefore;
  std::vector<ref::LowLatencySource> sources(shape.numRanks);
  for (int r = 0; r < shape.numRanks; ++r) {
    sources[r].numTokens = in.ranks[r].numTokens;
    sources[r].topkIdx = in.ranks[r].topkIdx.data();
    sources[r].x = in.ranks[r].x.data();
  }
  ref::LowLatencyDispatchOutput out;
  out.recvType = f.fp8 ? moecommFloat8E4M3 : moecommBfloat16;
  out.roundScale = f.roundScale || f.ue8m0;
  out.ue8m0 = f.ue8m0;
  out.recvX = want.x.data();
  out.recvScales = f.fp8 ? want.scales.data() : nullptr;
  out.recvCount = want.count.data();
  out.recvSrcInfo = want.srcInfo.data();
  out.cumulativeRecvStats = want.cumulative.data();
  ref::lowLatencyPack(shape, me, sources.data(), myMask, out);
  return want;
}

// Expected combine output of rank me. masksAll: [R receiving][R source] or null; myMask: the
// mask on rank me at combine time (or null).
std::vector<uint16_t> ExpectCombine(const ref::EpShape& shape, const AllInputs& in, int me, const int* masksAll,
                                    const int* myMask, uint64_t ySeed, bool perRank) {
  const RankInput& mine = in.ranks[me];
  const int K = shape.topk;
  const size_t entries = static_cast<size_t>(mine.numTokens) * K;
  std::vector<int> slots(entries);
  ref::lowLatencySelectionSlots(shape, me, mine.topkIdx.data(), mine.numTokens, in.placementAll.data(), masksAll,
                                slots.data());
  std::vector<uint16_t> storage(entries * shape.hidden);
  std::vector<const uint16_t*> rows(entries, nullptr);
  for (size_t entry = 0; entry < entries; ++entry) {
    const int64_t e = mine.topkIdx[entry];
    if (e == -1 || slots[entry] == -1) continue;
    const int rank = shape.rankOfExpert(e);
    if (myMask != nullptr && myMask[rank] != 0) continue;
    uint16_t* row = storage.data() + entry * shape.hidden;
    const int le = static_cast<int>(e % shape.expertsPerRank());
    for (int h = 0; h < shape.hidden; ++h) row[h] = ExpertValue(ySeed, rank, le, slots[entry], h);
    rows[entry] = row;
  }
  std::vector<uint16_t> out(static_cast<size_t>(mine.numTokens) * shape.hidden);
  if (perRank) {
    ref::lowLatencyCombineRowsPerRank(shape, mine.numTokens, mine.topkIdx.data(), mine.weights.data(), rows.data(),
                                      out.data());
  } else {
    ref::lowLatencyCombineRows(shape, mine.numTokens, mine.weights.data(), rows.data(), out.data());
  }
  return out;
}

void* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes + 16) != cudaSuccess) return nullptr;
  return p;
}

// Compares bytes; on mismatch returns the first differing element (elemBytes wide).
std::string CompareBytes(const std::string& what, const void* expected, const void* device, size_t bytes,
                         size_t elemBytes) {
  std::vector<uint8_t> got(bytes);
  if (bytes > 0 && cudaMemcpy(got.data(), device, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    return what + ": cudaMemcpy failed";
  }
  const uint8_t* want = static_cast<const uint8_t*>(expected);
  if (bytes == 0 || std::memcmp(got.data(), want, bytes) == 0) return "";
  size_t i = 0;
  while (got[i] == want[i]) ++i;
  const size_t elem = i / elemBytes;
  uint64_t g = 0, w = 0;
  std::memcpy(&g, got.data() + elem * elemBytes, std::min<size_t>(elemBytes, 8));
  std::memcpy(&w, want + elem * elemBytes, std::min<size_t>(elemBytes, 8));
  size_t differing = 0;
  for (size_t j = 0; j < bytes; j += elemBytes) differing += std::memcmp(got.data() + j, want + j, elemBytes) != 0;
  char text[300];
  std::snprintf(text, sizeof(text), "%s[%zu]: got 0x%llx expected 0x%llx (%zu of %zu elements differ)", what.c_str(),
                elem, static_cast<unsigned long long>(g), static_cast<unsigned long long>(w), differing,
                bytes / elemBytes);
  return text;
}

std::string CompareDispatch(const std::string& tag, const ExpectedDispatch& want, const DeviceDispatchOut& got,
                            const DispatchFlags& f, bool srcInfo, bool cumulative) {
  std::string why = CompareBytes(tag + "recvCount", want.count.data(), got.count, want.count.size() * 4, 4);
  if (why.empty()) why = CompareBytes(tag + "recvX", want.x.data(), got.x, want.x.size(), f.fp8 ? 1 : 2);
  if (why.empty() && f.fp8) {
    why = CompareBytes(tag + "recvScales", want.scales.data(), got.scales, want.scales.size(), f.ue8m0 ? 1 : 4);
  }
  if (why.empty() && srcInfo) {
    why = CompareBytes(tag + "recvSrcInfo", want.srcInfo.data(), got.srcInfo, want.srcInfo.size() * 4, 4);
  }
  if (why.empty() && cumulative) {
    why = CompareBytes(tag + "cumulativeRecvStats", want.cumulative.data(), got.cumulative, want.cumulative.size() * 4,
                       4);
  }
  return why;
}

std::string AsyncError(moecommComm_t comm, moecommResult_t allowed) {
  moecommResult_t async = moecommSuccess;
  moecommCommGetAsyncError(comm, &async);
  return async == moecommSuccess || async == allowed ? "" : std::string("async error ") + moecommGetErrorString(async);
}

void PrepareRound(const ref::EpShape& shape, const RankInput& input, bool idx64, const DispatchFlags& f,
                  cudaStream_t stream, DeviceInputs* in, DeviceDispatchOut* out) {
  in->Allocate(shape);
  in->Load(input, idx64, stream);
  out->Allocate(shape, f);
  out->Poison(stream);
  cudaMemsetAsync(out->cumulative, 0, shape.expertsPerRank() * 4, stream);
}

void OwnJobTest::Enter(const char* suite, const char* why) {
  if (GTEST_FLAG_GET(filter).find(suite) == std::string::npos) {
    GTEST_SKIP() << why << ": runs only when selected, with --gtest_filter=" << suite << ".*";
  }
  if (!Gpu().multiProcess) GTEST_SKIP() << suite << " runs under moecomm-run";
  if (!Gpu().multiProcessSkip.empty()) GTEST_SKIP() << Gpu().multiProcessSkip;
  if (Gpu().nranks < 2) GTEST_SKIP() << "needs 2 ranks";
  comm_ = Gpu().comm;
  rank_ = Gpu().rank;
  nranks_ = Gpu().nranks;
  ASSERT_EQ(cudaSetDevice(Gpu().device), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
}

void OwnJobTest::TearDown() {
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

moecommResult_t CreateLowLatencyEp(moecommComm_t comm, const ref::EpShape& shape, moecommEp_t* ep, int numSms) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numSms = numSms;
  config.numExperts = shape.numExperts;
  config.hidden = shape.hidden;
  config.maxTokensPerRank = shape.maxTokensPerRank;
  config.topk = shape.topk;
  config.mode = moecommEpModeLowLatency;
  const moecommResult_t result = moecommEpCreate(comm, &config, ep);
  // A run with MOECOMM_LL_TRANSPORT set (gpu_EpCudaLowLatencyStaged_n*) must really use that
  // transport: with one rank there is no peer to reach, and the kernels use none.
  const char* wanted = std::getenv("MOECOMM_LL_TRANSPORT");
  if (result == moecommSuccess && wanted != nullptr && comm->nranks > 1) {
    const char* used = (*ep)->backend->lowLatencyTransport();
    if (std::strcmp(used, wanted) != 0) {
      std::fprintf(stderr, "MOECOMM_LL_TRANSPORT=%s but the EP's low-latency transport is %s\n", wanted, used);
      moecommEpDestroy(*ep);
      *ep = nullptr;
      return moecommInternalError;
    }
  }
  return result;
}

std::string CombineAndCompare(moecommComm_t comm, moecommEp_t ep, const moecommEpLowLatencyCombineArgs_t& args,
                              moecommEpHandle_t handle, cudaStream_t stream, const std::vector<uint16_t>& want,
                              const std::string& tag, moecommResult_t allowedAsync) {
  std::string why;
  if (moecommEpLowLatencyCombine(ep, &args, handle, stream) != moecommSuccess) {
    why = tag + "combine: " + moecommGetLastError(comm);
  } else if (cudaStreamSynchronize(stream) != cudaSuccess) {
    why = tag + "cudaStreamSynchronize after the combine failed";
  }
  if (why.empty()) why = AsyncError(comm, allowedAsync);
  if (why.empty()) why = CompareBytes(tag + "combine out", want.data(), args.out, want.size() * 2, 2);
  return why;
}

moecommEpLowLatencyDispatchArgs_t DispatchArgs(int numTokens, const DeviceInputs& in, bool idx64,
                                               const DispatchFlags& f, const DeviceDispatchOut& out) {
  moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
  args.numTokens = numTokens;
  args.x = in.x;
  args.topkIdx = in.topkIdx;
  args.topkIdxType = idx64 ? moecommInt64 : moecommInt32;
  args.recvType = f.fp8 ? moecommFloat8E4M3 : moecommBfloat16;
  args.flags = (f.roundScale ? MOECOMM_LL_ROUND_SCALE : 0u) | (f.ue8m0 ? MOECOMM_LL_UE8M0 : 0u) |
               (f.perRank ? MOECOMM_LL_PER_RANK_COMBINE : 0u);
  if (f.perRank) args.topkWeights = static_cast<const float*>(in.weights);
  args.recvX = out.x;
  args.recvScales = out.scales;
  args.recvCount = out.count;
  args.recvSrcInfo = out.srcInfo;
  args.cumulativeRecvStats = out.cumulative;
  return args;
}

moecommEpLowLatencyCombineArgs_t CombineArgs(const void* x, const DeviceInputs& in, bool idx64, void* out,
                                             bool perRank) {
  moecommEpLowLatencyCombineArgs_t args = MOECOMM_EP_LL_COMBINE_ARGS_INIT;
  args.x = x;
  args.topkIdx = in.topkIdx;
  args.topkIdxType = idx64 ? moecommInt64 : moecommInt32;
  args.topkWeights = perRank ? nullptr : static_cast<const float*>(in.weights);
  args.out = out;
  return args;
}

}  // namespace moecomm_gpu_test
