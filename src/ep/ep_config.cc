// EP configuration: validation, buffer planning, and the collective create / destroy.
#include <algorithm>
#include <climits>
#include <string>

#include "api/guard.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "ep/ep.h"
#include "ep/ep_args.h"
#include "ep/ep_cuda.h"
#include "ep/ep_host.h"
#include "transport/host_shm.h"

namespace moecomm {
namespace {

// Buffers past this are certainly a mistake (and their sizes could overflow size_t).
constexpr double kMaxBufferBytes = 1ull << 50;

reference::EpShape shapeOf(int nranks, const moecommEpConfig_t& config) {
  reference::EpShape shape;
  shape.numRanks = nranks;
  shape.numExperts = config.numExperts;
  shape.hidden = config.hidden;
  shape.topk = config.topk;
  shape.maxTokensPerRank = config.maxTokensPerRank;
  return shape;
}

moecommResult_t checkBufferFits(int nranks, const moecommEpConfig_t& config) {
  // Estimated in floating point, so the check itself cannot overflow.
  const double rows = static_cast<double>(nranks) * config.maxTokensPerRank;
  const double normal = rows * (2.0 * config.hidden + 4.0 * config.topk);
  const double lowLatency = 2.0 * (static_cast<double>(config.numExperts) / nranks) * rows * 2.0 * config.hidden;
  MC_REQUIRE(normal + lowLatency < kMaxBufferBytes, moecommInvalidArgument,
             "this EP config needs about %.3g bytes of buffer per rank (numExperts %d, hidden %d, maxTokensPerRank "
             "%d, %d ranks), more than any machine has",
             normal + lowLatency, config.numExperts, config.hidden, config.maxTokensPerRank, nranks);
  return moecommSuccess;
}

// The fields every rank must agree on, as exchanged by moecommEpCreate.
struct ConfigRecord {
  int32_t status;
  int32_t numExperts;
  int32_t hidden;
  int32_t maxTokensPerRank;
  int32_t topk;
  int32_t mode;
  int32_t numSms;
  int32_t reserved;
  uint64_t bufferBytes;
};

// Finds the first field whose value differs from rank 0's.
moecommResult_t compareConfigs(const std::vector<ConfigRecord>& records) {
  struct Field {
    const char* name;
    uint64_t (*get)(const ConfigRecord&);
  };
  static const Field fields[] = {
      {"numExperts", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.numExperts); }},
      {"hidden", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.hidden); }},
      {"maxTokensPerRank", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.maxTokensPerRank); }},
      {"topk", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.topk); }},
      {"mode", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.mode); }},
      {"numSms", [](const ConfigRecord& c) { return static_cast<uint64_t>(c.numSms); }},
      {"bufferBytes", [](const ConfigRecord& c) { return c.bufferBytes; }},
  };
  for (const Field& field : fields) {
    for (size_t r = 1; r < records.size(); ++r) {
      MC_REQUIRE(field.get(records[r]) == field.get(records[0]), moecommInvalidArgument,
                 "EP config field %s differs between ranks: rank 0 passed %llu, rank %zu passed %llu; every rank "
                 "must pass an identical config",
                 field.name, static_cast<unsigned long long>(field.get(records[0])), r,
                 static_cast<unsigned long long>(field.get(records[r])));
    }
  }
  return moecommSuccess;
}

// Collective: exchanges the configs (and each rank's local verdict on its own).
moecommResult_t agreeOnConfig(moecommComm& comm, moecommResult_t localStatus, const moecommEpConfig_t* config) {
  ConfigRecord mine{};
  mine.status = localStatus;
  if (localStatus == moecommSuccess) {
    mine = ConfigRecord{moecommSuccess,     config->numExperts,
                        config->hidden,     config->maxTokensPerRank,
                        config->topk,       static_cast<int32_t>(config->mode),
                        config->numSms,     0,
                        config->bufferBytes};
  }
  const std::string localError = localStatus != moecommSuccess ? lastErrorText() : "";
  std::vector<ConfigRecord> records(comm.nranks);
  const moecommResult_t exchanged = comm.bootstrap->allgather(&mine, records.data(), sizeof(ConfigRecord));
  if (localStatus != moecommSuccess) return setError(localStatus, "%s", localError.c_str());
  MC_CHECK(exchanged);
  for (int r = 0; r < comm.nranks; ++r) {
    MC_REQUIRE(records[r].status == moecommSuccess, moecommRemoteError,
               "rank %d rejected its EP config (%s); its moecommGetLastError says why", r,
               resultName(static_cast<moecommResult_t>(records[r].status)));
  }
  return compareConfigs(records);
}

// This rank's check of its own arguments to moecommEpCreate.
moecommResult_t checkCreateArgs(const moecommComm& comm, const moecommEpConfig_t* config, moecommEp** out) {
  MC_REQUIRE(out != nullptr, moecommInvalidArgument, "ep is NULL; pass the address of a moecommEp_t");
  MC_CHECK(validateEpConfig(comm.nranks, config));
  size_t needed = 0;
  MC_CHECK(epBufferBytes(comm, *config, &needed));
  MC_REQUIRE(config->bufferBytes == 0 || config->bufferBytes >= needed, moecommInvalidArgument,
             "config->bufferBytes = %zu is smaller than the %zu bytes this config needs "
             "(see moecommEpGetBufferSizeHint; 0 picks the hint)",
             config->bufferBytes, needed);
  return moecommSuccess;
}

void registerEp(moecommEp* ep) {
  liveEps().add(ep);
  std::lock_guard<std::mutex> lock(ep->comm->mutex);
  ep->comm->eps.push_back(ep);
}

// The backend-independent part of an EP, from a config every rank agreed on.
std::unique_ptr<moecommEp> newEp(moecommComm* comm, const moecommEpConfig_t& config) {
  std::unique_ptr<moecommEp> ep(new moecommEp());
  ep->comm = comm;
  ep->config = config;
  if (ep->config.numSms == 0) ep->config.numSms = static_cast<int>(envInt(Env::EpNumSms));
  ep->shape = shapeOf(comm->nranks, config);
  ep->rank = comm->rank;
  ep->bufferLayout = planHostEpBuffer(comm->nranks, config);
  ep->rankMask.assign(comm->nranks, 0);
  ep->lowLatencyTimeoutMs = static_cast<int>(std::max<int64_t>(1, envInt(Env::LlTimeout)));
  return ep;
}

// The CUDA backend's create (ep_cuda.cc): the same config agreement, then the NVLink buffer.
moecommResult_t epCreateCuda(moecommComm* comm, const moecommEpConfig_t* config, moecommEp** out) {
#if MOECOMM_HAVE_CUDA
  MC_CHECK(agreeOnConfig(*comm, checkCreateArgs(*comm, config, out), config));
  std::unique_ptr<moecommEp> ep = newEp(comm, *config);
  MC_CHECK(makeCudaEpBackend(ep.get(), &ep->backend));
  MC_INFO(kLogEp, "rank %d: CUDA EP created (E %d, H %d, maxT %d, K %d, mode %d)", comm->rank, config->numExperts,
          config->hidden, config->maxTokensPerRank, config->topk, static_cast<int>(config->mode));
  *out = ep.release();
  registerEp(*out);
  return moecommSuccess;
#else
  return setError(moecommNotSupported, "this build of moecomm has no CUDA support (MOECOMM_CUDA=OFF)");
#endif
}

}  // namespace

moecommResult_t epBufferBytes(const moecommComm& comm, const moecommEpConfig_t& config, size_t* bytes) {
#if MOECOMM_HAVE_CUDA
  if (comm.backend == moecommBackendCuda) return cudaEpBufferBytes(comm, config, bytes);
#endif
  *bytes = planHostEpBuffer(comm.nranks, config).totalBytes;
  return moecommSuccess;
}

moecommResult_t validateEpConfig(int nranks, const moecommEpConfig_t* config) {
  MC_CHECK(checkStructHeader(config, MOECOMM_EP_CONFIG_MAGIC, "config", "MOECOMM_EP_CONFIG_INIT"));
  const moecommEpConfig_t& c = *config;
  MC_REQUIRE(c.numExperts > 0, moecommInvalidArgument, "config->numExperts = %d; it must be > 0", c.numExperts);
  MC_REQUIRE(c.numExperts % nranks == 0, moecommInvalidArgument,
             "config->numExperts = %d is not a multiple of the %d ranks (expert e lives on rank e / (numExperts / "
             "nranks))",
             c.numExperts, nranks);
  MC_REQUIRE(c.hidden > 0, moecommInvalidArgument, "config->hidden = %d; it must be > 0", c.hidden);
  MC_REQUIRE(c.hidden % 8 == 0, moecommInvalidArgument,
             "config->hidden = %d: a BF16 row (2 * hidden bytes) must be a multiple of 16 bytes, so hidden must be a "
             "multiple of 8",
             c.hidden);
  MC_REQUIRE(c.maxTokensPerRank > 0, moecommInvalidArgument, "config->maxTokensPerRank = %d; it must be > 0",
             c.maxTokensPerRank);
  MC_REQUIRE(static_cast<int64_t>(c.maxTokensPerRank) * nranks <= INT_MAX, moecommInvalidArgument,
             "config->maxTokensPerRank = %d times %d ranks does not fit in an int (source info is rank * "
             "maxTokensPerRank + token)",
             c.maxTokensPerRank, nranks);
  MC_REQUIRE(c.topk >= 1 && c.topk <= MOECOMM_MAX_TOPK, moecommInvalidArgument,
             "config->topk = %d is outside [1, MOECOMM_MAX_TOPK = %d]", c.topk, MOECOMM_MAX_TOPK);
  const int mode = enumValue(c.mode);
  MC_REQUIRE(mode == moecommEpModeNormal || mode == moecommEpModeLowLatency || mode == moecommEpModeBoth,
             moecommInvalidArgument,
             "config->mode = %d; it must be moecommEpModeNormal, moecommEpModeLowLatency or moecommEpModeBoth", mode);
  MC_REQUIRE(c.numSms >= 0, moecommInvalidArgument, "config->numSms = %d; it must be >= 0 (0 = MOECOMM_EP_NUM_SMS)",
             c.numSms);
  return checkBufferFits(nranks, c);
}

EpBufferLayout planHostEpBuffer(int nranks, const moecommEpConfig_t& config) {
  const reference::EpShape shape = shapeOf(nranks, config);
  EpBufferLayout layout;
  if (config.mode != moecommEpModeLowLatency) {
    layout.normalBytes = std::max(NormalDispatchRegion(shape).bytes, NormalCombineRegion(shape).bytes);
  }
  if (config.mode != moecommEpModeNormal) {
    layout.lowLatencySlotBytes = std::max(LowLatencyDispatchRegion(shape).bytes, LowLatencyCombineRegion(shape).bytes);
  }
  RegionCursor cursor;
  layout.normalOffset = cursor.take(layout.normalBytes);
  layout.lowLatencyControlOffset = cursor.take(layout.lowLatencySlotBytes > 0 ? sizeof(LowLatencyControl) : 0);
  layout.lowLatencyOffset = cursor.take(kLowLatencySlots * layout.lowLatencySlotBytes);
  layout.totalBytes = cursor.end();
  return layout;
}

moecommResult_t epCreate(moecommComm* comm, const moecommEpConfig_t* config, moecommEp** out) {
  // The same on every rank (the backend was agreed at comm creation), so returning early
  // here leaves nobody waiting.
  if (comm->backend == moecommBackendCuda) return epCreateCuda(comm, config, out);
  MC_REQUIRE(comm->allOnOneHost(), moecommNotSupported,
             "the host EP backend shares memory between ranks, so every rank must be on one host");
  MC_CHECK(agreeOnConfig(*comm, checkCreateArgs(*comm, config, out), config));

  std::unique_ptr<moecommEp> ep = newEp(comm, *config);
  const size_t bytes = config->bufferBytes != 0 ? config->bufferBytes : ep->bufferLayout.totalBytes;
  const std::string name = comm->tag + "-ep" + std::to_string(comm->collectiveSequence++);
  MC_CHECK(ShmSymmetric::create(*comm->bootstrap, name, bytes, &ep->buffer));
  ep->backend = makeHostEpBackend(ep.get());
  MC_INFO(kLogEp, "rank %d: EP created (E %d, H %d, maxT %d, K %d, mode %d), %zu bytes of shared buffer", comm->rank,
          config->numExperts, config->hidden, config->maxTokensPerRank, config->topk, static_cast<int>(config->mode),
          bytes);
  *out = ep.release();
  registerEp(*out);
  return moecommSuccess;
}

namespace {

// Takes ep off comm->eps, so moecommCommGetAsyncError (which polls the listed EPs under the
// comm's mutex) no longer reaches it. Idempotent.
void unlinkEp(moecommEp* ep) {
  if (!liveComms().contains(ep->comm)) return;
  std::lock_guard<std::mutex> lock(ep->comm->mutex);
  auto& eps = ep->comm->eps;
  eps.erase(std::remove(eps.begin(), eps.end(), ep), eps.end());
}

}  // namespace

moecommResult_t epDestroy(moecommEp* ep) {
  // The peers' mappings keep the shared memory alive on their side, so the sync is for
  // agreement, not safety: the EP is freed whatever it returns.
  unlinkEp(ep);
  const moecommResult_t result = ep->backend->destroy();
  epRelease(ep);
  return result;
}

void epRelease(moecommEp* ep) {
  liveEps().remove(ep);
  unlinkEp(ep);
  std::vector<moecommEpHandle*> handles;
  {
    std::lock_guard<std::mutex> lock(ep->mutex);
    handles.assign(ep->handles.begin(), ep->handles.end());
  }
  for (moecommEpHandle* handle : handles) destroyHandle(handle);
  delete ep;
}

}  // namespace moecomm
