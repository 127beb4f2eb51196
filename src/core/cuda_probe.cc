#include "core/cuda_probe.h"

#include "core/error.h"

#if MOECOMM_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moecomm {

#if MOECOMM_HAVE_CUDA

int cudaVisibleDeviceCount(std::string* why) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why) *why = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (count == 0 && why) *why = "cudaGetDeviceCount reports 0 devices";
  return count;
}

int cudaCurrentDevice() {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

moecommResult_t cudaUseDevice(int device) {
  cudaError_t err = cudaSetDevice(device);
  MC_REQUIRE(err == cudaSuccess, moecommUnhandledCudaError, "cudaSetDevice(%d) failed: %s", device,
             cudaGetErrorString(err));
  return moecommSuccess;
}

#else

int cudaVisibleDeviceCount(std::string* why) {
  if (why) *why = "libmoecomm was built without CUDA (MOECOMM_CUDA=OFF)";
  return 0;
}

int cudaCurrentDevice() { return -1; }

moecommResult_t cudaUseDevice(int device) {
  return setError(moecommNotSupported, "device %d requested but libmoecomm was built without CUDA", device);
}

#endif

}  // namespace moecomm
