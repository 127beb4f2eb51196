// Bootstrap tests: TCP (ranks as threads, and one rank as a forked process), in-process and
// external bootstraps, and the moecomm-run launcher. Every wait in here is bounded.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/bootstrap.h"
#include "core/error.h"
#include "core/socket.h"
#include "moecomm.h"

namespace moecomm {
namespace {

using Clock = std::chrono::steady_clock;

int64_t msSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

template <class Fn>
void runRanks(int nranks, Fn fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < nranks; ++r) threads.emplace_back(fn, r);
  for (std::thread& t : threads) t.join();
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Allgather contents (element by element), in-place allgather, repeated barriers and
// collectives, zero-byte allgather.
void exerciseCollectives(Bootstrap& b) {
  const int rank = b.rank();
  const int nranks = b.nranks();
  constexpr int kWords = 5;
  std::vector<int64_t> mine(kWords), all(static_cast<size_t>(nranks) * kWords, -1);
  for (int k = 0; k < kWords; ++k) mine[k] = rank * 1000 + k;
  ASSERT_EQ(b.allgather(mine.data(), all.data(), sizeof(int64_t) * kWords), moecommSuccess) << lastErrorText();
  for (int src = 0; src < nranks; ++src) {
    for (int k = 0; k < kWords; ++k) {
      ASSERT_EQ(all[src * kWords + k], src * 1000 + k) << "rank " << rank << " element " << k << " from " << src;
    }
  }

  std::vector<int32_t> inPlace(nranks, -1);
  inPlace[rank] = 7 * rank + 1;
  ASSERT_EQ(b.allgather(&inPlace[rank], inPlace.data(), sizeof(int32_t)), moecommSuccess) << lastErrorText();
  for (int src = 0; src < nranks; ++src) ASSERT_EQ(inPlace[src], 7 * src + 1) << "rank " << rank;

  for (int round = 0; round < 20; ++round) {
    ASSERT_EQ(b.barrier(), moecommSuccess) << "round " << round << ": " << lastErrorText();
    std::vector<int32_t> values(nranks, -1);
    const int32_t value = rank * 100 + round;
    ASSERT_EQ(b.allgather(&value, values.data(), sizeof(value)), moecommSuccess) << lastErrorText();
    for (int src = 0; src < nranks; ++src) ASSERT_EQ(values[src], src * 100 + round);
  }
  ASSERT_EQ(b.allgather(nullptr, nullptr, 0), moecommSuccess) << lastErrorText();
}

uint8_t patternByte(size_t i, int rank) { return static_cast<uint8_t>((i * 31 + rank * 7 + (i >> 12)) & 0xff); }

std::vector<uint8_t> pattern(size_t bytes, int rank) {
  std::vector<uint8_t> data(bytes);
  for (size_t i = 0; i < bytes; ++i) data[i] = patternByte(i, rank);
  return data;
}

void expectPattern(const uint8_t* data, size_t bytes, int rank, const char* what) {
  for (size_t i = 0; i < bytes; ++i) {
    if (data[i] != patternByte(i, rank)) {
      ADD_FAILURE() << what << ": byte " << i << " of " << bytes << " from rank " << rank << " is " << int(data[i])
                    << ", expected " << int(patternByte(i, rank));
      return;
    }
  }
}

// Point-to-point in both directions around the ring with tags, then a large message between
// neighbour pairs and a large allgather.
void exerciseP2p(Bootstrap& b, size_t largeBytes) {
  const int rank = b.rank();
  const int nranks = b.nranks();
  const int next = (rank + 1) % nranks;
  const int prev = (rank + nranks - 1) % nranks;
  const int64_t toNext = 10 * rank + 1, toPrev = 10 * rank + 2;
  ASSERT_EQ(b.send(next, 11, &toNext, sizeof(toNext)), moecommSuccess) << lastErrorText();
  ASSERT_EQ(b.send(prev, 12, &toPrev, sizeof(toPrev)), moecommSuccess) << lastErrorText();
  int64_t fromPrev = -1, fromNext = -1;
  ASSERT_EQ(b.recv(prev, 11, &fromPrev, sizeof(fromPrev)), moecommSuccess) << lastErrorText();
  ASSERT_EQ(b.recv(next, 12, &fromNext, sizeof(fromNext)), moecommSuccess) << lastErrorText();
  EXPECT_EQ(fromPrev, 10 * prev + 1);
  EXPECT_EQ(fromNext, 10 * next + 2);

  const int partner = rank ^ 1;
  if (partner < nranks) {
    // The lower rank sends first: a send may wait until the peer receives.
    const std::vector<uint8_t> out = pattern(largeBytes, rank);
    std::vector<uint8_t> in(largeBytes, 0);
    if (rank < partner) {
      ASSERT_EQ(b.send(partner, 99, out.data(), out.size()), moecommSuccess) << lastErrorText();
      ASSERT_EQ(b.recv(partner, 99, in.data(), in.size()), moecommSuccess) << lastErrorText();
    } else {
      ASSERT_EQ(b.recv(partner, 99, in.data(), in.size()), moecommSuccess) << lastErrorText();
      ASSERT_EQ(b.send(partner, 99, out.data(), out.size()), moecommSuccess) << lastErrorText();
    }
    expectPattern(in.data(), in.size(), partner, "large point-to-point message");
  }

  const size_t piece = largeBytes / 4;
  const std::vector<uint8_t> mine = pattern(piece, rank);
  std::vector<uint8_t> all(piece * nranks, 0);
  ASSERT_EQ(b.allgather(mine.data(), all.data(), piece), moecommSuccess) << lastErrorText();
  for (int src = 0; src < nranks; ++src) expectPattern(all.data() + src * piece, piece, src, "large allgather");
}

// ---- Socket helpers ------------------------------------------------------------------------

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    if (old != nullptr) saved_ = old, hadValue_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (hadValue_) {
      setenv(name_.c_str(), saved_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, saved_;
  bool hadValue_ = false;
};

TEST(BootstrapSocket, InterfaceChoiceFollowsIfname) {
  SocketAddress address;
  {
    ScopedEnv env("MOECOMM_SOCKET_IFNAME", "lo");
    ASSERT_EQ(findInterfaceAddress(&address), moecommSuccess) << lastErrorText();
    EXPECT_TRUE(address.isLoopback()) << address.toString();
    EXPECT_EQ(address.port(), 0);
  }
  {
    ScopedEnv env("MOECOMM_SOCKET_IFNAME", "nosuchif0");
    EXPECT_EQ(findInterfaceAddress(&address), moecommInvalidUsage);
    EXPECT_TRUE(contains(lastErrorText(), "MOECOMM_SOCKET_IFNAME=nosuchif0")) << lastErrorText();
    EXPECT_TRUE(contains(lastErrorText(), "lo")) << lastErrorText();
  }
  ScopedEnv env("MOECOMM_SOCKET_IFNAME", "");
  ASSERT_EQ(findInterfaceAddress(&address), moecommSuccess) << lastErrorText();
  EXPECT_EQ(address.family(), AF_INET) << address.toString();
}

TEST(BootstrapSocket, Ipv6RoundTripTimeoutAbortAndPeerClose) {
  SocketAddress loopback6;
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&loopback6.storage);
  in6->sin6_family = AF_INET6;
  in6->sin6_addr = in6addr_loopback;
  loopback6.length = sizeof(sockaddr_in6);
  Socket listener;
  SocketAddress bound;
  if (socketListen(loopback6, &listener, &bound) != moecommSuccess) GTEST_SKIP() << "no IPv6 loopback here";
  EXPECT_EQ(bound.toString(), "[::1]:" + std::to_string(bound.port()));
  EncodedAddress encoded;
  encodeAddress(bound, &encoded);
  SocketAddress decoded;
  ASSERT_EQ(decodeAddress(encoded, &decoded), moecommSuccess);
  EXPECT_EQ(decoded.toString(), bound.toString());

  Socket client, server;
  ASSERT_EQ(socketConnect(decoded, deadlineAfterMs(2000), nullptr, &client), moecommSuccess) << lastErrorText();
  ASSERT_EQ(socketAccept(listener, deadlineAfterMs(2000), nullptr, &server), moecommSuccess) << lastErrorText();

  // More than the socket buffers hold, so both sides really wait on each other.
  const std::vector<uint8_t> out = pattern(8u << 20, 3);
  std::vector<uint8_t> in(out.size());
  std::thread sender([&] {
    EXPECT_EQ(socketSendAll(client, out.data(), out.size(), deadlineAfterMs(5000), nullptr), moecommSuccess);
  });
  EXPECT_EQ(socketRecvAll(server, in.data(), in.size(), deadlineAfterMs(5000), nullptr), moecommSuccess);
  sender.join();
  expectPattern(in.data(), in.size(), 3, "socket round trip");

  auto start = Clock::now();
  uint32_t word = 0;
  EXPECT_EQ(socketRecvAll(server, &word, sizeof(word), deadlineAfterMs(200), nullptr), moecommTimeout);
  EXPECT_GE(msSince(start), 150);

  std::atomic<bool> abortFlag{false};
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    abortFlag.store(true);
  });
  start = Clock::now();
  EXPECT_EQ(socketRecvAll(server, &word, sizeof(word), deadlineAfterMs(5000), &abortFlag), moecommInvalidUsage);
  EXPECT_TRUE(contains(lastErrorText(), "aborted")) << lastErrorText();
  EXPECT_LT(msSince(start), 1000);
  aborter.join();

  client.reset();
  EXPECT_EQ(socketRecvAll(server, &word, sizeof(word), deadlineAfterMs(2000), nullptr), moecommRemoteError);
  // Writing to a closed peer is an error code, never SIGPIPE (which would end this test).
  moecommResult_t res = moecommSuccess;
  const std::vector<uint8_t> chunk(64 << 10);
  for (int i = 0; i < 100 && res == moecommSuccess; ++i) {
    res = socketSendAll(server, chunk.data(), chunk.size(), deadlineAfterMs(2000), nullptr);
  }
  EXPECT_EQ(res, moecommRemoteError) << lastErrorText();
}

TEST(BootstrapSocket, ConnectRetriesUntilTheDeadline) {
  Socket listener;
  SocketAddress bound;
  ASSERT_EQ(socketListen(loopbackAddress(), &listener, &bound), moecommSuccess) << lastErrorText();
  listener.reset();  // nobody listens there any more
  Socket client;
  const auto start = Clock::now();
  EXPECT_EQ(socketConnect(bound, deadlineAfterMs(400), nullptr, &client), moecommTimeout);
  EXPECT_GE(msSince(start), 350);
  EXPECT_LT(msSince(start), 2000);
  EXPECT_FALSE(client.valid());
}

// Bounds the rendezvous roots this process starts, so failure tests leave no long-lived thread.
class BootstrapTcpEnv {
 public:
  BootstrapTcpEnv() {
    const char* old = std::getenv("MOECOMM_BOOTSTRAP_TIMEOUT");
    if (old != nullptr) saved_ = old, hadValue_ = true;
    setenv("MOECOMM_BOOTSTRAP_TIMEOUT", "8000", 1);
  }
  ~BootstrapTcpEnv() {
    if (hadValue_) {
      setenv("MOECOMM_BOOTSTRAP_TIMEOUT", saved_.c_str(), 1);
    } else {
      unsetenv("MOECOMM_BOOTSTRAP_TIMEOUT");
    }
  }

 private:
  std::string saved_;
  bool hadValue_ = false;
};

class BootstrapTcp : public ::testing::Test {
 protected:
  BootstrapTcpEnv env_;
};

class BootstrapTcpSizes : public ::testing::TestWithParam<int> {
 protected:
  BootstrapTcpEnv env_;
};

TEST_P(BootstrapTcpSizes, CollectivesAndPointToPoint) {
  const int nranks = GetParam();
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  runRanks(nranks, [&](int rank) {
    std::unique_ptr<Bootstrap> b;
    ASSERT_EQ(bootstrapCreateTcp(id, rank, nranks, 10000, &b), moecommSuccess) << lastErrorText();
    ASSERT_EQ(b->rank(), rank);
    ASSERT_EQ(b->nranks(), nranks);
    exerciseCollectives(*b);
    exerciseP2p(*b, 4u << 20);
    EXPECT_EQ(b->barrier(), moecommSuccess) << lastErrorText();
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, BootstrapTcpSizes, ::testing::Values(1, 2, 3, 4, 8));

TEST_F(BootstrapTcp, SeveralIdsLiveAtOnce) {
  constexpr int kGroups = 3, kRanks = 2;
  moecommUniqueId ids[kGroups];
  for (auto& id : ids) ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  runRanks(kGroups * kRanks, [&](int thread) {
    const int group = thread / kRanks, rank = thread % kRanks;
    std::unique_ptr<Bootstrap> b;
    ASSERT_EQ(bootstrapCreateTcp(ids[group], rank, kRanks, 10000, &b), moecommSuccess) << lastErrorText();
    const int32_t mine = group * 10 + rank;
    int32_t all[kRanks] = {-1, -1};
    ASSERT_EQ(b->allgather(&mine, all, sizeof(mine)), moecommSuccess) << lastErrorText();
    for (int r = 0; r < kRanks; ++r) EXPECT_EQ(all[r], group * 10 + r);
  });
}

TEST_F(BootstrapTcp, RankThatNeverArrivesTimesOut) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  const auto start = Clock::now();
  runRanks(2, [&](int rank) {  // rank 2 of 3 never comes
    std::unique_ptr<Bootstrap> b;
    EXPECT_EQ(bootstrapCreateTcp(id, rank, 3, 1500, &b), moecommTimeout);
    EXPECT_TRUE(contains(lastErrorText(), "waited 1500 ms")) << lastErrorText();
    EXPECT_EQ(b, nullptr);
  });
  const int64_t elapsed = msSince(start);
  EXPECT_GE(elapsed, 1400);
  EXPECT_LT(elapsed, 4000);
}

TEST_F(BootstrapTcp, SilentPeerMakesBarrierTimeOut) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  std::atomic<bool> done{false};
  runRanks(2, [&](int rank) {
    std::unique_ptr<Bootstrap> b;
    ASSERT_EQ(bootstrapCreateTcp(id, rank, 2, 1500, &b), moecommSuccess) << lastErrorText();
    if (rank == 1) {  // stays connected but never joins the barrier
      while (!done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return;
    }
    const auto start = Clock::now();
    EXPECT_EQ(b->barrier(), moecommTimeout);
    const int64_t elapsed = msSince(start);
    EXPECT_TRUE(contains(lastErrorText(), "rank 0 waited 1500 ms for rank 1 during barrier")) << lastErrorText();
    EXPECT_GE(elapsed, 1400);
    EXPECT_LT(elapsed, 3500);
    // The connection may hold half a message now: the bootstrap stays failed.
    EXPECT_EQ(b->barrier(), moecommTimeout);
    done.store(true);
  });
}

TEST_F(BootstrapTcp, PeerProcessDyingIsRemoteError) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Joins, then dies without taking part in anything; the kernel closes its sockets.
    std::unique_ptr<Bootstrap> b;
    const moecommResult_t res = bootstrapCreateTcp(id, 1, 2, 5000, &b);
    usleep(300 * 1000);
    _exit(res == moecommSuccess ? 0 : 1);
  }
  std::unique_ptr<Bootstrap> b;
  ASSERT_EQ(bootstrapCreateTcp(id, 0, 2, 5000, &b), moecommSuccess) << lastErrorText();
  const auto start = Clock::now();
  EXPECT_EQ(b->barrier(), moecommRemoteError);
  EXPECT_TRUE(contains(lastErrorText(), "rank 0 lost connection to rank 1 during barrier")) << lastErrorText();
  EXPECT_LT(msSince(start), 4000);
  EXPECT_EQ(b->allgather(&id, nullptr, 0), moecommRemoteError);  // stays failed

  int status = 0;
  pid_t reaped = 0;
  for (int i = 0; i < 500 && (reaped = waitpid(child, &status, WNOHANG)) == 0; ++i) usleep(10 * 1000);
  if (reaped == 0) {
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    FAIL() << "the child rank did not exit";
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

TEST_F(BootstrapTcp, AbortFromAnotherThreadUnblocksBarrier) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  std::unique_ptr<Bootstrap> bootstraps[2];
  runRanks(2, [&](int rank) {
    ASSERT_EQ(bootstrapCreateTcp(id, rank, 2, 20000, &bootstraps[rank]), moecommSuccess) << lastErrorText();
  });
  ASSERT_TRUE(bootstraps[0] && bootstraps[1]);
  Clock::time_point abortedAt;
  std::atomic<bool> abortSent{false};
  std::thread waiter([&] {
    EXPECT_EQ(bootstraps[0]->barrier(), moecommInvalidUsage);
    EXPECT_TRUE(contains(lastErrorText(), "aborted")) << lastErrorText();
    ASSERT_TRUE(abortSent.load());
    EXPECT_LT(msSince(abortedAt), 1000);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  abortedAt = Clock::now();
  abortSent.store(true);
  bootstraps[0]->abort();
  bootstraps[0]->abort();  // idempotent
  waiter.join();
  EXPECT_EQ(bootstraps[0]->barrier(), moecommInvalidUsage);
}

TEST_F(BootstrapTcp, MismatchedNranksIsRejected) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  std::string texts[2];
  moecommResult_t results[2];
  const auto start = Clock::now();
  runRanks(2, [&](int rank) {
    std::unique_ptr<Bootstrap> b;
    results[rank] = bootstrapCreateTcp(id, rank, rank == 0 ? 2 : 3, 5000, &b);
    texts[rank] = lastErrorText();
  });
  // Whoever came second is turned away, and the root then tells the first one too.
  EXPECT_EQ(results[0], moecommInvalidUsage) << texts[0];
  EXPECT_EQ(results[1], moecommInvalidUsage) << texts[1];
  EXPECT_TRUE(contains(texts[0], "nranks")) << texts[0];
  EXPECT_TRUE(contains(texts[1], "nranks")) << texts[1];
  EXPECT_LT(msSince(start), 4000);
}

TEST_F(BootstrapTcp, BadOrForeignIdIsRejected) {
  std::unique_ptr<Bootstrap> b;
  moecommUniqueId zero;
  std::memset(&zero, 0, sizeof(zero));
  EXPECT_EQ(bootstrapCreateTcp(zero, 0, 1, 2000, &b), moecommInvalidArgument);
  EXPECT_TRUE(contains(lastErrorText(), "magic")) << lastErrorText();

  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  EXPECT_EQ(bootstrapCreateTcp(id, 1, 1, 2000, &b), moecommInvalidArgument);
  EXPECT_EQ(bootstrapCreateTcp(id, 0, 0, 2000, &b), moecommInvalidArgument);
  moecommUniqueId stale = id;
  stale.internal[8] ^= 0x5a;  // the random tag
  const auto start = Clock::now();
  EXPECT_EQ(bootstrapCreateTcp(stale, 0, 1, 3000, &b), moecommInvalidUsage);
  EXPECT_TRUE(contains(lastErrorText(), "tag does not match")) << lastErrorText();
  EXPECT_LT(msSince(start), 2500);
  // The root is still waiting for the real rank.
  EXPECT_EQ(bootstrapCreateTcp(id, 0, 1, 3000, &b), moecommSuccess) << lastErrorText();
}

TEST_F(BootstrapTcp, OperationsCalledInDifferentOrdersAreInternalError) {
  moecommUniqueId id;
  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  runRanks(2, [&](int rank) {
    std::unique_ptr<Bootstrap> b;
    ASSERT_EQ(bootstrapCreateTcp(id, rank, 2, 5000, &b), moecommSuccess) << lastErrorText();
    int64_t word = rank;
    int64_t words[2];
    const moecommResult_t res = rank == 0 ? b->allgather(&word, words, sizeof(word)) : b->barrier();
    EXPECT_EQ(res, moecommInternalError);
    EXPECT_TRUE(contains(lastErrorText(), "different orders")) << lastErrorText();
    EXPECT_EQ(b->barrier(), moecommInternalError);
    EXPECT_TRUE(contains(lastErrorText(), "earlier bootstrap failure")) << lastErrorText();
  });

  ASSERT_EQ(bootstrapCreateUniqueId(&id), moecommSuccess) << lastErrorText();
  runRanks(2, [&](int rank) {
    std::unique_ptr<Bootstrap> b;
    ASSERT_EQ(bootstrapCreateTcp(id, rank, 2, 5000, &b), moecommSuccess) << lastErrorText();
    int64_t word = 42;
    if (rank == 0) {
      EXPECT_EQ(b->send(1, 1, &word, sizeof(word)), moecommSuccess) << lastErrorText();
    } else {
      EXPECT_EQ(b->recv(0, 2, &word, sizeof(word)), moecommInternalError);
      EXPECT_TRUE(contains(lastErrorText(), "expected a message with tag 2 of 8 bytes from rank 0 but received tag 1"))
          << lastErrorText();
    }
    EXPECT_EQ(b->send(rank, 3, &word, sizeof(word)), rank == 0 ? moecommSuccess : moecommInternalError);
    EXPECT_EQ(b->send(5, 3, &word, sizeof(word)), rank == 0 ? moecommInvalidArgument : moecommInternalError);
  });
}

// ---- In-process ---------------------------------------------------------------------------

class BootstrapInProcessSizes : public ::testing::TestWithParam<int> {};

TEST_P(BootstrapInProcessSizes, CollectivesAndPointToPoint) {
  const int nranks = GetParam();
  std::vector<std::unique_ptr<Bootstrap>> bootstraps;
  ASSERT_EQ(bootstrapCreateInProcess(nranks, 10000, &bootstraps), moecommSuccess) << lastErrorText();
  ASSERT_EQ(bootstraps.size(), static_cast<size_t>(nranks));
  runRanks(nranks, [&](int rank) {
    ASSERT_EQ(bootstraps[rank]->rank(), rank);
    exerciseCollectives(*bootstraps[rank]);
    exerciseP2p(*bootstraps[rank], 1u << 20);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, BootstrapInProcessSizes, ::testing::Values(1, 2, 3, 8));

TEST(BootstrapInProcess, TimeoutNamesTheMissingRank) {
  std::vector<std::unique_ptr<Bootstrap>> b;
  ASSERT_EQ(bootstrapCreateInProcess(3, 600, &b), moecommSuccess) << lastErrorText();
  const auto start = Clock::now();
  runRanks(2, [&](int rank) {  // rank 2 never joins
    int32_t word = rank, words[3];
    EXPECT_EQ(b[rank]->allgather(&word, words, sizeof(word)), moecommTimeout);
    EXPECT_TRUE(contains(lastErrorText(), "waited 600 ms for rank 2 during allgather")) << lastErrorText();
  });
  const int64_t elapsed = msSince(start);
  EXPECT_GE(elapsed, 550);
  EXPECT_LT(elapsed, 2500);
  // A late rank must not complete a round that the others gave up on.
  EXPECT_EQ(b[2]->barrier(), moecommTimeout);
  EXPECT_TRUE(contains(lastErrorText(), "earlier bootstrap failure")) << lastErrorText();

  int32_t word = 0;
  const auto recvStart = Clock::now();
  EXPECT_EQ(b[0]->recv(1, 5, &word, sizeof(word)), moecommTimeout);
  EXPECT_TRUE(contains(lastErrorText(), "for rank 1 during recv")) << lastErrorText();
  EXPECT_LT(msSince(recvStart), 2000);
}

TEST(BootstrapInProcess, AbortOnAnyRankUnblocksEveryRank) {
  std::vector<std::unique_ptr<Bootstrap>> b;
  ASSERT_EQ(bootstrapCreateInProcess(3, 20000, &b), moecommSuccess) << lastErrorText();
  Clock::time_point abortedAt;
  std::atomic<bool> abortSent{false};
  std::thread barrierWaiter([&] {
    EXPECT_EQ(b[0]->barrier(), moecommInvalidUsage);
    EXPECT_TRUE(contains(lastErrorText(), "aborted")) << lastErrorText();
    EXPECT_TRUE(abortSent.load());
    EXPECT_LT(msSince(abortedAt), 1000);
  });
  std::thread recvWaiter([&] {
    int32_t word;
    EXPECT_EQ(b[1]->recv(0, 1, &word, sizeof(word)), moecommInvalidUsage);
    EXPECT_TRUE(abortSent.load());
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  abortedAt = Clock::now();
  abortSent.store(true);
  b[2]->abort();
  barrierWaiter.join();
  recvWaiter.join();
  int32_t word = 1;
  EXPECT_EQ(b[1]->send(0, 1, &word, sizeof(word)), moecommInvalidUsage);
  EXPECT_EQ(b[2]->allgather(&word, &word, 0), moecommInvalidUsage);
}

TEST(BootstrapInProcess, MismatchesAreInternalError) {
  std::vector<std::unique_ptr<Bootstrap>> b;
  ASSERT_EQ(bootstrapCreateInProcess(2, 5000, &b), moecommSuccess) << lastErrorText();
  int64_t word = 7;
  EXPECT_EQ(b[0]->send(1, 1, &word, sizeof(word)), moecommSuccess);
  EXPECT_EQ(b[1]->recv(0, 2, &word, sizeof(word)), moecommInternalError);
  EXPECT_TRUE(contains(lastErrorText(), "tag 2 of 8 bytes from rank 0 but received tag 1")) << lastErrorText();
  EXPECT_EQ(b[1]->recv(0, 1, &word, 4), moecommInternalError);
  EXPECT_EQ(b[1]->recv(0, 1, &word, sizeof(word)), moecommSuccess);  // the message stayed queued
  EXPECT_EQ(word, 7);
  EXPECT_EQ(b[0]->recv(0, 1, &word, sizeof(word)), moecommInvalidUsage);  // nothing from itself pending
  EXPECT_EQ(b[0]->send(2, 1, &word, sizeof(word)), moecommInvalidArgument);

  runRanks(2, [&](int rank) {
    int64_t words[8] = {0};
    EXPECT_EQ(b[rank]->allgather(words, words + 2, rank == 0 ? 8 : 16), moecommInternalError);
    EXPECT_TRUE(contains(lastErrorText(), "same size")) << lastErrorText();
  });
}

// ---- External -----------------------------------------------------------------------------

int forwardAllgather(void* ctx, const void* send, void* recv, size_t bytes) {
  return static_cast<Bootstrap*>(ctx)->allgather(send, recv, bytes) == moecommSuccess ? 0 : 1;
}
int forwardBarrier(void* ctx) { return static_cast<Bootstrap*>(ctx)->barrier() == moecommSuccess ? 0 : 1; }

TEST(BootstrapExternal, CollectivesThroughCallbacks) {
  constexpr int kRanks = 3;
  std::vector<std::unique_ptr<Bootstrap>> inner;
  ASSERT_EQ(bootstrapCreateInProcess(kRanks, 10000, &inner), moecommSuccess) << lastErrorText();
  std::vector<std::unique_ptr<Bootstrap>> outer(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    moecommExternalBootstrap_t callbacks = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
    callbacks.allgather = forwardAllgather;
    callbacks.barrier = forwardBarrier;
    callbacks.ctx = inner[r].get();
    ASSERT_EQ(bootstrapCreateExternal(callbacks, r, kRanks, &outer[r]), moecommSuccess) << lastErrorText();
  }
  runRanks(kRanks, [&](int rank) { exerciseCollectives(*outer[rank]); });
  int32_t word = 0;
  EXPECT_EQ(outer[0]->send(1, 0, &word, sizeof(word)), moecommNotSupported);
  EXPECT_TRUE(contains(lastErrorText(), "moecommCommInitExternal")) << lastErrorText();
  EXPECT_EQ(outer[1]->recv(0, 0, &word, sizeof(word)), moecommNotSupported);
}

// A one-rank allgather that refuses a send buffer inside the receive buffer, as MPI does.
int strictAllgather(void* ctx, const void* send, void* recv, size_t bytes) {
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  if (s < r + bytes && r < s + bytes) return 9;
  std::memcpy(recv, send, bytes);
  return *static_cast<int*>(ctx);
}
int failingBarrier(void* ctx) { return *static_cast<int*>(ctx) == 0 ? 0 : -1; }

TEST(BootstrapExternal, CallbackFailureIsRemoteError) {
  int result = 0;
  moecommExternalBootstrap_t callbacks = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  callbacks.allgather = strictAllgather;
  callbacks.barrier = failingBarrier;
  callbacks.ctx = &result;
  std::unique_ptr<Bootstrap> b;
  ASSERT_EQ(bootstrapCreateExternal(callbacks, 0, 1, &b), moecommSuccess) << lastErrorText();
  int32_t word = 5;
  EXPECT_EQ(b->allgather(&word, &word, sizeof(word)), moecommSuccess) << lastErrorText();  // in place, copied first
  EXPECT_EQ(word, 5);
  EXPECT_EQ(b->barrier(), moecommSuccess);

  result = 5;
  EXPECT_EQ(b->allgather(&word, &word, sizeof(word)), moecommRemoteError);
  EXPECT_TRUE(contains(lastErrorText(), "the external allgather callback returned 5")) << lastErrorText();
  EXPECT_EQ(b->barrier(), moecommRemoteError);
  EXPECT_TRUE(contains(lastErrorText(), "the external barrier callback returned -1")) << lastErrorText();

  b->abort();
  result = 0;
  EXPECT_EQ(b->barrier(), moecommInvalidUsage);
  EXPECT_EQ(b->allgather(&word, &word, sizeof(word)), moecommInvalidUsage);
}

TEST(BootstrapExternal, MissingCallbacksAreInvalidArgument) {
  moecommExternalBootstrap_t callbacks = MOECOMM_EXTERNAL_BOOTSTRAP_INIT;
  std::unique_ptr<Bootstrap> b;
  EXPECT_EQ(bootstrapCreateExternal(callbacks, 0, 1, &b), moecommInvalidArgument);
  callbacks.allgather = strictAllgather;
  EXPECT_EQ(bootstrapCreateExternal(callbacks, 0, 1, &b), moecommInvalidArgument);
  callbacks.barrier = failingBarrier;
  EXPECT_EQ(bootstrapCreateExternal(callbacks, 1, 1, &b), moecommInvalidArgument);
}

// ---- moecomm-run --------------------------------------------------------------------------

struct CommandResult {
  int exitCode = -1;
  std::string output;  // stdout and stderr together
  int64_t elapsedMs = 0;
};

// MOECOMM_BINARY_DIR/tools/moecomm-run, else ../tools/moecomm-run next to this test binary
// (build/tests/...), or "" when neither exists.
std::string launcherPath() {
  std::vector<std::string> candidates;
  if (const char* dir = std::getenv("MOECOMM_BINARY_DIR"))
    candidates.push_back(std::string(dir) + "/tools/moecomm-run");
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    std::string path(self, static_cast<size_t>(n));
    path = path.substr(0, path.rfind('/'));
    candidates.push_back(path.substr(0, path.rfind('/')) + "/tools/moecomm-run");
  }
  for (const std::string& path : candidates) {
    if (access(path.c_str(), X_OK) == 0) return path;
  }
  return "";
}

CommandResult runCommand(const std::string& command) {
  CommandResult result;
  const auto start = Clock::now();
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.elapsedMs = msSince(start);
  return result;
}

class MoecommRun : public ::testing::Test {
 protected:
  void SetUp() override {
    launcher_ = launcherPath();
    if (launcher_.empty()) GTEST_SKIP() << "moecomm-run not found (MOECOMM_BINARY_DIR unset or tool not built)";
  }
  // Every job gets a time limit so a broken launcher fails the test instead of hanging it.
  CommandResult run(const std::string& args) { return runCommand("timeout -s KILL 60 " + launcher_ + " " + args); }
  std::string launcher_;
};

TEST_F(MoecommRun, PrefixesOutputAndSetsEnvironment) {
  const CommandResult r =
      run("-n 3 sh -c 'echo \"out $MOECOMM_RANK/$MOECOMM_NRANKS/$MOECOMM_LOCAL_RANK ${#MOECOMM_UNIQUE_ID}\"; "
          "echo err >&2; printf partial'");
  EXPECT_EQ(r.exitCode, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string prefix = "[rank " + std::to_string(rank) + "] ";
    EXPECT_TRUE(contains(r.output, prefix + "out " + std::to_string(rank) + "/3/" + std::to_string(rank) + " 256\n"))
        << r.output;
    EXPECT_TRUE(contains(r.output, prefix + "err\n")) << r.output;
    EXPECT_TRUE(contains(r.output, prefix + "partial\n")) << r.output;
  }
}

TEST_F(MoecommRun, FailingRankStopsTheOthers) {
  const CommandResult r = run("-n 3 sh -c 'if [ $MOECOMM_RANK = 1 ]; then exit 3; fi; sleep 30'");
  EXPECT_EQ(r.exitCode, 3) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 1")) << r.output;
  EXPECT_LT(r.elapsedMs, 10000);
}

TEST_F(MoecommRun, RankKilledBySignalGives128PlusSignal) {
  const CommandResult r = run("-n 2 sh -c 'if [ $MOECOMM_RANK = 0 ]; then kill -KILL $$; fi; sleep 30'");
  EXPECT_EQ(r.exitCode, 128 + SIGKILL) << r.output;
  EXPECT_LT(r.elapsedMs, 10000);
}

// --allow-kill: a test that kills a rank on purpose. Its SIGKILL is not a failure; the others
// finish and decide the exit code.
TEST_F(MoecommRun, AllowedKillLetsTheOthersFinish) {
  const CommandResult r = run(
      "-n 3 --allow-kill 2 sh -c 'if [ $MOECOMM_RANK = 2 ]; then kill -KILL $$; fi; sleep 1; echo done $MOECOMM_RANK'");
  EXPECT_EQ(r.exitCode, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 0] done 0")) << r.output;
  EXPECT_TRUE(contains(r.output, "[rank 1] done 1")) << r.output;
  EXPECT_TRUE(contains(r.output, "as --allow-kill 2 expects")) << r.output;
  // A survivor's failure still counts.
  const CommandResult failing =
      run("-n 2 --allow-kill 1 sh -c 'if [ $MOECOMM_RANK = 1 ]; then kill -KILL $$; fi; sleep 0.5; exit 5'");
  EXPECT_EQ(failing.exitCode, 5) << failing.output;
}

TEST_F(MoecommRun, AllowedKillCoversOnlyThatRankAndSigkill) {
  // Another rank killed: a failure as usual.
  const CommandResult other =
      run("-n 2 --allow-kill 1 sh -c 'if [ $MOECOMM_RANK = 0 ]; then kill -KILL $$; fi; sleep 30'");
  EXPECT_EQ(other.exitCode, 128 + SIGKILL) << other.output;
  EXPECT_LT(other.elapsedMs, 10000);
  // The allowed rank dying of another signal, or exiting non-zero: failures too.
  const CommandResult signal =
      run("-n 2 --allow-kill 1 sh -c 'if [ $MOECOMM_RANK = 1 ]; then kill -SEGV $$; fi; sleep 30'");
  EXPECT_EQ(signal.exitCode, 128 + SIGSEGV) << signal.output;
  const CommandResult exited = run("-n 2 --allow-kill 1 sh -c 'if [ $MOECOMM_RANK = 1 ]; then exit 6; fi; sleep 30'");
  EXPECT_EQ(exited.exitCode, 6) << exited.output;
  // The allowed rank exiting 0 is fine.
  EXPECT_EQ(run("-n 2 --allow-kill 1 true").exitCode, 0);
}

TEST_F(MoecommRun, RankIgnoringSigtermIsKilledAfterGracePeriod) {
  // Rank 0 fails only once rank 1 has had time to install its trap.
  const CommandResult r =
      run("-n 2 sh -c 'if [ $MOECOMM_RANK = 0 ]; then sleep 0.5; exit 4; fi; trap \"\" TERM; sleep 30'");
  EXPECT_EQ(r.exitCode, 4) << r.output;
  EXPECT_GE(r.elapsedMs, 4500);
  EXPECT_LT(r.elapsedMs, 15000);
}

TEST_F(MoecommRun, GlobalTimeoutExits124) {
  const CommandResult r = run("-n 2 -t 1 sleep 30");
  EXPECT_EQ(r.exitCode, 124) << r.output;
  EXPECT_LT(r.elapsedMs, 6000);
}

TEST_F(MoecommRun, BadUsageExits2) {
  for (const char* args : {"", "-n 0 true", "-n 2", "-x -n 2 true", "-n two true", "-n 2 -t -1 true", "-t 5 true",
                           "-n 2 --allow-kill 2 true", "-n 2 --allow-kill x true", "-n 2 --allow-kill"}) {
    const CommandResult r = run(args);
    EXPECT_EQ(r.exitCode, 2) << "args '" << args << "': " << r.output;
    EXPECT_TRUE(contains(r.output, "usage:")) << r.output;
  }
}

TEST_F(MoecommRun, ProgramThatCannotStartFails) {
  const CommandResult r = run("-n 2 /nonexistent/moecomm-test-program");
  EXPECT_EQ(r.exitCode, 127) << r.output;
  EXPECT_TRUE(contains(r.output, "could not execute")) << r.output;
}

// Real processes meeting through the launcher's rendezvous root: this test binary runs
// itself as every rank, where BootstrapChild.ExchangeThroughLauncher does the work.
TEST_F(MoecommRun, RanksRendezvousThroughTheLauncher) {
  const CommandResult r =
      run("-n 4 /proc/" + std::to_string(getpid()) + "/exe --gtest_filter=BootstrapChild.ExchangeThroughLauncher");
  EXPECT_EQ(r.exitCode, 0) << r.output;
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_TRUE(contains(r.output, "[rank " + std::to_string(rank) + "] bootstrap child ok")) << r.output;
  }
}

TEST(BootstrapChild, ExchangeThroughLauncher) {
  const char* idText = std::getenv("MOECOMM_UNIQUE_ID");
  if (idText == nullptr) GTEST_SKIP() << "runs only as a rank of MoecommRun.RanksRendezvousThroughTheLauncher";
  const int rank = std::atoi(std::getenv("MOECOMM_RANK"));
  const int nranks = std::atoi(std::getenv("MOECOMM_NRANKS"));
  moecommUniqueId id;
  ASSERT_EQ(moecommUniqueIdFromString(idText, &id), moecommSuccess) << moecommGetLastError(nullptr);
  std::unique_ptr<Bootstrap> b;
  ASSERT_EQ(bootstrapCreateTcp(id, rank, nranks, 20000, &b), moecommSuccess) << lastErrorText();
  exerciseCollectives(*b);
  exerciseP2p(*b, 1u << 20);
  ASSERT_EQ(b->barrier(), moecommSuccess) << lastErrorText();
  if (!::testing::Test::HasFailure()) std::printf("bootstrap child ok\n");
}

}  // namespace
}  // namespace moecomm
