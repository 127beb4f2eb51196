// Communicator creation and teardown shared by the three init entry points.
#pragma once

#include <memory>

#include "core/comm.h"

namespace moecomm {

// The config struct merged with the environment (see env.h for the precedence).
struct ResolvedConfig {
  moecommBackend_t backend = moecommBackendAuto;  // as requested; resolved in commCreate
  int device = -1;
  int timeoutMs = 0;
  Allocator allocator;
};

moecommResult_t resolveConfig(const moecommConfig_t* config, ResolvedConfig* out);

// Collective over `bootstrap`: agrees on backend, host layout and tag, builds the topology.
moecommResult_t commCreate(std::unique_ptr<Bootstrap> bootstrap, const ResolvedConfig& config, moecommComm** out);

// Frees everything the comm owns. Synchronises with the peers first unless it was aborted.
moecommResult_t commDestroy(moecommComm* comm);

void commAbort(moecommComm* comm);

}  // namespace moecomm
