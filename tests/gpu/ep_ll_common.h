// Shared by the CUDA low-latency tests (test_ep_cuda_ll.cc, test_ep_cuda_ll_kill.cc): every
// rank generates every rank's inputs from one seed, computes its expectations with the host
// reference (src/ep/host_reference.h), and compares whole device buffers bitwise.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ep/host_reference.h"
#include "moecomm.h"

namespace moecomm_gpu_test {

namespace ref = moecomm::reference;

// A seed shared by every rank of the job: a hash of MOECOMM_UNIQUE_ID.
uint64_t BaseSeed();
// splitmix64's finaliser.
uint64_t Mix(uint64_t x);
// The shape of a test; its expert count is ExpertsFor(experts, nranks).
ref::EpShape MakeShape(int nranks, int experts, int hidden, int topk, int maxTokens);

// One rank's inputs. T differs between ranks (odd ranks send half), some entries are -1, a
// few tokens list an expert twice, and each 128-channel block has its own magnitude so the
// FP8 scales vary (an all-zero block now and then exercises the amax floor).
struct RankInput {
  int numTokens = 0;
  std::vector<int64_t> topkIdx;  // [T, K]
  std::vector<uint16_t> x;       // [T, H] BF16
  std::vector<float> weights;    // [T, K]
};

RankInput MakeRankInput(const ref::EpShape& shape, int tokens, int rank, uint64_t seed);

struct AllInputs {
  std::vector<RankInput> ranks;
  std::vector<int> placementAll;  // [R][E]
};

AllInputs MakeAllInputs(const ref::EpShape& shape, int tokens, uint64_t seed);

// The expert output a rank's "experts" produce for its row (le, slot): a pure function.
uint16_t ExpertValue(uint64_t seed, int rank, int le, int slot, int h);
// Rows [le][slot] for slot < counts[le] (every slot with fillAll) filled with ExpertValue, the
// rest 0xffff (a NaN, so a row read by mistake shows up in the combine).
std::vector<uint16_t> ExpertOutputs(const ref::EpShape& shape, uint64_t seed, int rank, const int* counts,
                                    bool fillAll);

struct DispatchFlags {
  bool fp8 = true;
  bool roundScale = false;
  bool ue8m0 = false;
  bool perRank = false;  // MOECOMM_LL_PER_RANK_COMBINE (the dispatch carries the weights)
};

// Host expectations of one rank's dispatch outputs, poison (0xff bytes) where nothing is written.
struct ExpectedDispatch {
  std::vector<uint8_t> x;
  std::vector<uint8_t> scales;
  std::vector<int> count;
  std::vector<int> srcInfo;
  std::vector<int> cumulative;
};

size_t RecvRowBytes(const ref::EpShape& shape, bool fp8);
size_t ScaleBytesPerRow(const ref::EpShape& shape, const DispatchFlags& f);
// Rank me's dispatch outputs; myMask: the mask on rank me (or null).
ExpectedDispatch ExpectDispatch(const ref::EpShape& shape, const AllInputs& in, int me, const int* myMask,
                                const DispatchFlags& f, const std::vector<int>& cumulativeBefore);
// Expected combine output of rank me. masksAll: [R receiving][R source] or null; myMask: the
// mask on rank me at combine time (or null); perRank: the MOECOMM_LL_PER_RANK_COMBINE form.
std::vector<uint16_t> ExpectCombine(const ref::EpShape& shape, const AllInputs& in, int me, const int* masksAll,
                                    const int* myMask, uint64_t ySeed, bool perRank = false);

// ---- Device buffers ---------------------------------------------------------------------------

// cudaMalloc of bytes (+16), or nullptr.
void* DeviceAlloc(size_t bytes);

template <typename T>
void* ToDevice(const std::vector<T>& host) {
  void* p = DeviceAlloc(host.size() * sizeof(T));
  if (p != nullptr && !host.empty()) cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

struct DeviceInputs {
  void* x = nullptr;
  void* topkIdx = nullptr;
  void* weights = nullptr;
  // Copies rank input `in` into the buffers (sized for maxTokens) on stream.
  void Load(const RankInput& in, bool idx64, cudaStream_t stream) {
    cudaMemcpyAsync(x, in.x.data(), in.x.size() * 2, cudaMemcpyHostToDevice, stream);
    if (idx64) {
      cudaMemcpyAsync(topkIdx, in.topkIdx.data(), in.topkIdx.size() * 8, cudaMemcpyHostToDevice, stream);
    } else {
      std::vector<int32_t> narrow(in.topkIdx.begin(), in.topkIdx.end());
      cudaMemcpyAsync(topkIdx, narrow.data(), narrow.size() * 4, cudaMemcpyHostToDevice, stream);
      cudaStreamSynchronize(stream);  // narrow dies here
    }
    cudaMemcpyAsync(weights, in.weights.data(), in.weights.size() * 4, cudaMemcpyHostToDevice, stream);
  }
  void Allocate(const ref::EpShape& shape) {
    const size_t maxT = shape.maxTokensPerRank;
    x = DeviceAlloc(maxT * shape.hidden * 2);
    topkIdx = DeviceAlloc(maxT * shape.topk * 8);
    weights = DeviceAlloc(maxT * shape.topk * 4);
  }
  void Free() {
    for (void* p : {x, topkIdx, weights}) cudaFree(p);
  }
};

struct DeviceDispatchOut {
  void* x = nullptr;
  void* scales = nullptr;
  int* count = nullptr;
  int* srcInfo = nullptr;
  int* cumulative = nullptr;
  size_t xBytes = 0;
  size_t scaleBytes = 0;
  int localExperts = 0;
  size_t rows = 0;
  void Allocate(const ref::EpShape& shape, const DispatchFlags& f) {
    localExperts = shape.expertsPerRank();
    rows = static_cast<size_t>(localExperts) * shape.lowLatencySlotsPerExpert();
    xBytes = rows * RecvRowBytes(shape, f.fp8);
    scaleBytes = rows * ScaleBytesPerRow(shape, f);
    x = DeviceAlloc(xBytes);
    scales = f.fp8 ? DeviceAlloc(scaleBytes) : nullptr;
    count = static_cast<int*>(DeviceAlloc(localExperts * 4));
    srcInfo = static_cast<int*>(DeviceAlloc(rows * 4));
    cumulative = static_cast<int*>(DeviceAlloc(localExperts * 4));
  }
  void Poison(cudaStream_t stream) {
    cudaMemsetAsync(x, 0xff, xBytes, stream);
    if (scales != nullptr) cudaMemsetAsync(scales, 0xff, scaleBytes, stream);
    cudaMemsetAsync(count, 0xff, localExperts * 4, stream);
    cudaMemsetAsync(srcInfo, 0xff, rows * 4, stream);
  }
  void Free() {
    for (void* p :
         {x, scales, static_cast<void*>(count), static_cast<void*>(srcInfo), static_cast<void*>(cumulative)}) {
      cudaFree(p);
    }
  }
};

// One round's device buffers, queued on stream: the inputs allocated for shape and loaded with
// `input` (ids as int64 when idx64), the dispatch outputs allocated for f and poisoned, and the
// cumulative statistics zeroed. The caller frees both.
void PrepareRound(const ref::EpShape& shape, const RankInput& input, bool idx64, const DispatchFlags& f,
                  cudaStream_t stream, DeviceInputs* in, DeviceDispatchOut* out);

// Compares bytes; on mismatch returns the first differing element (elemBytes wide).
std::string CompareBytes(const std::string& what, const void* expected, const void* device, size_t bytes,
                         size_t elemBytes);
std::string CompareDispatch(const std::string& tag, const ExpectedDispatch& want, const DeviceDispatchOut& got,
                            const DispatchFlags& f, bool srcInfo, bool cumulative);
// "" or "async error <name>" from moecommCommGetAsyncError; `allowed` also reads as "".
std::string AsyncError(moecommComm_t comm, moecommResult_t allowed = moecommSuccess);
// A low-latency EP of `shape` on comm with SM budget numSms (0: the default; the other config
// fields at their defaults).
moecommResult_t CreateLowLatencyEp(moecommComm_t comm, const ref::EpShape& shape, moecommEp_t* ep, int numSms = 0);
// Runs moecommEpLowLatencyCombine(args) on stream, waits for it and compares every element of
// args.out (a device buffer of want.size() BF16 values, poisoned by the caller) with want.
// "" when all matches, else why, prefixed by tag. allowedAsync: an async error already raised
// on comm that is expected (AsyncError's `allowed`).
std::string CombineAndCompare(moecommComm_t comm, moecommEp_t ep, const moecommEpLowLatencyCombineArgs_t& args,
                              moecommEpHandle_t handle, cudaStream_t stream, const std::vector<uint16_t>& want,
                              const std::string& tag, moecommResult_t allowedAsync = moecommSuccess);

// The tests' low-latency call arguments over the buffers above.
moecommEpLowLatencyDispatchArgs_t DispatchArgs(int numTokens, const DeviceInputs& in, bool idx64,
                                               const DispatchFlags& f, const DeviceDispatchOut& out);
// perRank: the handle's dispatch had MOECOMM_LL_PER_RANK_COMBINE, so topkWeights stays NULL.
moecommEpLowLatencyCombineArgs_t CombineArgs(const void* x, const DeviceInputs& in, bool idx64, void* out,
                                             bool perRank = false);

// Base of the low-latency suites that run only in a ctest job of their own, because they leave
// something behind on the communicator (an async error, a dead rank). Enter (from SetUp):
// skips unless the gtest filter names `suite` (`why` says what the suite does and how it is
// run), outside moecomm-run, or with fewer than 2 ranks; otherwise sets the rank's device and
// makes stream_. (A derived SetUp may go on after a skip: gtest skips the body anyway.)
class OwnJobTest : public ::testing::Test {
 protected:
  void Enter(const char* suite, const char* why);
  void TearDown() override;

  moecommComm_t comm_ = nullptr;
  int rank_ = 0;
  int nranks_ = 1;
  cudaStream_t stream_ = nullptr;
};

}  // namespace moecomm_gpu_test
