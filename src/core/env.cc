#include "core/env.h"

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/log.h"

namespace moecomm {
namespace {

// The parsed MOECOMM_CONFIG_FILE, cached by path so repeated lookups do not re-read it.
struct ConfigFileCache {
  std::mutex mutex;
  std::string path;
  std::map<std::string, std::string> values;
};

ConfigFileCache& configCache() {
  static ConfigFileCache* cache = new ConfigFileCache();  // never destroyed: safe at exit
  return *cache;
}

// Parses the file into name -> text. Problems are returned as sentences rather than logged
// here, because logging reads this very configuration (and its lock) to set itself up.
std::map<std::string, std::string> parseConfigFile(const std::string& path, std::vector<std::string>* problems) {
  std::map<std::string, std::string> values;
  std::ifstream in(path);
  if (!in) {
    problems->push_back("MOECOMM_CONFIG_FILE " + path + " cannot be opened; ignoring it");
    return values;
  }
  nlohmann::json doc = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) {
    problems->push_back("MOECOMM_CONFIG_FILE " + path + " is not a JSON object; ignoring it");
    return values;
  }
  for (auto& item : doc.items()) {
    const nlohmann::json& v = item.value();
    if (v.is_string()) {
      values[item.key()] = v.get<std::string>();
    } else if (v.is_number_integer()) {
      values[item.key()] = std::to_string(v.get<long long>());
    } else if (v.is_boolean()) {
      values[item.key()] = v.get<bool>() ? "1" : "0";
    } else {
      problems->push_back("MOECOMM_CONFIG_FILE " + path + ": key " + item.key() +
                          " has an unsupported type; ignoring it");
    }
  }
  return values;
}

bool configFileValue(const char* name, std::string* out) {
  const char* path = std::getenv("MOECOMM_CONFIG_FILE");
  if (path == nullptr || *path == '\0') return false;
  ConfigFileCache& cache = configCache();
  std::vector<std::string> problems;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.path != path) {
      cache.values = parseConfigFile(path, &problems);
      cache.path = path;
    }
    auto it = cache.values.find(name);
    if (it != cache.values.end()) {
      *out = it->second;
      found = true;
    }
  }
  for (const std::string& problem : problems) MC_WARN(kLogEnv, "%s", problem.c_str());
  return found;
}

}  // namespace

const std::vector<EnvParam>& envTable() {
  static const std::vector<EnvParam> table = {
#define MC_ENV_ROW(id, name, type, def, doc) {Env::id, name, EnvType::type, def, doc},
      MOECOMM_ENV_TABLE(MC_ENV_ROW)
#undef MC_ENV_ROW
  };
  return table;
}

const EnvParam& envParam(Env id) { return envTable()[static_cast<size_t>(id)]; }

EnvValue envLookup(Env id) {
  const EnvParam& param = envParam(id);
  if (const char* value = std::getenv(param.name)) return {value, "environment"};
  std::string fromFile;
  // MOECOMM_CONFIG_FILE itself can only come from the environment.
  if (id != Env::ConfigFile && configFileValue(param.name, &fromFile)) return {fromFile, "config file"};
  return {param.defaultValue, "default"};
}

std::string envString(Env id) { return envLookup(id).text; }

int64_t envInt(Env id) {
  EnvValue value = envLookup(id);
  const char* text = value.text.c_str();
  char* end = nullptr;
  errno = 0;
  long long parsed = std::strtoll(text, &end, 0);
  if (errno != 0 || end == text || *end != '\0') {
    const EnvParam& param = envParam(id);
    MC_WARN(kLogEnv, "%s=%s (from the %s) is not an integer; using the default %s", param.name, text, value.source,
            param.defaultValue);
    return std::strtoll(param.defaultValue, nullptr, 0);
  }
  return parsed;
}

std::string envMarkdown() {
  std::ostringstream out;
  out << "# Environment variables\n\n"
      << "Generated from `src/core/env_table.h` by `moecomm-info --env-markdown`; do not edit by hand.\n\n"
      << "Precedence, highest first: a field set explicitly in a config struct passed to the API; the\n"
      << "environment variable; the JSON file named by `MOECOMM_CONFIG_FILE` (an object whose keys are\n"
      << "the variable names, values strings or integers); the default below.\n\n"
      << "| Variable | Type | Default | Meaning |\n"
      << "| --- | --- | --- | --- |\n";
  for (const EnvParam& param : envTable()) {
    out << "| `" << param.name << "` | " << (param.type == EnvType::Int ? "integer" : "string") << " | ";
    if (*param.defaultValue) {
      out << '`' << param.defaultValue << '`';
    } else {
      out << "(empty)";
    }
    out << " | " << param.doc << " |\n";
  }
  return out.str();
}

}  // namespace moecomm
