// Symmetric GPU memory over NVLink (or PCIe peer-to-peer): every rank allocates one buffer of
// the same size on its device and maps every peer's, so a kernel on rank r's device can load
// from and store to peer(p) directly. Three ways to share, chosen collectively
// (docs/nvlink-memory.md):
//   inprocess  ranks are threads of one process: cudaMalloc + peer access, raw pointers;
//   cumem      cuMem VMM allocations exported as POSIX file descriptors, passed over
//              abstract unix sockets, imported and mapped by every peer (the default
//              across processes);
//   ipc        legacy CUDA IPC (cudaIpcGetMemHandle / cudaIpcOpenMemHandle).
// MOECOMM_NVLINK_SHARE forces one. Every rank must share one host and every pair of GPUs
// must have peer access, else NotSupported with a sentence naming the pair.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/comm.h"
#include "moecomm.h"
#include "transport/symmetric.h"

namespace moecomm {

enum class NvlinkMethod : int { kAuto = -1, kInProcess = 0, kCuMem = 1, kIpc = 2 };

// "auto", "inprocess", "cumem", "ipc".
const char* nvlinkMethodName(NvlinkMethod method);
// Parses a MOECOMM_NVLINK_SHARE value (case-insensitive; empty = auto). InvalidArgument
// with a sentence for anything else.
moecommResult_t parseNvlinkShare(const std::string& text, NvlinkMethod* out);

// What one rank reports for the collective choice of method.
struct NvlinkRankCaps {
  uint64_t processId = 0;                        // equal exactly for ranks that are threads of one process
  uint64_t netNamespace = 0;                     // identity of the network namespace; 0 = unknown
  bool cuMem = false;                            // cuMem VMM with POSIX-fd handles usable on this rank's GPU
  std::string cuMemWhy;                          // why not, when cuMem is false
  NvlinkMethod requested = NvlinkMethod::kAuto;  // this rank's MOECOMM_NVLINK_SHARE
};

// The method every rank uses, computed from every rank's caps (rank r at index r), so each
// rank reaches the same answer without more communication. auto: inprocess when all ranks
// share a process, else cumem when every rank supports it and all share a network
// namespace, else ipc. A forced method that cannot work is NotSupported naming the rank
// that prevents it; ranks asking for different methods is InvalidUsage.
moecommResult_t chooseNvlinkMethod(const std::vector<NvlinkRankCaps>& ranks, NvlinkMethod* out);

// Whether the cumem method can work on this CUDA device ordinal (driver entry points,
// VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED); *why
// says why not. Leaves the thread's last-error text untouched.
bool nvlinkCuMemSupported(int device, std::string* why);

class NvlinkRegion;  // one owned device mapping (defined in nvlink_cuda.cc)

class NvlinkSymmetric : public SymmetricMemory {
 public:
  // Collective over comm (every rank, same bytes, same order as other collectives). comm must
  // use the CUDA backend. The buffers are zero-filled and at least 256-byte aligned. A
  // failure on any rank fails every rank promptly (the failing rank's own code; peers get
  // RemoteError, or the same code for NotSupported / InvalidUsage / InvalidArgument), and
  // nothing stays allocated or mapped.
  static moecommResult_t create(moecommComm* comm, size_t bytes, std::unique_ptr<NvlinkSymmetric>* out);
  // Unmaps the peers' buffers, then frees the local one. See SymmetricMemory::detachPeers
  // for the order ranks must follow when freeing together.
  ~NvlinkSymmetric() override;

  // Device pointers, valid in kernels running on device().
  void* local() const override { return pointers_[rank_]; }
  void* peer(int rank) const override { return pointers_[rank]; }
  int nranks() const override { return static_cast<int>(pointers_.size()); }
  size_t bytes() const override { return bytes_; }
  const char* method() const override { return nvlinkMethodName(method_); }
  bool isDevice() const override { return true; }
  void* const* devicePeerTable() const override { return detached_ ? nullptr : peerTable_; }
  // Synchronises device() (so no kernel of ours still touches a peer), then unmaps or
  // closes every peer buffer. Idempotent.
  moecommResult_t detachPeers() override;

  int device() const { return device_; }
  NvlinkMethod methodId() const { return method_; }
  // Bytes actually allocated per rank (bytes() rounded up to the mapping granularity).
  size_t allocatedBytes() const { return allocated_; }

 private:
  NvlinkSymmetric();
  friend struct NvlinkBuilder;

  int rank_ = 0;
  int device_ = -1;
  size_t bytes_ = 0;
  size_t allocated_ = 0;
  NvlinkMethod method_ = NvlinkMethod::kAuto;
  bool detached_ = false;
  void** peerTable_ = nullptr;                        // device copy of pointers_ (see devicePeerTable), or nullptr
  std::vector<void*> pointers_;                       // [nranks], as this rank addresses them
  std::unique_ptr<NvlinkRegion> local_;               // owns this rank's allocation
  std::vector<std::unique_ptr<NvlinkRegion>> peers_;  // owns imported mappings (null for direct pointers)
};

}  // namespace moecomm
