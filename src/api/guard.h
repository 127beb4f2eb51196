// The exception firewall and argument-struct checks shared by every exported function.
#pragma once

#include <exception>
#include <new>

#include "core/comm.h"
#include "core/error.h"
#include "moecomm.h"

namespace moecomm {

// Runs body() with the thread's last error cleared; turns any exception into a result code
// with a sentence, so nothing thrown ever crosses the C ABI.
template <class Body>
moecommResult_t guarded(const char* function, Body&& body) noexcept {
  clearError();
  try {
    moecommResult_t result = body();
    if (result != moecommSuccess) addErrorContext(function);
    return result;
  } catch (const std::bad_alloc&) {
    return setError(moecommSystemError, "%s: out of host memory", function);
  } catch (const std::exception& e) {
    return setError(moecommInternalError, "%s: unexpected exception: %s", function, e.what());
  } catch (...) {
    return setError(moecommInternalError, "%s: unexpected non-standard exception", function);
  }
}

// Checks the size/magic header of an argument struct.
template <class Struct>
moecommResult_t checkStructHeader(const Struct* s, unsigned magic, const char* name, const char* initMacro) {
  MC_REQUIRE(s != nullptr, moecommInvalidArgument, "%s is NULL", name);
  MC_REQUIRE(s->size == sizeof(Struct), moecommInvalidArgument,
             "%s->size is %zu but this library expects %zu; initialise it with %s", name, s->size, sizeof(Struct),
             initMacro);
  MC_REQUIRE(s->magic == magic, moecommInvalidArgument, "%s->magic is 0x%08x, expected 0x%08x; initialise it with %s",
             name, s->magic, magic, initMacro);
  return moecommSuccess;
}

// A communicator usable for a new operation: alive and not aborted.
inline moecommResult_t checkCommUsable(const moecommComm* comm) {
  MC_REQUIRE(comm != nullptr, moecommInvalidArgument, "comm is NULL");
  MC_REQUIRE(liveComms().contains(comm), moecommInvalidUsage,
             "comm %p is not a live communicator (destroyed, or never created)", static_cast<const void*>(comm));
  MC_REQUIRE(!comm->aborted.load(), moecommInvalidUsage, "comm was aborted; only moecommCommDestroy is allowed now");
  return moecommSuccess;
}

// A communicator that may be queried or destroyed: alive, aborted or not.
inline moecommResult_t checkCommAlive(const moecommComm* comm) {
  MC_REQUIRE(comm != nullptr, moecommInvalidArgument, "comm is NULL");
  MC_REQUIRE(liveComms().contains(comm), moecommInvalidUsage,
             "comm %p is not a live communicator (destroyed, or never created)", static_cast<const void*>(comm));
  return moecommSuccess;
}

}  // namespace moecomm
