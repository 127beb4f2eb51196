// moecomm-info: version, build options, every MOECOMM_* variable with its doc and value,
// and the topology as found.
//   moecomm-info                 everything
//   moecomm-info --brief         version and build options only
//   moecomm-info --env-markdown  docs/env.md, generated from the env table
#include <cstdio>
#include <cstring>
#include <string>

#include "core/env.h"
#include "moecomm.h"

namespace {

void printBuild() {
  int version = 0;
  moecommGetVersion(&version);
  std::printf("libmoecomm %d.%d.%d (header %d)\n", version / 10000, version / 100 % 100, version % 100,
              MOECOMM_VERSION_CODE);
  std::printf("build: CUDA kernels %s, ibverbs headers %s\n", MOECOMM_HAVE_CUDA ? "yes (sm_90a)" : "no",
#ifdef MOECOMM_HAVE_IBVERBS_HEADERS
              "yes"
#else
              "no"
#endif
  );
}

void printEnv() {
  std::printf("\nEnvironment variables (value, source):\n");
  for (const moecomm::EnvParam& param : moecomm::envTable()) {
    moecomm::EnvValue value = moecomm::envLookup(param.id);
    std::printf("  %-28s = %-12s (%s)\n      %s\n", param.name, value.text.empty() ? "\"\"" : value.text.c_str(),
                value.source, param.doc);
  }
}

int printTopology() {
  moecommComm_t comm = nullptr;
  moecommResult_t result = moecommCommInitAll(&comm, 1, nullptr);
  if (result != moecommSuccess) {
    std::printf("\ntopology: unavailable (%s: %s)\n", moecommGetErrorString(result), moecommGetLastError(nullptr));
    return 1;
  }
  const char* json = nullptr;
  moecommCommGetTopology(comm, &json);
  std::printf("\nTopology:\n%s\n", json && *json ? json : "(none recorded)");
  moecommCommDestroy(comm);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--env-markdown") == 0) {
    std::fputs(moecomm::envMarkdown().c_str(), stdout);
    return 0;
  }
  if (argc == 2 && std::strcmp(argv[1], "--brief") == 0) {
    printBuild();
    return 0;
  }
  if (argc != 1) {
    std::fprintf(stderr, "usage: moecomm-info [--brief | --env-markdown]\n");
    return 2;
  }
  printBuild();
  printEnv();
  return printTopology();
}
