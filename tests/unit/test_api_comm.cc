// The communicator and memory API: lifecycle, queries and every bad input.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/cuda_probe.h"
#include "moecomm.h"

namespace {

// Every failing call must leave a sentence behind.
#define EXPECT_FAILS_WITH(call, code)                                   \
  do {                                                                  \
    EXPECT_EQ((call), (code));                                          \
    EXPECT_GT(std::strlen(moecommGetLastError(nullptr)), 10u) << #call; \
  } while (0)

class HostBackend : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("MOECOMM_BACKEND", "host", 1);
    setenv("MOECOMM_BOOTSTRAP_TIMEOUT", "10000", 1);
  }
  void TearDown() override {
    unsetenv("MOECOMM_BACKEND");
    unsetenv("MOECOMM_BOOTSTRAP_TIMEOUT");
  }
};

// Runs body(rank) on one thread per comm, as collective calls need.
void onEveryRank(std::vector<moecommComm_t>& comms, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r) threads.emplace_back(body, static_cast<int>(r));
  for (auto& thread : threads) thread.join();
}

std::vector<moecommComm_t> makeComms(int n) {
  std::vector<moecommComm_t> comms(n, nullptr);
  EXPECT_EQ(moecommCommInitAll(comms.data(), n, nullptr), moecommSuccess) << moecommGetLastError(nullptr);
  return comms;
}

void destroyAll(std::vector<moecommComm_t>& comms) {
  onEveryRank(comms, [&](int r) { EXPECT_EQ(moecommCommDestroy(comms[r]), moecommSuccess); });
}

TEST(ApiMisc, VersionMatchesHeader) {
  int version = 0;
  ASSERT_EQ(moecommGetVersion(&version), moecommSuccess);
  EXPECT_EQ(version, MOECOMM_VERSION_CODE);
  EXPECT_STREQ(moecommGetLastError(nullptr), "");
}

TEST(ApiMisc, VersionNullPointer) { EXPECT_FAILS_WITH(moecommGetVersion(nullptr), moecommInvalidArgument); }

TEST(ApiMisc, ErrorStringsAreDistinct) {
  for (int a = 0; a < moecommNumResults; ++a) {
    ASSERT_NE(moecommGetErrorString(static_cast<moecommResult_t>(a)), nullptr);
    for (int b = a + 1; b < moecommNumResults; ++b) {
      EXPECT_STRNE(moecommGetErrorString(static_cast<moecommResult_t>(a)),
                   moecommGetErrorString(static_cast<moecommResult_t>(b)));
    }
  }
  EXPECT_STREQ(moecommGetErrorString(static_cast<moecommResult_t>(1234)), "unknown result code");
}

TEST(ApiMisc, ResultValuesAreStable) {
  EXPECT_EQ(moecommSuccess, 0);
  EXPECT_EQ(moecommUnhandledCudaError, 1);
  EXPECT_EQ(moecommSystemError, 2);
  EXPECT_EQ(moecommInternalError, 3);
  EXPECT_EQ(moecommInvalidArgument, 4);
  EXPECT_EQ(moecommInvalidUsage, 5);
  EXPECT_EQ(moecommRemoteError, 6);
  EXPECT_EQ(moecommInProgress, 7);
  EXPECT_EQ(moecommTimeout, 8);
  EXPECT_EQ(moecommNotSupported, 9);
}

TEST(ApiMisc, LastErrorIsPerThread) {
  EXPECT_EQ(moecommGetVersion(nullptr), moecommInvalidArgument);
  std::string other = "unset";
  std::thread([&] { other = moecommGetLastError(nullptr); }).join();
  EXPECT_EQ(other, "");
  EXPECT_STRNE(moecommGetLastError(nullptr), "");
}

TEST(ApiUniqueId, StringRoundTrip) {
  moecommUniqueId id;
  for (int i = 0; i < MOECOMM_UNIQUE_ID_BYTES; ++i) id.internal[i] = static_cast<char>(i * 37 + 11);
  char text[MOECOMM_UNIQUE_ID_STRING_BYTES];
  ASSERT_EQ(moecommUniqueIdToString(&id, text, sizeof(text)), moecommSuccess);
  EXPECT_EQ(std::strlen(text), 2u * MOECOMM_UNIQUE_ID_BYTES);
  moecommUniqueId back;
  ASSERT_EQ(moecommUniqueIdFromString(text, &back), moecommSuccess);
  EXPECT_EQ(std::memcmp(id.internal, back.internal, MOECOMM_UNIQUE_ID_BYTES), 0);
}

TEST(ApiUniqueId, BadText) {
  moecommUniqueId id;
  EXPECT_FAILS_WITH(moecommUniqueIdFromString("abc", &id), moecommInvalidArgument);
  std::string text(2 * MOECOMM_UNIQUE_ID_BYTES, 'a');
  text[17] = 'x';
  EXPECT_FAILS_WITH(moecommUniqueIdFromString(text.c_str(), &id), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommUniqueIdFromString(nullptr, &id), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommUniqueIdFromString(text.c_str(), nullptr), moecommInvalidArgument);
}

TEST(ApiUniqueId, SmallBuffer) {
  moecommUniqueId id{};
  char text[16];
  EXPECT_FAILS_WITH(moecommUniqueIdToString(&id, text, sizeof(text)), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommUniqueIdToString(&id, nullptr, 300), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommGetUniqueId(nullptr), moecommInvalidArgument);
}

TEST_F(HostBackend, InitRankNullAndCounts) {
  moecommUniqueId id{};
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitRank(nullptr, 1, id, 0, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 0, id, 0, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, -3, id, 0, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 2, id, 2, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 2, id, -1, nullptr), moecommInvalidArgument);
  EXPECT_EQ(comm, nullptr);
}

TEST_F(HostBackend, InitRankBadConfigHeader) {
  moecommUniqueId id{};
  moecommComm_t comm = nullptr;
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  config.size = sizeof(config) - 8;
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
  config = MOECOMM_CONFIG_INIT;
  config.magic = 0x1234;
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
}

TEST_F(HostBackend, InitRankBadConfigFields) {
  moecommUniqueId id{};
  moecommComm_t comm = nullptr;
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  config.backend = static_cast<moecommBackend_t>(7);
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
  config = MOECOMM_CONFIG_INIT;
  config.device = -2;
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
  config = MOECOMM_CONFIG_INIT;
  config.timeoutMs = -5;
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
  config = MOECOMM_CONFIG_INIT;
  config.blocking = 3;
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
  config = MOECOMM_CONFIG_INIT;
  config.allocFn = [](void*, size_t, int, void**) { return 0; };
  EXPECT_FAILS_WITH(moecommCommInitRank(&comm, 1, id, 0, &config), moecommInvalidArgument);
}

TEST_F(HostBackend, BadBackendEnvironment) {
  setenv("MOECOMM_BACKEND", "quantum", 1);
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitAll(&comm, 1, nullptr), moecommInvalidArgument);
  EXPECT_NE(std::string(moecommGetLastError(nullptr)).find("quantum"), std::string::npos);
}

TEST_F(HostBackend, CudaBackendWithoutGpuIsNotSupported) {
  if (moecomm::cudaVisibleDeviceCount(nullptr) > 0) GTEST_SKIP() << "a GPU is present; this checks the no-GPU path";
  setenv("MOECOMM_BACKEND", "cuda", 1);
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitAll(&comm, 1, nullptr), moecommNotSupported);
  EXPECT_EQ(comm, nullptr);
}

TEST_F(HostBackend, InitRankSingleRank) {
  moecommUniqueId id;
  ASSERT_EQ(moecommGetUniqueId(&id), moecommSuccess);
  moecommComm_t comm = nullptr;
  ASSERT_EQ(moecommCommInitRank(&comm, 1, id, 0, nullptr), moecommSuccess) << moecommGetLastError(nullptr);
  int count = 0, rank = -1, device = 7;
  moecommBackend_t backend = moecommBackendAuto;
  EXPECT_EQ(moecommCommCount(comm, &count), moecommSuccess);
  EXPECT_EQ(moecommCommUserRank(comm, &rank), moecommSuccess);
  EXPECT_EQ(moecommCommDevice(comm, &device), moecommSuccess);
  EXPECT_EQ(moecommCommBackend(comm, &backend), moecommSuccess);
  EXPECT_EQ(count, 1);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(device, -1);
  EXPECT_EQ(backend, moecommBackendHost);
  EXPECT_EQ(moecommCommDestroy(comm), moecommSuccess);
}

TEST_F(HostBackend, InitRankThreadsAsRanks) {
  moecommUniqueId id;
  ASSERT_EQ(moecommGetUniqueId(&id), moecommSuccess);
  const int n = 3;
  std::vector<moecommComm_t> comms(n, nullptr);
  std::vector<moecommResult_t> results(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] { results[r] = moecommCommInitRank(&comms[r], n, id, r, nullptr); });
  }
  for (auto& thread : threads) thread.join();
  for (int r = 0; r < n; ++r) {
    ASSERT_EQ(results[r], moecommSuccess);
    int rank = -1;
    EXPECT_EQ(moecommCommUserRank(comms[r], &rank), moecommSuccess);
    EXPECT_EQ(rank, r);
  }
  destroyAll(comms);
}

TEST_F(HostBackend, InitAllQueries) {
  for (int n : {1, 2, 4}) {
    std::vector<moecommComm_t> comms = makeComms(n);
    for (int r = 0; r < n; ++r) {
      int count = 0, rank = -1, device = 5;
      ASSERT_EQ(moecommCommCount(comms[r], &count), moecommSuccess);
      ASSERT_EQ(moecommCommUserRank(comms[r], &rank), moecommSuccess);
      ASSERT_EQ(moecommCommDevice(comms[r], &device), moecommSuccess);
      EXPECT_EQ(count, n);
      EXPECT_EQ(rank, r);
      EXPECT_EQ(device, -1);
      const char* json = nullptr;
      ASSERT_EQ(moecommCommGetTopology(comms[r], &json), moecommSuccess);
      ASSERT_NE(json, nullptr);
    }
    destroyAll(comms);
  }
}

TEST_F(HostBackend, InitAllBadArguments) {
  moecommComm_t comms[2];
  EXPECT_FAILS_WITH(moecommCommInitAll(nullptr, 2, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitAll(comms, 0, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitAll(comms, -1, nullptr), moecommInvalidArgument);
  int devices[2] = {0, -4};
  EXPECT_FAILS_WITH(moecommCommInitAll(comms, 2, devices), moecommInvalidArgument);
}

TEST_F(HostBackend, QueriesRejectNullOutputs) {
  std::vector<moecommComm_t> comms = makeComms(1);
  moecommComm_t comm = comms[0];
  EXPECT_FAILS_WITH(moecommCommCount(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommUserRank(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommDevice(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommBackend(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommGetTopology(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommGetAsyncError(comm, nullptr), moecommInvalidArgument);
  int count = 0;
  EXPECT_FAILS_WITH(moecommCommCount(nullptr, &count), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommDestroy(nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommAbort(nullptr), moecommInvalidArgument);
  destroyAll(comms);
}

TEST_F(HostBackend, DestroyedCommIsInvalidUsage) {
  std::vector<moecommComm_t> comms = makeComms(1);
  moecommComm_t comm = comms[0];
  ASSERT_EQ(moecommCommDestroy(comm), moecommSuccess);
  int count = 0;
  void* ptr = nullptr;
  moecommResult_t async;
  EXPECT_FAILS_WITH(moecommCommCount(comm, &count), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommCommGetAsyncError(comm, &async), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommMemAlloc(comm, &ptr, 64), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommCommAbort(comm), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommCommDestroy(comm), moecommInvalidUsage);
}

TEST_F(HostBackend, CallsAfterAbortAreInvalidUsage) {
  std::vector<moecommComm_t> comms = makeComms(1);
  moecommComm_t comm = comms[0];
  ASSERT_EQ(moecommCommAbort(comm), moecommSuccess);
  ASSERT_EQ(moecommCommAbort(comm), moecommSuccess);  // idempotent
  void* ptr = nullptr;
  char buffer[64];
  EXPECT_FAILS_WITH(moecommMemAlloc(comm, &ptr, 64), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommMemRegister(comm, buffer, sizeof(buffer)), moecommInvalidUsage);
  moecommEp_t ep = nullptr;
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = 4;
  config.hidden = 128;
  config.maxTokensPerRank = 8;
  config.topk = 2;
  EXPECT_FAILS_WITH(moecommEpCreate(comm, &config, &ep), moecommInvalidUsage);
  // Queries still answer, and report the abort as the async error.
  int count = 0;
  EXPECT_EQ(moecommCommCount(comm, &count), moecommSuccess);
  moecommResult_t async = moecommSuccess;
  EXPECT_EQ(moecommCommGetAsyncError(comm, &async), moecommSuccess);
  EXPECT_NE(async, moecommSuccess);
  EXPECT_EQ(moecommCommDestroy(comm), moecommSuccess);
}

TEST_F(HostBackend, AbortUnblocksAPendingCollective) {
  std::vector<moecommComm_t> comms = makeComms(2);
  // Rank 0 enters a collective that rank 1 never joins; aborting rank 0 must free it fast.
  moecommResult_t result = moecommSuccess;
  auto start = std::chrono::steady_clock::now();
  std::thread waiter([&] {
    void* ptr = nullptr;
    result = moecommMemAlloc(comms[0], &ptr, 4096);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_EQ(moecommCommAbort(comms[0]), moecommSuccess);
  waiter.join();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(result, moecommSuccess);
  EXPECT_LT(seconds, 5.0);
  EXPECT_EQ(moecommCommDestroy(comms[0]), moecommSuccess);
  ASSERT_EQ(moecommCommAbort(comms[1]), moecommSuccess);
  EXPECT_EQ(moecommCommDestroy(comms[1]), moecommSuccess);
}

TEST_F(HostBackend, SymmetricMemoryAllocFree) {
  std::vector<moecommComm_t> comms = makeComms(2);
  onEveryRank(comms, [&](int r) {
    void* ptr = nullptr;
    ASSERT_EQ(moecommMemAlloc(comms[r], &ptr, 1 << 20), moecommSuccess) << moecommGetLastError(nullptr);
    ASSERT_NE(ptr, nullptr);
    std::memset(ptr, r + 1, 1 << 20);
    EXPECT_EQ(static_cast<unsigned char*>(ptr)[12345], r + 1);
    EXPECT_EQ(moecommMemFree(comms[r], ptr), moecommSuccess) << moecommGetLastError(nullptr);
  });
  destroyAll(comms);
}

TEST_F(HostBackend, MemoryBadArguments) {
  std::vector<moecommComm_t> comms = makeComms(1);
  moecommComm_t comm = comms[0];
  void* ptr = nullptr;
  int local = 0;
  EXPECT_FAILS_WITH(moecommMemAlloc(comm, nullptr, 64), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemAlloc(comm, &ptr, 0), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemFree(comm, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemFree(comm, &local), moecommInvalidArgument);
  destroyAll(comms);
}

TEST_F(HostBackend, RegisterOverlapAndDeregister) {
  std::vector<moecommComm_t> comms = makeComms(1);
  moecommComm_t comm = comms[0];
  std::vector<char> buffer(4096);
  EXPECT_FAILS_WITH(moecommMemRegister(comm, nullptr, 64), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemRegister(comm, buffer.data(), 0), moecommInvalidArgument);
  ASSERT_EQ(moecommMemRegister(comm, buffer.data() + 1024, 1024), moecommSuccess);
  EXPECT_FAILS_WITH(moecommMemRegister(comm, buffer.data() + 1500, 100), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemRegister(comm, buffer.data(), 1025), moecommInvalidArgument);
  EXPECT_EQ(moecommMemRegister(comm, buffer.data(), 1024), moecommSuccess);  // adjacent is fine
  EXPECT_EQ(moecommMemRegister(comm, buffer.data() + 2048, 2048), moecommSuccess);
  EXPECT_FAILS_WITH(moecommMemDeregister(comm, buffer.data() + 1), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommMemDeregister(comm, nullptr), moecommInvalidArgument);
  EXPECT_EQ(moecommMemDeregister(comm, buffer.data() + 1024), moecommSuccess);
  EXPECT_FAILS_WITH(moecommMemDeregister(comm, buffer.data() + 1024), moecommInvalidArgument);
  destroyAll(comms);
}

TEST_F(HostBackend, InitFromEnvNeedsVariables) {
  unsetenv("MOECOMM_RANK");
  unsetenv("MOECOMM_NRANKS");
  unsetenv("MOECOMM_UNIQUE_ID");
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitFromEnv(&comm, nullptr), moecommInvalidUsage);
  setenv("MOECOMM_RANK", "0", 1);
  setenv("MOECOMM_NRANKS", "1", 1);
  EXPECT_FAILS_WITH(moecommCommInitFromEnv(&comm, nullptr), moecommInvalidUsage);
  setenv("MOECOMM_UNIQUE_ID", "zz", 1);
  EXPECT_FAILS_WITH(moecommCommInitFromEnv(&comm, nullptr), moecommInvalidUsage);
  setenv("MOECOMM_RANK", "one", 1);
  EXPECT_FAILS_WITH(moecommCommInitFromEnv(&comm, nullptr), moecommInvalidUsage);
  EXPECT_FAILS_WITH(moecommCommInitFromEnv(nullptr, nullptr), moecommInvalidArgument);
  unsetenv("MOECOMM_RANK");
  unsetenv("MOECOMM_NRANKS");
  unsetenv("MOECOMM_UNIQUE_ID");
}

TEST_F(HostBackend, InitFromEnvSingleRank) {
  moecommUniqueId id;
  ASSERT_EQ(moecommGetUniqueId(&id), moecommSuccess);
  char text[MOECOMM_UNIQUE_ID_STRING_BYTES];
  ASSERT_EQ(moecommUniqueIdToString(&id, text, sizeof(text)), moecommSuccess);
  setenv("MOECOMM_RANK", "0", 1);
  setenv("MOECOMM_NRANKS", "1", 1);
  setenv("MOECOMM_UNIQUE_ID", text, 1);
  moecommComm_t comm = nullptr;
  EXPECT_EQ(moecommCommInitFromEnv(&comm, nullptr), moecommSuccess) << moecommGetLastError(nullptr);
  if (comm) EXPECT_EQ(moecommCommDestroy(comm), moecommSuccess);
  unsetenv("MOECOMM_RANK");
  unsetenv("MOECOMM_NRANKS");
  unsetenv("MOECOMM_UNIQUE_ID");
}

// External bootstrap for one rank: the allgather is a copy, the barrier a no-op.
int copyAllgather(void* ctx, const void* send, void* recv, size_t bytes) {
  ++*static_cast<int*>(ctx);
  std::memmove(recv, send, bytes);
  return 0;
}
int noBarrier(void* ctx) {
  ++*static_cast<int*>(ctx);
  return 0;
}
int failingAllgather(void*, const void*, void*, size_t) { return 17; }

TEST_F(HostBackend, InitExternalSingleRank) {
  int calls = 0;
  moecommExternalBootstrap_t bootstrap = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  bootstrap.allgather = copyAllgather;
  bootstrap.barrier = noBarrier;
  bootstrap.ctx = &calls;
  moecommComm_t comm = nullptr;
  ASSERT_EQ(moecommCommInitExternal(&comm, 1, 0, &bootstrap, nullptr), moecommSuccess) << moecommGetLastError(nullptr);
  EXPECT_GT(calls, 0);  // the library really went through the callbacks
  EXPECT_EQ(moecommCommDestroy(comm), moecommSuccess);
}

TEST_F(HostBackend, InitExternalBadArguments) {
  moecommExternalBootstrap_t bootstrap = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 1, 0, nullptr, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 1, 0, &bootstrap, nullptr), moecommInvalidArgument);
  bootstrap.allgather = copyAllgather;
  bootstrap.barrier = noBarrier;
  bootstrap.magic = 0;
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 1, 0, &bootstrap, nullptr), moecommInvalidArgument);
  bootstrap = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  bootstrap.allgather = copyAllgather;
  bootstrap.barrier = noBarrier;
  bootstrap.size = 8;
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 1, 0, &bootstrap, nullptr), moecommInvalidArgument);
  bootstrap = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  bootstrap.allgather = copyAllgather;
  bootstrap.barrier = noBarrier;
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 0, 0, &bootstrap, nullptr), moecommInvalidArgument);
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 2, 5, &bootstrap, nullptr), moecommInvalidArgument);
}

TEST_F(HostBackend, InitExternalCallbackFailure) {
  moecommExternalBootstrap_t bootstrap = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  bootstrap.allgather = failingAllgather;
  bootstrap.barrier = noBarrier;
  int calls = 0;
  bootstrap.ctx = &calls;
  moecommComm_t comm = nullptr;
  EXPECT_FAILS_WITH(moecommCommInitExternal(&comm, 1, 0, &bootstrap, nullptr), moecommRemoteError);
  EXPECT_EQ(comm, nullptr);
}

}  // namespace
