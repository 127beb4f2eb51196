// CUDA EP backend, low-latency mode. See ep_cuda_ll.h and docs/ep-low-latency-gpu.md.
#include "ep/ep_cuda_ll.h"

#if MOECOMM_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/align.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "ep/cuda_scope.h"
#include "ep/ep_args.h"
#include "ep/kernel_profile.h"
#include "transport/nvlink.h"

namespace moecomm {
namespace {

constexpr int kPreallocatedRoutings = 4;

// The receive half's arguments into p.
void setDispatchReceive(const moecommEpLowLatencyDispatchArgs_t& args, device::LowLatencyParams* p) {
  p->fp8 = args.recvType == moecommFloat8E4M3 ? 1 : 0;
  p->roundScale = (args.flags & (MOECOMM_LL_ROUND_SCALE | MOECOMM_LL_UE8M0)) != 0 ? 1 : 0;
  p->ue8m0 = (args.flags & MOECOMM_LL_UE8M0) != 0 ? 1 : 0;
  p->perRank = (args.flags & MOECOMM_LL_PER_RANK_COMBINE) != 0 ? 1 : 0;
  p->recvX = args.recvX;
  p->recvScales = args.recvScales;
  p->recvCount = args.recvCount;
  p->recvSrcInfo = args.recvSrcInfo;
  p->cumulativeRecvStats = args.cumulativeRecvStats;
}

void setCombineReceive(const moecommEpLowLatencyCombineArgs_t& args, const moecommEpHandle& handle,
                       device::LowLatencyParams* p) {
  p->perRank = handle.perRankCombine ? 1 : 0;
  p->topkIdx = args.topkIdx;
  p->topkIdxIs64 = args.topkIdxType == moecommInt64 ? 1 : 0;
  p->topkWeights = args.topkWeights;
  p->out = args.out;
}

// The halves one launch runs: both, unless the call is send-only.
int phasesOf(bool sendOnly) { return device::kLowLatencyPhaseSend | (sendOnly ? 0 : device::kLowLatencyPhaseReceive); }

moecommResult_t checkLaunch(int err, const char* what) {
  MC_REQUIRE(err == 0, moecommUnhandledCudaError, "%s failed: %s (%s)", what,
             cudaGetErrorName(static_cast<cudaError_t>(err)), cudaGetErrorString(static_cast<cudaError_t>(err)));
  return moecommSuccess;
}

}  // namespace

CudaLowLatency::CudaLowLatency(moecommEp* ep) : ep_(ep), device_(ep->comm->device) {}

CudaLowLatency::~CudaLowLatency() { release(); }

moecommResult_t CudaLowLatency::create(moecommEp* ep, int numBlocks, std::unique_ptr<CudaLowLatency>* out) {
  MC_REQUIRE(ep->shape.numRanks <= device::kLowLatencyMaxRanks, moecommNotSupported,
             "low-latency mode on the CUDA backend supports at most %d ranks; this communicator has %d",
             device::kLowLatencyMaxRanks, ep->shape.numRanks);
  MC_REQUIRE(ep->shape.topk <= 32, moecommNotSupported, "low-latency mode on the CUDA backend supports topk <= 32");
  MC_REQUIRE(ep->shape.expertsPerRank() <= device::kLowLatencyMaxLocalExperts, moecommNotSupported,
             "low-latency mode on the CUDA backend supports at most %d experts per rank; this EP has %d",
             device::kLowLatencyMaxLocalExperts, ep->shape.expertsPerRank());
  // The kernels index rows and 16-byte chunks with 32-bit integers.
  const uint64_t rows = static_cast<uint64_t>(ep->shape.numExperts) * ep->shape.maxTokensPerRank;
  const uint64_t tokenChunks = static_cast<uint64_t>(ep->shape.maxTokensPerRank) * ep->shape.hidden / 8;
  MC_REQUIRE(rows < (1ull << 31) && tokenChunks < (1ull << 31), moecommNotSupported,
             "numExperts * maxTokensPerRank = %llu and maxTokensPerRank * hidden / 8 = %llu must stay below 2^31 for "
             "the low-latency kernels",
             static_cast<unsigned long long>(rows), static_cast<unsigned long long>(tokenChunks));
  // The dispatch's lists hold t * 32 + k in an int (and the T word carries the row format in the
  // bits above T).
  static_assert(device::kLowLatencyFormatShift >= 26, "T must fit below the row format bits");
  MC_REQUIRE(ep->shape.maxTokensPerRank < (1 << 26), moecommNotSupported,
             "maxTokensPerRank = %d is too large for the low-latency kernels (at most 2^26 - 1)",
             ep->shape.maxTokensPerRank);
  std::unique_ptr<CudaLowLatency> created(new CudaLowLatency(ep));
  MC_CHECK(created->init(numBlocks));
  *out = std::move(created);
  return moecommSuccess;
}

uint64_t CudaLowLatency::planBuffer(const reference::EpShape& shape, int numBlocks, device::LowLatencyParams* out) {
  const uint64_t R = static_cast<uint64_t>(shape.numRanks);
  const uint64_t maxT = static_cast<uint64_t>(shape.maxTokensPerRank);
  const uint64_t H = static_cast<uint64_t>(shape.hidden);
  const uint64_t K = static_cast<uint64_t>(shape.topk);
  const uint64_t L = static_cast<uint64_t>(shape.expertsPerRank());
  device::LowLatencyParams& p = *out;
  p.numRanks = shape.numRanks;
  p.numExperts = shape.numExperts;
  p.localExperts = shape.expertsPerRank();
  p.hidden = shape.hidden;
  p.topk = shape.topk;
  p.maxTokens = shape.maxTokensPerRank;
  p.numBlocks = std::max(1, numBlocks);
  // Flags (sent, released, listed: one per slot, rank and block), then the slots; inside a
  // slot the combine markers, then the dispatch staging or the combine rows (one operation
  // uses a slot at a time).
  const uint64_t flagBytes =
      roundUp(device::kLowLatencyDeviceSlots * R * static_cast<uint64_t>(p.numBlocks) * sizeof(uint64_t), 256);
  p.sentOffset = 0;
  p.releasedOffset = flagBytes;
  p.listedOffset = 2 * flagBytes;
  p.slotOffset = 3 * flagBytes;
  p.markersOffset = 0;
  // A combine has K rows per token, or R partials per token (per-rank form).
  const uint64_t combineRowsPerToken = std::max(K, R);
  const uint64_t shared = roundUp(maxT * combineRowsPerToken * sizeof(uint32_t), 256);
  p.tokensOffset = shared;
  p.listCountsOffset = shared + roundUp(R * sizeof(int), 16);
  p.listsOffset = p.listCountsOffset + roundUp(R * L * sizeof(int), 16);
  p.topkOffset = p.listsOffset + roundUp(R * L * maxT * sizeof(int), 16);
  p.weightsOffset = p.topkOffset + roundUp(R * maxT * K * sizeof(int32_t), 16);
  p.rowPitch = 2 * H;  // FP8 bytes + FP32 scales (H + H/32) fit in a BF16 row
  p.rowsOffset = roundUp(p.weightsOffset + R * maxT * K * sizeof(float), 256);
  p.combineRowsOffset = shared;
  const uint64_t dispatchEnd = p.rowsOffset + R * maxT * p.rowPitch;
  const uint64_t combineEnd = p.combineRowsOffset + maxT * combineRowsPerToken * 2 * H;
  p.slotBytes = roundUp(std::max(dispatchEnd, combineEnd), 256);
  return p.slotOffset + device::kLowLatencyDeviceSlots * p.slotBytes;
}

moecommResult_t CudaLowLatency::init(int numBlocks) {
  const auto& shape = ep_->shape;
  const uint64_t R = static_cast<uint64_t>(shape.numRanks);
  const uint64_t maxT = static_cast<uint64_t>(shape.maxTokensPerRank);
  const uint64_t L = static_cast<uint64_t>(shape.expertsPerRank());
  device::LowLatencyParams& p = base_;
  std::memset(&p, 0, sizeof(p));
  p.rank = ep_->rank;
  p.timeoutNs = static_cast<uint64_t>(std::max(1, ep_->lowLatencyTimeoutMs)) * 1000000ull;
  const uint64_t bytes = planBuffer(shape, numBlocks, &p);
  // Checked before anything collective: a rank that fails here must not leave its peers with an
  // EP that waits for it.
  const std::string transport = envString(Env::LlTransport);
  MC_REQUIRE(transport == "nvlink" || transport == "staged", moecommInvalidArgument,
             "MOECOMM_LL_TRANSPORT = '%s' is not a low-latency transport (nvlink or staged)", transport.c_str());

  DeviceScope scope(device_);
  // Dynamic shared memory: the send half keeps a word per token, the receive half an int per
  // (local expert, source).
  int optIn = 0;
  MC_CUDA(cudaDeviceGetAttribute(&optIn, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  const int64_t staticShared = device::lowLatencyDispatchStaticSharedBytes();
  if (staticShared < 0) MC_CUDA(cudaGetLastError());
  const uint64_t sharedLimit = static_cast<uint64_t>(std::max<int64_t>(0, optIn - staticShared));
  const uint64_t dispatchShared =
      std::max(device::lowLatencyDispatchSendSharedBytes(p), device::lowLatencyDispatchRecvSharedBytes(p));
  MC_REQUIRE(dispatchShared <= sharedLimit, moecommNotSupported,
             "maxTokensPerRank = %llu or ranks x experts per rank = %llu is too large for the low-latency dispatch "
             "kernels (%llu bytes of shared memory; this GPU allows %llu)",
             static_cast<unsigned long long>(maxT), static_cast<unsigned long long>(R * L),
             static_cast<unsigned long long>(dispatchShared), static_cast<unsigned long long>(sharedLimit));
  if (dispatchShared > 48 * 1024) {
    MC_CHECK(checkLaunch(device::allowLowLatencySharedMemory(sharedLimit), "cudaFuncSetAttribute"));
  }

  MC_CHECK(NvlinkSymmetric::create(ep_->comm, bytes, &buffer_));
  for (int r = 0; r < shape.numRanks; ++r) p.peers[r] = static_cast<uint8_t*>(buffer_->peer(r));
  // The transport (device/ll_transport.cuh): every peer nvlink, or every peer but this rank
  // staged through a local mirror of its buffer (a test transport: the mirror is sized like the
  // whole buffer per rank, flags and this rank's own part unused).
  if (transport == "staged" && R > 1) MC_CUDA(cudaMalloc(&mirror_, bytes * R));
  for (int r = 0; r < shape.numRanks; ++r) {
    p.windows[r] = p.peers[r];
    if (mirror_ != nullptr && r != p.rank) {
      p.windows[r] = static_cast<uint8_t*>(mirror_) + bytes * static_cast<uint64_t>(r);
      p.putPeers |= 1u << r;
    }
  }

  void* state = nullptr;
  MC_CUDA(cudaMalloc(&state, sizeof(device::LowLatencyState)));
  state_ = static_cast<device::LowLatencyState*>(state);
  MC_CUDA(cudaMemset(state_, 0, sizeof(device::LowLatencyState)));
  p.state = state_;
  if (device::lowLatencyDeferredRelease()) {  // a developer build (device/low_latency.cu)
    const size_t pendingBytes = sizeof(uint64_t) * device::kLowLatencyDeviceSlots * static_cast<size_t>(p.numBlocks);
    MC_CUDA(cudaMalloc(&pendingReleased_, pendingBytes));
    MC_CUDA(cudaMemset(pendingReleased_, 0, pendingBytes));
    p.pendingReleased = static_cast<uint64_t*>(pendingReleased_);
  }

  int* host = nullptr;
  const size_t hostWords = 2 + R;  // error, masked[R], format peers
  MC_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int) * hostWords, cudaHostAllocMapped));
  std::memset(host, 0, sizeof(int) * hostWords);
  host_ = host;
  int* devicePointer = nullptr;
  MC_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&devicePointer), host, 0));
  p.hostError = devicePointer;
  p.hostMasked = devicePointer + 1;
  p.hostFormatPeers = devicePointer + 1 + R;
  MC_CUDA(cudaMallocHost(reinterpret_cast<void**>(&hostMaskStaging_), sizeof(int) * R));
  cudaStream_t control = nullptr;
  MC_CUDA(cudaStreamCreateWithFlags(&control, cudaStreamNonBlocking));
  controlStream_ = control;
  cudaEvent_t releaseEvent = nullptr;
  MC_CUDA(cudaEventCreateWithFlags(&releaseEvent, cudaEventDisableTiming));
  releaseEvent_ = releaseEvent;
  for (int i = 0; i < kPreallocatedRoutings; ++i) {
    Routing routing;
    MC_CHECK(allocateRouting(&routing));
    freeRoutings_.push_back(routing);
  }
  MC_CUDA(cudaDeviceSynchronize());
  MC_INFO(kLogEp, "rank %d: CUDA low-latency buffer %llu bytes (2 slots of %llu, %s), %d blocks, transport %s",
          ep_->rank, static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(p.slotBytes),
          buffer_->method(), p.numBlocks, transportName());
  return moecommSuccess;
}

void CudaLowLatency::release() {
  DeviceScope scope(device_);
  auto freeDevice = [](void* pointer) {
    if (pointer != nullptr && cudaFree(pointer) != cudaSuccess) (void)cudaGetLastError();
  };
  auto freeRouting = [&](Routing& routing) {
    freeDevice(routing.block);
    if (routing.sentEvent != nullptr && cudaEventDestroy(static_cast<cudaEvent_t>(routing.sentEvent)) != cudaSuccess) {
      (void)cudaGetLastError();
    }
  };
  for (auto& entry : routings_) freeRouting(entry.second);
  routings_.clear();
  for (auto& routing : freeRoutings_) freeRouting(routing);
  freeRoutings_.clear();
  if (releaseEvent_ != nullptr && cudaEventDestroy(static_cast<cudaEvent_t>(releaseEvent_)) != cudaSuccess) {
    (void)cudaGetLastError();
  }
  releaseEvent_ = nullptr;
  freeDevice(zeroCopy_);
  freeDevice(mirror_);
  mirror_ = nullptr;
  freeDevice(pendingReleased_);
  pendingReleased_ = nullptr;
  zeroCopy_ = nullptr;
  freeDevice(state_);
  state_ = nullptr;
  if (host_ != nullptr && cudaFreeHost(const_cast<int*>(host_)) != cudaSuccess) (void)cudaGetLastError();
  host_ = nullptr;
  if (hostMaskStaging_ != nullptr && cudaFreeHost(hostMaskStaging_) != cudaSuccess) (void)cudaGetLastError();
  hostMaskStaging_ = nullptr;
  if (controlStream_ != nullptr && cudaStreamDestroy(static_cast<cudaStream_t>(controlStream_)) != cudaSuccess) {
    (void)cudaGetLastError();
  }
  controlStream_ = nullptr;
  buffer_.reset();
}

void CudaLowLatency::logProfile() {
  const int blocks = base_.numBlocks;
  for (int kernel = 0; kernel < device::kLowLatencyKernels; ++kernel) {
    std::vector<unsigned long long> stamps(static_cast<size_t>(blocks) * device::kLowLatencyProfileEvents);
    const int events = device::lowLatencyProfile(kernel, blocks, stamps.data());
    if (events <= 0) return;
    // Global-timer stamps, then the SM clock at events 0 and 9.
    constexpr int kTimes = device::kLowLatencyProfileTimes;
    std::vector<unsigned long long> times(static_cast<size_t>(blocks) * kTimes);
    std::vector<double> mhz;
    for (int b = 0; b < blocks; ++b) {
      const unsigned long long* row = stamps.data() + static_cast<size_t>(b) * events;
      std::copy(row, row + kTimes, times.begin() + static_cast<size_t>(b) * kTimes);
      const unsigned long long* clocks = row + kTimes;
      if (row[9] > row[0] && clocks[1] > clocks[0]) mhz.push_back(1000.0 * (clocks[1] - clocks[0]) / (row[9] - row[0]));
    }
    std::sort(mhz.begin(), mhz.end());
    const std::string line = profileLine(times.data(), blocks, kTimes, profileOrigin(times.data(), blocks, kTimes));
    MC_WARN(kLogEp,
            "rank %d profile LL %s (us after the kernel's start, min/median/max over %d blocks; SM clock %.0f MHz):%s",
            ep_->rank, kernel == device::kLlKernelDispatch ? "dispatch" : "combine", blocks,
            mhz.empty() ? 0.0 : mhz[mhz.size() / 2], line.c_str());
  }
}

moecommResult_t CudaLowLatency::detachPeers() {
  DeviceScope scope(device_);
  return buffer_ != nullptr ? buffer_->detachPeers() : moecommSuccess;
}

moecommResult_t CudaLowLatency::allocateRouting(Routing* out) {
  const auto& shape = ep_->shape;
  const uint64_t localExperts = static_cast<uint64_t>(shape.expertsPerRank());
  const uint64_t rows = localExperts * shape.lowLatencySlotsPerExpert();
  const uint64_t selections = static_cast<uint64_t>(shape.numRanks) * shape.maxTokensPerRank * shape.topk;
  const uint64_t countBytes = roundUp(localExperts * sizeof(int), 16);
  const uint64_t arrayBytes = roundUp(rows * sizeof(int), 16);
  const uint64_t firstKBytes = roundUp(rows, 16);
  const uint64_t selectionBytes = roundUp(selections * sizeof(int), 16);  // rowOf, and weights
  const uint64_t sourceBytes = roundUp(static_cast<uint64_t>(shape.numRanks) * sizeof(int), 16);
  const uint64_t bytes = countBytes + arrayBytes + firstKBytes + 2 * selectionBytes + sourceBytes;
  void* block = nullptr;
  MC_CUDA(cudaMalloc(&block, bytes));
  uint8_t* base = static_cast<uint8_t*>(block);
  out->block = block;
  out->arrays.recvCount = reinterpret_cast<int*>(base);
  base += countBytes;
  out->arrays.srcInfo = reinterpret_cast<int*>(base);
  base += arrayBytes;
  out->arrays.firstK = base;
  base += firstKBytes;
  out->arrays.rowOf = reinterpret_cast<int*>(base);
  base += selectionBytes;
  out->arrays.weights = reinterpret_cast<float*>(base);
  base += selectionBytes;
  out->arrays.sourceTokens = reinterpret_cast<int*>(base);
  return moecommSuccess;
}

moecommResult_t CudaLowLatency::takeRouting(moecommStream_t stream, Routing* out) {
  if (freeRoutings_.empty()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MC_CUDA(cudaStreamIsCapturing(stream, &capture));
    MC_REQUIRE(capture == cudaStreamCaptureStatusNone, moecommInvalidUsage,
               "%zu low-latency handles are alive and the stream is being captured, so no device memory can be "
               "allocated for another; destroy unused handles (moecommEpHandleDestroy) before capturing",
               routings_.size());
    Routing routing;
    MC_CHECK(allocateRouting(&routing));
    freeRoutings_.push_back(routing);
  }
  *out = freeRoutings_.back();
  freeRoutings_.pop_back();
  return moecommSuccess;
}

void CudaLowLatency::forgetHandle(moecommEpHandle* handle) {
  auto it = routings_.find(handle);
  if (it == routings_.end()) return;
  // Only while the EP lives: when it is being freed (moecommEpDestroy, or after an abort) the
  // peers' buffers may already be unmapped, and nothing will use the slot again.
  if (handle->pending != EpPendingHalf::kNone && liveEps().contains(ep_)) releaseAbandoned(handle, &it->second);
  it->second.sentRecorded = false;
  freeRoutings_.push_back(it->second);
  routings_.erase(it);
}

moecommResult_t CudaLowLatency::markSendOnly(Routing* routing, moecommStream_t stream) {
  routing->sentRecorded = false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MC_CUDA(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return moecommSuccess;
  if (routing->sentEvent == nullptr) {
    cudaEvent_t event = nullptr;
    MC_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    routing->sentEvent = event;
  }
  MC_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(routing->sentEvent), stream));
  routing->sentRecorded = true;
  return moecommSuccess;
}

void CudaLowLatency::releaseAbandoned(const moecommEpHandle* handle, Routing* routing) {
  DeviceScope scope(device_);
  cudaStream_t control = static_cast<cudaStream_t>(controlStream_);
  bool released = false;
  if (routing->sentRecorded && releaseEvent_ != nullptr) {
    device::LowLatencyParams p = callParams(handle->bufferSlot, *routing);
    released = cudaStreamWaitEvent(control, static_cast<cudaEvent_t>(routing->sentEvent), 0) == cudaSuccess &&
               device::launchLowLatencyRelease(p, control) == 0 &&
               cudaEventRecord(static_cast<cudaEvent_t>(releaseEvent_), control) == cudaSuccess;
    if (!released) (void)cudaGetLastError();
  }
  if (released) {
    releasePending_ = true;
    MC_INFO(kLogEp,
            "rank %d: a low-latency handle was destroyed with its send-only half not completed; slot %d "
            "released without receiving",
            ep_->rank, handle->bufferSlot);
  } else {
    MC_WARN(kLogEp,
            "rank %d: a low-latency handle was destroyed with its send-only half not completed (queued under stream "
            "capture, or the release failed); peers will time out on buffer slot %d and mask this rank",
            ep_->rank, handle->bufferSlot);
  }
}

moecommResult_t CudaLowLatency::waitForRelease(moecommStream_t stream) {
  if (!releasePending_) return moecommSuccess;
  MC_CUDA(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(releaseEvent_), 0));
  releasePending_ = false;
  return moecommSuccess;
}

// ---- Rank mask ------------------------------------------------------------------------------

void CudaLowLatency::pullRankMask() {
  if (host_ == nullptr) return;
  for (int r = 0; r < ep_->shape.numRanks; ++r) {
    if (host_[1 + r] == 0 || ep_->rankMask[r] != 0) continue;
    ep_->rankMask[r] = 1;
    MC_WARN(kLogEp,
            "rank %d: rank %d did not answer a low-latency operation within MOECOMM_LL_TIMEOUT (or had moved on); "
            "masked it (moecommEpGetRankMask shows it)",
            ep_->rank, r);
  }
}

moecommResult_t CudaLowLatency::pushRankMask() {
  DeviceScope scope(device_);
  const int R = ep_->shape.numRanks;
  for (int r = 0; r < R; ++r) hostMaskStaging_[r] = ep_->rankMask[r] != 0 ? 1 : 0;
  cudaStream_t control = static_cast<cudaStream_t>(controlStream_);
  MC_CUDA(cudaMemcpyAsync(state_->rankMask, hostMaskStaging_, sizeof(int) * R, cudaMemcpyHostToDevice, control));
  MC_CUDA(cudaStreamSynchronize(control));
  // The caller's mask is now the truth; ranks the kernels mask from here on show up again.
  for (int r = 0; r < R; ++r) host_[1 + r] = 0;
  return moecommSuccess;
}

void CudaLowLatency::pollAsyncErrors() {
  if (host_ == nullptr) return;
  // Taken and cleared in one step: moecommCommGetAsyncError may run this on another thread.
  const int code = __atomic_exchange_n(const_cast<int*>(host_), 0, __ATOMIC_ACQ_REL);
  const int R = ep_->shape.numRanks;
  const unsigned formatPeers =
      static_cast<unsigned>(__atomic_exchange_n(const_cast<int*>(host_) + 1 + R, 0, __ATOMIC_ACQ_REL));
  for (int s = 0; s < R; ++s) {
    if (((formatPeers >> s) & 1u) != 0) warnLowLatencyFormatMismatch(ep_->rank, s);
  }
  if (code != 0) ep_->comm->raiseAsyncError(static_cast<moecommResult_t>(code));
}

void CudaLowLatency::pollDevice() {
  pollAsyncErrors();
  pullRankMask();
}

// ---- Slots and the receive half -----------------------------------------------------------

device::LowLatencyParams CudaLowLatency::callParams(int slot, const Routing& routing) const {
  device::LowLatencyParams p = base_;
  p.slot = slot;
  p.routing = routing.arrays;
  return p;
}

moecommResult_t CudaLowLatency::finish(moecommEpHandle* handle, moecommStream_t stream, bool launch) {
  const bool isDispatch = handle->pending == EpPendingHalf::kLowLatencyDispatch;
  const int slot = handle->bufferSlot;
  moecommResult_t status = moecommSuccess;
  if (launch) {
    device::LowLatencyParams p = callParams(slot, routings_.at(handle));
    p.numTokens = handle->numTokens;
    p.phases = device::kLowLatencyPhaseReceive;
    if (isDispatch) {
      setDispatchReceive(handle->pendingDispatch, &p);
    } else {
      setCombineReceive(handle->pendingCombine, *handle, &p);
    }
    clearStaleError();
    status = isDispatch ? checkLaunch(device::launchLowLatencyDispatch(p, stream), "launchLowLatencyDispatch")
                        : checkLaunch(device::launchLowLatencyCombine(p, stream), "launchLowLatencyCombine");
  }
  MC_TRACE(kLogEp, "rank %d low-latency %s #%llu receive half queued: %s", ep_->rank,
           isDispatch ? "dispatch" : "combine", static_cast<unsigned long long>(handle->pendingSequence),
           resultName(status));
  if (ep_->slotOwners[slot] == handle) ep_->slotOwners[slot] = nullptr;
  handle->bufferSlot = -1;
  handle->pending = EpPendingHalf::kNone;
  if (isDispatch) {
    handle->dispatchDone = status == moecommSuccess;
    handle->failed = status != moecommSuccess;
  }
  return status;
}

moecommResult_t CudaLowLatency::afterSend(moecommEpHandle* handle, EpPendingHalf half, int slot, bool sendOnly,
                                          moecommStream_t stream) {
  handle->pending = half;
  handle->bufferSlot = slot;
  handle->pendingSequence = ++ep_->lowLatencySequence;
  ep_->slotOwners[slot] = handle;
  if (sendOnly) return markSendOnly(&routings_.at(handle), stream);
  return finish(handle, stream, false);
}

// ---- The operations -----------------------------------------------------------------------

void CudaLowLatency::clearStaleError() {
  const cudaError_t stale = cudaGetLastError();
  if (stale != cudaSuccess) {
    MC_WARN(kLogEp,
            "rank %d: a CUDA error was pending before a low-latency launch (%s: %s), left by earlier work in this "
            "process; cleared, so the launch reports only its own",
            ep_->rank, cudaGetErrorName(stale), cudaGetErrorString(stale));
  }
}

void CudaLowLatency::consumeFailed(int slot, moecommStream_t stream) {
  const unsigned long long sequence = ++ep_->lowLatencySequence;
  DeviceScope scope(device_);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  bool queued = cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusNone;
  if (queued && releasePending_) {
    queued = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(releaseEvent_), 0) == cudaSuccess;
    releasePending_ = !queued;
  }
  if (queued) {
    clearStaleError();
    queued = device::launchLowLatencyFailed(callParams(slot, Routing{}), stream) == 0;
  }
  if (queued) {
    MC_INFO(kLogEp, "rank %d: low-latency operation #%llu failed here; its peers are told so (moecommRemoteError)",
            ep_->rank, sequence);
  } else {
    (void)cudaGetLastError();
    MC_WARN(kLogEp,
            "rank %d: low-latency operation #%llu failed here and its stream could not carry the failure notice "
            "(capturing, or unusable); peers will time out on buffer slot %d and mask this rank",
            ep_->rank, sequence, slot);
  }
}

moecommResult_t CudaLowLatency::dispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                         moecommStream_t stream) {
  pollDevice();
  int slot = -1;
  MC_CHECK(acquireLowLatencySlot(*ep_, &slot));
  bool launched = false;
  const moecommResult_t status = startDispatch(args, handle, stream, slot, &launched);
  if (status != moecommSuccess && !launched) consumeFailed(slot, stream);
  return status;
}

moecommResult_t CudaLowLatency::startDispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                              moecommStream_t stream, int slot, bool* launched) {
  MC_CHECK(checkLowLatencyDispatchArgs(*ep_, args, handle));
  DeviceScope scope(device_);
  if (args->waitEvent != nullptr) MC_CUDA(cudaStreamWaitEvent(stream, args->waitEvent, 0));
  MC_CHECK(waitForRelease(stream));
  Routing routing;
  MC_CHECK(takeRouting(stream, &routing));
  moecommEpHandle* created = newHandle(ep_, EpHandleKind::kLowLatency);
  created->numTokens = args->numTokens;
  routings_[created] = routing;
  device::LowLatencyParams p = callParams(slot, routing);
  p.numTokens = args->numTokens;
  p.x = args->x;
  p.topkIdx = args->topkIdx;
  p.topkIdxIs64 = args->topkIdxType == moecommInt64 ? 1 : 0;
  created->perRankCombine = (args->flags & MOECOMM_LL_PER_RANK_COMBINE) != 0;
  p.topkWeights = args->topkWeights;
  const bool sendOnly = (args->flags & MOECOMM_LL_SEND_ONLY) != 0;
  p.phases = phasesOf(sendOnly);
  setDispatchReceive(*args, &p);
  clearStaleError();
  const moecommResult_t status = checkLaunch(device::launchLowLatencyDispatch(p, stream), "launchLowLatencyDispatch");
  if (status != moecommSuccess) {
    const std::string text = lastErrorText();
    destroyHandle(created);
    return setError(status, "%s", text.c_str());
  }
  *launched = true;
  created->pendingDispatch = *args;
  *handle = created;
  return afterSend(created, EpPendingHalf::kLowLatencyDispatch, slot, sendOnly, stream);
}

moecommResult_t CudaLowLatency::combine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                        moecommStream_t stream) {
  pollDevice();
  int slot = -1;
  MC_CHECK(acquireLowLatencySlot(*ep_, &slot));
  bool launched = false;
  const moecommResult_t status = startCombine(args, handle, stream, slot, &launched);
  if (status != moecommSuccess && !launched) consumeFailed(slot, stream);
  return status;
}

moecommResult_t CudaLowLatency::startCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                             moecommStream_t stream, int slot, bool* launched) {
  // The zero-copy buffer is device memory here, which the shared check (written for the host
  // backend's buffer) cannot recognise: check it first, then run the shared checks on
  // arguments that name the buffer as x.
  moecommEpLowLatencyCombineArgs_t effective{};
  const moecommEpLowLatencyCombineArgs_t* checked = args;
  if (args != nullptr && args->size == sizeof(*args) && args->magic == MOECOMM_EP_LL_COMBINE_ARGS_MAGIC &&
      (args->flags & MOECOMM_LL_ZERO_COPY) != 0) {
    MC_REQUIRE(zeroCopy_ != nullptr, moecommInvalidUsage,
               "MOECOMM_LL_ZERO_COPY is set but moecommEpLowLatencyCombineBuffer was never called on this EP");
    MC_REQUIRE(args->x == nullptr || args->x == zeroCopy_, moecommInvalidArgument,
               "low-latency combine args->x must be NULL or the moecommEpLowLatencyCombineBuffer buffer with "
               "MOECOMM_LL_ZERO_COPY");
    effective = *args;
    effective.flags &= ~MOECOMM_LL_ZERO_COPY;
    effective.x = zeroCopy_;
    checked = &effective;
  }
  MC_CHECK(checkLowLatencyCombineArgs(*ep_, checked, handle));
  auto routing = routings_.find(handle);
  MC_REQUIRE(routing != routings_.end(), moecommInternalError, "the low-latency handle has no device routing");
  DeviceScope scope(device_);
  if (args->waitEvent != nullptr) MC_CUDA(cudaStreamWaitEvent(stream, args->waitEvent, 0));
  MC_CHECK(waitForRelease(stream));
  device::LowLatencyParams p = callParams(slot, routing->second);
  p.numTokens = handle->numTokens;
  p.expertOutputs = checked->x;
  const bool sendOnly = (args->flags & MOECOMM_LL_SEND_ONLY) != 0;
  p.phases = phasesOf(sendOnly);
  setCombineReceive(*checked, *handle, &p);
  clearStaleError();
  MC_CHECK(checkLaunch(device::launchLowLatencyCombine(p, stream), "launchLowLatencyCombine"));
  *launched = true;
  handle->pendingCombine = *checked;
  return afterSend(handle, EpPendingHalf::kLowLatencyCombine, slot, sendOnly, stream);
}

moecommResult_t CudaLowLatency::complete(moecommEpHandle_t handle, moecommStream_t stream) {
  pollDevice();
  MC_CHECK(checkCompleteArgs(*ep_, handle));
  MC_REQUIRE(routings_.count(handle) != 0, moecommInternalError, "the low-latency handle has no device routing");
  DeviceScope scope(device_);
  MC_CHECK(waitForRelease(stream));
  // The receive half reads what the send half left on the device (the slot's sequence, the
  // staging): it waits for the send half's event, whatever the stream (comparing stream
  // handles would miss a recycled handle or cudaStreamPerThread from two threads; on the same
  // stream the wait costs nothing). Under stream capture no event was recorded, and both
  // halves must be captured on one stream (docs/ep-low-latency-gpu.md); a mix is only warned.
  const Routing& routing = routings_.at(handle);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MC_CUDA(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  if (routing.sentRecorded && !capturing) {
    MC_CUDA(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(routing.sentEvent), 0));
  } else if (routing.sentRecorded || !capturing) {  // one half captured, the other not
    MC_WARN(kLogEp,
            "rank %d: moecommEpComplete %s stream capture for a send half queued %s it; the receive half is not "
            "ordered after the send half (capture both on one stream, or neither)",
            ep_->rank, capturing ? "under" : "outside", capturing ? "outside" : "under");
  }
  return finish(handle, stream, true);
}

moecommResult_t CudaLowLatency::combineBuffer(void** buffer) {
  MC_REQUIRE(buffer != nullptr, moecommInvalidArgument, "buffer is NULL");
  if (zeroCopy_ == nullptr) {
    const auto& shape = ep_->shape;
    const size_t bytes = static_cast<size_t>(shape.expertsPerRank()) * shape.lowLatencySlotsPerExpert() * shape.hidden *
                         sizeof(uint16_t);
    DeviceScope scope(device_);
    MC_CUDA(cudaMalloc(&zeroCopy_, bytes));
  }
  *buffer = zeroCopy_;
  return moecommSuccess;
}

}  // namespace moecomm

#endif  // MOECOMM_HAVE_CUDA
