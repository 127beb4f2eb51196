// Exported memory functions.
#include "api/guard.h"
#include "core/memory.h"
#include "transport/host_shm.h"

using moecomm::checkCommUsable;
using moecomm::guarded;

extern "C" {

MOECOMM_API moecommResult_t moecommMemAlloc(moecommComm_t comm, void** ptr, size_t bytes) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    MC_REQUIRE(ptr != nullptr, moecommInvalidArgument, "ptr (the output pointer) is NULL");
    *ptr = nullptr;
    MC_REQUIRE(bytes > 0, moecommInvalidArgument, "bytes is 0");
    MC_REQUIRE(comm->backend == moecommBackendHost, moecommNotSupported,
               "symmetric GPU memory is not available yet; this communicator uses the CUDA backend");
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
    std::unique_ptr<moecomm::ShmSymmetric> memory = comm->memory->takeSymmetric(ptr);
    MC_REQUIRE(memory != nullptr, moecommInvalidArgument, "%p was not returned by moecommMemAlloc on this comm", ptr);
    // Peers may still be reading our segment: unmap only after every rank got here.
    return comm->bootstrap->barrier();
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
