// Logging: MOECOMM_DEBUG (NONE, WARN, INFO, TRACE), MOECOMM_DEBUG_SUBSYS (comma list, ALL,
// a leading ^ inverts), MOECOMM_DEBUG_FILE (%h = host name, %p = pid). Silent by default.
#pragma once

#include <cstdint>

namespace moecomm {

enum class LogLevel : int { kNone = 0, kWarn = 1, kInfo = 2, kTrace = 3 };

enum LogSubsys : uint32_t {
  kLogInit = 1u << 0,
  kLogBootstrap = 1u << 1,
  kLogTopo = 1u << 2,
  kLogEp = 1u << 3,
  kLogMem = 1u << 4,
  kLogTransport = 1u << 5,
  kLogEnv = 1u << 6,
  kLogAll = 0xffffffffu,
};

bool logEnabled(LogLevel level, uint32_t subsys);
void logMessage(LogLevel level, uint32_t subsys, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 5, 6)));
// Re-reads the MOECOMM_DEBUG* variables (tests change them at run time).
void logReconfigure();

}  // namespace moecomm

#define MC_LOG_AT(level, subsys, ...)                                                                                \
  do {                                                                                                               \
    if (::moecomm::logEnabled(level, subsys)) ::moecomm::logMessage(level, subsys, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#define MC_WARN(subsys, ...) MC_LOG_AT(::moecomm::LogLevel::kWarn, subsys, __VA_ARGS__)
#define MC_INFO(subsys, ...) MC_LOG_AT(::moecomm::LogLevel::kInfo, subsys, __VA_ARGS__)
#define MC_TRACE(subsys, ...) MC_LOG_AT(::moecomm::LogLevel::kTrace, subsys, __VA_ARGS__)
