// Exported expert-parallel functions: the ABI boundary of the EP engine (src/ep).
//
// Each function checks what it needs to find the communicator (a live EP on a usable comm)
// and returns at once if that fails, since there is nobody to tell. Everything else is
// checked by the EP backend, which reports a failure to the peers in the call's first
// synchronisation (see src/ep/ep_host.h), so a bad argument on one rank fails the call on
// every rank promptly instead of leaving the others waiting.
#include "api/guard.h"
#include "ep/ep.h"

using moecomm::checkCommUsable;
using moecomm::checkEpUsable;
using moecomm::guarded;

extern "C" {

MOECOMM_API moecommResult_t moecommEpGetBufferSizeHint(moecommComm_t comm, const moecommEpConfig_t* config,
                                                       size_t* bytes) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    MC_REQUIRE(bytes != nullptr, moecommInvalidArgument, "bytes (the output pointer) is NULL");
    MC_CHECK(moecomm::validateEpConfig(comm->nranks, config));
    return moecomm::epBufferBytes(*comm, *config, bytes);
  });
}

MOECOMM_API moecommResult_t moecommEpCreate(moecommComm_t comm, const moecommEpConfig_t* config, moecommEp_t* ep) {
  return guarded(__func__, [&] {
    MC_CHECK(checkCommUsable(comm));
    if (ep != nullptr) *ep = nullptr;
    return moecomm::epCreate(comm, config, ep);
  });
}

MOECOMM_API moecommResult_t moecommEpDestroy(moecommEp_t ep) {
  return guarded(__func__, [&] {
    MC_REQUIRE(ep != nullptr, moecommInvalidArgument, "ep is NULL");
    MC_REQUIRE(moecomm::liveEps().contains(ep), moecommInvalidUsage,
               "ep %p is not a live EP (destroyed, or never created)", static_cast<void*>(ep));
    // After an abort (or once the communicator is gone) the peers will not synchronise:
    // free this rank's side only.
    if (!moecomm::liveComms().contains(ep->comm) || ep->comm->aborted.load()) {
      moecomm::epRelease(ep);
      return moecommSuccess;
    }
    return moecomm::epDestroy(ep);
  });
}

MOECOMM_API moecommResult_t moecommEpGetLayout(moecommEp_t ep, const moecommEpLayoutArgs_t* args,
                                               moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->getLayout(args, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpNotifyDispatch(moecommEp_t ep, const moecommEpDispatchArgs_t* args,
                                                    moecommEpHandle_t* handle, int* numRecvTokens,
                                                    int* recvTokensPerExpert, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->notifyDispatch(args, handle, numRecvTokens, recvTokensPerExpert, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpDispatch(moecommEp_t ep, const moecommEpDispatchArgs_t* args,
                                              moecommEpHandle_t* handle, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->dispatch(args, handle, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpCombine(moecommEp_t ep, const moecommEpCombineArgs_t* args,
                                             moecommEpHandle_t handle, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->combine(args, handle, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpHandleDestroy(moecommEpHandle_t handle) {
  return guarded(__func__, [&] {
    MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL");
    MC_REQUIRE(moecomm::liveHandles().contains(handle), moecommInvalidUsage,
               "handle %p is not a live EP handle (destroyed, or never created)", static_cast<void*>(handle));
    moecomm::destroyHandle(handle);
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommEpHandleGetNumRecvTokens(moecommEpHandle_t handle, int* numRecvTokens) {
  return guarded(__func__, [&] {
    MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL");
    MC_REQUIRE(numRecvTokens != nullptr, moecommInvalidArgument, "numRecvTokens is NULL");
    MC_REQUIRE(moecomm::liveHandles().contains(handle), moecommInvalidUsage,
               "handle %p is not a live EP handle (destroyed, or never created)", static_cast<void*>(handle));
    MC_CHECK(moecomm::checkHandle(handle->ep, handle, moecomm::EpHandleKind::kNormal));
    *numRecvTokens = handle->numRecvTokens;
    return moecommSuccess;
  });
}

MOECOMM_API moecommResult_t moecommEpHandleGetSourceInfo(moecommEpHandle_t handle, int* srcRank, int* srcIndex,
                                                         int capacity) {
  return guarded(__func__, [&] {
    MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL");
    MC_REQUIRE(moecomm::liveHandles().contains(handle), moecommInvalidUsage,
               "handle %p is not a live EP handle (destroyed, or never created)", static_cast<void*>(handle));
    MC_CHECK(moecomm::checkHandle(handle->ep, handle, moecomm::EpHandleKind::kNormal));
    MC_REQUIRE(handle->sourceInfoKnown, moecommInvalidUsage,
               "the source of each row is known once moecommEpDispatch has run with this handle");
    return handle->ep->backend->sourceInfo(handle, srcRank, srcIndex, capacity);
  });
}

MOECOMM_API moecommResult_t moecommEpLowLatencyDispatch(moecommEp_t ep, const moecommEpLowLatencyDispatchArgs_t* args,
                                                        moecommEpHandle_t* handle, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->lowLatencyDispatch(args, handle, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpLowLatencyCombine(moecommEp_t ep, const moecommEpLowLatencyCombineArgs_t* args,
                                                       moecommEpHandle_t handle, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->lowLatencyCombine(args, handle, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpComplete(moecommEp_t ep, moecommEpHandle_t handle, moecommStream_t stream) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->complete(handle, stream);
  });
}

MOECOMM_API moecommResult_t moecommEpLowLatencyCombineBuffer(moecommEp_t ep, void** buffer) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return ep->backend->lowLatencyCombineBuffer(buffer);
  });
}

MOECOMM_API moecommResult_t moecommEpGetRankMask(moecommEp_t ep, int* mask) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return moecomm::getRankMask(ep, mask);
  });
}

MOECOMM_API moecommResult_t moecommEpSetRankMask(moecommEp_t ep, const int* mask) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    return moecomm::setRankMask(ep, mask);
  });
}

MOECOMM_API moecommResult_t moecommEpClearRankMask(moecommEp_t ep) {
  return guarded(__func__, [&] {
    MC_CHECK(checkEpUsable(ep));
    const std::vector<int> unmasked(ep->rankMask.size(), 0);
    return moecomm::setRankMask(ep, unmasked.data());
  });
}

}  // extern "C"
