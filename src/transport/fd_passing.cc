#include "transport/fd_passing.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

using Clock = std::chrono::steady_clock;

// Short enough that an abort is noticed promptly, long enough not to spin.
constexpr int kPollSliceMs = 50;
// Abstract names share sun_path (108 bytes) with the leading NUL; keep a margin.
constexpr size_t kMaxNameBytes = 100;

moecommResult_t makeAddress(const std::string& name, sockaddr_un* address, socklen_t* length) {
  MC_REQUIRE(!name.empty() && name.size() <= kMaxNameBytes, moecommInternalError,
             "abstract socket name \"%s\" is empty or longer than %zu bytes", name.c_str(), kMaxNameBytes);
  std::memset(address, 0, sizeof(*address));
  address->sun_family = AF_UNIX;
  // sun_path[0] stays 0: the abstract namespace. The name is not NUL-terminated on the wire.
  std::memcpy(address->sun_path + 1, name.data(), name.size());
  *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return moecommSuccess;
}

moecommResult_t newSocket(UniqueFd* out) {
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  MC_SYSCHECK(fd, "socket(AF_UNIX, SOCK_SEQPACKET)");
  out->reset(fd);
  return moecommSuccess;
}

// Waits until fd reports one of `events`, the deadline passes or the abort flag is raised.
moecommResult_t waitFor(int fd, short events, Deadline deadline, const std::atomic<bool>* aborted, const char* what) {
  for (;;) {
    if (aborted != nullptr && aborted->load()) {
      return setError(moecommInvalidUsage, "the communicator was aborted while waiting to %s", what);
    }
    const auto now = Clock::now();
    if (now >= deadline) return setError(moecommTimeout, "timed out waiting to %s", what);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    pollfd entry{fd, events, 0};
    const int ready = poll(&entry, 1, static_cast<int>(std::min<int64_t>(left + 1, kPollSliceMs)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return setError(moecommSystemError, "poll while waiting to %s failed: %s", what, std::strerror(errno));
    }
    if (ready == 0) continue;
    // POLLHUP/POLLERR also end the wait: the following call reports what happened.
    return moecommSuccess;
  }
}

}  // namespace

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Deadline deadlineAfterMs(int timeoutMs) { return Clock::now() + std::chrono::milliseconds(timeoutMs); }

moecommResult_t FdListener::listen(const std::string& name, int backlog) {
  sockaddr_un address;
  socklen_t length = 0;
  MC_CHECK(makeAddress(name, &address, &length));
  UniqueFd fd;
  MC_CHECK(newSocket(&fd));
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&address), length) != 0) {
    const int error = errno;
    return setError(moecommSystemError, "bind of the abstract unix socket \"%s\" failed: %s", name.c_str(),
                    std::strerror(error));
  }
  if (::listen(fd.get(), std::max(backlog, 1)) != 0) {
    const int error = errno;
    return setError(moecommSystemError, "listen on the abstract unix socket \"%s\" failed: %s", name.c_str(),
                    std::strerror(error));
  }
  socket_ = std::move(fd);
  name_ = name;
  return moecommSuccess;
}

moecommResult_t FdListener::accept(Deadline deadline, const std::atomic<bool>* aborted, UniqueFd* connection) {
  MC_REQUIRE(socket_.valid(), moecommInternalError, "accept on a closed listener");
  for (;;) {
    MC_CHECK(waitFor(socket_.get(), POLLIN, deadline, aborted, "accept a connection"));
    int fd = accept4(socket_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      connection->reset(fd);
      return moecommSuccess;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) continue;
    const int error = errno;
    return setError(moecommSystemError, "accept on \"%s\" failed: %s", name_.c_str(), std::strerror(error));
  }
}

moecommResult_t fdConnect(const std::string& name, Deadline deadline, const std::atomic<bool>* aborted,
                          UniqueFd* connection) {
  sockaddr_un address;
  socklen_t length = 0;
  MC_CHECK(makeAddress(name, &address, &length));
  for (;;) {
    if (aborted != nullptr && aborted->load()) {
      return setError(moecommInvalidUsage, "the communicator was aborted while connecting to \"%s\"", name.c_str());
    }
    UniqueFd fd;
    MC_CHECK(newSocket(&fd));
    if (connect(fd.get(), reinterpret_cast<sockaddr*>(&address), length) == 0) {
      *connection = std::move(fd);
      return moecommSuccess;
    }
    const int error = errno;
    if (error == EINPROGRESS) {
      MC_CHECK(waitFor(fd.get(), POLLOUT, deadline, aborted, "finish connecting a unix socket"));
      int soError = 0;
      socklen_t soLength = sizeof(soError);
      MC_SYSCHECK(getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &soError, &soLength), "getsockopt(SO_ERROR)");
      if (soError == 0) {
        *connection = std::move(fd);
        return moecommSuccess;
      }
      return setError(moecommRemoteError, "connecting to the abstract unix socket \"%s\" failed: %s", name.c_str(),
                      std::strerror(soError));
    }
    if (error == EAGAIN || error == EINTR) {
      // The listener's backlog is full: it is there, just busy. Try again shortly.
      if (Clock::now() >= deadline) {
        return setError(moecommTimeout, "timed out connecting to the abstract unix socket \"%s\" (backlog full)",
                        name.c_str());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (error == ECONNREFUSED || error == ENOENT) {
      return setError(moecommRemoteError,
                      "nobody listens on the abstract unix socket \"%s\" (%s); a peer that listens there is not "
                      "reachable, e.g. because it runs in another network namespace",
                      name.c_str(), std::strerror(error));
    }
    return setError(moecommSystemError, "connect to the abstract unix socket \"%s\" failed: %s", name.c_str(),
                    std::strerror(error));
  }
}

moecommResult_t fdSend(int socket, const void* data, size_t bytes, int fd, Deadline deadline,
                       const std::atomic<bool>* aborted) {
  iovec vector{const_cast<void*>(data), bytes};
  msghdr message{};
  message.msg_iov = &vector;
  message.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (fd >= 0) {
    std::memset(control, 0, sizeof(control));
    message.msg_control = control;
    message.msg_controllen = sizeof(control);
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &fd, sizeof(int));
  }
  for (;;) {
    const ssize_t sent = sendmsg(socket, &message, MSG_NOSIGNAL);
    if (sent >= 0) {
      MC_REQUIRE(static_cast<size_t>(sent) == bytes, moecommSystemError,
                 "sendmsg on a unix socket sent %zd of %zu bytes", sent, bytes);
      return moecommSuccess;
    }
    const int error = errno;
    if (error == EINTR) continue;
    if (error == EAGAIN || error == EWOULDBLOCK) {
      MC_CHECK(waitFor(socket, POLLOUT, deadline, aborted, "send a file descriptor"));
      continue;
    }
    if (error == EPIPE || error == ECONNRESET) {
      return setError(moecommRemoteError, "the peer closed its unix socket before taking a file descriptor (%s)",
                      std::strerror(error));
    }
    return setError(moecommSystemError, "sendmsg with a file descriptor failed: %s", std::strerror(error));
  }
}

moecommResult_t fdReceive(int socket, void* data, size_t bytes, UniqueFd* fd, Deadline deadline,
                          const std::atomic<bool>* aborted) {
  fd->reset();
  // Room for a few descriptors, so that a peer sending too many is detected and every extra
  // one is closed rather than leaked.
  constexpr int kMaxDescriptors = 4;
  alignas(cmsghdr) char control[CMSG_SPACE(kMaxDescriptors * sizeof(int))];
  for (;;) {
    MC_CHECK(waitFor(socket, POLLIN, deadline, aborted, "receive a file descriptor"));
    iovec vector{data, bytes};
    msghdr message{};
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof(control);
    const ssize_t received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC);
    if (received < 0) {
      const int error = errno;
      if (error == EINTR || error == EAGAIN || error == EWOULDBLOCK) continue;
      return setError(moecommSystemError, "recvmsg on a unix socket failed: %s", std::strerror(error));
    }
    int descriptors = 0;
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr; header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int incoming = -1;
        std::memcpy(&incoming, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
        if (descriptors++ == 0) {
          fd->reset(incoming);
        } else {
          ::close(incoming);
        }
      }
    }
    if (received == 0) {
      fd->reset();
      return setError(moecommRemoteError, "the peer closed its unix socket before sending a file descriptor");
    }
    if ((message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0 || static_cast<size_t>(received) != bytes ||
        descriptors > 1) {
      fd->reset();
      return setError(moecommRemoteError,
                      "malformed file-descriptor message: %zd bytes (expected %zu), %d descriptors, flags 0x%x",
                      received, bytes, descriptors, static_cast<unsigned>(message.msg_flags));
    }
    return moecommSuccess;
  }
}

}  // namespace moecomm
