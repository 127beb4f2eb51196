// Intranode normal-mode EP kernels (see device_host.h for the buffer layout).
//
// One launch per collective (plus none for the routing: the sending warps of each channel
// compute their own). Grid = numChannels blocks = the SM budget; in every block:
//   warps [0, kSendWarps)             send: channel c's tokens (dispatch) or received rows
//                                     (combine), 16-byte vectors, each source row loaded once
//                                     and stored to every destination that wants it;
//   warps [kSendWarps, kWarps)        receive: wait for the tails the peers publish and copy
//                                     (dispatch) or reduce (combine) rows as they arrive.
// Progress words carry the call's tag (sequence number) in their high half, so a word left by
// the previous call is never mistaken for this one's. Before writing into a destination's
// staging a channel waits for that destination's ack of the previous call on the same
// channel. Sequence numbers live in device memory (EpDeviceState): the last block of a call
// to finish advances them, so a captured CUDA graph replays correctly.
//
// Waits are bounded by params.timeoutNs. On expiry the kernel records moecommTimeout with the
// peer, channel and op in the mapped host words, sets state->abort so later waits give up at
// once, and goes on: results are then garbage, never a hang or a trap.
#include <cuda_runtime.h>

#include "device/api.h"
#include "device/bulk_copy.cuh"
#include "device/common.cuh"
#include "ep/dtype.h"

namespace moecomm {
namespace device {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// How a block's warps split into sending and receiving groups is chosen per kernel (dispatch
// sends more than it copies out; combine reduces more than it sends back): every kernel sets
// sSendWarps first thing.
__shared__ int sSendWarps;
#define kSendWarps sSendWarps
#define kRecvWarps (kWarps - sSendWarps)
#define kSendThreads (sSendWarps * 32)
#define kRecvThreads ((kWarps - sSendWarps) * 32)
// Dispatch and combine take theirs from the parameters (MOECOMM_EP_*_SEND_WARPS; ep_cuda.cc
// picks the defaults).
constexpr int kNotifySendWarps = 8;

__device__ __forceinline__ void setSplit(int sendWarps) {
  if (threadIdx.x == 0) sSendWarps = sendWarps;
  __syncthreads();
}
constexpr int kBarrierSend = 1;  // named barriers of the two warp groups (0 is __syncthreads)
constexpr int kBarrierRecv = 2;
constexpr int kUnroll = 16;  // 16-byte vectors in flight per lane in a row copy
// kBatch, a template argument of the dispatch and combine kernels (32, 64 or 128: the
// dispatch's IntranodeParams::sendBatch, the combine's combineBatch; a run-time value costs the
// default kernel spills), bounds the rows a sending channel moves between two tail publishes
// (sendBatchSize).

// Rows a sending channel moves between two tail publishes, given `done` already moved: a
// multiple of the sending warps (at most `batch`, at least one per warp), so every warp takes
// the same share of a batch and none idles at the batch's barrier while another sends an extra
// row. With `ramp`, the first batches are smaller (one row per warp, then doubling), so the
// receivers start after a few rows instead of a whole batch.
__device__ __forceinline__ int64_t sendBatchSize(int64_t done, int batch, bool ramp) {
  const int64_t full = max(kSendWarps, batch / kSendWarps * kSendWarps);
  return ramp ? min(full, max(static_cast<int64_t>(kSendWarps), done)) : full;
}
constexpr int kErrorInvalidArgument = 4;  // moecommInvalidArgument
constexpr int kErrorTimeout = 8;          // moecommTimeout
constexpr int kCtrlCount = 0;
constexpr int kCtrlTail = 1;
constexpr int kCtrlAck = 2;
constexpr int kCtrlCountOdd = 3;  // count words of odd sequence numbers (see countWord)
// Direct dispatch: the destination's first row of (source, channel) in its recvX and how many of
// those rows fit its recvCapacity; direct combine: the same for the rows a rank holds in its
// combineX (publishRowSpan). Two pairs, for even and odd sequence numbers (see spanKinds).
constexpr int kCtrlBase = 4;
constexpr int kCtrlHeld = 5;
constexpr int kCtrlBaseOdd = 6;
constexpr int kCtrlHeldOdd = 7;
// The balanced dispatch's block tails (dispatchSendBalanced): a kind of their own, so that an
// unbalanced call right after a balanced one, whose channel c waits only for channel c's ack,
// never overwrites a tail word that another channel of the destination still polls.
constexpr int kCtrlBlockTail = 8;
static_assert(kCtrlBlockTail < kCtrlKinds, "the buffer layout (planNormalBuffer) holds kCtrlKinds kinds");

// Developer timeline (build with -DMOECOMM_KERNEL_PROFILE): per op and block, the global
// timer at fixed points of the last call (see intranodeProfile).
#ifdef MOECOMM_KERNEL_PROFILE
constexpr int kProfileBlocks = 256;
constexpr int kProfileEvents = 11;  // events 0-9, then the block's SM id (taken at event 0)
__device__ unsigned long long gProfile[kOps + 1][kProfileBlocks][kProfileEvents];
#define MC_PROFILE(op, event, leader)                             \
  do {                                                            \
    if (threadIdx.x == (leader) && blockIdx.x < kProfileBlocks) { \
      gProfile[op][blockIdx.x][event] = globalTimerNs();          \
      if ((event) == 0) {                                         \
        unsigned sm;                                              \
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));           \
        gProfile[op][blockIdx.x][kProfileEvents - 1] = sm;        \
      }                                                           \
    }                                                             \
  } while (0)
// After a dispatch block's last stamp (thread 0, past finishCall's barrier, so every thread's
// stamps are visible): a call that computed its routing copies the block's row to the routed
// slot, so a run of new and reused handles shows both timelines.
#define MC_PROFILE_KEEP_ROUTED(routed)                                                          \
  do {                                                                                          \
    if ((routed) && threadIdx.x == 0 && blockIdx.x < kProfileBlocks) {                          \
      for (int e = 0; e < kProfileEvents; ++e)                                                  \
        gProfile[kProfileDispatchRouted][blockIdx.x][e] = gProfile[kOpDispatch][blockIdx.x][e]; \
    }                                                                                           \
  } while (0)
#else
#define MC_PROFILE(op, event, leader) \
  do {                                \
  } while (0)
#define MC_PROFILE_KEEP_ROUTED(routed) \
  do {                                 \
  } while (0)
#endif

__device__ __forceinline__ void groupBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ uint64_t tagOf(uint64_t sequence) { return sequence & 0xffffffffull; }
__device__ __forceinline__ uint64_t packWord(uint64_t sequence, int count) {
  return (tagOf(sequence) << 32) | static_cast<uint32_t>(count);
}

__device__ void raiseError(const IntranodeParams& p, int code, int peer, int channel, int op) {
  if (atomicCAS(&p.host->error, 0, code) == 0) {
    p.host->errorPeer = peer;
    p.host->errorChannel = channel;
    p.host->errorOp = op;
  }
  if (code == kErrorTimeout) atomicExch(&p.state->abort, 1u);
}

__device__ uint64_t* ctrlWord(const IntranodeParams& p, int owner, int kind, int op, int channel, int rank) {
  return reinterpret_cast<uint64_t*>(p.peers[owner] + p.ctrlOffset) +
         ((static_cast<int64_t>(kind) * kOps + op) * p.numChannels + channel) * p.numRanks + rank;
}

// Count words and per-expert counts are double-buffered by the parity of the sequence: every
// channel of a receiver reads every channel's counts, but a source's channel only waits for
// the ack of the same channel before its next call, so call n+1 must not overwrite what a
// slower channel of the receiver may still read for call n. Call n+2 may: the source can only
// start it after the receiver's whole kernel of call n+1 ran, hence after all of call n.
__device__ uint64_t* countWord(const IntranodeParams& p, int owner, int op, uint64_t sequence, int channel, int rank) {
  return ctrlWord(p, owner, (sequence & 1) != 0 ? kCtrlCountOdd : kCtrlCount, op, channel, rank);
}

__device__ int* expertCounts(const IntranodeParams& p, int owner, int op, uint64_t sequence, int source, int channel) {
  const int localExperts = p.numExperts / p.numRanks;
  const int64_t parity = static_cast<int64_t>(sequence & 1);
  return reinterpret_cast<int*>(p.peers[owner] + p.expertsOffset) +
         (((static_cast<int64_t>(op) * 2 + parity) * p.numRanks + source) * p.numChannels + channel) * localExperts;
}

// The slot of ordinal 0 of (source, channel) in a staging area (stagingRow).
__device__ __forceinline__ int64_t stagingSlotBase(const IntranodeParams& p, int source, int channel) {
  return (static_cast<int64_t>(source) * p.numChannels + channel) * p.chunkRows;
}

__device__ uint8_t* stagingRow(const IntranodeParams& p, int owner, uint64_t offset, uint64_t rowBytes, int source,
                               int channel, int ordinal) {
  return p.peers[owner] + offset + static_cast<uint64_t>(stagingSlotBase(p, source, channel) + ordinal) * rowBytes;
}

// Where op's row `ordinal` of channel c from rank `source` to rank `dest` lives. Pushed (the
// default): in the destination's staging, at the source's slot; the source stores it over the
// link and the destination reads it locally. Pulled (MOECOMM_EP_PULL, per op): in the source's
// own staging, at the destination's slot; the source stores it locally and the destination
// reads it over the link. Either way the source publishes its tail into the destination's
// control words after the rows, and the destination's ack frees the slots for the next call.
__device__ uint8_t* exchangeRow(const IntranodeParams& p, int op, int source, int dest, int channel, int ordinal) {
  const bool dispatch = op == kOpDispatch;
  const uint64_t offset = dispatch ? p.dispatchOffset : p.combineOffset;
  const uint64_t rowBytes = dispatch ? p.dispatchRowBytes : p.combineRowBytes;
  if ((p.pull & (dispatch ? 1 : 2)) != 0) return stagingRow(p, source, offset, rowBytes, dest, channel, ordinal);
  return stagingRow(p, dest, offset, rowBytes, source, channel, ordinal);
}

// Bounded spin until done(word) holds; returns the last word read. One thread.
template <typename Done>
__device__ uint64_t waitWord(const IntranodeParams& p, const uint64_t* word, Done done, int peer, int channel, int op) {
  uint64_t value = loadAcquireSys(word);
  if (done(value)) return value;
  const uint64_t start = globalTimerNs();
  for (uint32_t spins = 0;; ++spins) {
    value = loadAcquireSys(word);
    if (done(value)) return value;
    if ((spins & 63) == 0) {
      if (*reinterpret_cast<volatile unsigned int*>(&p.state->abort) != 0) {
        // An earlier call timed out: give up, and say so again (the host clears reported errors).
        raiseError(p, kErrorTimeout, peer, channel, op);
        return value;
      }
      if (globalTimerNs() - start > p.timeoutNs) {
        raiseError(p, kErrorTimeout, peer, channel, op);
        return value;
      }
    }
  }
}

// Threads 0..threads-1 wait until every other rank acked this call of op on the channel: a rank
// whose own memory the peers read in place (a direct combine's input, a pulled dispatch's x)
// must not end its call while they may still read it.
__device__ void waitCallAcked(const IntranodeParams& p, int op, int channel, uint64_t sequence, int threads) {
  for (int r = threadIdx.x; r < p.numRanks; r += threads) {
    if (r == p.rank) continue;
    waitWord(
        p, ctrlWord(p, p.rank, kCtrlAck, op, channel, r), [&](uint64_t v) { return v >= sequence; }, r, channel, op);
  }
}

__device__ void waitAck(const IntranodeParams& p, int op, int channel, int dest, uint64_t sequence) {
  waitWord(
      p, ctrlWord(p, p.rank, kCtrlAck, op, channel, dest), [&](uint64_t v) { return v + 1 >= sequence; }, dest, channel,
      op);
}

// Rows (count) of a count or tail word of this call; 0 for a word of another call.
__device__ __forceinline__ int rowsOf(uint64_t word, uint64_t sequence) {
  return (word >> 32) == tagOf(sequence) ? static_cast<int>(word & 0xffffffffull) : 0;
}

// The span words of a call: {first row, rows held} kinds, a pair per sequence parity. A direct
// dispatch's receiver with a reused handle publishes call n+1's span at its kernel's start,
// when a source that sends it no rows on the channel may not have read call n's yet; call
// n+2's may overwrite call n's, because the receiver's call n+1 waited for every source's count
// words of n+1, published after the source's whole kernel of call n.
__device__ __forceinline__ int2 spanKinds(uint64_t sequence) {
  return (sequence & 1) != 0 ? make_int2(kCtrlBaseOdd, kCtrlHeldOdd) : make_int2(kCtrlBase, kCtrlHeld);
}

// Direct dispatch and combine: a rank tells `owner` where the rows of (owner, channel) start in
// its buffer (`first`) and how many it holds there (of the `count` rows, those below
// recvCapacity): the first row plainly, then the rows held with release, both tagged with the
// call, in the owner's span words of the call (spanKinds). The senders of a direct dispatch
// wait for this before their first row (dispatchSend).
__device__ __forceinline__ void publishRowSpan(const IntranodeParams& p, int owner, int op, int channel,
                                               uint64_t sequence, int first, int count) {
  const int held = max(0, min(count, p.recvCapacity - first));
  const int2 kinds = spanKinds(sequence);
  *reinterpret_cast<volatile uint64_t*>(ctrlWord(p, owner, kinds.x, op, channel, p.rank)) = packWord(sequence, first);
  storeReleaseSys(ctrlWord(p, owner, kinds.y, op, channel, p.rank), packWord(sequence, held));
}

// Waits for the span rank `from` published into this rank's words (bounded; a timeout leaves
// 0 rows held): {first row, rows held}.
__device__ __forceinline__ int2 awaitRowSpan(const IntranodeParams& p, int op, int channel, int from,
                                             uint64_t sequence) {
  const int2 kinds = spanKinds(sequence);
  const uint64_t word = waitWord(
      p, ctrlWord(p, p.rank, kinds.y, op, channel, from), [&](uint64_t v) { return (v >> 32) == tagOf(sequence); },
      from, channel, op);
  const uint64_t first = *reinterpret_cast<volatile uint64_t*>(ctrlWord(p, p.rank, kinds.x, op, channel, from));
  return make_int2(rowsOf(first, sequence), rowsOf(word, sequence));
}

// Row `ordinal` of rank r's span in a symmetric buffer (bases: every rank's allocation as this
// rank maps it, the buffer at `offset` in it), given the spans read by awaitRowSpan: span[r]
// first rows, span[R + r] rows held. nullptr when r does not hold that row (or no buffer).
__device__ __forceinline__ uint8_t* spanRow(void* const* bases, uint64_t offset, uint64_t rowBytes, const int* span,
                                            int R, int r, int ordinal) {
  if (bases == nullptr || ordinal >= span[R + r]) return nullptr;
  return static_cast<uint8_t*>(bases[r]) + offset + static_cast<uint64_t>(span[r] + ordinal) * rowBytes;
}

__device__ uint64_t readSequence(const IntranodeParams& p, int op) {
  return *reinterpret_cast<volatile unsigned long long*>(&p.state->sequence[op]) + 1;
}

// Called by every block at its very end: the last block advances the op's sequence.
__device__ void finishCall(const IntranodeParams& p, int op, uint64_t sequence) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&p.state->finishedBlocks[op], 1u) == gridDim.x - 1) {
      p.state->finishedBlocks[op] = 0;
      if (op == kOpDispatch) p.state->dispatchClaim = 0;  // every block is past its claims
      p.state->sequence[op] = sequence;
      __threadfence();
    }
  }
}

// Token range of channel c: [first, last).
__device__ __forceinline__ void channelTokens(int numTokens, int numChannels, int channel, int* first, int* last) {
  const int chunk = (numTokens + numChannels - 1) / numChannels;
  *first = min(numTokens, channel * chunk);
  *last = min(numTokens, *first + chunk);
}

// ---- Row copies --------------------------------------------------------------------------

// One warp copies `bytes` (a multiple of 16, both ends 16-byte aligned) from src to every
// destination dst(d) for which dst returns non-null, d in [0, numDst). The source is read
// once; kUnroll vectors per lane are in flight. `readOnlySrc`: src is not written during the
// kernel (user input), so the non-coherent path may be used.
template <bool kReadOnlySrc, typename Dst>
__device__ void warpCopyVec(const uint8_t* src, uint64_t bytes, int numDst, Dst dst, int lane) {
  const int4* s = reinterpret_cast<const int4*>(src);
  const int64_t n = static_cast<int64_t>(bytes / 16);
  for (int64_t base = 0; base < n; base += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + lane + 32 * j;
      if (i < n) v[j] = kReadOnlySrc ? loadStreaming(s + i) : s[i];
    }
    for (int d = 0; d < numDst; ++d) {
      int4* o = reinterpret_cast<int4*>(dst(d));
      if (o == nullptr) continue;
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t i = base + lane + 32 * j;
        if (i < n) o[i] = v[j];
      }
    }
  }
}

// Byte-granular fallback for unaligned user buffers.
template <typename Dst>
__device__ void warpCopyBytes(const uint8_t* src, uint64_t bytes, int numDst, Dst dst, int lane) {
  for (uint64_t i = lane; i < bytes; i += 32) {
    const uint8_t value = src[i];
    for (int d = 0; d < numDst; ++d) {
      uint8_t* o = dst(d);
      if (o != nullptr) o[i] = value;
    }
  }
}

template <bool kReadOnlySrc, typename Dst>
__device__ void warpCopy(const uint8_t* src, uint64_t bytes, bool aligned, int numDst, Dst dst, int lane) {
  if (aligned) {
    warpCopyVec<kReadOnlySrc>(src, bytes, numDst, dst, lane);
  } else {
    warpCopyBytes(src, bytes, numDst, dst, lane);
  }
}

__device__ __forceinline__ bool aligned16(const void* a) { return (reinterpret_cast<uintptr_t>(a) & 15) == 0; }

// ---- Shared-memory rings of the bulk-copy variants ---------------------------------------

// Dynamic shared memory: [int tables: sharedIntsBytes][per receiving warp and stage, a
// kRingCtrlBytes control slot: the stage's mbarrier, then what the stage holds][per
// receiving warp, ringStages buffers of ringStageBytes].
constexpr int kRingCtrlBytes = 32;

__host__ __device__ inline uint64_t ringCtrlBytes(int recvWarps, int stages) {
  return (static_cast<uint64_t>(recvWarps) * stages * kRingCtrlBytes + 127) / 128 * 128;
}

// One receiving warp's ring. Stage k's barrier completes once per use; use n of stage k (the
// n-th time the stage is filled, n = issued / stages) completes the phase of parity n & 1.
struct WarpRing {
  uint8_t* ctrl;     // stages x kRingCtrlBytes
  uint8_t* buffers;  // stages x stageBytes
  int stages;
  int stageBytes;
  __device__ uint64_t* barrier(int stage) const { return reinterpret_cast<uint64_t*>(ctrl + stage * kRingCtrlBytes); }
  __device__ int4* meta(int stage) const { return reinterpret_cast<int4*>(ctrl + stage * kRingCtrlBytes + 16); }
  __device__ uint8_t* buffer(int stage) const { return buffers + static_cast<int64_t>(stage) * stageBytes; }
};

// The ring of receiving warp `recvWarp` of `recvWarps`; lane 0 initialises its barriers.
__device__ WarpRing makeWarpRing(const IntranodeParams& p, uint8_t* dynamicShared, int recvWarp, int recvWarps,
                                 int lane) {
  WarpRing ring;
  ring.stages = p.ringStages;
  ring.stageBytes = p.ringStageBytes;
  uint8_t* ctrlBase = dynamicShared + p.sharedIntsBytes;
  ring.ctrl = ctrlBase + static_cast<int64_t>(recvWarp) * ring.stages * kRingCtrlBytes;
  ring.buffers =
      ctrlBase + ringCtrlBytes(recvWarps, ring.stages) + static_cast<int64_t>(recvWarp) * ring.stages * ring.stageBytes;
  if (lane == 0) {
    for (int k = 0; k < ring.stages; ++k) mbarrierInit(ring.barrier(k), 1);
    fenceBarrierInit();
  }
  __syncwarp();
  return ring;
}

// Bounded wait for a stage's bulk copies (every lane that reads the stage waits itself).
// False: the wait gave up (timeout or an earlier abort), recorded as a timeout of op.
__device__ bool waitStage(const IntranodeParams& p, const WarpRing& ring, int stage, uint32_t parity, int channel,
                          int op) {
  if (mbarrierTryWait(ring.barrier(stage), parity)) return true;
  const uint64_t start = globalTimerNs();
  for (uint32_t spins = 0;; ++spins) {
    if (mbarrierTryWait(ring.barrier(stage), parity)) return true;
    if ((spins & 63) == 0 &&
        (*reinterpret_cast<volatile unsigned int*>(&p.state->abort) != 0 || globalTimerNs() - start > p.timeoutNs)) {
      raiseError(p, kErrorTimeout, p.rank, channel, op);
      return false;
    }
  }
}

// ---- Routing (sending warps of one channel) ----------------------------------------------

// Exclusive prefix over the sending group's threads of four 16-bit counters packed in one word
// (each thread adds at most 1 to each, so no field carries into the next); *total gets the sums.
__device__ uint64_t sendGroupScan4(uint64_t value, uint64_t* total, uint64_t* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  uint64_t inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint64_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  groupBarrier(kBarrierSend, kSendThreads);
  uint64_t before = 0;
  uint64_t sum = 0;
  for (int w = 0; w < kSendWarps; ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  groupBarrier(kBarrierSend, kSendThreads);
  *total = sum;
  return before + inclusive - value;
}
__device__ __forceinline__ int field16(uint64_t packed, int j) {
  return static_cast<int>((packed >> (16 * j)) & 0xffff);
}

// Computes channel c's routing into the handle: normalized ids, per-rank ordinals (pos),
// per-rank counts and per-expert counts. Sending threads only.
__device__ void routeChannel(const IntranodeParams& p, int channel, int first, int last, uint64_t* scratch) {
  const int localExperts = p.numExperts / p.numRanks;
  int* chanExpert = p.chanExpert + static_cast<int64_t>(channel) * p.numExperts;
  for (int e = threadIdx.x; e < p.numExperts; e += kSendThreads) chanExpert[e] = 0;
  groupBarrier(kBarrierSend, kSendThreads);
  for (int t = first + threadIdx.x; t < last; t += kSendThreads) {
    for (int k0 = 0; k0 < p.topk; k0 += kIdGroup) {
      int64_t ids[kIdGroup];
      loadIdGroup(ids, k0, p.topk,
                  [&](int k) { return loadExpertId(p.topkIdx, p.topkIdxIs64, static_cast<int64_t>(t) * p.topk + k); });
#pragma unroll
      for (int u = 0; u < kIdGroup && k0 + u < p.topk; ++u) {
        const int64_t e = ids[u];
        const bool valid = e >= 0 && e < p.numExperts;
        if (e < -1 || e >= p.numExperts) raiseError(p, kErrorInvalidArgument, p.rank, channel, kOpDispatch);
        p.handleIdx[static_cast<int64_t>(t) * p.idxStride + k0 + u] = valid ? e : -1;
        if (valid) atomicAdd(&chanExpert[e], 1);
      }
    }
  }
  groupBarrier(kBarrierSend, kSendThreads);
  // Each destination's tokens in order, four destinations per pass: one scan of packed flags
  // gives a token its ordinal at all four.
  for (int d0 = 0; d0 < p.numRanks; d0 += 4) {
    int running[4] = {0, 0, 0, 0};
    for (int base = first; base < last; base += kSendThreads) {
      const int t = base + threadIdx.x;
      uint64_t goes = 0;
      for (int k0 = 0; t < last && k0 < p.topk; k0 += kIdGroup) {
        int64_t ids[kIdGroup];
        loadIdGroup(ids, k0, p.topk, [&](int k) { return p.handleIdx[static_cast<int64_t>(t) * p.idxStride + k]; });
#pragma unroll
        for (int u = 0; u < kIdGroup; ++u) {
          const int64_t d = ids[u] >= 0 ? ids[u] / localExperts - d0 : -1;
          if (d >= 0 && d < 4) goes |= 1ull << (16 * d);
        }
      }
      uint64_t total = 0;
      const uint64_t before = sendGroupScan4(goes, &total, scratch);
#pragma unroll
      for (int j = 0; j < 4 && d0 + j < p.numRanks; ++j) {
        const int dest = d0 + j;
        const int ordinal = running[j] + field16(before, j);
        if (t < last) {
          const bool to = field16(goes, j) != 0;
          p.pos[static_cast<int64_t>(t) * p.numRanks + dest] = to ? ordinal : -1;
          if (to && dest == p.rank) p.selfToken[channel * p.chunkRows + ordinal] = t;
        }
        running[j] += field16(total, j);
      }
    }
    if (threadIdx.x == 0) {
      for (int j = 0; j < 4 && d0 + j < p.numRanks; ++j) p.chanCount[channel * p.numRanks + d0 + j] = running[j];
    }
  }
  groupBarrier(kBarrierSend, kSendThreads);
}

// Publish channel c's counts (per-local-expert, then the row count with the call's tag) into
// every destination, by the `threads` threads of one warp group (tid: the thread's index in it,
// barrier: the group's named barrier): the sending threads after a new handle's routing, the
// receiving ones with a reused handle (dispatchReceive), so the senders start at once. The
// words need no ack of the destination first (the senders wait for it anyway, for their rows):
// they are double-buffered by the sequence's parity (countWord), and call n+2's may overwrite
// call n's once this rank's call n+1 ended, which waited for every count word of n+1, the
// destination's too, so the destination's kernel of n had ended (every channel of it read call
// n's words).
__device__ void publishCounts(const IntranodeParams& p, int op, int channel, uint64_t sequence, int tid, int threads,
                              int barrier) {
  const int localExperts = p.numExperts / p.numRanks;
  const int* chanExpert = p.chanExpert + static_cast<int64_t>(channel) * p.numExperts;
  for (int i = tid; i < p.numRanks * localExperts; i += threads) {
    const int dest = i / localExperts;
    const int j = i % localExperts;
    expertCounts(p, dest, op, sequence, p.rank, channel)[j] = chanExpert[dest * localExperts + j];
  }
  groupBarrier(barrier, threads);
  for (int dest = tid; dest < p.numRanks; dest += threads) {
    __threadfence_system();
    storeReleaseSys(countWord(p, dest, op, sequence, channel, p.rank),
                    packWord(sequence, p.chanCount[channel * p.numRanks + dest]));
  }
}

// ---- Notify ------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 1) notifyKernel(IntranodeParams p) {
  __shared__ uint64_t scratch[kWarps];
  __shared__ int totalRows;
  int* total = &totalRows;
  const int channel = blockIdx.x;
  setSplit(kNotifySendWarps);
  const uint64_t sequence = readSequence(p, kOpNotify);
  if (threadIdx.x < kSendThreads) {
    for (int dest = threadIdx.x; dest < p.numRanks; dest += kSendThreads) waitAck(p, kOpNotify, 0, dest, sequence);
    groupBarrier(kBarrierSend, kSendThreads);
    int first = 0;
    int last = 0;
    channelTokens(p.numTokens, p.numChannels, channel, &first, &last);
    routeChannel(p, channel, first, last, scratch);
    publishCounts(p, kOpNotify, channel, sequence, threadIdx.x, kSendThreads, kBarrierSend);
  } else if (channel == 0) {
    // Channel 0's receiving threads total every source's counts for this rank.
    const int tid = threadIdx.x - kSendThreads;
    const int words = p.numChannels * p.numRanks;
    if (tid == 0) *total = 0;
    groupBarrier(kBarrierRecv, kRecvThreads);
    // Each thread adds up the rows of the words it waited for.
    int rows = 0;
    for (int i = tid; i < words; i += kRecvThreads) {
      const int c = i / p.numRanks;
      const int s = i % p.numRanks;
      const uint64_t word = waitWord(
          p, countWord(p, p.rank, kOpNotify, sequence, c, s), [&](uint64_t v) { return (v >> 32) == tagOf(sequence); },
          s, c, kOpNotify);
      rows += rowsOf(word, sequence);
    }
    if (rows != 0) atomicAdd(total, rows);
    groupBarrier(kBarrierRecv, kRecvThreads);
    const int localExperts = p.numExperts / p.numRanks;
    for (int j = tid; j < 1 + localExperts; j += kRecvThreads) {
      int sum = 0;
      if (j == 0) {
        sum = *total;
      } else {
        for (int s = 0; s < p.numRanks; ++s) {
          for (int c = 0; c < p.numChannels; ++c) sum += expertCounts(p, p.rank, kOpNotify, sequence, s, c)[j - 1];
        }
      }
      p.host->notify[j] = sum;
      if (j == 0) *p.numRecv = sum;
    }
    groupBarrier(kBarrierRecv, kRecvThreads);
    for (int s = tid; s < p.numRanks; s += kRecvThreads) {
      storeReleaseSys(ctrlWord(p, s, kCtrlAck, kOpNotify, 0, p.rank), sequence);
    }
  }
  finishCall(p, kOpNotify, sequence);
}

// ---- Dispatch ----------------------------------------------------------------------------

// Scales of an FP8 row move as 16-byte vectors when every row start is 16-byte aligned.
__device__ __forceinline__ bool scalesVectorOk(const IntranodeParams& p, const void* user) {
  const int scalesPerRow = p.hidden / 128;
  return scalesPerRow % 4 == 0 && scalesPerRow <= 128 && aligned16(user);
}

// One warp sends token t to every rank with posRow[d] >= 0: the x row, its scales, the
// normalized top-k ids, weights and the token index. Every load is issued before any store,
// so a token costs one round trip to memory per kUnroll vectors per lane. kPullX: the pulled
// dispatch, whose receivers read the x row themselves. kBalanced: the balanced dispatch
// (`direct` is then the span table of t's channel, whose third part direct[2 R + d] is the
// staging slot of d's received row 0 of t's channel, minus that row: dispatchSendBalanced);
// lane 0 counts the rows for each destination in sent[d].
template <bool kPullX = false, bool kBalanced = false>
__device__ void sendToken(const IntranodeParams& p, int channel, int t, const int* posRow, bool xAligned,
                          bool scalesVec, const int* direct, int lane, int* sent = nullptr) {
  const int R = p.numRanks;
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int scalesPerRow = p.hidden / 128;
  bool remote = false;
  for (int d = 0; d < R; ++d) remote = remote || (d != p.rank && posRow[d] >= 0);
  if (!remote) return;  // rows a rank sends itself are read by its receivers from x directly
  int64_t id = -1;
  float weight = 0.0f;
  if (lane < p.topk) {
    id = p.handleIdx[static_cast<int64_t>(t) * p.idxStride + lane];
    if (p.topkWeights != nullptr) weight = p.topkWeights[static_cast<int64_t>(t) * p.topk + lane];
  }
  int4 scales4 = make_int4(0, 0, 0, 0);
  const bool scalesLane = p.xIsFp8 && scalesVec && lane < scalesPerRow / 4;
  if (scalesLane)
    scales4 = loadStreaming(reinterpret_cast<const int4*>(p.xScales + static_cast<int64_t>(t) * scalesPerRow) + lane);
  auto rowFor = [&](int d) -> uint8_t* {
    const int ordinal = posRow[d];
    if (ordinal < 0 || d == p.rank) return nullptr;
    // Balanced: exchangeRow's pushed slot, as the received row plus the table's slot delta
    // (only rows that fit recvX: the receivers skip the others). This form shares the row
    // index with the x row's (spanRow) and keeps the balanced kernel's spills at 16 bytes
    // (t's channel in a register across the x copy made them 48 and cost ~4 us for FP8 on 2x
    // H200, docs/PERF.md, twentieth session). The staging holds fewer than 2^31 rows (the EP
    // checks at creation).
    return kBalanced ? (ordinal < direct[R + d]
                            ? p.peers[d] + p.dispatchOffset +
                                  static_cast<uint64_t>(direct[d] + ordinal + direct[2 * R + d]) * p.dispatchRowBytes
                            : nullptr)
                     : exchangeRow(p, kOpDispatch, p.rank, d, channel, ordinal);
  };
  // Direct dispatch: the x row goes to its place in d's recvX (when it fits there), the rest
  // through the staging row.
  auto xFor = [&](int d) -> uint8_t* {
    if (direct == nullptr) return rowFor(d);
    const int ordinal = posRow[d];
    return ordinal < 0 || d == p.rank ? nullptr : spanRow(p.recvXPeers, p.recvXOffset, xBytes, direct, R, d, ordinal);
  };
  if (!kPullX) warpCopy<true>(static_cast<const uint8_t*>(p.x) + t * xBytes, xBytes, xAligned, R, xFor, lane);
  for (int d = 0; d < R; ++d) {
    uint8_t* row = rowFor(d);
    if (row == nullptr) continue;
    if (p.xIsFp8) {
      if (scalesVec) {
        if (scalesLane) reinterpret_cast<int4*>(row + p.rowScalesOffset)[lane] = scales4;
      } else {
        float* scales = reinterpret_cast<float*>(row + p.rowScalesOffset);
        for (int i = lane; i < scalesPerRow; i += 32) scales[i] = p.xScales[static_cast<int64_t>(t) * scalesPerRow + i];
      }
    }
    if (lane < p.topk) {
      reinterpret_cast<int64_t*>(row + p.rowIdxOffset)[lane] = id;
      reinterpret_cast<float*>(row + p.rowWeightsOffset)[lane] = weight;
    }
    if (lane == 0) *reinterpret_cast<int*>(row + p.rowSrcOffset) = t;
  }
  if (kBalanced && lane == 0) {
    for (int d = 0; d < R; ++d) {
      if (d != p.rank && posRow[d] >= 0) atomicAdd(&sent[d], 1);
    }
  }
}

// A rank's own rows can carry their small parts through the stage when each is a whole number
// of 16-byte chunks at 16-byte aligned addresses (else the bulk variant is not used).
__device__ __forceinline__ bool selfPartsBulkOk(const IntranodeParams& p) {
  const bool scalesOk = !p.xIsFp8 || ((p.hidden / 128) % 4 == 0 && aligned16(p.xScales));
  const bool weightsOk = p.topkWeights == nullptr || (p.topk % 4 == 0 && aligned16(p.topkWeights));
  return scalesOk && weightsOk;
}

// ---- Dispatch variant 2: senders prefetch their rows with bulk copies ---------------------
//
// Each sending warp keeps a ring of stages, one token per stage laid out as a staged row
// ([x][scales][ids][weights][token]); lane 0 bulk-loads the x row, its scales, the handle's
// normalized ids and the weights of the warp's next tokens (across batches) while the lanes
// copy the oldest token from shared memory to every destination's staging row with 16-byte
// stores. A token thus costs no load round trip in the sending loop, only stores.

struct SendPrefetch {
  WarpRing ring;
  uint32_t issued;
  uint32_t consumed;
  int nextToken;       // the warp's next token to load (>= last: none)
  bool failed;         // a stage wait gave up (timeout): the rest of the tokens are not sent
  uint32_t drainFrom;  // (failed) the first token whose load may still be in flight
};

// A warp whose ring gave up may leave bulk loads in flight, and they write the block's shared
// memory: lane 0 waits for them before the block exits (loads of local memory; bounded by the
// kernel timeout, whatever the abort flag says).
__device__ void drainSendRing(const IntranodeParams& p, const SendPrefetch& f, int lane) {
  if (!f.failed || lane != 0) return;
  const uint32_t stages = static_cast<uint32_t>(f.ring.stages);
  const uint64_t start = globalTimerNs();
  for (uint32_t k = f.drainFrom; k < f.issued; ++k) {
    while (!mbarrierTryWait(f.ring.barrier(static_cast<int>(k % stages)), (k / stages) & 1)) {
      if (globalTimerNs() - start > p.timeoutNs) return;
    }
  }
}

// The warp's token after t in the sending order: batches are whole multiples of the sending
// warps (sendBatchSize), so a warp's tokens are every kSendWarps-th from its first.
__device__ __forceinline__ void advanceSendToken(int last, int* token) { *token = min(last, *token + kSendWarps); }

__device__ void prefetchToken(const IntranodeParams& p, SendPrefetch* f, int t, int lane) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int stage = static_cast<int>(f->issued % f->ring.stages);
  ++f->issued;
  if (lane == 0) {
    fenceProxyAsyncShared();  // the lanes' reads of the stage's previous token come first
    const int scalesPerRow = p.hidden / 128;
    const uint32_t scalesBytes = p.xIsFp8 ? static_cast<uint32_t>(scalesPerRow) * 4 : 0;
    const uint32_t idxBytes = static_cast<uint32_t>(p.idxStride) * 8;
    const uint32_t weightsBytes = p.topkWeights != nullptr ? static_cast<uint32_t>(p.topk) * 4 : 0;
    uint8_t* buffer = f->ring.buffer(stage);
    uint64_t* barrier = f->ring.barrier(stage);
    mbarrierArriveExpectTx(barrier, static_cast<uint32_t>(xBytes) + scalesBytes + idxBytes + weightsBytes);
    bulkLoad(buffer, static_cast<const uint8_t*>(p.x) + static_cast<uint64_t>(t) * xBytes,
             static_cast<uint32_t>(xBytes), barrier);
    if (scalesBytes > 0)
      bulkLoad(buffer + p.rowScalesOffset, p.xScales + static_cast<int64_t>(t) * scalesPerRow, scalesBytes, barrier);
    bulkLoad(buffer + p.rowIdxOffset, p.handleIdx + static_cast<int64_t>(t) * p.idxStride, idxBytes, barrier);
    if (weightsBytes > 0)
      bulkLoad(buffer + p.rowWeightsOffset, p.topkWeights + static_cast<int64_t>(t) * p.topk, weightsBytes, barrier);
  }
}

// Loads the warp's next tokens until `ahead` of them are in flight or loaded (variants 2, 3).
__device__ void fillSendRing(const IntranodeParams& p, SendPrefetch* f, uint32_t ahead, int last, int lane) {
  while (!f->failed && f->issued - f->consumed < ahead && f->nextToken < last) {
    prefetchToken(p, f, f->nextToken, lane);
    advanceSendToken(last, &f->nextToken);
  }
}

// Takes the oldest prefetched token's stage once its loads have landed (every lane waits, or
// lane 0 alone with `lane0Only`): the stage, or -1 when the ring gave up, now or before.
__device__ int takeSendStage(const IntranodeParams& p, SendPrefetch* f, int channel, int lane, bool lane0Only) {
  const int stage = static_cast<int>(f->consumed % f->ring.stages);
  const uint32_t parity = (f->consumed / f->ring.stages) & 1;
  ++f->consumed;
  if (f->failed) return -1;
  const int ok = (lane0Only && lane != 0) || waitStage(p, f->ring, stage, parity, channel, kOpDispatch) ? 1 : 0;
  if (!__all_sync(0xffffffffu, ok != 0)) {
    f->failed = true;
    f->drainFrom = f->consumed - 1;
    return -1;
  }
  return stage;
}

// Sends token t (the oldest prefetched one) to every rank with posRow[d] >= 0 but this one.
__device__ void sendPrefetchedToken(const IntranodeParams& p, SendPrefetch* f, int channel, int t, const int* posRow,
                                    int last, int lane) {
  fillSendRing(p, f, static_cast<uint32_t>(f->ring.stages), last, lane);
  __syncwarp();
  const int stage = takeSendStage(p, f, channel, lane, false);
  if (stage < 0) return;
  uint8_t* buffer = f->ring.buffer(stage);
  // The parts the loads did not fill: the token, and zero weights when the caller has none.
  if (lane == 0) *reinterpret_cast<int*>(buffer + p.rowSrcOffset) = t;
  if (p.topkWeights == nullptr && lane < p.topk) reinterpret_cast<float*>(buffer + p.rowWeightsOffset)[lane] = 0.0f;
  __syncwarp();
  const int R = p.numRanks;
  const int4* src = reinterpret_cast<const int4*>(buffer);
  const int64_t n = static_cast<int64_t>(p.rowExtent / 16);
  constexpr int kVectors = 8;  // 16-byte shared loads per lane ahead of their stores
  for (int64_t i0 = lane; i0 < n; i0 += 32 * kVectors) {
    int4 v[kVectors];
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      const int64_t i = i0 + 32 * k;
      if (i < n) v[k] = src[i];
    }
    for (int d = 0; d < R; ++d) {
      const int ordinal = posRow[d];
      if (ordinal < 0 || d == p.rank) continue;
      int4* dst = reinterpret_cast<int4*>(exchangeRow(p, kOpDispatch, p.rank, d, channel, ordinal));
#pragma unroll
      for (int k = 0; k < kVectors; ++k) {
        const int64_t i = i0 + 32 * k;
        if (i < n) dst[i] = v[k];
      }
    }
  }
  __syncwarp();  // every lane read the stage: it may be refilled
}

// ---- Dispatch variant 3: senders store their rows by bulk copies too ----------------------
//
// As variant 2, but lane 0 also stores each staged row from shared memory into every
// destination's staging with one bulk copy per destination; the other lanes only keep the
// ring's counts. A stage is refilled once the bulk stores that read it are done reading (the
// ring keeps stages - 1 tokens loading while one is stored), and a batch's stores are waited
// for (writes complete) only before its tail is published.

// Sends token t (the oldest prefetched one) to every rank with posRow[d] >= 0 but this one.
__device__ void sendBulkToken(const IntranodeParams& p, SendPrefetch* f, int channel, int t, const int* posRow,
                              int last, int lane) {
  const uint32_t ahead = static_cast<uint32_t>(f->ring.stages) - 1;  // one stage is being stored
  // This fills stages only before the warp's first store (later refills follow each store
  // below), so every stage it fills is unused.
  fillSendRing(p, f, ahead, last, lane);
  const int stage = takeSendStage(p, f, channel, lane, true);
  if (stage < 0) return;
  if (lane == 0) {
    uint8_t* buffer = f->ring.buffer(stage);
    // The parts the loads did not fill: the token, and zero weights when the caller has none.
    *reinterpret_cast<int*>(buffer + p.rowSrcOffset) = t;
    if (p.topkWeights == nullptr) {
      for (int k = 0; k < p.topk; ++k) reinterpret_cast<float*>(buffer + p.rowWeightsOffset)[k] = 0.0f;
    }
    fenceProxyAsyncShared();  // those writes, then the bulk stores that read them
    for (int d = 0; d < p.numRanks; ++d) {
      const int ordinal = posRow[d];
      if (ordinal < 0 || d == p.rank) continue;
      bulkStore(exchangeRow(p, kOpDispatch, p.rank, d, channel, ordinal), buffer, static_cast<uint32_t>(p.rowExtent));
    }
    bulkCommit();
    bulkWaitRead<1>();  // the previous token's stores have read its stage: refill it
  }
  fillSendRing(p, f, ahead, last, lane);
}

constexpr int kSendRegisters = 0;  // how dispatchSend moves rows: lanes load and store them
constexpr int kSendPrefetch = 1;   // bulk loads into a ring, lanes store (variant 2)
constexpr int kSendBulk = 2;       // bulk loads and bulk stores (variant 3)

// Sending threads, after the acks: channel c's routing and counts when this call computes the
// routing (a reused handle's counts are published by the receiving threads), sent[] zeroed;
// [first, last) its tokens.
__device__ void routeAndCount(const IntranodeParams& p, int channel, uint64_t sequence, uint64_t* scratch, int* sent,
                              int* first, int* last) {
  MC_PROFILE(kOpDispatch, 1, 0);
  channelTokens(p.numTokens, p.numChannels, channel, first, last);
  if (p.route) routeChannel(p, channel, *first, *last, scratch);
  MC_PROFILE(kOpDispatch, 2, 0);
  if (p.route) publishCounts(p, kOpDispatch, channel, sequence, threadIdx.x, kSendThreads, kBarrierSend);
  MC_PROFILE(kOpDispatch, 3, 0);
  for (int d = threadIdx.x; d < p.numRanks; d += kSendThreads) sent[d] = 0;
}

// The spans every other rank published for op on channel c (awaitRowSpan; this rank's own:
// zeros) into table[r] (first rows) and table[R + r] (rows held), by threads 0..threads-1; a
// barrier publishes them. Direct dispatch: where c's rows go in each destination's recvX;
// direct combine: where each rank holds the rows it received from this one.
__device__ void awaitSpans(const IntranodeParams& p, int op, int c, uint64_t sequence, int* table, int threads) {
  const int R = p.numRanks;
  for (int r = threadIdx.x; r < R; r += threads) {
    const int2 span = r != p.rank ? awaitRowSpan(p, op, c, r, sequence) : make_int2(0, 0);
    table[r] = span.x;
    table[R + r] = span.y;
  }
}
__device__ __forceinline__ void loadDirectSpans(const IntranodeParams& p, int c, uint64_t sequence, int* table) {
  awaitSpans(p, kOpDispatch, c, sequence, table, kSendThreads);
}

// A batch's positions, staged once into posBatch by the sending threads; rows[d] is raised to
// the rows for d up to the end of the batch (ordinals grow with the token).
__device__ void stageBatch(const IntranodeParams& p, int base, int n, int* posBatch, int* rows) {
  const int R = p.numRanks;
  for (int i = threadIdx.x; i < n * R; i += kSendThreads) {
    const int ordinal = p.pos[static_cast<int64_t>(base) * R + i];
    posBatch[i] = ordinal;
    if (ordinal >= 0) atomicMax(&rows[i % R], ordinal + 1);
  }
}

// Releases channel c's dispatch tail for d (of `kind`: kCtrlTail, or kCtrlBlockTail for the
// balanced dispatch's block c): `rows` rows of this rank are stored there.
__device__ __forceinline__ void releaseTail(const IntranodeParams& p, int channel, int d, uint64_t sequence, int rows,
                                            int kind = kCtrlTail) {
  __threadfence_system();
  storeReleaseSys(ctrlWord(p, d, kind, kOpDispatch, channel, p.rank), packWord(sequence, rows));
}

template <int kBatch, int kSendMode, bool kPullX = false>
__device__ void dispatchSend(const IntranodeParams& p, int channel, uint64_t sequence, uint64_t* scratch, int* sent,
                             int* posBatch, int* direct, uint8_t* dynamicShared) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int R = p.numRanks;
  for (int dest = threadIdx.x; dest < R; dest += kSendThreads) waitAck(p, kOpDispatch, channel, dest, sequence);
  groupBarrier(kBarrierSend, kSendThreads);
  int first = 0;
  int last = 0;
  routeAndCount(p, channel, sequence, scratch, sent, &first, &last);
  if (p.dispatchDirect) loadDirectSpans(p, channel, sequence, direct);  // (the first batch's barrier publishes them)
  const bool xAligned = aligned16(p.x);
  const bool scalesVec = scalesVectorOk(p, p.xScales);
  constexpr bool kPrefetch = kSendMode != kSendRegisters;
  SendPrefetch prefetch{};
  if (kPrefetch) {
    prefetch.ring = makeWarpRing(p, dynamicShared, warp, kSendWarps, lane);
    prefetch.nextToken = min(last, first + warp);
    if (lane == 0) fenceProxyAsyncGlobal();  // the ids routeChannel just wrote, read by bulk copies
    __syncwarp();
  }
  for (int base = first; base < last;) {
    const int n = static_cast<int>(min(static_cast<int64_t>(last - base), sendBatchSize(base - first, kBatch, false)));
    // The batch's positions, staged once; sent[d] = rows for d up to the end of the batch.
    groupBarrier(kBarrierSend, kSendThreads);
    stageBatch(p, base, n, posBatch, sent);
    groupBarrier(kBarrierSend, kSendThreads);
    for (int j = warp; j < n; j += kSendWarps) {
      if (kSendMode == kSendBulk) {
        sendBulkToken(p, &prefetch, channel, base + j, posBatch + j * R, last, lane);
      } else if (kPrefetch) {
        sendPrefetchedToken(p, &prefetch, channel, base + j, posBatch + j * R, last, lane);
      } else {
        sendToken<kPullX>(p, channel, base + j, posBatch + j * R, xAligned, scalesVec,
                          p.dispatchDirect ? direct : nullptr, lane);
      }
    }
    if (kSendMode == kSendBulk && lane == 0) {
      bulkWait<0>();            // the batch's rows are written
      fenceProxyAsyncGlobal();  // before the tail below (generic proxy)
    }
    groupBarrier(kBarrierSend, kSendThreads);
    for (int d = threadIdx.x; d < R; d += kSendThreads) releaseTail(p, channel, d, sequence, sent[d]);
    base += n;
  }
  if (kPrefetch) drainSendRing(p, prefetch, lane);
  if (kPullX) waitCallAcked(p, kOpDispatch, channel, sequence, kSendThreads);  // the peers read this rank's x
  MC_PROFILE(kOpDispatch, 4, 0);
}

// Balanced dispatch (IntranodeParams::dispatchBalanced), sending threads of block `channel`:
// after every channel's acks from every destination, the routing of the block's own channel (a
// new handle), and every channel's spans (spans[c * 3R ...]: first rows, rows held, slot
// deltas), each warp claims the rank's tokens one at a time from p.state->dispatchClaim and
// sends them (sendToken): the x row where its channel's span puts it, the small parts to the
// staging slot of its (source, channel, ordinal), as the unbalanced dispatch does, so that
// channel c's ack frees exactly the slots the destination's block c reads. The next token is
// claimed, and its positions loaded, while the current one is sent. At the end the block
// publishes, as its block tail (kCtrlBlockTail) for every destination, the rows it sent there:
// a receiver has every row of a source once all C block tails of that source carry the call's
// tag.
__device__ void dispatchSendBalanced(const IntranodeParams& p, int channel, uint64_t sequence, uint64_t* scratch,
                                     int* sent, int* posSlots, int* spans) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int R = p.numRanks;
  const int C = p.numChannels;
  for (int i = threadIdx.x; i < C * R; i += kSendThreads) waitAck(p, kOpDispatch, i / R, i % R, sequence);
  groupBarrier(kBarrierSend, kSendThreads);
  int first = 0;
  int last = 0;
  routeAndCount(p, channel, sequence, scratch, sent, &first, &last);
  // Per channel: first rows [R], rows held [R], slot deltas [R] (this rank's staging slot of
  // (this rank, c, ordinal), stagingSlotBase + ordinal, minus the received row first + ordinal).
  const int stride = 3 * R;
  for (int i = threadIdx.x; i < C * R; i += kSendThreads) {
    const int c = i / R;
    const int r = i % R;
    const int2 span = r != p.rank ? awaitRowSpan(p, kOpDispatch, c, r, sequence) : make_int2(0, 0);
    spans[c * stride + r] = span.x;
    spans[c * stride + R + r] = span.y;
    spans[c * stride + 2 * R + r] = static_cast<int>(stagingSlotBase(p, p.rank, c)) - span.x;
  }
  groupBarrier(kBarrierSend, kSendThreads);
  const bool xAligned = aligned16(p.x);
  const bool scalesVec = scalesVectorOk(p, p.xScales);
  const int T = p.numTokens;
  const int chunk = max(1, (T + C - 1) / C);  // channelTokens' split: token t is channel t / chunk's
  unsigned int* claim = &p.state->dispatchClaim;
  // The positions of a token, in shared memory for sendToken (two slots per warp, the current
  // token's and the next one's).
  int* const slots = posSlots + warp * 2 * R;  // slot k: slots + k * R
  auto position = [&](int t, int d) { return t < T ? p.pos[static_cast<int64_t>(t) * R + d] : -1; };
  int t = lane == 0 ? static_cast<int>(atomicAdd(claim, 1u)) : 0;
  t = __shfl_sync(0xffffffffu, t, 0);
  for (int d = lane; d < R; d += 32) slots[d] = position(t, d);
  int next = lane == 0 ? static_cast<int>(atomicAdd(claim, 1u)) : 0;
  next = __shfl_sync(0xffffffffu, next, 0);
  int cur = 0;
  while (t < T) {
    int after = 0;
    if (lane == 0) after = static_cast<int>(atomicAdd(claim, 1u));  // (used after the send)
    // Up to 32 ranks the next token's positions load during the send (lane d: rank d).
    const int nextPos = R <= 32 && lane < R ? position(next, lane) : -1;
    if (R > 32) {
      for (int d = lane; d < R; d += 32) slots[(cur ^ 1) * R + d] = position(next, d);
    }
    __syncwarp();
    const int c = t / chunk;
    sendToken<false, true>(p, c, t, slots + cur * R, xAligned, scalesVec, spans + c * stride, lane, sent);
    if (R <= 32 && lane < R) slots[(cur ^ 1) * R + lane] = nextPos;
    __syncwarp();
    t = next;
    next = __shfl_sync(0xffffffffu, after, 0);
    cur ^= 1;
  }
  groupBarrier(kBarrierSend, kSendThreads);
  for (int d = threadIdx.x; d < R; d += kSendThreads) releaseTail(p, channel, d, sequence, sent[d], kCtrlBlockTail);
  MC_PROFILE(kOpDispatch, 4, 0);
}

// Where one received row's parts are read from: a staged row, or (rows a rank sends itself)
// the caller's own inputs, which never pass through the staging area.
struct RowSource {
  const uint8_t* x;
  const float* scales;
  const int64_t* idx;
  const float* weights;  // nullptr: zeros
  int token;             // source token index, or -1: read it from the staged row
  const int* tokenAt;
  bool vector;  // x and scales may move as 16-byte vectors (with the output)
};

__device__ RowSource stagedRowSource(const IntranodeParams& p, const uint8_t* row, bool recvAligned) {
  RowSource src;
  src.x = row;
  src.scales = reinterpret_cast<const float*>(row + p.rowScalesOffset);
  src.idx = reinterpret_cast<const int64_t*>(row + p.rowIdxOffset);
  src.weights = reinterpret_cast<const float*>(row + p.rowWeightsOffset);
  src.token = -1;
  src.tokenAt = reinterpret_cast<const int*>(row + p.rowSrcOffset);
  src.vector = recvAligned;
  return src;
}

__device__ RowSource selfRowSource(const IntranodeParams& p, int t, bool recvAligned) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  RowSource src;
  src.x = static_cast<const uint8_t*>(p.x) + t * xBytes;
  src.scales = p.xIsFp8 ? p.xScales + static_cast<int64_t>(t) * (p.hidden / 128) : nullptr;
  src.idx = p.handleIdx + static_cast<int64_t>(t) * p.idxStride;
  src.weights = p.topkWeights != nullptr ? p.topkWeights + static_cast<int64_t>(t) * p.topk : nullptr;
  src.token = t;
  src.tokenAt = nullptr;
  src.vector = recvAligned && aligned16(p.x) && aligned16(p.xScales);
  return src;
}

// Writes received selection o (row * topk + k) to the caller's outputs: the expert id as an id
// of this rank's local experts (firstLocal, the next localExperts: -1 when it is another
// rank's) and its weight (0 then). The caller computes the range once, outside its loops.
__device__ __forceinline__ void storeReceivedSelection(const IntranodeParams& p, int64_t o, int64_t id, float weight,
                                                       int64_t firstLocal, int localExperts) {
  const bool local = id >= firstLocal && id < firstLocal + localExperts;
  if (p.recvTopkIdx != nullptr) {
    const int64_t localId = local ? id - firstLocal : -1;
    if (p.topkIdxIs64) {
      static_cast<int64_t*>(p.recvTopkIdx)[o] = localId;
    } else {
      static_cast<int32_t*>(p.recvTopkIdx)[o] = static_cast<int32_t>(localId);
    }
  }
  if (p.recvTopkWeights != nullptr) p.recvTopkWeights[o] = local ? weight : 0.0f;
}

// One warp copies a received row out to the caller's buffers (received row `row` from source
// rank `source`). Every load is issued before any store. kCopyX = false: everything but the x
// row (the bulk-copy variant moves that).
template <bool kCopyX = true>
__device__ void receiveRow(const IntranodeParams& p, const RowSource& src, int row, int source, bool scalesVec,
                           int lane) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int scalesPerRow = p.hidden / 128;
  const int localExperts = p.numExperts / p.numRanks;
  const int64_t firstLocal = static_cast<int64_t>(p.rank) * localExperts;
  int64_t id = -1;
  float weight = 0.0f;
  if (lane < p.topk) {
    id = src.idx[lane];
    weight = src.weights != nullptr ? src.weights[lane] : 0.0f;
  }
  const int srcToken = src.token >= 0 ? src.token : (lane == 0 ? *src.tokenAt : 0);
  const bool wantScales = p.xIsFp8 && p.recvXScales != nullptr;
  const bool vectorScales = scalesVec && src.vector;
  const bool scalesLane = wantScales && vectorScales && lane < scalesPerRow / 4;
  int4 scales4 = make_int4(0, 0, 0, 0);
  if (scalesLane) scales4 = reinterpret_cast<const int4*>(src.scales)[lane];
  if (kCopyX) {
    uint8_t* out = static_cast<uint8_t*>(p.recvX) + row * xBytes;
    warpCopy<false>(
        src.x, xBytes, src.vector, 1, [&](int) { return out; }, lane);
  }
  if (wantScales) {
    if (vectorScales) {
      if (scalesLane) reinterpret_cast<int4*>(p.recvXScales + static_cast<int64_t>(row) * scalesPerRow)[lane] = scales4;
    } else {
      for (int k = lane; k < scalesPerRow; k += 32)
        p.recvXScales[static_cast<int64_t>(row) * scalesPerRow + k] = src.scales[k];
    }
  }
  if (lane < p.topk)
    storeReceivedSelection(p, static_cast<int64_t>(row) * p.topk + lane, id, weight, firstLocal, localExperts);
  if (lane == 0) {
    p.srcRank[row] = source;
    p.srcIndex[row] = srcToken;
  }
}

// ---- Dispatch variant 1: rows copied out by the bulk-copy engine ------------------------
//
// Lane 0 of each receiving warp moves its rows through a ring of shared-memory stages with
// bulk copies: a row's x in pieces of up to one stage, the last piece also carrying the
// row's other parts (scales, ids, weights, source token) at their staged-row offsets, so a
// received row costs no round trip through the lanes' registers. A staged row is loaded as
// one contiguous range; a rank's own row is gathered from the caller's x and scales and the
// handle's ids and weights (lane 0 writes the token itself). When the last piece is in, the
// lanes write the small parts to the outputs from shared memory and lane 0 stores the x bytes
// with one bulk store per piece. stages - 1 loads stay in flight besides the newest store.

constexpr int kPieceLast = 1 << 16;       // the stage holds the row's other parts too
constexpr int kPieceNoWeights = 1 << 17;  // a rank's own row without dispatch weights: zeros

// Lane 0's state of one warp's pipeline; it lives across rounds of tails.
struct DispatchBulkState {
  uint32_t issued;  // pieces whose loads were issued
  uint32_t stored;  // pieces consumed (each committed one bulk group, maybe empty)
  bool failed;      // a stage wait gave up: no more bulk copies this call
};

// Writes a row's small parts (read from a stage holding its last piece, which starts at
// `offset` of the row) to the caller's outputs, as receiveRow does from registers.
__device__ void storeRowParts(const IntranodeParams& p, const uint8_t* stage, uint64_t offset, int row, int source,
                              int flags, bool scalesVec, int lane) {
  const int scalesPerRow = p.hidden / 128;
  const int localExperts = p.numExperts / p.numRanks;
  const int64_t firstLocal = static_cast<int64_t>(p.rank) * localExperts;
  if (p.xIsFp8 && p.recvXScales != nullptr) {
    const float* scales = reinterpret_cast<const float*>(stage + p.rowScalesOffset - offset);
    if (scalesVec) {
      if (lane < scalesPerRow / 4)
        reinterpret_cast<int4*>(p.recvXScales + static_cast<int64_t>(row) * scalesPerRow)[lane] =
            reinterpret_cast<const int4*>(scales)[lane];
    } else {
      for (int k = lane; k < scalesPerRow; k += 32)
        p.recvXScales[static_cast<int64_t>(row) * scalesPerRow + k] = scales[k];
    }
  }
  if (lane < p.topk) {
    const int64_t id = reinterpret_cast<const int64_t*>(stage + p.rowIdxOffset - offset)[lane];
    const float* weights = reinterpret_cast<const float*>(stage + p.rowWeightsOffset - offset);
    const float weight = (flags & kPieceNoWeights) != 0 ? 0.0f : weights[lane];
    storeReceivedSelection(p, static_cast<int64_t>(row) * p.topk + lane, id, weight, firstLocal, localExperts);
  }
  if (lane == 0) {
    p.srcRank[row] = source;
    p.srcIndex[row] = *reinterpret_cast<const int*>(stage + p.rowSrcOffset - offset);
  }
}

// Consumes the oldest piece: waits for its loads, writes the small parts if it carries them,
// then lane 0 stores its x bytes. False: a load never completed (timeout).
__device__ bool dispatchStorePiece(const IntranodeParams& p, const WarpRing& ring, DispatchBulkState* state,
                                   int channel, bool scalesVec, int lane) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int stage = static_cast<int>(state->stored % ring.stages);
  const uint32_t parity = (state->stored / ring.stages) & 1;
  ++state->stored;
  // Lane 0 waits first (it alone stores x); lanes that read the stage wait themselves too.
  int ok = 1;
  if (lane == 0) ok = waitStage(p, ring, stage, parity, channel, kOpDispatch) ? 1 : 0;
  if (__shfl_sync(0xffffffffu, ok, 0) == 0) return false;
  const int4 meta = *ring.meta(stage);  // row, offset in the row, x bytes to store, source | flags
  const uint8_t* buffer = ring.buffer(stage);
  if ((meta.w & kPieceLast) != 0) {
    if (lane != 0) ok = waitStage(p, ring, stage, parity, channel, kOpDispatch) ? 1 : 0;
    if (__all_sync(0xffffffffu, ok != 0)) {
      storeRowParts(p, buffer, static_cast<uint64_t>(meta.y), meta.x, meta.w & 0xffff, meta.w, scalesVec, lane);
    }
  }
  if (lane == 0) {
    if (meta.z > 0) {
      bulkStore(static_cast<uint8_t*>(p.recvX) + static_cast<uint64_t>(meta.x) * xBytes + meta.y, buffer,
                static_cast<uint32_t>(meta.z));
    }
    bulkCommit();  // one group per piece (empty without x bytes), see dispatchIssuePiece
  }
  __syncwarp();  // every lane is done with the stage: it may be refilled
  return true;
}

// Issues the loads of one piece of received row `row` into the next stage: x bytes [offset,
// offset + xPart) and, for the last piece, the row's small parts. Lane 0 issues; warp-uniform.
__device__ void dispatchIssuePiece(const IntranodeParams& p, const WarpRing& ring, DispatchBulkState* state, int row,
                                   int source, int token, const uint8_t* staged, uint64_t offset, uint32_t xPart,
                                   bool last, int lane) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const int stage = static_cast<int>(state->issued % ring.stages);
  ++state->issued;
  if (lane == 0) {
    // The stage's previous store is not the newest bulk group (issued < stored + stages - 1,
    // one group per piece), so waiting for all but the newest frees the stage.
    if (state->issued > static_cast<uint32_t>(ring.stages)) bulkWaitRead<1>();
    uint8_t* buffer = ring.buffer(stage);
    uint64_t* barrier = ring.barrier(stage);
    int flags = source;
    if (last) flags |= kPieceLast;
    if (last && staged == nullptr && p.topkWeights == nullptr) flags |= kPieceNoWeights;
    *ring.meta(stage) = make_int4(row, static_cast<int>(offset), static_cast<int>(xPart), flags);
    if (staged != nullptr) {
      // A staged row: x and the small parts are contiguous, [offset, rowExtent) for the last piece.
      const uint32_t bytes = last ? static_cast<uint32_t>(p.rowExtent - offset) : xPart;
      mbarrierArriveExpectTx(barrier, bytes);
      bulkLoad(buffer, staged + offset, bytes, barrier);
    } else {
      const int scalesPerRow = p.hidden / 128;
      const uint32_t scalesBytes = last && p.xIsFp8 ? static_cast<uint32_t>(scalesPerRow) * 4 : 0;
      const uint32_t idxBytes = last ? static_cast<uint32_t>(p.idxStride) * 8 : 0;
      const uint32_t weightsBytes = last && p.topkWeights != nullptr ? static_cast<uint32_t>(p.topk) * 4 : 0;
      if (last) *reinterpret_cast<int*>(buffer + p.rowSrcOffset - offset) = token;
      mbarrierArriveExpectTx(barrier, xPart + scalesBytes + idxBytes + weightsBytes);
      const uint8_t* x = static_cast<const uint8_t*>(p.x) + static_cast<uint64_t>(token) * xBytes;
      if (xPart > 0) bulkLoad(buffer, x + offset, xPart, barrier);
      if (scalesBytes > 0)
        bulkLoad(buffer + p.rowScalesOffset - offset, p.xScales + static_cast<int64_t>(token) * scalesPerRow,
                 scalesBytes, barrier);
      if (idxBytes > 0)
        bulkLoad(buffer + p.rowIdxOffset - offset, p.handleIdx + static_cast<int64_t>(token) * p.idxStride, idxBytes,
                 barrier);
      if (weightsBytes > 0)
        bulkLoad(buffer + p.rowWeightsOffset - offset, p.topkWeights + static_cast<int64_t>(token) * p.topk,
                 weightsBytes, barrier);
    }
  }
  __syncwarp();
}

// Source and ordinal of the j-th row of this round (rows [done[s], avail[s]) of every s).
__device__ __forceinline__ void roundRow(int j, const int* done, const int* avail, int* source, int* ordinal) {
  int s = 0;
  int i = j;
  while (i >= avail[s] - done[s]) {
    i -= avail[s] - done[s];
    ++s;
  }
  *source = s;
  *ordinal = done[s] + i;
}

// This warp's rows of one round: rows j = warp, warp + warps, ... of the round.
__device__ void dispatchCopyRowsBulk(const IntranodeParams& p, int channel, const WarpRing& ring,
                                     DispatchBulkState* state, const int* offsets, const int* done, const int* avail,
                                     int pending, bool scalesVec, int warp, int lane) {
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
  const uint64_t partsBytes = p.rowExtent - xBytes;
  if (lane == 0) fenceProxyAsyncGlobal();  // the staged rows behind the tails just acquired
  __syncwarp();
  int k = 0;            // the warp's row index in this round (row j = warp + k * warps)
  int tokens = -1;      // lane l: token of the warp's row tokensFrom + l if it is a rank's own row
  int tokensFrom = -1;  // the k of lane 0's entry
  // The row being loaded (row < 0: none).
  int row = -1;
  int source = 0;
  int token = 0;
  const uint8_t* staged = nullptr;
  uint64_t offset = 0;
  for (;;) {
    while (!state->failed && state->issued < state->stored + ring.stages - 1) {
      if (row < 0) {
        const int j = warp + k * kRecvWarps;
        if (j >= pending) break;
        if (k - tokensFrom >= 32 || tokensFrom < 0) {
          // The tokens of the next 32 rows that are this rank's own, one round trip for all.
          tokensFrom = k;
          const int jl = warp + (k + lane) * kRecvWarps;
          tokens = -1;
          if (jl < pending) {
            int s = 0;
            int ordinal = 0;
            roundRow(jl, done, avail, &s, &ordinal);
            if (s == p.rank) tokens = p.selfToken[channel * p.chunkRows + ordinal];
          }
        }
        int ordinal = 0;
        roundRow(j, done, avail, &source, &ordinal);
        token = __shfl_sync(0xffffffffu, tokens, k - tokensFrom);
        ++k;
        row = offsets[source] + ordinal;
        if (row >= p.recvCapacity) {
          row = -1;
          continue;
        }
        staged = source == p.rank ? nullptr : exchangeRow(p, kOpDispatch, source, p.rank, channel, ordinal);
        offset = 0;
      }
      // x in pieces of a stage; the small parts ride with the last x piece when they fit, else
      // they come alone (a piece with no x bytes).
      const uint64_t left = xBytes - offset;
      const uint32_t xPart = static_cast<uint32_t>(min(left, static_cast<uint64_t>(ring.stageBytes)));
      const bool last = left == 0 || (left <= static_cast<uint64_t>(ring.stageBytes) &&
                                      left + partsBytes <= static_cast<uint64_t>(ring.stageBytes));
      dispatchIssuePiece(p, ring, state, row, source, token, staged, offset, xPart, last, lane);
      offset += xPart;
      if (last) row = -1;
    }
    if (state->stored == state->issued) {
      if (state->failed || (row < 0 && warp + k * kRecvWarps >= pending)) break;
      continue;
    }
    if (!dispatchStorePiece(p, ring, state, channel, scalesVec, lane)) state->failed = true;
  }
  // After a failed stage wait (a timeout: outputs are garbage anyway) the rest are skipped.
}

// Balanced dispatch: whether every block of `source` published this call's block tail for this
// rank (then all of its rows are here). Volatile loads all issued at once (no exit between them),
// then one fence: the acquire of all of them.
__device__ bool balancedSourceDone(const IntranodeParams& p, int source, uint64_t sequence) {
  uint32_t stale = 0;
  for (int c = 0; c < p.numChannels; ++c) {
    const uint64_t word =
        *reinterpret_cast<volatile uint64_t*>(ctrlWord(p, p.rank, kCtrlBlockTail, kOpDispatch, c, source));
    stale |= static_cast<uint32_t>((word >> 32) != tagOf(sequence));
  }
  if (stale != 0) return false;
  __threadfence_system();
  return true;
}

// Balanced dispatch: the received row of the i-th of the channel's rows from the other ranks
// (in source order), or -1 when it does not fit recvX; *source: its rank.
__device__ __forceinline__ int balancedOtherRow(const IntranodeParams& p, const int* offsets, const int* counts, int i,
                                                int* source) {
  int s = 0;
  while (s == p.rank || i >= counts[s]) {
    if (s != p.rank) i -= counts[s];
    ++s;
  }
  *source = s;
  const int row = offsets[s] + i;
  return row < p.recvCapacity ? row : -1;
}

// Balanced dispatch, every thread of block `channel`: n elements, `per` for each of the
// channel's rows from the other ranks (balancedOtherRow), spread over the threads; each thread
// loads kUnrollParts elements (load(staged row, k) -> T) before it stores any (store(received
// row, source, k, value)). The staged row of received row r from source s is staging slot
// r + slotDelta[s] (balancedCopyParts).
template <typename T, typename Load, typename Store>
__device__ void balancedElements(const IntranodeParams& p, const int* offsets, const int* counts, const int* slotDelta,
                                 int n, int per, Load load, Store store) {
  constexpr int kUnrollParts = 4;  // (8 for the scales measured ~3 µs slower for FP8, one round)
  const uint8_t* staging = p.peers[p.rank] + p.dispatchOffset;
  for (int e0 = threadIdx.x; e0 < n; e0 += kUnrollParts * kThreads) {
    T values[kUnrollParts];
    int rows[kUnrollParts];
    int sources[kUnrollParts];
#pragma unroll
    for (int u = 0; u < kUnrollParts; ++u) {
      const int e = e0 + u * kThreads;
      rows[u] = e < n ? balancedOtherRow(p, offsets, counts, e / per, &sources[u]) : -1;
      if (rows[u] >= 0)
        values[u] =
            load(staging + static_cast<uint64_t>(rows[u] + slotDelta[sources[u]]) * p.dispatchRowBytes, e % per);
    }
#pragma unroll
    for (int u = 0; u < kUnrollParts; ++u) {
      if (rows[u] >= 0) store(rows[u], sources[u], (e0 + u * kThreads) % per, values[u]);
    }
  }
}

// Balanced dispatch, every thread of block `channel` once all rows arrived: the small parts of
// the channel's rows from the other ranks (counts[s] rows from s at offsets[s]; their x is in
// place), from their staging slots to the outputs, as receiveRow writes them. They
// all arrive at the call's end, so they cost round trips, not bandwidth: the parts are spread
// over the threads element by element (scale vectors, (row, k) ids and weights, rows' tokens),
// several loads in flight per thread (balancedElements). slotDelta: shared memory for R ints.
__device__ void balancedCopyParts(const IntranodeParams& p, int channel, const int* offsets, const int* counts,
                                  int* slotDelta) {
  // Source s's row `ordinal` of this channel is received row offsets[s] + ordinal and lies in
  // staging slot stagingSlotBase(s, channel) + ordinal (exchangeRow: the balanced dispatch
  // pushes); the difference per source, so that the copy loops keep only the received row.
  // (The staging holds fewer than 2^31 rows: the EP checks at creation.)
  for (int s = threadIdx.x; s < p.numRanks; s += kThreads)
    slotDelta[s] = static_cast<int>(stagingSlotBase(p, s, channel)) - offsets[s];
  __syncthreads();
  int others = 0;
  for (int s = 0; s < p.numRanks; ++s) others += s != p.rank ? counts[s] : 0;
  if (p.xIsFp8 && p.recvXScales != nullptr) {
    const int scalesPerRow = p.hidden / 128;
    const bool vec = scalesVectorOk(p, p.recvXScales);  // (a slot's scales are 16-byte aligned)
    const int per = vec ? scalesPerRow / 4 : scalesPerRow;
    balancedElements<int4>(
        p, offsets, counts, slotDelta, others * per, per,
        [&](const uint8_t* staged, int k) {
          const uint8_t* scales = staged + p.rowScalesOffset;
          return vec ? reinterpret_cast<const int4*>(scales)[k]
                     : make_int4(reinterpret_cast<const int*>(scales)[k], 0, 0, 0);
        },
        [&](int row, int, int k, int4 v) {
          float* out = p.recvXScales + static_cast<int64_t>(row) * scalesPerRow;
          if (vec) {
            reinterpret_cast<int4*>(out)[k] = v;
          } else {
            reinterpret_cast<int*>(out)[k] = v.x;
          }
        });
  }
  if (p.recvTopkIdx != nullptr || p.recvTopkWeights != nullptr) {
    const int localExperts = p.numExperts / p.numRanks;
    const int64_t firstLocal = static_cast<int64_t>(p.rank) * localExperts;
    struct Selection {
      int64_t id;
      float weight;
    };
    balancedElements<Selection>(
        p, offsets, counts, slotDelta, others * p.topk, p.topk,
        [&](const uint8_t* staged, int k) {
          return Selection{reinterpret_cast<const int64_t*>(staged + p.rowIdxOffset)[k],
                           reinterpret_cast<const float*>(staged + p.rowWeightsOffset)[k]};
        },
        [&](int row, int, int k, Selection v) {
          storeReceivedSelection(p, static_cast<int64_t>(row) * p.topk + k, v.id, v.weight, firstLocal, localExperts);
        });
  }
  balancedElements<int>(
      p, offsets, counts, slotDelta, others, 1,
      [&](const uint8_t* staged, int) { return *reinterpret_cast<const int*>(staged + p.rowSrcOffset); },
      [&](int row, int source, int, int token) {
        p.srcRank[row] = source;
        p.srcIndex[row] = token;
      });
}

// kBalanced: the balanced dispatch's receivers (dispatchSendBalanced): a source's rows are all
// available once every block of it published its block tail (their small parts are copied by
// the whole block afterwards, balancedCopyParts).
template <int kVariant, bool kPullX = false, bool kBalanced = false>
__device__ void dispatchReceive(const IntranodeParams& p, int channel, uint64_t sequence, int* offsets, int* counts,
                                int* done, int* avail, int* flag, int* rowsTable, uint8_t* dynamicShared) {
  const int tid = threadIdx.x - kSendThreads;
  const int lane = threadIdx.x & 31;
  const int warp = tid >> 5;
  const int R = p.numRanks;
  const int C = p.numChannels;
  const int localExperts = p.numExperts / R;
  // A handle whose offsets an earlier dispatch left on the device (the same layout, so the same
  // offsets as the counts below give): the spans go out at once, not after every count word.
  if (p.dispatchDirect && p.spansKnown) {
    for (int s = tid; s < R; s += kRecvThreads) {
      if (s != p.rank)
        publishRowSpan(p, s, kOpDispatch, channel, sequence, p.recvOffset[s * C + channel],
                       p.recvCount[s * C + channel]);
    }
  }
  // A reused handle's counts are known: this rank's, as a source, go out from here.
  if (!p.route) publishCounts(p, kOpDispatch, channel, sequence, tid, kRecvThreads, kBarrierRecv);
  // Every (channel, source) count word of this call: the row offsets need all of them. The
  // rows of each go to rowsTable[c * R + s], so the offsets below read shared memory only.
  for (int i = tid; i < C * R; i += kRecvThreads) {
    const int c = i / R;
    const int s = i % R;
    const uint64_t word = waitWord(
        p, countWord(p, p.rank, kOpDispatch, sequence, c, s), [&](uint64_t v) { return (v >> 32) == tagOf(sequence); },
        s, c, kOpDispatch);
    rowsTable[i] = rowsOf(word, sequence);
  }
  groupBarrier(kBarrierRecv, kRecvThreads);
  MC_PROFILE(kOpDispatch, 5, kSendThreads);
  if (tid == 0) {
    int running = 0;
    for (int s = 0; s < R; ++s) {
      for (int c = 0; c < C; ++c) {
        const int n = rowsTable[c * R + s];
        if (c == channel) {
          offsets[s] = running;
          counts[s] = n;
        }
        running += n;
      }
    }
    offsets[R] = running;
    if (channel == 0) {
      *p.numRecv = running;
      if (p.outNumRecv != nullptr) *p.outNumRecv = running;
      if (running > p.recvCapacity) raiseError(p, kErrorInvalidArgument, p.rank, channel, kOpDispatch);
    }
  }
  groupBarrier(kBarrierRecv, kRecvThreads);
  for (int s = tid; s < R; s += kRecvThreads) {
    // Early spans came from the handle: a source that routes differently (the ranks did not
    // reuse handles of the same routing) got a wrong one, so its rows are misplaced. Said, not
    // hidden (the rows stay inside recvX: a source stores only the rows the span holds).
    if (p.dispatchDirect && p.spansKnown && s != p.rank &&
        (p.recvOffset[s * C + channel] != offsets[s] || p.recvCount[s * C + channel] != counts[s]))
      raiseError(p, kErrorInvalidArgument, s, channel, kOpDispatch);
    p.recvOffset[s * C + channel] = offsets[s];
    p.recvCount[s * C + channel] = counts[s];
    done[s] = 0;
    if (p.dispatchDirect && !p.spansKnown && s != p.rank)
      publishRowSpan(p, s, kOpDispatch, channel, sequence, offsets[s], counts[s]);
  }
  if (channel == 0 && p.outPerExpert != nullptr) {
    for (int le = tid; le < localExperts; le += kRecvThreads) {
      int sum = 0;
      for (int s = 0; s < R; ++s) {
        for (int c = 0; c < C; ++c) sum += expertCounts(p, p.rank, kOpDispatch, sequence, s, c)[le];
      }
      p.outPerExpert[le] = (sum + p.alignment - 1) / p.alignment * p.alignment;
    }
  }
  groupBarrier(kBarrierRecv, kRecvThreads);

  const bool recvAligned = aligned16(p.recvX);
  const bool scalesVec = scalesVectorOk(p, p.recvXScales);
  WarpRing ring{};
  DispatchBulkState bulk{0, 0, false};
  constexpr bool bulkRows = kVariant == kDispatchVariantBulk;  // (dispatchKernel checked the alignment)
  if (bulkRows) ring = makeWarpRing(p, dynamicShared, warp, kRecvWarps, lane);
  for (;;) {
    // Warp 0 polls the tails until one moved or everything arrived.
    if (warp == 0) {
      const uint64_t start = globalTimerNs();
      for (uint32_t spins = 0;; ++spins) {
        bool progress = false;
        bool complete = true;
        for (int s = lane; s < R; s += 32) {
          // A rank's rows to itself are read straight from its inputs: all available at once.
          const int n = s == p.rank            ? counts[s]
                        : done[s] >= counts[s] ? done[s]
                        : kBalanced
                            ? (balancedSourceDone(p, s, sequence) ? counts[s] : done[s])
                            : rowsOf(loadAcquireSys(ctrlWord(p, p.rank, kCtrlTail, kOpDispatch, channel, s)), sequence);
          avail[s] = min(n, counts[s]);
          progress = progress || avail[s] > done[s];
          complete = complete && avail[s] >= counts[s];
        }
        progress = __any_sync(0xffffffffu, progress);
        complete = __all_sync(0xffffffffu, complete);
        if (progress || complete) {
          if (lane == 0) *flag = complete && !progress ? 1 : 0;
          break;
        }
        if ((spins & 63) == 0) {
          int give = 0;
          if (lane == 0) {
            give = *reinterpret_cast<volatile unsigned int*>(&p.state->abort) != 0 ? 1 : 0;
            if (give != 0 || globalTimerNs() - start > p.timeoutNs) {
              int peer = 0;
              while (peer < R && done[peer] >= counts[peer]) ++peer;
              raiseError(p, kErrorTimeout, peer, channel, kOpDispatch);
              give = 1;
            }
          }
          if (__shfl_sync(0xffffffffu, give, 0) != 0) {
            for (int s = lane; s < R; s += 32) avail[s] = counts[s];  // give up: treat as arrived
            // (2: the rows are garbage, so the pulled dispatch must not follow their tokens)
            if (lane == 0) *flag = kPullX ? 2 : 0;
            break;
          }
        }
      }
    }
    groupBarrier(kBarrierRecv, kRecvThreads);
    if (*flag == 1) break;
    MC_PROFILE(kOpDispatch, 6, kSendThreads);
    // Rows [done[s], avail[s]) of every source, spread over the receiving warps.
    int pending = 0;
    for (int s = 0; s < R; ++s) pending += avail[s] - done[s];
    if (bulkRows) {
      dispatchCopyRowsBulk(p, channel, ring, &bulk, offsets, done, avail, pending, scalesVec, warp, lane);
    }
    // (balanced: this rank's own rows only; balancedCopyParts takes the others' small parts once
    // every source is complete)
    int first = 0;
    for (int s = 0; kBalanced && s < p.rank; ++s) first += avail[s] - done[s];
    const int end = kBalanced ? first + avail[p.rank] - done[p.rank] : pending;
    for (int j = bulkRows ? end : first + warp; !bulkRows && j < end; j += kRecvWarps) {
      int s = 0;
      int i = j;
      while (i >= avail[s] - done[s]) {
        i -= avail[s] - done[s];
        ++s;
      }
      const int ordinal = done[s] + i;
      const int row = offsets[s] + ordinal;
      if (row >= p.recvCapacity) continue;
      RowSource src = s == p.rank
                          ? selfRowSource(p, p.selfToken[channel * p.chunkRows + ordinal], recvAligned)
                          : stagedRowSource(p, exchangeRow(p, kOpDispatch, s, p.rank, channel, ordinal), recvAligned);
      if (kPullX && s != p.rank && *flag == 2) {
        receiveRow<false>(p, src, row, s, scalesVec, lane);  // gave up waiting: no token to follow
      } else if (kPullX && s != p.rank) {
        // Pulled dispatch: the x row is the source's own, at the token its staged row names
        // (every lane reads the token; the host checked that x is 16-byte aligned everywhere).
        const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2);
        src.x = static_cast<const uint8_t*>(p.xPeers[s]) + p.xOffset + static_cast<uint64_t>(*src.tokenAt) * xBytes;
        receiveRow(p, src, row, s, scalesVec, lane);
      } else if (p.dispatchDirect && s != p.rank) {
        receiveRow<false>(p, src, row, s, scalesVec, lane);  // its x row is already in place
      } else {
        receiveRow(p, src, row, s, scalesVec, lane);
      }
    }
    groupBarrier(kBarrierRecv, kRecvThreads);
    for (int s = tid; s < R; s += kRecvThreads) done[s] = avail[s];
    groupBarrier(kBarrierRecv, kRecvThreads);
  }
  // Bulk stores still writing recvX complete before the block ends.
  if (bulkRows && lane == 0) bulkWait<0>();
  MC_PROFILE(kOpDispatch, 7, kSendThreads);
  // This channel's staging of this call is consumed: let every source reuse it. (Balanced: the
  // whole block copies the other ranks' parts first, then acks; dispatchKernel.)
  for (int s = tid; !kBalanced && s < R; s += kRecvThreads)
    storeReleaseSys(ctrlWord(p, s, kCtrlAck, kOpDispatch, channel, p.rank), sequence);
}

// Dynamic shared memory: sent [R], offsets [R + 1], counts/done/avail [R] each, positions of a
// batch [sendBatch * R], rows of every (channel, source) count word [C * R], the direct
// dispatch's first rows and rows held per destination [2 R] (the balanced dispatch's, per
// channel: [C][3 R], with the staging slots' deltas). The balanced dispatch keeps each sending
// warp's two tokens' positions [2 R] where a batch's go (sendBatch >= 32 > 2 x 15 warps).
// The pulled dispatch (IntranodeParams::dispatchPullX) runs as a kernel of its own, so that
// its code does not change the default kernel's registers: an internal variant number, not a
// MOECOMM_EP_DISPATCH_VARIANT value.
constexpr int kDispatchVariantPullX = kDispatchVariants;
// Likewise the balanced dispatch (IntranodeParams::dispatchBalanced).
constexpr int kDispatchVariantBalanced = kDispatchVariants + 1;

template <int kVariant, int kBatch>
__global__ void __launch_bounds__(kThreads, 1) dispatchKernel(IntranodeParams p) {
  extern __shared__ __align__(16) int shared[];
  __shared__ uint64_t scratch[kWarps];
  __shared__ int flag;
  const int R = p.numRanks;
  int* sent = shared;
  int* offsets = sent + R;
  int* counts = offsets + R + 1;
  int* done = counts + R;
  int* avail = done + R;
  int* posBatch = avail + R;
  int* rowsTable = posBatch + p.sendBatch * R;  // the table is sized for the run-time batch
  int* direct = rowsTable + p.numChannels * R;
  const int channel = blockIdx.x;
  setSplit(p.dispatchSendWarps);
  const uint64_t sequence = readSequence(p, kOpDispatch);
  MC_PROFILE(kOpDispatch, 0, 0);
  if (threadIdx.x < kSendThreads) {
    // Prefetching senders read x, scales and weights by bulk copies (16-byte aligned chunks).
    const bool bulkOk = aligned16(p.x) && selfPartsBulkOk(p);
    if (kVariant == kDispatchVariantBalanced) {
      dispatchSendBalanced(p, channel, sequence, scratch, sent, posBatch, direct);
    } else if (kVariant == kDispatchVariantPullX) {
      dispatchSend<kBatch, kSendRegisters, true>(p, channel, sequence, scratch, sent, posBatch, direct,
                                                 reinterpret_cast<uint8_t*>(shared));
    } else if (kVariant == kDispatchVariantPrefetch && bulkOk) {
      dispatchSend<kBatch, kSendPrefetch>(p, channel, sequence, scratch, sent, posBatch, direct,
                                          reinterpret_cast<uint8_t*>(shared));
    } else if (kVariant == kDispatchVariantBulkSend && bulkOk) {
      dispatchSend<kBatch, kSendBulk>(p, channel, sequence, scratch, sent, posBatch, direct,
                                      reinterpret_cast<uint8_t*>(shared));
    } else {
      dispatchSend<kBatch, kSendRegisters>(p, channel, sequence, scratch, sent, posBatch, direct,
                                           reinterpret_cast<uint8_t*>(shared));
    }
  } else {
    // Bulk copies need every x row 16-byte aligned: the output, and for the rows a rank sends
    // itself the caller's x and scales (the register path falls back to bytes).
    if (kVariant == kDispatchVariantBalanced) {
      dispatchReceive<kDispatchVariantRegisters, false, true>(p, channel, sequence, offsets, counts, done, avail, &flag,
                                                              rowsTable, reinterpret_cast<uint8_t*>(shared));
    } else if (kVariant == kDispatchVariantPullX) {
      dispatchReceive<kDispatchVariantRegisters, true>(p, channel, sequence, offsets, counts, done, avail, &flag,
                                                       rowsTable, reinterpret_cast<uint8_t*>(shared));
    } else if (kVariant == kDispatchVariantBulk && aligned16(p.recvX) && aligned16(p.x) && selfPartsBulkOk(p) &&
               p.rowExtent - static_cast<uint64_t>(p.hidden) * (p.xIsFp8 ? 1 : 2) <=
                   static_cast<uint64_t>(p.ringStageBytes)) {
      dispatchReceive<kDispatchVariantBulk>(p, channel, sequence, offsets, counts, done, avail, &flag, rowsTable,
                                            reinterpret_cast<uint8_t*>(shared));
    } else {
      dispatchReceive<kDispatchVariantRegisters>(p, channel, sequence, offsets, counts, done, avail, &flag, rowsTable,
                                                 reinterpret_cast<uint8_t*>(shared));
    }
  }
  if (kVariant == kDispatchVariantBalanced) {
    __syncthreads();
    balancedCopyParts(p, channel, offsets, counts, done);  // (done: no longer needed)
    __syncthreads();
    MC_PROFILE(kOpDispatch, 9, 0);
    for (int s = threadIdx.x; s < R; s += kThreads)
      storeReleaseSys(ctrlWord(p, s, kCtrlAck, kOpDispatch, channel, p.rank), sequence);
  }
  finishCall(p, kOpDispatch, sequence);
  MC_PROFILE(kOpDispatch, 8, 0);
  MC_PROFILE_KEEP_ROUTED(p.route);
}

// ---- Combine -----------------------------------------------------------------------------

// Sends back the rows this rank received on channel c, ordinal-major across sources so every
// source's receiver progresses at the same pace.
template <int kBatch>
__device__ void combineSend(const IntranodeParams& p, int channel, uint64_t sequence, int* offsets, int* counts) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int R = p.numRanks;
  const int C = p.numChannels;
  for (int dest = threadIdx.x; dest < R; dest += kSendThreads) waitAck(p, kOpCombine, channel, dest, sequence);
  MC_PROFILE(kOpCombine, 1, 0);
  for (int s = threadIdx.x; s < R; s += kSendThreads) {
    offsets[s] = p.recvOffset[s * C + channel];
    counts[s] = p.recvCount[s * C + channel];
  }
  groupBarrier(kBarrierSend, kSendThreads);
  // Items are (ordinal, source) pairs of the other ranks only (own rows: the receiver reads
  // combineX), ordinal-major; item j is ordinal j / (R - 1) of the (j % (R - 1))-th other rank.
  const int others = R - 1;
  int most = 0;
  for (int s = 0; s < R; ++s) most = s == p.rank ? most : max(most, counts[s]);
  const uint64_t xBytes = static_cast<uint64_t>(p.hidden) * 2;
  const bool aligned = aligned16(p.combineX);
  const int64_t items = static_cast<int64_t>(most) * others;
  for (int64_t base = 0; base < items;) {
    const int64_t end = min(items, base + sendBatchSize(base, kBatch * others, true));
    for (int64_t j = base + warp; j < end; j += kSendWarps) {
      const int k = static_cast<int>(j % others);
      const int s = k < p.rank ? k : k + 1;
      const int ordinal = static_cast<int>(j / others);
      if (ordinal >= counts[s]) continue;
      const int row = offsets[s] + ordinal;
      if (row >= p.recvCapacity) continue;
      uint8_t* dst = exchangeRow(p, kOpCombine, p.rank, s, channel, ordinal);
      float weight = 0.0f;
      // Without weights from this rank, zeros go back (the receiver may sum weights of others).
      const bool weightLane = lane < p.topk;
      if (weightLane && p.combineWeights != nullptr)
        weight = p.combineWeights[static_cast<int64_t>(row) * p.topk + lane];
      warpCopy<true>(
          static_cast<const uint8_t*>(p.combineX) + row * xBytes, xBytes, aligned, 1, [&](int) { return dst; }, lane);
      if (weightLane) reinterpret_cast<float*>(dst + xBytes)[lane] = weight;
    }
    groupBarrier(kBarrierSend, kSendThreads);
    for (int k = threadIdx.x; k < others; k += kSendThreads) {
      const int s = k < p.rank ? k : k + 1;
      const int64_t reach = (end - k + others - 1) / others;  // ordinals i with i * (R - 1) + k < end
      __threadfence_system();
      storeReleaseSys(ctrlWord(p, s, kCtrlTail, kOpCombine, channel, p.rank),
                      packWord(sequence, static_cast<int>(reach < counts[s] ? reach : counts[s])));
    }
    base = end;
  }
  MC_PROFILE(kOpCombine, 4, 0);
}

// ---- Direct combine: the peers' rows read where they are ------------------------------
//
// When every rank's combineX (and weights) lie in one moecommMemAlloc allocation at the same
// offset (p.combineDirect), no rank sends: every warp of a block reduces. Block c first tells
// every other rank s where the rows it received from s on channel c start in its combineX and
// how many of them it holds (the combine's own first-row and rows-held words, the second
// released after the first; not the tail word, which a staged combine just before may still
// be reading), which also says that its combineX is final (its kernel started after the work
// before it on its stream). It then waits for the same two words from every other rank into
// the block's shared table: [R] first rows, then [R] rows held. The reducers read rank r's
// row for ordinal i at r's combineX row (first row + i), if i < rows held. Before the block
// ends it waits for every other rank's ack of this call on the channel: a rank's combineX may
// be overwritten once its combine finished, so it must not finish while a peer still reads.

__device__ void combineDirectBegin(const IntranodeParams& p, int channel, uint64_t sequence, int* table) {
  const int R = p.numRanks;
  const int C = p.numChannels;
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (s == p.rank) continue;
    publishRowSpan(p, s, kOpCombine, channel, sequence, p.recvOffset[s * C + channel], p.recvCount[s * C + channel]);
  }
  awaitSpans(p, kOpCombine, channel, sequence, table, blockDim.x);
  __syncthreads();
}

// Direct combine: rank r's row `ordinal` of this channel in r's combineX (the spans of
// combineDirectBegin), or nullptr when r does not hold it.
__device__ __forceinline__ const uint8_t* combineDirectRow(const IntranodeParams& p, void* const* bases,
                                                           uint64_t offset, uint64_t rowBytes, int r, int ordinal) {
  extern __shared__ __align__(16) int shared[];
  return spanRow(bases, offset, rowBytes, shared, p.numRanks, r, ordinal);
}

// Rank r's row for this rank's token, ordinal-th of channel c: its staged row (or with direct
// combine its own combineX row), or for r == this rank the caller's own combine input (never
// staged). nullptr: the row was never received.
__device__ __forceinline__ const uint8_t* combineRowOf(const IntranodeParams& p, int channel, int r, int ordinal) {
  if (r != p.rank && p.combineDirect)
    return combineDirectRow(p, p.combinePeerX, p.combineXOffset, static_cast<uint64_t>(p.hidden) * 2, r, ordinal);
  if (r != p.rank) return exchangeRow(p, kOpCombine, r, p.rank, channel, ordinal);
  const int row = p.recvOffset[p.rank * p.numChannels + channel] + ordinal;
  if (row >= p.recvCapacity) return nullptr;
  return static_cast<const uint8_t*>(p.combineX) + static_cast<uint64_t>(row) * p.hidden * 2;
}

// The weights that came back with that row (nullptr: zeros).
__device__ __forceinline__ const float* combineWeightsOf(const IntranodeParams& p, int channel, int r, int ordinal) {
  if (r != p.rank && p.combineDirect) {
    return reinterpret_cast<const float*>(combineDirectRow(p, p.combinePeerWeights, p.combineWeightsOffset,
                                                           static_cast<uint64_t>(p.topk) * 4, r, ordinal));
  }
  if (r != p.rank) {
    return reinterpret_cast<const float*>(exchangeRow(p, kOpCombine, r, p.rank, channel, ordinal) +
                                          static_cast<uint64_t>(p.hidden) * 2);
  }
  const int row = p.recvOffset[p.rank * p.numChannels + channel] + ordinal;
  if (row >= p.recvCapacity || p.combineWeights == nullptr) return nullptr;
  return p.combineWeights + static_cast<int64_t>(row) * p.topk;
}

// Sums one token's rows 16 bytes (8 BF16 channels) at a time. Order per element: ranks
// ascending from +0.0f, then bias, exactly as the host reference. Rows of two ranks are
// loaded together, so a pass over kGroup chunks costs one round trip per rank pair.
__device__ void combineToken(const IntranodeParams& p, int channel, int64_t t, const int* pos, int lane) {
  constexpr int kGroup = 4;  // chunks per lane per pass (registers: 2 ranks x kGroup vectors + bias)
  const int chunks = p.hidden / 8;
  const int R = p.numRanks;
  const uint4* bias = static_cast<const uint4*>(p.bias);
  uint4* out = static_cast<uint4*>(p.combinedX);
  for (int c0 = lane; c0 < chunks; c0 += 32 * kGroup) {
    float acc[kGroup][8];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
    }
    uint4 biasV[kGroup];
    if (bias != nullptr) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const int c = c0 + 32 * g;
        if (c < chunks) biasV[g] = bias[t * chunks + c];
      }
    }
    for (int r0 = 0; r0 < R; r0 += 2) {
      const int o0 = pos[r0];
      const int o1 = r0 + 1 < R ? pos[r0 + 1] : -1;
      const uint4* row0 = o0 < 0 ? nullptr : reinterpret_cast<const uint4*>(combineRowOf(p, channel, r0, o0));
      const uint4* row1 = o1 < 0 ? nullptr : reinterpret_cast<const uint4*>(combineRowOf(p, channel, r0 + 1, o1));
      uint4 v0[kGroup], v1[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const int c = c0 + 32 * g;
        if (c < chunks && row0 != nullptr) v0[g] = row0[c];
        if (c < chunks && row1 != nullptr) v1[g] = row1[c];
      }
      if (row0 != nullptr) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const uint16_t* values = reinterpret_cast<const uint16_t*>(&v0[g]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] = __fadd_rn(acc[g][i], bf16ToFloat(values[i]));
        }
      }
      if (row1 != nullptr) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const uint16_t* values = reinterpret_cast<const uint16_t*>(&v1[g]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] = __fadd_rn(acc[g][i], bf16ToFloat(values[i]));
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int c = c0 + 32 * g;
      if (c >= chunks) continue;
      if (bias != nullptr) {
        const uint16_t* values = reinterpret_cast<const uint16_t*>(&biasV[g]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = __fadd_rn(acc[g][i], bf16ToFloat(values[i]));
      }
      uint4 result;
      uint16_t* rounded = reinterpret_cast<uint16_t*>(&result);
#pragma unroll
      for (int i = 0; i < 8; ++i) rounded[i] = floatToBf16(acc[g][i]);
      out[t * chunks + c] = result;
    }
  }
}

// Scalar fallback for unaligned user buffers (same arithmetic order).
__device__ void combineTokenScalar(const IntranodeParams& p, int channel, int64_t t, const int* pos, int lane) {
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  uint16_t* out = static_cast<uint16_t*>(p.combinedX);
  for (int h = lane; h < p.hidden; h += 32) {
    float acc = 0.0f;
    for (int r = 0; r < p.numRanks; ++r) {
      if (pos[r] < 0) continue;
      const uint16_t* row = reinterpret_cast<const uint16_t*>(combineRowOf(p, channel, r, pos[r]));
      if (row != nullptr) acc = __fadd_rn(acc, bf16ToFloat(row[h]));
    }
    if (bias != nullptr) acc = __fadd_rn(acc, bf16ToFloat(bias[t * p.hidden + h]));
    out[t * p.hidden + h] = floatToBf16(acc);
  }
}

// Combine variant 1 on 1 or 2 ranks (no bias): one pass loads kGroup chunks of both rows (2 x
// 6 vectors in flight per lane, 1.5x the default; 7 chunks would spill under the kernel's 128-register cap)
// and finishes each sum at once, so no accumulator outlives a pass. Order per element: +0.0f,
// then rank 0, then rank 1, as the default path and the host reference. The same sums as
// combineTokenDeep<2, 6> below, kept as its own code: that instance measured 1.5 % slower at SM
// 24 and 3.5 % at SM 12 on 2x H200 (PERF.md, fourteenth session).
__device__ void combineTokenPairDeep(const IntranodeParams& p, int channel, int64_t t, const int* pos, int lane) {
  constexpr int kGroup = 6;
  const int chunks = p.hidden / 8;
  uint4* out = static_cast<uint4*>(p.combinedX) + t * chunks;
  const int o0 = pos[0];
  const int o1 = p.numRanks > 1 ? pos[1] : -1;
  const uint4* row0 = o0 < 0 ? nullptr : reinterpret_cast<const uint4*>(combineRowOf(p, channel, 0, o0));
  const uint4* row1 = o1 < 0 ? nullptr : reinterpret_cast<const uint4*>(combineRowOf(p, channel, 1, o1));
  // A missing row reads as -0.0f (0x8000): +0.0f + -0.0f == +0.0f and x + -0.0f == x, so adding
  // it changes no bit of any sum, NaN payloads included; the loads then need no branches.
  const uint4 negativeZeros = make_uint4(0x80008000u, 0x80008000u, 0x80008000u, 0x80008000u);
#pragma unroll 1
  for (int c0 = lane; c0 < chunks; c0 += 32 * kGroup) {
    uint4 v0[kGroup], v1[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int c = c0 + 32 * g;
      v0[g] = c < chunks && row0 != nullptr ? row0[c] : negativeZeros;
      v1[g] = c < chunks && row1 != nullptr ? row1[c] : negativeZeros;
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int c = c0 + 32 * g;
      if (c >= chunks) continue;
      const uint32_t* a = reinterpret_cast<const uint32_t*>(&v0[g]);
      const uint32_t* b = reinterpret_cast<const uint32_t*>(&v1[g]);
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float low = __fadd_rn(__fadd_rn(0.0f, __uint_as_float(a[i] << 16)), __uint_as_float(b[i] << 16));
        const float high =
            __fadd_rn(__fadd_rn(0.0f, __uint_as_float(a[i] & 0xffff0000u)), __uint_as_float(b[i] & 0xffff0000u));
        packed[i] = static_cast<uint32_t>(floatToBf16(low)) | (static_cast<uint32_t>(floatToBf16(high)) << 16);
      }
      out[c] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

// Deeper register pipeline (combine variant 1, no bias): one pass loads kGroup chunks of the
// rows of all kRanks ranks (kRanks >= the rank count; slots past it hold no row): 8 to 12
// vectors of 16 bytes in flight per lane in one round trip, where the default path keeps 8 per
// pair of ranks and needs a round trip per pair. Each sum finishes at once, so no accumulator
// outlives a pass. kRanks x kGroup is bounded by the kernel's 128-register cap (12 x 1 and
// 8 x 2 spill). Order per element: +0.0f, then the ranks ascending, as the default path and
// the host reference.
template <int kRanks, int kGroup>
__device__ void combineTokenDeep(const IntranodeParams& p, int channel, int64_t t, const int* pos, int lane) {
  const int chunks = p.hidden / 8;
  uint4* out = static_cast<uint4*>(p.combinedX) + t * chunks;
  const uint4* rows[kRanks];
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    const int ordinal = r < p.numRanks ? pos[r] : -1;
    rows[r] = ordinal < 0 ? nullptr : reinterpret_cast<const uint4*>(combineRowOf(p, channel, r, ordinal));
  }
  // A missing row reads as -0.0f (0x8000): +0.0f + -0.0f == +0.0f and x + -0.0f == x, so adding
  // it changes no bit of any sum, NaN payloads included; the loads then need no branches.
  const uint4 negativeZeros = make_uint4(0x80008000u, 0x80008000u, 0x80008000u, 0x80008000u);
#pragma unroll 1
  for (int c0 = lane; c0 < chunks; c0 += 32 * kGroup) {
    // Loads issued chunk by chunk, every rank's for each.
    uint4 v[kRanks][kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int c = c0 + 32 * g;
#pragma unroll
      for (int r = 0; r < kRanks; ++r) v[r][g] = c < chunks && rows[r] != nullptr ? rows[r][c] : negativeZeros;
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int c = c0 + 32 * g;
      if (c >= chunks) continue;
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float low = 0.0f;
        float high = 0.0f;
#pragma unroll
        for (int r = 0; r < kRanks; ++r) {
          const uint32_t word = reinterpret_cast<const uint32_t*>(&v[r][g])[i];
          low = __fadd_rn(low, __uint_as_float(word << 16));
          high = __fadd_rn(high, __uint_as_float(word & 0xffff0000u));
        }
        packed[i] = static_cast<uint32_t>(floatToBf16(low)) | (static_cast<uint32_t>(floatToBf16(high)) << 16);
      }
      out[c] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

// The ranks the deep path covers; more take the default path.
constexpr int kCombineDeepMaxRanks = 8;
// Combine variant 1 runs as two kernels: kCombineVariantDeep for 1 or 2 ranks, which holds
// only combineTokenPairDeep, and this one (internal, not a MOECOMM_EP_COMBINE_VARIANT value)
// for 3 to 8 (combineTokenDeepWide). With the template's instances in the 2-rank kernel, the
// 2-rank combine measured slower (2x H200, W-prefill: 199.5 against 196.5 µs at SM 24 with
// all five inlined, 288-290 against 279 at SM 12 with the 2-rank one alone).
constexpr int kCombineVariantDeepWide = kCombineVariants;

// Combine variant 1 on 3 to kCombineDeepMaxRanks ranks: the narrowest instance that holds
// every rank (12 loads per lane per pass up to 6 ranks, 8 for 7 or 8; 1-2 ranks take
// combineTokenPairDeep).
__device__ void combineTokenDeepWide(const IntranodeParams& p, int channel, int64_t t, const int* pos, int lane) {
  const int R = p.numRanks;
  if (R <= 3) {
    combineTokenDeep<3, 4>(p, channel, t, pos, lane);
  } else if (R <= 4) {
    combineTokenDeep<4, 3>(p, channel, t, pos, lane);
  } else if (R <= 6) {
    combineTokenDeep<6, 2>(p, channel, t, pos, lane);
  } else {
    combineTokenDeep<8, 1>(p, channel, t, pos, lane);
  }
}

// The weights that came back for token t, summed by rank.
__device__ __forceinline__ void combineTokenWeights(const IntranodeParams& p, int channel, int64_t t, const int* pos,
                                                    int lane) {
  for (int k = lane; k < p.topk; k += 32) {
    float acc = 0.0f;
    for (int r = 0; r < p.numRanks; ++r) {
      if (pos[r] < 0) continue;
      const float* weights = combineWeightsOf(p, channel, r, pos[r]);
      acc = __fadd_rn(acc, weights != nullptr ? weights[k] : 0.0f);
    }
    p.combinedWeights[t * p.topk + k] = acc;
  }
}

// Combine rows may move as 16-byte vectors (else the scalar fallback).
__device__ __forceinline__ bool combineVectorOk(const IntranodeParams& p) {
  return aligned16(p.combinedX) && aligned16(p.bias) && aligned16(p.combineX) && p.hidden % 8 == 0;
}

// The reducers' end: once all of them are done with every rank's rows of this call on the
// channel, each rank is told (its combine ack), so it may reuse what it sent or holds.
__device__ void ackCombine(const IntranodeParams& p, int channel, uint64_t sequence) {
  groupBarrier(kBarrierRecv, kRecvThreads);
  MC_PROFILE(kOpCombine, 7, kSendThreads);
  const int tid = threadIdx.x - kSendThreads;
  for (int r = tid; r < p.numRanks; r += kRecvThreads)
    storeReleaseSys(ctrlWord(p, r, kCtrlAck, kOpCombine, channel, p.rank), sequence);
}

// Receiving warps (variants 0 and 1): one warp per token, rows read through registers.
template <int kVariant>
__device__ void combineReceive(const IntranodeParams& p, int channel, uint64_t sequence) {
  const int tid = threadIdx.x - kSendThreads;
  const int lane = threadIdx.x & 31;
  const int warp = tid >> 5;
  const int R = p.numRanks;
  const bool aligned = combineVectorOk(p);
  const bool deep = p.bias == nullptr && ((kVariant == kCombineVariantDeep && R <= 2) ||
                                          (kVariant == kCombineVariantDeepWide && R <= kCombineDeepMaxRanks));
  int first = 0;
  int last = 0;
  channelTokens(p.numTokens, p.numChannels, channel, &first, &last);
  // known[r / 32] in lane r % 32: rows of rank r known to have arrived (tails only grow).
  constexpr int kKnownSlots = 4;
  int known[kKnownSlots] = {0, 0, 0, 0};
  for (int64_t t = first + warp; t < last; t += kRecvWarps) {
    const int* pos = p.pos + t * R;
    // Wait until every rank holding this token has sent its row back (lane r checks rank r).
    for (int r = lane, slot = 0; r < R; r += 32, ++slot) {
      const int ordinal = pos[r];
      // (Direct combine: combineDirectBegin already waited for every rank's rows.)
      if (ordinal < 0 || r == p.rank || p.combineDirect || (slot < kKnownSlots && known[slot] > ordinal)) continue;
      const uint64_t word = waitWord(
          p, ctrlWord(p, p.rank, kCtrlTail, kOpCombine, channel, r),
          [&](uint64_t v) { return rowsOf(v, sequence) > ordinal; }, r, channel, kOpCombine);
      if (slot < kKnownSlots) known[slot] = rowsOf(word, sequence);
    }
    __syncwarp();
    if (t == first) MC_PROFILE(kOpCombine, 6, kSendThreads);
    if (!aligned) {
      combineTokenScalar(p, channel, t, pos, lane);
    } else if (deep) {
      if (kVariant == kCombineVariantDeep) {
        combineTokenPairDeep(p, channel, t, pos, lane);
      } else {
        combineTokenDeepWide(p, channel, t, pos, lane);
      }
    } else {
      combineToken(p, channel, t, pos, lane);
    }
    if (p.combinedWeights != nullptr) combineTokenWeights(p, channel, t, pos, lane);
  }
  ackCombine(p, channel, sequence);
}

// acc[i] += the i-th BF16 value of v (8 channels, __fadd_rn), and the 8 sums rounded to BF16.
__device__ __forceinline__ void addBf16x8(float* acc, const uint4& v) {
  const uint16_t* values = reinterpret_cast<const uint16_t*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], bf16ToFloat(values[i]));
}
__device__ __forceinline__ uint4 roundBf16x8(const float* acc) {
  uint4 result;
  uint16_t* rounded = reinterpret_cast<uint16_t*>(&result);
#pragma unroll
  for (int i = 0; i < 8; ++i) rounded[i] = floatToBf16(acc[i]);
  return result;
}

// ---- Combine variant 2: rows staged through shared memory by the bulk-copy engine ---------
//
// Each receiving warp owns a ring of stages. A stage holds one slice (a run of 16-byte
// chunks) of one token: that slice of every row the token sums (ranks ascending, then the
// bias), one after the other. Up to `stages` slices are in flight per warp while the warp
// reduces the oldest one from shared memory, so a warp keeps ~stages x stageBytes moving
// instead of the 4 KiB of the register path. The lane of rank r issues rank r's bulk copy
// (lane R the bias's) after it acquired r's tail, so no lane shuffles pointers. The sums are
// the default path's, in the same order, so results are bitwise equal.

// What one token sums and how it is sliced; lane r < R holds rank r's row (nullptr: none),
// lane R the bias row.
struct CombinePlan {
  const uint8_t* source;
  uint32_t mask;    // lanes holding a source
  int sources;      // popcount(mask)
  int sliceChunks;  // chunks per source per stage
  int slices;
};

__device__ CombinePlan planCombineToken(const IntranodeParams& p, int channel, int64_t t, int lane, int stageChunks) {
  const int R = p.numRanks;
  const int chunks = p.hidden / 8;
  CombinePlan plan;
  plan.source = nullptr;
  if (lane < R) {
    const int ordinal = p.pos[t * R + lane];
    if (ordinal >= 0) plan.source = combineRowOf(p, channel, lane, ordinal);
  } else if (lane == R && p.bias != nullptr) {
    plan.source = static_cast<const uint8_t*>(p.bias) + t * static_cast<int64_t>(chunks) * 16;
  }
  plan.mask = __ballot_sync(0xffffffffu, plan.source != nullptr);
  plan.sources = __popc(plan.mask);
  int slice = stageChunks / max(1, plan.sources);
  if (slice >= 32) slice = slice / 32 * 32;  // whole warp-widths when they fit
  plan.sliceChunks = max(1, min(chunks, slice));
  plan.slices = (chunks + plan.sliceChunks - 1) / plan.sliceChunks;
  return plan;
}

// Waits for the tails behind token t's staged rows (lane r: rank r), then makes them visible
// to the bulk-copy engine in the lanes that will issue the copies.
__device__ void combineAwaitToken(const IntranodeParams& p, int channel, uint64_t sequence, int64_t t,
                                  const CombinePlan& plan, int lane, int* known) {
  const int R = p.numRanks;
  if (lane < R && lane != p.rank) {
    const int ordinal = p.pos[t * R + lane];
    if (ordinal >= 0 && *known <= ordinal) {
      const uint64_t word = waitWord(
          p, ctrlWord(p, p.rank, kCtrlTail, kOpCombine, channel, lane),
          [&](uint64_t v) { return rowsOf(v, sequence) > ordinal; }, lane, channel, kOpCombine);
      *known = rowsOf(word, sequence);
    }
  }
  if (plan.source != nullptr && lane < R && lane != p.rank) fenceProxyAsyncGlobal();
  __syncwarp();
}

// One look at the tails behind token t's staged rows: true when all arrived (no waiting).
__device__ bool combineTokenArrived(const IntranodeParams& p, int channel, uint64_t sequence, int64_t t, int lane,
                                    int* known) {
  const int R = p.numRanks;
  bool arrived = true;
  if (lane < R && lane != p.rank) {
    const int ordinal = p.pos[t * R + lane];
    if (ordinal >= 0 && *known <= ordinal) {
      const int rows = rowsOf(loadAcquireSys(ctrlWord(p, p.rank, kCtrlTail, kOpCombine, channel, lane)), sequence);
      *known = max(*known, rows);
      arrived = rows > ordinal;
    }
  }
  return __all_sync(0xffffffffu, arrived);
}

// Fills `stage` with slice `slice` of the planned token t: lane 0 announces the bytes, then
// every lane with a source copies its part.
__device__ void combineIssueSlice(const IntranodeParams& p, const WarpRing& ring, int stage, int64_t t,
                                  const CombinePlan& plan, int slice, int lane) {
  const int chunks = p.hidden / 8;
  const int firstChunk = slice * plan.sliceChunks;
  const int n = min(plan.sliceChunks, chunks - firstChunk);
  if (lane == 0) {
    *ring.meta(stage) = make_int4(static_cast<int>(t), firstChunk, n, (plan.sliceChunks << 8) | plan.sources);
    mbarrierArriveExpectTx(ring.barrier(stage), static_cast<uint32_t>(plan.sources * n * 16));
  }
  __syncwarp();
  if (plan.source != nullptr) {
    const int index = __popc(plan.mask & ((1u << lane) - 1));
    bulkLoad(ring.buffer(stage) + static_cast<int64_t>(index) * plan.sliceChunks * 16,
             plan.source + static_cast<int64_t>(firstChunk) * 16, static_cast<uint32_t>(n) * 16, ring.barrier(stage));
  }
}

// Reduces a filled stage into the output. Returns the stage's token if this slice was its
// last, else -1.
__device__ int64_t combineReduceSlice(const IntranodeParams& p, const WarpRing& ring, int stage, int lane) {
  const int chunks = p.hidden / 8;
  const int4 meta = *ring.meta(stage);
  const int64_t t = meta.x;
  const int firstChunk = meta.y;
  const int n = meta.z;
  const int sliceChunks = meta.w >> 8;
  const int sources = meta.w & 0xff;
  const uint4* staged = reinterpret_cast<const uint4*>(ring.buffer(stage));
  uint4* out = static_cast<uint4*>(p.combinedX) + t * chunks + firstChunk;
  for (int c = lane; c < n; c += 32) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int src = 0; src < sources; ++src) addBf16x8(acc, staged[src * sliceChunks + c]);
    out[c] = roundBf16x8(acc);
  }
  __syncwarp();  // every lane read the stage: it may be refilled
  return firstChunk + n == chunks ? t : -1;
}

__device__ void combineReceiveBulk(const IntranodeParams& p, int channel, uint64_t sequence, uint8_t* dynamicShared) {
  const int tid = threadIdx.x - kSendThreads;
  const int lane = threadIdx.x & 31;
  const int warp = tid >> 5;
  const int R = p.numRanks;
  int first = 0;
  int last = 0;
  channelTokens(p.numTokens, p.numChannels, channel, &first, &last);
  const WarpRing ring = makeWarpRing(p, dynamicShared, warp, kRecvWarps, lane);
  const int stageChunks = ring.stageBytes / 16;
  int known = 0;  // rows of rank `lane` known to have arrived
  // Producer: the next slice to issue; consumer: the next stage to reduce.
  int64_t nextToken = first + warp;
  int nextSlice = 0;
  CombinePlan plan{};
  bool planReady = false;  // the next token's rows arrived and are visible to the copy engine
  if (nextToken < last) plan = planCombineToken(p, channel, nextToken, lane, stageChunks);
  uint32_t issued = 0;
  uint32_t reduced = 0;
  for (;;) {
    while (issued - reduced < static_cast<uint32_t>(ring.stages) && nextToken < last) {
      if (!planReady) {
        // Rows not there yet: reduce what is in flight first, wait only with nothing to do.
        if (issued != reduced && !combineTokenArrived(p, channel, sequence, nextToken, lane, &known)) break;
        combineAwaitToken(p, channel, sequence, nextToken, plan, lane, &known);
        if (nextToken == first + warp) MC_PROFILE(kOpCombine, 6, kSendThreads);
        planReady = true;
      }
      combineIssueSlice(p, ring, static_cast<int>(issued % ring.stages), nextToken, plan, nextSlice, lane);
      ++issued;
      if (++nextSlice == plan.slices) {
        nextSlice = 0;
        nextToken += kRecvWarps;
        planReady = false;
        if (nextToken < last) plan = planCombineToken(p, channel, nextToken, lane, stageChunks);
      }
    }
    if (reduced == issued) break;
    const int stage = static_cast<int>(reduced % ring.stages);
    if (!waitStage(p, ring, stage, (reduced / ring.stages) & 1, channel, kOpCombine)) break;
    const int64_t finished = combineReduceSlice(p, ring, stage, lane);
    ++reduced;
    if (finished >= 0 && p.combinedWeights != nullptr)
      combineTokenWeights(p, channel, finished, p.pos + finished * R, lane);
  }
  ackCombine(p, channel, sequence);
}

template <int kVariant, int kBatch>
__global__ void __launch_bounds__(kThreads, 1) combineKernel(IntranodeParams p) {
  extern __shared__ __align__(16) int shared[];
  const int channel = blockIdx.x;
  setSplit(p.combineDirect ? 0 : p.combineSendWarps);  // direct: nobody sends, every warp reduces
  const uint64_t sequence = readSequence(p, kOpCombine);
  MC_PROFILE(kOpCombine, 0, 0);
  if (p.combineDirect) {
    combineDirectBegin(p, channel, sequence, shared);
    MC_PROFILE(kOpCombine, 1, 0);
    // (a direct combine under variant 2 launches variant 1's kernels: the bulk reducer reads
    // staged rows only, and through its rings a direct combine measured 352 µs against 196)
    combineReceive<kVariant == kCombineVariantBulk ? kCombineVariantDeep : kVariant>(p, channel, sequence);
    waitCallAcked(p, kOpCombine, channel, sequence, blockDim.x);  // the peers read this rank's input
  } else if (threadIdx.x < kSendThreads) {
    combineSend<kBatch>(p, channel, sequence, shared, shared + p.numRanks);
  } else if (kVariant == kCombineVariantBulk && p.numRanks < 32 && combineVectorOk(p)) {
    combineReceiveBulk(p, channel, sequence, reinterpret_cast<uint8_t*>(shared));
  } else if (kVariant == kCombineVariantBulk) {
    combineReceive<kCombineVariantRegisters>(p, channel, sequence);  // unaligned buffers or > 31 ranks
  } else {
    combineReceive<kVariant>(p, channel, sequence);
  }
  finishCall(p, kOpCombine, sequence);
  MC_PROFILE(kOpCombine, 8, 0);
}

}  // namespace

int intranodeProfile(int op, int blocks, unsigned long long* out) {
#ifdef MOECOMM_KERNEL_PROFILE
  if (op < 0 || op > kProfileDispatchRouted || blocks > kProfileBlocks) return -1;
  const cudaError_t err = cudaMemcpyFromSymbol(out, gProfile, sizeof(unsigned long long) * blocks * kProfileEvents,
                                               sizeof(unsigned long long) * op * kProfileBlocks * kProfileEvents);
  return err == cudaSuccess ? kProfileEvents : -1;
#else
  (void)op;
  (void)blocks;
  (void)out;
  return -1;
#endif
}

int launchIntranodeNotify(const IntranodeParams& params, CUstream_st* stream) {
  notifyKernel<<<params.numChannels, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

uint64_t intranodeSharedIntsBytes(int numRanks, int numChannels, int sendBatch) {
  const uint64_t ints =
      (7 + static_cast<uint64_t>(sendBatch)) * numRanks + 1 + static_cast<uint64_t>(numChannels) * numRanks;
  return (ints * sizeof(int) + 127) / 128 * 128;
}

uint64_t intranodeBalancedExtraBytes(int numRanks, int numChannels) {
  // The span table of every channel [C][3 R] (destinations' first rows, rows held and staging
  // slot deltas) instead of one channel's [2 R].
  const uint64_t ints = static_cast<uint64_t>(numChannels) * 3 * numRanks - 2 * static_cast<uint64_t>(numRanks);
  return (ints * sizeof(int) + 127) / 128 * 128;
}

uint64_t intranodeSharedBytes(const IntranodeParams& params, int op) {
  // Rings per receiving warp (bulk variants) or per sending warp (dispatch prefetch).
  int ringWarps = 0;
  if (op == kOpDispatch && params.dispatchVariant == kDispatchVariantBulk)
    ringWarps = kWarps - params.dispatchSendWarps;
  if (op == kOpDispatch && dispatchSendersUseRing(params.dispatchVariant)) ringWarps = params.dispatchSendWarps;
  if (op == kOpCombine && params.combineVariant == kCombineVariantBulk) ringWarps = kWarps - params.combineSendWarps;
  if (op == kOpDispatch && params.dispatchBalanced)  // (direct: no rings)
    return params.sharedIntsBytes + intranodeBalancedExtraBytes(params.numRanks, params.numChannels);
  if (ringWarps == 0) return params.sharedIntsBytes;
  return params.sharedIntsBytes + ringCtrlBytes(ringWarps, params.ringStages) +
         static_cast<uint64_t>(ringWarps) * params.ringStages * params.ringStageBytes;
}

namespace {
// Dynamic shared memory beyond the 48 KiB default must be allowed per kernel first.
template <typename Kernel>
int launchIntranode(Kernel kernel, const IntranodeParams& params, uint64_t sharedBytes, cudaStream_t stream) {
  if (sharedBytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(sharedBytes));
    if (err != cudaSuccess) return err;
  }
  // (MOECOMM_EP_CLUSTER; a channel count the cluster does not divide: a plain launch)
  const int cluster = params.cluster > 1 && params.numChannels % params.cluster == 0 ? params.cluster : 1;
  return launchInClusters(kernel, params.numChannels, kThreads, sharedBytes, cluster, stream, params);
}
}  // namespace

namespace {
template <int kBatch>
int launchDispatchBatch(const IntranodeParams& params, uint64_t bytes, cudaStream_t stream) {
  // (the balanced dispatch has no tail batches: one instance)
  if (params.dispatchBalanced)
    return launchIntranode(dispatchKernel<kDispatchVariantBalanced, 32>, params, bytes, stream);
  if (params.dispatchPullX)
    return launchIntranode(dispatchKernel<kDispatchVariantPullX, kBatch>, params, bytes, stream);
  if (params.dispatchVariant == kDispatchVariantBulk)
    return launchIntranode(dispatchKernel<kDispatchVariantBulk, kBatch>, params, bytes, stream);
  if (params.dispatchVariant == kDispatchVariantPrefetch)
    return launchIntranode(dispatchKernel<kDispatchVariantPrefetch, kBatch>, params, bytes, stream);
  if (params.dispatchVariant == kDispatchVariantBulkSend)
    return launchIntranode(dispatchKernel<kDispatchVariantBulkSend, kBatch>, params, bytes, stream);
  return launchIntranode(dispatchKernel<kDispatchVariantRegisters, kBatch>, params, bytes, stream);
}

template <int kBatch>
int launchCombineBatch(const IntranodeParams& params, uint64_t bytes, cudaStream_t stream) {
  switch (params.combineVariant) {
    case kCombineVariantBulk:
      // The bulk reducer reads staged rows only; a direct combine reduces as variant 1 does.
      if (!params.combineDirect)
        return launchIntranode(combineKernel<kCombineVariantBulk, kBatch>, params, bytes, stream);
      [[fallthrough]];
    case kCombineVariantDeep:
      if (params.numRanks > 2)
        return launchIntranode(combineKernel<kCombineVariantDeepWide, kBatch>, params, bytes, stream);
      return launchIntranode(combineKernel<kCombineVariantDeep, kBatch>, params, bytes, stream);
    default:
      return launchIntranode(combineKernel<kCombineVariantRegisters, kBatch>, params, bytes, stream);
  }
}
}  // namespace

int launchIntranodeDispatch(const IntranodeParams& params, CUstream_st* stream) {
  const uint64_t bytes = intranodeSharedBytes(params, kOpDispatch);
  switch (params.sendBatch) {
    case 64:
      return launchDispatchBatch<64>(params, bytes, stream);
    case 128:
      return launchDispatchBatch<128>(params, bytes, stream);
    default:
      return launchDispatchBatch<32>(params, bytes, stream);
  }
}

int launchIntranodeCombine(const IntranodeParams& params, CUstream_st* stream) {
  const uint64_t bytes = intranodeSharedBytes(params, kOpCombine);
  switch (params.combineBatch) {
    case 64:
      return launchCombineBatch<64>(params, bytes, stream);
    case 128:
      return launchCombineBatch<128>(params, bytes, stream);
    default:
      return launchCombineBatch<32>(params, bytes, stream);
  }
}

}  // namespace device
}  // namespace moecomm
