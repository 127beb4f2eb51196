// EP object bookkeeping shared by every backend: registries, handles, the rank mask.
#include "ep/ep.h"

#include <algorithm>

#include "api/guard.h"
#include "core/error.h"

namespace moecomm {

LiveSet<moecommEp>& liveEps() {
  static LiveSet<moecommEp>* set = new LiveSet<moecommEp>();  // never destroyed: safe at exit
  return *set;
}

LiveSet<moecommEpHandle>& liveHandles() {
  static LiveSet<moecommEpHandle>* set = new LiveSet<moecommEpHandle>();
  return *set;
}

moecommResult_t checkEpUsable(const moecommEp* ep) {
  MC_REQUIRE(ep != nullptr, moecommInvalidArgument, "ep is NULL");
  MC_REQUIRE(liveEps().contains(ep), moecommInvalidUsage, "ep %p is not a live EP (destroyed, or never created)",
             static_cast<const void*>(ep));
  return checkCommUsable(ep->comm);
}

moecommEpHandle* newHandle(moecommEp* ep, EpHandleKind kind) {
  moecommEpHandle* handle = new moecommEpHandle();
  handle->ep = ep;
  handle->kind = kind;
  {
    std::lock_guard<std::mutex> lock(ep->mutex);
    ep->handles.insert(handle);
  }
  liveHandles().add(handle);
  return handle;
}

void destroyHandle(moecommEpHandle* handle) {
  moecommEp* ep = handle->ep;
  liveHandles().remove(handle);
  // A send-only operation abandoned here gives back its buffer slot.
  if (ep->backend != nullptr) ep->backend->forgetHandle(handle);
  for (auto& owner : ep->slotOwners) {
    if (owner == handle) owner = nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(ep->mutex);
    ep->handles.erase(handle);
  }
  delete handle;
}

moecommResult_t acquireLowLatencySlot(const moecommEp& ep, int* slot) {
  bool allHeld = true;
  for (int i = 0; i < kLowLatencySlots; ++i) allHeld = allHeld && ep.slotOwners[i] != nullptr;
  MC_REQUIRE(!allHeld, moecommInvalidUsage,
             "%d low-latency operations are already in flight (sent with MOECOMM_LL_SEND_ONLY, not completed); "
             "call moecommEpComplete on one of them first",
             kLowLatencySlots);
  // Operation n uses slot n % kLowLatencySlots, the slot of the operation kLowLatencySlots
  // before it: every rank picks the same slot whatever order it completed operations in.
  const uint64_t next = ep.lowLatencySequence + 1;
  const int chosen = static_cast<int>(next % kLowLatencySlots);
  MC_REQUIRE(ep.slotOwners[chosen] == nullptr, moecommInvalidUsage,
             "low-latency operation #%llu uses buffer slot %d, which operation #%llu still holds (sent with "
             "MOECOMM_LL_SEND_ONLY, not completed); operations reuse the slot of the one %d before them, so complete "
             "that one first",
             static_cast<unsigned long long>(next), chosen,
             static_cast<unsigned long long>(ep.slotOwners[chosen]->pendingSequence), kLowLatencySlots);
  *slot = chosen;
  return moecommSuccess;
}

moecommResult_t checkHandle(const moecommEp* ep, const moecommEpHandle* handle, EpHandleKind kind) {
  MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL");
  MC_REQUIRE(liveHandles().contains(handle), moecommInvalidUsage,
             "handle %p is not a live EP handle (destroyed, or never created)", static_cast<const void*>(handle));
  MC_REQUIRE(handle->ep == ep, moecommInvalidArgument,
             "the handle was made on a different EP (%p) than the one it is used with (%p)",
             static_cast<const void*>(handle->ep), static_cast<const void*>(ep));
  if (kind == EpHandleKind::kNormal) {
    MC_REQUIRE(handle->kind == kind, moecommInvalidArgument,
               "the handle comes from moecommEpLowLatencyDispatch; normal-mode calls need one from "
               "moecommEpNotifyDispatch or moecommEpDispatch");
  } else {
    MC_REQUIRE(handle->kind == kind, moecommInvalidArgument,
               "the handle comes from a normal-mode dispatch; low-latency calls need one from "
               "moecommEpLowLatencyDispatch");
  }
  return moecommSuccess;
}

moecommResult_t getRankMask(moecommEp* ep, int* mask) {
  MC_REQUIRE(mask != nullptr, moecommInvalidArgument, "mask is NULL");
  if (ep->backend != nullptr) ep->backend->pullRankMask();
  std::copy(ep->rankMask.begin(), ep->rankMask.end(), mask);
  return moecommSuccess;
}

moecommResult_t setRankMask(moecommEp* ep, const int* mask) {
  MC_REQUIRE(mask != nullptr, moecommInvalidArgument, "mask is NULL (use moecommEpClearRankMask to unmask all)");
  for (size_t r = 0; r < ep->rankMask.size(); ++r) ep->rankMask[r] = mask[r] != 0 ? 1 : 0;
  if (ep->backend != nullptr) MC_CHECK(ep->backend->pushRankMask());
  return moecommSuccess;
}

moecommResult_t EpBackend::sourceInfo(moecommEpHandle* handle, int* srcRank, int* srcIndex, int capacity) {
  const int rows = handle->numRecvTokens;
  MC_REQUIRE(capacity >= rows, moecommInvalidArgument, "capacity = %d is smaller than the %d received rows", capacity,
             rows);
  if (srcRank != nullptr) std::copy(handle->srcRank.begin(), handle->srcRank.end(), srcRank);
  if (srcIndex != nullptr) std::copy(handle->srcIndex.begin(), handle->srcIndex.end(), srcIndex);
  return moecommSuccess;
}

}  // namespace moecomm
