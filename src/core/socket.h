// Small TCP helpers for the bootstrap: an owning fd, an address that prints itself, and
// send/receive/connect/accept calls that are bounded by an absolute deadline and can be
// interrupted through an abort flag.
//
// Every socket is non-blocking and close-on-exec (moecomm-run forks ranks while a
// rendezvous root listens in the same process). Waits poll in slices of at most
// kSocketPollSliceMs so an abort takes effect promptly. Results:
//   moecommTimeout      the deadline passed,
//   moecommRemoteError  the peer closed the connection or reset it,
//   moecommInvalidUsage the abort flag was raised ("aborted" in the text),
//   moecommSystemError  anything else the kernel refused.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moecomm.h"

namespace moecomm {

using SteadyClock = std::chrono::steady_clock;
using Deadline = SteadyClock::time_point;

constexpr int kSocketPollSliceMs = 50;

// now + ms, for ms > 0.
Deadline deadlineAfterMs(int64_t ms);
// The bound on bootstrap waits: `requestedMs` when positive, else MOECOMM_BOOTSTRAP_TIMEOUT
// (and its built-in default when that is not positive either).
int64_t bootstrapTimeoutMs(int64_t requestedMs);
// Milliseconds left until `deadline` (0 once it passed).
int64_t msUntil(Deadline deadline);

// An IPv4 or IPv6 socket address.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  int family() const { return storage.ss_family; }
  uint16_t port() const;
  void setPort(uint16_t port);
  bool isLoopback() const;
  // "192.0.2.2:41234" or "[fd00::2]:41234".
  std::string toString() const;
  // "192.0.2.2" or "fd00::2".
  std::string hostText() const;
};

// Fixed-size, byte-order-independent encoding of a SocketAddress, used in the unique id and
// on the wire so that hosts agree on the layout.
struct EncodedAddress {
  uint8_t bytes[32];
};
void encodeAddress(const SocketAddress& address, EncodedAddress* out);
// InvalidArgument when the family is neither IPv4 nor IPv6.
moecommResult_t decodeAddress(const EncodedAddress& in, SocketAddress* out);

// The address to listen on: the interface named by MOECOMM_SOCKET_IFNAME; else the first
// non-loopback IPv4 interface that is up; else 127.0.0.1. Port 0.
moecommResult_t findInterfaceAddress(SocketAddress* out);
// 127.0.0.1 with port 0.
SocketAddress loopbackAddress();

// An owning file descriptor.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { reset(); }
  Socket(Socket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset();

 private:
  int fd_ = -1;
};

// Binds to `address` (its port is ignored: the kernel picks one) and listens. *bound gets
// the address with the chosen port.
moecommResult_t socketListen(const SocketAddress& address, Socket* out, SocketAddress* bound);

// Waits for one incoming connection. Timeout when none came before the deadline.
moecommResult_t socketAccept(const Socket& listener, Deadline deadline, const std::atomic<bool>* abortFlag,
                             Socket* out);

// Connects, retrying refused or unreachable attempts (the listener may not exist yet) until
// the deadline.
moecommResult_t socketConnect(const SocketAddress& address, Deadline deadline, const std::atomic<bool>* abortFlag,
                              Socket* out);

moecommResult_t socketSendAll(const Socket& socket, const void* data, size_t bytes, Deadline deadline,
                              const std::atomic<bool>* abortFlag);
moecommResult_t socketRecvAll(const Socket& socket, void* data, size_t bytes, Deadline deadline,
                              const std::atomic<bool>* abortFlag);

// Non-blocking single steps for callers that multiplex several sockets with poll().
// *progress gets the bytes moved (0 when the call would block). Errors as above; a clean
// EOF on receive is RemoteError.
moecommResult_t socketSendSome(const Socket& socket, const void* data, size_t bytes, size_t* progress);
moecommResult_t socketRecvSome(const Socket& socket, void* data, size_t bytes, size_t* progress);

// True when the abort flag is set (nullptr = never).
inline bool abortRequested(const std::atomic<bool>* abortFlag) {
  return abortFlag != nullptr && abortFlag->load(std::memory_order_acquire);
}

}  // namespace moecomm
