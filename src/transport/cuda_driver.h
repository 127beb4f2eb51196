// The CUDA driver API functions the NVLink transport needs, reached at run time through
// cudaGetDriverEntryPointByVersion: the library links only the static CUDA runtime, never
// libcuda, so it still loads (and says NotSupported) on machines without a driver.
//
// Include only from CUDA builds (MOECOMM_HAVE_CUDA): it pulls in <cuda.h> for the types.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include "moecomm.h"

namespace moecomm {

// One pointer per driver function, each with the ABI of the version requested from the
// driver (kCudaDriverAbiVersion), so a newer driver cannot hand us a changed signature.
struct CudaDriver {
  PFN_cuGetErrorName_v6000 getErrorName = nullptr;
  PFN_cuDeviceGet_v2000 deviceGet = nullptr;
  PFN_cuDeviceGetAttribute_v2000 deviceGetAttribute = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 memGetAllocationGranularity = nullptr;
  PFN_cuMemCreate_v10020 memCreate = nullptr;
  PFN_cuMemRelease_v10020 memRelease = nullptr;
  PFN_cuMemAddressReserve_v10020 memAddressReserve = nullptr;
  PFN_cuMemAddressFree_v10020 memAddressFree = nullptr;
  PFN_cuMemMap_v10020 memMap = nullptr;
  PFN_cuMemUnmap_v10020 memUnmap = nullptr;
  PFN_cuMemSetAccess_v10020 memSetAccess = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 memExportToShareableHandle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 memImportFromShareableHandle = nullptr;
};

// The ABI version every entry point is requested at (CUDA 12.0: the oldest driver a CUDA 13
// runtime can run on is newer, and every function above has kept this signature since).
constexpr unsigned kCudaDriverAbiVersion = 12000;

// Resolves the table once per process (thread-safe). On failure returns moecommNotSupported
// with a sentence naming the missing function; later calls return the same answer.
moecommResult_t cudaDriver(const CudaDriver** out);

// "CUDA_ERROR_OUT_OF_MEMORY" (or "CUresult 123" when the name is unknown).
const char* cudaDriverErrorName(CUresult result);

// Records a runtime error as moecommUnhandledCudaError naming the call and clears the
// runtime's last error, so a later unrelated cudaGetLastError does not report it.
moecommResult_t cudaRuntimeError(cudaError_t error, const char* call);
// The same for a driver call.
moecommResult_t cudaDriverError(CUresult result, const char* call);

}  // namespace moecomm

// Checked CUDA calls for the transport: the sentence carries the CUDA error name and the call.
#define MC_CUDA_CHECK(call)                                      \
  do {                                                           \
    cudaError_t mc_cuda_error_ = (call);                         \
    if (mc_cuda_error_ != cudaSuccess) {                         \
      return ::moecomm::cudaRuntimeError(mc_cuda_error_, #call); \
    }                                                            \
  } while (0)

// `name` is the driver function's name, e.g. "cuMemCreate" (the call itself goes through
// the entry-point table, whose spelling would say less).
#define MC_CU_CHECK(call, name)                               \
  do {                                                        \
    CUresult mc_cu_result_ = (call);                          \
    if (mc_cu_result_ != CUDA_SUCCESS) {                      \
      return ::moecomm::cudaDriverError(mc_cu_result_, name); \
    }                                                         \
  } while (0)
