// moecomm-run: starts N ranks of a program on this host, wired for moecommCommInitFromEnv.
//
//   moecomm-run -n N [-t timeout_s] [--allow-kill R]... prog args...
//
// Each rank gets MOECOMM_RANK, MOECOMM_NRANKS, MOECOMM_LOCAL_RANK and MOECOMM_UNIQUE_ID (one
// id for the job). Its stdout and stderr come back line by line prefixed "[rank R] ". Rank 0
// inherits stdin; the others read /dev/null. When a rank fails (non-zero exit or a signal)
// the others get SIGTERM, then SIGKILL after a grace period, and moecomm-run exits with the
// failed rank's code (128 + signal for a signal). The -t timeout stops everything and exits
// 124. SIGINT/SIGTERM/SIGHUP to moecomm-run are passed on the same way (exit 128 + signal).
// --allow-kill R is for tests that kill rank R on purpose: R dying of SIGKILL is then noted
// and is not a failure (the other ranks go on, and decide the exit code); any other way R
// fails still is.
//
// The rendezvous root behind the unique id is a thread of this process, so moecomm-run stays
// alive for the whole job. Each rank runs in its own process group, so what it forks is
// stopped with it.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moecomm.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kExitUsage = 2;
constexpr int kExitTimeout = 124;
constexpr int kExitLauncherError = 1;
constexpr auto kKillGrace = std::chrono::seconds(5);
// Once every rank has exited, how long output still held by their leftover children is
// awaited before moecomm-run returns anyway.
constexpr auto kDrainGrace = std::chrono::seconds(1);
// A line longer than this is forwarded in pieces rather than buffered without bound.
constexpr size_t kMaxLine = 64 * 1024;

volatile sig_atomic_t g_signal = 0;
int g_wakeFd = -1;  // write end of the self-pipe that wakes poll() on SIGCHLD and stop signals

void onSignal(int sig) {
  const int savedErrno = errno;
  if (sig != SIGCHLD && g_signal == 0) g_signal = sig;
  const char byte = 0;
  if (write(g_wakeFd, &byte, 1) < 0) {
    // A full pipe already holds a wake-up.
  }
  errno = savedErrno;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: moecomm-run -n N [-t timeout_s] [--allow-kill R]... program [args...]\n"
               "  -n N            number of ranks to start on this host (1..65536)\n"
               "  -t timeout_s    stop every rank and exit 124 after this many seconds (default: no limit)\n"
               "  --allow-kill R  rank R dying of SIGKILL is expected (a test kills it): not a failure\n"
               "Each rank gets MOECOMM_RANK, MOECOMM_NRANKS, MOECOMM_LOCAL_RANK and MOECOMM_UNIQUE_ID;\n"
               "its output is prefixed with \"[rank R] \".\n");
}

void writeAll(int fd, const char* data, size_t bytes) {
  while (bytes > 0) {
    const ssize_t n = write(fd, data, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // nowhere to write to (closed pipe): the output is lost, the job goes on
    data += n;
    bytes -= static_cast<size_t>(n);
  }
}

void report(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void report(const char* fmt, ...) {
  char text[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  std::string line = std::string("moecomm-run: ") + text + "\n";
  writeAll(STDERR_FILENO, line.data(), line.size());
}

// One output stream of one rank, re-emitted line by line with the rank prefix.
struct Stream {
  int fd = -1;
  int target = STDOUT_FILENO;
  std::string pending;

  void emit(const std::string& prefix, const char* data, size_t bytes) {
    std::string line = prefix;
    line.append(data, bytes);
    if (line.back() != '\n') line.push_back('\n');
    writeAll(target, line.data(), line.size());
  }
  void consume(const std::string& prefix, const char* data, size_t bytes) {
    pending.append(data, bytes);
    size_t start = 0;
    for (size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
      emit(prefix, pending.data() + start, nl - start + 1);
    }
    pending.erase(0, start);
    if (pending.size() >= kMaxLine) {
      emit(prefix, pending.data(), pending.size());
      pending.clear();
    }
  }
  void finish(const std::string& prefix) {
    if (!pending.empty()) emit(prefix, pending.data(), pending.size());
    pending.clear();
    if (fd >= 0) close(fd);
    fd = -1;
  }
};

struct Rank {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  std::string prefix;
  Stream out, err;
};

struct Options {
  int nranks = 0;
  double timeoutSeconds = 0;
  int programIndex = 0;
  std::vector<int> allowedKills;  // --allow-kill: ranks whose death by SIGKILL is expected
};

bool parseInt(const char* text, int* out, long min = 1) {
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < min || value > 65536) return false;
  *out = static_cast<int>(value);
  return true;
}

bool parseArgs(int argc, char** argv, Options* options, int* exitCode) {
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg == "-h" || arg == "--help") {
      usage(stdout);
      *exitCode = 0;
      return false;
    }
    if ((arg == "-n" || arg == "-t" || arg == "--allow-kill") && i + 1 >= argc) {
      std::fprintf(stderr, "moecomm-run: %s needs a value\n", arg.c_str());
      usage(stderr);
      return false;
    }
    if (arg == "-n") {
      if (!parseInt(argv[++i], &options->nranks)) {
        std::fprintf(stderr, "moecomm-run: -n wants a rank count from 1 to 65536, not '%s'\n", argv[i]);
        usage(stderr);
        return false;
      }
    } else if (arg == "-t") {
      char* end = nullptr;
      options->timeoutSeconds = std::strtod(argv[++i], &end);
      if (end == argv[i] || *end != '\0' || !(options->timeoutSeconds > 0) || options->timeoutSeconds > 1e9) {
        std::fprintf(stderr, "moecomm-run: -t wants a positive number of seconds, not '%s'\n", argv[i]);
        usage(stderr);
        return false;
      }
    } else if (arg == "--allow-kill") {
      int rank = 0;
      if (!parseInt(argv[++i], &rank, 0)) {
        std::fprintf(stderr, "moecomm-run: --allow-kill wants a rank number, not '%s'\n", argv[i]);
        usage(stderr);
        return false;
      }
      options->allowedKills.push_back(rank);
    } else {
      std::fprintf(stderr, "moecomm-run: unknown option '%s'\n", arg.c_str());
      usage(stderr);
      return false;
    }
  }
  if (options->nranks == 0 || i >= argc) {
    std::fprintf(stderr, "moecomm-run: %s\n", options->nranks == 0 ? "-n is required" : "no program given");
    usage(stderr);
    return false;
  }
  for (int rank : options->allowedKills) {
    if (rank >= options->nranks) {
      std::fprintf(stderr, "moecomm-run: --allow-kill %d names no rank of -n %d\n", rank, options->nranks);
      usage(stderr);
      return false;
    }
  }
  options->programIndex = i;
  return true;
}

bool isOurVariable(const char* entry) {
  static const char* const kNames[] = {"MOECOMM_RANK=", "MOECOMM_NRANKS=", "MOECOMM_LOCAL_RANK=", "MOECOMM_UNIQUE_ID="};
  for (const char* name : kNames) {
    if (std::strncmp(entry, name, std::strlen(name)) == 0) return true;
  }
  return false;
}

// Everything a child needs is prepared before fork(): between fork and exec only
// async-signal-safe calls are allowed, and the rendezvous thread is running.
struct ChildPlan {
  std::vector<std::string> envStorage;
  std::vector<char*> envp;
  int outWrite = -1, errWrite = -1, stdinFd = -1;
};

const int kHandledSignals[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};

// Runs in the child with the handled signals blocked (see Launcher::start).
[[noreturn]] void execChild(const ChildPlan& plan, char** programArgv, const sigset_t& originalMask) {
  setpgid(0, 0);
  // Our handlers must not run here: a SIGTERM meant for this rank would only wake a launcher
  // that is not listening. With default actions restored, a SIGTERM that came in the
  // meantime is delivered, and kills, as soon as the mask is lifted.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig : kHandledSignals) sigaction(sig, &dfl, nullptr);
  sigaction(SIGPIPE, &dfl, nullptr);  // ignored in the launcher, and an ignored signal survives exec
  sigprocmask(SIG_SETMASK, &originalMask, nullptr);
  if (plan.stdinFd >= 0) dup2(plan.stdinFd, STDIN_FILENO);
  dup2(plan.outWrite, STDOUT_FILENO);
  dup2(plan.errWrite, STDERR_FILENO);
  execvpe(programArgv[0], programArgv, plan.envp.data());
  const int err = errno;
  const char* prefix = "moecomm-run: could not execute ";
  writeAll(STDERR_FILENO, prefix, std::strlen(prefix));
  writeAll(STDERR_FILENO, programArgv[0], std::strlen(programArgv[0]));
  writeAll(STDERR_FILENO, ": ", 2);
  const char* reason = std::strerror(err);
  writeAll(STDERR_FILENO, reason, std::strlen(reason));
  writeAll(STDERR_FILENO, "\n", 1);
  _exit(127);
}

class Launcher {
 public:
  Launcher(const Options& options, char** programArgv) : options_(options), programArgv_(programArgv) {}
  int run();

 private:
  bool start(const std::string& idText);
  void reap();
  void stop(int sig);
  void pump(int timeoutMs);
  bool anyRunning() const;
  bool anyOpenStream() const;
  bool allowedKill(int rank) const {
    return std::find(options_.allowedKills.begin(), options_.allowedKills.end(), rank) != options_.allowedKills.end();
  }

  const Options& options_;
  char** programArgv_;
  std::vector<Rank> ranks_;
  int wakeRead_ = -1;
  int exitCode_ = 0;
  bool stopping_ = false;
  bool killed_ = false;
  Clock::time_point killAt_;
};

bool Launcher::start(const std::string& idText) {
  const int devNull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  std::vector<std::string> baseEnv;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!isOurVariable(*e)) baseEnv.emplace_back(*e);
  }
  ranks_.resize(options_.nranks);
  for (int r = 0; r < options_.nranks; ++r) {
    Rank& rank = ranks_[r];
    rank.rank = r;
    rank.prefix = "[rank " + std::to_string(r) + "] ";
    int outPipe[2], errPipe[2];
    if (pipe2(outPipe, O_CLOEXEC) != 0 || pipe2(errPipe, O_CLOEXEC) != 0) {
      report("could not create pipes for rank %d: %s", r, std::strerror(errno));
      return false;
    }
    ChildPlan plan;
    plan.envStorage = baseEnv;
    plan.envStorage.push_back("MOECOMM_RANK=" + std::to_string(r));
    plan.envStorage.push_back("MOECOMM_NRANKS=" + std::to_string(options_.nranks));
    plan.envStorage.push_back("MOECOMM_LOCAL_RANK=" + std::to_string(r));
    plan.envStorage.push_back("MOECOMM_UNIQUE_ID=" + idText);
    for (std::string& entry : plan.envStorage) plan.envp.push_back(&entry[0]);
    plan.envp.push_back(nullptr);
    plan.outWrite = outPipe[1];
    plan.errWrite = errPipe[1];
    plan.stdinFd = r == 0 ? -1 : devNull;

    sigset_t handled, originalMask;
    sigemptyset(&handled);
    for (int sig : kHandledSignals) sigaddset(&handled, sig);
    pthread_sigmask(SIG_BLOCK, &handled, &originalMask);
    const pid_t pid = fork();
    if (pid == 0) execChild(plan, programArgv_, originalMask);
    const int forkErrno = errno;
    pthread_sigmask(SIG_SETMASK, &originalMask, nullptr);
    if (pid < 0) {
      report("fork() for rank %d failed: %s", r, std::strerror(forkErrno));
      close(outPipe[0]), close(outPipe[1]), close(errPipe[0]), close(errPipe[1]);
      return false;
    }
    setpgid(pid, pid);  // also here, so a signal sent right away already reaches the group
    close(outPipe[1]);
    close(errPipe[1]);
    rank.pid = pid;
    rank.running = true;
    rank.out.fd = outPipe[0];
    rank.out.target = STDOUT_FILENO;
    rank.err.fd = errPipe[0];
    rank.err.target = STDERR_FILENO;
  }
  if (devNull >= 0) close(devNull);
  return true;
}

bool Launcher::anyRunning() const {
  for (const Rank& r : ranks_) {
    if (r.running) return true;
  }
  return false;
}

bool Launcher::anyOpenStream() const {
  for (const Rank& r : ranks_) {
    if (r.out.fd >= 0 || r.err.fd >= 0) return true;
  }
  return false;
}

void Launcher::stop(int sig) {
  for (const Rank& r : ranks_) {
    if (!r.running) continue;
    if (kill(-r.pid, sig) != 0) kill(r.pid, sig);
  }
}

void Launcher::reap() {
  for (;;) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (Rank& r : ranks_) {
      if (r.pid != pid || !r.running) continue;
      r.running = false;
      const bool failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
      if (!failed || stopping_) break;
      if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL && allowedKill(r.rank)) {
        report("rank %d (pid %d) was killed by SIGKILL, as --allow-kill %d expects; the other ranks go on", r.rank,
               static_cast<int>(pid), r.rank);
        break;
      }
      if (WIFSIGNALED(status)) {
        report("rank %d (pid %d) was killed by signal %d (%s); stopping the other ranks", r.rank, static_cast<int>(pid),
               WTERMSIG(status), strsignal(WTERMSIG(status)));
        exitCode_ = 128 + WTERMSIG(status);
      } else {
        report("rank %d (pid %d) exited with code %d; stopping the other ranks", r.rank, static_cast<int>(pid),
               WEXITSTATUS(status));
        exitCode_ = WEXITSTATUS(status);
      }
      stopping_ = true;
      stop(SIGTERM);
      killAt_ = Clock::now() + kKillGrace;
      break;
    }
  }
}

// Waits up to timeoutMs for output or a signal, and forwards whatever output arrived.
void Launcher::pump(int timeoutMs) {
  std::vector<pollfd> fds{{wakeRead_, POLLIN, 0}};
  std::vector<std::pair<Rank*, Stream*>> owners{{nullptr, nullptr}};
  for (Rank& r : ranks_) {
    for (Stream* s : {&r.out, &r.err}) {
      if (s->fd < 0) continue;
      fds.push_back(pollfd{s->fd, POLLIN, 0});
      owners.emplace_back(&r, s);
    }
  }
  if (poll(fds.data(), fds.size(), timeoutMs) <= 0) return;
  char buffer[16384];
  if (fds[0].revents != 0) {
    while (read(wakeRead_, buffer, sizeof(buffer)) > 0) {
    }
  }
  for (size_t i = 1; i < fds.size(); ++i) {
    if (fds[i].revents == 0) continue;
    Rank& rank = *owners[i].first;
    Stream& stream = *owners[i].second;
    const ssize_t n = read(stream.fd, buffer, sizeof(buffer));
    if (n > 0) {
      stream.consume(rank.prefix, buffer, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      stream.finish(rank.prefix);
    }
  }
}

int Launcher::run() {
  moecommUniqueId id;
  char idText[MOECOMM_UNIQUE_ID_STRING_BYTES];
  if (moecommGetUniqueId(&id) != moecommSuccess ||
      moecommUniqueIdToString(&id, idText, sizeof(idText)) != moecommSuccess) {
    report("could not create the job's unique id: %s", moecommGetLastError(nullptr));
    return kExitLauncherError;
  }

  int wakePipe[2];
  if (pipe2(wakePipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    report("could not create a pipe: %s", std::strerror(errno));
    return kExitLauncherError;
  }
  wakeRead_ = wakePipe[0];
  g_wakeFd = wakePipe[1];
  struct sigaction action {};
  action.sa_handler = onSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  for (int sig : kHandledSignals) sigaction(sig, &action, nullptr);
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &ignore, nullptr);  // a closed stdout must not kill the launcher mid-job

  const bool started = start(idText);
  if (!started) {
    exitCode_ = kExitLauncherError;
    stopping_ = true;
    stop(SIGTERM);
    killAt_ = Clock::now() + kKillGrace;
  }
  const bool hasTimeout = options_.timeoutSeconds > 0;
  const auto timeoutAt = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(options_.timeoutSeconds));
  Clock::time_point drainUntil{};
  for (;;) {
    reap();
    const auto now = Clock::now();
    if (!stopping_ && g_signal != 0) {
      report("received signal %d; stopping all ranks", static_cast<int>(g_signal));
      exitCode_ = 128 + g_signal;
      stopping_ = true;
      stop(SIGTERM);
      killAt_ = now + kKillGrace;
    }
    if (!stopping_ && hasTimeout && now >= timeoutAt) {
      report("the job ran past the %g s timeout; stopping all ranks", options_.timeoutSeconds);
      exitCode_ = kExitTimeout;
      stopping_ = true;
      stop(SIGTERM);
      killAt_ = now + kKillGrace;
    }
    if (stopping_ && !killed_ && now >= killAt_ && anyRunning()) {
      report("ranks still running %d s after SIGTERM; sending SIGKILL",
             static_cast<int>(std::chrono::duration_cast<std::chrono::seconds>(kKillGrace).count()));
      stop(SIGKILL);
      killed_ = true;
    }
    if (!anyRunning()) {
      if (!anyOpenStream()) break;
      if (drainUntil == Clock::time_point{}) drainUntil = now + kDrainGrace;
      if (now >= drainUntil) break;
    }
    pump(100);
  }
  for (Rank& r : ranks_) {
    r.out.finish(r.prefix);
    r.err.finish(r.prefix);
  }
  return exitCode_;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  int exitCode = kExitUsage;
  if (!parseArgs(argc, argv, &options, &exitCode)) return exitCode;
  Launcher launcher(options, argv + options.programIndex);
  return launcher.run();
}
