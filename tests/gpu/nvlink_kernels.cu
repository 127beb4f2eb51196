#include <cuda_runtime.h>

#include "device/common.cuh"
#include "gpu/nvlink_kernels.h"

namespace moecomm_gpu_test {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

__global__ void StorePatternKernel(uint4* destination, size_t words, uint64_t seed, int writer) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    destination[i] = make_uint4(PatternLane(seed, writer, i, 0), PatternLane(seed, writer, i, 1),
                                PatternLane(seed, writer, i, 2), PatternLane(seed, writer, i, 3));
  }
  // Make the remote stores visible system-wide before the kernel is seen as complete.
  __threadfence_system();
}

__global__ void LoadCopyKernel(const uint4* source, uint4* destination, size_t words) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    destination[i] = source[i];
  }
}

__global__ void SpinKernel(uint64_t nanoseconds) {
  const uint64_t start = moecomm::device::globalTimerNs();
  while (moecomm::device::globalTimerNs() - start < nanoseconds) {
  }
}

__global__ void HostGateKernel(const volatile int* flag, volatile int* status, uint64_t nanoseconds) {
  const uint64_t start = moecomm::device::globalTimerNs();
  while (*flag == 0) {
    if (moecomm::device::globalTimerNs() - start > nanoseconds) {
      *status = 2;
      __threadfence_system();
      return;
    }
  }
  *status = 1;
  __threadfence_system();
}

int BlocksFor(size_t words) {
  const size_t blocks = (words + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks == 0 ? 1 : blocks) : kMaxBlocks);
}

}  // namespace

int LaunchStorePattern(void* destination, size_t words, uint64_t seed, int writer) {
  StorePatternKernel<<<BlocksFor(words), kThreads>>>(static_cast<uint4*>(destination), words, seed, writer);
  return static_cast<int>(cudaGetLastError());
}

int LaunchLoadCopy(const void* source, void* destination, size_t words) {
  LoadCopyKernel<<<BlocksFor(words), kThreads>>>(static_cast<const uint4*>(source), static_cast<uint4*>(destination),
                                                 words);
  return static_cast<int>(cudaGetLastError());
}

int LaunchSpin(void* stream, uint64_t microseconds) {
  SpinKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(microseconds * 1000);
  return static_cast<int>(cudaGetLastError());
}

int LaunchHostGate(void* stream, const volatile int* flag, volatile int* status, uint64_t timeoutMicroseconds) {
  HostGateKernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(flag, status, timeoutMicroseconds * 1000);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moecomm_gpu_test
