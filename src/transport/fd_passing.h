// Passing file descriptors between processes of one host: SCM_RIGHTS over unix-domain
// SOCK_SEQPACKET sockets in the abstract namespace (no file is created, nothing to clean up
// when a process dies). Used to hand cuMem POSIX-fd handles to the peers.
//
// Every wait is bounded by a deadline and watches an abort flag, polling in short slices.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <string>

#include "moecomm.h"

namespace moecomm {

using Deadline = std::chrono::steady_clock::time_point;

// Owns one file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// A listening socket bound to an abstract name. The name is given without the leading NUL
// and must be at most 100 bytes.
class FdListener {
 public:
  // Binds and listens; the name must not be in use (EADDRINUSE is a SystemError naming it).
  moecommResult_t listen(const std::string& name, int backlog);
  // Waits for the next connection until the deadline (Timeout) or abort (InvalidUsage).
  moecommResult_t accept(Deadline deadline, const std::atomic<bool>* aborted, UniqueFd* connection);
  const std::string& name() const { return name_; }
  void close() { socket_.reset(); }

 private:
  UniqueFd socket_;
  std::string name_;
};

// Connects to the abstract name. A listener whose backlog is full is retried until the
// deadline; a name nobody listens on fails at once (RemoteError), since callers connect
// only after the peer said it listens.
moecommResult_t fdConnect(const std::string& name, Deadline deadline, const std::atomic<bool>* aborted,
                          UniqueFd* connection);

// Sends one message of `bytes` bytes carrying one descriptor (fd >= 0) or none (fd < 0).
moecommResult_t fdSend(int socket, const void* data, size_t bytes, int fd, Deadline deadline,
                       const std::atomic<bool>* aborted);

// Receives one message of exactly `bytes` bytes with at most one descriptor (*fd is invalid
// when none came). A shorter or longer message, or more than one descriptor, is a
// RemoteError (extra descriptors are closed).
moecommResult_t fdReceive(int socket, void* data, size_t bytes, UniqueFd* fd, Deadline deadline,
                          const std::atomic<bool>* aborted);

// The deadline timeoutMs from now.
Deadline deadlineAfterMs(int timeoutMs);

}  // namespace moecomm
