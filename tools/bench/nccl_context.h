// The NCCL communicator of the bench (baseline, roofline turn-taking, sample alignment).
//
// The ncclUniqueId travels through a file: libmoecomm's public API has no broadcast, and the
// bench's intranode runs have every rank on one host. Rank 0 writes the id to
// /tmp/moecomm-bench-nccl-<hash of MOECOMM_UNIQUE_ID>.id (written to a temporary name, then
// renamed, so a reader never sees half of it); the others poll for it, bounded.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>

namespace moecomm_bench {

class NcclContext {
 public:
  static std::unique_ptr<NcclContext> Create(int rank, int nranks, cudaStream_t stream);
  ~NcclContext();
  ncclComm_t comm() const { return comm_; }
  // Stream-ordered: every rank's stream waits for the others (a one-integer allreduce).
  void StreamBarrier();
  // StreamBarrier plus a host wait for it.
  void HostBarrier();
  // Minimum of value over the ranks (host, blocking).
  double AllMin(double value);

 private:
  NcclContext() = default;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int* scratch_ = nullptr;  // device: the barrier's integer and AllMin's double
};

}  // namespace moecomm_bench
