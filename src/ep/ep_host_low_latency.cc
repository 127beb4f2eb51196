// Host backend, low-latency mode: moecommEpLowLatencyDispatch / Combine and moecommEpComplete.
//
// These calls do not go through the bootstrap. Each operation gets a sequence number (the
// same on every rank, which makes the same calls in the same order) and one of the
// kLowLatencySlots buffer slots (the first free one: again the same everywhere):
//
//   send half:    wait until the unmasked peers stopped reading what this rank last put in
//                 the slot; publish this rank's inputs there; set status[slot] and then, with
//                 release order, sent[slot] = sequence (a failed send half sets a failure
//                 status, so the peers learn of it at once);
//   receive half: wait (acquire) until every unmasked peer's sent[slot] == sequence; read
//                 their slots; set released[slot] = sequence and free the slot.
//
// The receive half runs in the same call, or with MOECOMM_LL_SEND_ONLY in moecommEpComplete.
// A peer that does not answer within MOECOMM_LL_TIMEOUT, or that has already moved past the
// operation, is masked (with a warning) and skipped from then on: it is not waited on again,
// its tokens are absent, its experts add nothing. A peer whose send half failed fails the
// operation here with moecommRemoteError.
//
// The combine returns every row to where its token came from: the expert rank writes the
// output of (source rank s, token t) for local expert le at [le][s][t] of its slot and marks
// it with the operation's sequence; the token's rank reads the marked rows of each selection.
// With MOECOMM_LL_PER_RANK_COMBINE the same rows are read and reduced per expert rank with
// the dispatch's weights (the host backend moves whole rows either way; the per-rank partial
// is the arithmetic the contract fixes, not a saving here).
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "ep/ep_args.h"
#include "ep/ep_host.h"

namespace moecomm {
namespace {

uint64_t loadAcquire(const uint64_t* flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }
void storeRelease(uint64_t* flag, uint64_t value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

enum class PeerState { kWaiting, kReady, kMovedOn, kFailed };

void maskPeer(moecommEp& ep, int peer, uint64_t sequence, const char* why) {
  ep.rankMask[peer] = 1;
  MC_WARN(kLogEp, "rank %d: rank %d %s in low-latency operation #%llu; masking it (moecommEpGetRankMask shows it)",
          ep.rank, peer, why, static_cast<unsigned long long>(sequence));
}

// Polls check(peer) for every unmasked peer until all are ready, the comm is aborted, or
// MOECOMM_LL_TIMEOUT passes; peers that never answered, or that moved on, are masked. A peer
// reported failed (its status in *failure) fails the wait with moecommRemoteError.
moecommResult_t waitForPeers(moecommEp& ep, uint64_t sequence, const char* what,
                             const std::function<PeerState(int peer, int32_t* failure)>& check) {
  std::vector<int> waiting;
  for (int r = 0; r < ep.shape.numRanks; ++r) {
    if (r != ep.rank && ep.rankMask[r] == 0) waiting.push_back(r);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ep.lowLatencyTimeoutMs);
  for (int polls = 0; !waiting.empty(); ++polls) {
    for (auto it = waiting.begin(); it != waiting.end();) {
      int32_t failure = moecommSuccess;
      const PeerState state = check(*it, &failure);
      MC_REQUIRE(state != PeerState::kFailed, moecommRemoteError,
                 "rank %d failed its side of low-latency operation #%llu (%s); its moecommGetLastError says why", *it,
                 static_cast<unsigned long long>(sequence), resultName(static_cast<moecommResult_t>(failure)));
      if (state == PeerState::kMovedOn) maskPeer(ep, *it, sequence, "had already moved on to a later operation");
      it = state == PeerState::kWaiting ? it + 1 : waiting.erase(it);
    }
    if (waiting.empty()) break;
    MC_REQUIRE(!ep.comm->aborted.load(), moecommInvalidUsage, "comm was aborted while %s", what);
    if (std::chrono::steady_clock::now() > deadline) {
      for (int peer : waiting) maskPeer(ep, peer, sequence, "did not answer within MOECOMM_LL_TIMEOUT");
      break;
    }
    if (polls < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  return moecommSuccess;
}

}  // namespace

// ---- Slots and flags ----------------------------------------------------------------------

moecommResult_t HostEpBackend::waitSlotReusable(int slot) {
  const uint64_t previous = ep_->slotLastSequence[slot];
  if (previous == 0) return moecommSuccess;
  return waitForPeers(*ep_, previous, "waiting for peers to finish reading a low-latency buffer slot",
                      [&](int peer, int32_t*) {
                        return loadAcquire(&lowLatencyControl(peer)->released[slot]) >= previous ? PeerState::kReady
                                                                                                 : PeerState::kWaiting;
                      });
}

moecommResult_t HostEpBackend::waitPeersSent(int slot, uint64_t sequence) {
  return waitForPeers(*ep_, sequence, "waiting for peers' low-latency data", [&](int peer, int32_t* failure) {
    const LowLatencyControl* control = lowLatencyControl(peer);
    const uint64_t sent = loadAcquire(&control->sent[slot]);
    if (sent < sequence) return PeerState::kWaiting;
    if (sent > sequence) return PeerState::kMovedOn;
    *failure = control->status[slot];
    return *failure == moecommSuccess ? PeerState::kReady : PeerState::kFailed;
  });
}

void HostEpBackend::signalSent(int slot, uint64_t sequence, moecommResult_t status) {
  LowLatencyControl* control = lowLatencyControl(ep_->rank);
  control->status[slot] = status;
  storeRelease(&control->sent[slot], sequence);
  ep_->slotLastSequence[slot] = sequence;
  if (status != moecommSuccess) storeRelease(&control->released[slot], sequence);  // nothing more to read
}

void HostEpBackend::finishSlot(moecommEpHandle* handle) {
  const int slot = handle->bufferSlot;
  if (slot < 0) return;
  storeRelease(&lowLatencyControl(ep_->rank)->released[slot], handle->pendingSequence);
  if (ep_->slotOwners[slot] == handle) ep_->slotOwners[slot] = nullptr;
  handle->bufferSlot = -1;
  handle->pending = EpPendingHalf::kNone;
}

void HostEpBackend::forgetHandle(moecommEpHandle* handle) { finishSlot(handle); }

moecommResult_t HostEpBackend::sendLowLatency(moecommEpHandle* handle, int slot, uint64_t sequence,
                                              moecommResult_t status) {
  signalSent(slot, sequence, status);
  if (status != moecommSuccess) return status;
  handle->bufferSlot = slot;
  handle->pendingSequence = sequence;
  ep_->slotOwners[slot] = handle;
  return moecommSuccess;
}

moecommResult_t HostEpBackend::finishLowLatency(moecommEpHandle* handle) {
  const bool isDispatch = handle->pending == EpPendingHalf::kLowLatencyDispatch;
  moecommResult_t status = waitPeersSent(handle->bufferSlot, handle->pendingSequence);
  if (status == moecommSuccess) {
    status = isDispatch ? receiveLowLatencyDispatch(handle) : receiveLowLatencyCombine(handle);
  }
  MC_TRACE(kLogEp, "rank %d low-latency %s #%llu finished: %s", ep_->rank, isDispatch ? "dispatch" : "combine",
           static_cast<unsigned long long>(handle->pendingSequence), resultName(status));
  finishSlot(handle);
  if (isDispatch) {
    // A dispatch that did not finish leaves no routing to combine with.
    handle->dispatchDone = status == moecommSuccess;
    handle->failed = status != moecommSuccess;
  }
  return status;
}

// ---- Dispatch -------------------------------------------------------------------------------

moecommResult_t HostEpBackend::publishLowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args, int slot,
                                                         std::vector<int64_t>* topkIdx) {
  MC_CHECK(readTopkIdx(shape(), args->topkIdx, args->topkIdxType, args->numTokens, topkIdx));
  const LowLatencyDispatchRegion region(shape());
  uint8_t* base = lowLatencySlot(ep_->rank, slot);
  const LowLatencyDispatchHeader header{args->numTokens, lowLatencyFormatOf(*args)};
  std::memcpy(base + region.header, &header, sizeof(header));
  if (args->numTokens > 0) {
    // memcpy from an empty vector's data() (possibly NULL) is undefined even for 0 bytes.
    std::memcpy(base + region.topkIdx, topkIdx->data(), topkIdx->size() * sizeof(int64_t));
    std::memcpy(base + region.x, args->x, static_cast<size_t>(args->numTokens) * shape().hidden * sizeof(uint16_t));
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::receiveLowLatencyDispatch(moecommEpHandle* handle) {
  const moecommEpLowLatencyDispatchArgs_t& args = handle->pendingDispatch;
  const LowLatencyDispatchRegion region(shape());
  std::vector<reference::LowLatencySource> sources(shape().numRanks);
  for (int s = 0; s < shape().numRanks; ++s) {
    if (ep_->rankMask[s] != 0) continue;  // skipped: its slot is not read at all
    const uint8_t* base = lowLatencySlot(s, handle->bufferSlot);
    LowLatencyDispatchHeader header;
    std::memcpy(&header, base + region.header, sizeof(header));
    if (header.format != lowLatencyFormatOf(args)) {
      // As on the CUDA backend (whose senders cast): the source is absent for this operation.
      warnLowLatencyFormatMismatch(ep_->rank, s);
      ep_->comm->raiseAsyncError(moecommInvalidArgument);
      continue;
    }
    sources[s].numTokens = std::min(std::max(header.numTokens, 0), shape().maxTokensPerRank);
    sources[s].topkIdx = reinterpret_cast<const int64_t*>(base + region.topkIdx);
    sources[s].x = reinterpret_cast<const uint16_t*>(base + region.x);
  }
  const int localExperts = shape().expertsPerRank();
  const int slotsPerExpert = shape().lowLatencySlotsPerExpert();
  handle->recvSrcInfo.assign(static_cast<size_t>(localExperts) * slotsPerExpert, -1);
  reference::LowLatencyDispatchOutput out;
  out.recvType = args.recvType;
  out.roundScale = (args.flags & (MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0)) != 0;
  out.ue8m0 = (args.flags & MOECOMM_LL_UE8M0) != 0;
  out.recvX = args.recvX;
  out.recvScales = args.recvScales;
  out.recvCount = args.recvCount;
  out.recvSrcInfo = handle->recvSrcInfo.data();
  out.cumulativeRecvStats = args.cumulativeRecvStats;
  reference::lowLatencyPack(shape(), ep_->rank, sources.data(), ep_->rankMask.data(), out);
  handle->recvCount.assign(args.recvCount, args.recvCount + localExperts);
  if (args.recvSrcInfo != nullptr) {
    for (int le = 0; le < localExperts; ++le) {
      const size_t first = static_cast<size_t>(le) * slotsPerExpert;
      std::copy(handle->recvSrcInfo.begin() + first, handle->recvSrcInfo.begin() + first + handle->recvCount[le],
                args.recvSrcInfo + first);
    }
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::lowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args,
                                                  moecommEpHandle_t* handle, moecommStream_t) {
  int slot = -1;
  MC_CHECK(acquireLowLatencySlot(*ep_, &slot));
  const uint64_t sequence = ++ep_->lowLatencySequence;
  moecommResult_t status = checkLowLatencyDispatchArgs(*ep_, args, handle);
  if (status == moecommSuccess) status = checkNoWaitEvent(args->waitEvent);
  const std::string localError = status != moecommSuccess ? lastErrorText() : "";
  MC_CHECK(waitSlotReusable(slot));
  std::vector<int64_t> topkIdx;
  if (status == moecommSuccess) status = publishLowLatencyDispatch(args, slot, &topkIdx);
  if (status != moecommSuccess) {
    const std::string text = localError.empty() ? lastErrorText() : localError;
    signalSent(slot, sequence, status);
    return setError(status, "%s", text.c_str());
  }
  moecommEpHandle* created = newHandle(ep_, EpHandleKind::kLowLatency);
  created->numTokens = args->numTokens;
  created->topkIdx = std::move(topkIdx);
  // MOECOMM_LL_PER_RANK_COMBINE: the combine applies these weights (host memory here), so
  // they are copied now; the combine's own topkWeights is NULL.
  created->perRankCombine = (args->flags & MOECOMM_LL_PER_RANK_COMBINE) != 0;
  if (created->perRankCombine && args->numTokens > 0) {
    created->dispatchWeights.assign(args->topkWeights, args->topkWeights + created->topkIdx.size());
  }
  created->pending = EpPendingHalf::kLowLatencyDispatch;
  created->pendingDispatch = *args;
  MC_CHECK(sendLowLatency(created, slot, sequence, moecommSuccess));
  *handle = created;
  if ((args->flags & MOECOMM_LL_SEND_ONLY) != 0) return moecommSuccess;
  const moecommResult_t result = finishLowLatency(created);
  if (result != moecommSuccess) {
    const std::string text = lastErrorText();
    destroyHandle(created);
    *handle = nullptr;
    return setError(result, "%s", text.c_str());
  }
  return moecommSuccess;
}

// ---- Combine --------------------------------------------------------------------------------

moecommResult_t HostEpBackend::publishLowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args,
                                                        moecommEpHandle_t handle, int slot, uint64_t sequence) {
  const LowLatencyCombineRegion region(shape());
  const bool zeroCopy = (args->flags & MOECOMM_LL_ZERO_COPY) != 0;
  const uint16_t* source = zeroCopy ? ep_->zeroCopyBuffer.get() : static_cast<const uint16_t*>(args->x);
  uint8_t* base = lowLatencySlot(ep_->rank, slot);
  uint64_t* written = reinterpret_cast<uint64_t*>(base + region.written);
  uint16_t* outputs = reinterpret_cast<uint16_t*>(base + region.expertOutputs);
  const size_t hidden = static_cast<size_t>(shape().hidden);
  const int maxTokens = shape().maxTokensPerRank;
  const int slotsPerExpert = shape().lowLatencySlotsPerExpert();
  // Only the rows the dispatch filled are valid; each goes back to its token's place.
  for (int le = 0; le < shape().expertsPerRank(); ++le) {
    for (int received = 0; received < handle->recvCount[le]; ++received) {
      const size_t from = static_cast<size_t>(le) * slotsPerExpert + received;
      const int src = handle->recvSrcInfo[from];
      const size_t row = region.rowIndex(shape(), le, src / maxTokens, src % maxTokens);
      std::memcpy(outputs + row * hidden, source + from * hidden, hidden * sizeof(uint16_t));
      written[row] = sequence;
    }
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::receiveLowLatencyCombine(moecommEpHandle* handle) {
  const moecommEpLowLatencyCombineArgs_t& args = handle->pendingCombine;
  const LowLatencyCombineRegion region(shape());
  const size_t entries = handle->topkIdx.size();
  const int localExperts = shape().expertsPerRank();
  const size_t hidden = static_cast<size_t>(shape().hidden);
  std::vector<const uint16_t*> rows(entries, nullptr);
  for (size_t entry = 0; entry < entries; ++entry) {
    const int64_t expert = handle->topkIdx[entry];
    if (expert == -1) continue;
    const int rank = shape().rankOfExpert(expert);
    if (ep_->rankMask[rank] != 0) continue;
    const uint8_t* base = lowLatencySlot(rank, handle->bufferSlot);
    const size_t row = region.rowIndex(shape(), static_cast<int>(expert % localExperts), ep_->rank,
                                       static_cast<int>(entry / shape().topk));
    // Not written by this operation: the expert's rank did not receive the token (it had
    // this rank masked when the dispatch ran).
    if (reinterpret_cast<const uint64_t*>(base + region.written)[row] != handle->pendingSequence) continue;
    rows[entry] = reinterpret_cast<const uint16_t*>(base + region.expertOutputs) + row * hidden;
  }
  uint16_t* out = static_cast<uint16_t*>(args.out);
  if (handle->perRankCombine) {
    // args.topkWeights is NULL here: the dispatch's weights apply, summed per expert rank.
    reference::lowLatencyCombineRowsPerRank(shape(), handle->numTokens, handle->topkIdx.data(),
                                            handle->dispatchWeights.data(), rows.data(), out);
  } else {
    reference::lowLatencyCombineRows(shape(), handle->numTokens, args.topkWeights, rows.data(), out);
  }
  return moecommSuccess;
}

namespace {

// The combine must name the dispatch's expert ids (the header says so): checked, since a
// mismatch would silently weight the wrong rows.
moecommResult_t checkSameTopkIdx(const reference::EpShape& shape, const moecommEpLowLatencyCombineArgs_t& args,
                                 const moecommEpHandle& handle) {
  std::vector<int64_t> topkIdx;
  MC_CHECK(readTopkIdx(shape, args.topkIdx, args.topkIdxType, handle.numTokens, &topkIdx));
  for (size_t i = 0; i < topkIdx.size(); ++i) {
    MC_REQUIRE(topkIdx[i] == handle.topkIdx[i], moecommInvalidArgument,
               "low-latency combine args->topkIdx[%zu][%zu] = %lld but the handle's dispatch used %lld", i / shape.topk,
               i % shape.topk, static_cast<long long>(topkIdx[i]), static_cast<long long>(handle.topkIdx[i]));
  }
  return moecommSuccess;
}

}  // namespace

moecommResult_t HostEpBackend::lowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                                 moecommStream_t) {
  int slot = -1;
  MC_CHECK(acquireLowLatencySlot(*ep_, &slot));
  const uint64_t sequence = ++ep_->lowLatencySequence;
  moecommResult_t status = checkLowLatencyCombineArgs(*ep_, args, handle);
  if (status == moecommSuccess) status = checkNoWaitEvent(args->waitEvent);
  if (status == moecommSuccess) status = checkSameTopkIdx(shape(), *args, *handle);
  const std::string localError = status != moecommSuccess ? lastErrorText() : "";
  MC_CHECK(waitSlotReusable(slot));
  if (status != moecommSuccess) {
    signalSent(slot, sequence, status);
    return setError(status, "%s", localError.c_str());
  }
  MC_CHECK(publishLowLatencyCombine(args, handle, slot, sequence));
  handle->pending = EpPendingHalf::kLowLatencyCombine;
  handle->pendingCombine = *args;
  MC_CHECK(sendLowLatency(handle, slot, sequence, moecommSuccess));
  if ((args->flags & MOECOMM_LL_SEND_ONLY) != 0) return moecommSuccess;
  return finishLowLatency(handle);
}

moecommResult_t HostEpBackend::complete(moecommEpHandle_t handle, moecommStream_t) {
  // Nothing is sent here, so a bad handle concerns this rank only.
  MC_CHECK(checkCompleteArgs(*ep_, handle));
  return finishLowLatency(handle);
}

}  // namespace moecomm
