// TCP bootstrap: a rendezvous root hands out the ranks' listen addresses, then the ranks
// build a full mesh of connections and run every collective over it.
//
// Rendezvous (root thread, started by bootstrapCreateUniqueId):
//   rank -> root  RegisterMsg {tag, rank, nranks, listen address}
//   root -> rank  RootReply {status, text bytes} + text (error) or nranks addresses (success)
// The first rank with the right tag fixes nranks. A later rank that disagrees (nranks, an
// out-of-range or repeated rank) means the job is misconfigured: every rank that came or
// comes before the root's deadline is told why, instead of waiting for the timeout.
// A wrong tag is a stray (a stale id, another job): only that connection is refused.
//
// Mesh: rank i connects to every j < i and sends Hello {tag, i, j}; it accepts one valid
// Hello from every j > i and answers HelloAck. Sends never wait for an answer before all
// connections are made, so no rank waits on another that is itself waiting.
//
// Messages: every message starts with MsgHeader {kind, tag or collective number, bytes}, so a
// rank that calls operations in a different order than its peer gets InternalError with a
// sentence, never silently wrong data. Collectives multiplex all peers with poll(): every
// rank sends its piece to all peers while receiving theirs, so large pieces cannot deadlock
// on full socket buffers.
//
// Wire structs are sent in host byte order: the ranks of one job share it, and the magic
// check turns away anything else.
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/bootstrap.h"
#include "core/error.h"
#include "core/log.h"
#include "core/socket.h"

namespace moecomm {
namespace {

constexpr uint32_t kIdMagic = 0x6d634964u;  // "mcId"
constexpr uint32_t kIdVersion = 1;
constexpr uint32_t kWireMagic = 0x6d635762u;  // "mcWb"
constexpr uint32_t kWireVersion = 1;
// How long the root or a rank waits for the first message of a fresh connection before
// dropping it as a stray; legitimate peers send it right after connecting.
constexpr int64_t kFirstMessageMs = 2000;
constexpr size_t kMaxReplyText = 512;

struct RegisterMsg {
  uint32_t magic;
  uint32_t version;
  uint64_t tag;
  int32_t rank;
  int32_t nranks;
  EncodedAddress address;
};

struct RootReply {
  uint32_t magic;
  int32_t status;  // moecommResult_t
  uint32_t textBytes;
  uint32_t reserved;
};

struct Hello {
  uint32_t magic;
  uint32_t version;
  uint64_t tag;
  int32_t fromRank;
  int32_t toRank;
};

struct HelloAck {
  uint32_t magic;
  int32_t rank;
  uint64_t tag;
};

enum MsgKind : uint32_t { kMsgAllgather = 1, kMsgBarrier = 2, kMsgP2p = 3 };

struct MsgHeader {
  uint32_t magic;
  uint32_t kind;
  int64_t tag;  // p2p: the user's tag; collectives: the collective's sequence number
  uint64_t bytes;
};

static_assert(std::is_trivially_copyable<RegisterMsg>::value && sizeof(RegisterMsg) == 56, "wire layout");
static_assert(sizeof(RootReply) == 16 && sizeof(Hello) == 24 && sizeof(HelloAck) == 16, "wire layout");
static_assert(sizeof(MsgHeader) == 24, "wire layout");

const char* kindName(uint32_t kind) {
  switch (kind) {
    case kMsgAllgather:
      return "an allgather";
    case kMsgBarrier:
      return "a barrier";
    case kMsgP2p:
      return "a point-to-point message";
    default:
      return "an unknown message";
  }
}

// ---- Unique id --------------------------------------------------------------------------
// Layout (big-endian): [0,4) magic, [4,8) version, [8,16) tag, [16,48) root address.

void putBe(uint8_t* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(v >> (8 * (bytes - 1 - i)));
}
uint64_t getBe(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | p[i];
  return v;
}

void encodeId(uint64_t tag, const SocketAddress& root, moecommUniqueId* id) {
  std::memset(id->internal, 0, sizeof(id->internal));
  auto* p = reinterpret_cast<uint8_t*>(id->internal);
  putBe(p, kIdMagic, 4);
  putBe(p + 4, kIdVersion, 4);
  putBe(p + 8, tag, 8);
  EncodedAddress address;
  encodeAddress(root, &address);
  std::memcpy(p + 16, address.bytes, sizeof(address.bytes));
}

moecommResult_t decodeId(const moecommUniqueId& id, uint64_t* tag, SocketAddress* root) {
  const auto* p = reinterpret_cast<const uint8_t*>(id.internal);
  MC_REQUIRE(getBe(p, 4) == kIdMagic, moecommInvalidArgument,
             "the unique id was not made by moecommGetUniqueId (bad magic); pass every rank the same id");
  MC_REQUIRE(getBe(p + 4, 4) == kIdVersion, moecommInvalidArgument,
             "the unique id has version %u but this library reads version %u; use one libmoecomm version everywhere",
             static_cast<unsigned>(getBe(p + 4, 4)), kIdVersion);
  *tag = getBe(p + 8, 8);
  EncodedAddress address;
  std::memcpy(address.bytes, p + 16, sizeof(address.bytes));
  MC_CHECK(decodeAddress(address, root));
  return moecommSuccess;
}

uint64_t randomTag() {
  uint64_t tag = 0;
  if (getrandom(&tag, sizeof(tag), 0) == static_cast<ssize_t>(sizeof(tag))) return tag;
  // No entropy source: still make ids of concurrent jobs on this host differ.
  static std::atomic<uint64_t> counter{0};
  tag = static_cast<uint64_t>(SteadyClock::now().time_since_epoch().count());
  tag ^= static_cast<uint64_t>(getpid()) << 32;
  tag ^= (counter.fetch_add(1) + 1) * 0x9e3779b97f4a7c15ull;
  return tag;
}

// ---- Rendezvous root --------------------------------------------------------------------

struct RootJob {
  Socket listener;
  uint64_t tag = 0;
  int64_t timeoutMs = 0;
  Deadline deadline;
  std::string address;
};

// Best effort: the rank may be gone, and the root has nobody to report to but the log.
void sendReply(const Socket& conn, moecommResult_t status, const std::string& text, Deadline deadline) {
  RootReply reply{kWireMagic, static_cast<int32_t>(status), static_cast<uint32_t>(std::min(text.size(), kMaxReplyText)),
                  0};
  if (socketSendAll(conn, &reply, sizeof(reply), deadline, nullptr) != moecommSuccess ||
      socketSendAll(conn, text.data(), reply.textBytes, deadline, nullptr) != moecommSuccess) {
    MC_WARN(kLogBootstrap, "rendezvous root could not send its reply to a rank: %s", lastErrorText());
  }
}

// Reads one registration. Returns false (and closes nothing: the caller drops conn) for a
// connection that is not a moecomm rank at all.
bool readRegistration(const Socket& conn, Deadline rootDeadline, RegisterMsg* msg) {
  const Deadline deadline = std::min(rootDeadline, deadlineAfterMs(kFirstMessageMs));
  if (socketRecvAll(conn, msg, sizeof(*msg), deadline, nullptr) != moecommSuccess) {
    MC_WARN(kLogBootstrap, "rendezvous root dropped a connection that sent no registration: %s", lastErrorText());
    return false;
  }
  if (msg->magic != kWireMagic || msg->version != kWireVersion) {
    MC_WARN(kLogBootstrap, "rendezvous root dropped a connection with a foreign header (magic 0x%08x)", msg->magic);
    return false;
  }
  return true;
}

// After a misconfiguration: tell every later arrival the same thing until the deadline.
void answerUntilDeadline(RootJob& job, moecommResult_t code, const std::string& text) {
  for (;;) {
    Socket conn;
    if (socketAccept(job.listener, job.deadline, nullptr, &conn) != moecommSuccess) return;
    RegisterMsg msg;
    if (readRegistration(conn, job.deadline, &msg)) sendReply(conn, code, text, deadlineAfterMs(kFirstMessageMs));
  }
}

void runRoot(RootJob& job) {
  int nranks = -1;
  int firstRank = -1;
  int arrived = 0;
  std::vector<Socket> conns;
  std::vector<EncodedAddress> table;
  std::string problem;
  while (nranks < 0 || arrived < nranks) {
    Socket conn;
    moecommResult_t res = socketAccept(job.listener, job.deadline, nullptr, &conn);
    if (res == moecommTimeout) break;
    if (res != moecommSuccess) {
      problem = std::string("the rendezvous root could not accept connections: ") + lastErrorText();
      break;
    }
    RegisterMsg msg;
    if (!readRegistration(conn, job.deadline, &msg)) continue;
    if (msg.tag != job.tag) {
      sendReply(conn, moecommInvalidUsage,
                "the unique id's tag does not match the rendezvous root listening at " + job.address +
                    " (an id from another or an earlier job?)",
                deadlineAfterMs(kFirstMessageMs));
      continue;
    }
    char text[kMaxReplyText];
    if (msg.nranks < 1) {
      // Cannot come from bootstrapCreateTcp, which checks its arguments; refuse only this one.
      sendReply(conn, moecommInvalidUsage, "nranks must be at least 1", deadlineAfterMs(kFirstMessageMs));
      continue;
    }
    if (nranks < 0) {
      nranks = msg.nranks;
      firstRank = msg.rank;
      conns.resize(nranks);
      table.resize(nranks);
    }
    if (msg.nranks != nranks) {
      std::snprintf(text, sizeof(text),
                    "rank %d joined with nranks=%d but rank %d joined with nranks=%d; every rank "
                    "must pass the same nranks",
                    msg.rank, msg.nranks, firstRank, nranks);
    } else if (msg.rank < 0 || msg.rank >= nranks) {
      std::snprintf(text, sizeof(text), "a rank joined as rank %d, outside 0..%d", msg.rank, nranks - 1);
    } else if (conns[msg.rank].valid()) {
      std::snprintf(text, sizeof(text), "rank %d joined twice; every rank number must be used exactly once", msg.rank);
    } else {
      conns[msg.rank] = std::move(conn);
      table[msg.rank] = msg.address;
      ++arrived;
      MC_TRACE(kLogBootstrap, "rendezvous root at %s: rank %d of %d arrived", job.address.c_str(), msg.rank, nranks);
      continue;
    }
    problem = text;
    sendReply(conn, moecommInvalidUsage, problem, deadlineAfterMs(kFirstMessageMs));
    break;
  }

  if (problem.empty() && arrived < nranks) {
    std::string missing;
    for (int r = 0; r < nranks; ++r) {
      if (!conns[r].valid()) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    }
    problem = "only " + std::to_string(arrived) + " of " + std::to_string(nranks) +
              " ranks reached the rendezvous root within " + std::to_string(job.timeoutMs) +
              " ms (missing: " + missing + ")";
    for (const Socket& c : conns) {
      if (c.valid()) sendReply(c, moecommTimeout, problem, deadlineAfterMs(kFirstMessageMs));
    }
    MC_WARN(kLogBootstrap, "rendezvous root at %s gives up: %s", job.address.c_str(), problem.c_str());
    return;
  }
  if (!problem.empty()) {
    MC_WARN(kLogBootstrap, "rendezvous root at %s: %s", job.address.c_str(), problem.c_str());
    for (const Socket& c : conns) {
      if (c.valid()) sendReply(c, moecommInvalidUsage, problem, deadlineAfterMs(kFirstMessageMs));
    }
    conns.clear();
    answerUntilDeadline(job, moecommInvalidUsage, problem);
    return;
  }
  if (nranks < 0) return;  // nobody came

  // Everyone is here. Each send has its own bound so one dead rank does not starve the rest.
  job.listener.reset();
  for (int r = 0; r < nranks; ++r) {
    const Deadline deadline = deadlineAfterMs(job.timeoutMs);
    RootReply reply{kWireMagic, moecommSuccess, 0, 0};
    if (socketSendAll(conns[r], &reply, sizeof(reply), deadline, nullptr) != moecommSuccess ||
        socketSendAll(conns[r], table.data(), table.size() * sizeof(EncodedAddress), deadline, nullptr) !=
            moecommSuccess) {
      MC_WARN(kLogBootstrap, "rendezvous root could not send the address table to rank %d: %s", r, lastErrorText());
    }
  }
  MC_INFO(kLogBootstrap, "rendezvous root at %s: all %d ranks arrived", job.address.c_str(), nranks);
}

void rootThreadMain(RootJob job) noexcept {
  // Nothing may escape a detached thread (it would terminate the process).
  try {
    runRoot(job);
  } catch (const std::exception& e) {
    MC_WARN(kLogBootstrap, "rendezvous root at %s stopped: %s", job.address.c_str(), e.what());
  } catch (...) {
    MC_WARN(kLogBootstrap, "rendezvous root at %s stopped by an unknown exception", job.address.c_str());
  }
}

// ---- The per-rank bootstrap -------------------------------------------------------------

class TcpBootstrap final : public Bootstrap {
 public:
  TcpBootstrap(int rank, int nranks, uint64_t tag, int64_t timeoutMs)
      : Bootstrap(rank, nranks), tag_(tag), timeoutMs_(timeoutMs), peers_(nranks) {}

  moecommResult_t establish(const SocketAddress& root);

  moecommResult_t allgather(const void* send, void* recv, size_t bytes) override;
  moecommResult_t barrier() override;
  moecommResult_t send(int peer, int tag, const void* data, size_t bytes) override;
  moecommResult_t recv(int peer, int tag, void* data, size_t bytes) override;
  void abort() override { aborted_.store(true, std::memory_order_release); }

 private:
  // One direction of one message with one peer, advanced by progress().
  struct Transfer {
    int peer;
    bool isSend;
    MsgHeader header;  // sent, or expected
    char* data;        // payload source or destination
    MsgHeader received{};
    size_t done = 0;  // bytes moved, header included
    bool complete = false;
  };

  moecommResult_t usable(const char* op);
  moecommResult_t fail(moecommResult_t code);
  moecommResult_t progress(std::vector<Transfer>& transfers, const char* op);
  moecommResult_t step(Transfer& t, const char* op);
  moecommResult_t checkHeader(const Transfer& t, const char* op);
  moecommResult_t registerWithRoot(const SocketAddress& root, const SocketAddress& bound,
                                   std::vector<SocketAddress>* table);
  moecommResult_t buildMesh(const Socket& listener, const std::vector<SocketAddress>& table);
  moecommResult_t acceptPeers(const Socket& listener, Deadline deadline);

  const uint64_t tag_;
  const int64_t timeoutMs_;
  std::vector<Socket> peers_;
  std::atomic<bool> aborted_{false};
  int64_t collectiveSequence_ = 0;
  moecommResult_t broken_ = moecommSuccess;
  std::string brokenText_;
  std::deque<std::pair<int, std::vector<char>>> selfMessages_;
};

moecommResult_t TcpBootstrap::usable(const char* op) {
  MC_REQUIRE(!aborted_.load(std::memory_order_acquire), moecommInvalidUsage,
             "rank %d: the bootstrap was aborted; %s is not possible any more", rank(), op);
  MC_REQUIRE(broken_ == moecommSuccess, broken_, "rank %d: %s is not possible after an earlier bootstrap failure: %s",
             rank(), op, brokenText_.c_str());
  return moecommSuccess;
}

// Connections may hold half a message after a failure: refuse every later operation.
moecommResult_t TcpBootstrap::fail(moecommResult_t code) {
  if (broken_ == moecommSuccess) {
    broken_ = code;
    brokenText_ = lastErrorText();
  }
  return code;
}

moecommResult_t TcpBootstrap::checkHeader(const Transfer& t, const char* op) {
  const MsgHeader& got = t.received;
  const MsgHeader& want = t.header;
  MC_REQUIRE(got.magic == kWireMagic, moecommInternalError,
             "rank %d received a corrupt message header from rank %d during %s", rank(), t.peer, op);
  MC_REQUIRE(got.kind == want.kind, moecommInternalError,
             "rank %d expected %s from rank %d but received %s; the ranks called bootstrap operations in different "
             "orders",
             rank(), kindName(want.kind), t.peer, kindName(got.kind));
  if (want.kind == kMsgP2p) {
    MC_REQUIRE(got.tag == want.tag && got.bytes == want.bytes, moecommInternalError,
               "rank %d expected a message with tag %lld of %llu bytes from rank %d but received tag %lld of %llu "
               "bytes; sends and receives must match in order",
               rank(), static_cast<long long>(want.tag), static_cast<unsigned long long>(want.bytes), t.peer,
               static_cast<long long>(got.tag), static_cast<unsigned long long>(got.bytes));
    return moecommSuccess;
  }
  MC_REQUIRE(got.tag == want.tag, moecommInternalError,
             "rank %d is at bootstrap collective #%lld but rank %d sent collective #%lld during %s", rank(),
             static_cast<long long>(want.tag), t.peer, static_cast<long long>(got.tag), op);
  MC_REQUIRE(got.bytes == want.bytes, moecommInternalError,
             "rank %d contributes %llu bytes to %s but rank %d contributed %llu; every rank must pass the same size",
             rank(), static_cast<unsigned long long>(want.bytes), op, t.peer,
             static_cast<unsigned long long>(got.bytes));
  return moecommSuccess;
}

// Moves as many bytes of `t` as the socket takes without blocking.
moecommResult_t TcpBootstrap::step(Transfer& t, const char* op) {
  const Socket& sock = peers_[t.peer];
  const size_t total = sizeof(MsgHeader) + t.header.bytes;
  for (;;) {
    if (t.done == total) {
      t.complete = true;
      return moecommSuccess;
    }
    size_t n = 0;
    moecommResult_t res;
    if (t.isSend) {
      res =
          t.done < sizeof(MsgHeader)
              ? socketSendSome(sock, reinterpret_cast<const char*>(&t.header) + t.done, sizeof(MsgHeader) - t.done, &n)
              : socketSendSome(sock, t.data + (t.done - sizeof(MsgHeader)), total - t.done, &n);
    } else {
      res = t.done < sizeof(MsgHeader)
                ? socketRecvSome(sock, reinterpret_cast<char*>(&t.received) + t.done, sizeof(MsgHeader) - t.done, &n)
                : socketRecvSome(sock, t.data + (t.done - sizeof(MsgHeader)), total - t.done, &n);
    }
    if (res == moecommRemoteError) {
      const std::string detail = lastErrorText();
      return setError(moecommRemoteError, "rank %d lost connection to rank %d during %s (%s)", rank(), t.peer, op,
                      detail.c_str());
    }
    if (res != moecommSuccess) {
      const std::string detail = lastErrorText();
      return setError(res, "rank %d could not talk to rank %d during %s: %s", rank(), t.peer, op, detail.c_str());
    }
    if (n == 0) return moecommSuccess;  // would block
    const bool headerJustDone = !t.isSend && t.done < sizeof(MsgHeader) && t.done + n >= sizeof(MsgHeader);
    t.done += n;
    if (headerJustDone) MC_CHECK(checkHeader(t, op));
  }
}

moecommResult_t TcpBootstrap::progress(std::vector<Transfer>& transfers, const char* op) {
  const Deadline deadline = deadlineAfterMs(timeoutMs_);
  std::vector<pollfd> pollfds;
  std::vector<Transfer*> polled;
  bool firstPass = true;
  for (;;) {
    // Only sockets that poll() flagged are touched again, so a wake-up costs one syscall per
    // ready peer rather than one per peer.
    for (size_t i = 0; i < polled.size(); ++i) {
      if (pollfds[i].revents != 0) MC_CHECK(step(*polled[i], op));
    }
    pollfds.clear();
    polled.clear();
    for (Transfer& t : transfers) {
      if (firstPass) MC_CHECK(step(t, op));
      if (t.complete) continue;
      pollfds.push_back(pollfd{peers_[t.peer].fd(), static_cast<short>(t.isSend ? POLLOUT : POLLIN), 0});
      polled.push_back(&t);
    }
    firstPass = false;
    if (polled.empty()) return moecommSuccess;
    MC_REQUIRE(!aborted_.load(std::memory_order_acquire), moecommInvalidUsage,
               "rank %d: the bootstrap was aborted during %s", rank(), op);
    const int64_t left = msUntil(deadline);
    if (left == 0) {
      std::vector<bool> named(nranks(), false);
      named[polled[0]->peer] = true;
      std::string others;
      for (const Transfer* t : polled) {
        if (named[t->peer]) continue;
        named[t->peer] = true;
        others += (others.empty() ? "" : ", ") + std::to_string(t->peer);
      }
      return setError(moecommTimeout, "rank %d waited %lld ms for rank %d during %s%s%s%s", rank(),
                      static_cast<long long>(timeoutMs_), polled[0]->peer, op, others.empty() ? "" : " (and for ranks ",
                      others.c_str(), others.empty() ? "" : ")");
    }
    const int rc = poll(pollfds.data(), pollfds.size(), static_cast<int>(std::min<int64_t>(left, kSocketPollSliceMs)));
    if (rc < 0) {
      const int err = errno;
      if (err != EINTR)
        return setError(moecommSystemError, "rank %d: poll() failed during %s: %s", rank(), op, std::strerror(err));
      for (pollfd& p : pollfds) p.revents = 0;
    }
  }
}

moecommResult_t TcpBootstrap::allgather(const void* send, void* recv, size_t bytes) {
  MC_CHECK(usable("allgather"));
  MC_REQUIRE(bytes == 0 || (send != nullptr && recv != nullptr), moecommInvalidArgument,
             "rank %d: allgather of %zu bytes with a NULL buffer", rank(), bytes);
  char* out = static_cast<char*>(recv);
  if (bytes > 0 && out + rank() * bytes != send) std::memmove(out + rank() * bytes, send, bytes);
  const MsgHeader header{kWireMagic, kMsgAllgather, collectiveSequence_++, bytes};
  std::vector<Transfer> transfers;
  transfers.reserve(2 * nranks());
  for (int peer = 0; peer < nranks(); ++peer) {
    if (peer == rank()) continue;
    transfers.push_back(Transfer{peer, true, header, const_cast<char*>(static_cast<const char*>(send))});
    transfers.push_back(Transfer{peer, false, header, out + peer * bytes});
  }
  const moecommResult_t res = progress(transfers, "allgather");
  return res == moecommSuccess ? res : fail(res);
}

moecommResult_t TcpBootstrap::barrier() {
  MC_CHECK(usable("barrier"));
  const MsgHeader header{kWireMagic, kMsgBarrier, collectiveSequence_++, 0};
  std::vector<Transfer> transfers;
  transfers.reserve(2 * nranks());
  for (int peer = 0; peer < nranks(); ++peer) {
    if (peer == rank()) continue;
    transfers.push_back(Transfer{peer, true, header, nullptr});
    transfers.push_back(Transfer{peer, false, header, nullptr});
  }
  const moecommResult_t res = progress(transfers, "barrier");
  return res == moecommSuccess ? res : fail(res);
}

moecommResult_t TcpBootstrap::send(int peer, int tag, const void* data, size_t bytes) {
  MC_CHECK(usable("send"));
  MC_REQUIRE(peer >= 0 && peer < nranks(), moecommInvalidArgument, "rank %d: send to rank %d, outside 0..%d", rank(),
             peer, nranks() - 1);
  MC_REQUIRE(bytes == 0 || data != nullptr, moecommInvalidArgument, "rank %d: send of %zu bytes from NULL", rank(),
             bytes);
  if (peer == rank()) {
    const char* p = static_cast<const char*>(data);
    selfMessages_.emplace_back(tag, std::vector<char>(p, p + bytes));
    return moecommSuccess;
  }
  std::vector<Transfer> transfers{Transfer{peer, true, MsgHeader{kWireMagic, kMsgP2p, tag, bytes},
                                           const_cast<char*>(static_cast<const char*>(data))}};
  const moecommResult_t res = progress(transfers, "send");
  return res == moecommSuccess ? res : fail(res);
}

moecommResult_t TcpBootstrap::recv(int peer, int tag, void* data, size_t bytes) {
  MC_CHECK(usable("recv"));
  MC_REQUIRE(peer >= 0 && peer < nranks(), moecommInvalidArgument, "rank %d: recv from rank %d, outside 0..%d", rank(),
             peer, nranks() - 1);
  MC_REQUIRE(bytes == 0 || data != nullptr, moecommInvalidArgument, "rank %d: recv of %zu bytes into NULL", rank(),
             bytes);
  if (peer == rank()) {
    // Only this thread could send it, so waiting would never end.
    MC_REQUIRE(!selfMessages_.empty(), moecommInvalidUsage,
               "rank %d: recv from itself (tag %d) with no message from itself pending", rank(), tag);
    const auto& front = selfMessages_.front();
    MC_REQUIRE(front.first == tag && front.second.size() == bytes, moecommInternalError,
               "rank %d expected a message with tag %d of %zu bytes from itself but the next one has tag %d and %zu "
               "bytes",
               rank(), tag, bytes, front.first, front.second.size());
    if (bytes > 0) std::memcpy(data, front.second.data(), bytes);
    selfMessages_.pop_front();
    return moecommSuccess;
  }
  std::vector<Transfer> transfers{
      Transfer{peer, false, MsgHeader{kWireMagic, kMsgP2p, tag, bytes}, static_cast<char*>(data)}};
  const moecommResult_t res = progress(transfers, "recv");
  return res == moecommSuccess ? res : fail(res);
}

// ---- Setup ------------------------------------------------------------------------------

moecommResult_t TcpBootstrap::registerWithRoot(const SocketAddress& root, const SocketAddress& bound,
                                               std::vector<SocketAddress>* table) {
  const Deadline deadline = deadlineAfterMs(timeoutMs_);
  const std::string rootText = root.toString();
  Socket conn;
  moecommResult_t res = socketConnect(root, deadline, &aborted_, &conn);
  if (res == moecommTimeout) {
    return setError(moecommTimeout, "rank %d waited %lld ms for the rendezvous root at %s to accept its connection",
                    rank(), static_cast<long long>(timeoutMs_), rootText.c_str());
  }
  MC_CHECK(res);
  RegisterMsg msg{kWireMagic, kWireVersion, tag_, rank(), nranks(), {}};
  encodeAddress(bound, &msg.address);
  MC_CHECK(socketSendAll(conn, &msg, sizeof(msg), deadline, &aborted_));

  RootReply reply{};
  res = socketRecvAll(conn, &reply, sizeof(reply), deadline, &aborted_);
  if (res == moecommTimeout) {
    return setError(moecommTimeout, "rank %d waited %lld ms for the other ranks to reach the rendezvous root at %s",
                    rank(), static_cast<long long>(timeoutMs_), rootText.c_str());
  }
  if (res == moecommRemoteError) {
    return setError(moecommRemoteError,
                    "rank %d lost its connection to the rendezvous root at %s (the process "
                    "holding the unique id exited?)",
                    rank(), rootText.c_str());
  }
  MC_CHECK(res);
  MC_REQUIRE(reply.magic == kWireMagic, moecommInternalError,
             "rank %d got a corrupt reply from the rendezvous root at %s", rank(), rootText.c_str());
  if (reply.status != moecommSuccess) {
    char text[kMaxReplyText + 1] = {0};
    const size_t textBytes = std::min<size_t>(reply.textBytes, kMaxReplyText);
    if (socketRecvAll(conn, text, textBytes, deadline, &aborted_) != moecommSuccess) text[0] = '\0';
    const bool known = reply.status > 0 && reply.status < moecommNumResults;
    return setError(known ? static_cast<moecommResult_t>(reply.status) : moecommRemoteError,
                    "rank %d was turned away by the rendezvous root at %s: %s", rank(), rootText.c_str(), text);
  }
  std::vector<EncodedAddress> encoded(nranks());
  MC_CHECK(socketRecvAll(conn, encoded.data(), encoded.size() * sizeof(EncodedAddress), deadline, &aborted_));
  table->resize(nranks());
  for (int r = 0; r < nranks(); ++r) MC_CHECK(decodeAddress(encoded[r], &(*table)[r]));
  return moecommSuccess;
}

moecommResult_t TcpBootstrap::acceptPeers(const Socket& listener, Deadline deadline) {
  int expected = nranks() - 1 - rank();
  while (expected > 0) {
    Socket conn;
    moecommResult_t res = socketAccept(listener, deadline, &aborted_, &conn);
    if (res == moecommTimeout) {
      std::string missing;
      for (int r = rank() + 1; r < nranks(); ++r) {
        if (!peers_[r].valid()) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      return setError(moecommTimeout, "rank %d waited %lld ms for ranks %s to connect during bootstrap setup", rank(),
                      static_cast<long long>(timeoutMs_), missing.c_str());
    }
    MC_CHECK(res);
    Hello hello{};
    if (socketRecvAll(conn, &hello, sizeof(hello), std::min(deadline, deadlineAfterMs(kFirstMessageMs)), &aborted_) !=
        moecommSuccess) {
      MC_CHECK(usable("bootstrap setup"));
      MC_WARN(kLogBootstrap, "rank %d dropped an incoming connection that sent no greeting: %s", rank(),
              lastErrorText());
      continue;
    }
    const int from = hello.fromRank;
    if (hello.magic != kWireMagic || hello.version != kWireVersion || hello.tag != tag_ || hello.toRank != rank() ||
        from <= rank() || from >= nranks() || peers_[from].valid()) {
      MC_WARN(kLogBootstrap, "rank %d dropped a stray connection (claims rank %d of a %s job)", rank(), from,
              hello.tag == tag_ ? "this" : "different");
      continue;
    }
    const HelloAck ack{kWireMagic, rank(), tag_};
    MC_CHECK(socketSendAll(conn, &ack, sizeof(ack), deadline, &aborted_));
    peers_[from] = std::move(conn);
    --expected;
  }
  return moecommSuccess;
}

moecommResult_t TcpBootstrap::buildMesh(const Socket& listener, const std::vector<SocketAddress>& table) {
  const Deadline deadline = deadlineAfterMs(timeoutMs_);
  for (int peer = 0; peer < rank(); ++peer) {
    moecommResult_t res = socketConnect(table[peer], deadline, &aborted_, &peers_[peer]);
    if (res == moecommTimeout) {
      return setError(moecommTimeout,
                      "rank %d waited %lld ms for rank %d (%s) to accept its connection during "
                      "bootstrap setup",
                      rank(), static_cast<long long>(timeoutMs_), peer, table[peer].toString().c_str());
    }
    MC_CHECK(res);
    const Hello hello{kWireMagic, kWireVersion, tag_, rank(), peer};
    MC_CHECK(socketSendAll(peers_[peer], &hello, sizeof(hello), deadline, &aborted_));
  }
  MC_CHECK(acceptPeers(listener, deadline));
  for (int peer = 0; peer < rank(); ++peer) {
    HelloAck ack{};
    moecommResult_t res = socketRecvAll(peers_[peer], &ack, sizeof(ack), deadline, &aborted_);
    if (res == moecommTimeout) {
      return setError(moecommTimeout,
                      "rank %d waited %lld ms for rank %d to answer its greeting during bootstrap setup", rank(),
                      static_cast<long long>(timeoutMs_), peer);
    }
    if (res == moecommRemoteError) {
      return setError(moecommRemoteError, "rank %d lost connection to rank %d during bootstrap setup", rank(), peer);
    }
    MC_CHECK(res);
    MC_REQUIRE(ack.magic == kWireMagic && ack.tag == tag_ && ack.rank == peer, moecommRemoteError,
               "rank %d reached %s expecting rank %d of this job, but something else answered", rank(),
               table[peer].toString().c_str(), peer);
  }
  return moecommSuccess;
}

moecommResult_t TcpBootstrap::establish(const SocketAddress& root) {
  // Ranks of a job whose root is on loopback all live on this host: keep the mesh there too.
  SocketAddress local;
  if (root.isLoopback()) {
    local = loopbackAddress();
  } else {
    MC_CHECK(findInterfaceAddress(&local));
  }
  Socket listener;
  SocketAddress bound;
  MC_CHECK(socketListen(local, &listener, &bound));
  std::vector<SocketAddress> table;
  MC_CHECK(registerWithRoot(root, bound, &table));
  MC_CHECK(buildMesh(listener, table));
  MC_INFO(kLogBootstrap, "rank %d of %d: TCP bootstrap ready (listening on %s)", rank(), nranks(),
          bound.toString().c_str());
  return moecommSuccess;
}

}  // namespace

moecommResult_t bootstrapCreateUniqueId(moecommUniqueId* id) {
  MC_REQUIRE(id != nullptr, moecommInvalidArgument, "unique id pointer is NULL");
  SocketAddress address;
  MC_CHECK(findInterfaceAddress(&address));
  RootJob job;
  SocketAddress bound;
  MC_CHECK(socketListen(address, &job.listener, &bound));
  job.tag = randomTag();
  job.timeoutMs = bootstrapTimeoutMs(0);
  job.deadline = deadlineAfterMs(job.timeoutMs);
  job.address = bound.toString();
  encodeId(job.tag, bound, id);
  const std::string printable = job.address;
  // The root thread inherits a mask that blocks every signal, so it never takes a signal the
  // application meant for its own threads (sigwait users, moecomm-run's SIGCHLD).
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  std::string threadError;
  try {
    std::thread(rootThreadMain, std::move(job)).detach();
  } catch (const std::system_error& e) {
    threadError = e.what();
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  MC_REQUIRE(threadError.empty(), moecommSystemError, "could not start the rendezvous root thread: %s",
             threadError.c_str());
  MC_INFO(kLogBootstrap, "rendezvous root listening at %s", printable.c_str());
  return moecommSuccess;
}

moecommResult_t bootstrapCreateTcp(const moecommUniqueId& id, int rank, int nranks, int timeoutMs,
                                   std::unique_ptr<Bootstrap>* out) {
  MC_REQUIRE(out != nullptr, moecommInvalidArgument, "bootstrap output pointer is NULL");
  MC_REQUIRE(nranks >= 1, moecommInvalidArgument, "nranks is %d; it must be at least 1", nranks);
  MC_REQUIRE(rank >= 0 && rank < nranks, moecommInvalidArgument, "rank %d is outside 0..%d", rank, nranks - 1);
  uint64_t tag = 0;
  SocketAddress root;
  MC_CHECK(decodeId(id, &tag, &root));
  auto bootstrap = std::make_unique<TcpBootstrap>(rank, nranks, tag, bootstrapTimeoutMs(timeoutMs));
  MC_CHECK(bootstrap->establish(root));
  *out = std::move(bootstrap);
  return moecommSuccess;
}

}  // namespace moecomm
