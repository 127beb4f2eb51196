// Host backend: the synchronisation protocol, region layouts, layout and lifecycle calls.
#include "ep/ep_host.h"

#include <atomic>
#include <cstring>

#include "core/error.h"
#include "core/log.h"
#include "ep/ep_args.h"
#include "transport/host_shm.h"

namespace moecomm {

// ---- Regions -------------------------------------------------------------------------------

NormalDispatchRegion::NormalDispatchRegion(const reference::EpShape& shape) {
  const size_t tokens = static_cast<size_t>(shape.maxTokensPerRank);
  RegionCursor cursor;
  header = cursor.take(sizeof(NormalDispatchHeader));
  isTokenInRank = cursor.take(tokens * shape.numRanks);
  topkIdx = cursor.take(tokens * shape.topk * sizeof(int64_t));
  topkWeights = cursor.take(tokens * shape.topk * sizeof(float));
  xScales = cursor.take(tokens * shape.scalesPerRow() * sizeof(float));
  x = cursor.take(tokens * shape.hidden * sizeof(uint16_t));  // BF16 is the widest x
  bytes = cursor.end();
}

NormalCombineRegion::NormalCombineRegion(const reference::EpShape& shape) {
  const size_t rows = static_cast<size_t>(shape.numRanks) * shape.maxTokensPerRank;
  RegionCursor cursor;
  header = cursor.take(sizeof(NormalCombineHeader));
  topkWeights = cursor.take(rows * shape.topk * sizeof(float));
  x = cursor.take(rows * shape.hidden * sizeof(uint16_t));
  bytes = cursor.end();
}

LowLatencyDispatchRegion::LowLatencyDispatchRegion(const reference::EpShape& shape) {
  const size_t tokens = static_cast<size_t>(shape.maxTokensPerRank);
  RegionCursor cursor;
  header = cursor.take(sizeof(LowLatencyDispatchHeader));
  topkIdx = cursor.take(tokens * shape.topk * sizeof(int64_t));
  x = cursor.take(tokens * shape.hidden * sizeof(uint16_t));
  bytes = cursor.end();
}

LowLatencyCombineRegion::LowLatencyCombineRegion(const reference::EpShape& shape) {
  const size_t rows = static_cast<size_t>(shape.expertsPerRank()) * shape.lowLatencySlotsPerExpert();
  RegionCursor cursor;
  // After the dispatch's part of the slot, never over it: a dispatch's bytes left in the slot
  // must not be mistaken for the markers of a later combine.
  cursor.take(LowLatencyDispatchRegion(shape).bytes);
  written = cursor.take(rows * sizeof(uint64_t));
  expertOutputs = cursor.take(rows * shape.hidden * sizeof(uint16_t));
  bytes = cursor.end();
}

uint8_t* HostEpBackend::normalRegion(int rank) const {
  return static_cast<uint8_t*>(ep_->buffer->peer(rank)) + ep_->bufferLayout.normalOffset;
}

LowLatencyControl* HostEpBackend::lowLatencyControl(int rank) const {
  return reinterpret_cast<LowLatencyControl*>(static_cast<uint8_t*>(ep_->buffer->peer(rank)) +
                                              ep_->bufferLayout.lowLatencyControlOffset);
}

uint8_t* HostEpBackend::lowLatencySlot(int rank, int slot) const {
  return static_cast<uint8_t*>(ep_->buffer->peer(rank)) + ep_->bufferLayout.lowLatencyOffset +
         static_cast<size_t>(slot) * ep_->bufferLayout.lowLatencySlotBytes;
}

// ---- Synchronisation ---------------------------------------------------------------------

namespace {

struct SyncRecord {
  int32_t status;
  int32_t phase;
  uint64_t sequence;
  int32_t slot;
  int32_t reserved;
};

const char* phaseName(int32_t phase) {
  switch (static_cast<SyncPhase>(phase)) {
    case SyncPhase::kNotify:
      return "moecommEpNotifyDispatch";
    case SyncPhase::kDispatchPublished:
      return "moecommEpDispatch (send)";
    case SyncPhase::kDispatchDone:
      return "moecommEpDispatch (receive)";
    case SyncPhase::kCombinePublished:
      return "moecommEpCombine (send)";
    case SyncPhase::kCombineDone:
      return "moecommEpCombine (receive)";
    case SyncPhase::kDestroy:
      return "moecommEpDestroy";
  }
  return "an unknown EP step";
}

}  // namespace

moecommResult_t HostEpBackend::synchronize(SyncPhase phase, uint64_t sequence, int slot, moecommResult_t localStatus,
                                           const int32_t* payload, std::vector<int32_t>* gathered) {
  const int numRanks = shape().numRanks;
  const size_t payloadBytes = payloadInts() * sizeof(int32_t);
  const size_t recordBytes = sizeof(SyncRecord) + payloadBytes;
  std::vector<uint8_t> mine(recordBytes, 0);
  const SyncRecord record{static_cast<int32_t>(localStatus), static_cast<int32_t>(phase), sequence, slot, 0};
  std::memcpy(mine.data(), &record, sizeof(record));
  if (payload != nullptr) std::memcpy(mine.data() + sizeof(record), payload, payloadBytes);
  std::vector<uint8_t> all(recordBytes * numRanks);
  // The bootstrap orders our stores to the shared buffer before the peers' loads after it;
  // the fences make that explicit for the compiler and for weakly ordered CPUs.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // A rank that failed still takes part, so its peers learn of it instead of waiting; it
  // then reports its own error, whatever the exchange did.
  const std::string localError = localStatus != moecommSuccess ? lastErrorText() : "";
  const moecommResult_t exchanged = ep_->comm->bootstrap->allgather(mine.data(), all.data(), recordBytes);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (localStatus != moecommSuccess) return setError(localStatus, "%s", localError.c_str());
  if (exchanged != moecommSuccess) {
    addErrorContext("EP synchronisation");
    return exchanged;
  }
  std::vector<SyncRecord> records(numRanks);
  for (int r = 0; r < numRanks; ++r) std::memcpy(&records[r], all.data() + r * recordBytes, sizeof(SyncRecord));
  for (int r = 0; r < numRanks; ++r) {
    MC_REQUIRE(records[r].status == moecommSuccess, moecommRemoteError,
               "rank %d failed in %s (%s); its moecommGetLastError says why", r, phaseName(records[r].phase),
               resultName(static_cast<moecommResult_t>(records[r].status)));
  }
  for (int r = 0; r < numRanks; ++r) {
    MC_REQUIRE(records[r].phase == record.phase && records[r].sequence == sequence && records[r].slot == slot,
               moecommInvalidUsage,
               "rank %d is in %s of EP operation #%llu (buffer slot %d) while this rank is in %s of operation #%llu "
               "(slot %d): collective EP calls must be made in the same order on every rank",
               r, phaseName(records[r].phase), static_cast<unsigned long long>(records[r].sequence), records[r].slot,
               phaseName(record.phase), static_cast<unsigned long long>(sequence), slot);
  }
  if (gathered != nullptr) {
    gathered->resize(static_cast<size_t>(numRanks) * payloadInts());
    for (int r = 0; r < numRanks; ++r) {
      std::memcpy(gathered->data() + static_cast<size_t>(r) * payloadInts(),
                  all.data() + r * recordBytes + sizeof(SyncRecord), payloadBytes);
    }
  }
  return moecommSuccess;
}

// ---- Shared helpers ------------------------------------------------------------------------

moecommResult_t readTopkIdx(const reference::EpShape& shape, const void* topkIdx, moecommDataType_t type, int numTokens,
                            std::vector<int64_t>* out) {
  const size_t count = static_cast<size_t>(numTokens) * shape.topk;
  out->resize(count);
  if (count > 0) reference::widenTopkIdx(topkIdx, type, count, out->data());
  return reference::validateTopkIdx(out->data(), numTokens, shape.topk, shape.numExperts);
}

moecommResult_t checkNoWaitEvent(moecommEvent_t event) {
  MC_REQUIRE(event == nullptr, moecommInvalidArgument,
             "waitEvent is set, but events need the CUDA backend; this communicator runs on the host backend");
  return moecommSuccess;
}

// ---- Local calls ----------------------------------------------------------------------------

moecommResult_t HostEpBackend::getLayout(const moecommEpLayoutArgs_t* args, moecommStream_t) {
  MC_CHECK(checkLayoutArgs(*ep_, args));
  std::vector<int64_t> topkIdx;
  // Every id is checked before any output is written.
  MC_CHECK(readTopkIdx(shape(), args->topkIdx, args->topkIdxType, args->numTokens, &topkIdx));
  reference::computeLayout(shape(), topkIdx.data(), args->numTokens, args->tokensPerRank, args->tokensPerExpert,
                           args->isTokenInRank);
  return moecommSuccess;
}

moecommResult_t HostEpBackend::lowLatencyCombineBuffer(void** buffer) {
  MC_REQUIRE(buffer != nullptr, moecommInvalidArgument, "buffer is NULL");
  MC_REQUIRE(ep_->config.mode != moecommEpModeNormal, moecommInvalidUsage,
             "this EP was created with moecommEpModeNormal; the zero-copy buffer is a low-latency feature");
  if (ep_->zeroCopyBuffer == nullptr) {
    // A private buffer: the combine copies its valid rows into the shared slot, so it need
    // not be shared itself. Left uninitialised: the pages are only touched when written.
    const size_t elements =
        static_cast<size_t>(shape().expertsPerRank()) * shape().lowLatencySlotsPerExpert() * shape().hidden;
    ep_->zeroCopyBuffer.reset(new uint16_t[elements]);
  }
  *buffer = ep_->zeroCopyBuffer.get();
  return moecommSuccess;
}

moecommResult_t HostEpBackend::destroy() {
  // Low-latency operations still in flight are abandoned, so peers do not wait on them.
  for (moecommEpHandle* owner : ep_->slotOwners) {
    if (owner != nullptr) forgetHandle(owner);
  }
  return synchronize(SyncPhase::kDestroy, ep_->operationSequence++, -1, moecommSuccess, nullptr, nullptr);
}

std::unique_ptr<EpBackend> makeHostEpBackend(moecommEp* ep) {
  return std::unique_ptr<EpBackend>(new HostEpBackend(ep));
}

}  // namespace moecomm
