// Shared pieces of moecomm_gpu_tests: what main() found (GPUs, the moecomm-run communicator),
// the symmetric-memory exercise every NVLink test runs, and small helpers.
//
// The binary runs in two ways:
//   - alone: the NvlinkInProcess suite makes its own communicators with moecommCommInitAll
//     over every visible GPU; NvlinkSelection / NvlinkFdPassing need no GPU;
//   - under `moecomm-run -n N`: main() makes one CUDA communicator per process (device =
//     MOECOMM_LOCAL_RANK % GPUs) for the NvlinkMp suite, unless N exceeds the GPU count.
// Whenever the GPU tests cannot run at all, main() prints kSkipMarker, which ctest's
// SKIP_REGULAR_EXPRESSION turns into "skipped" instead of "passed".
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moecomm.h"

namespace moecomm_gpu_test {

constexpr const char* kSkipMarker = "MOECOMM_GPU_TESTS_SKIPPED";

struct GpuContext {
  int deviceCount = 0;
  std::string noDeviceReason;  // why deviceCount is 0
  // Under moecomm-run.
  bool multiProcess = false;
  std::string multiProcessSkip;  // non-empty: every NvlinkMp test skips with this reason
  moecommComm_t comm = nullptr;
  int rank = 0;
  int nranks = 1;
  int device = -1;
  // Ranks of this job on `device`, this one included: 1 unless MOECOMM_TEST_SHARED_GPUS=1 put
  // more ranks than GPUs (device-wide readings such as cudaMemGetInfo then see all of them).
  int ranksOnDevice = 1;
};
const GpuContext& Gpu();
// Hands the moecomm-run communicator to the caller, who destroys it; main() then does not.
// For a test after which the communicator cannot be torn down cleanly (a peer was killed, so
// the teardown barrier fails): test_ep_cuda_ll_kill.cc. Gpu().comm is null afterwards.
moecommComm_t TakeComm();

// Sets an environment variable for the scope (restoring the previous value). Only from the
// test's main thread, before rank threads start: getenv is not safe against setenv.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value);
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  bool hadValue_ = false;
  std::string previous_;
};

// One rank's full check of a symmetric allocation `ptr` from moecommMemAlloc on `comm`
// (collective: every rank of comm calls it together):
//   1. store: a kernel writes this rank's pattern with 16-byte stores into EVERY rank's
//      buffer at offset rank * chunk, through the peer pointers;
//   2. sync + barrier;
//   3. verify: this rank's own buffer is copied to the host and every word checked against
//      every writer's pattern;
//   4. load: a kernel copies the next rank's whole buffer with 16-byte loads through its
//      peer pointer into local scratch, which is checked the same way;
//   5. barrier.
// Returns "" on success, else a sentence naming the rank, the step and the first
// mismatches. *method receives the sharing method found in the registry.
std::string ExerciseSymmetric(moecommComm_t comm, void* ptr, uint64_t seed, std::string* method);

// Free and total bytes of the current device (cudaMemGetInfo), or 0/0 on error.
void DeviceMemory(size_t* free_bytes, size_t* total_bytes);
// Open file descriptors of this process (entries of /proc/self/fd).
int OpenFdCount();
// A fresh random seed.
uint64_t FreshSeed();
// `experts` rounded up to a multiple of `nranks`: the EP suites run every case at any rank count.
int ExpertsFor(int experts, int nranks);
// Whether cumem sharing is usable on this device, with the reason when not.
bool CuMemUsable(int device, std::string* why);

}  // namespace moecomm_gpu_test

#define MC_SKIP_WITHOUT_GPU()                                                         \
  do {                                                                                \
    if (::moecomm_gpu_test::Gpu().deviceCount == 0) {                                 \
      GTEST_SKIP() << "no CUDA device: " << ::moecomm_gpu_test::Gpu().noDeviceReason; \
    }                                                                                 \
  } while (0)
