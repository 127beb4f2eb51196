// main() of moecomm_gpu_tests: counts the GPUs, makes the moecomm-run communicator when
// started by moecomm-run (see gpu_common.h), and under moecomm-run makes a failing rank exit
// at once so the launcher stops the others instead of letting them wait in a collective.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "gpu/gpu_common.h"
#include "rank_listeners.h"

namespace moecomm_gpu_test {
namespace {

GpuContext g_context;

int EnvInt(const char* name, int fallback) {
  const char* text = std::getenv(name);
  return text != nullptr && *text != '\0' ? std::atoi(text) : fallback;
}

// MOECOMM_TEST_SHARED_GPUS=1: more ranks than GPUs is allowed, ranks share GPUs round-robin
// (one CUDA context per process, time-sliced by the driver). The kernels' logic for any rank
// count runs that way on a machine with fewer GPUs; timings mean nothing, and a test with a
// wall-clock bound may miss it. scripts/shared-gpu-round.sh uses it.
bool SharedGpusAllowed() { return EnvInt("MOECOMM_TEST_SHARED_GPUS", 0) == 1; }

}  // namespace

const GpuContext& Gpu() { return g_context; }

moecommComm_t TakeComm() {
  moecommComm_t comm = g_context.comm;
  g_context.comm = nullptr;
  return comm;
}

}  // namespace moecomm_gpu_test

int main(int argc, char** argv) {
  using moecomm_gpu_test::EnvInt;
  using moecomm_gpu_test::SharedGpusAllowed;
  using moecomm_gpu_test::g_context;
  ::testing::InitGoogleTest(&argc, argv);

  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    g_context.noDeviceReason = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(error);
    (void)cudaGetLastError();
    count = 0;
  } else if (count == 0) {
    g_context.noDeviceReason = "cudaGetDeviceCount reports 0 devices";
  }
  g_context.deviceCount = count;

  std::string skip;
  if (std::getenv("MOECOMM_RANK") != nullptr && std::getenv("MOECOMM_UNIQUE_ID") != nullptr) {
    g_context.multiProcess = true;
    g_context.rank = EnvInt("MOECOMM_RANK", 0);
    g_context.nranks = EnvInt("MOECOMM_NRANKS", 1);
    if (count == 0) {
      g_context.multiProcessSkip = "no CUDA device: " + g_context.noDeviceReason;
    } else if (g_context.nranks > count && !SharedGpusAllowed()) {
      g_context.multiProcessSkip = std::to_string(g_context.nranks) + " ranks but only " + std::to_string(count) +
                                   " GPUs; one GPU per rank is needed (MOECOMM_TEST_SHARED_GPUS=1 lets ranks share "
                                   "GPUs, for correctness only)";
    } else {
      g_context.device = EnvInt("MOECOMM_LOCAL_RANK", g_context.rank) % count;
      g_context.ranksOnDevice = g_context.nranks / count + (g_context.device < g_context.nranks % count ? 1 : 0);
      moecommConfig_t config = MOECOMM_CONFIG_INIT;
      config.backend = moecommBackendCuda;
      config.device = g_context.device;
      const moecommResult_t result = moecommCommInitFromEnv(&g_context.comm, &config);
      if (result != moecommSuccess) {
        std::printf("[rank %d] moecomm_gpu_tests: creating the CUDA communicator on GPU %d failed: %s: %s\n",
                    g_context.rank, g_context.device, moecommGetErrorString(result), moecommGetLastError(nullptr));
        return 1;
      }
    }
    skip = g_context.multiProcessSkip;
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (g_context.rank != 0) {
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new moecomm_test::RankFailurePrinter(g_context.rank));
    }
    listeners.Append(new moecomm_test::ExitOnRankFailure(g_context.rank, ""));
  } else if (count == 0) {
    skip = "no CUDA device: " + g_context.noDeviceReason;
  }
  if (!skip.empty() && g_context.rank == 0) {
    std::printf("%s: %s\n", moecomm_gpu_test::kSkipMarker, skip.c_str());
  } else if (g_context.rank == 0) {
    std::printf("moecomm_gpu_tests: %d GPUs visible%s%s\n", count,
                g_context.multiProcess ? (", " + std::to_string(g_context.nranks) + " processes").c_str() : "",
                g_context.multiProcess && g_context.nranks > count ? " sharing them (MOECOMM_TEST_SHARED_GPUS=1)" : "");
  }
  std::fflush(stdout);

  const int status = RUN_ALL_TESTS();
  if (g_context.comm != nullptr) {
    const moecommResult_t destroyed = moecommCommDestroy(g_context.comm);
    if (destroyed != moecommSuccess) {
      std::printf("[rank %d] moecommCommDestroy: %s: %s\n", g_context.rank, moecommGetErrorString(destroyed),
                  moecommGetLastError(nullptr));
      return 1;
    }
  }
  return status;
}
