// moecomm_mp_kill: a rank dies, the survivors must find out in bounded time.
//
//   moecomm_mp_kill <nranks> <create|dispatch|lowlatency>
//
// The highest rank _exit()s right after the communicator forms (create) or right after the EP
// is created (dispatch, lowlatency); the survivors enter a collective (EpCreate, a normal
// dispatch, a low-latency dispatch) and must get moecommRemoteError or moecommTimeout. A
// survivor exits 0 when it did, 1 otherwise.
//
// Why this program launches its own ranks instead of running under moecomm-run: the launcher
// stops every rank as soon as one exits non-zero, and a rank that dies on purpose is exactly
// what it treats as a failure. Here the parent process is the launcher: it takes a unique id,
// forks and re-executes itself once per rank with the MOECOMM_* variables set (so each rank is
// a fresh process that only uses the public API, like under moecomm-run), then waits. It expects
// the victim's own exit status and 0 from every survivor, and kills everything left after a
// deadline so a hang is reported as a failure instead of blocking ctest. The parent stays
// alive throughout because moecommGetUniqueId runs the rendezvous root in its process.
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moecomm.h"

namespace {

constexpr int kVictimExitCode = 42;
constexpr int kRankTimeoutMs = 5000;        // bootstrap waits of the ranks (config.timeoutMs)
constexpr int kParentDeadlineSeconds = 90;  // only a hang guard: far beyond any bounded wait

double SecondsSince(const timespec& start) {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec - start.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec - start.tv_nsec);
}

bool IsExpectedFailure(moecommResult_t result) { return result == moecommRemoteError || result == moecommTimeout; }

// A survivor's verdict on the call that had to fail.
int Verdict(int rank, const char* call, moecommResult_t result, const timespec& start) {
  const std::string text = moecommGetLastError(nullptr);
  std::printf("[rank %d] %s -> %s after %.1f s: %s\n", rank, call, moecommGetErrorString(result), SecondsSince(start),
              text.c_str());
  if (!IsExpectedFailure(result)) {
    std::printf("[rank %d] FAIL: expected remote error or timeout from %s\n", rank, call);
    return 1;
  }
  return 0;
}

moecommEpConfig_t SmallEpConfig(int nranks, moecommEpMode_t mode) {
  moecommEpConfig_t config = MOECOMM_EP_CONFIG_INIT;
  config.numExperts = 4 * nranks;
  config.hidden = 128;
  config.maxTokensPerRank = 8;
  config.topk = 2;
  config.mode = mode;
  return config;
}

int RunRank(const std::string& scenario) {
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  config.backend = moecommBackendHost;
  config.timeoutMs = kRankTimeoutMs;
  moecommComm_t comm = nullptr;
  moecommResult_t result = moecommCommInitFromEnv(&comm, &config);
  if (result != moecommSuccess) {
    std::printf("[rank ?] FAIL: moecommCommInitFromEnv: %s: %s\n", moecommGetErrorString(result),
                moecommGetLastError(nullptr));
    return 1;
  }
  int rank = -1;
  int nranks = 0;
  moecommCommUserRank(comm, &rank);
  moecommCommCount(comm, &nranks);
  const bool victim = rank == nranks - 1;
  if (victim && scenario == "create") _exit(kVictimExitCode);

  const moecommEpMode_t mode = scenario == "lowlatency" ? moecommEpModeLowLatency : moecommEpModeNormal;
  const moecommEpConfig_t ep_config = SmallEpConfig(nranks, mode);
  moecommEp_t ep = nullptr;
  timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  result = moecommEpCreate(comm, &ep_config, &ep);
  int status = 0;
  if (scenario == "create") {
    status = Verdict(rank, "moecommEpCreate", result, start);
  } else if (result != moecommSuccess) {
    std::printf("[rank %d] FAIL: moecommEpCreate before the death: %s: %s\n", rank, moecommGetErrorString(result),
                moecommGetLastError(nullptr));
    status = 1;
  } else {
    if (victim) _exit(kVictimExitCode);
    // One token per rank to every expert it can reach; the victim will never answer.
    std::vector<uint16_t> x(static_cast<size_t>(ep_config.maxTokensPerRank) * ep_config.hidden, 0x3f80);  // 1.0
    std::vector<int64_t> topk_idx(static_cast<size_t>(ep_config.maxTokensPerRank) * ep_config.topk);
    for (size_t i = 0; i < topk_idx.size(); ++i) topk_idx[i] = static_cast<int64_t>(i % ep_config.numExperts);
    const size_t capacity = static_cast<size_t>(nranks) * ep_config.maxTokensPerRank;
    const size_t local_experts = static_cast<size_t>(ep_config.numExperts / nranks);
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (mode == moecommEpModeNormal) {
      std::vector<uint16_t> recv_x(capacity * ep_config.hidden);
      moecommEpDispatchArgs_t args = MOECOMM_EP_DISPATCH_ARGS_INIT;
      args.numTokens = ep_config.maxTokensPerRank;
      args.x = x.data();
      args.topkIdx = topk_idx.data();
      args.recvCapacity = static_cast<int>(capacity);
      args.recvX = recv_x.data();
      moecommEpHandle_t handle = nullptr;
      status = Verdict(rank, "moecommEpDispatch", moecommEpDispatch(ep, &args, &handle, nullptr), start);
      if (handle != nullptr) moecommEpHandleDestroy(handle);
    } else {
      std::vector<uint16_t> recv_x(local_experts * capacity * ep_config.hidden);
      std::vector<int> recv_count(local_experts);
      moecommEpLowLatencyDispatchArgs_t args = MOECOMM_EP_LL_DISPATCH_ARGS_INIT;
      args.numTokens = ep_config.maxTokensPerRank;
      args.x = x.data();
      args.topkIdx = topk_idx.data();
      args.recvType = moecommBfloat16;
      args.recvX = recv_x.data();
      args.recvCount = recv_count.data();
      moecommEpHandle_t handle = nullptr;
      result = moecommEpLowLatencyDispatch(ep, &args, &handle, nullptr);
      // A low-latency wait may instead mask the silent rank and carry on (MOECOMM_LL_TIMEOUT);
      // then the failure must be visible as an asynchronous error or in the rank mask.
      if (result == moecommSuccess) {
        moecommResult_t async_error = moecommSuccess;
        moecommCommGetAsyncError(comm, &async_error);
        std::vector<int> mask(nranks, 0);
        moecommEpGetRankMask(ep, mask.data());
        std::printf("[rank %d] moecommEpLowLatencyDispatch succeeded after %.1f s; async error %s, victim masked %d\n",
                    rank, SecondsSince(start), moecommGetErrorString(async_error), mask[nranks - 1]);
        status = (IsExpectedFailure(async_error) || mask[nranks - 1] == 1) ? 0 : 1;
        if (status != 0) std::printf("[rank %d] FAIL: the dead rank was neither reported nor masked\n", rank);
      } else {
        status = Verdict(rank, "moecommEpLowLatencyDispatch", result, start);
      }
      if (handle != nullptr) moecommEpHandleDestroy(handle);
    }
  }
  // Abort first so that teardown does not wait on the dead rank; both must stay bounded.
  moecommCommAbort(comm);
  moecommCommDestroy(comm);
  std::fflush(stdout);
  return status;
}

int RunParent(const char* self, int nranks, const std::string& scenario) {
  moecommUniqueId id;
  char id_text[MOECOMM_UNIQUE_ID_STRING_BYTES];
  if (moecommGetUniqueId(&id) != moecommSuccess ||
      moecommUniqueIdToString(&id, id_text, sizeof(id_text)) != moecommSuccess) {
    std::printf("FAIL: moecommGetUniqueId: %s\n", moecommGetLastError(nullptr));
    return 1;
  }
  std::fflush(stdout);
  std::vector<pid_t> children;
  for (int rank = 0; rank < nranks; ++rank) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      for (pid_t child : children) kill(child, SIGKILL);
      return 1;
    }
    if (pid == 0) {
      setenv("MOECOMM_RANK", std::to_string(rank).c_str(), 1);
      setenv("MOECOMM_NRANKS", std::to_string(nranks).c_str(), 1);
      setenv("MOECOMM_UNIQUE_ID", id_text, 1);
      execl(self, self, "--rank", scenario.c_str(), static_cast<char*>(nullptr));
      std::perror("execl");
      _exit(127);
    }
    children.push_back(pid);
  }

  timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  std::vector<int> statuses(nranks, -1);
  int remaining = nranks;
  while (remaining > 0 && SecondsSince(start) < kParentDeadlineSeconds) {
    for (int rank = 0; rank < nranks; ++rank) {
      if (statuses[rank] != -1) continue;
      int wait_status = 0;
      if (waitpid(children[rank], &wait_status, WNOHANG) == children[rank]) {
        statuses[rank] = wait_status;
        --remaining;
      }
    }
    usleep(20 * 1000);
  }
  int failures = 0;
  for (int rank = 0; rank < nranks; ++rank) {
    if (statuses[rank] == -1) {
      std::printf("FAIL: rank %d still running after %d s (a wait is not bounded); killing it\n", rank,
                  kParentDeadlineSeconds);
      kill(children[rank], SIGKILL);
      waitpid(children[rank], nullptr, 0);
      ++failures;
      continue;
    }
    const int expected = rank == nranks - 1 ? kVictimExitCode : 0;
    const bool exited = WIFEXITED(statuses[rank]);
    if (!exited || WEXITSTATUS(statuses[rank]) != expected) {
      std::printf("FAIL: rank %d %s %d, expected exit status %d\n", rank,
                  exited ? "exited with" : "was killed by signal",
                  exited ? WEXITSTATUS(statuses[rank]) : WTERMSIG(statuses[rank]), expected);
      ++failures;
    }
  }
  std::printf("moecomm_mp_kill %s, %d ranks: %s\n", scenario.c_str(), nranks, failures == 0 ? "PASSED" : "FAILED");
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--rank") == 0) return RunRank(argv[2]);
  const std::string scenario = argc == 3 ? argv[2] : "";
  const int nranks = argc == 3 ? std::atoi(argv[1]) : 0;
  if (nranks < 2 || (scenario != "create" && scenario != "dispatch" && scenario != "lowlatency")) {
    std::fprintf(stderr, "usage: %s <nranks >= 2> <create|dispatch|lowlatency>\n", argv[0]);
    return 2;
  }
  // Re-execute through /proc/self/exe so the path does not depend on how we were started.
  return RunParent("/proc/self/exe", nranks, scenario);
}
