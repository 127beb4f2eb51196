#include "core/log.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "core/env.h"

namespace moecomm {
namespace {

struct LogState {
  std::mutex mutex;
  std::atomic<bool> configured{false};
  std::atomic<int> level{0};
  std::atomic<uint32_t> subsys{kLogAll};
  FILE* file = nullptr;  // nullptr = stderr
};

LogState& state() {
  static LogState* s = new LogState();  // never destroyed: logging stays safe during exit
  return *s;
}

// Set while the configuration is being read, so that warnings raised by the env lookup
// itself do not recurse into logging.
thread_local bool t_configuring = false;

uint32_t parseSubsys(const std::string& text) {
  static const struct {
    const char* name;
    uint32_t bit;
  } kNames[] = {{"INIT", kLogInit}, {"BOOTSTRAP", kLogBootstrap}, {"TOPO", kLogTopo}, {"EP", kLogEp},
                {"MEM", kLogMem},   {"TRANSPORT", kLogTransport}, {"ENV", kLogEnv},   {"ALL", kLogAll}};
  bool invert = !text.empty() && text[0] == '^';
  uint32_t mask = 0;
  size_t pos = invert ? 1 : 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string word = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    for (const auto& entry : kNames) {
      if (strcasecmp(word.c_str(), entry.name) == 0) mask |= entry.bit;
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return invert ? ~mask : mask;
}

int parseLevel(const std::string& text) {
  if (strcasecmp(text.c_str(), "WARN") == 0) return static_cast<int>(LogLevel::kWarn);
  if (strcasecmp(text.c_str(), "INFO") == 0) return static_cast<int>(LogLevel::kInfo);
  if (strcasecmp(text.c_str(), "TRACE") == 0) return static_cast<int>(LogLevel::kTrace);
  return static_cast<int>(LogLevel::kNone);
}

std::string expandFileName(const std::string& pattern) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size()) {
      char c = pattern[i + 1];
      if (c == 'h') {
        char host[256] = {0};
        gethostname(host, sizeof(host) - 1);
        out += host;
        ++i;
        continue;
      }
      if (c == 'p') {
        out += std::to_string(getpid());
        ++i;
        continue;
      }
    }
    out += pattern[i];
  }
  return out;
}

void configure(LogState& s) {
  t_configuring = true;
  s.level = parseLevel(envString(Env::Debug));
  s.subsys = parseSubsys(envString(Env::DebugSubsys));
  std::string file = envString(Env::DebugFile);
  if (s.file != nullptr) {
    std::fclose(s.file);
    s.file = nullptr;
  }
  if (!file.empty() && s.level > 0) s.file = std::fopen(expandFileName(file).c_str(), "a");
  t_configuring = false;
  s.configured = true;
}

}  // namespace

void logReconfigure() {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  configure(s);
}

bool logEnabled(LogLevel level, uint32_t subsys) {
  if (t_configuring) return false;
  LogState& s = state();
  if (!s.configured) {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.configured) configure(s);
  }
  return static_cast<int>(level) <= s.level && (s.subsys & subsys) != 0;
}

void logMessage(LogLevel level, uint32_t subsys, const char* file, int line, const char* fmt, ...) {
  (void)subsys;
  static const char* kLevelNames[] = {"NONE", "WARN", "INFO", "TRACE"};
  char text[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  char host[64] = {0};
  gethostname(host, sizeof(host) - 1);
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  FILE* out = s.file ? s.file : stderr;
  std::fprintf(out, "%s:%d:%ld MOECOMM %s %s:%d %s\n", host, static_cast<int>(getpid()),
               static_cast<long>(syscall(SYS_gettid)), kLevelNames[static_cast<int>(level)], base, line, text);
  std::fflush(out);
}

}  // namespace moecomm
