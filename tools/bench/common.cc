#include "common.h"

#include <cstdio>

namespace moecomm_bench {
namespace {
int g_rank = 0;
std::string g_step = "startup";
}  // namespace

void SetRankForMessages(int rank) { g_rank = rank; }
int RankForMessages() { return g_rank; }
void SetStep(const std::string& step) { g_step = step; }
const std::string& CurrentStep() { return g_step; }

void Fail(const std::string& what, const std::string& why, const char* file, int line) {
  char where[64];
  std::snprintf(where, sizeof(where), "%d", line);
  const std::string message = "[rank " + std::to_string(g_rank) + "] step '" + g_step + "': " + what +
                              " failed: " + why + " (" + file + ":" + where + ")";
  // Printed now: unwinding runs destructors that may wait on peers that are already gone.
  std::fprintf(stderr, "moecomm-bench: %s\n", message.c_str());
  std::fflush(stderr);
  throw BenchError(message);
}

}  // namespace moecomm_bench
