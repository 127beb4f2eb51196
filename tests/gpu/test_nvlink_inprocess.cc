// Symmetric GPU memory with every visible GPU driven by one process (moecommCommInitAll):
// the inprocess method by default, cumem when forced, ipc refused.
#include <cuda_runtime_api.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "core/memory.h"
#include "gpu/gpu_common.h"
#include "transport/symmetric.h"

namespace moecomm_gpu_test {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

class NvlinkInProcess : public ::testing::Test {
 protected:
  void SetUp() override {
    MC_SKIP_WITHOUT_GPU();
    if (Gpu().multiProcess) GTEST_SKIP() << "NvlinkInProcess runs without moecomm-run";
    nranks_ = Gpu().deviceCount;
  }

  void TearDown() override { DestroyComms(); }

  // One rank per visible GPU.
  ::testing::AssertionResult MakeComms() {
    comms_.assign(nranks_, nullptr);
    const moecommResult_t result = moecommCommInitAll(comms_.data(), nranks_, nullptr);
    if (result != moecommSuccess) {
      comms_.clear();
      return ::testing::AssertionFailure()
             << "moecommCommInitAll over " << nranks_ << " GPUs failed: " << moecommGetErrorString(result) << ": "
             << moecommGetLastError(nullptr);
    }
    for (int r = 0; r < nranks_; ++r) {
      moecommBackend_t backend = moecommBackendHost;
      moecommCommBackend(comms_[r], &backend);
      if (backend != moecommBackendCuda) {
        return ::testing::AssertionFailure() << "rank " << r << " did not get the CUDA backend";
      }
    }
    return ::testing::AssertionSuccess();
  }

  void DestroyComms() {
    if (comms_.empty()) return;
    std::vector<std::string> errors = OnEveryRank([&](int r) -> std::string {
      const moecommResult_t result = moecommCommDestroy(comms_[r]);
      if (result == moecommSuccess) return "";
      return std::string("moecommCommDestroy: ") + moecommGetLastError(nullptr);
    });
    comms_.clear();
    ExpectAllOk(errors);
  }

  // Runs body(rank) on one thread per rank (with the rank's GPU current). A rank whose body
  // fails aborts every communicator, so the others leave their collectives instead of
  // waiting for the bootstrap timeout.
  std::vector<std::string> OnEveryRank(const std::function<std::string(int)>& body) {
    std::vector<std::string> errors(comms_.size());
    std::vector<std::thread> threads;
    for (size_t r = 0; r < comms_.size(); ++r) {
      threads.emplace_back([&, r] {
        cudaSetDevice(comms_[r]->device);
        errors[r] = body(static_cast<int>(r));
        if (!errors[r].empty()) {
          for (moecommComm_t comm : comms_) moecommCommAbort(comm);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    return errors;
  }

  static void ExpectAllOk(const std::vector<std::string>& errors) {
    for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  }

  // Allocates, exercises (stores and loads through peer pointers), checks the method, frees.
  void RunLoadStore(const char* share, const char* expected_method, size_t bytes) {
    ScopedEnv env("MOECOMM_NVLINK_SHARE", share);
    ASSERT_TRUE(MakeComms());
    const uint64_t seed = FreshSeed();
    ExpectAllOk(OnEveryRank([&](int r) -> std::string {
      void* ptr = nullptr;
      moecommResult_t result = moecommMemAlloc(comms_[r], &ptr, bytes);
      if (result != moecommSuccess) {
        return std::string("moecommMemAlloc(") + std::to_string(bytes) + "): " + moecommGetLastError(nullptr);
      }
      std::string method;
      std::string error = ExerciseSymmetric(comms_[r], ptr, seed, &method);
      if (error.empty() && method != expected_method) {
        error = "method is " + method + ", expected " + expected_method;
      }
      // Free even after a failed check, unless the comms were aborted (then destroy frees).
      if (error.empty()) {
        result = moecommMemFree(comms_[r], ptr);
        if (result != moecommSuccess) error = std::string("moecommMemFree: ") + moecommGetLastError(nullptr);
      }
      return error;
    }));
  }

  // 50 rounds of alloc + free must give back device memory and descriptors.
  void RunAllocFreeLoop(const char* share) {
    ScopedEnv env("MOECOMM_NVLINK_SHARE", share);
    ASSERT_TRUE(MakeComms());
    constexpr size_t kBytes = 32 * kMiB;
    constexpr int kRounds = 50;
    auto round = [&](int r) -> std::string {
      void* ptr = nullptr;
      if (moecommMemAlloc(comms_[r], &ptr, kBytes) != moecommSuccess) {
        return std::string("moecommMemAlloc: ") + moecommGetLastError(nullptr);
      }
      if (moecommMemFree(comms_[r], ptr) != moecommSuccess) {
        return std::string("moecommMemFree: ") + moecommGetLastError(nullptr);
      }
      return "";
    };
    // A warm-up round, so that what CUDA sets up once (lazily opened device files, pools)
    // is not counted as a leak.
    ExpectAllOk(OnEveryRank(round));
    const int fds_before = OpenFdCount();
    std::vector<size_t> free_before(nranks_), free_after(nranks_);
    ExpectAllOk(OnEveryRank([&](int r) -> std::string {
      size_t total = 0;
      DeviceMemory(&free_before[r], &total);
      for (int i = 0; i < kRounds; ++i) {
        std::string error = round(r);
        if (!error.empty()) return "round " + std::to_string(i) + ": " + error;
      }
      DeviceMemory(&free_after[r], &total);
      return "";
    }));
    const int fds_after = OpenFdCount();
    EXPECT_LE(fds_after, fds_before + 4) << "open file descriptors grew over " << kRounds << " alloc/free rounds";
    for (int r = 0; r < nranks_; ++r) {
      const double lost_mib = (static_cast<double>(free_before[r]) - static_cast<double>(free_after[r])) / kMiB;
      EXPECT_LT(lost_mib, 64.0) << "GPU " << r << " lost " << lost_mib << " MiB over " << kRounds << " rounds of "
                                << kBytes / kMiB << " MiB (method " << (share ? share : "auto") << ")";
    }
  }

  bool EveryGpuHasCuMem(std::string* why) {
    for (int d = 0; d < nranks_; ++d) {
      if (!CuMemUsable(d, why)) return false;
    }
    return true;
  }

  int nranks_ = 0;
  std::vector<moecommComm_t> comms_;
};

TEST_F(NvlinkInProcess, LoadStoreAuto) { RunLoadStore(nullptr, "inprocess", 8 * kMiB); }

TEST_F(NvlinkInProcess, LoadStoreForcedInProcess) { RunLoadStore("inprocess", "inprocess", 8 * kMiB); }

TEST_F(NvlinkInProcess, LoadStoreForcedCuMem) {
  std::string why;
  if (!EveryGpuHasCuMem(&why)) GTEST_SKIP() << "cumem unavailable: " << why;
  RunLoadStore("cumem", "cumem", 8 * kMiB);
}

// Sizes that are not multiples of anything: bytes() is what was asked, mappings round up.
TEST_F(NvlinkInProcess, LoadStoreOddSizes) {
  for (size_t bytes : {size_t{16} * nranks_, size_t{1000} + 48 * nranks_, 3 * kMiB + 48}) {
    SCOPED_TRACE("bytes " + std::to_string(bytes));
    RunLoadStore(nullptr, "inprocess", bytes);
    DestroyComms();
  }
  std::string why;
  if (!EveryGpuHasCuMem(&why)) return;
  RunLoadStore("cumem", "cumem", 3 * kMiB + 48);
}

TEST_F(NvlinkInProcess, ForcedIpcIsRefused) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 GPUs";
  ScopedEnv env("MOECOMM_NVLINK_SHARE", "ipc");
  ASSERT_TRUE(MakeComms());
  std::vector<std::string> errors = OnEveryRank([&](int r) -> std::string {
    void* ptr = reinterpret_cast<void*>(0x1);
    const moecommResult_t result = moecommMemAlloc(comms_[r], &ptr, kMiB);
    const std::string text = moecommGetLastError(nullptr);
    if (result != moecommNotSupported)
      return "expected NotSupported, got " + std::string(moecommGetErrorString(result));
    if (ptr != nullptr) return "ptr not cleared on failure";
    if (text.find("ipc") == std::string::npos) return "the error does not name the method: " + text;
    return "";
  });
  ExpectAllOk(errors);
  // The communicators stayed in step: a later allocation works.
  ScopedEnv fallback("MOECOMM_NVLINK_SHARE", "auto");
  ExpectAllOk(OnEveryRank([&](int r) -> std::string {
    void* ptr = nullptr;
    if (moecommMemAlloc(comms_[r], &ptr, kMiB) != moecommSuccess) return moecommGetLastError(nullptr);
    return moecommMemFree(comms_[r], ptr) == moecommSuccess ? "" : moecommGetLastError(nullptr);
  }));
}

TEST_F(NvlinkInProcess, BadOverrideIsRejected) {
  ScopedEnv env("MOECOMM_NVLINK_SHARE", "carrier-pigeon");
  ASSERT_TRUE(MakeComms());
  ExpectAllOk(OnEveryRank([&](int r) -> std::string {
    void* ptr = nullptr;
    const moecommResult_t result = moecommMemAlloc(comms_[r], &ptr, kMiB);
    const std::string text = moecommGetLastError(nullptr);
    if (result != moecommInvalidArgument)
      return "expected InvalidArgument, got " + std::string(moecommGetErrorString(result));
    if (text.find("MOECOMM_NVLINK_SHARE") == std::string::npos) return "the error does not name the variable: " + text;
    return "";
  }));
}

TEST_F(NvlinkInProcess, DifferentSizesAreRejected) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 GPUs";
  ASSERT_TRUE(MakeComms());
  ExpectAllOk(OnEveryRank([&](int r) -> std::string {
    void* ptr = nullptr;
    const moecommResult_t result = moecommMemAlloc(comms_[r], &ptr, kMiB * (r + 1));
    const std::string text = moecommGetLastError(nullptr);
    if (result != moecommInvalidArgument)
      return "expected InvalidArgument, got " + std::string(moecommGetErrorString(result));
    if (text.find("same size") == std::string::npos) return "the error does not explain: " + text;
    return "";
  }));
}

TEST_F(NvlinkInProcess, AllocFreeRepeatedDoesNotLeak) { RunAllocFreeLoop(nullptr); }

TEST_F(NvlinkInProcess, AllocFreeRepeatedDoesNotLeakCuMem) {
  std::string why;
  if (!EveryGpuHasCuMem(&why)) GTEST_SKIP() << "cumem unavailable: " << why;
  RunAllocFreeLoop("cumem");
}

TEST_F(NvlinkInProcess, PeerAddressLookup) {
  ASSERT_TRUE(MakeComms());
  constexpr size_t kBytes = 4 * kMiB;
  ExpectAllOk(OnEveryRank([&](int r) -> std::string {
    moecommComm* comm = comms_[r];
    void* ptr = nullptr;
    if (moecommMemAlloc(comm, &ptr, kBytes) != moecommSuccess) return moecommGetLastError(nullptr);
    std::string error;
    char* base = static_cast<char*>(ptr);
    size_t offset = 0;
    moecomm::SymmetricMemory* memory = comm->memory->findSymmetric(base + 4096, 64, &offset);
    if (memory == nullptr || offset != 4096) error = "findSymmetric inside the allocation failed";
    if (comm->memory->findSymmetric(base + kBytes - 8, 16, &offset) != nullptr)
      error = "a range past the end was found";
    if (comm->memory->peerAddress(base + kBytes, 0) != nullptr) error = "peerAddress past the end is not null";
    if (comm->memory->peerAddress(base, nranks_) != nullptr) error = "peerAddress of rank nranks is not null";
    if (comm->memory->peerAddress(base + 100, r) != base + 100) error = "peerAddress of the own rank is not local";
    for (int p = 0; p < nranks_ && memory != nullptr; ++p) {
      if (comm->memory->peerAddress(base + 100, p) != static_cast<char*>(memory->peer(p)) + 100) {
        error = "peerAddress of rank " + std::to_string(p) + " is not peer() + offset";
      }
    }
    if (moecommMemFree(comm, ptr) != moecommSuccess && error.empty()) error = moecommGetLastError(nullptr);
    return error;
  }));
}

// Allocations never freed are released by moecommCommDestroy.
TEST_F(NvlinkInProcess, CommDestroyFreesLeftovers) {
  ASSERT_TRUE(MakeComms());
  constexpr size_t kBytes = 256 * kMiB;
  std::vector<size_t> free_before(nranks_);
  ExpectAllOk(OnEveryRank([&](int r) -> std::string {
    size_t total = 0;
    DeviceMemory(&free_before[r], &total);
    void* ptr = nullptr;
    return moecommMemAlloc(comms_[r], &ptr, kBytes) == moecommSuccess ? "" : moecommGetLastError(nullptr);
  }));
  DestroyComms();
  for (int r = 0; r < nranks_; ++r) {
    cudaSetDevice(r);
    size_t free_after = 0, total = 0;
    DeviceMemory(&free_after, &total);
    const double lost_mib = (static_cast<double>(free_before[r]) - static_cast<double>(free_after)) / kMiB;
    EXPECT_LT(lost_mib, 64.0) << "GPU " << r << " still misses " << lost_mib << " MiB after moecommCommDestroy";
  }
}

}  // namespace
}  // namespace moecomm_gpu_test
