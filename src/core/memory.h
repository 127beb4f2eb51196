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

class SymmetricMemory;

class MemoryRegistry {
 public:
  MemoryRegistry();
  ~MemoryRegistry();

  void addSymmetric(std::unique_ptr<SymmetricMemory> memory);
  // Removes and returns the allocation whose local address is ptr, or nullptr.
  std::unique_ptr<SymmetricMemory> takeSymmetric(void* ptr);
  size_t symmetricCount() const;
  // The symmetric allocation holding [ptr, ptr + bytes) of this rank's memory, with the
  // offset of ptr in it; nullptr when no single allocation holds the whole range. The
  // object stays owned by the registry (valid until moecommMemFree or comm destruction).
  SymmetricMemory* findSymmetric(const void* ptr, size_t bytes, size_t* offset) const;
  // Where rank `peer` is addressed by this rank for the local symmetric address localPtr
  // (same offset in the peer's buffer), or nullptr when localPtr is not in a symmetric
  // allocation, peer is out of range, or the peers were detached.
  void* peerAddress(const void* localPtr, int peer) const;
  // detachPeers() on every symmetric allocation (see transport/symmetric.h); the first
  // failure is returned after all were tried. For communicator destruction: call on every
  // rank before the barrier that precedes freeing.
  moecommResult_t detachAllPeers();

  // Rejects null, zero size and overlap with an existing registration.
  moecommResult_t registerRange(void* ptr, size_t bytes);
  moecommResult_t deregisterRange(void* ptr);
  // True when [ptr, ptr + bytes) lies inside one registered range.
  bool isRegistered(const void* ptr, size_t bytes) const;

 private:
  mutable std::mutex mutex_;
  std::map<uintptr_t, std::unique_ptr<SymmetricMemory>> symmetric_;  // local base -> allocation
  std::map<uintptr_t, size_t> registered_;                           // start -> bytes
  uint64_t symmetricAdded_ = 0;                                      // allocations added so far: the next one's id - 1
};

}  // namespace moecomm
