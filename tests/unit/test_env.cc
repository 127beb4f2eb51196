#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "core/env.h"

namespace moecomm {
namespace {

TEST(Env, TableNamesAreUniqueAndPrefixed) {
  const auto& table = envTable();
  ASSERT_EQ(table.size(), static_cast<size_t>(Env::kCount));
  for (size_t i = 0; i < table.size(); ++i) {
    EXPECT_EQ(static_cast<size_t>(table[i].id), i);
    EXPECT_EQ(std::string(table[i].name).rfind("MOECOMM_", 0), 0u) << table[i].name;
    EXPECT_GT(std::string(table[i].doc).size(), 10u) << table[i].name;
    for (size_t j = i + 1; j < table.size(); ++j) EXPECT_STRNE(table[i].name, table[j].name);
  }
}

TEST(Env, DefaultWhenUnset) {
  unsetenv("MOECOMM_EP_NUM_SMS");
  unsetenv("MOECOMM_CONFIG_FILE");
  EXPECT_EQ(envInt(Env::EpNumSms), 24);
  EXPECT_STREQ(envLookup(Env::EpNumSms).source, "default");
}

TEST(Env, EnvironmentOverridesDefault) {
  setenv("MOECOMM_EP_NUM_SMS", "12", 1);
  EXPECT_EQ(envInt(Env::EpNumSms), 12);
  EXPECT_STREQ(envLookup(Env::EpNumSms).source, "environment");
  unsetenv("MOECOMM_EP_NUM_SMS");
}

TEST(Env, MalformedIntegerFallsBackToDefault) {
  setenv("MOECOMM_EP_NUM_SMS", "twelve", 1);
  EXPECT_EQ(envInt(Env::EpNumSms), 24);
  unsetenv("MOECOMM_EP_NUM_SMS");
}

TEST(Env, ConfigFileBelowEnvironment) {
  std::string path = ::testing::TempDir() + "moecomm_env_test.json";
  {
    std::ofstream out(path);
    out << R"({"MOECOMM_EP_NUM_SMS": 16, "MOECOMM_BACKEND": "host"})";
  }
  setenv("MOECOMM_CONFIG_FILE", path.c_str(), 1);
  unsetenv("MOECOMM_EP_NUM_SMS");
  unsetenv("MOECOMM_BACKEND");
  EXPECT_EQ(envInt(Env::EpNumSms), 16);
  EXPECT_STREQ(envLookup(Env::EpNumSms).source, "config file");
  EXPECT_EQ(envString(Env::Backend), "host");
  setenv("MOECOMM_EP_NUM_SMS", "20", 1);
  EXPECT_EQ(envInt(Env::EpNumSms), 20);
  unsetenv("MOECOMM_EP_NUM_SMS");
  unsetenv("MOECOMM_CONFIG_FILE");
}

TEST(Env, MalformedConfigFileIsIgnored) {
  std::string path = ::testing::TempDir() + "moecomm_env_bad.json";
  {
    std::ofstream out(path);
    out << "{ not json";
  }
  setenv("MOECOMM_CONFIG_FILE", path.c_str(), 1);
  unsetenv("MOECOMM_EP_NUM_SMS");
  EXPECT_EQ(envInt(Env::EpNumSms), 24);
  unsetenv("MOECOMM_CONFIG_FILE");
}

// docs/env.md must be exactly what the table generates.
TEST(Env, DocsMatchTable) {
  std::ifstream in(std::string(MOECOMM_TEST_SOURCE_DIR) + "/docs/env.md");
  ASSERT_TRUE(in.good()) << "docs/env.md is missing; run `make docs`";
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), envMarkdown()) << "docs/env.md is stale; run `make docs`";
}

}  // namespace
}  // namespace moecomm
