// The communicator object behind moecommComm_t.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/bootstrap.h"
#include "core/registry.h"
#include "moecomm.h"

namespace moecomm {
class MemoryRegistry;
struct Allocator {
  moecommAllocFn_t alloc = nullptr;
  moecommFreeFn_t free = nullptr;
  void* ctx = nullptr;
};
}  // namespace moecomm

struct moecommComm {
  int rank = 0;
  int nranks = 1;
  int device = -1;  // -1 on the host backend
  moecommBackend_t backend = moecommBackendHost;
  int timeoutMs = 0;
  std::unique_ptr<moecomm::Bootstrap> bootstrap;
  std::atomic<bool> aborted{false};
  std::atomic<int> asyncError{moecommSuccess};
  moecomm::Allocator allocator;
  // Hash of the host name and boot id of every rank: ranks with equal hashes share a host.
  std::vector<uint64_t> hostHashes;
  // A name unique to this communicator across the machine, used in shared-memory names.
  std::string tag;
  // Collective objects created on this comm (EPs, symmetric memory) take a sequence number
  // so every rank derives the same names without extra communication.
  uint64_t collectiveSequence = 0;
  std::string topologyJson;
  std::unique_ptr<moecomm::MemoryRegistry> memory;
  std::mutex mutex;  // guards the lists below
  std::vector<struct moecommEp*> eps;

  // Records the first asynchronous error; later ones are dropped.
  void raiseAsyncError(moecommResult_t code) {
    int expected = moecommSuccess;
    asyncError.compare_exchange_strong(expected, code);
  }
  bool allOnOneHost() const;
};

namespace moecomm {
LiveSet<moecommComm>& liveComms();
}
