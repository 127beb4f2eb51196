// Thread-local error text and the checked-call macros used everywhere inside the library.
#pragma once

#include <cerrno>
#include <cstring>

#include "moecomm.h"

namespace moecomm {

// Records `code` with a printf-style sentence as the calling thread's last error and
// returns `code`, so a failing check reads `return setError(...)`.
moecommResult_t setError(moecommResult_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Prefixes the current text with "context: " (used as an error travels up).
void addErrorContext(const char* context);
void clearError();
const char* lastErrorText();
const char* resultName(moecommResult_t code);

}  // namespace moecomm

// Propagates a failing result, leaving a breadcrumb in the TRACE log.
#define MC_CHECK(call)                                                       \
  do {                                                                       \
    moecommResult_t mc_check_result_ = (call);                               \
    if (mc_check_result_ != moecommSuccess) {                                \
      ::moecomm::logBreadcrumb(__FILE__, __LINE__, #call, mc_check_result_); \
      return mc_check_result_;                                               \
    }                                                                        \
  } while (0)

// Returns `code` with a sentence when `cond` is false.
#define MC_REQUIRE(cond, code, ...)                  \
  do {                                               \
    if (!(cond)) {                                   \
      return ::moecomm::setError(code, __VA_ARGS__); \
    }                                                \
  } while (0)

// For POSIX calls that return -1 and set errno.
#define MC_SYSCHECK(call, what)                                                                        \
  do {                                                                                                 \
    if ((call) == -1) {                                                                                \
      int mc_errno_ = errno;                                                                           \
      return ::moecomm::setError(moecommSystemError, "%s failed: %s", what, std::strerror(mc_errno_)); \
    }                                                                                                  \
  } while (0)

namespace moecomm {
void logBreadcrumb(const char* file, int line, const char* call, moecommResult_t result);
}
