// Shared pieces of moecomm-bench: the error type, the current step (named in every failure
// message, so one device run diagnoses itself) and the checked-call macros.
#pragma once

#include <stdexcept>
#include <string>

#include "moecomm.h"

namespace moecomm_bench {

// Thrown on any failed call; main() prints it and exits non-zero (moecomm-run then stops the
// other ranks).
struct BenchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// This process's rank (for messages) and what the harness is doing now.
void SetRankForMessages(int rank);
int RankForMessages();
void SetStep(const std::string& step);
const std::string& CurrentStep();

// "[rank 2] step 'nccl baseline: dispatch exchange': cudaMemcpyAsync(...) failed: <why>".
[[noreturn]] void Fail(const std::string& what, const std::string& why, const char* file, int line);

}  // namespace moecomm_bench

#define BENCH_FAIL(what, why) ::moecomm_bench::Fail((what), (why), __FILE__, __LINE__)

// A libmoecomm call that must succeed.
#define BENCH_MOECOMM(call)                                                                                       \
  do {                                                                                                            \
    const moecommResult_t bench_result_ = (call);                                                                 \
    if (bench_result_ != moecommSuccess)                                                                          \
      BENCH_FAIL(#call, std::string(moecommGetErrorString(bench_result_)) + ": " + moecommGetLastError(nullptr)); \
  } while (0)
