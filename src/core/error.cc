#include "core/error.h"

#include <cstdarg>
#include <cstdio>
#include <string>

#include "core/log.h"

namespace moecomm {
namespace {
thread_local std::string t_last_error;
}

moecommResult_t setError(moecommResult_t code, const char* fmt, ...) {
  char text[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  t_last_error = text;
  MC_INFO(kLogAll, "error (%s): %s", resultName(code), text);
  return code;
}

void addErrorContext(const char* context) {
  if (t_last_error.empty()) return;
  t_last_error = std::string(context) + ": " + t_last_error;
}

void clearError() { t_last_error.clear(); }

const char* lastErrorText() { return t_last_error.c_str(); }

const char* resultName(moecommResult_t code) {
  switch (code) {
    case moecommSuccess:
      return "success";
    case moecommUnhandledCudaError:
      return "unhandled CUDA error";
    case moecommSystemError:
      return "system error";
    case moecommInternalError:
      return "internal error";
    case moecommInvalidArgument:
      return "invalid argument";
    case moecommInvalidUsage:
      return "invalid usage";
    case moecommRemoteError:
      return "remote error";
    case moecommInProgress:
      return "in progress";
    case moecommTimeout:
      return "timeout";
    case moecommNotSupported:
      return "not supported";
    default:
      return "unknown result code";
  }
}

void logBreadcrumb(const char* file, int line, const char* call, moecommResult_t result) {
  MC_TRACE(kLogAll, "%s:%d %s -> %s", file, line, call, resultName(result));
}

}  // namespace moecomm
