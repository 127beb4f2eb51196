#include "core/comm_init.h"

#include <strings.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <random>

#include "core/cuda_probe.h"
#include "core/enum_value.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "core/memory.h"
#include "ep/ep.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

uint64_t fnv1a(const std::string& text) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

// Same value for every process of one booted machine (containers share the boot id).
uint64_t hostHash() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  std::string identity = host;
  std::ifstream bootId("/proc/sys/kernel/random/boot_id");
  std::string line;
  if (std::getline(bootId, line)) identity += ":" + line;
  return fnv1a(identity);
}

moecommResult_t backendFromEnv(moecommBackend_t* out) {
  std::string text = envString(Env::Backend);
  if (strcasecmp(text.c_str(), "auto") == 0 || text.empty()) {
    *out = moecommBackendAuto;
  } else if (strcasecmp(text.c_str(), "host") == 0) {
    *out = moecommBackendHost;
  } else if (strcasecmp(text.c_str(), "cuda") == 0) {
    *out = moecommBackendCuda;
  } else {
    return setError(moecommInvalidArgument, "MOECOMM_BACKEND=%s is not one of auto, host, cuda", text.c_str());
  }
  return moecommSuccess;
}

// Picks this rank's backend and device from the request and what the machine has.
moecommResult_t chooseBackend(const ResolvedConfig& config, moecommBackend_t* backend, int* device) {
  std::string why;
  const int gpus = cudaVisibleDeviceCount(&why);
  *backend = config.backend;
  if (*backend == moecommBackendAuto) *backend = gpus > 0 ? moecommBackendCuda : moecommBackendHost;
  if (*backend == moecommBackendHost) {
    *device = -1;
    return moecommSuccess;
  }
  MC_REQUIRE(gpus > 0, moecommNotSupported, "the CUDA backend was requested but no GPU is usable (%s)", why.c_str());
  *device = config.device >= 0 ? config.device : cudaCurrentDevice();
  MC_REQUIRE(*device >= 0 && *device < gpus, moecommInvalidArgument, "device %d is outside the %d visible GPUs",
             *device, gpus);
  MC_CHECK(cudaUseDevice(*device));
  return moecommSuccess;
}

// What every rank tells the others when the communicator forms.
struct RankInfo {
  uint64_t hostHash;
  uint64_t randomTag;
  int32_t version;
  int32_t backend;
  int32_t device;
  int32_t status;  // moecommResult_t of this rank's local set-up
};

moecommResult_t agreeOnCommunicator(moecommComm* comm, moecommResult_t localStatus) {
  const int nranks = comm->nranks;
  RankInfo mine{};
  mine.hostHash = hostHash();
  std::random_device entropy;
  mine.randomTag = (static_cast<uint64_t>(entropy()) << 32) ^ entropy() ^ static_cast<uint64_t>(getpid());
  mine.version = MOECOMM_VERSION_CODE;
  mine.backend = comm->backend;
  mine.device = comm->device;
  mine.status = localStatus;
  std::vector<RankInfo> all(nranks);
  MC_CHECK(comm->bootstrap->allgather(&mine, all.data(), sizeof(RankInfo)));
  if (localStatus != moecommSuccess) return localStatus;
  for (int r = 0; r < nranks; ++r) {
    MC_REQUIRE(all[r].status == moecommSuccess, moecommRemoteError,
               "rank %d failed to set up its part of the communicator (%s)", r,
               resultName(static_cast<moecommResult_t>(all[r].status)));
    MC_REQUIRE(all[r].version == mine.version, moecommInvalidUsage,
               "rank %d runs libmoecomm %d but rank %d runs %d; every rank needs the same version", r, all[r].version,
               comm->rank, mine.version);
    MC_REQUIRE(all[r].backend == mine.backend, moecommInvalidUsage,
               "rank %d chose backend %d but rank %d chose %d; set MOECOMM_BACKEND or the config alike on every rank",
               r, all[r].backend, comm->rank, mine.backend);
  }
  comm->hostHashes.resize(nranks);
  for (int r = 0; r < nranks; ++r) comm->hostHashes[r] = all[r].hostHash;
  char tag[48];
  std::snprintf(tag, sizeof(tag), "moecomm-%016llx", static_cast<unsigned long long>(all[0].randomTag));
  comm->tag = tag;
  return moecommSuccess;
}

}  // namespace

moecommResult_t resolveConfig(const moecommConfig_t* config, ResolvedConfig* out) {
  ResolvedConfig resolved;
  MC_CHECK(backendFromEnv(&resolved.backend));
  resolved.timeoutMs = static_cast<int>(envInt(Env::BootstrapTimeout));
  if (config != nullptr) {
    MC_REQUIRE(config->size == sizeof(moecommConfig_t), moecommInvalidArgument,
               "config->size is %zu but this library expects %zu; initialise it with MOECOMM_CONFIG_INIT", config->size,
               sizeof(moecommConfig_t));
    MC_REQUIRE(config->magic == MOECOMM_CONFIG_MAGIC, moecommInvalidArgument,
               "config->magic is 0x%08x, expected 0x%08x; initialise it with MOECOMM_CONFIG_INIT", config->magic,
               MOECOMM_CONFIG_MAGIC);
    const int backend = enumValue(config->backend);
    MC_REQUIRE(backend >= moecommBackendAuto && backend <= moecommBackendCuda, moecommInvalidArgument,
               "config->backend is %d, not a moecommBackend_t", backend);
    MC_REQUIRE(config->device >= -1, moecommInvalidArgument, "config->device is %d; use -1 for the current device",
               config->device);
    MC_REQUIRE(config->timeoutMs >= 0, moecommInvalidArgument, "config->timeoutMs is %d; use 0 for the default",
               config->timeoutMs);
    MC_REQUIRE(config->blocking == 0 || config->blocking == 1, moecommInvalidArgument,
               "config->blocking is %d; it must be 0 or 1", config->blocking);
    MC_REQUIRE((config->allocFn == nullptr) == (config->freeFn == nullptr), moecommInvalidArgument,
               "config->allocFn and config->freeFn must be set together");
    if (config->backend != moecommBackendAuto) resolved.backend = config->backend;
    resolved.device = config->device;
    if (config->timeoutMs > 0) resolved.timeoutMs = config->timeoutMs;
    resolved.allocator = {config->allocFn, config->freeFn, config->allocCtx};
  }
  MC_REQUIRE(resolved.timeoutMs > 0, moecommInvalidArgument, "MOECOMM_BOOTSTRAP_TIMEOUT must be positive, got %d",
             resolved.timeoutMs);
  *out = resolved;
  return moecommSuccess;
}

moecommResult_t commCreate(std::unique_ptr<Bootstrap> bootstrap, const ResolvedConfig& config, moecommComm** out) {
  std::unique_ptr<moecommComm> comm(new moecommComm());
  comm->rank = bootstrap->rank();
  comm->nranks = bootstrap->nranks();
  comm->timeoutMs = config.timeoutMs;
  comm->allocator = config.allocator;
  comm->bootstrap = std::move(bootstrap);
  comm->memory.reset(new MemoryRegistry());
  // A local failure still takes part in the exchange, so the peers fail fast instead of
  // waiting for a rank that has given up.
  moecommResult_t local = chooseBackend(config, &comm->backend, &comm->device);
  // Discovery is per process (cached); a broken MOECOMM_TOPO_FILE fails the init here.
  if (local == moecommSuccess) local = topoBuildForRank(comm->device, &comm->topologyJson);
  MC_CHECK(agreeOnCommunicator(comm.get(), local));
  MC_INFO(kLogInit, "rank %d/%d ready: backend %s, device %d, tag %s", comm->rank, comm->nranks,
          comm->backend == moecommBackendCuda ? "cuda" : "host", comm->device, comm->tag.c_str());
  liveComms().add(comm.get());
  *out = comm.release();
  return moecommSuccess;
}

void commAbort(moecommComm* comm) {
  comm->aborted = true;
  comm->raiseAsyncError(moecommRemoteError);
  if (comm->bootstrap) comm->bootstrap->abort();
}

moecommResult_t commDestroy(moecommComm* comm) {
  liveComms().remove(comm);
  // EPs the caller did not destroy are freed here, without communicating (epRelease takes
  // comm->mutex itself, so work on a copy of the list).
  std::vector<moecommEp*> leftover;
  {
    std::lock_guard<std::mutex> lock(comm->mutex);
    leftover = comm->eps;
  }
  for (moecommEp* ep : leftover) epRelease(ep);
  moecommResult_t result = moecommSuccess;
  // Drop our mappings of the peers' memory first (legacy IPC requires closing before the
  // owner frees), then wait until no peer still reads ours. Every rank takes the barrier
  // (the decision must not depend on local state); an aborted comm skips it.
  moecommResult_t detached = comm->memory->detachAllPeers();
  if (!comm->aborted.load() && comm->bootstrap) {
    result = comm->bootstrap->barrier();
  }
  if (result == moecommSuccess) result = detached;
  delete comm;
  return result;
}

}  // namespace moecomm
