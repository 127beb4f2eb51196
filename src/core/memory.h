// Per-communicator record of symmetric allocations (moecommMemAlloc) and caller buffers
// registered with moecommMemRegister.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "moecomm.h"

namespace moecomm {

class ShmSymmetric;

class MemoryRegistry {
 public:
  MemoryRegistry();
  ~MemoryRegistry();

  void addSymmetric(std::unique_ptr<ShmSymmetric> memory);
  // Removes and returns the allocation whose local address is ptr, or nullptr.
  std::unique_ptr<ShmSymmetric> takeSymmetric(void* ptr);
  size_t symmetricCount() const;

  // Rejects null, zero size and overlap with an existing registration.
  moecommResult_t registerRange(void* ptr, size_t bytes);
  moecommResult_t deregisterRange(void* ptr);
  // True when [ptr, ptr + bytes) lies inside one registered range.
  bool isRegistered(const void* ptr, size_t bytes) const;

 private:
  mutable std::mutex mutex_;
  std::map<void*, std::unique_ptr<ShmSymmetric>> symmetric_;
  std::map<uintptr_t, size_t> registered_;  // start -> bytes
};

}  // namespace moecomm
