// External bootstrap: collectives go through the caller's callbacks (MPI, torch.distributed,
// an NCCL communicator...). Point-to-point is not part of that contract.
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "core/bootstrap.h"
#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

class ExternalBootstrap final : public Bootstrap {
 public:
  ExternalBootstrap(const moecommExternalBootstrap_t& callbacks, int rank, int nranks)
      : Bootstrap(rank, nranks), callbacks_(callbacks) {}

  moecommResult_t allgather(const void* send, void* recv, size_t bytes) override {
    MC_CHECK(usable("allgather"));
    MC_REQUIRE(bytes == 0 || (send != nullptr && recv != nullptr), moecommInvalidArgument,
               "rank %d: allgather of %zu bytes with a NULL buffer", rank(), bytes);
    // Callers' allgathers (MPI_Allgather, for one) may not accept a send buffer inside the
    // receive buffer, which our contract allows: hand them a separate copy.
    const char* in = static_cast<const char*>(send);
    const char* out = static_cast<const char*>(recv);
    std::vector<char> copy;
    if (bytes > 0 && in < out + bytes * nranks() && out < in + bytes) {
      copy.assign(in, in + bytes);
      in = copy.data();
    }
    const int rc = callbacks_.allgather(callbacks_.ctx, in, recv, bytes);
    MC_REQUIRE(rc == 0, moecommRemoteError, "rank %d: the external allgather callback returned %d (%zu bytes per rank)",
               rank(), rc, bytes);
    return moecommSuccess;
  }

  moecommResult_t barrier() override {
    MC_CHECK(usable("barrier"));
    const int rc = callbacks_.barrier(callbacks_.ctx);
    MC_REQUIRE(rc == 0, moecommRemoteError, "rank %d: the external barrier callback returned %d", rank(), rc);
    return moecommSuccess;
  }

  moecommResult_t send(int /*peer*/, int /*tag*/, const void* /*data*/, size_t /*bytes*/) override {
    MC_CHECK(usable("send"));
    return setError(moecommNotSupported,
                    "rank %d: point-to-point send is not available on a communicator created with "
                    "moecommCommInitExternal (its callbacks offer only allgather and barrier)",
                    rank());
  }

  moecommResult_t recv(int /*peer*/, int /*tag*/, void* /*data*/, size_t /*bytes*/) override {
    MC_CHECK(usable("recv"));
    return setError(moecommNotSupported,
                    "rank %d: point-to-point recv is not available on a communicator created with "
                    "moecommCommInitExternal (its callbacks offer only allgather and barrier)",
                    rank());
  }

  // The callbacks cannot be interrupted; the flag stops every call after them.
  void abort() override { aborted_.store(true, std::memory_order_release); }

 private:
  moecommResult_t usable(const char* op) const {
    MC_REQUIRE(!aborted_.load(std::memory_order_acquire), moecommInvalidUsage,
               "rank %d: the bootstrap was aborted; %s is not possible any more", rank(), op);
    return moecommSuccess;
  }

  const moecommExternalBootstrap_t callbacks_;
  std::atomic<bool> aborted_{false};
};

}  // namespace

moecommResult_t bootstrapCreateExternal(const moecommExternalBootstrap_t& callbacks, int rank, int nranks,
                                        std::unique_ptr<Bootstrap>* out) {
  MC_REQUIRE(out != nullptr, moecommInvalidArgument, "bootstrap output pointer is NULL");
  MC_REQUIRE(callbacks.allgather != nullptr, moecommInvalidArgument,
             "the external bootstrap has no allgather callback (allgather is required)");
  MC_REQUIRE(callbacks.barrier != nullptr, moecommInvalidArgument,
             "the external bootstrap has no barrier callback (barrier is required)");
  MC_REQUIRE(nranks >= 1, moecommInvalidArgument, "nranks is %d; it must be at least 1", nranks);
  MC_REQUIRE(rank >= 0 && rank < nranks, moecommInvalidArgument, "rank %d is outside 0..%d", rank, nranks - 1);
  *out = std::make_unique<ExternalBootstrap>(callbacks, rank, nranks);
  MC_TRACE(kLogBootstrap, "external bootstrap: rank %d of %d", rank, nranks);
  return moecommSuccess;
}

}  // namespace moecomm
