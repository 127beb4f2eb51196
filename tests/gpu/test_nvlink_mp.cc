// Symmetric GPU memory across processes, one GPU per process, under
// `moecomm-run -n N moecomm_gpu_tests --gtest_filter=NvlinkMp.*`: cumem (the default when
// every GPU supports it) and legacy IPC; inprocess refused. Every decision to skip is
// agreed across ranks, so all ranks run the same collectives.
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "core/comm.h"
#include "core/memory.h"
#include "gpu/gpu_common.h"
#include "transport/symmetric.h"

namespace moecomm_gpu_test {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

class NvlinkMp : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Gpu().multiProcess) GTEST_SKIP() << "NvlinkMp runs under moecomm-run";
    if (!Gpu().multiProcessSkip.empty()) GTEST_SKIP() << Gpu().multiProcessSkip;
    comm_ = Gpu().comm;
    rank_ = comm_->rank;
    nranks_ = comm_->nranks;
    ASSERT_EQ(cudaSetDevice(Gpu().device), cudaSuccess);
  }

  // True when `local` holds on every rank (one allgather: every rank gets the same answer).
  bool AllRanks(bool local) {
    const int mine = local ? 1 : 0;
    std::vector<int> all(nranks_);
    EXPECT_EQ(comm_->bootstrap->allgather(&mine, all.data(), sizeof(int)), moecommSuccess);
    for (int value : all) {
      if (value != 1) return false;
    }
    return true;
  }

  // Rank 0's fresh seed, the same on every rank.
  uint64_t SharedSeed() {
    const uint64_t mine = FreshSeed();
    std::vector<uint64_t> all(nranks_);
    EXPECT_EQ(comm_->bootstrap->allgather(&mine, all.data(), sizeof(uint64_t)), moecommSuccess);
    return all[0];
  }

  bool CuMemEverywhere(std::string* why) { return AllRanks(CuMemUsable(Gpu().device, why)); }

  void RunLoadStore(const char* share, const std::string& expected_method, size_t bytes) {
    ScopedEnv env("MOECOMM_NVLINK_SHARE", share);
    const uint64_t seed = SharedSeed();
    void* ptr = nullptr;
    ASSERT_EQ(moecommMemAlloc(comm_, &ptr, bytes), moecommSuccess)
        << "[rank " << rank_ << "] moecommMemAlloc(" << bytes
        << ") with MOECOMM_NVLINK_SHARE=" << (share ? share : "(unset)") << ": " << moecommGetLastError(nullptr);
    std::string method;
    const std::string error = ExerciseSymmetric(comm_, ptr, seed, &method);
    ASSERT_EQ(error, "");
    EXPECT_EQ(method, expected_method) << "[rank " << rank_ << "]";
    ASSERT_EQ(moecommMemFree(comm_, ptr), moecommSuccess) << "[rank " << rank_ << "] " << moecommGetLastError(nullptr);
  }

  moecommComm* comm_ = nullptr;
  int rank_ = 0;
  int nranks_ = 1;
};

TEST_F(NvlinkMp, LoadStoreAuto) {
  std::string why;
  std::string expected = CuMemEverywhere(&why) ? "cumem" : "ipc";
  if (expected == "ipc") std::printf("[rank %d] cumem unavailable (%s); auto should pick ipc\n", rank_, why.c_str());
  if (nranks_ == 1) expected = "inprocess";  // a lone rank shares a process with all its peers
  RunLoadStore(nullptr, expected, 8 * kMiB);
}

TEST_F(NvlinkMp, LoadStoreCuMem) {
  std::string why;
  if (!CuMemEverywhere(&why)) GTEST_SKIP() << "cumem unavailable on some rank (here: " << why << ")";
  RunLoadStore("cumem", "cumem", 8 * kMiB);
}

TEST_F(NvlinkMp, LoadStoreIpc) { RunLoadStore("ipc", "ipc", 8 * kMiB); }

TEST_F(NvlinkMp, LoadStoreOddSizes) {
  for (const char* share : {"ipc", "cumem"}) {
    std::string why;
    if (std::string(share) == "cumem" && !CuMemEverywhere(&why)) continue;
    for (size_t bytes : {size_t{16} * nranks_, size_t{1000} + 48 * nranks_, 3 * kMiB + 48}) {
      SCOPED_TRACE(std::string(share) + ", bytes " + std::to_string(bytes));
      RunLoadStore(share, share, bytes);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(NvlinkMp, ForcedInProcessIsRefused) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  ScopedEnv env("MOECOMM_NVLINK_SHARE", "inprocess");
  void* ptr = reinterpret_cast<void*>(0x1);
  EXPECT_EQ(moecommMemAlloc(comm_, &ptr, kMiB), moecommNotSupported) << moecommGetLastError(nullptr);
  EXPECT_EQ(ptr, nullptr);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("inprocess"), std::string::npos)
      << moecommGetLastError(nullptr);
}

TEST_F(NvlinkMp, MismatchedOverrideIsRejected) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  ScopedEnv env("MOECOMM_NVLINK_SHARE", rank_ == 0 ? "ipc" : "cumem");
  void* ptr = nullptr;
  EXPECT_EQ(moecommMemAlloc(comm_, &ptr, kMiB), moecommInvalidUsage) << moecommGetLastError(nullptr);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("differs"), std::string::npos)
      << moecommGetLastError(nullptr);
}

TEST_F(NvlinkMp, DifferentSizesAreRejected) {
  if (nranks_ < 2) GTEST_SKIP() << "needs 2 ranks";
  void* ptr = nullptr;
  EXPECT_EQ(moecommMemAlloc(comm_, &ptr, kMiB * (rank_ + 1)), moecommInvalidArgument) << moecommGetLastError(nullptr);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("same size"), std::string::npos)
      << moecommGetLastError(nullptr);
}

// 50 rounds of alloc + free give back device memory and descriptors (with the default method).
TEST_F(NvlinkMp, AllocFreeRepeatedDoesNotLeak) {
  for (const char* share : {"auto", "ipc"}) {
    SCOPED_TRACE(share);
    ScopedEnv env("MOECOMM_NVLINK_SHARE", share);
    constexpr size_t kBytes = 32 * kMiB;
    constexpr int kRounds = 50;
    void* ptr = nullptr;
    ASSERT_EQ(moecommMemAlloc(comm_, &ptr, kBytes), moecommSuccess) << moecommGetLastError(nullptr);
    ASSERT_EQ(moecommMemFree(comm_, ptr), moecommSuccess) << moecommGetLastError(nullptr);
    size_t free_before = 0, free_after = 0, total = 0;
    DeviceMemory(&free_before, &total);
    const int fds_before = OpenFdCount();
    for (int i = 0; i < kRounds; ++i) {
      ASSERT_EQ(moecommMemAlloc(comm_, &ptr, kBytes), moecommSuccess)
          << "round " << i << ": " << moecommGetLastError(nullptr);
      ASSERT_EQ(moecommMemFree(comm_, ptr), moecommSuccess) << "round " << i << ": " << moecommGetLastError(nullptr);
    }
    DeviceMemory(&free_after, &total);
    const int fds_after = OpenFdCount();
    const double lost_mib = (static_cast<double>(free_before) - static_cast<double>(free_after)) / kMiB;
    // Ranks sharing this GPU (MOECOMM_TEST_SHARED_GPUS) hold their own allocations in between.
    EXPECT_LT(lost_mib, 64.0 * Gpu().ranksOnDevice)
        << "[rank " << rank_ << "] lost " << lost_mib << " MiB over " << kRounds << " rounds";
    EXPECT_LE(fds_after, fds_before + 4) << "[rank " << rank_ << "] open descriptors grew over " << kRounds
                                         << " rounds";
  }
}

TEST_F(NvlinkMp, PeerAddressLookup) {
  constexpr size_t kBytes = 4 * kMiB;
  void* ptr = nullptr;
  ASSERT_EQ(moecommMemAlloc(comm_, &ptr, kBytes), moecommSuccess) << moecommGetLastError(nullptr);
  char* base = static_cast<char*>(ptr);
  size_t offset = 0;
  moecomm::SymmetricMemory* memory = comm_->memory->findSymmetric(base + 4096, 64, &offset);
  ASSERT_NE(memory, nullptr);
  EXPECT_EQ(offset, 4096u);
  EXPECT_EQ(comm_->memory->peerAddress(base + kBytes, 0), nullptr);
  EXPECT_EQ(comm_->memory->peerAddress(base, nranks_), nullptr);
  EXPECT_EQ(comm_->memory->peerAddress(base + 100, rank_), base + 100);
  for (int p = 0; p < nranks_; ++p) {
    EXPECT_EQ(comm_->memory->peerAddress(base + 100, p), static_cast<char*>(memory->peer(p)) + 100) << "rank " << p;
  }
  ASSERT_EQ(moecommMemFree(comm_, ptr), moecommSuccess) << moecommGetLastError(nullptr);
}

}  // namespace
}  // namespace moecomm_gpu_test
