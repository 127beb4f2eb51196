// Symmetric memory: one buffer of the same size on every rank of a communicator, each rank's
// buffer reachable by every rank at peer(r). Implemented over POSIX shared memory for host
// ranks (host_shm.h) and over NVLink mappings for GPU ranks (nvlink.h); the memory registry
// and the EP engine see only this interface.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moecomm.h"

namespace moecomm {

class SymmetricMemory {
 public:
  SymmetricMemory() = default;
  virtual ~SymmetricMemory() = default;
  SymmetricMemory(const SymmetricMemory&) = delete;
  SymmetricMemory& operator=(const SymmetricMemory&) = delete;

  // This rank's buffer.
  virtual void* local() const = 0;
  // Rank r's buffer as this rank addresses it (r == own rank gives local()). nullptr after
  // detachPeers() for r != own rank.
  virtual void* peer(int rank) const = 0;
  // Ranks sharing the memory (peer() takes 0..nranks()-1).
  virtual int nranks() const = 0;
  // Usable bytes of every rank's buffer (what was requested; the mapping may be larger).
  virtual size_t bytes() const = 0;
  // A short static name of how the memory is shared ("posix-shm", "inprocess", "cumem", "ipc").
  virtual const char* method() const = 0;
  // True when the buffers are GPU memory (pointers for kernels, not for the host).
  virtual bool isDevice() const = 0;
  // GPU memory: a device array of nranks() pointers, peer(r) for every r, for kernels that
  // address every rank's buffer; nullptr where there is none (host memory, after
  // detachPeers(), or when making it failed).
  virtual void* const* devicePeerTable() const { return nullptr; }
  // Set by the memory registry: the allocation's ordinal among the communicator's
  // moecommMemAlloc calls, so the same number names the same collective allocation on every
  // rank (0: not from the registry).
  uint64_t id() const { return id_; }
  void setId(uint64_t id) { id_ = id; }
  // First half of a collective free: stops using and unmaps the peers' buffers (after the
  // local device is idle, for GPU memory), keeping the local one. Every rank must call it,
  // then pass a barrier, and only then destroy the object: a buffer must not be freed while a
  // peer still maps it (legacy CUDA IPC makes that undefined behaviour). Idempotent.
  virtual moecommResult_t detachPeers() { return moecommSuccess; }

 private:
  uint64_t id_ = 0;
};

}  // namespace moecomm
