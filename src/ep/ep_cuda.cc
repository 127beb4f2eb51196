// CUDA EP backend, normal mode. See ep_cuda.h.
#include "ep/ep_cuda.h"

#if MOECOMM_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/align.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "core/memory.h"
#include "device/api.h"
#include "ep/cuda_scope.h"
#include "ep/ep_args.h"
#include "ep/ep_cuda_ll.h"
#include "ep/kernel_profile.h"
#include "transport/nvlink.h"

namespace moecomm {
namespace {

// Where a staged row's parts start for the x type (FP8 or BF16).
void setRowLayout(device::IntranodeParams* p, bool fp8) {
  const uint64_t H = static_cast<uint64_t>(p->hidden);
  const uint64_t K = static_cast<uint64_t>(p->topk);
  p->rowScalesOffset = roundUp(fp8 ? H : 2 * H, 16);
  p->rowIdxOffset = p->rowScalesOffset + (fp8 ? roundUp(H / 128 * 4, 16) : 0);
  p->rowWeightsOffset = p->rowIdxOffset + 8 * static_cast<uint64_t>(p->idxStride);
  p->rowSrcOffset = p->rowWeightsOffset + roundUp(4 * K, 16);
  p->rowExtent = p->rowSrcOffset + 16;
}

// Rows of each normal-mode staging area (dispatch, combine): a slot per (source, channel,
// ordinal), p.chunkRows ordinals per channel (planNormalBuffer sets it).
uint64_t stagingRows(const device::IntranodeParams& p) {
  return static_cast<uint64_t>(p.numRanks) * static_cast<uint64_t>(p.numChannels) * static_cast<uint64_t>(p.chunkRows);
}

// The normal-mode buffer layout for p's shape and channel count (set by the caller): row
// sizes and region offsets into p; returns the symmetric bytes per rank.
uint64_t planNormalBuffer(device::IntranodeParams* p) {
  const uint64_t R = static_cast<uint64_t>(p->numRanks);
  const uint64_t channels = static_cast<uint64_t>(p->numChannels);
  const uint64_t L = static_cast<uint64_t>(p->numExperts) / R;
  const uint64_t maxT = static_cast<uint64_t>(p->maxTokens);
  const uint64_t H = static_cast<uint64_t>(p->hidden);
  const uint64_t K = static_cast<uint64_t>(p->topk);
  p->chunkRows = static_cast<int>((maxT + channels - 1) / channels);
  p->idxStride = static_cast<int>((K + 1) / 2 * 2);
  setRowLayout(p, false);
  const uint64_t bf16Extent = p->rowExtent;
  setRowLayout(p, true);
  p->dispatchRowBytes = std::max(bf16Extent, p->rowExtent);
  p->combineRowBytes = roundUp(2 * H + 4 * K, 16);
  const uint64_t slots = stagingRows(*p);
  p->ctrlOffset = 0;
  p->expertsOffset = roundUp(static_cast<uint64_t>(device::kCtrlKinds) * device::kOps * channels * R * 8, 16);
  p->dispatchOffset = roundUp(p->expertsOffset + 2ull * 2 * R * channels * L * 4, 16);  // 2 ops x 2 parities
  p->combineOffset = roundUp(p->dispatchOffset + slots * p->dispatchRowBytes, 16);
  return p->combineOffset + slots * p->combineRowBytes;
}

void setShape(const reference::EpShape& shape, int channels, device::IntranodeParams* p) {
  p->numRanks = shape.numRanks;
  p->numExperts = shape.numExperts;
  p->hidden = shape.hidden;
  p->topk = shape.topk;
  p->maxTokens = shape.maxTokensPerRank;
  p->numChannels = channels;
}

// Device buffers of one handle's routing (one allocation).
struct HandleDevice {
  void* block = nullptr;
  int64_t* idx = nullptr;
  int* pos = nullptr;
  int* chanCount = nullptr;
  int* chanExpert = nullptr;
  int* selfToken = nullptr;
  int* recvOffset = nullptr;
  int* recvCount = nullptr;
  int* srcRank = nullptr;
  int* srcIndex = nullptr;
  int* numRecv = nullptr;
  int recvCapacity = 0;  // rows the last dispatch with this handle could store
  // Recorded after every launch that uses the block (outside stream capture): when it has
  // completed, nothing queued so far reads or writes the block.
  cudaEvent_t used = nullptr;
  bool captured = false;  // a launch using the block went into a graph: never pooled
  // A dispatch with this handle was launched outside stream capture: recvOffset / recvCount
  // hold its layout for every later launch (a captured one fills them only when replayed).
  bool layoutOnDevice = false;
};

// Routing blocks of destroyed handles kept for the next handles (moecommEpHandleDestroy would
// otherwise cudaFree, which waits for the whole device, and the next dispatch cudaMalloc).
constexpr size_t kHandleBlockPool = 8;

class CudaEpBackend : public EpBackend {
 public:
  explicit CudaEpBackend(moecommEp* ep) : ep_(ep) {}
  ~CudaEpBackend() override { release(); }

  moecommResult_t init() {
    const auto& shape = ep_->shape;
    const int R = shape.numRanks;
    const uint64_t L = static_cast<uint64_t>(shape.numExperts / R);
    DeviceScope scope(ep_->comm->device);
    int deviceSms = 0;
    MC_CUDA(cudaDeviceGetAttribute(&deviceSms, cudaDevAttrMultiProcessorCount, ep_->comm->device));
    // Every block of a collective must be resident at once (they wait on each other), so the
    // budget cannot exceed the SM count.
    const int mine = std::max(1, std::min(ep_->config.numSms, deviceSms));
    // Every rank must use the same channel count (the buffer layout depends on it), and each
    // may have resolved the budget from its own environment or have fewer SMs: the smallest wins.
    std::vector<int32_t> allChannels(R);
    const int32_t mineChannels = mine;
    MC_CHECK(ep_->comm->bootstrap->allgather(&mineChannels, allChannels.data(), sizeof(int32_t)));
    const int channels = *std::min_element(allChannels.begin(), allChannels.end());
    if (channels != ep_->config.numSms) {
      MC_WARN(kLogEp,
              "rank %d: SM budget %d; device %d has %d SMs and the smallest budget over the ranks is %d; using %d",
              ep_->rank, ep_->config.numSms, ep_->comm->device, deviceSms, channels, channels);
    }
    device::IntranodeParams& p = base_;
    std::memset(&p, 0, sizeof(p));
    p.rank = ep_->rank;
    setShape(shape, channels, &p);
    const uint64_t bytes = planNormalBuffer(&p);
    // The kernels index staging rows with 32-bit ints (the balanced dispatch's slot deltas).
    MC_REQUIRE(stagingRows(p) <= static_cast<uint64_t>(INT_MAX), moecommInvalidArgument,
               "the normal-mode staging would hold %llu rows (ranks x channels x maxTokensPerRank / channels, "
               "rounded up), more than the kernels' 32-bit row index allows; lower maxTokensPerRank",
               static_cast<unsigned long long>(stagingRows(p)));
    MC_CHECK(setVariants(&p));
    // Pulled rows change where rows live (exchangeRow): every rank must agree. The bits every
    // rank set win.
    std::vector<int32_t> allPull(R);
    const int32_t minePull = p.pull;
    MC_CHECK(ep_->comm->bootstrap->allgather(&minePull, allPull.data(), sizeof(int32_t)));
    int32_t pull = 3;
    for (int32_t bits : allPull) pull &= bits;
    if (pull != p.pull) {
      MC_WARN(kLogEp, "rank %d: MOECOMM_EP_PULL=%d here, but not on every rank; using %d (the bits every rank set)",
              ep_->rank, p.pull, pull);
    }
    p.pull = pull;
    p.timeoutNs = static_cast<uint64_t>(std::max<int64_t>(1, envInt(Env::KernelTimeout))) * 1000000ull;

    MC_CHECK(NvlinkSymmetric::create(ep_->comm, bytes, &buffer_));
    // Progress words start at zero on every rank before any peer may write them.
    MC_CUDA(cudaMemset(buffer_->peer(ep_->rank), 0, p.dispatchOffset));
    std::vector<uint8_t*> peers(R);
    for (int r = 0; r < R; ++r) peers[r] = static_cast<uint8_t*>(buffer_->peer(r));
    MC_CUDA(cudaMalloc(&deviceBlock_, roundUp(sizeof(device::EpDeviceState), 16) + sizeof(uint8_t*) * R));
    MC_CUDA(cudaMemset(deviceBlock_, 0, roundUp(sizeof(device::EpDeviceState), 16)));
    p.state = static_cast<device::EpDeviceState*>(deviceBlock_);
    uint8_t** devicePeers =
        reinterpret_cast<uint8_t**>(static_cast<uint8_t*>(deviceBlock_) + roundUp(sizeof(device::EpDeviceState), 16));
    MC_CUDA(cudaMemcpy(devicePeers, peers.data(), sizeof(uint8_t*) * R, cudaMemcpyHostToDevice));
    p.peers = devicePeers;
    const size_t hostBytes = sizeof(device::EpHostWords) + sizeof(int) * L;
    void* host = nullptr;
    MC_CUDA(cudaHostAlloc(&host, hostBytes, cudaHostAllocMapped));
    std::memset(host, 0, hostBytes);
    host_ = static_cast<volatile device::EpHostWords*>(host);
    void* devicePointer = nullptr;
    MC_CUDA(cudaHostGetDevicePointer(&devicePointer, host, 0));
    p.host = static_cast<device::EpHostWords*>(devicePointer);
    MC_CUDA(cudaDeviceSynchronize());
    MC_CHECK(ep_->comm->bootstrap->barrier());
    MC_INFO(kLogEp, "rank %d: CUDA EP buffer %llu bytes (%s), %d channels", ep_->rank,
            static_cast<unsigned long long>(bytes), buffer_->method(), channels);
    if (ep_->config.mode != moecommEpModeNormal) MC_CHECK(CudaLowLatency::create(ep_, channels, &lowLatency_));
    return moecommSuccess;
  }

  moecommResult_t getLayout(const moecommEpLayoutArgs_t* args, moecommStream_t stream) override {
    pollErrors();
    MC_CHECK(checkLayoutArgs(*ep_, args));
    DeviceScope scope(ep_->comm->device);
    device::LayoutParams p{};
    p.topkIdx = args->topkIdx;
    p.topkIdxIs64 = args->topkIdxType == moecommInt64 ? 1 : 0;
    p.numTokens = args->numTokens;
    p.topk = ep_->shape.topk;
    p.numExperts = ep_->shape.numExperts;
    p.numRanks = ep_->shape.numRanks;
    p.tokensPerRank = args->tokensPerRank;
    p.tokensPerExpert = args->tokensPerExpert;
    p.isTokenInRank = args->isTokenInRank;
    p.badEntry = &base_.host->badEntry;
    MC_CUDA(static_cast<cudaError_t>(device::launchLayout(p, stream)));
    return moecommSuccess;
  }

  moecommResult_t notifyDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle, int* numRecvTokens,
                                 int* recvTokensPerExpert, moecommStream_t stream) override {
    pollErrors();
    MC_CHECK(agree(checkNotifyArgs(*ep_, args, handle, numRecvTokens)));
    DeviceScope scope(ep_->comm->device);
    moecommEpHandle* created = nullptr;
    MC_CHECK(createHandle(args->numTokens, stream, &created));
    device::IntranodeParams p = base_;
    bindHandle(created, &p);
    p.numTokens = args->numTokens;
    p.topkIdx = args->topkIdx;
    p.topkIdxIs64 = args->topkIdxType == moecommInt64 ? 1 : 0;
    moecommResult_t status = launch(device::launchIntranodeNotify(p, stream), "launchIntranodeNotify");
    if (status == moecommSuccess) status = noteUse(created, stream);
    if (status == moecommSuccess) status = sync(stream);
    if (status != moecommSuccess) {
      destroyHandle(created);
      return status;
    }
    const volatile int* out = host_->notify;
    const int localExperts = ep_->shape.numExperts / ep_->shape.numRanks;
    created->numRecvTokens = out[0];
    *numRecvTokens = out[0];
    for (int le = 0; le < localExperts && recvTokensPerExpert != nullptr; ++le) {
      const int a = args->expertAlignment;
      recvTokensPerExpert[le] = (out[1 + le] + a - 1) / a * a;
    }
    *handle = created;
    return moecommSuccess;
  }

  moecommResult_t dispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                           moecommStream_t stream) override {
    pollErrors();
    const moecommResult_t checked = checkDispatchArgs(*ep_, args, handle);
    // Direct dispatch needs every rank's recvX in one allocation at the same offset, and the
    // default kernels (docs/ep-normal-gpu.md, "Direct dispatch and combine").
    const uint64_t xRowBytes = checked == moecommSuccess ? static_cast<uint64_t>(ep_->shape.hidden) *
                                                               (args->xType == moecommFloat8E4M3 ? 1 : 2)
                                                         : 0;
    const SymmetricSpot recvSpot =
        symmetricSpot(args->recvX, static_cast<uint64_t>(std::max(0, args->recvCapacity)) * xRowBytes, checked);
    const bool mayDirect = envInt(Env::EpDirectDispatch) != 0 && ep_->comm->nranks > 1 && recvSpot.table != nullptr &&
                           recvSpot.offset % 16 == 0 && base_.dispatchVariant == device::kDispatchVariantRegisters &&
                           (base_.pull & 1) == 0;
    // Pulled dispatch (opt-in) needs every rank's x in one allocation at the same offset (a rank
    // with no tokens still passes its x there) and the default kernels; it replaces the direct one.
    const SymmetricSpot xSpot = symmetricSpot(
        args->x, static_cast<uint64_t>(std::max(1, checked == moecommSuccess ? args->numTokens : 0)) * xRowBytes,
        checked);
    const bool mayPull = envInt(Env::EpDispatchPullX) != 0 && ep_->comm->nranks > 1 && xSpot.table != nullptr &&
                         xSpot.offset % 16 == 0 && base_.dispatchVariant == device::kDispatchVariantRegisters &&
                         (base_.pull & 1) == 0;
    // The balanced dispatch (a direct one; the default) changes the protocol: every rank must
    // ask for it (measured on 2x H200, W-prefill SM 24: FP8 reused 128 -> 116.7 us, BF16 202 ->
    // 188.6; docs/PERF.md, twentieth session).
    // Its span table of every channel must fit in shared memory (hundreds of ranks would not).
    const bool mayBalance =
        mayDirect && envInt(Env::EpBalancedDispatch) != 0 &&
        base_.sharedIntsBytes + device::intranodeBalancedExtraBytes(base_.numRanks, base_.numChannels) <= sharedBudget_;
    const std::vector<int64_t> spot = {
        mayDirect ? 1 : 0, static_cast<int64_t>(recvSpot.id), static_cast<int64_t>(recvSpot.offset),
        mayPull ? 1 : 0,   static_cast<int64_t>(xSpot.id),    static_cast<int64_t>(xSpot.offset),
        mayBalance ? 1 : 0};
    std::vector<int64_t> allSpots;
    MC_CHECK(agree(checked, checked == moecommSuccess ? static_cast<int32_t>(args->xType) : -1, &spot, &allSpots));
    const bool pull = sameEverywhere(spot, allSpots, 3, 3);
    const bool direct = !pull && sameEverywhere(spot, allSpots, 0, 3);
    const bool balanced = direct && sameEverywhere(spot, allSpots, 6, 1);
    logDirect("dispatch", direct, &lastDirectDispatch_);
    logPath("dispatch", balanced, &lastBalancedDispatch_,
            "claims tokens across blocks (balanced; MOECOMM_EP_BALANCED_DISPATCH)",
            "sends each channel's tokens from its own block");
    logPath("dispatch", pull, &lastPullDispatch_,
            "pulls x rows from the sources (x in symmetric memory at the same offset on every rank)", "pushes x rows");
    DeviceScope scope(ep_->comm->device);
    if (args->waitEvent != nullptr) MC_CUDA(cudaStreamWaitEvent(stream, args->waitEvent, 0));
    moecommEpHandle* target = *handle;
    const bool route = target == nullptr;
    if (route) {
      MC_CHECK(createHandle(args->numTokens, stream, &target));
      target->numRecvTokens = -1;
    }
    device::IntranodeParams p = base_;
    bindHandle(target, &p);
    p.route = route ? 1 : 0;
    p.numTokens = target->numTokens;
    p.xIsFp8 = args->xType == moecommFloat8E4M3 ? 1 : 0;
    setRowLayout(&p, p.xIsFp8 != 0);
    if (device::dispatchSendersUseRing(p.dispatchVariant)) fitSendPrefetch(&p);
    p.x = args->x;
    p.xScales = args->xScales;
    p.topkIdx = args->topkIdx;
    p.topkIdxIs64 = args->topkIdxType == moecommInt64 ? 1 : 0;
    p.topkWeights = args->topkWeights;
    p.alignment = args->expertAlignment;
    p.recvCapacity = args->recvCapacity;
    p.recvX = args->recvX;
    p.recvXScales = args->recvXScales;
    p.recvTopkIdx = args->recvTopkIdx;
    p.recvTopkWeights = args->recvTopkWeights;
    p.outNumRecv = args->numRecvTokens;
    p.outPerExpert = args->recvTokensPerExpert;
    p.dispatchDirect = direct ? 1 : 0;
    p.spansKnown = direct && handles_.at(target).layoutOnDevice ? 1 : 0;
    p.dispatchBalanced = balanced ? 1 : 0;
    // (direct runs the default kernels: no rings)
    if (direct && dispatchSendWarpsAuto_) p.dispatchSendWarps = 8;
    p.recvXPeers = direct ? recvSpot.table : nullptr;
    p.recvXOffset = recvSpot.offset;
    // Pulled: the senders push a few hundred bytes per row, the receivers pull the x rows.
    p.dispatchPullX = pull ? 1 : 0;
    if (pull && dispatchSendWarpsAuto_) p.dispatchSendWarps = 4;
    p.xPeers = pull ? xSpot.table : nullptr;
    p.xOffset = xSpot.offset;
    moecommResult_t status = launch(device::launchIntranodeDispatch(p, stream), "launchIntranodeDispatch");
    bool eager = false;  // launched outside stream capture
    if (status == moecommSuccess) status = noteUse(&handles_.at(target), stream, &eager);
    if (status != moecommSuccess) {
      if (route) destroyHandle(target);
      return status;
    }
    target->sourceInfoKnown = true;
    HandleDevice& device = handles_.at(target);
    device.recvCapacity = args->recvCapacity;
    if (eager) device.layoutOnDevice = true;
    if (route) *handle = target;
    return moecommSuccess;
  }

  moecommResult_t combine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle,
                          moecommStream_t stream) override {
    pollErrors();
    moecommResult_t checked = checkCombineArgs(*ep_, args, handle);
    if (checked == moecommSuccess && !handle->sourceInfoKnown) {
      checked = setError(moecommInvalidUsage,
                         "this handle has not been used by moecommEpDispatch yet; combine sends back the rows a "
                         "dispatch delivered");
    }
    const int recvCapacity = checked == moecommSuccess ? std::min(ep_->shape.numRanks * ep_->shape.maxTokensPerRank,
                                                                  handles_.at(handle).recvCapacity)
                                                       : 0;
    const SymmetricSpot xSpot =
        symmetricSpot(args->x, static_cast<uint64_t>(recvCapacity) * ep_->shape.hidden * 2, checked);
    const SymmetricSpot weightsSpot =
        symmetricSpot(args->topkWeights, static_cast<uint64_t>(recvCapacity) * ep_->shape.topk * 4, checked);
    // Direct combine needs the same allocation and offset everywhere (docs/ep-normal-gpu.md).
    const bool mayDirect = envInt(Env::EpDirectCombine) != 0 && ep_->comm->nranks > 1 && xSpot.table != nullptr &&
                           (args->topkWeights == nullptr || weightsSpot.table != nullptr);
    const std::vector<int64_t> spots = {mayDirect ? 1 : 0,
                                        static_cast<int64_t>(xSpot.id),
                                        static_cast<int64_t>(xSpot.offset),
                                        args->topkWeights != nullptr ? 1 : 0,
                                        static_cast<int64_t>(weightsSpot.id),
                                        static_cast<int64_t>(weightsSpot.offset)};
    std::vector<int64_t> allSpots;
    MC_CHECK(agree(checked, -1, &spots, &allSpots));
    // Weights: every rank passes them, from the same place, or none does (a rank without
    // weights has zeros there, so one rank with and one without differ).
    const bool direct = sameEverywhere(spots, allSpots);
    logDirect("combine", direct, &lastDirectCombine_);
    DeviceScope scope(ep_->comm->device);
    if (args->waitEvent != nullptr) MC_CUDA(cudaStreamWaitEvent(stream, args->waitEvent, 0));
    device::IntranodeParams p = base_;
    bindHandle(handle, &p);
    p.numTokens = handle->numTokens;
    p.recvCapacity = recvCapacity;
    p.combineDirect = direct ? 1 : 0;
    p.combinePeerX = direct ? xSpot.table : nullptr;
    p.combineXOffset = xSpot.offset;
    p.combinePeerWeights = direct && args->topkWeights != nullptr ? weightsSpot.table : nullptr;
    p.combineWeightsOffset = weightsSpot.offset;
    p.combineX = args->x;
    p.combineWeights = args->topkWeights;
    p.bias = args->bias;
    p.combinedX = args->combinedX;
    p.combinedWeights = args->combinedTopkWeights;
    MC_CHECK(launch(device::launchIntranodeCombine(p, stream), "launchIntranodeCombine"));
    return noteUse(handle, stream);
  }

  // Low-latency mode lives in ep_cuda_ll.cc (CudaLowLatency, made when the mode has it);
  // without it the shared checks report the mode error.
  moecommResult_t lowLatencyDispatch(const moecommEpLowLatencyDispatchArgs_t* args, moecommEpHandle_t* handle,
                                     moecommStream_t stream) override {
    if (lowLatency_ != nullptr) return lowLatency_->dispatch(args, handle, stream);
    MC_CHECK(checkLowLatencyDispatchArgs(*ep_, args, handle));
    return notSupported();
  }
  moecommResult_t lowLatencyCombine(const moecommEpLowLatencyCombineArgs_t* args, moecommEpHandle_t handle,
                                    moecommStream_t stream) override {
    if (lowLatency_ != nullptr) return lowLatency_->combine(args, handle, stream);
    MC_CHECK(checkLowLatencyCombineArgs(*ep_, args, handle));
    return notSupported();
  }
  moecommResult_t complete(moecommEpHandle_t handle, moecommStream_t stream) override {
    if (lowLatency_ != nullptr) return lowLatency_->complete(handle, stream);
    MC_CHECK(checkCompleteArgs(*ep_, handle));
    return notSupported();
  }
  moecommResult_t lowLatencyCombineBuffer(void** buffer) override {
    MC_REQUIRE(buffer != nullptr, moecommInvalidArgument, "buffer is NULL");
    MC_REQUIRE(lowLatency_ != nullptr, moecommInvalidUsage,
               "this EP was created with moecommEpModeNormal; the zero-copy buffer is a low-latency feature");
    return lowLatency_->combineBuffer(buffer);
  }
  void pollAsyncErrors() override {
    // Read-only for the normal mode's word (a call's sync() reads and clears it); the
    // low-latency word is taken atomically.
    if (host_ != nullptr) {
      const int code = host_->error;
      if (code != 0) ep_->comm->raiseAsyncError(static_cast<moecommResult_t>(code));
      if (host_->badEntry != 0) ep_->comm->raiseAsyncError(moecommInvalidArgument);
    }
    if (lowLatency_ != nullptr) lowLatency_->pollAsyncErrors();
  }
  void pullRankMask() override {
    if (lowLatency_ != nullptr) lowLatency_->pullRankMask();
  }
  moecommResult_t pushRankMask() override {
    return lowLatency_ != nullptr ? lowLatency_->pushRankMask() : moecommSuccess;
  }
  const char* lowLatencyTransport() const override {
    return lowLatency_ != nullptr ? lowLatency_->transportName() : "none";
  }

  moecommResult_t destroy() override {
    DeviceScope scope(ep_->comm->device);
    logProfile();
    if (lowLatency_ != nullptr) lowLatency_->logProfile();
    moecommResult_t status = buffer_ != nullptr ? buffer_->detachPeers() : moecommSuccess;
    if (lowLatency_ != nullptr) {
      const moecommResult_t detached = lowLatency_->detachPeers();
      if (status == moecommSuccess) status = detached;
    }
    const moecommResult_t barrier = ep_->comm->bootstrap->barrier();
    if (status == moecommSuccess) status = barrier;
    release();
    return status;
  }

  // The rows' sources stay on the device; this waits for the device to be idle, then copies.
  moecommResult_t sourceInfo(moecommEpHandle* handle, int* srcRank, int* srcIndex, int capacity) override {
    auto it = handles_.find(handle);
    MC_REQUIRE(it != handles_.end(), moecommInvalidUsage, "handle %p has no device routing on this EP",
               static_cast<void*>(handle));
    DeviceScope scope(ep_->comm->device);
    MC_CUDA(cudaDeviceSynchronize());
    pollErrors();
    int rows = 0;
    MC_CUDA(cudaMemcpy(&rows, it->second.numRecv, sizeof(int), cudaMemcpyDeviceToHost));
    rows = std::max(0, std::min(rows, it->second.recvCapacity));
    MC_REQUIRE(capacity >= rows, moecommInvalidArgument, "capacity = %d is smaller than the %d received rows", capacity,
               rows);
    if (srcRank != nullptr)
      MC_CUDA(cudaMemcpy(srcRank, it->second.srcRank, sizeof(int) * rows, cudaMemcpyDeviceToHost));
    if (srcIndex != nullptr) {
      MC_CUDA(cudaMemcpy(srcIndex, it->second.srcIndex, sizeof(int) * rows, cudaMemcpyDeviceToHost));
    }
    return moecommSuccess;
  }

  void forgetHandle(moecommEpHandle* handle) override {
    if (lowLatency_ != nullptr) lowLatency_->forgetHandle(handle);
    auto it = handles_.find(handle);
    if (it == handles_.end()) return;
    DeviceScope scope(ep_->comm->device);
    HandleDevice& d = it->second;
    if (!d.captured && pool_.size() < kHandleBlockPool) {
      pool_.push_back(d);
    } else {
      freeHandleBlock(&d);  // cudaFree waits for the device: nothing can still use the block
    }
    handles_.erase(it);
  }

 private:
  static moecommResult_t notSupported() {
    return setError(moecommNotSupported,
                    "low-latency mode is not implemented on the CUDA EP backend yet; use normal mode, or a "
                    "communicator on the host backend");
  }

  void release() {
    lowLatency_.reset();
    if (!handles_.empty()) {
      DeviceScope scope(ep_->comm->device);
      for (auto& entry : handles_) freeHandleBlock(&entry.second);
      handles_.clear();
    }
    if (!pool_.empty()) {
      DeviceScope scope(ep_->comm->device);
      for (HandleDevice& pooled : pool_) freeHandleBlock(&pooled);
      pool_.clear();
    }
    if (host_ != nullptr) {
      if (cudaFreeHost(const_cast<device::EpHostWords*>(host_)) != cudaSuccess) (void)cudaGetLastError();
      host_ = nullptr;
    }
    if (deviceBlock_ != nullptr) {
      DeviceScope scope(ep_->comm->device);
      if (cudaFree(deviceBlock_) != cudaSuccess) (void)cudaGetLastError();
      deviceBlock_ = nullptr;
    }
    buffer_.reset();
  }

  // The developer variants of the normal-mode kernels (docs/ep-normal-gpu.md, "Variants"),
  // read once from the environment; out-of-range values fall back to the defaults with a
  // warning. A bulk-copy ring is shrunk to fit the device's shared memory per block.
  moecommResult_t setVariants(device::IntranodeParams* p) {
    auto pick = [&](Env id, const char* name, int low, int high, int fallback) {
      const int64_t value = envInt(id);
      if (value >= low && value <= high) return static_cast<int>(value);
      MC_WARN(kLogEp, "rank %d: %s=%lld is outside [%d, %d]; using %d", ep_->rank, name, static_cast<long long>(value),
              low, high, fallback);
      return fallback;
    };
    // Tail batches. 0 (default): the dispatch publishes every 64 tokens on 4 or more ranks and
    // every 32 below, the combine every 32 rows (measured, docs/PERF.md fourteenth session: 64
    // is 2.5-3.5 % faster for the FP8 dispatch on 4x H200, 4-7 % slower on 2, and slower for
    // the staged combine on 4). 32, 64 or 128 set both (developer sweep).
    const int batch = static_cast<int>(envInt(Env::EpSendBatch));
    p->sendBatch = ep_->shape.numRanks >= 4 ? 64 : 32;
    p->combineBatch = 32;
    if (batch == 32 || batch == 64 || batch == 128) {
      p->sendBatch = batch;
      p->combineBatch = batch;
    } else if (batch != 0) {
      MC_WARN(kLogEp,
              "rank %d: MOECOMM_EP_SEND_BATCH=%d is not 0, 32, 64 or 128; using the default (dispatch %d, combine 32)",
              ep_->rank, batch, p->sendBatch);
    }
    p->sharedIntsBytes = device::intranodeSharedIntsBytes(p->numRanks, p->numChannels, p->sendBatch);
    // 0 (default): 6, or 8 for a direct dispatch (dispatch() sets it per call; measured on 2x
    // H200, W-prefill FP8: 142.6 -> 138.0 µs at SM 24, 204 -> 190 at SM 12, BF16 unchanged).
    p->dispatchSendWarps = pick(Env::EpDispatchSendWarps, "MOECOMM_EP_DISPATCH_SEND_WARPS", 0, 15, 0);
    dispatchSendWarpsAuto_ = p->dispatchSendWarps == 0;
    if (dispatchSendWarpsAuto_) p->dispatchSendWarps = 6;
    // 0 (default): enough sending warps in all for the links, at ~5 GB/s a warp pushes, ~72 in
    // all; measured at W-prefill on 2x H200: 3 best at 24 channels (240 µs against 245 with 4
    // and 271 with 6), 6 better than 3 at 12 (363 against 394 µs).
    p->combineSendWarps = pick(Env::EpCombineSendWarps, "MOECOMM_EP_COMBINE_SEND_WARPS", 0, 15, 0);
    if (p->combineSendWarps == 0)
      p->combineSendWarps = std::min(8, std::max(3, (72 + p->numChannels - 1) / p->numChannels));
    p->dispatchVariant =
        pick(Env::EpDispatchVariant, "MOECOMM_EP_DISPATCH_VARIANT", 0, device::kDispatchVariants - 1, 0);
    p->combineVariant = pick(Env::EpCombineVariant, "MOECOMM_EP_COMBINE_VARIANT", 0, device::kCombineVariants - 1, 1);
    p->pull = pick(Env::EpPull, "MOECOMM_EP_PULL", 0, 3, 0);
    p->ringStages = pick(Env::EpRingStages, "MOECOMM_EP_RING_STAGES", 2, 32, 4);
    p->ringStageBytes = pick(Env::EpRingStageBytes, "MOECOMM_EP_RING_STAGE_BYTES", 512, 65536, 4096) / 16 * 16;
    // Clusters of 2 (default): on 2x H200 at SM 24 the plain launch puts blocks 0-7 on SMs
    // 124-131, two per TPC, and a pair on SMs 0 and 16, and those push ~1.45x slower;
    // clustered, fewer blocks land there and the BF16 dispatch is 8 % faster, FP8 1-2 %
    // (PERF.md, eighteenth session).
    p->cluster = pick(Env::EpCluster, "MOECOMM_EP_CLUSTER", 1, 8, 2);
    int clusterLaunch = 0;  // (devices before Hopper have no clusters: a plain launch there)
    MC_CUDA(cudaDeviceGetAttribute(&clusterLaunch, cudaDevAttrClusterLaunch, ep_->comm->device));
    if (clusterLaunch == 0) p->cluster = 1;
    int limit = 0;
    MC_CUDA(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, ep_->comm->device));
    // Static shared memory of the kernels is well under 1 KiB.
    const uint64_t budget = static_cast<uint64_t>(std::max(0, limit - 1024));
    sharedBudget_ = budget;
    const int requested = p->ringStages;
    while (p->ringStages > 2 && std::max(device::intranodeSharedBytes(*p, device::kOpDispatch),
                                         device::intranodeSharedBytes(*p, device::kOpCombine)) > budget) {
      --p->ringStages;
    }
    if (std::max(device::intranodeSharedBytes(*p, device::kOpDispatch),
                 device::intranodeSharedBytes(*p, device::kOpCombine)) > budget) {
      MC_WARN(kLogEp, "rank %d: the bulk-copy rings do not fit in %d bytes of shared memory; using the default kernels",
              ep_->rank, limit);
      p->dispatchVariant = device::kDispatchVariantRegisters;
      p->combineVariant = device::kCombineVariantRegisters;
    } else if (p->ringStages != requested) {
      MC_WARN(kLogEp, "rank %d: MOECOMM_EP_RING_STAGES=%d does not fit in shared memory; using %d", ep_->rank,
              requested, p->ringStages);
    }
    MC_INFO(kLogEp,
            "rank %d: normal mode: tail batch dispatch %d combine %d, send warps dispatch %d combine %d, variants "
            "dispatch %d combine %d, ring %d x %d bytes, pull %d, cluster %d",
            ep_->rank, p->sendBatch, p->combineBatch, p->dispatchSendWarps, p->combineSendWarps, p->dispatchVariant,
            p->combineVariant, p->ringStages, p->ringStageBytes, p->pull, p->cluster);
    return moecommSuccess;
  }

  // Dispatch variants 2 and 3 hold one token per stage (a staged row of this call's dtype): as many
  // stages as fit, at least 2, else the default kernel for this call.
  void fitSendPrefetch(device::IntranodeParams* p) const {
    p->ringStageBytes = static_cast<int>(p->rowExtent);
    while (p->ringStages > 2 && device::intranodeSharedBytes(*p, device::kOpDispatch) > sharedBudget_) --p->ringStages;
    if (device::intranodeSharedBytes(*p, device::kOpDispatch) > sharedBudget_)
      p->dispatchVariant = device::kDispatchVariantRegisters;
  }

  // Builds with -DMOECOMM_KERNEL_PROFILE only: the timeline of the last dispatch, the last
  // dispatch with a new handle ("dispatch-routed") and the last combine, per event the
  // earliest, median and latest block, in microseconds after the earliest start.
  void logProfile() {
    const int blocks = base_.numChannels;
    for (int op : {device::kOpDispatch, device::kProfileDispatchRouted, device::kOpCombine}) {
      const char* name = op == device::kOpDispatch  ? "dispatch"
                         : op == device::kOpCombine ? "combine"
                                                    : "dispatch-routed";
      std::vector<unsigned long long> stamps(static_cast<size_t>(blocks) * 16);
      const int events = device::intranodeProfile(op, blocks, stamps.data());
      if (events <= 0) return;
      const unsigned long long origin = profileOrigin(stamps.data(), blocks, events);
      if (origin == 0) continue;  // no such call ran
      const std::string line = profileLine(stamps.data(), blocks, events, origin);
      MC_WARN(kLogEp, "rank %d profile %s (us min/median/max over %d blocks):%s", ep_->rank, name, blocks,
              line.c_str());
      // Per block: the SM it ran on (the last slot) and when it ended (the last event it stamped).
      std::string ends;
      for (int b = 0; b < blocks; ++b) {
        const unsigned long long* row = stamps.data() + static_cast<size_t>(b) * events;
        unsigned long long last = 0;
        for (int e = 0; e + 1 < events; ++e)
          if (profileStampOfCall(row[e], origin)) last = std::max(last, row[e] - origin);
        char text[48];
        std::snprintf(text, sizeof(text), " %d@sm%llu=%.1f", b, row[events - 1], last / 1000.0);
        ends += text;
      }
      MC_WARN(kLogEp, "rank %d profile %s, block@SM=end us:%s", ep_->rank, name, ends.c_str());
    }
  }

  // Reports errors the kernels recorded since the last call (through the comm's async error),
  // then clears the words so that a later call's own failure is seen (sync() of notify reads
  // them). A timeout sets the device's abort flag, and every later wait that gives up because
  // of it records the timeout again, so clearing never hides a broken EP.
  void pollErrors() {
    if (host_ == nullptr) return;
    const int code = host_->error;
    const int badEntry = host_->badEntry;
    if (code != 0 && !errorLogged_) {
      static const char* const kOps[device::kOps] = {"notify", "dispatch", "combine"};
      const int op = host_->errorOp;
      MC_WARN(kLogEp, "rank %d: a %s kernel reported %s (rank %d, channel %d)%s", ep_->rank,
              op >= 0 && op < device::kOps ? kOps[op] : "?", resultName(static_cast<moecommResult_t>(code)),
              host_->errorPeer, host_->errorChannel,
              code == moecommTimeout ? ": it waited for that rank in vain; this EP's later calls give up at once, "
                                       "destroy it"
                                     : "");
      errorLogged_ = true;
    }
    if (code != 0) {
      ep_->comm->raiseAsyncError(static_cast<moecommResult_t>(code));
      host_->error = 0;
    }
    if (badEntry != 0) {
      ep_->comm->raiseAsyncError(moecommInvalidArgument);
      host_->badEntry = 0;
    }
  }

  // Exchanges every rank's local verdict: a failure anywhere fails every rank. xType >= 0
  // (dispatch): every rank must dispatch the same type, since receivers read rows by their own.
  // `payload` (the same length on every rank) rides along; `all` gets every rank's, rank-major.
  moecommResult_t agree(moecommResult_t local, int32_t xType = -1, const std::vector<int64_t>* payload = nullptr,
                        std::vector<int64_t>* all = nullptr) {
    const std::string text = local != moecommSuccess ? lastErrorText() : "";
    const int nranks = ep_->comm->nranks;
    const size_t width = 2 + (payload != nullptr ? payload->size() : 0);
    std::vector<int64_t> mine(width, 0);
    mine[0] = local;
    mine[1] = local == moecommSuccess ? xType : -1;
    if (payload != nullptr) std::copy(payload->begin(), payload->end(), mine.begin() + 2);
    std::vector<int64_t> gathered(width * static_cast<size_t>(nranks));
    const moecommResult_t exchanged =
        ep_->comm->bootstrap->allgather(mine.data(), gathered.data(), sizeof(int64_t) * width);
    if (local != moecommSuccess) return setError(local, "%s", text.c_str());
    MC_CHECK(exchanged);
    for (int r = 0; r < nranks; ++r) {
      const int64_t verdict = gathered[width * r];
      MC_REQUIRE(verdict == moecommSuccess, moecommRemoteError,
                 "rank %d rejected its arguments to this EP call (%s); its moecommGetLastError says why", r,
                 resultName(static_cast<moecommResult_t>(verdict)));
    }
    for (int r = 0; r < nranks && xType >= 0; ++r) {
      const int64_t theirs = gathered[width * r + 1];
      MC_REQUIRE(theirs == xType, moecommInvalidArgument,
                 "rank %d dispatches x of type %lld but this rank passed type %d: every rank must pass the same xType",
                 r, static_cast<long long>(theirs), xType);
    }
    if (all != nullptr) {
      all->clear();
      for (int r = 0; r < nranks; ++r) {
        all->insert(all->end(), gathered.begin() + width * r + 2, gathered.begin() + width * (r + 1));
      }
    }
    return moecommSuccess;
  }

  // Whether entries [first, first + count) of every rank's payload (all: the ranks' payloads one
  // after another) equal this rank's, the first of them being 1 (this rank may go direct).
  static bool sameEverywhere(const std::vector<int64_t>& mine, const std::vector<int64_t>& all, size_t first = 0,
                             size_t count = SIZE_MAX) {
    count = std::min(count, mine.size() - std::min(first, mine.size()));
    if (count == 0 || mine[first] != 1 || all.size() % mine.size() != 0) return false;
    for (size_t i = 0; i < all.size(); ++i) {
      const size_t j = i % mine.size();
      if (j >= first && j < first + count && all[i] != mine[j]) return false;
    }
    return true;
  }
  // Logs "normal <op> <yes or no>" when `now` differs from *last (the GPU tests read these lines
  // to learn which path ran).
  void logPath(const char* op, bool now, bool* last, const char* yes, const char* no) {
    if (now == *last) return;
    MC_INFO(kLogEp, "rank %d: normal %s %s", ep_->rank, op, now ? yes : no);
    *last = now;
  }
  void logDirect(const char* op, bool direct, bool* last) {
    logPath(op, direct, last, "is direct (symmetric buffers at the same offset on every rank)", "stages its rows");
  }

  // Where a caller buffer of `bytes` lies in symmetric memory (moecommMemAlloc) with a device
  // table of the peers' pointers; table nullptr when it does not (or the call was rejected).
  struct SymmetricSpot {
    uint64_t id = 0;
    uint64_t offset = 0;
    void* const* table = nullptr;
  };
  SymmetricSpot symmetricSpot(const void* ptr, uint64_t bytes, moecommResult_t checked) const {
    SymmetricSpot spot;
    if (checked != moecommSuccess || ptr == nullptr || bytes == 0) return spot;
    size_t offset = 0;
    SymmetricMemory* memory = ep_->comm->memory->findSymmetric(ptr, bytes, &offset);
    if (memory == nullptr || !memory->isDevice() || memory->devicePeerTable() == nullptr || memory->id() == 0)
      return spot;
    spot.id = memory->id();
    spot.offset = offset;
    spot.table = memory->devicePeerTable();
    return spot;
  }

  moecommResult_t launch(int err, const char* what) {
    MC_REQUIRE(err == 0, moecommUnhandledCudaError, "%s failed: %s (%s)", what,
               cudaGetErrorName(static_cast<cudaError_t>(err)), cudaGetErrorString(static_cast<cudaError_t>(err)));
    return moecommSuccess;
  }

  moecommResult_t sync(moecommStream_t stream) {
    MC_CUDA(cudaStreamSynchronize(stream));
    const int code = host_->error;
    MC_REQUIRE(code == 0, static_cast<moecommResult_t>(code),
               "a notify kernel failed (%s) waiting for rank %d on channel %d; see moecommCommGetAsyncError",
               resultName(static_cast<moecommResult_t>(code)), host_->errorPeer, host_->errorChannel);
    return moecommSuccess;
  }

  // Every handle's block has the same size (it depends on the EP only): the top-k ids, then
  // the int arrays (sizes in createHandle).
  size_t handleIdxBytes() const {
    return roundUp(static_cast<size_t>(ep_->shape.maxTokensPerRank) * base_.idxStride * sizeof(int64_t), 16);
  }
  size_t handleBlockBytes() const {
    const auto& shape = ep_->shape;
    const size_t R = shape.numRanks;
    const size_t C = base_.numChannels;
    const size_t maxT = shape.maxTokensPerRank;
    const size_t ints = maxT * R + C * R + C * shape.numExperts + C * base_.chunkRows + 2 * R * C + 2 * R * maxT + 1;
    return handleIdxBytes() + ints * sizeof(int);
  }

  // A routing block for a new handle: a pooled one, the stream first waiting (on the device)
  // for the last launch that used it, or a new allocation. Under stream capture always a new
  // one (cudaMalloc, as a captured handle never returns to the pool).
  moecommResult_t takeHandleBlock(moecommStream_t stream, HandleDevice* d) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MC_CUDA(cudaStreamIsCapturing(stream, &capture));
    if (capture == cudaStreamCaptureStatusNone && !pool_.empty()) {
      *d = HandleDevice{};
      d->block = pool_.back().block;  // (the pooled entry's other fields are its last owner's)
      d->used = pool_.back().used;
      pool_.pop_back();
      if (cudaStreamWaitEvent(stream, d->used, 0) != cudaSuccess) {
        const cudaError_t err = cudaGetLastError();
        freeHandleBlock(d);
        return setError(moecommUnhandledCudaError, "cudaStreamWaitEvent before reusing a routing block failed: %s",
                        cudaGetErrorString(err));
      }
      return moecommSuccess;
    }
    MC_CUDA(cudaMalloc(&d->block, handleBlockBytes()));
    // A block first touched under capture (its zeroing goes into the graph) is never pooled.
    d->captured = capture != cudaStreamCaptureStatusNone;
    if (cudaEventCreateWithFlags(&d->used, cudaEventDisableTiming) != cudaSuccess) {
      const cudaError_t err = cudaGetLastError();
      freeHandleBlock(d);
      return setError(moecommUnhandledCudaError, "cudaEventCreateWithFlags for a routing block failed: %s",
                      cudaGetErrorString(err));
    }
    return moecommSuccess;
  }

  void freeHandleBlock(HandleDevice* d) {
    if (d->block != nullptr && cudaFree(d->block) != cudaSuccess) (void)cudaGetLastError();
    if (d->used != nullptr && cudaEventDestroy(d->used) != cudaSuccess) (void)cudaGetLastError();
    d->block = nullptr;
    d->used = nullptr;
  }

  // After a launch that uses the handle's block: remember it (or that a graph holds it).
  moecommResult_t noteUse(moecommEpHandle* handle, moecommStream_t stream) {
    return noteUse(&handles_.at(handle), stream);
  }
  // A block whose use could not be recorded is never pooled (its destroy frees it with
  // cudaFree, which waits for the device). *eager (if given): the launch ran outside stream
  // capture and its use was recorded.
  moecommResult_t noteUse(HandleDevice* d, moecommStream_t stream, bool* eager = nullptr) {
    if (eager != nullptr) *eager = false;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t err = cudaStreamIsCapturing(stream, &capture);
    if (err == cudaSuccess && capture != cudaStreamCaptureStatusNone) {
      d->captured = true;
      return moecommSuccess;
    }
    if (err == cudaSuccess) err = cudaEventRecord(d->used, stream);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      d->captured = true;
      return setError(moecommUnhandledCudaError, "recording the use of a handle's routing block failed: %s",
                      cudaGetErrorString(err));
    }
    if (eager != nullptr) *eager = true;
    return moecommSuccess;
  }

  // A new handle's device routing starts zeroed (on the call's stream), so a combine after a
  // captured but never replayed dispatch reads zero counts, not garbage.
  moecommResult_t createHandle(int numTokens, moecommStream_t stream, moecommEpHandle** out) {
    const auto& shape = ep_->shape;
    const size_t R = shape.numRanks;
    const size_t C = base_.numChannels;
    const size_t maxT = shape.maxTokensPerRank;
    const size_t idxBytes = handleIdxBytes();
    const size_t chunkRows = base_.chunkRows;
    HandleDevice d;
    MC_CHECK(takeHandleBlock(stream, &d));
    if (cudaMemsetAsync(d.block, 0, handleBlockBytes(), stream) != cudaSuccess) {
      const cudaError_t err = cudaGetLastError();
      freeHandleBlock(&d);
      return setError(moecommUnhandledCudaError, "cudaMemsetAsync of a new handle's routing failed: %s",
                      cudaGetErrorString(err));
    }
    // The zeroing is a use too: a handle destroyed before any launch pools the block behind it.
    if (noteUse(&d, stream) != moecommSuccess) {
      const std::string why = lastErrorText();
      freeHandleBlock(&d);
      return setError(moecommUnhandledCudaError, "%s", why.c_str());
    }
    d.idx = static_cast<int64_t*>(d.block);
    d.pos = reinterpret_cast<int*>(static_cast<uint8_t*>(d.block) + idxBytes);
    d.chanCount = d.pos + maxT * R;
    d.chanExpert = d.chanCount + C * R;
    d.selfToken = d.chanExpert + C * shape.numExperts;
    d.recvOffset = d.selfToken + C * chunkRows;
    d.recvCount = d.recvOffset + R * C;
    d.srcRank = d.recvCount + R * C;
    d.srcIndex = d.srcRank + R * maxT;
    d.numRecv = d.srcIndex + R * maxT;
    moecommEpHandle* handle = newHandle(ep_, EpHandleKind::kNormal);
    handle->numTokens = numTokens;
    handles_[handle] = d;
    *out = handle;
    return moecommSuccess;
  }

  void bindHandle(const moecommEpHandle* handle, device::IntranodeParams* p) const {
    const HandleDevice& d = handles_.at(const_cast<moecommEpHandle*>(handle));
    p->handleIdx = d.idx;
    p->pos = d.pos;
    p->chanCount = d.chanCount;
    p->chanExpert = d.chanExpert;
    p->selfToken = d.selfToken;
    p->recvOffset = d.recvOffset;
    p->recvCount = d.recvCount;
    p->srcRank = d.srcRank;
    p->srcIndex = d.srcIndex;
    p->numRecv = d.numRecv;
  }

  moecommEp* ep_;
  device::IntranodeParams base_{};
  std::unique_ptr<NvlinkSymmetric> buffer_;
  volatile device::EpHostWords* host_ = nullptr;  // mapped, followed by the notify counts
  void* deviceBlock_ = nullptr;                   // EpDeviceState, then the peer pointer array
  bool errorLogged_ = false;
  uint64_t sharedBudget_ = 0;        // dynamic shared memory a kernel of this EP may use
  bool lastDirectDispatch_ = false;  // the previous dispatch / combine was direct (logged on change)
  bool lastDirectCombine_ = false;
  bool lastPullDispatch_ = false;      // the previous dispatch pulled x rows (logged on change)
  bool lastBalancedDispatch_ = false;  // the previous dispatch was balanced (logged on change)
  bool dispatchSendWarpsAuto_ = true;  // MOECOMM_EP_DISPATCH_SEND_WARPS unset (0): 6, direct 8
  std::unordered_map<moecommEpHandle*, HandleDevice> handles_;
  std::vector<HandleDevice> pool_;              // destroyed handles' blocks, at most kHandleBlockPool
  std::unique_ptr<CudaLowLatency> lowLatency_;  // low-latency mode (ep_cuda_ll.cc); null in normal mode
};

}  // namespace

moecommResult_t cudaEpBufferBytes(const moecommComm& comm, const moecommEpConfig_t& config, size_t* bytes) {
  int deviceSms = 0;
  MC_CUDA(cudaDeviceGetAttribute(&deviceSms, cudaDevAttrMultiProcessorCount, comm.device));
  const int budget = config.numSms != 0 ? config.numSms : static_cast<int>(envInt(Env::EpNumSms));
  const int channels = std::max(1, std::min(budget, deviceSms));  // as the backend resolves it
  reference::EpShape shape;
  shape.numRanks = comm.nranks;
  shape.numExperts = config.numExperts;
  shape.hidden = config.hidden;
  shape.topk = config.topk;
  shape.maxTokensPerRank = config.maxTokensPerRank;
  device::IntranodeParams normal{};
  setShape(shape, channels, &normal);
  uint64_t total = planNormalBuffer(&normal);
  if (config.mode != moecommEpModeNormal) {
    device::LowLatencyParams lowLatency{};
    total += CudaLowLatency::planBuffer(shape, channels, &lowLatency);
  }
  *bytes = static_cast<size_t>(total);
  return moecommSuccess;
}

moecommResult_t makeCudaEpBackend(moecommEp* ep, std::unique_ptr<EpBackend>* out) {
  std::unique_ptr<CudaEpBackend> backend(new CudaEpBackend(ep));
  MC_CHECK(backend->init());
  *out = std::move(backend);
  return moecommSuccess;
}

}  // namespace moecomm

#endif  // MOECOMM_HAVE_CUDA
