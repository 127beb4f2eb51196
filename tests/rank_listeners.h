// GoogleTest listeners shared by the test binaries that run as several ranks under
// moecomm-run (tests/mp, tests/gpu).
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <utility>

namespace moecomm_test {

// Prints only failures, prefixed by the rank: ranks other than 0 use it instead of gtest's
// usual output so that eight ranks do not print eight copies of every line.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::printf("[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                result.line_number(), result.message());
    std::fflush(stdout);
  }

 private:
  int rank_;
};

// Makes a failing rank exit at once, so that moecomm-run stops the other ranks instead of
// leaving them waiting in a collective. `detail` is added to the message (e.g. a replay seed).
class ExitOnRankFailure : public ::testing::EmptyTestEventListener {
 public:
  ExitOnRankFailure(int rank, std::string detail) : rank_(rank), detail_(std::move(detail)) {}
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (!info.result()->Failed()) return;
    std::printf("[rank %d] %s.%s FAILED%s; exiting so the other ranks stop too\n", rank_, info.test_suite_name(),
                info.name(), detail_.c_str());
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(1);
  }

 private:
  int rank_;
  std::string detail_;
};

}  // namespace moecomm_test
