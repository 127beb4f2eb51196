// Host-side declarations of the kernel launchers (non-template, no CUDA headers needed).
#pragma once

#include <cstdint>

#include "device/device_host.h"

struct CUstream_st;

namespace moecomm {
namespace device {

// Returns a cudaError_t value (0 = success) so callers need no CUDA header.
int launchLayout(const LayoutParams& params, CUstream_st* stream);

// Intranode normal mode (intranode.cu). Each enqueues the whole collective on stream.
int launchIntranodeNotify(const IntranodeParams& params, CUstream_st* stream);
int launchIntranodeDispatch(const IntranodeParams& params, CUstream_st* stream);
int launchIntranodeCombine(const IntranodeParams& params, CUstream_st* stream);
// Dynamic shared memory of the normal-mode dispatch and combine kernels: the int tables only.
uint64_t intranodeSharedIntsBytes(int numRanks, int numChannels, int sendBatch);
// What a balanced dispatch (IntranodeParams::dispatchBalanced) adds to those bytes.
uint64_t intranodeBalancedExtraBytes(int numRanks, int numChannels);
// All dynamic shared memory a dispatch (op = kOpDispatch) or combine launch of these
// parameters needs, bulk-copy rings included.
uint64_t intranodeSharedBytes(const IntranodeParams& params, int op);
// Developer timeline of the last call of op (kOp*, or kProfileDispatchRouted: the last
// dispatch with a new handle) for `blocks` blocks: fills out[blocks][N] with global-timer
// stamps and returns N, or -1 when the library was built without -DMOECOMM_KERNEL_PROFILE.
int intranodeProfile(int op, int blocks, unsigned long long* out);

}  // namespace device
}  // namespace moecomm
