// Argument checks every EP backend shares: struct headers, pointers, shapes, types and flags.
// They read only the argument structs, never the arrays behind them (on the CUDA backend
// those are in GPU memory); checks on array contents (expert ids) are the backend's.
// Each returns moecommInvalidArgument (or InvalidUsage for a valid value used at the wrong
// time) with a sentence naming the field.
#pragma once

#include <cstring>
#include <type_traits>

#include "core/enum_value.h"
#include "device/low_latency.h"
#include "ep/ep.h"

namespace moecomm {

moecommResult_t checkLayoutArgs(const moecommEp& ep, const moecommEpLayoutArgs_t* args);

// Notify reads only numTokens, topkIdx, topkIdxType and expertAlignment.
moecommResult_t checkNotifyArgs(const moecommEp& ep, const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                const int* numRecvTokens);
// handle: the caller's in/out slot; *handle is either NULL (new routing) or a handle to reuse.
moecommResult_t checkDispatchArgs(const moecommEp& ep, const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle);
moecommResult_t checkCombineArgs(const moecommEp& ep, const moecommEpCombineArgs_t* args, moecommEpHandle_t handle);

moecommResult_t checkLowLatencyDispatchArgs(const moecommEp& ep, const moecommEpLowLatencyDispatchArgs_t* args,
                                            moecommEpHandle_t* handle);
moecommResult_t checkLowLatencyCombineArgs(const moecommEp& ep, const moecommEpLowLatencyCombineArgs_t* args,
                                           moecommEpHandle_t handle);
// The row format of a low-latency dispatch, which every rank must use in the same operation
// (a receiver treats a source with another one as absent and reports moecommInvalidArgument
// through the async error): FP8 rows, power-of-two scales, the per-rank combine.
inline int lowLatencyFormatOf(const moecommEpLowLatencyDispatchArgs_t& args) {
  return device::lowLatencyFormat(args.recvType == moecommFloat8E4M3,
                                  (args.flags & (MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0)) != 0,
                                  (args.flags & MOECOMM_LL_PER_RANK_COMBINE) != 0);
}
// The warning both backends log when rank `source`'s dispatch had another row format.
void warnLowLatencyFormatMismatch(int rank, int source);

// A handle with a send-only half waiting for moecommEpComplete.
moecommResult_t checkCompleteArgs(const moecommEp& ep, moecommEpHandle_t handle);

}  // namespace moecomm
