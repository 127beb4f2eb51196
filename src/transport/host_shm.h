// Symmetric host memory over POSIX shared memory: every rank creates one segment of the same
// size and maps every peer's, so rank r's bytes are reachable at peer(r) in every process.
// Used by the host backend and by moecommMemAlloc on host communicators. Ranks must share a
// host (checked by the caller).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "core/bootstrap.h"
#include "moecomm.h"
#include "transport/symmetric.h"

namespace moecomm {

class ShmSymmetric : public SymmetricMemory {
 public:
  // Collective over `bootstrap`. `name` must be identical on every rank and unique on the
  // machine while the segment exists (the comm tag plus a sequence number). The segments
  // are unlinked as soon as every rank has mapped them, so nothing outlives the processes.
  static moecommResult_t create(Bootstrap& bootstrap, const std::string& name, size_t bytes,
                                std::unique_ptr<ShmSymmetric>* out);
  ~ShmSymmetric() override;

  void* local() const override { return mappings_[rank_]; }
  void* peer(int rank) const override { return mappings_[rank]; }
  int nranks() const override { return static_cast<int>(mappings_.size()); }
  size_t bytes() const override { return bytes_; }
  const char* method() const override { return "posix-shm"; }
  bool isDevice() const override { return false; }

 private:
  ShmSymmetric() = default;
  int rank_ = 0;
  size_t bytes_ = 0;
  std::vector<void*> mappings_;
};

}  // namespace moecomm
