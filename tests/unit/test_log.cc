// MOECOMM_DEBUG, MOECOMM_DEBUG_SUBSYS and MOECOMM_DEBUG_FILE.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

class LogToFile : public ::testing::Test {
 protected:
  void SetUp() override {
    pattern_ = ::testing::TempDir() + "moecomm_log_%p.txt";
    path_ = ::testing::TempDir() + "moecomm_log_" + std::to_string(getpid()) + ".txt";
    std::remove(path_.c_str());
    setenv("MOECOMM_DEBUG_FILE", pattern_.c_str(), 1);
  }
  void TearDown() override {
    unsetenv("MOECOMM_DEBUG");
    unsetenv("MOECOMM_DEBUG_SUBSYS");
    unsetenv("MOECOMM_DEBUG_FILE");
    logReconfigure();
    std::remove(path_.c_str());
  }
  std::string pattern_;
  std::string path_;
};

TEST_F(LogToFile, SilentByDefault) {
  unsetenv("MOECOMM_DEBUG");
  logReconfigure();
  EXPECT_FALSE(logEnabled(LogLevel::kWarn, kLogEp));
  MC_WARN(kLogEp, "must not appear");
  EXPECT_EQ(readFile(path_), "");
}

TEST_F(LogToFile, LevelsAndPidExpansion) {
  setenv("MOECOMM_DEBUG", "INFO", 1);
  logReconfigure();
  EXPECT_TRUE(logEnabled(LogLevel::kInfo, kLogEp));
  EXPECT_FALSE(logEnabled(LogLevel::kTrace, kLogEp));
  MC_INFO(kLogEp, "hello %d", 42);
  MC_TRACE(kLogEp, "too detailed");
  logReconfigure();  // closes the file so everything is flushed
  std::string text = readFile(path_);
  EXPECT_NE(text.find("MOECOMM INFO"), std::string::npos) << text;
  EXPECT_NE(text.find("hello 42"), std::string::npos) << text;
  EXPECT_EQ(text.find("too detailed"), std::string::npos) << text;
}

TEST_F(LogToFile, SubsystemFilter) {
  setenv("MOECOMM_DEBUG", "TRACE", 1);
  setenv("MOECOMM_DEBUG_SUBSYS", "BOOTSTRAP,TOPO", 1);
  logReconfigure();
  EXPECT_TRUE(logEnabled(LogLevel::kInfo, kLogTopo));
  EXPECT_FALSE(logEnabled(LogLevel::kInfo, kLogEp));
  setenv("MOECOMM_DEBUG_SUBSYS", "^EP", 1);
  logReconfigure();
  EXPECT_FALSE(logEnabled(LogLevel::kInfo, kLogEp));
  EXPECT_TRUE(logEnabled(LogLevel::kInfo, kLogMem));
}

TEST_F(LogToFile, ErrorsAreLoggedAtInfo) {
  setenv("MOECOMM_DEBUG", "INFO", 1);
  logReconfigure();
  EXPECT_EQ(setError(moecommInvalidArgument, "the widget is %s", "bent"), moecommInvalidArgument);
  EXPECT_STREQ(lastErrorText(), "the widget is bent");
  logReconfigure();
  EXPECT_NE(readFile(path_).find("the widget is bent"), std::string::npos);
}

}  // namespace
}  // namespace moecomm
