#include "nccl_context.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "cuda_check.h"

namespace moecomm_bench {
namespace {

constexpr int kIdWaitSeconds = 120;

std::string IdFilePath() {
  const char* job = std::getenv("MOECOMM_UNIQUE_ID");
  if (job == nullptr || *job == '\0')
    BENCH_FAIL("getenv(MOECOMM_UNIQUE_ID)", "not set: start the bench with moecomm-run -n N moecomm-bench ...");
  uint64_t hash = 0xcbf29ce484222325ull;  // FNV-1a
  for (const char* c = job; *c != '\0'; ++c) hash = (hash ^ static_cast<unsigned char>(*c)) * 0x100000001b3ull;
  char path[96];
  std::snprintf(path, sizeof(path), "/tmp/moecomm-bench-nccl-%016llx.id", static_cast<unsigned long long>(hash));
  return path;
}

void WriteId(const std::string& path, const ncclUniqueId& id) {
  const std::string temporary = path + ".tmp." + std::to_string(getpid());
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) BENCH_FAIL("open(" + temporary + ")", std::strerror(errno));
  const ssize_t written = ::write(fd, &id, sizeof(id));
  ::close(fd);
  if (written != static_cast<ssize_t>(sizeof(id))) BENCH_FAIL("write(" + temporary + ")", "short write");
  if (::rename(temporary.c_str(), path.c_str()) != 0) BENCH_FAIL("rename(" + path + ")", std::strerror(errno));
}

ncclUniqueId ReadId(const std::string& path) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kIdWaitSeconds);
  while (true) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd >= 0) {
      ncclUniqueId id;
      const ssize_t got = ::read(fd, &id, sizeof(id));
      ::close(fd);
      if (got == static_cast<ssize_t>(sizeof(id))) return id;
    }
    if (std::chrono::steady_clock::now() > deadline)
      BENCH_FAIL("waiting for " + path, "rank 0 never wrote the NCCL id within " + std::to_string(kIdWaitSeconds) +
                                            " s (the NCCL baseline needs every rank on one host, sharing /tmp)");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace

std::unique_ptr<NcclContext> NcclContext::Create(int rank, int nranks, cudaStream_t stream) {
  SetStep("NCCL communicator init (id through /tmp)");
  const std::string path = IdFilePath();
  ncclUniqueId id;
  if (rank == 0) {
    BENCH_NCCL(ncclGetUniqueId(&id), nullptr);
    WriteId(path, id);
  } else {
    id = ReadId(path);
  }
  std::unique_ptr<NcclContext> context(new NcclContext());
  context->stream_ = stream;
  BENCH_NCCL(ncclCommInitRank(&context->comm_, nranks, id, rank), nullptr);
  BENCH_CUDA(cudaMalloc(&context->scratch_, 16));
  BENCH_CUDA(cudaMemsetAsync(context->scratch_, 0, 16, stream));
  context->HostBarrier();  // everyone has read the file
  if (rank == 0) ::unlink(path.c_str());
  return context;
}

NcclContext::~NcclContext() {
  // While an error unwinds, peers may be gone: abort rather than wait for them.
  if (comm_ != nullptr) std::uncaught_exceptions() > 0 ? ncclCommAbort(comm_) : ncclCommDestroy(comm_);
  if (scratch_ != nullptr) cudaFree(scratch_);
}

void NcclContext::StreamBarrier() {
  BENCH_NCCL(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_), comm_);
}

void NcclContext::HostBarrier() {
  StreamBarrier();
  BENCH_CUDA(cudaStreamSynchronize(stream_));
}

double NcclContext::AllMin(double value) {
  double* device = reinterpret_cast<double*>(scratch_ + 2);
  BENCH_CUDA(cudaMemcpyAsync(device, &value, sizeof(value), cudaMemcpyHostToDevice, stream_));
  BENCH_NCCL(ncclAllReduce(device, device, 1, ncclFloat64, ncclMin, comm_, stream_), comm_);
  BENCH_CUDA(cudaMemcpyAsync(&value, device, sizeof(value), cudaMemcpyDeviceToHost, stream_));
  BENCH_CUDA(cudaStreamSynchronize(stream_));
  return value;
}

}  // namespace moecomm_bench
