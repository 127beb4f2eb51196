#include "core/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <thread>

#include "core/env.h"
#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

void putBe16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
void putBe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (24 - 8 * i));
}
uint16_t getBe16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
uint32_t getBe32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | p[i];
  return v;
}

moecommResult_t abortedError() {
  return setError(moecommInvalidUsage, "the bootstrap was aborted while a socket operation was waiting");
}

// Waits until `fd` is ready for `events`, the deadline passes or the abort flag rises.
// Success also covers POLLERR/POLLHUP: the following send/recv reports the actual error.
moecommResult_t waitReady(int fd, short events, Deadline deadline, const std::atomic<bool>* abortFlag,
                          const char* what) {
  for (;;) {
    if (abortRequested(abortFlag)) return abortedError();
    const int64_t left = msUntil(deadline);
    if (left <= 0) return setError(moecommTimeout, "%s timed out", what);
    pollfd pfd{fd, events, 0};
    const int rc = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, kSocketPollSliceMs)));
    if (rc > 0) return moecommSuccess;
    if (rc < 0 && errno != EINTR) {
      return setError(moecommSystemError, "poll() while waiting for %s failed: %s", what, std::strerror(errno));
    }
  }
}

// Sleeps up to `ms`, in slices so an abort is seen; returns false when aborted.
bool sleepUnlessAborted(int64_t ms, const std::atomic<bool>* abortFlag) {
  while (ms > 0) {
    if (abortRequested(abortFlag)) return false;
    const int64_t slice = std::min<int64_t>(ms, kSocketPollSliceMs);
    std::this_thread::sleep_for(std::chrono::milliseconds(slice));
    ms -= slice;
  }
  return !abortRequested(abortFlag);
}

void setNoDelay(int fd) {
  // Bootstrap messages are small and latency-bound; Nagle would add up to 40 ms per step.
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Errors after which another connect attempt makes sense: the peer is not listening yet.
bool connectErrorIsRetryable(int err) {
  return err == ECONNREFUSED || err == ETIMEDOUT || err == EHOSTUNREACH || err == ENETUNREACH || err == ECONNRESET ||
         err == EAGAIN || err == EINTR;
}

bool isSelfConnection(int fd) {
  sockaddr_storage local{}, peer{};
  socklen_t localLength = sizeof(local), peerLength = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &localLength) != 0) return false;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peerLength) != 0) return false;
  return localLength == peerLength && std::memcmp(&local, &peer, localLength) == 0;
}

bool isRemoteCloseError(int err) { return err == EPIPE || err == ECONNRESET || err == ETIMEDOUT; }

}  // namespace

Deadline deadlineAfterMs(int64_t ms) { return SteadyClock::now() + std::chrono::milliseconds(ms); }

int64_t bootstrapTimeoutMs(int64_t requestedMs) {
  if (requestedMs > 0) return requestedMs;
  const int64_t fromEnv = envInt(Env::BootstrapTimeout);
  return fromEnv > 0 ? fromEnv : 60000;
}

int64_t msUntil(Deadline deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now()).count();
  return left > 0 ? left : 0;
}

// ---- SocketAddress ----------------------------------------------------------------------

uint16_t SocketAddress::port() const {
  if (family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  if (family() == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  return 0;
}

void SocketAddress::setPort(uint16_t port) {
  if (family() == AF_INET) reinterpret_cast<sockaddr_in*>(&storage)->sin_port = htons(port);
  if (family() == AF_INET6) reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port = htons(port);
}

bool SocketAddress::isLoopback() const {
  if (family() == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr.s_addr) >> 24) == 127;
  }
  if (family() == AF_INET6) {
    return IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr);
  }
  return false;
}

std::string SocketAddress::hostText() const {
  char host[INET6_ADDRSTRLEN] = "?";
  if (family() == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, host, sizeof(host));
  } else if (family() == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, host, sizeof(host));
  } else {
    return "<no address>";
  }
  return host;
}

std::string SocketAddress::toString() const {
  if (family() == AF_INET) return hostText() + ":" + std::to_string(port());
  if (family() == AF_INET6) return "[" + hostText() + "]:" + std::to_string(port());
  return "<no address>";
}

// Layout: [0,2) family (4 or 6), [2,4) port, [4,8) IPv6 scope id, [8,24) address; big-endian.
void encodeAddress(const SocketAddress& address, EncodedAddress* out) {
  std::memset(out->bytes, 0, sizeof(out->bytes));
  if (address.family() == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&address.storage);
    putBe16(out->bytes, 4);
    putBe16(out->bytes + 2, address.port());
    std::memcpy(out->bytes + 8, &in->sin_addr, 4);
  } else if (address.family() == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&address.storage);
    putBe16(out->bytes, 6);
    putBe16(out->bytes + 2, address.port());
    putBe32(out->bytes + 4, in6->sin6_scope_id);
    std::memcpy(out->bytes + 8, &in6->sin6_addr, 16);
  }
}

moecommResult_t decodeAddress(const EncodedAddress& in, SocketAddress* out) {
  *out = SocketAddress();
  const uint16_t family = getBe16(in.bytes);
  if (family == 4) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&out->storage);
    sin->sin_family = AF_INET;
    std::memcpy(&sin->sin_addr, in.bytes + 8, 4);
    out->length = sizeof(sockaddr_in);
  } else if (family == 6) {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&out->storage);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_scope_id = getBe32(in.bytes + 4);
    std::memcpy(&sin6->sin6_addr, in.bytes + 8, 16);
    out->length = sizeof(sockaddr_in6);
  } else {
    return setError(moecommInvalidArgument, "encoded socket address has unknown family %u (expected 4 or 6)",
                    static_cast<unsigned>(family));
  }
  out->setPort(getBe16(in.bytes + 2));
  return moecommSuccess;
}

SocketAddress loopbackAddress() {
  SocketAddress address;
  auto* sin = reinterpret_cast<sockaddr_in*>(&address.storage);
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.length = sizeof(sockaddr_in);
  return address;
}

moecommResult_t findInterfaceAddress(SocketAddress* out) {
  const std::string wanted = envString(Env::SocketIfname);
  ifaddrs* list = nullptr;
  MC_SYSCHECK(getifaddrs(&list), "getifaddrs()");
  std::unique_ptr<ifaddrs, void (*)(ifaddrs*)> owner(list, freeifaddrs);

  const ifaddrs* chosen = nullptr;
  std::string available;
  for (const ifaddrs* ifa = list; ifa != nullptr; ifa = ifa->ifa_next) {
    if (ifa->ifa_addr == nullptr) continue;
    const int family = ifa->ifa_addr->sa_family;
    if (family != AF_INET && family != AF_INET6) continue;
    if (available.find(ifa->ifa_name) == std::string::npos) {
      available += available.empty() ? "" : ", ";
      available += ifa->ifa_name;
    }
    if (!wanted.empty()) {
      if (wanted != ifa->ifa_name) continue;
      // IPv4 is preferred; an IPv6 address is kept only until an IPv4 one shows up.
      if (chosen == nullptr || (family == AF_INET && chosen->ifa_addr->sa_family != AF_INET)) chosen = ifa;
    } else if (chosen == nullptr && family == AF_INET && (ifa->ifa_flags & IFF_UP) &&
               !(ifa->ifa_flags & IFF_LOOPBACK)) {
      chosen = ifa;
    }
  }
  if (chosen == nullptr) {
    MC_REQUIRE(wanted.empty(), moecommInvalidUsage,
               "MOECOMM_SOCKET_IFNAME=%s names no interface with an IPv4 or IPv6 address (interfaces with one: %s)",
               wanted.c_str(), available.empty() ? "none" : available.c_str());
    *out = loopbackAddress();
    MC_INFO(kLogBootstrap, "no non-loopback IPv4 interface is up; the bootstrap uses 127.0.0.1");
    return moecommSuccess;
  }
  *out = SocketAddress();
  out->length = chosen->ifa_addr->sa_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  std::memcpy(&out->storage, chosen->ifa_addr, out->length);
  out->setPort(0);
  MC_INFO(kLogBootstrap, "bootstrap interface %s (%s)", chosen->ifa_name, out->hostText().c_str());
  return moecommSuccess;
}

// ---- Socket -----------------------------------------------------------------------------

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

void Socket::reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

moecommResult_t socketListen(const SocketAddress& address, Socket* out, SocketAddress* bound) {
  Socket sock(socket(address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  MC_SYSCHECK(sock.fd(), "socket() for the bootstrap listener");
  int one = 1;
  MC_SYSCHECK(setsockopt(sock.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)), "setsockopt(SO_REUSEADDR)");
  SocketAddress local = address;
  local.setPort(0);
  if (bind(sock.fd(), reinterpret_cast<const sockaddr*>(&local.storage), local.length) != 0) {
    const int err = errno;
    return setError(moecommSystemError, "bind() to %s failed: %s", local.toString().c_str(), std::strerror(err));
  }
  MC_SYSCHECK(listen(sock.fd(), SOMAXCONN), "listen() on the bootstrap socket");
  SocketAddress actual;
  actual.length = sizeof(actual.storage);
  MC_SYSCHECK(getsockname(sock.fd(), reinterpret_cast<sockaddr*>(&actual.storage), &actual.length),
              "getsockname() on the bootstrap listener");
  *bound = actual;
  *out = std::move(sock);
  return moecommSuccess;
}

moecommResult_t socketAccept(const Socket& listener, Deadline deadline, const std::atomic<bool>* abortFlag,
                             Socket* out) {
  for (;;) {
    const int fd = accept4(listener.fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      setNoDelay(fd);
      *out = Socket(fd);
      return moecommSuccess;
    }
    const int err = errno;
    // A connection that was reset before we took it is not our problem; wait for the next.
    if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR && err != ECONNABORTED) {
      return setError(moecommSystemError, "accept() on the bootstrap listener failed: %s", std::strerror(err));
    }
    MC_CHECK(waitReady(listener.fd(), POLLIN, deadline, abortFlag, "waiting for an incoming connection"));
  }
}

moecommResult_t socketConnect(const SocketAddress& address, Deadline deadline, const std::atomic<bool>* abortFlag,
                              Socket* out) {
  int64_t backoffMs = 10;
  int lastError = 0;
  for (int attempt = 1;; ++attempt) {
    if (abortRequested(abortFlag)) return abortedError();
    Socket sock(socket(address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    MC_SYSCHECK(sock.fd(), "socket() for a bootstrap connection");
    int err = 0;
    if (connect(sock.fd(), reinterpret_cast<const sockaddr*>(&address.storage), address.length) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        moecommResult_t res = waitReady(sock.fd(), POLLOUT, deadline, abortFlag, "connect()");
        if (res == moecommTimeout) break;
        MC_CHECK(res);
        socklen_t len = sizeof(err);
        if (getsockopt(sock.fd(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err == 0 && isSelfConnection(sock.fd())) {
      // Connecting to a port nobody listens on can, on loopback, pick that very port as the
      // source port and connect to itself. Treat it like a refusal.
      err = ECONNREFUSED;
    }
    if (err == 0) {
      setNoDelay(sock.fd());
      *out = std::move(sock);
      return moecommSuccess;
    }
    if (!connectErrorIsRetryable(err)) {
      return setError(moecommSystemError, "connect() to %s failed: %s", address.toString().c_str(), std::strerror(err));
    }
    lastError = err;
    MC_TRACE(kLogBootstrap, "connect to %s attempt %d: %s; retrying", address.toString().c_str(), attempt,
             std::strerror(err));
    const int64_t left = msUntil(deadline);
    if (left <= 0) break;
    if (!sleepUnlessAborted(std::min(backoffMs, left), abortFlag)) return abortedError();
    backoffMs = std::min<int64_t>(backoffMs * 2, 200);
  }
  return setError(moecommTimeout, "connect() to %s did not succeed before the deadline (last error: %s)",
                  address.toString().c_str(), lastError != 0 ? std::strerror(lastError) : "still in progress");
}

moecommResult_t socketSendSome(const Socket& socket, const void* data, size_t bytes, size_t* progress) {
  *progress = 0;
  if (bytes == 0) return moecommSuccess;
  const ssize_t n = ::send(socket.fd(), data, bytes, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n >= 0) {
    *progress = static_cast<size_t>(n);
    return moecommSuccess;
  }
  const int err = errno;
  if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) return moecommSuccess;
  if (isRemoteCloseError(err))
    return setError(moecommRemoteError, "send(): the peer closed the connection (%s)", std::strerror(err));
  return setError(moecommSystemError, "send() failed: %s", std::strerror(err));
}

moecommResult_t socketRecvSome(const Socket& socket, void* data, size_t bytes, size_t* progress) {
  *progress = 0;
  if (bytes == 0) return moecommSuccess;
  const ssize_t n = ::recv(socket.fd(), data, bytes, MSG_DONTWAIT);
  if (n > 0) {
    *progress = static_cast<size_t>(n);
    return moecommSuccess;
  }
  if (n == 0) return setError(moecommRemoteError, "recv(): the peer closed the connection");
  const int err = errno;
  if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) return moecommSuccess;
  if (isRemoteCloseError(err))
    return setError(moecommRemoteError, "recv(): the connection was lost (%s)", std::strerror(err));
  return setError(moecommSystemError, "recv() failed: %s", std::strerror(err));
}

moecommResult_t socketSendAll(const Socket& socket, const void* data, size_t bytes, Deadline deadline,
                              const std::atomic<bool>* abortFlag) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    size_t n = 0;
    MC_CHECK(socketSendSome(socket, p, bytes, &n));
    p += n;
    bytes -= n;
    if (bytes > 0 && n == 0) MC_CHECK(waitReady(socket.fd(), POLLOUT, deadline, abortFlag, "send()"));
  }
  return moecommSuccess;
}

moecommResult_t socketRecvAll(const Socket& socket, void* data, size_t bytes, Deadline deadline,
                              const std::atomic<bool>* abortFlag) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    size_t n = 0;
    MC_CHECK(socketRecvSome(socket, p, bytes, &n));
    p += n;
    bytes -= n;
    if (bytes > 0 && n == 0) MC_CHECK(waitReady(socket.fd(), POLLIN, deadline, abortFlag, "recv()"));
  }
  return moecommSuccess;
}

}  // namespace moecomm
