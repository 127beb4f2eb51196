// Test kernels that touch symmetric GPU memory through peer pointers with 16-byte loads and
// stores (what the EP kernels will do over NVLink), and the pattern they write. Host-side
// declarations need no CUDA header; the pattern function is shared with the host checker.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define MC_TEST_HOST_DEVICE __host__ __device__
#else
#define MC_TEST_HOST_DEVICE
#endif

namespace moecomm_gpu_test {

struct Word16 {
  uint32_t lane[4];
};

// The value writer `writer` stores at 16-byte word `index` of its chunk in a run with `seed`:
// random-looking, different for every (seed, writer, index, lane).
MC_TEST_HOST_DEVICE inline uint32_t PatternLane(uint64_t seed, int writer, uint64_t index, int lane) {
  uint64_t x = seed ^ (static_cast<uint64_t>(writer + 1) * 0x9e3779b97f4a7c15ull) ^ (index * 4 + lane + 1);
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<uint32_t>(x);
}

// Stores writer's pattern into words [0, words) at destination (16-byte aligned; may be a
// peer's memory). Returns a cudaError_t value (0 = launched).
int LaunchStorePattern(void* destination, size_t words, uint64_t seed, int writer);

// Copies words [0, words) from source (may be a peer's memory) to destination with 16-byte
// loads and stores. Returns a cudaError_t value (0 = launched).
int LaunchLoadCopy(const void* source, void* destination, size_t words);

// One thread that spins for `microseconds` (global timer) on `stream` (a cudaStream_t): holds
// the stream's later work back, e.g. to show what another stream may run ahead of it.
int LaunchSpin(void* stream, uint64_t microseconds);

// One thread on `stream` that holds the stream's later work back until the host sets *flag
// (mapped host memory) to non-zero, or `timeoutMicroseconds` passed; it then stores 1 (released
// by the host) or 2 (timed out) into *status (mapped host memory).
int LaunchHostGate(void* stream, const volatile int* flag, volatile int* status, uint64_t timeoutMicroseconds);

}  // namespace moecomm_gpu_test
