// Argument checks every EP backend shares: struct headers, pointers, shapes, types and flags.
// They read only the argument structs, never the arrays behind them (on the CUDA backend
// those are in GPU memory); checks on array contents (expert ids) are the backend's.
// Each returns moecommInvalidArgument (or InvalidUsage for a valid value used at the wrong
// time) with a sentence naming the field.
#pragma once

#include <cstring>
#include <type_traits>

#include "core/enum_value.h"
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
// A handle with a send-only half waiting for moecommEpComplete.
moecommResult_t checkCompleteArgs(const moecommEp& ep, moecommEpHandle_t handle);

}  // namespace moecomm
