// Device helpers shared by every kernel family.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moecomm {
namespace device {

// A launch of `grid` blocks in thread-block clusters of `cluster` blocks along x (1: a plain
// launch; the caller checks that cluster divides grid and that the device has clusters).
template <typename... KernelArgs, typename... Args>
cudaError_t launchInClusters(void (*kernel)(KernelArgs...), int grid, int threads, uint64_t sharedBytes, int cluster,
                             cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = sharedBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

__device__ __forceinline__ int64_t loadExpertId(const void* topkIdx, int topkIdxIs64, int64_t index) {
  return topkIdxIs64 ? static_cast<const int64_t*>(topkIdx)[index]
                     : static_cast<int64_t>(static_cast<const int32_t*>(topkIdx)[index]);
}

// A token's expert ids [k0, k0 + kIdGroup) (-1 past topk), all loaded before any is used: one
// round trip to memory for the group, not one per id (where a store or an atomic follows each
// id, the compiler would not hoist the next loads above it). load(k) reads id k.
constexpr int kIdGroup = 8;
template <typename Load>
__device__ __forceinline__ void loadIdGroup(int64_t (&ids)[kIdGroup], int k0, int topk, Load load) {
#pragma unroll
  for (int u = 0; u < kIdGroup; ++u) ids[u] = k0 + u < topk ? load(k0 + u) : -1;
}

// System-scope acquire load / release store of a 64-bit flag (peer or host visible).
__device__ __forceinline__ uint64_t loadAcquireSys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void storeReleaseSys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// A 16-byte load of memory no one writes during the kernel (the non-coherent path, not kept
// in L1): rows streamed once.
__device__ __forceinline__ int4 loadStreaming(const int4* address) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t value;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(value));
  return value;
}

}  // namespace device
}  // namespace moecomm
