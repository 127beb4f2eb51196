#include "ep/ep_args.h"

#include "api/guard.h"
#include "core/error.h"
#include "core/log.h"
#include "ep/dtype.h"

namespace moecomm {
namespace {

const char* modeName(moecommEpMode_t mode) {
  switch (mode) {
    case moecommEpModeNormal:
      return "moecommEpModeNormal";
    case moecommEpModeLowLatency:
      return "moecommEpModeLowLatency";
    case moecommEpModeBoth:
      return "moecommEpModeBoth";
  }
  return "an unknown mode";
}

moecommResult_t checkNormalMode(const moecommEp& ep) {
  MC_REQUIRE(ep.config.mode != moecommEpModeLowLatency, moecommInvalidUsage,
             "this EP was created with %s; normal-mode calls need moecommEpModeNormal or moecommEpModeBoth",
             modeName(ep.config.mode));
  return moecommSuccess;
}

moecommResult_t checkLowLatencyMode(const moecommEp& ep) {
  MC_REQUIRE(ep.config.mode != moecommEpModeNormal, moecommInvalidUsage,
             "this EP was created with %s; low-latency calls need moecommEpModeLowLatency or moecommEpModeBoth",
             modeName(ep.config.mode));
  return moecommSuccess;
}

moecommResult_t checkNumTokens(const moecommEp& ep, int numTokens, const char* structName) {
  MC_REQUIRE(numTokens >= 0 && numTokens <= ep.config.maxTokensPerRank, moecommInvalidArgument,
             "%s->numTokens = %d is outside [0, maxTokensPerRank = %d]", structName, numTokens,
             ep.config.maxTokensPerRank);
  return moecommSuccess;
}

moecommResult_t checkTopkIdxType(const moecommDataType_t& field, const char* structName) {
  const int type = enumValue(field);
  MC_REQUIRE(type == moecommInt64 || type == moecommInt32, moecommInvalidArgument,
             "%s->topkIdxType = %d; expert ids must be moecommInt64 or moecommInt32", structName, type);
  return moecommSuccess;
}

// An input array that must be present whenever there is at least one row.
moecommResult_t requireRows(const void* pointer, int rows, const char* structName, const char* field) {
  MC_REQUIRE(pointer != nullptr || rows == 0, moecommInvalidArgument, "%s->%s is NULL but there are %d rows",
             structName, field, rows);
  return moecommSuccess;
}

moecommResult_t checkFp8Hidden(const moecommEp& ep, const char* what) {
  MC_REQUIRE(ep.config.hidden % kFp8ScaleBlock == 0, moecommInvalidArgument,
             "%s needs hidden %% 128 == 0 (one scale per 128 channels), but hidden is %d", what, ep.config.hidden);
  return moecommSuccess;
}

moecommResult_t checkDispatchTypes(const moecommEp& ep, const moecommEpDispatchArgs_t& args) {
  const char* s = "dispatch args";
  const int xType = enumValue(args.xType);
  MC_REQUIRE(xType == moecommBfloat16 || xType == moecommFloat8E4M3, moecommInvalidArgument,
             "%s->xType = %d; dispatch sends moecommBfloat16 or moecommFloat8E4M3", s, xType);
  MC_CHECK(checkTopkIdxType(args.topkIdxType, s));
  if (args.xType == moecommFloat8E4M3) {
    MC_CHECK(checkFp8Hidden(ep, "FP8 dispatch"));
    MC_CHECK(requireRows(args.xScales, args.numTokens, s, "xScales"));
    MC_REQUIRE(args.recvXScales != nullptr || args.recvCapacity == 0, moecommInvalidArgument,
               "%s->recvXScales is NULL but FP8 dispatch needs it (recvCapacity is %d)", s, args.recvCapacity);
  } else {
    MC_REQUIRE(args.xScales == nullptr && args.recvXScales == nullptr, moecommInvalidArgument,
               "%s: xScales / recvXScales are for FP8 only, but xType is moecommBfloat16", s);
  }
  return moecommSuccess;
}

}  // namespace

moecommResult_t checkLayoutArgs(const moecommEp& ep, const moecommEpLayoutArgs_t* args) {
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_LAYOUT_ARGS_MAGIC, "layout args", "MOECOMM_EP_LAYOUT_ARGS_INIT"));
  MC_CHECK(checkNumTokens(ep, args->numTokens, "layout args"));
  MC_CHECK(checkTopkIdxType(args->topkIdxType, "layout args"));
  MC_CHECK(requireRows(args->topkIdx, args->numTokens, "layout args", "topkIdx"));
  return moecommSuccess;
}

moecommResult_t checkNotifyArgs(const moecommEp& ep, const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                const int* numRecvTokens) {
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_DISPATCH_ARGS_MAGIC, "dispatch args", "MOECOMM_EP_DISPATCH_ARGS_INIT"));
  MC_CHECK(checkNormalMode(ep));
  MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL; pass the address of a moecommEpHandle_t");
  MC_REQUIRE(numRecvTokens != nullptr, moecommInvalidArgument, "numRecvTokens is NULL");
  MC_CHECK(checkNumTokens(ep, args->numTokens, "dispatch args"));
  MC_CHECK(checkTopkIdxType(args->topkIdxType, "dispatch args"));
  MC_CHECK(requireRows(args->topkIdx, args->numTokens, "dispatch args", "topkIdx"));
  MC_REQUIRE(args->expertAlignment >= 1, moecommInvalidArgument, "dispatch args->expertAlignment = %d; it must be >= 1",
             args->expertAlignment);
  return moecommSuccess;
}

moecommResult_t checkDispatchArgs(const moecommEp& ep, const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle) {
  const char* s = "dispatch args";
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_DISPATCH_ARGS_MAGIC, s, "MOECOMM_EP_DISPATCH_ARGS_INIT"));
  MC_CHECK(checkNormalMode(ep));
  MC_REQUIRE(handle != nullptr, moecommInvalidArgument,
             "handle is NULL; pass the address of a moecommEpHandle_t (set to NULL for a new routing)");
  MC_CHECK(checkNumTokens(ep, args->numTokens, s));
  if (*handle != nullptr) {
    MC_CHECK(checkHandle(&ep, *handle, EpHandleKind::kNormal));
    MC_REQUIRE((*handle)->numTokens == args->numTokens, moecommInvalidArgument,
               "%s->numTokens = %d but the reused handle's routing has %d tokens", s, args->numTokens,
               (*handle)->numTokens);
  } else {
    MC_CHECK(requireRows(args->topkIdx, args->numTokens, s, "topkIdx"));
  }
  MC_CHECK(checkDispatchTypes(ep, *args));
  MC_CHECK(requireRows(args->x, args->numTokens, s, "x"));
  if (args->recvTopkIdx != nullptr || args->recvTopkWeights != nullptr) {
    MC_CHECK(requireRows(args->topkIdx, args->numTokens, s, "topkIdx (needed for recvTopkIdx / recvTopkWeights)"));
  }
  MC_REQUIRE(args->expertAlignment >= 1, moecommInvalidArgument, "%s->expertAlignment = %d; it must be >= 1", s,
             args->expertAlignment);
  MC_REQUIRE(args->recvCapacity >= 0, moecommInvalidArgument, "%s->recvCapacity = %d is negative", s,
             args->recvCapacity);
  MC_REQUIRE(args->recvX != nullptr || args->recvCapacity == 0, moecommInvalidArgument,
             "%s->recvX is NULL but recvCapacity is %d", s, args->recvCapacity);
  return moecommSuccess;
}

moecommResult_t checkCombineArgs(const moecommEp& ep, const moecommEpCombineArgs_t* args, moecommEpHandle_t handle) {
  const char* s = "combine args";
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_COMBINE_ARGS_MAGIC, s, "MOECOMM_EP_COMBINE_ARGS_INIT"));
  MC_CHECK(checkNormalMode(ep));
  MC_CHECK(checkHandle(&ep, handle, EpHandleKind::kNormal));
  MC_CHECK(requireRows(args->x, handle->numRecvTokens, s, "x"));
  MC_CHECK(requireRows(args->combinedX, handle->numTokens, s, "combinedX"));
  MC_REQUIRE(args->topkWeights == nullptr || args->combinedTopkWeights != nullptr || handle->numTokens == 0,
             moecommInvalidArgument, "%s->combinedTopkWeights is NULL; it is required when topkWeights is set", s);
  MC_REQUIRE(args->combinedTopkWeights == nullptr || args->topkWeights != nullptr || handle->numRecvTokens == 0,
             moecommInvalidArgument,
             "%s->combinedTopkWeights is set but topkWeights is NULL: there are no weights to carry back", s);
  return moecommSuccess;
}

moecommResult_t checkLowLatencyDispatchArgs(const moecommEp& ep, const moecommEpLowLatencyDispatchArgs_t* args,
                                            moecommEpHandle_t* handle) {
  const char* s = "low-latency dispatch args";
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_LL_DISPATCH_ARGS_MAGIC, s, "MOECOMM_EP_LL_DISPATCH_ARGS_INIT"));
  MC_CHECK(checkLowLatencyMode(ep));
  MC_REQUIRE(handle != nullptr, moecommInvalidArgument, "handle is NULL; pass the address of a moecommEpHandle_t");
  MC_CHECK(checkNumTokens(ep, args->numTokens, s));
  MC_CHECK(checkTopkIdxType(args->topkIdxType, s));
  MC_CHECK(requireRows(args->x, args->numTokens, s, "x"));
  MC_CHECK(requireRows(args->topkIdx, args->numTokens, s, "topkIdx"));
  const unsigned known = MOECOMM_LL_SEND_ONLY | MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0 | MOECOMM_LL_PER_RANK_COMBINE;
  MC_REQUIRE((args->flags & ~known) == 0, moecommInvalidArgument,
             "%s->flags = 0x%x has bits other than MOECOMM_LL_SEND_ONLY, MOECOMM_LL_ROUND_SCALE, MOECOMM_LL_UE8M0 and "
             "MOECOMM_LL_PER_RANK_COMBINE",
             s, args->flags);
  if ((args->flags & MOECOMM_LL_PER_RANK_COMBINE) != 0) {
    MC_CHECK(
        requireRows(args->topkWeights, args->numTokens, s, "topkWeights (MOECOMM_LL_PER_RANK_COMBINE needs them)"));
  } else {
    MC_REQUIRE(args->topkWeights == nullptr, moecommInvalidArgument,
               "%s->topkWeights is set but MOECOMM_LL_PER_RANK_COMBINE is not; the combine takes the weights then", s);
  }
  MC_REQUIRE(args->recvX != nullptr, moecommInvalidArgument, "%s->recvX is NULL", s);
  MC_REQUIRE(args->recvCount != nullptr, moecommInvalidArgument, "%s->recvCount is NULL", s);
  const int recvType = enumValue(args->recvType);
  if (recvType == moecommFloat8E4M3) {
    MC_CHECK(checkFp8Hidden(ep, "FP8 low-latency dispatch"));
    MC_REQUIRE(args->recvScales != nullptr, moecommInvalidArgument, "%s->recvScales is NULL; FP8 needs it", s);
    MC_REQUIRE((args->flags & MOECOMM_LL_UE8M0) == 0 || ep.config.hidden % (4 * kFp8ScaleBlock) == 0,
               moecommInvalidArgument,
               "MOECOMM_LL_UE8M0 packs 4 scale bytes per int32 and needs hidden %% 512 == 0, but hidden is %d",
               ep.config.hidden);
  } else {
    MC_REQUIRE(recvType == moecommBfloat16, moecommInvalidArgument,
               "%s->recvType = %d; it must be moecommFloat8E4M3 or moecommBfloat16", s, recvType);
    MC_REQUIRE(args->recvScales == nullptr, moecommInvalidArgument,
               "%s->recvScales is for FP8 only, but recvType is moecommBfloat16", s);
    MC_REQUIRE((args->flags & (MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0)) == 0, moecommInvalidArgument,
               "%s: MOECOMM_LL_ROUND_SCALE / MOECOMM_LL_UE8M0 apply to FP8 only, but recvType is moecommBfloat16", s);
  }
  return moecommSuccess;
}

moecommResult_t checkLowLatencyCombineArgs(const moecommEp& ep, const moecommEpLowLatencyCombineArgs_t* args,
                                           moecommEpHandle_t handle) {
  const char* s = "low-latency combine args";
  MC_CHECK(checkStructHeader(args, MOECOMM_EP_LL_COMBINE_ARGS_MAGIC, s, "MOECOMM_EP_LL_COMBINE_ARGS_INIT"));
  MC_CHECK(checkLowLatencyMode(ep));
  MC_CHECK(checkHandle(&ep, handle, EpHandleKind::kLowLatency));
  MC_REQUIRE(!handle->failed, moecommInvalidUsage, "the handle's dispatch failed; destroy it");
  MC_REQUIRE(handle->pending == EpPendingHalf::kNone, moecommInvalidUsage,
             "the handle still has a send-only operation in flight; call moecommEpComplete first");
  MC_REQUIRE(handle->dispatchDone, moecommInvalidUsage, "the handle's dispatch has not completed");
  const unsigned known = MOECOMM_LL_SEND_ONLY | MOECOMM_LL_ZERO_COPY;
  MC_REQUIRE((args->flags & ~known) == 0, moecommInvalidArgument,
             "%s->flags = 0x%x has bits other than MOECOMM_LL_SEND_ONLY and MOECOMM_LL_ZERO_COPY", s, args->flags);
  if ((args->flags & MOECOMM_LL_ZERO_COPY) != 0) {
    MC_REQUIRE(ep.zeroCopyBuffer != nullptr, moecommInvalidUsage,
               "MOECOMM_LL_ZERO_COPY is set but moecommEpLowLatencyCombineBuffer was never called on this EP");
    MC_REQUIRE(args->x == nullptr || args->x == ep.zeroCopyBuffer.get(), moecommInvalidArgument,
               "%s->x must be NULL or the moecommEpLowLatencyCombineBuffer buffer with MOECOMM_LL_ZERO_COPY", s);
  } else {
    MC_REQUIRE(args->x != nullptr, moecommInvalidArgument, "%s->x is NULL", s);
  }
  MC_CHECK(checkTopkIdxType(args->topkIdxType, s));
  MC_CHECK(requireRows(args->topkIdx, handle->numTokens, s, "topkIdx"));
  if (handle->perRankCombine) {
    MC_REQUIRE(args->topkWeights == nullptr, moecommInvalidArgument,
               "%s->topkWeights must be NULL: the handle's dispatch used MOECOMM_LL_PER_RANK_COMBINE, so the combine "
               "applies the dispatch's weights",
               s);
  } else {
    MC_CHECK(requireRows(args->topkWeights, handle->numTokens, s, "topkWeights"));
  }
  MC_CHECK(requireRows(args->out, handle->numTokens, s, "out"));
  return moecommSuccess;
}

void warnLowLatencyFormatMismatch(int rank, int source) {
  MC_WARN(kLogEp,
          "rank %d: rank %d's low-latency dispatch used another row format (recvType, MOECOMM_LL_ROUND_SCALE / "
          "MOECOMM_LL_UE8M0, or MOECOMM_LL_PER_RANK_COMBINE) than this rank's for the same operation; its tokens "
          "were treated as absent (moecommInvalidArgument)",
          rank, source);
}

moecommResult_t checkCompleteArgs(const moecommEp& ep, moecommEpHandle_t handle) {
  MC_CHECK(checkHandle(&ep, handle, EpHandleKind::kLowLatency));
  MC_REQUIRE(handle->pending != EpPendingHalf::kNone, moecommInvalidUsage,
             "the handle has no MOECOMM_LL_SEND_ONLY operation waiting to be completed");
  return moecommSuccess;
}

}  // namespace moecomm
