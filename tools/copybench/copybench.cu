// moecomm-copybench: a developer micro-benchmark of the low-latency dispatch's receive copy
// (docs/bench.md, "moecomm-copybench"). It copies `rows` rows of `rowBytes` from a staging area
// (rows at a pitch of 2 * rowBytes, in a scattered token order) to a destination, with the
// copy loop of the LL kernels (a contiguous share of rows per block, 512 threads, 8 16-byte
// loads in flight per thread), and reports the time inside the kernel (last block's end minus
// first block's start, %globaltimer) and between events, median over the repetitions, for:
//   dense        destination rows contiguous
//   expert-major destination row g of expert g / rowsPerExpert at its slot of a
//                [experts][slots][rowBytes] buffer (the layout of recvX)
// each after an L2 flush (a memset of twice the L2) or warm (the same copy just ran), with the
// destination pages touched by a kernel just before (one load per 64 KiB), and with the source
// written by a peer GPU just before (two GPUs). Nothing here is part of the library.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../src/device/common.cuh"
#include "../dev_common.h"

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 8;

constexpr const char* kToolName = "moecomm-copybench";
#define CHECK(call) DEV_CHECK(call)

// from[i] / to[i]: byte offsets of row i in src / dst. stamps[2 * block]: start, end.
__global__ void __launch_bounds__(kThreads)
    copyRows(const uint8_t* src, uint8_t* dst, const uint64_t* from, const uint64_t* to, int rows, int rowBytes,
             unsigned long long* stamps) {
  __shared__ const uint8_t* rowFrom[256];
  __shared__ uint8_t* rowTo[256];
  if (threadIdx.x == 0) stamps[2 * blockIdx.x] = moecomm::device::globalTimerNs();
  const int perBlock = (rows + gridDim.x - 1) / gridDim.x;
  const int begin = min(rows, static_cast<int>(blockIdx.x) * perBlock);
  const int end = min(rows, begin + perBlock);
  const int chunks = rowBytes / 16;
  for (int first = begin; first < end; first += 256) {
    const int batch = min(256, end - first);
    if (static_cast<int>(threadIdx.x) < batch) {
      rowFrom[threadIdx.x] = src + from[first + threadIdx.x];
      rowTo[threadIdx.x] = dst + to[first + threadIdx.x];
    }
    __syncthreads();
    const int items = batch * chunks;
    for (int base = threadIdx.x; base < items; base += kThreads * kUnroll) {
      int4 values[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int f = base + u * kThreads;
        if (f < items) values[u] = __ldcg(reinterpret_cast<const int4*>(rowFrom[f / chunks]) + f % chunks);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int f = base + u * kThreads;
        if (f < items) reinterpret_cast<int4*>(rowTo[f / chunks])[f % chunks] = values[u];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) stamps[2 * blockIdx.x + 1] = moecomm::device::globalTimerNs();
}

// One load per 64 KiB of every destination row's page range, so its translations are cached.
__global__ void touchRows(const uint8_t* dst, const uint64_t* to, int rows, int* sink) {
  int sum = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows; i += gridDim.x * blockDim.x) {
    sum += __ldcg(reinterpret_cast<const int*>(dst + (to[i] & ~0xffffull)));
  }
  if (sum == 0x7fffffff) *sink = sum;
}

// The peer's part: writes the source rows over NVLink (one 16-byte store per chunk).
__global__ void writeRows(uint8_t* src, const uint64_t* from, int rows, int rowBytes, int salt) {
  const int chunks = rowBytes / 16;
  const int items = rows * chunks;
  for (int f = blockIdx.x * blockDim.x + threadIdx.x; f < items; f += gridDim.x * blockDim.x) {
    reinterpret_cast<int4*>(src + from[f / chunks])[f % chunks] = make_int4(f, salt, f ^ salt, 1);
  }
}

__global__ void emptyKernel() {}

}  // namespace

int main(int argc, char** argv) {
  const int rows = moecomm_dev::argInt(argc, argv, "--rows", 1024);
  const int rowBytes = moecomm_dev::argInt(argc, argv, "--row-bytes", 7168);
  const int experts = moecomm_dev::argInt(argc, argv, "--experts", 128);
  const int slots = moecomm_dev::argInt(argc, argv, "--slots", 256);
  const int grid = moecomm_dev::argInt(argc, argv, "--grid", 132);
  const int reps = moecomm_dev::argInt(argc, argv, "--reps", 20);
  const int sources = moecomm_dev::argInt(argc, argv, "--source-rows", 256);  // staging rows (R * maxT)
  if (rowBytes % 16 != 0 || rows <= 0 || experts <= 0 || rows > experts * slots || sources <= 0) {
    std::fprintf(stderr, "moecomm-copybench: bad arguments\n");
    return 2;
  }
  int devices = 0;
  CHECK(cudaGetDeviceCount(&devices));
  CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const size_t pitch = 2ull * rowBytes;
  const size_t srcBytes = static_cast<size_t>(sources) * pitch;
  const size_t denseBytes = static_cast<size_t>(rows) * rowBytes;
  const size_t expertBytes = static_cast<size_t>(experts) * slots * rowBytes;
  const size_t flushBytes = 2ull * prop.l2CacheSize;
  uint8_t *src = nullptr, *dense = nullptr, *expert = nullptr, *flush = nullptr;
  CHECK(cudaMalloc(&src, srcBytes));
  CHECK(cudaMalloc(&dense, denseBytes));
  CHECK(cudaMalloc(&expert, expertBytes));
  CHECK(cudaMalloc(&flush, flushBytes));
  CHECK(cudaMemset(src, 1, srcBytes));
  CHECK(cudaMemset(dense, 0, denseBytes));
  CHECK(cudaMemset(expert, 0, expertBytes));
  // Rows sorted by expert (rowsPerExpert each, as the receive places them); each row's source
  // is a random staging row (a token of some source rank).
  std::mt19937_64 rng(42);
  std::vector<uint64_t> from(rows), toDense(rows), toExpert(rows);
  const int rowsPerExpert = (rows + experts - 1) / experts;
  for (int i = 0; i < rows; ++i) {
    from[i] = static_cast<uint64_t>(rng() % sources) * pitch;
    toDense[i] = static_cast<uint64_t>(i) * rowBytes;
    toExpert[i] = (static_cast<uint64_t>(i / rowsPerExpert) * slots + i % rowsPerExpert) * rowBytes;
  }
  uint64_t *dFrom = nullptr, *dDense = nullptr, *dExpert = nullptr;
  unsigned long long* stamps = nullptr;
  int* sink = nullptr;
  CHECK(cudaMalloc(&dFrom, rows * 8));
  CHECK(cudaMalloc(&dDense, rows * 8));
  CHECK(cudaMalloc(&dExpert, rows * 8));
  CHECK(cudaMalloc(&stamps, 2ull * grid * 8));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemcpy(dFrom, from.data(), rows * 8, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dDense, toDense.data(), rows * 8, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dExpert, toExpert.data(), rows * 8, cudaMemcpyHostToDevice));
  const bool peer = devices >= 2;
  uint64_t* peerFrom = nullptr;
  cudaStream_t peerStream = nullptr;
  cudaEvent_t peerDone = nullptr;
  if (peer) {
    int can = 0;
    CHECK(cudaDeviceCanAccessPeer(&can, 1, 0));
    CHECK(cudaSetDevice(1));
    if (can) CHECK(cudaDeviceEnablePeerAccess(0, 0));
    CHECK(cudaMalloc(&peerFrom, rows * 8));
    CHECK(cudaMemcpy(peerFrom, from.data(), rows * 8, cudaMemcpyHostToDevice));
    CHECK(cudaStreamCreate(&peerStream));
    CHECK(cudaEventCreateWithFlags(&peerDone, cudaEventDisableTiming));  // recorded on GPU 1's stream
    CHECK(cudaSetDevice(0));
  }
  cudaStream_t stream = nullptr;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));

  std::printf("# moecomm-copybench: %s, %d rows of %d B (%d per expert), grid %d x %d, %d reps, L2 %d MB%s\n",
              prop.name, rows, rowBytes, rowsPerExpert, grid, kThreads, reps, prop.l2CacheSize >> 20,
              peer ? ", peer GPU 1 present" : "");
  std::printf("%-44s %12s %12s\n", "case", "kernel_us", "events_us");
  struct Case {
    const char* name;
    bool expertMajor;
    bool flushFirst;
    bool touch;
    bool peerWrites;
  };
  const Case cases[] = {
      {"empty kernel (events floor)", false, false, false, false},
      {"dense, warm", false, false, false, false},
      {"dense, L2 flushed", false, true, false, false},
      {"expert-major, warm", true, false, false, false},
      {"expert-major, L2 flushed", true, true, false, false},
      {"expert-major, L2 flushed, pages touched", true, true, true, false},
      {"dense, L2 flushed, source peer-written", false, true, false, true},
      {"expert-major, L2 flushed, source peer-written", true, true, false, true},
  };
  std::vector<unsigned long long> hostStamps(2ull * grid);
  for (int c = 0; c < static_cast<int>(sizeof(cases) / sizeof(cases[0])); ++c) {
    const Case& k = cases[c];
    if (k.peerWrites && !peer) {
      std::printf("%-44s %12s %12s\n", k.name, "skipped", "(1 GPU)");
      continue;
    }
    const bool empty = c == 0;
    std::vector<double> kernelUs, eventUs;
    for (int r = 0; r < reps + 2; ++r) {
      if (k.flushFirst) CHECK(cudaMemsetAsync(flush, r & 0xff, flushBytes, stream));
      if (k.peerWrites) {
        CHECK(cudaStreamSynchronize(stream));
        CHECK(cudaSetDevice(1));
        writeRows<<<132, kThreads, 0, peerStream>>>(src, peerFrom, rows, rowBytes, r);
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(peerDone, peerStream));
        CHECK(cudaSetDevice(0));
        CHECK(cudaStreamWaitEvent(stream, peerDone, 0));
      }
      if (k.touch) touchRows<<<grid, kThreads, 0, stream>>>(expert, dExpert, rows, sink);
      CHECK(cudaEventRecord(start, stream));
      if (empty) {
        emptyKernel<<<grid, kThreads, 0, stream>>>();
      } else {
        copyRows<<<grid, kThreads, 0, stream>>>(src, k.expertMajor ? expert : dense, dFrom,
                                                k.expertMajor ? dExpert : dDense, rows, rowBytes, stamps);
      }
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      if (r < 2) continue;  // warm-up
      float ms = 0.0f;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      eventUs.push_back(1000.0 * ms);
      if (!empty) {
        CHECK(cudaMemcpy(hostStamps.data(), stamps, hostStamps.size() * 8, cudaMemcpyDeviceToHost));
        unsigned long long first = ~0ull, last = 0;
        for (int b = 0; b < grid; ++b) {
          first = std::min(first, hostStamps[2 * b]);
          last = std::max(last, hostStamps[2 * b + 1]);
        }
        kernelUs.push_back((last - first) / 1000.0);
      }
    }
    if (empty) {
      std::printf("%-44s %12s %12.2f\n", k.name, "-", moecomm_dev::median(eventUs));
    } else {
      std::printf("%-44s %12.2f %12.2f\n", k.name, moecomm_dev::median(kernelUs), moecomm_dev::median(eventUs));
    }
  }
  return 0;
}
