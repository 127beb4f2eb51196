#include "core/comm.h"

namespace moecomm {
LiveSet<moecommComm>& liveComms() {
  static LiveSet<moecommComm>* set = new LiveSet<moecommComm>();  // never destroyed: safe at exit
  return *set;
}
}  // namespace moecomm

bool moecommComm::allOnOneHost() const {
  for (uint64_t hash : hostHashes) {
    if (hash != hostHashes[rank]) return false;
  }
  return true;
}
