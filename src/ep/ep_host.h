// The host EP backend: every EP call on CPU memory, ranks as processes or threads sharing a
// ShmSymmetric buffer. Each normal-mode collective call follows one protocol:
//
//   1. check the arguments and publish this rank's inputs into its own region of the buffer;
//   2. synchronise: an allgather of {status, phase, operation number, small payload} through
//      the bootstrap, which is also the barrier that makes the published bytes visible;
//   3. if every rank is fine, read what this rank needs from the peers' regions and compute
//      its outputs with the pure functions of host_reference.h;
//   4. synchronise again, so nobody overwrites its region while a peer may still read it.
//
// A failure on any rank at step 1 or 3 travels in the next synchronisation: the rank at
// fault returns its own code and sentence, every other rank moecommRemoteError, and nobody
// is left waiting.
//
// Low-latency calls synchronise through flags in the shared buffer instead, so that a rank
// that stopped answering is skipped rather than waited on (see ep_host_low_latency.cc).
//
// The file is split by mode: ep_host.cc (protocol, layout, lifecycle), ep_host_normal.cc,
// ep_host_low_latency.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ep/ep.h"

namespace moecomm {

// 64-byte aligned sub-allocation of a region.
class RegionCursor {
 public:
  size_t take(size_t bytes) {
    const size_t at = (cursor_ + 63) / 64 * 64;
    cursor_ = at + bytes;
    return at;
  }
  size_t end() const { return (cursor_ + 63) / 64 * 64; }

 private:
  size_t cursor_ = 0;
};

// ---- What each call publishes (offsets inside the normal region / a low-latency slot) ----

struct NormalDispatchHeader {
  int32_t numTokens;
  int32_t xType;
  int32_t hasTopkIdx;
  int32_t hasTopkWeights;
};
struct NormalDispatchRegion {
  size_t header, isTokenInRank, topkIdx, topkWeights, xScales, x, bytes;
  explicit NormalDispatchRegion(const reference::EpShape& shape);
};

struct NormalCombineHeader {
  int32_t numRows;
  int32_t hasTopkWeights;
};
struct NormalCombineRegion {
  size_t header, topkWeights, x, bytes;
  explicit NormalCombineRegion(const reference::EpShape& shape);
};

// Per-rank flags of the low-latency protocol, at the start of the low-latency region. A rank
// writes only its own; peers read them. Sequence numbers start at 1 (0 = nothing yet).
struct LowLatencyControl {
  uint64_t sent[kLowLatencySlots];      // operation whose send half is in the slot
  uint64_t released[kLowLatencySlots];  // operation whose peers' slot data this rank stopped reading
  int32_t status[kLowLatencySlots];     // moecommResult_t of the send half of `sent`
};

struct LowLatencyDispatchHeader {
  int32_t numTokens;
  int32_t format;  // lowLatencyFormatOf the sender's args: receivers with another one skip it
};
struct LowLatencyDispatchRegion {
  size_t header, topkIdx, x, bytes;
  explicit LowLatencyDispatchRegion(const reference::EpShape& shape);
};

// The combine sends every row back to where its token came from: expert outputs indexed by
// [local expert][source rank][source token], each marked with the operation that wrote it.
// Offsets are from the slot's start; the region lies after the dispatch's, so `bytes` is the
// whole slot.
struct LowLatencyCombineRegion {
  size_t written, expertOutputs, bytes;
  explicit LowLatencyCombineRegion(const reference::EpShape& shape);
  size_t rowIndex(const reference::EpShape& shape, int localExpert, int sourceRank, int sourceToken) const {
    return (static_cast<size_t>(localExpert) * shape.numRanks + sourceRank) * shape.maxTokensPerRank + sourceToken;
  }
};

// Names the step of the protocol a synchronisation belongs to; ranks must agree on it.
enum class SyncPhase : int32_t {
  kNotify = 1,
  kDispatchPublished,
  kDispatchDone,
  kCombinePublished,
  kCombineDone,
  kDestroy,
};

class HostEpBackend final : public EpBackend {
 public:
  explicit HostEpBackend(moecommEp* ep) : ep_(ep) {}

  moecommResult_t getLayout(const moecommEpLayoutArgs_t* args, moecommStream_t stream) override;
  moecommResult_t notifyDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle, int* numRecvTokens,
                                 int* recvTokensPerExpert, moecommStream_t stream) override;
  moecommResult_t dispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                           moecommStream_t stream) override;
  moecommResult_t combine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle,
                          moecommStream_t stream) override;
  moecommResult_t lowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                     moecommStream_t stream) override;
  moecommResult_t lowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                    moecommStream_t stream) override;
  moecommResult_t complete(moecommEpHandle_t handle, moecommStream_t stream) override;
  moecommResult_t lowLatencyCombineBuffer(void** buffer) override;
  moecommResult_t destroy() override;
  void forgetHandle(moecommEpHandle* handle) override;

 private:
  // Counts carried by every synchronisation: [R] tokens per rank then [E] tokens per expert.
  int payloadInts() const { return shape().numRanks + shape().numExperts; }
  // Step 2/4 of the protocol. payload (payloadInts() ints) may be null (zeros are sent);
  // gathered, when not null, receives every rank's payload [R][payloadInts()].
  moecommResult_t synchronize(SyncPhase phase, uint64_t sequence, int slot, moecommResult_t localStatus,
                              const int32_t* payload, std::vector<int32_t>* gathered);
  const reference::EpShape& shape() const { return ep_->shape; }
  uint8_t* normalRegion(int rank) const;
  uint8_t* lowLatencySlot(int rank, int slot) const;
  LowLatencyControl* lowLatencyControl(int rank) const;

  // ---- normal mode (ep_host_normal.cc) ----
  struct DispatchPlan;
  moecommResult_t prepareDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle, DispatchPlan* plan);
  moecommResult_t publishDispatch(const moecommEpDispatchArgs_t& args, const DispatchPlan& plan);
  moecommResult_t receiveDispatch(const moecommEpDispatchArgs_t& args, DispatchPlan* plan,
                                  const std::vector<int32_t>& gathered);
  moecommResult_t checkDispatchSources(const moecommEpDispatchArgs_t& args, const DispatchPlan& plan);
  moecommResult_t publishCombine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle);
  moecommResult_t receiveCombine(const moecommEpCombineArgs_t& args, const moecommEpHandle& handle);

  // ---- low-latency mode (ep_host_low_latency.cc) ----
  // Waits until the unmasked peers stopped reading what this rank last put in `slot`.
  moecommResult_t waitSlotReusable(int slot);
  // Waits until every unmasked peer sent operation `sequence` in `slot`; masks the silent.
  moecommResult_t waitPeersSent(int slot, uint64_t sequence);
  void signalSent(int slot, uint64_t sequence, moecommResult_t status);
  // This rank reads nothing more of operation `sequence`: signal it and free the slot.
  void finishSlot(moecommEpHandle* handle);
  moecommResult_t publishLowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args, int slot,
                                            std::vector<int64_t>* topkIdx);
  moecommResult_t receiveLowLatencyDispatch(moecommEpHandle* handle);
  moecommResult_t publishLowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                           int slot, uint64_t sequence);
  moecommResult_t receiveLowLatencyCombine(moecommEpHandle* handle);
  // The send half's end: signal `status` to the peers, and on success record the pending half.
  moecommResult_t sendLowLatency(moecommEpHandle* handle, int slot, uint64_t sequence, moecommResult_t status);
  // The receive half, from moecommEpComplete or straight after the send half.
  moecommResult_t finishLowLatency(moecommEpHandle* handle);

  moecommEp* ep_;
};

// Copies and checks expert ids: out gets count int64 ids (validateTopkIdx on them).
moecommResult_t readTopkIdx(const reference::EpShape& shape, const void* topkIdx, moecommDataType_t type, int numTokens,
                            std::vector<int64_t>* out);
// The events of the CUDA backend do not exist here.
moecommResult_t checkNoWaitEvent(moecommEvent_t event);

}  // namespace moecomm
