// The EP engine's objects: moecommEp (one MoE layer shape on a communicator) and
// moecommEpHandle (one routing), the backend interface every EP call goes through, and the
// engine entry points the API layer calls.
//
// Backends: the engine picks one per EP at creation from comm->backend. The host backend
// (ep_host*.cc) runs everything on CPU memory through a ShmSymmetric buffer; the CUDA
// backend plugs in as another EpBackend (makeEpBackend is the one place that chooses).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "core/comm.h"
#include "core/registry.h"
#include "ep/host_reference.h"
#include "moecomm.h"

namespace moecomm {

class ShmSymmetric;
class EpBackend;

// Two low-latency operations may be in flight (sent, not yet completed).
constexpr int kLowLatencySlots = 2;

// Byte offsets of the regions of one rank's symmetric EP buffer (same on every rank).
// Normal mode: one region that a call publishes its inputs into (dispatch: tokens; combine:
// expert outputs). Low-latency mode: a small control block of per-slot flags, then
// kLowLatencySlots regions, one per in-flight operation.
struct EpBufferLayout {
  size_t normalOffset = 0;
  size_t normalBytes = 0;  // 0 when the mode has no normal region
  size_t lowLatencyControlOffset = 0;
  size_t lowLatencyOffset = 0;     // the first slot
  size_t lowLatencySlotBytes = 0;  // 0 when the mode has no low-latency region
  size_t totalBytes = 0;
};

// Config checks shared by moecommEpGetBufferSizeHint and moecommEpCreate: each bad field is
// moecommInvalidArgument with a sentence naming it.
moecommResult_t validateEpConfig(int nranks, const moecommEpConfig_t* config);
// Regions of the host backend's buffer for a valid config.
EpBufferLayout planHostEpBuffer(int nranks, const moecommEpConfig_t& config);
// The symmetric buffer per rank a valid config needs on comm's backend (moecommEpGetBufferSizeHint).
moecommResult_t epBufferBytes(const moecommComm& comm, const moecommEpConfig_t& config, size_t* bytes);

enum class EpHandleKind { kNormal, kLowLatency };
// The half of a MOECOMM_LL_SEND_ONLY operation that moecommEpComplete still has to run.
enum class EpPendingHalf { kNone, kLowLatencyDispatch, kLowLatencyCombine };

}  // namespace moecomm

struct moecommEp {
  moecommComm* comm = nullptr;
  moecommEpConfig_t config{};  // as validated; numSms resolved from MOECOMM_EP_NUM_SMS when 0
  moecomm::reference::EpShape shape;
  int rank = 0;
  moecomm::EpBufferLayout bufferLayout;
  std::unique_ptr<moecomm::ShmSymmetric> buffer;  // host backend: the symmetric buffer
  std::unique_ptr<moecomm::EpBackend> backend;
  // Bootstrap-synchronised operations (normal mode, destroy) started on this EP; every rank
  // counts the same, so the count names an operation across ranks (checked at every sync).
  uint64_t operationSequence = 0;
  // Low-latency operations started on this EP (they synchronise through flags in the shared
  // buffer instead, and a masked rank may skip them): sequence numbers from 1.
  uint64_t lowLatencySequence = 0;
  // The low-latency operation that last used each slot (0: none yet).
  std::array<uint64_t, moecomm::kLowLatencySlots> slotLastSequence{};
  int lowLatencyTimeoutMs = 0;  // MOECOMM_LL_TIMEOUT
  // Low-latency mode: rankMask[r] != 0 means rank r is skipped (see moecommEpSetRankMask).
  std::vector<int> rankMask;
  // The in-flight operation holding each low-latency buffer slot, or nullptr when free.
  std::array<struct moecommEpHandle*, moecomm::kLowLatencySlots> slotOwners{};
  // Host backend zero-copy combine buffer [E_local, R*maxT, H] BF16, made on first request.
  std::unique_ptr<uint16_t[]> zeroCopyBuffer;
  std::mutex mutex;  // guards handles
  std::unordered_set<struct moecommEpHandle*> handles;
};

struct moecommEpHandle {
  moecommEp* ep = nullptr;
  moecomm::EpHandleKind kind = moecomm::EpHandleKind::kNormal;
  int numTokens = 0;  // T of the call that made the routing

  // ---- normal mode ----
  // [R source][R destination]: tokens each rank sends to each rank (everyone's tokensPerRank).
  std::vector<int> tokensPerRankAll;
  // [R source][E]: each rank's tokensPerExpert (selections per expert).
  std::vector<int> tokensPerExpertAll;
  // [T, R]: this rank's tokens' destinations.
  std::vector<uint8_t> isTokenInRank;
  int numRecvTokens = 0;
  // [N] each: where every received row came from; known after a dispatch ran.
  bool sourceInfoKnown = false;
  std::vector<int> srcRank;
  std::vector<int> srcIndex;

  // ---- low-latency mode ----
  std::vector<int64_t> topkIdx;  // [T, K] of the dispatch, normalized
  std::vector<int> recvCount;    // [E_local]: rows this rank received per local expert
  // [E_local, R*maxT]: source rank * maxT + source token of each received row (first
  // recvCount[le] of each expert valid); the combine sends each row back to its source.
  std::vector<int> recvSrcInfo;
  // MOECOMM_LL_PER_RANK_COMBINE: the combine sums per expert rank with the dispatch's weights
  // (host backend: kept here, [T, K]; CUDA backend: on the device with the routing).
  bool perRankCombine = false;
  std::vector<float> dispatchWeights;
  bool dispatchDone = false;  // the receive half of the dispatch ran
  bool failed = false;        // a half failed; the handle can only be destroyed
  // The in-flight send-only operation, if any, and what its receive half needs.
  moecomm::EpPendingHalf pending = moecomm::EpPendingHalf::kNone;
  int bufferSlot = -1;
  uint64_t pendingSequence = 0;
  moecommEpLowLatencyDispatchArgs_t pendingDispatch{};
  moecommEpLowLatencyCombineArgs_t pendingCombine{};
};

namespace moecomm {

LiveSet<moecommEp>& liveEps();
LiveSet<moecommEpHandle>& liveHandles();

// What an EP call does, per backend. Implementations validate their arguments themselves
// (with the shared checks in ep_args.h) because how a failure is reported to the peers is
// backend-specific.
class EpBackend {
 public:
  virtual ~EpBackend() = default;
  virtual moecommResult_t getLayout(const moecommEpLayoutArgs_t* args, moecommStream_t stream) = 0;
  virtual moecommResult_t notifyDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                         int* numRecvTokens, int* recvTokensPerExpert, moecommStream_t stream) = 0;
  virtual moecommResult_t dispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                   moecommStream_t stream) = 0;
  virtual moecommResult_t combine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle,
                                  moecommStream_t stream) = 0;
  virtual moecommResult_t lowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                             moecommStream_t stream) = 0;
  virtual moecommResult_t lowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                            moecommStream_t stream) = 0;
  virtual moecommResult_t complete(moecommEpHandle_t handle, moecommStream_t stream) = 0;
  virtual moecommResult_t lowLatencyCombineBuffer(void** buffer) = 0;
  // Collective teardown step run by moecommEpDestroy before the EP is freed.
  virtual moecommResult_t destroy() = 0;
  // A handle is being freed: give up any operation it still has in flight.
  virtual void forgetHandle(moecommEpHandle* handle) = 0;
  // Backends that keep a copy of the low-latency rank mask (the CUDA backend's lives on the
  // device): pullRankMask folds in ranks the backend masked by itself (timeouts) before
  // ep->rankMask is read; pushRankMask hands over a mask the caller just set.
  // moecommEpHandleGetSourceInfo once a dispatch ran with the handle: host copies of the source
  // rank and source token of every received row (either output may be NULL).
  virtual moecommResult_t sourceInfo(moecommEpHandle* handle, int* srcRank, int* srcIndex, int capacity);
  virtual void pullRankMask() {}
  virtual moecommResult_t pushRankMask() { return moecommSuccess; }
  // moecommCommGetAsyncError, from any thread: raises on the comm the errors the backend's
  // kernels recorded and no call has collected yet. Must not block or touch call state.
  virtual void pollAsyncErrors() {}
  // How the low-latency kernels reach peers ("nvlink", "staged"; the host backend: "host").
  virtual const char* lowLatencyTransport() const { return "host"; }
};

// ---- Engine entry points (the API layer checks that ep / comm are live first) ----

moecommResult_t epCreate(moecommComm* comm, const moecommEpConfig_t* config, moecommEp** out);
// Collective: synchronises with the peers, then frees the EP and its handles.
moecommResult_t epDestroy(moecommEp* ep);
// Frees the EP and its handles without communicating, and unlinks it from comm->eps (taking
// comm->mutex, so call it without holding that). moecommCommDestroy calls it for every EP
// the caller left in comm->eps, before the comm itself is freed.
void epRelease(moecommEp* ep);
// A live EP on a usable communicator.
moecommResult_t checkEpUsable(const moecommEp* ep);

moecommEpHandle* newHandle(moecommEp* ep, EpHandleKind kind);
void destroyHandle(moecommEpHandle* handle);
// A live handle made on `ep` of the given kind.
moecommResult_t checkHandle(const moecommEp* ep, const moecommEpHandle* handle, EpHandleKind kind);

// The buffer slot of the next low-latency operation n = lowLatencySequence + 1: n %
// kLowLatencySlots, the same on every rank whatever order operations completed in; or
// moecommInvalidUsage when kLowLatencySlots operations are in flight or operation n -
// kLowLatencySlots still holds that slot (every backend's rule).
moecommResult_t acquireLowLatencySlot(const moecommEp& ep, int* slot);

moecommResult_t getRankMask(moecommEp* ep, int* mask);
moecommResult_t setRankMask(moecommEp* ep, const int* mask);

// The host backend (ep_host.cc).
std::unique_ptr<EpBackend> makeHostEpBackend(moecommEp* ep);

}  // namespace moecomm
