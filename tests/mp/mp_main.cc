// main() of moecomm_mp_tests: creates one host-backend communicator for the whole process
// (from the moecomm-run environment, or a 1-rank communicator when started alone), shares it
// with the tests, and makes sure a failing rank does not leave the others hanging.
//
// Seeds: the inputs of every rank must be generated identically on every rank, and fresh on
// every run. The API has no broadcast, but MOECOMM_UNIQUE_ID is fresh per run (it holds a
// random tag) and identical on all ranks, so its hash is the run's seed. MP_TEST_SEED=<hex>
// replays a run (every rank must see the same value, which moecomm-run's environment gives).
//
// Order: every rank must run the same tests in the same order, so pass every rank the same
// --gtest_filter, and --gtest_shuffle only together with a fixed --gtest_random_seed.
//
// Failures: after a test fails on a rank, that rank's state may no longer match the others'
// (it may have skipped a collective call). It therefore exits at once with status 1; the
// launcher then stops the other ranks. Had it stayed, the others would wait in their next
// collective until the bootstrap timeout anyway, so nothing hangs either way: the exit only
// makes it prompt and keeps the first failure as the one reported.
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "mp/mp_common.h"
#include "rank_listeners.h"

namespace moecomm_mp {
namespace {

MpContext g_context;

std::string FormatElement(ElementKind kind, const uint8_t* bytes) {
  char text[96];
  switch (kind) {
    case ElementKind::kBf16: {
      uint16_t bits;
      std::memcpy(&bits, bytes, sizeof(bits));
      std::snprintf(text, sizeof(text), "0x%04x (%.9g)", bits, Bf16ToFloat(bits));
      break;
    }
    case ElementKind::kFp8:
      std::snprintf(text, sizeof(text), "0x%02x (%.9g)", bytes[0], Fp8E4m3ToFloat(bytes[0]));
      break;
    case ElementKind::kFloat32: {
      uint32_t bits;
      std::memcpy(&bits, bytes, sizeof(bits));
      std::snprintf(text, sizeof(text), "0x%08x (%.9g)", bits, FloatFromBits(bits));
      break;
    }
    case ElementKind::kInt32: {
      int32_t value;
      std::memcpy(&value, bytes, sizeof(value));
      std::snprintf(text, sizeof(text), "%" PRId32, value);
      break;
    }
    case ElementKind::kInt64: {
      int64_t value;
      std::memcpy(&value, bytes, sizeof(value));
      std::snprintf(text, sizeof(text), "%" PRId64, value);
      break;
    }
    case ElementKind::kUint8:
      std::snprintf(text, sizeof(text), "%u", bytes[0]);
      break;
  }
  return text;
}

size_t ElementBytes(ElementKind kind) {
  switch (kind) {
    case ElementKind::kBf16:
      return 2;
    case ElementKind::kFp8:
    case ElementKind::kUint8:
      return 1;
    case ElementKind::kFloat32:
    case ElementKind::kInt32:
      return 4;
    case ElementKind::kInt64:
      return 8;
  }
  return 1;
}

moecommResult_t CreateComm(moecommComm_t* comm, uint64_t* seed_source) {
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  config.backend = moecommBackendHost;
  const char* id_text = std::getenv("MOECOMM_UNIQUE_ID");
  if (std::getenv("MOECOMM_RANK") != nullptr && id_text != nullptr) {
    *seed_source = HashText(kHashStart, id_text);
    return moecommCommInitFromEnv(comm, &config);
  }
  // Started without moecomm-run: a communicator of one rank.
  moecommUniqueId id;
  moecommResult_t result = moecommGetUniqueId(&id);
  if (result != moecommSuccess) return result;
  char text[MOECOMM_UNIQUE_ID_STRING_BYTES];
  result = moecommUniqueIdToString(&id, text, sizeof(text));
  if (result != moecommSuccess) return result;
  *seed_source = HashText(kHashStart, text);
  return moecommCommInitRank(comm, 1, id, 0, &config);
}

}  // namespace

const MpContext& Mp() { return g_context; }

const void* EmptyInput() {
  alignas(64) static const uint8_t kEmpty[64] = {0};
  return kEmpty;
}

::testing::AssertionResult SameElements(const std::string& what, ElementKind kind, const void* actual,
                                        const void* expected, size_t count, size_t row_length, const RowLabel& label) {
  const size_t element_bytes = ElementBytes(kind);
  const uint8_t* actual_bytes = static_cast<const uint8_t*>(actual);
  const uint8_t* expected_bytes = static_cast<const uint8_t*>(expected);
  constexpr size_t kReported = 8;
  size_t mismatches = 0;
  std::ostringstream detail;
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* got = actual_bytes + i * element_bytes;
    const uint8_t* want = expected_bytes + i * element_bytes;
    if (std::memcmp(got, want, element_bytes) == 0) continue;
    if (mismatches < kReported) {
      const size_t row = row_length > 0 ? i / row_length : 0;
      const size_t column = row_length > 0 ? i % row_length : i;
      detail << "\n  [" << row << "][" << column << "]";
      if (label) detail << " " << label(row);
      detail << ": got " << FormatElement(kind, got) << ", expected " << FormatElement(kind, want);
    }
    ++mismatches;
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "[rank " << g_context.rank << "] " << what << ": " << mismatches << " of "
                                       << count << " elements differ" << detail.str();
}

}  // namespace moecomm_mp

int main(int argc, char** argv) {
  using moecomm_mp::g_context;
  ::testing::InitGoogleTest(&argc, argv);

  uint64_t seed_source = 0;
  const moecommResult_t result = moecomm_mp::CreateComm(&g_context.comm, &seed_source);
  if (result != moecommSuccess) {
    std::fprintf(stderr, "moecomm_mp_tests: creating the communicator failed: %s: %s\n", moecommGetErrorString(result),
                 moecommGetLastError(nullptr));
    return 1;
  }
  if (moecommCommUserRank(g_context.comm, &g_context.rank) != moecommSuccess ||
      moecommCommCount(g_context.comm, &g_context.nranks) != moecommSuccess) {
    std::fprintf(stderr, "moecomm_mp_tests: querying the communicator failed: %s\n", moecommGetLastError(nullptr));
    return 1;
  }
  const char* replay = std::getenv("MP_TEST_SEED");
  g_context.baseSeed = replay != nullptr ? std::strtoull(replay, nullptr, 16) : seed_source;

  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (g_context.rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new moecomm_test::RankFailurePrinter(g_context.rank));
  } else {
    std::printf("moecomm_mp_tests: %d ranks, MP_TEST_SEED=%" PRIx64 "\n", g_context.nranks, g_context.baseSeed);
  }
  char seed[64];
  std::snprintf(seed, sizeof(seed), " (seed: MP_TEST_SEED=%" PRIx64 ")", g_context.baseSeed);
  listeners.Append(new moecomm_test::ExitOnRankFailure(g_context.rank, seed));

  const int status = RUN_ALL_TESTS();
  const moecommResult_t destroyed = moecommCommDestroy(g_context.comm);
  if (destroyed != moecommSuccess) {
    std::fprintf(stderr, "[rank %d] moecommCommDestroy: %s: %s\n", g_context.rank, moecommGetErrorString(destroyed),
                 moecommGetLastError(nullptr));
    return 1;
  }
  return status;
}
