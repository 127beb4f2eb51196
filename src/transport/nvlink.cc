// The CUDA-independent half of the NVLink transport: method names, the override's parsing
// and the collective choice of method (pure, so it is unit-tested without a GPU).
#include "transport/nvlink.h"

#include <strings.h>

#include "core/error.h"

namespace moecomm {

const char* nvlinkMethodName(NvlinkMethod method) {
  switch (method) {
    case NvlinkMethod::kAuto:
      return "auto";
    case NvlinkMethod::kInProcess:
      return "inprocess";
    case NvlinkMethod::kCuMem:
      return "cumem";
    case NvlinkMethod::kIpc:
      return "ipc";
  }
  return "unknown";
}

moecommResult_t parseNvlinkShare(const std::string& text, NvlinkMethod* out) {
  const NvlinkMethod all[] = {NvlinkMethod::kAuto, NvlinkMethod::kInProcess, NvlinkMethod::kCuMem, NvlinkMethod::kIpc};
  if (text.empty()) {
    *out = NvlinkMethod::kAuto;
    return moecommSuccess;
  }
  for (NvlinkMethod method : all) {
    if (strcasecmp(text.c_str(), nvlinkMethodName(method)) == 0) {
      *out = method;
      return moecommSuccess;
    }
  }
  return setError(moecommInvalidArgument, "MOECOMM_NVLINK_SHARE=%s is not one of auto, inprocess, cumem, ipc",
                  text.c_str());
}

moecommResult_t chooseNvlinkMethod(const std::vector<NvlinkRankCaps>& ranks, NvlinkMethod* out) {
  MC_REQUIRE(!ranks.empty(), moecommInternalError, "chooseNvlinkMethod called with no ranks");
  const int nranks = static_cast<int>(ranks.size());
  const NvlinkMethod requested = ranks[0].requested;
  for (int r = 1; r < nranks; ++r) {
    MC_REQUIRE(ranks[r].requested == requested, moecommInvalidUsage,
               "MOECOMM_NVLINK_SHARE differs between ranks: rank 0 asks for %s but rank %d for %s; set it alike on "
               "every rank",
               nvlinkMethodName(requested), r, nvlinkMethodName(ranks[r].requested));
  }
  int otherProcess = -1;    // first rank not in rank 0's process
  int withoutCuMem = -1;    // first rank whose GPU cannot do cumem
  int otherNamespace = -1;  // first rank whose network namespace differs from rank 0's or is unknown
  for (int r = 0; r < nranks; ++r) {
    if (otherProcess < 0 && ranks[r].processId != ranks[0].processId) otherProcess = r;
    if (withoutCuMem < 0 && !ranks[r].cuMem) withoutCuMem = r;
    if (otherNamespace < 0 && (ranks[r].netNamespace == 0 || ranks[r].netNamespace != ranks[0].netNamespace)) {
      otherNamespace = r;
    }
  }
  const bool oneProcess = otherProcess < 0;
  switch (requested) {
    case NvlinkMethod::kAuto:
      if (oneProcess) {
        *out = NvlinkMethod::kInProcess;
      } else if (withoutCuMem < 0 && otherNamespace < 0) {
        *out = NvlinkMethod::kCuMem;
      } else {
        *out = NvlinkMethod::kIpc;
      }
      return moecommSuccess;
    case NvlinkMethod::kInProcess:
      MC_REQUIRE(oneProcess, moecommNotSupported,
                 "MOECOMM_NVLINK_SHARE=inprocess needs every rank to be a thread of one process, but rank %d runs in "
                 "another process than rank 0; use auto, cumem or ipc",
                 otherProcess);
      break;
    case NvlinkMethod::kCuMem:
      MC_REQUIRE(withoutCuMem < 0, moecommNotSupported,
                 "MOECOMM_NVLINK_SHARE=cumem but rank %d cannot use cuMem POSIX file descriptor handles (%s); use "
                 "auto or ipc",
                 withoutCuMem, withoutCuMem >= 0 ? ranks[withoutCuMem].cuMemWhy.c_str() : "");
      MC_REQUIRE(otherNamespace < 0, moecommNotSupported,
                 "MOECOMM_NVLINK_SHARE=cumem but rank %d is in another network namespace than rank 0 (or its namespace "
                 "is unknown), so file descriptors cannot be passed over abstract unix sockets; use auto or ipc",
                 otherNamespace);
      break;
    case NvlinkMethod::kIpc:
      MC_REQUIRE(!oneProcess || nranks == 1, moecommNotSupported,
                 "MOECOMM_NVLINK_SHARE=ipc but every rank is a thread of one process, and legacy CUDA IPC handles "
                 "cannot be opened in the process that made them; use auto, inprocess or cumem");
      break;
  }
  *out = requested;
  return moecommSuccess;
}

}  // namespace moecomm
