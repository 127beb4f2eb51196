#include "gpu/gpu_common.h"

#include <cuda_runtime_api.h>
#include <dirent.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>

#include "core/comm.h"
#include "core/error.h"
#include "core/memory.h"
#include "gpu/nvlink_kernels.h"
#include "transport/nvlink.h"
#include "transport/symmetric.h"

namespace moecomm_gpu_test {
namespace {

std::string CudaText(int error) {
  const cudaError_t code = static_cast<cudaError_t>(error);
  return std::string(cudaGetErrorName(code)) + " (" + cudaGetErrorString(code) + ")";
}

// Checks `words` 16-byte words copied from a buffer laid out as nranks chunks of
// chunk_words, chunk w written by rank w.
std::string VerifyWords(const std::vector<Word16>& words, size_t chunk_words, int nranks, uint64_t seed) {
  size_t mismatches = 0;
  std::ostringstream detail;
  for (size_t i = 0; i < chunk_words * nranks; ++i) {
    const int writer = static_cast<int>(i / chunk_words);
    const uint64_t index = i % chunk_words;
    for (int lane = 0; lane < 4; ++lane) {
      const uint32_t expected = PatternLane(seed, writer, index, lane);
      if (words[i].lane[lane] == expected) continue;
      if (mismatches < 8) {
        char text[160];
        std::snprintf(text, sizeof(text),
                      "\n    word %zu (writer rank %d, index %" PRIu64 ") lane %d: got 0x%08x, expected 0x%08x", i,
                      writer, index, lane, words[i].lane[lane], expected);
        detail << text;
      }
      ++mismatches;
    }
  }
  if (mismatches == 0) return "";
  std::ostringstream out;
  out << mismatches << " of " << chunk_words * nranks * 4 << " 32-bit lanes differ:" << detail.str();
  return out.str();
}

}  // namespace

ScopedEnv::ScopedEnv(const char* name, const char* value) : name_(name) {
  if (const char* old = std::getenv(name)) {
    hadValue_ = true;
    previous_ = old;
  }
  if (value != nullptr) {
    setenv(name, value, 1);
  } else {
    unsetenv(name);
  }
}

ScopedEnv::~ScopedEnv() {
  if (hadValue_) {
    setenv(name_.c_str(), previous_.c_str(), 1);
  } else {
    unsetenv(name_.c_str());
  }
}

void DeviceMemory(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = 0;
  *total_bytes = 0;
  if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) (void)cudaGetLastError();
}

int OpenFdCount() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (readdir(dir) != nullptr) ++count;
  closedir(dir);
  return count;
}

uint64_t FreshSeed() {
  std::random_device entropy;
  return (static_cast<uint64_t>(entropy()) << 32) ^ entropy();
}

int ExpertsFor(int experts, int nranks) {
  return experts % nranks == 0 ? experts : experts + nranks - experts % nranks;
}

bool CuMemUsable(int device, std::string* why) { return moecomm::nvlinkCuMemSupported(device, why); }

std::string ExerciseSymmetric(moecommComm_t comm, void* ptr, uint64_t seed, std::string* method) {
  const int rank = comm->rank;
  const int nranks = comm->nranks;
  std::ostringstream prefix;
  prefix << "[rank " << rank << "/" << nranks << ", GPU " << comm->device << "] ";
  auto fail = [&](const std::string& step, const std::string& what) { return prefix.str() + step + ": " + what; };

  size_t offset = 1;
  moecomm::SymmetricMemory* memory = comm->memory->findSymmetric(ptr, 1, &offset);
  if (memory == nullptr || offset != 0) return fail("lookup", "the registry does not know the allocation");
  if (method) *method = memory->method();
  if (!memory->isDevice()) return fail("lookup", "the allocation is not GPU memory");
  const size_t chunk_words = memory->bytes() / 16 / nranks;
  if (chunk_words == 0) return fail("lookup", "the allocation is too small for one 16-byte word per rank");
  const size_t chunk_bytes = chunk_words * 16;
  const size_t total_words = chunk_words * nranks;
  int err = cudaSetDevice(comm->device);
  if (err != cudaSuccess) return fail("cudaSetDevice", CudaText(err));

  // 1. Store into every rank's buffer (our own included) at our chunk.
  for (int peer = 0; peer < nranks; ++peer) {
    void* destination = comm->memory->peerAddress(static_cast<char*>(ptr) + rank * chunk_bytes, peer);
    if (destination == nullptr) return fail("peer pointer", "no address for rank " + std::to_string(peer));
    err = LaunchStorePattern(destination, chunk_words, seed, rank);
    if (err != cudaSuccess) return fail("store kernel launch into rank " + std::to_string(peer), CudaText(err));
  }
  // 2. Everyone's stores are complete before anyone checks.
  err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return fail("store kernels (16-byte stores through peer pointers)", CudaText(err));
  moecommResult_t result = comm->bootstrap->barrier();
  if (result != moecommSuccess) return fail("barrier after the stores", moecomm::lastErrorText());

  // 3. Our own buffer holds every writer's pattern.
  std::vector<Word16> host(total_words);
  err = cudaMemcpy(host.data(), ptr, total_words * 16, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) return fail("copying the local buffer to the host", CudaText(err));
  std::string wrong = VerifyWords(host, chunk_words, nranks, seed);
  if (!wrong.empty()) return fail("verify local buffer after peers' stores", wrong);

  // 4. Loads from the next rank's buffer see the same content.
  const int next = (rank + 1) % nranks;
  void* scratch = nullptr;
  err = cudaMalloc(&scratch, total_words * 16);
  if (err != cudaSuccess) return fail("cudaMalloc of the scratch buffer", CudaText(err));
  err = cudaMemset(scratch, 0xa5, total_words * 16);
  if (err == cudaSuccess) err = LaunchLoadCopy(memory->peer(next), scratch, total_words);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpy(host.data(), scratch, total_words * 16, cudaMemcpyDeviceToHost);
  cudaFree(scratch);
  if (err != cudaSuccess)
    return fail("load kernel (16-byte loads from rank " + std::to_string(next) + ")", CudaText(err));
  wrong = VerifyWords(host, chunk_words, nranks, seed);
  if (!wrong.empty()) return fail("verify loads from rank " + std::to_string(next) + "'s buffer", wrong);

  // 5. Nobody frees or rewrites while a peer still loads.
  result = comm->bootstrap->barrier();
  if (result != moecommSuccess) return fail("final barrier", moecomm::lastErrorText());
  std::printf("[nvlink-check] rank %d/%d GPU %d method %s bytes %zu: stores and loads over peer pointers OK\n", rank,
              nranks, comm->device, memory->method(), memory->bytes());
  std::fflush(stdout);
  return "";
}

}  // namespace moecomm_gpu_test
