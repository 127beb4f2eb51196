// Shared pieces of the multi-process tests: the process-wide communicator made in mp_main.cc,
// the test fixture, RAII holders for EPs and handles, poisoned buffers and the element-by-element
// comparison that reports the first mismatches with their row and column.
//
// Every rank runs the same tests in the same order, and every collective call in a test is
// made by every rank (a test that needs fewer ranks skips on all of them alike).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "moecomm.h"
#include "mp/reference.h"

namespace moecomm_mp {

struct MpContext {
  moecommComm_t comm = nullptr;
  int rank = 0;
  int nranks = 1;
  uint64_t baseSeed = 0;  // identical on every rank, fresh every run (see mp_main.cc)
};
const MpContext& Mp();

// The calling thread's last library error as text, for failure messages.
inline std::string LastError() { return moecommGetLastError(nullptr); }

}  // namespace moecomm_mp

// Checks a libmoecomm call; on failure prints the code, its name and the library's sentence.
#define MP_ASSERT_OK(expr)                                                                                           \
  do {                                                                                                               \
    const moecommResult_t mp_result_ = (expr);                                                                       \
    ASSERT_EQ(mp_result_, moecommSuccess) << "[rank " << ::moecomm_mp::Mp().rank << "] " #expr " -> "                \
                                          << moecommGetErrorString(mp_result_) << ": " << ::moecomm_mp::LastError(); \
  } while (0)

#define MP_EXPECT_OK(expr)                                                                                           \
  do {                                                                                                               \
    const moecommResult_t mp_result_ = (expr);                                                                       \
    EXPECT_EQ(mp_result_, moecommSuccess) << "[rank " << ::moecomm_mp::Mp().rank << "] " #expr " -> "                \
                                          << moecommGetErrorString(mp_result_) << ": " << ::moecomm_mp::LastError(); \
  } while (0)

namespace moecomm_mp {

class MpTest : public ::testing::Test {
 protected:
  moecommComm_t comm() const { return Mp().comm; }
  int rank() const { return Mp().rank; }
  int nranks() const { return Mp().nranks; }

  // A generator seeded from the run's seed, the test's name and a salt: the same on every rank.
  Random MakeRandom(const std::string& salt = "") const {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    uint64_t hash = kHashStart ^ Mp().baseSeed;
    hash = HashText(hash, std::string(info->test_suite_name()) + "." + info->name() + "/" + salt);
    return Random(hash);
  }

  // A shape on this communicator: numExperts is rounded up to a multiple of the rank count
  // (and stays >= topk), so the same test runs on 1, 2, 3, 4 and 8 ranks.
  EpShape Shape(int num_experts, int hidden, int max_tokens_per_rank, int topk) const {
    EpShape shape;
    shape.nranks = nranks();
    shape.numExperts = (num_experts + nranks() - 1) / nranks() * nranks();
    shape.hidden = hidden;
    shape.maxTokensPerRank = max_tokens_per_rank;
    shape.topk = topk;
    return shape;
  }
};

// Owns an EP; EpDestroy is collective, so after a failure (the process is about to exit, see
// mp_main.cc) it is skipped rather than left waiting for ranks that moved on.
class ScopedEp {
 public:
  ScopedEp() = default;
  ScopedEp(const ScopedEp&) = delete;
  ScopedEp& operator=(const ScopedEp&) = delete;
  ~ScopedEp() { Destroy(); }

  moecommResult_t Create(const EpShape& shape, moecommEpMode_t mode) {
    moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
    config.numExperts = shape.numExperts;
    config.hidden = shape.hidden;
    config.maxTokensPerRank = shape.maxTokensPerRank;
    config.topk = shape.topk;
    config.mode = mode;
    return moecommEpCreate(Mp().comm, &config, &ep_);
  }
  void Destroy() {
    if (ep_ == nullptr) return;
    if (!::testing::Test::HasFailure()) {
      const moecommResult_t result = moecommEpDestroy(ep_);
      EXPECT_EQ(result, moecommSuccess) << "moecommEpDestroy: " << LastError();
    }
    ep_ = nullptr;
  }
  moecommEp_t get() const { return ep_; }

 private:
  moecommEp_t ep_ = nullptr;
};

class ScopedHandle {
 public:
  ScopedHandle() = default;
  ScopedHandle(const ScopedHandle&) = delete;
  ScopedHandle& operator=(const ScopedHandle&) = delete;
  ~ScopedHandle() { Reset(); }
  void Reset() {
    if (handle_ != nullptr) {
      EXPECT_EQ(moecommEpHandleDestroy(handle_), moecommSuccess) << LastError();
    }
    handle_ = nullptr;
  }
  moecommEpHandle_t* out() { return &handle_; }
  moecommEpHandle_t get() const { return handle_; }

 private:
  moecommEpHandle_t handle_ = nullptr;
};

// Byte patterns written into outputs before each call, chosen so no correct result equals
// them: NaN for BF16, FP32 and FP8; 0xABABABAB (a large negative number) for integers.
constexpr uint8_t kPoisonFloat = 0xFF;
constexpr uint8_t kPoisonFp8 = kFp8NanBits;
constexpr uint8_t kPoisonInt = 0xAB;

// A buffer of `count` elements followed by a guard region, all poisoned; GuardIntact() says
// whether anything was written past the end (exact sizing must not overrun).
template <typename T>
class GuardedBuffer {
 public:
  static constexpr size_t kGuardElements = 64;
  GuardedBuffer(size_t count, uint8_t poison) : count_(count), poison_(poison), storage_(count + kGuardElements) {
    Poison();
  }
  void Poison() { std::memset(storage_.data(), poison_, storage_.size() * sizeof(T)); }
  T* data() { return storage_.data(); }
  const T* data() const { return storage_.data(); }
  size_t size() const { return count_; }
  // Whether elements [first, first + count) still hold the poison: for outputs the contract
  // says are not written (rows beyond N, low-latency slots beyond the count).
  bool PoisonedFrom(size_t first, size_t count) const {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(storage_.data() + first);
    for (size_t i = 0; i < count * sizeof(T); ++i) {
      if (bytes[i] != poison_) return false;
    }
    return true;
  }
  bool GuardIntact() const {
    const uint8_t* guard = reinterpret_cast<const uint8_t*>(storage_.data() + count_);
    for (size_t i = 0; i < kGuardElements * sizeof(T); ++i) {
      if (guard[i] != poison_) return false;
    }
    return true;
  }

 private:
  size_t count_;
  uint8_t poison_;
  std::vector<T> storage_;
};

enum class ElementKind { kBf16, kFp8, kFloat32, kInt32, kInt64, kUint8 };

// Labels a row in failure messages, e.g. "row 3 (from rank 1 token 7)".
using RowLabel = std::function<std::string(size_t row)>;

// Compares count elements bit for bit; on mismatch reports how many differ and the first few
// with row, column, both values and what the row is.
::testing::AssertionResult SameElements(const std::string& what, ElementKind kind, const void* actual,
                                        const void* expected, size_t count, size_t row_length,
                                        const RowLabel& label = nullptr);

template <typename T>
::testing::AssertionResult SameVectors(const std::string& what, ElementKind kind, const T* actual,
                                       const std::vector<T>& expected, size_t row_length,
                                       const RowLabel& label = nullptr) {
  return SameElements(what, kind, actual, expected.data(), expected.size(), row_length, label);
}

inline ElementKind IndexKind(moecommDataType_t type) {
  return type == moecommInt32 ? ElementKind::kInt32 : ElementKind::kInt64;
}

// A valid pointer for an input of zero elements (T = 0): the tests exercise empty inputs, not
// the handling of NULL, so inputs are never NULL unless the header says NULL means "absent".
const void* EmptyInput();
template <typename T>
const T* InputData(const std::vector<T>& values) {
  return values.empty() ? static_cast<const T*>(EmptyInput()) : values.data();
}

// topk indices as the bytes a call takes: int64 as is, or narrowed to int32.
struct IndexBuffer {
  std::vector<int64_t> wide;
  std::vector<int32_t> narrow;
  moecommDataType_t type = moecommInt64;
  IndexBuffer(const std::vector<int64_t>& values, moecommDataType_t index_type)
      : wide(values), narrow(ToInt32(values)), type(index_type) {}
  const void* data() const {
    if (type == moecommInt32) return InputData(narrow);
    return InputData(wide);
  }
};

inline const char* IndexTypeName(moecommDataType_t type) { return type == moecommInt32 ? "int32" : "int64"; }

}  // namespace moecomm_mp
