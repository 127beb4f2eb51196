// CUDA EP backend, normal mode (intranode over NVLink): a first correct, not yet fast version.
// One NvlinkSymmetric buffer per EP holds flags, count blocks and staging (see
// device/device_host.h, IntranodeParams); the kernels are in device/intranode.cu.
//
// Host synchronisation: moecommEpNotifyDispatch blocks with cudaStreamSynchronize on the
// caller's stream (the counts come back through mapped pinned memory). moecommEpDispatch
// with *handle == NULL and moecommEpCombine never wait for the GPU. Every call exchanges
// its local argument verdict over the bootstrap first, so a bad argument on one rank fails
// every rank before any kernel is queued. Kernel-side errors (bad expert ids, N above
// recvCapacity, timeouts) are reported through moecommCommGetAsyncError at the next call.
#pragma once

#include <memory>

#include "ep/ep.h"

namespace moecomm {

#if MOECOMM_HAVE_CUDA
// Collective: allocates the symmetric buffer and the backend. nranks must be <= 8.
moecommResult_t makeCudaEpBackend(moecommEp* ep, std::unique_ptr<EpBackend>* out);
// The symmetric bytes per rank this backend allocates for config on comm's device (normal-mode
// buffer, plus the low-latency one unless the mode is normal), with the SM budget resolved as
// the backend does on this rank (the ranks' smallest budget, agreed at create, is never more).
moecommResult_t cudaEpBufferBytes(const moecommComm& comm, const moecommEpConfig_t& config, size_t* bytes);
#endif

}  // namespace moecomm
