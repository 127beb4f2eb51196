// CUDA EP backend, low-latency (decode) mode over NVLink: what CudaEpBackend delegates its
// moecommEpLowLatencyDispatch / Combine, moecommEpComplete and
// moecommEpLowLatencyCombineBuffer to. docs/ep-low-latency-gpu.md describes the design.
//
// One object per EP (mode LowLatency or Both) owns:
//   - its own NvlinkSymmetric buffer (flags and two slots; device/low_latency.h has the map);
//   - a small device state (per-slot sequence numbers, block counters, the device rank mask);
//   - mapped host words through which kernels report masked ranks and bad expert ids;
//   - per-handle routing arrays on the device (what a dispatch received, for its combine),
//     taken from a pool so that no allocation happens while a stream is being captured;
//   - the zero-copy combine buffer, made on first request.
// Host-side bookkeeping (slot owners, pending halves, the third-in-flight InvalidUsage) is
// the same as the host backend's, on the same moecommEp fields. No call synchronises with
// the GPU: sequence numbers live on the device, so CUDA graphs may capture and replay any
// of the calls.
#pragma once

#if MOECOMM_HAVE_CUDA

#include <memory>
#include <unordered_map>
#include <vector>

#include "device/low_latency.h"
#include "ep/ep.h"

namespace moecomm {

class NvlinkSymmetric;

class CudaLowLatency {
 public:
  // Collective over ep->comm (allocates the symmetric buffer).
  // numBlocks: the grid of every kernel, the same on every rank (the normal mode's channel count).
  static moecommResult_t create(moecommEp* ep, int numBlocks, std::unique_ptr<CudaLowLatency>* out);
  // The buffer layout for shape and grid size numBlocks into p's shape, grid and offset
  // fields; returns the symmetric bytes per rank.
  static uint64_t planBuffer(const reference::EpShape& shape, int numBlocks, device::LowLatencyParams* p);
  ~CudaLowLatency();
  CudaLowLatency(const CudaLowLatency&) = delete;
  CudaLowLatency& operator=(const CudaLowLatency&) = delete;

  moecommResult_t dispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                           moecommStream_t stream);
  moecommResult_t combine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                          moecommStream_t stream);
  moecommResult_t complete(moecommEpHandle_t handle, moecommStream_t stream);
  moecommResult_t combineBuffer(void** buffer);

  // A handle is being freed: its routing arrays go back to the pool.
  void forgetHandle(moecommEpHandle* handle);
  // Errors the kernels recorded (bad ids, a peer's failed call) onto the comm's async error;
  // safe on any thread (moecommCommGetAsyncError).
  void pollAsyncErrors();
  // Ranks the kernels masked by themselves (timeouts) into ep->rankMask.
  void pullRankMask();
  // ep->rankMask (just set by the caller) onto the device.
  moecommResult_t pushRankMask();
  // Collective teardown, before the barrier of moecommEpDestroy: unmaps the peers' buffers.
  moecommResult_t detachPeers();
  // The transport of the kernels (MOECOMM_LL_TRANSPORT): "nvlink" or "staged".
  const char* transportName() const { return mirror_ != nullptr ? "staged" : "nvlink"; }
  // Builds with -DMOECOMM_KERNEL_PROFILE only: logs the timeline of the last call of each kernel.
  void logProfile();

 private:
  struct Routing {
    void* block = nullptr;  // one cudaMalloc holding every array
    device::LowLatencyRouting arrays{};
    void* sentEvent = nullptr;  // cudaEvent_t recorded after a send-only half (not under capture)
    bool sentRecorded = false;  // false also for a send-only half queued under stream capture
  };

  explicit CudaLowLatency(moecommEp* ep);
  moecommResult_t init(int numBlocks);
  void release();
  moecommResult_t takeRouting(moecommStream_t stream, Routing* out);
  moecommResult_t allocateRouting(Routing* out);
  device::LowLatencyParams callParams(int slot, const Routing& routing) const;
  // Frees the slot of handle's pending operation, after enqueueing its receive half when
  // `launch` (send-only calls; otherwise the operation's one kernel ran both halves).
  moecommResult_t finish(moecommEpHandle* handle, moecommStream_t stream, bool launch);
  // After the launch of an operation's send half (and, unless send-only, its receive half):
  // handle owns the slot until its receive half is queued, now or by moecommEpComplete.
  moecommResult_t afterSend(moecommEpHandle* handle, EpPendingHalf half, int slot, bool sendOnly,
                            moecommStream_t stream);
  // dispatch / combine after the slot is taken; *launched once the kernel is queued (the
  // operation is then consumed on the device).
  moecommResult_t startDispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                moecommStream_t stream, int slot, bool* launched);
  moecommResult_t startCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                               moecommStream_t stream, int slot, bool* launched);
  // A call that took `slot` and failed before its kernel was queued: the operation is consumed
  // anyway, on the host (sequence) and on the device (launchLowLatencyFailed on the stream), so
  // this rank's next call pairs with its peers' next one and the peers learn of the failure
  // (moecommRemoteError) instead of timing out. Keeps the caller's error text.
  void consumeFailed(int slot, moecommStream_t stream);
  // Clears (with a warning) a CUDA error left pending by earlier work, before a launch.
  void clearStaleError();
  // Kernel-reported errors and masks since the last call.
  void pollDevice();
  // After a send-only half: remembers where it ends on the stream, for releaseAbandoned.
  moecommResult_t markSendOnly(Routing* routing, moecommStream_t stream);
  // A handle with a send-only half is being destroyed: releases its slot on the device.
  void releaseAbandoned(const moecommEpHandle* handle, Routing* routing);
  // Every low-latency call first orders its stream after a pending releaseAbandoned.
  moecommResult_t waitForRelease(moecommStream_t stream);

  moecommEp* ep_;
  int device_ = -1;
  device::LowLatencyParams base_{};
  std::unique_ptr<NvlinkSymmetric> buffer_;
  device::LowLatencyState* state_ = nullptr;  // device
  volatile int* host_ = nullptr;              // mapped: [0] error code, [1 + r] rank r masked by a kernel
  int* hostMaskStaging_ = nullptr;            // pinned [R] for pushRankMask
  void* controlStream_ = nullptr;             // cudaStream_t for pushRankMask and releaseAbandoned
  void* releaseEvent_ = nullptr;              // cudaEvent_t after the last releaseAbandoned
  bool releasePending_ = false;
  void* zeroCopy_ = nullptr;  // device [E_local, R*maxT, H] BF16
  // MOECOMM_LL_TRANSPORT=staged: device [R][buffer bytes], the windows of the peers (a local
  // mirror of each peer's buffer that the kernels put from; device/ll_transport.cuh).
  void* mirror_ = nullptr;
  void* pendingReleased_ = nullptr;  // device [2][numBlocks] uint64 (LowLatencyParams::pendingReleased)
  std::vector<Routing> freeRoutings_;
  std::unordered_map<moecommEpHandle*, Routing> routings_;
};

}  // namespace moecomm

#endif  // MOECOMM_HAVE_CUDA
