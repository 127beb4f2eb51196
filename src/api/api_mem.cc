// Exported memory functions.
#include <string>

#include "api/guard.h"
#include "core/memory.h"
#include "transport/host_shm.h"
#include "transport/nvlink.h"

using moecomm::checkCommUsable;
using moecomm::guarded;

extern "C" {

MOECOMM_API moecommResult_t moecommMemAlloc(moecommComm_t comm, void** ptr, size_t bytes) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    MC_REQUIRE(ptr != nullptr, moecommInvalidArgument, "ptr (the output pointer) is NULL");
    *ptr = nullptr;
    MC_REQUIRE(bytes > 0, moecommInvalidArgument, "bytes is 0");
    if (comm->backend == moecommBackendCuda) {
      // GPU memory on every rank's device, mapped by every peer over NVLink.
      std::unique_ptr<moecomm::NvlinkSymmetric> memory;
      MC_CHECK(moecomm::NvlinkSymmetric::create(comm, bytes, &memory));
      *ptr = memory->local();
      comm->memory->addSymmetric(std::move(memory));
      return moecommSuccess;
    }
    MC_REQUIRE(comm->allOnOneHost(), moecommNotSupported,
               "host symmetric memory needs every rank on one machine, and this communicator spans several");
    std::unique_ptr<moecomm::ShmSymmetric> memory;
    const std::string name = comm->tag + "-mem" + std::to_string(comm->collectiveSequence++);
    MC_CHECK(moecomm::ShmSymmetric::create(*comm->bootstrap, name, bytes, &memory));
    *ptr = memory->local();
    comm->memory->addSymmetric(std::move(memory));
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommMemFree(moecommComm_t comm, void* ptr) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    MC_REQUIRE(ptr != nullptr, moecommInvalidArgument, "ptr is NULL");
    std::unique_ptr<moecomm::SymmetricMemory> memory = comm->memory->takeSymmetric(ptr);
    MC_REQUIRE(memory != nullptr, moecommInvalidArgument, "%p was not returned by moecommMemAlloc on this comm", ptr);
    // Every rank first lets go of the peers' buffers (GPU: after its device is idle), then all
    // meet, and only then is the local buffer freed (when `memory` goes out of scope): peers
    // may read it until they pass the barrier, and legacy CUDA IPC forbids freeing a buffer
    // that a peer still has open. The barrier is taken even when detaching failed, so the
    // ranks stay in step.
    const moecommResult_t detached = memory->detachPeers();
    const std::string detachError = detached == moecommSuccess ? "" : moecomm::lastErrorText();
    MC_CHECK(comm->bootstrap->barrier());
    if (detached != moecommSuccess) return moecomm::setError(detached, "%s", detachError.c_str());
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommMemRegister(moecommComm_t comm, void* ptr, size_t bytes) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    return comm->memory->registerRange(ptr, bytes);
  });
}

MOECOMM_API moecommResult_t moecommMemDeregister(moecommComm_t comm, void* ptr) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    MC_REQUIRE(ptr != nullptr, moecommInvalidArgument, "ptr is NULL");
    return comm->memory->deregisterRange(ptr);
  });
}

}  // extern "C"
