// Exported version and error-text functions.
#include "api/guard.h"

extern "C" {

MOECOMM_API moecommResult_t moecommGetVersion(int* version) {
  return moecomm::guarded(__func__, [&] {
    MC_REQUIRE(version != nullptr, moecommInvalidArgument, "version is NULL");
    *version = MOECOMM_VERSION_CODE;
    return moecommSuccess;
  });
}

MOECOMM_API const char* moecommGetErrorString(moecommResult_t result) { return moecomm::resultName(result); }

MOECOMM_API const char* moecommGetLastError(struct moecommComm* comm) {
  (void)comm;  // the text is per thread; the comm is accepted for NCCL-like call sites
  return moecomm::lastErrorText();
}

}  // extern "C"
