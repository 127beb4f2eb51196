#if MOECOMM_HAVE_CUDA

#include "transport/cuda_driver.h"

#include <cstdio>
#include <mutex>
#include <string>

#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

struct DriverTable {
  CudaDriver driver;
  moecommResult_t result = moecommSuccess;
  std::string error;  // the sentence for a failed resolution, replayed on every call
};

// Looks up one symbol; returns false with *error set when the driver does not have it.
template <class Fn>
bool resolve(const char* symbol, Fn* slot, std::string* error) {
  void* function = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  cudaError_t err =
      cudaGetDriverEntryPointByVersion(symbol, &function, kCudaDriverAbiVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || function == nullptr) {
    const char* why = err != cudaSuccess ? cudaGetErrorName(err)
                      : status == cudaDriverEntryPointVersionNotSufficent
                          ? "the driver is older than the requested ABI version"
                          : "the symbol is not in the driver";
    (void)cudaGetLastError();
    char text[256];
    std::snprintf(text, sizeof(text), "cudaGetDriverEntryPointByVersion(\"%s\", %u) failed: %s", symbol,
                  kCudaDriverAbiVersion, why);
    *error = text;
    return false;
  }
  *slot = reinterpret_cast<Fn>(function);
  return true;
}

DriverTable& table() {
  static DriverTable* instance = new DriverTable();  // never destroyed: usable during exit
  static std::once_flag once;
  std::call_once(once, [] {
    CudaDriver& d = instance->driver;
    std::string error;
    const bool ok = resolve("cuGetErrorName", &d.getErrorName, &error) &&
                    resolve("cuDeviceGet", &d.deviceGet, &error) &&
                    resolve("cuDeviceGetAttribute", &d.deviceGetAttribute, &error) &&
                    resolve("cuMemGetAllocationGranularity", &d.memGetAllocationGranularity, &error) &&
                    resolve("cuMemCreate", &d.memCreate, &error) && resolve("cuMemRelease", &d.memRelease, &error) &&
                    resolve("cuMemAddressReserve", &d.memAddressReserve, &error) &&
                    resolve("cuMemAddressFree", &d.memAddressFree, &error) && resolve("cuMemMap", &d.memMap, &error) &&
                    resolve("cuMemUnmap", &d.memUnmap, &error) && resolve("cuMemSetAccess", &d.memSetAccess, &error) &&
                    resolve("cuMemExportToShareableHandle", &d.memExportToShareableHandle, &error) &&
                    resolve("cuMemImportFromShareableHandle", &d.memImportFromShareableHandle, &error);
    if (!ok) {
      instance->result = moecommNotSupported;
      instance->error = error;
      instance->driver = CudaDriver();
      MC_INFO(kLogTransport, "CUDA driver entry points unavailable: %s", error.c_str());
    }
  });
  return *instance;
}

}  // namespace

moecommResult_t cudaDriver(const CudaDriver** out) {
  const DriverTable& t = table();
  if (t.result != moecommSuccess) {
    return setError(t.result, "the CUDA driver API is not usable: %s", t.error.c_str());
  }
  *out = &t.driver;
  return moecommSuccess;
}

const char* cudaDriverErrorName(CUresult result) {
  const DriverTable& t = table();
  const char* name = nullptr;
  if (t.driver.getErrorName != nullptr && t.driver.getErrorName(result, &name) == CUDA_SUCCESS && name != nullptr) {
    return name;
  }
  thread_local char unknown[32];
  std::snprintf(unknown, sizeof(unknown), "CUresult %d", static_cast<int>(result));
  return unknown;
}

moecommResult_t cudaRuntimeError(cudaError_t error, const char* call) {
  (void)cudaGetLastError();
  return setError(moecommUnhandledCudaError, "%s failed: %s (%s)", call, cudaGetErrorName(error),
                  cudaGetErrorString(error));
}

moecommResult_t cudaDriverError(CUresult result, const char* call) {
  return setError(moecommUnhandledCudaError, "%s failed: %s", call, cudaDriverErrorName(result));
}

}  // namespace moecomm

#endif  // MOECOMM_HAVE_CUDA
