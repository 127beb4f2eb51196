// Access to the configuration table (env_table.h). Precedence, highest first:
//   1. a field set explicitly in a config struct passed to the API,
//   2. the environment variable,
//   3. the JSON file named by MOECOMM_CONFIG_FILE,
//   4. the built-in default.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/env_table.h"

namespace moecomm {

enum class EnvType { Int, String };

enum class Env : int {
#define MC_ENV_ENUM(id, name, type, def, doc) id,
  MOECOMM_ENV_TABLE(MC_ENV_ENUM)
#undef MC_ENV_ENUM
      kCount
};

struct EnvParam {
  Env id;
  const char* name;
  EnvType type;
  const char* defaultValue;
  const char* doc;
};

const std::vector<EnvParam>& envTable();
const EnvParam& envParam(Env id);

// Where a value came from: "environment", "config file" or "default".
struct EnvValue {
  std::string text;
  const char* source;
};
EnvValue envLookup(Env id);

std::string envString(Env id);
// Integers that do not parse fall back to the default, with a warning.
int64_t envInt(Env id);

// docs/env.md, as generated from the table.
std::string envMarkdown();

}  // namespace moecomm
