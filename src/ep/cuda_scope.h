// Small CUDA runtime helpers shared by the CUDA EP backend's files (ep_cuda.cc, ep_cuda_ll.cc).
// Include only where MOECOMM_HAVE_CUDA holds.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

// Returns moecommUnhandledCudaError with the call and CUDA's error text when call fails.
#define MC_CUDA(call)                                                                               \
  do {                                                                                              \
    const cudaError_t mc_cuda_err_ = (call);                                                        \
    if (mc_cuda_err_ != cudaSuccess) {                                                              \
      return ::moecomm::setError(moecommUnhandledCudaError, "%s failed: %s (%s)", #call,            \
                                 cudaGetErrorName(mc_cuda_err_), cudaGetErrorString(mc_cuda_err_)); \
    }                                                                                               \
  } while (0)

namespace moecomm {

// Makes `device` current for the scope, then restores the caller's device. Failures are
// swallowed here: the CUDA calls made inside the scope report them.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (cudaSetDevice(device) != cudaSuccess) (void)cudaGetLastError();
  }
  ~DeviceScope() {
    if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace moecomm
