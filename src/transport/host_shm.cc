#include "transport/host_shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "core/error.h"
#include "core/log.h"

namespace moecomm {
namespace {

std::string segmentName(const std::string& name, int rank) { return "/" + name + "-r" + std::to_string(rank); }

// Maps one segment. On failure returns nullptr with errno set.
void* mapSegment(int fd, size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

ShmSymmetric::~ShmSymmetric() {
  for (void* p : mappings_) {
    if (p != nullptr) munmap(p, bytes_);
  }
}

moecommResult_t ShmSymmetric::create(Bootstrap& bootstrap, const std::string& name, size_t bytes,
                                     std::unique_ptr<ShmSymmetric>* out) {
  MC_REQUIRE(bytes > 0, moecommInvalidArgument, "shared memory segment of 0 bytes requested");
  const int rank = bootstrap.rank();
  const int nranks = bootstrap.nranks();
  std::unique_ptr<ShmSymmetric> shm(new ShmSymmetric());
  shm->rank_ = rank;
  shm->bytes_ = bytes;
  shm->mappings_.assign(nranks, nullptr);

  // Step 1: create and map our own segment. Its status is shared before anyone opens it, so
  // a failure on one rank fails every rank instead of leaving them waiting.
  const std::string own = segmentName(name, rank);
  int status = 0;
  char reason[256] = {0};
  int fd = shm_open(own.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    status = errno;
    std::snprintf(reason, sizeof(reason), "shm_open(%s): %s", own.c_str(), std::strerror(status));
  } else {
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      status = errno;
      std::snprintf(reason, sizeof(reason), "ftruncate(%s, %zu): %s", own.c_str(), bytes, std::strerror(status));
    } else if ((shm->mappings_[rank] = mapSegment(fd, bytes)) == nullptr) {
      status = errno;
      std::snprintf(reason, sizeof(reason), "mmap(%s, %zu): %s", own.c_str(), bytes, std::strerror(status));
    }
    close(fd);
  }
  std::vector<int> statuses(nranks);
  moecommResult_t res = bootstrap.allgather(&status, statuses.data(), sizeof(int));
  if (res != moecommSuccess) {
    shm_unlink(own.c_str());
    return res;
  }
  for (int r = 0; r < nranks; ++r) {
    if (statuses[r] != 0) {
      shm_unlink(own.c_str());
      if (r == rank) return setError(moecommSystemError, "creating shared memory failed: %s", reason);
      return setError(moecommRemoteError, "rank %d could not create its shared memory segment (%s)", r,
                      std::strerror(statuses[r]));
    }
  }

  // Step 2: map every peer's segment.
  status = 0;
  for (int r = 0; r < nranks && status == 0; ++r) {
    if (r == rank) continue;
    const std::string peerName = segmentName(name, r);
    int peerFd = shm_open(peerName.c_str(), O_RDWR, 0600);
    if (peerFd < 0) {
      status = errno;
      std::snprintf(reason, sizeof(reason), "shm_open(%s): %s", peerName.c_str(), std::strerror(status));
      break;
    }
    shm->mappings_[r] = mapSegment(peerFd, bytes);
    if (shm->mappings_[r] == nullptr) {
      status = errno;
      std::snprintf(reason, sizeof(reason), "mmap(%s): %s", peerName.c_str(), std::strerror(status));
    }
    close(peerFd);
  }
  res = bootstrap.allgather(&status, statuses.data(), sizeof(int));
  // Every rank has mapped (or given up on) every segment: the names are no longer needed.
  shm_unlink(own.c_str());
  MC_CHECK(res);
  for (int r = 0; r < nranks; ++r) {
    if (statuses[r] != 0) {
      if (r == rank) return setError(moecommSystemError, "mapping a peer's shared memory failed: %s", reason);
      return setError(moecommRemoteError, "rank %d could not map the shared memory segments (%s)", r,
                      std::strerror(statuses[r]));
    }
  }
  MC_INFO(kLogMem, "rank %d mapped %d shared segments of %zu bytes (%s)", rank, nranks, bytes, name.c_str());
  *out = std::move(shm);
  return moecommSuccess;
}

}  // namespace moecomm
