#include "roofline.h"

#include <vector>

#include "cuda_check.h"
#include "timing.h"

namespace moecomm_bench {
namespace {

constexpr size_t kCopyBytes = size_t{1} << 30;
constexpr int kWarmCopies = 2;
constexpr int kTimedCopies = 7;

double TimeOneWay(int device, int peer, cudaStream_t stream) {
  int canAccess = 0;
  BENCH_CUDA(cudaDeviceCanAccessPeer(&canAccess, device, peer));
  if (canAccess) {
    const cudaError_t enabled = cudaDeviceEnablePeerAccess(peer, 0);
    if (enabled == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();  // clear it
    } else {
      BENCH_CUDA(enabled);
    }
  }
  void* source = nullptr;
  void* destination = nullptr;
  BENCH_CUDA(cudaMalloc(&source, kCopyBytes));
  BENCH_CUDA(cudaMemsetAsync(source, 0x5a, kCopyBytes, stream));
  BENCH_CUDA(cudaSetDevice(peer));
  BENCH_CUDA(cudaMalloc(&destination, kCopyBytes));
  BENCH_CUDA(cudaSetDevice(device));
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  std::vector<double> samples;
  for (int i = 0; i < kWarmCopies + kTimedCopies; ++i) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    BENCH_CUDA(cudaMemcpyPeerAsync(destination, peer, source, device, kCopyBytes, stream));
    BENCH_CUDA(cudaEventRecord(stop, stream));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float milliseconds = 0.0f;
    BENCH_CUDA(cudaEventElapsedTime(&milliseconds, start, stop));
    if (i >= kWarmCopies) samples.push_back(1000.0 * milliseconds);
  }
  BENCH_CUDA(cudaEventDestroy(start));
  BENCH_CUDA(cudaEventDestroy(stop));
  BENCH_CUDA(cudaFree(source));
  BENCH_CUDA(cudaSetDevice(peer));
  BENCH_CUDA(cudaFree(destination));
  BENCH_CUDA(cudaSetDevice(device));
  if (canAccess) BENCH_CUDA(cudaDeviceDisablePeerAccess(peer));
  return kCopyBytes / Summarize(samples).median / 1e3;  // bytes per microsecond / 1e3 = GB/s
}

}  // namespace

Roofline MeasureRoofline(NcclContext& nccl, int rank, int nranks, int device, cudaStream_t stream) {
  Roofline roofline;
  if (nranks < 2) {
    roofline.note = "one rank: no link crossed";
    return roofline;
  }
  int deviceCount = 0;
  BENCH_CUDA(cudaGetDeviceCount(&deviceCount));
  const int peer = (device + 1) % nranks;
  double mine = 0.0;  // 0 = could not measure
  for (int turn = 0; turn < nranks; ++turn) {
    SetStep("roofline: peer copy, rank " + std::to_string(turn) + "'s turn");
    if (turn == rank && peer < deviceCount && peer != device) mine = TimeOneWay(device, peer, stream);
    nccl.HostBarrier();
  }
  SetStep("roofline: minimum over ranks");
  const double oneWay = nccl.AllMin(mine);
  if (oneWay <= 0.0) {
    roofline.note = "some rank cannot see the next rank's GPU (CUDA_VISIBLE_DEVICES?)";
    return roofline;
  }
  roofline.oneWayGbps = oneWay;
  roofline.rooflineGbps = oneWay * nranks / (nranks - 1);
  roofline.note = "1 GiB cudaMemcpyPeerAsync to the next rank's GPU, median of 7, minimum over ranks, x R/(R-1)";
  return roofline;
}

}  // namespace moecomm_bench
