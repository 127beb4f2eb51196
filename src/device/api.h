// Host-side declarations of the kernel launchers (non-template, no CUDA headers needed).
#pragma once

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

}  // namespace device
}  // namespace moecomm
