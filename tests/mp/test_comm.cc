// The communicator as the tests see it, and bootstrap-level symmetric memory.
#include <cstdlib>
#include <string>

#include "mp/mp_common.h"

namespace moecomm_mp {
namespace {

class Comm : public MpTest {};

TEST_F(Comm, QueriesMatchTheLaunch) {
  int count = 0;
  int user_rank = -1;
  int device = 0;
  moecommBackend_t backend = moecommBackendAuto;
  MP_ASSERT_OK(moecommCommCount(comm(), &count));
  MP_ASSERT_OK(moecommCommUserRank(comm(), &user_rank));
  MP_ASSERT_OK(moecommCommDevice(comm(), &device));
  MP_ASSERT_OK(moecommCommBackend(comm(), &backend));
  if (const char* launched = std::getenv("MOECOMM_NRANKS")) {
    EXPECT_EQ(count, std::atoi(launched));
  }
  if (const char* launched = std::getenv("MOECOMM_RANK")) {
    EXPECT_EQ(user_rank, std::atoi(launched));
  }
  EXPECT_GE(user_rank, 0);
  EXPECT_LT(user_rank, count);
  EXPECT_EQ(device, -1) << "a host-backend rank has no CUDA device";
  EXPECT_EQ(backend, moecommBackendHost);

  moecommResult_t async_error = moecommInternalError;
  MP_ASSERT_OK(moecommCommGetAsyncError(comm(), &async_error));
  EXPECT_EQ(async_error, moecommSuccess);
  const char* topology = nullptr;
  MP_ASSERT_OK(moecommCommGetTopology(comm(), &topology));
  ASSERT_NE(topology, nullptr);
  EXPECT_EQ(topology[0], '{') << "topology JSON should be an object: " << topology;
}

class Memory : public MpTest {};

// Fills a buffer with a pattern naming the rank and the allocation, then reads it back.
void WriteAndCheck(void* buffer, size_t bytes, int rank, int allocation) {
  uint8_t* data = static_cast<uint8_t*>(buffer);
  for (size_t i = 0; i < bytes; ++i) data[i] = static_cast<uint8_t>(i * 7 + rank * 31 + allocation * 101);
  size_t wrong = 0;
  for (size_t i = 0; i < bytes; ++i) wrong += data[i] != static_cast<uint8_t>(i * 7 + rank * 31 + allocation * 101);
  EXPECT_EQ(wrong, 0u) << "[rank " << rank << "] symmetric buffer " << allocation << " did not keep what was written";
}

TEST_F(Memory, AllocWriteFree) {
  const size_t sizes[] = {1, 4096, 3 * 4096 + 17, 1 << 20};
  for (size_t bytes : sizes) {
    void* buffer = nullptr;
    MP_ASSERT_OK(moecommMemAlloc(comm(), &buffer, bytes));
    ASSERT_NE(buffer, nullptr);
    WriteAndCheck(buffer, bytes, rank(), 0);
    MP_ASSERT_OK(moecommMemFree(comm(), buffer));
  }
}

TEST_F(Memory, SeveralLiveAllocationsStayDistinct) {
  constexpr int kAllocations = 4;
  constexpr size_t kBytes = 64 * 1024;
  void* buffers[kAllocations] = {};
  for (int a = 0; a < kAllocations; ++a) {
    MP_ASSERT_OK(moecommMemAlloc(comm(), &buffers[a], kBytes));
    ASSERT_NE(buffers[a], nullptr);
  }
  // Write all first, then check all: overlapping allocations would overwrite each other.
  for (int a = 0; a < kAllocations; ++a) {
    uint8_t* data = static_cast<uint8_t*>(buffers[a]);
    for (size_t i = 0; i < kBytes; ++i) data[i] = static_cast<uint8_t>(i * 7 + rank() * 31 + a * 101);
  }
  for (int a = 0; a < kAllocations; ++a) {
    const uint8_t* data = static_cast<const uint8_t*>(buffers[a]);
    size_t wrong = 0;
    for (size_t i = 0; i < kBytes; ++i) wrong += data[i] != static_cast<uint8_t>(i * 7 + rank() * 31 + a * 101);
    EXPECT_EQ(wrong, 0u) << "[rank " << rank() << "] allocation " << a << " was overwritten";
  }
  // Freed in an order other than allocation order (the same on every rank).
  const int free_order[kAllocations] = {2, 0, 3, 1};
  for (int a : free_order) MP_ASSERT_OK(moecommMemFree(comm(), buffers[a]));
}

TEST_F(Memory, ZeroBytesIsInvalidArgument) {
  void* buffer = nullptr;
  EXPECT_EQ(moecommMemAlloc(comm(), &buffer, 0), moecommInvalidArgument);
  EXPECT_STRNE(LastError().c_str(), "") << "a rejected call should say why";
  // The communicator stays usable.
  MP_ASSERT_OK(moecommMemAlloc(comm(), &buffer, 256));
  WriteAndCheck(buffer, 256, rank(), 9);
  MP_ASSERT_OK(moecommMemFree(comm(), buffer));
}

// moecommEpCreate's checks. Bad values are rejected on every rank alike (each rank sees the same
// bad config), and a config that differs between ranks is rejected on every rank; the
// communicator stays usable after each refusal.
class EpConfig : public MpTest {
 protected:
  static moecommEpConfig_t Config(int num_experts, int hidden, int max_tokens, int topk) {
    moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
    config.numExperts = num_experts;
    config.hidden = hidden;
    config.maxTokensPerRank = max_tokens;
    config.topk = topk;
    return config;
  }
  void ExpectRefused(const moecommEpConfig_t& config, const std::string& why) {
    moecommEp_t ep = nullptr;
    EXPECT_EQ(moecommEpCreate(comm(), &config, &ep), moecommInvalidArgument) << "[rank " << rank() << "] " << why;
    EXPECT_STRNE(LastError().c_str(), "") << why;
    if (ep != nullptr) moecommEpDestroy(ep);
  }
  void ExpectUsable() {
    ScopedEp ep;
    MP_ASSERT_OK(ep.Create(Shape(4 * nranks(), 64, 8, 2), moecommEpModeBoth));
  }
};

TEST_F(EpConfig, BufferSizeHintIsPositive) {
  const moecommEpConfig_t config = Config(8 * nranks(), 256, 32, 4);
  size_t bytes = 0;
  MP_ASSERT_OK(moecommEpGetBufferSizeHint(comm(), &config, &bytes));
  EXPECT_GT(bytes, 0u);
}

TEST_F(EpConfig, BadValuesAreInvalidArgumentOnEveryRank) {
  ExpectRefused(Config(0, 64, 8, 1), "numExperts 0");
  ExpectRefused(Config(4 * nranks(), 4, 8, 1), "a BF16 row of 8 bytes");
  ExpectRefused(Config(4 * nranks(), 64, 0, 1), "maxTokensPerRank 0");
  ExpectRefused(Config(64 * nranks(), 64, 8, MOECOMM_MAX_TOPK + 1), "topk above MOECOMM_MAX_TOPK");
  ExpectRefused(Config(4 * nranks(), 64, 8, 0), "topk 0");
  if (nranks() > 1) ExpectRefused(Config(4 * nranks() + 1, 64, 8, 1), "numExperts not a multiple of the rank count");
  moecommEpConfig_t wrong_size = Config(4 * nranks(), 64, 8, 1);
  wrong_size.size = sizeof(wrong_size) - 1;
  ExpectRefused(wrong_size, "a config struct with the wrong size");
  moecommEpConfig_t wrong_magic = Config(4 * nranks(), 64, 8, 1);
  wrong_magic.magic = 0;
  ExpectRefused(wrong_magic, "a config struct with the wrong magic");
  ExpectUsable();
}

TEST_F(EpConfig, ConfigDifferingBetweenRanksIsInvalidArgumentOnEveryRank) {
  if (nranks() < 2) GTEST_SKIP() << "needs at least 2 ranks";
  const int last = nranks() - 1;
  ExpectRefused(Config(4 * nranks(), rank() == last ? 72 : 64, 8, 2), "hidden differs on the last rank");
  ExpectRefused(Config(4 * nranks(), 64, 8, rank() == 0 ? 3 : 2), "topk differs on rank 0");
  ExpectUsable();
}

}  // namespace
}  // namespace moecomm_mp
