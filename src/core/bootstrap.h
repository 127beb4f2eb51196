// Bootstrap: the out-of-band channel ranks use to find each other and exchange small
// control data (addresses, counts, memory handles). Three implementations:
//   - TCP (moecommGetUniqueId / CommInitRank): works across hosts,
//   - in-process (CommInitAll): ranks are threads of one process,
//   - external (CommInitExternal): the caller's allgather and barrier callbacks.
// Every wait is bounded by the timeout and returns Timeout or RemoteError; abort() makes
// every current and later wait return InvalidUsage promptly.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "moecomm.h"

namespace moecomm {

class Bootstrap {
 public:
  Bootstrap(int rank, int nranks) : rank_(rank), nranks_(nranks) {}
  virtual ~Bootstrap() = default;
  Bootstrap(const Bootstrap&) = delete;
  Bootstrap& operator=(const Bootstrap&) = delete;

  int rank() const { return rank_; }
  int nranks() const { return nranks_; }

  // Every rank contributes `bytes` bytes; recv holds nranks * bytes, rank i's at i * bytes.
  // send may alias recv + rank * bytes.
  virtual moecommResult_t allgather(const void* send, void* recv, size_t bytes) = 0;
  virtual moecommResult_t barrier() = 0;
  // Point to point, matched by (peer, tag) in order. NotSupported where the transport has none.
  virtual moecommResult_t send(int peer, int tag, const void* data, size_t bytes) = 0;
  virtual moecommResult_t recv(int peer, int tag, void* data, size_t bytes) = 0;
  // Thread-safe; idempotent.
  virtual void abort() = 0;

 private:
  int rank_;
  int nranks_;
};

// Starts the rendezvous root (a background thread that accepts the ranks, hands out the
// address table and exits) and writes its address and a random tag into *id.
moecommResult_t bootstrapCreateUniqueId(moecommUniqueId* id);

moecommResult_t bootstrapCreateTcp(const moecommUniqueId& id, int rank, int nranks, int timeoutMs,
                                   std::unique_ptr<Bootstrap>* out);

// n bootstraps sharing memory, one per thread-rank of this process.
moecommResult_t bootstrapCreateInProcess(int nranks, int timeoutMs, std::vector<std::unique_ptr<Bootstrap>>* out);

moecommResult_t bootstrapCreateExternal(const moecommExternalBootstrap_t& callbacks, int rank, int nranks,
                                        std::unique_ptr<Bootstrap>* out);

}  // namespace moecomm
