// The parts of the NVLink transport that need no GPU: the collective choice of method and
// descriptor passing over abstract unix sockets. They run everywhere, CI included.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "gpu/gpu_common.h"
#include "transport/fd_passing.h"
#include "transport/nvlink.h"

namespace moecomm_gpu_test {
namespace {

using moecomm::NvlinkMethod;
using moecomm::NvlinkRankCaps;

std::vector<NvlinkRankCaps> Ranks(int n, uint64_t process_base, bool cumem) {
  std::vector<NvlinkRankCaps> ranks(n);
  for (int r = 0; r < n; ++r) {
    ranks[r].processId = process_base == 0 ? 42 : process_base + r;  // 0: one shared process
    ranks[r].netNamespace = 7;
    ranks[r].cuMem = cumem;
    ranks[r].cuMemWhy = cumem ? "" : "no VMM";
  }
  return ranks;
}

void Request(std::vector<NvlinkRankCaps>* ranks, NvlinkMethod method) {
  for (auto& rank : *ranks) rank.requested = method;
}

TEST(NvlinkSelection, ParseOverride) {
  NvlinkMethod method = NvlinkMethod::kIpc;
  EXPECT_EQ(moecomm::parseNvlinkShare("", &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kAuto);
  EXPECT_EQ(moecomm::parseNvlinkShare("CuMem", &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kCuMem);
  EXPECT_EQ(moecomm::parseNvlinkShare("inprocess", &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kInProcess);
  EXPECT_EQ(moecomm::parseNvlinkShare("ipc", &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kIpc);
  EXPECT_EQ(moecomm::parseNvlinkShare("nvshmem", &method), moecommInvalidArgument);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("MOECOMM_NVLINK_SHARE=nvshmem"), std::string::npos);
}

TEST(NvlinkSelection, AutoPrefersInProcessThenCuMemThenIpc) {
  NvlinkMethod method = NvlinkMethod::kAuto;
  EXPECT_EQ(moecomm::chooseNvlinkMethod(Ranks(4, 0, true), &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kInProcess);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(Ranks(4, 100, true), &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kCuMem);
  std::vector<NvlinkRankCaps> ranks = Ranks(4, 100, true);
  ranks[2].cuMem = false;
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kIpc);
  ranks = Ranks(4, 100, true);
  ranks[3].netNamespace = 8;  // another container: no abstract sockets between them
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kIpc);
  ranks = Ranks(1, 100, false);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kInProcess);
}

TEST(NvlinkSelection, ForcedMethods) {
  NvlinkMethod method = NvlinkMethod::kAuto;
  std::vector<NvlinkRankCaps> ranks = Ranks(2, 0, true);
  Request(&ranks, NvlinkMethod::kCuMem);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kCuMem);  // cumem works inside one process too

  Request(&ranks, NvlinkMethod::kIpc);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommNotSupported);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("ipc"), std::string::npos);

  ranks = Ranks(3, 100, false);
  Request(&ranks, NvlinkMethod::kIpc);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommSuccess);
  EXPECT_EQ(method, NvlinkMethod::kIpc);

  Request(&ranks, NvlinkMethod::kInProcess);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommNotSupported);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("rank 1"), std::string::npos) << moecomm::lastErrorText();

  Request(&ranks, NvlinkMethod::kCuMem);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommNotSupported);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("no VMM"), std::string::npos) << moecomm::lastErrorText();

  ranks = Ranks(3, 100, true);
  ranks[2].netNamespace = 0;
  Request(&ranks, NvlinkMethod::kCuMem);
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommNotSupported);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("rank 2"), std::string::npos) << moecomm::lastErrorText();
}

TEST(NvlinkSelection, RanksMustAgreeOnTheOverride) {
  std::vector<NvlinkRankCaps> ranks = Ranks(3, 100, true);
  ranks[1].requested = NvlinkMethod::kIpc;
  NvlinkMethod method = NvlinkMethod::kAuto;
  EXPECT_EQ(moecomm::chooseNvlinkMethod(ranks, &method), moecommInvalidUsage);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("rank 1"), std::string::npos) << moecomm::lastErrorText();
}

// ---- Descriptor passing ----------------------------------------------------------------

std::string UniqueName(const char* what) {
  return "moecomm-test-" + std::to_string(getpid()) + "-" + what + "-" +
         std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
}

TEST(NvlinkFdPassing, DescriptorArrivesAndWorks) {
  const std::string name = UniqueName("pass");
  moecomm::FdListener listener;
  ASSERT_EQ(listener.listen(name, 4), moecommSuccess) << moecomm::lastErrorText();
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  moecomm::UniqueFd read_end(pipe_fds[0]), write_end(pipe_fds[1]);

  const moecomm::Deadline deadline = moecomm::deadlineAfterMs(5000);
  // Connect and send before anyone accepts: the message must wait in the queue.
  moecomm::UniqueFd client;
  ASSERT_EQ(moecomm::fdConnect(name, deadline, nullptr, &client), moecommSuccess) << moecomm::lastErrorText();
  const uint64_t payload[2] = {0x1234, 0x5678};
  ASSERT_EQ(moecomm::fdSend(client.get(), payload, sizeof(payload), write_end.get(), deadline, nullptr), moecommSuccess)
      << moecomm::lastErrorText();
  client.reset();  // the sender may be gone before the receiver looks
  write_end.reset();

  moecomm::UniqueFd connection, received;
  ASSERT_EQ(listener.accept(deadline, nullptr, &connection), moecommSuccess) << moecomm::lastErrorText();
  uint64_t got[2] = {0, 0};
  ASSERT_EQ(moecomm::fdReceive(connection.get(), got, sizeof(got), &received, deadline, nullptr), moecommSuccess)
      << moecomm::lastErrorText();
  EXPECT_EQ(got[0], payload[0]);
  EXPECT_EQ(got[1], payload[1]);
  ASSERT_TRUE(received.valid());
  EXPECT_NE(fcntl(received.get(), F_GETFD) & FD_CLOEXEC, 0) << "received descriptors must be close-on-exec";
  // The received descriptor is the pipe's write end: what goes in comes out of read_end.
  ASSERT_EQ(write(received.get(), "ok", 2), 2);
  char text[3] = {0};
  ASSERT_EQ(read(read_end.get(), text, 2), 2);
  EXPECT_STREQ(text, "ok");
}

TEST(NvlinkFdPassing, AcceptTimesOut) {
  moecomm::FdListener listener;
  ASSERT_EQ(listener.listen(UniqueName("timeout"), 1), moecommSuccess);
  moecomm::UniqueFd connection;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(listener.accept(moecomm::deadlineAfterMs(200), nullptr, &connection), moecommTimeout);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(seconds, 0.15);
  EXPECT_LT(seconds, 2.0);
}

TEST(NvlinkFdPassing, AbortUnblocksAccept) {
  moecomm::FdListener listener;
  ASSERT_EQ(listener.listen(UniqueName("abort"), 1), moecommSuccess);
  std::atomic<bool> aborted{false};
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    aborted = true;
  });
  moecomm::UniqueFd connection;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(listener.accept(moecomm::deadlineAfterMs(30000), &aborted, &connection), moecommInvalidUsage);
  aborter.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 2.0);
}

TEST(NvlinkFdPassing, NobodyListening) {
  moecomm::UniqueFd client;
  EXPECT_EQ(moecomm::fdConnect(UniqueName("absent"), moecomm::deadlineAfterMs(1000), nullptr, &client),
            moecommRemoteError);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find("nobody listens"), std::string::npos);
}

TEST(NvlinkFdPassing, NameInUse) {
  const std::string name = UniqueName("twice");
  moecomm::FdListener first, second;
  ASSERT_EQ(first.listen(name, 1), moecommSuccess);
  EXPECT_EQ(second.listen(name, 1), moecommSystemError);
  EXPECT_NE(std::string(moecomm::lastErrorText()).find(name), std::string::npos);
}

TEST(NvlinkFdPassing, MalformedMessagesAreRejected) {
  const std::string name = UniqueName("malformed");
  moecomm::FdListener listener;
  ASSERT_EQ(listener.listen(name, 4), moecommSuccess);
  const moecomm::Deadline deadline = moecomm::deadlineAfterMs(5000);
  // Too short, then a peer that hangs up without sending.
  moecomm::UniqueFd client;
  ASSERT_EQ(moecomm::fdConnect(name, deadline, nullptr, &client), moecommSuccess);
  const uint32_t short_payload = 7;
  ASSERT_EQ(moecomm::fdSend(client.get(), &short_payload, sizeof(short_payload), -1, deadline, nullptr),
            moecommSuccess);
  moecomm::UniqueFd connection, received;
  ASSERT_EQ(listener.accept(deadline, nullptr, &connection), moecommSuccess);
  uint64_t got[2];
  EXPECT_EQ(moecomm::fdReceive(connection.get(), got, sizeof(got), &received, deadline, nullptr), moecommRemoteError);
  EXPECT_FALSE(received.valid());

  moecomm::UniqueFd quitter;
  ASSERT_EQ(moecomm::fdConnect(name, deadline, nullptr, &quitter), moecommSuccess);
  quitter.reset();
  ASSERT_EQ(listener.accept(deadline, nullptr, &connection), moecommSuccess);
  EXPECT_EQ(moecomm::fdReceive(connection.get(), got, sizeof(got), &received, deadline, nullptr), moecommRemoteError);
}

}  // namespace
}  // namespace moecomm_gpu_test
