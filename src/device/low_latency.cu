// Low-latency (decode) EP kernels over NVLink: one kernel per operation (dispatch, combine),
// which runs the operation's send half, its receive half, or both (LowLatencyParams::phases;
// with MOECOMM_LL_SEND_ONLY the receive half is launched later by moecommEpComplete, so
// nothing occupies SMs in between):
//
//   dispatch send     cast each token once (FP8 with its scales, or BF16) and store it with
//                     16-byte stores into the staging of every rank that holds one of its
//                     experts ([source][token] rows: once per rank, not once per expert), plus
//                     this rank's expert ids and T into every rank.
//                     The sender also writes, per expert of each target, the list of its
//                     tokens that select it and their count.
//   dispatch receive  read every (local expert, source) count, scan them, and copy an even
//                     share of the rows per block (sources ascending per expert, tokens
//                     ascending per source, from the lists) into the caller's expert-major
//                     output; keep the routing for the combine.
//   combine send      every received row goes back to its token's rank, into [t][k] of its
//                     staging (k = the first entry naming the expert), with a sequence marker.
//   combine receive   per token, acc = fmaf(w_k, y_k, acc) over k ascending from the marked
//                     rows; out = bf16(acc).
//
// Signalling has no grid-wide step: every block of a send half release-stores the operation's
// sequence into its own flag on every target once its stores are issued, and every block of a
// receive half into its own released flag on every rank once it has read the slot. A receive
// waits for all B flags of each source (exactly the sequence), a send for all B released flags
// of each target (exactly the previous sequence on the slot: a rank that already moved on must
// not be written to). The blocks of a receive agree on which sources are present through one
// atomicCAS per source (LowLatencyState::decision), so a source that arrives just as another
// block times out is used by all blocks or by none. Waits are bounded by timeoutNs
// (MOECOMM_LL_TIMEOUT): a peer that does not answer, or that has moved on, is masked in the
// device mask (and the mapped host copy moecommEpGetRankMask reads) and treated as absent.
// Nothing traps, nothing hangs.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/align.h"
#include "device/bulk_copy.cuh"
#include "device/common.cuh"
#include "device/ll_transport.cuh"
#include "device/low_latency.h"
#include "ep/dtype.h"

namespace moecomm {
namespace device {
namespace {

constexpr int kThreads = kLowLatencyThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kErrorInvalidArgument = 4;  // moecommInvalidArgument
constexpr uint32_t kDecidedPresent = 1;
// A sent flag with this bit: the sender has the receiver masked and sent it nothing for this
// operation, so the receiver treats the sender as absent at once instead of timing out.
constexpr uint64_t kAbsentBit = 1ull << 63;
constexpr uint32_t kDecidedAbsent = 2;

// The dispatch and combine kernels are instantiated per row kind (FP8 or BF16) and combine
// form (per expert or per rank), so each launch runs a kernel without the other forms' code
// (an FP8 per-expert dispatch compiles to 93 KB with kSendUnroll 1, 151 KB as one kernel for
// every form with kSendUnroll 4; the per-expert combine to 46 KB instead of 73). Measured at
// one rank (PERF.md, eighth session): dispatch -1.3 us, combine -0.9 (per expert) and -1.9
// (per rank), graph -3.1. Developer switch MOECOMM_LL_SPLIT_FORMS=0 (scripts/ab-bench.sh
// B_CMAKE_EXTRA=-DCMAKE_CUDA_FLAGS=-DMOECOMM_LL_SPLIT_FORMS=0): one kernel reads the forms
// from the parameters (kForms 0), as before the eighth session.
#ifndef MOECOMM_LL_SPLIT_FORMS
#define MOECOMM_LL_SPLIT_FORMS 1
#endif
// kForms: 0 = from the parameters; otherwise one of the row kinds or'ed with one of the forms.
constexpr int kFormFp8 = 1;
constexpr int kFormBf16 = 2;
constexpr int kFormPerExpert = 4;
constexpr int kFormPerRank = 8;

__device__ __forceinline__ bool formFp8(int forms, const LowLatencyParams& p) {
  return (forms & kFormFp8) != 0 ? true : (forms & kFormBf16) != 0 ? false : p.fp8 != 0;
}
__device__ __forceinline__ bool formPerRank(int forms, const LowLatencyParams& p) {
  return (forms & kFormPerRank) != 0 ? true : (forms & kFormPerExpert) != 0 ? false : p.perRank != 0;
}

// Developer timeline (build with -DMOECOMM_KERNEL_PROFILE): per kernel (kLlKernel*) and block,
// the global timer at fixed points of the last call (see lowLatencyProfile).
#ifdef MOECOMM_KERNEL_PROFILE
constexpr int kProfileBlocks = 256;
__device__ unsigned long long gLowLatencyProfile[kLowLatencyKernels][kProfileBlocks][kLowLatencyProfileEvents];
// Slots kLowLatencyProfileTimes and + 1 hold the SM clock (clock64) at events 0 and 9, for the clock rate.
#define MC_LL_PROFILE(kernel, event)                                                               \
  do {                                                                                             \
    if (threadIdx.x == 0 && blockIdx.x < kProfileBlocks) {                                         \
      gLowLatencyProfile[kernel][blockIdx.x][event] = globalTimerNs();                             \
      if ((event) == 0 || (event) == 9)                                                            \
        gLowLatencyProfile[kernel][blockIdx.x][kLowLatencyProfileTimes + ((event) == 0 ? 0 : 1)] = \
            static_cast<unsigned long long>(clock64());                                            \
    }                                                                                              \
  } while (0)
#else
#define MC_LL_PROFILE(kernel, event) \
  do {                               \
    (void)(kernel);                  \
  } while (0)
#endif

// This rank's flags, [0..B) of each source: sent[slot][source], listed[slot][source] (a
// dispatch's lists, before its rows; only with kOneFlag off), released[slot][reader]. Peers'
// flags are written with signalFlag (device/ll_transport.cuh).
__device__ __forceinline__ const uint64_t* sentFlags(const LowLatencyParams& p, int source) {
  return localFlags(p, p.sentOffset, source);
}
__device__ __forceinline__ const uint64_t* listedFlags(const LowLatencyParams& p, int source) {
  return localFlags(p, p.listedOffset, source);
}
__device__ __forceinline__ const uint64_t* releasedFlags(const LowLatencyParams& p, int reader) {
  return localFlags(p, p.releasedOffset, reader);
}

// This rank's own slot (what its peers sent it).
__device__ __forceinline__ const uint8_t* mySlot(const LowLatencyParams& p) { return p.peers[p.rank] + slotStart(p); }

__device__ __forceinline__ int loadVolatile(const int* address) {
  return *reinterpret_cast<const volatile int*>(address);
}

__device__ __forceinline__ const volatile uint64_t* sequenceWordOf(const LowLatencyParams& p) {
  return reinterpret_cast<const volatile uint64_t*>(&p.state->slotSequence[p.slot]);
}
__device__ __forceinline__ uint64_t currentSequence(const LowLatencyParams& p) { return *sequenceWordOf(p); }

__device__ __forceinline__ uint32_t allRanks(int numRanks) {
  return numRanks == 32 ? 0xffffffffu : (1u << numRanks) - 1u;
}

// The waits' check of the rank mask before each flag reads a copy of the mask that each block
// takes at its start (in shared memory), instead of a load from global memory that the flag's
// own load waited behind. A rank masked after the copy was taken is still seen by waitFlag's
// periodic look at the global mask (and a block's own maskRank updates its copy). Measured at
// one rank (PERF.md, eighth session): dispatch -0.3 to -0.7 us, combine -0.1 to -0.2
// (predicted -1 to -1.5 for the dispatch). Developer switch MOECOMM_LL_MASK_SNAPSHOT=0: as before.
#ifndef MOECOMM_LL_MASK_SNAPSHOT
#define MOECOMM_LL_MASK_SNAPSHOT 1
#endif
constexpr bool kMaskSnapshot = MOECOMM_LL_MASK_SNAPSHOT != 0;

__device__ __forceinline__ int* maskSnapshot() {
  __shared__ int snapshot[kLowLatencyMaxRanks];
  return snapshot;
}
// Threads r < R: rank r's mask word, loaded early and stored later (storeMaskSnapshot), so the
// load's latency overlaps other work; a barrier must come between the store and any wait.
__device__ __forceinline__ int loadMaskWord(const LowLatencyParams& p) {
  return kMaskSnapshot && static_cast<int>(threadIdx.x) < p.numRanks ? loadVolatile(&p.state->rankMask[threadIdx.x])
                                                                     : 0;
}
__device__ __forceinline__ void storeMaskSnapshot(const LowLatencyParams& p, int word) {
  if (kMaskSnapshot && static_cast<int>(threadIdx.x) < p.numRanks) maskSnapshot()[threadIdx.x] = word;
}
// Whether the waits skip rank r without looking at its flags. A rank that another block masked
// during this kernel is not in this block's copy: its flags are polled until waitFlag's look at
// the global mask (every 64 polls), and a source that another block masked after the grid
// agreed on it may still have its rows waited for and used by this block (the agreement
// already counted them present).
__device__ __forceinline__ bool maskedForWaits(const LowLatencyParams& p, int r) {
  return kMaskSnapshot ? maskSnapshot()[r] != 0 : loadVolatile(&p.state->rankMask[r]) != 0;
}

__device__ void maskRank(const LowLatencyParams& p, int rank) {
  if (kMaskSnapshot) maskSnapshot()[rank] = 1;  // this block's later waits (after a barrier)
  atomicExch(&p.state->rankMask[rank], 1);
  p.hostMasked[rank] = 1;
  __threadfence_system();
}

// A sent flag with this bit: the sender's call failed on its own rank before it sent anything
// (bad arguments, a failed launch); it consumed the operation all the same, so the receivers
// treat it as absent without masking it and report moecommRemoteError.
constexpr uint64_t kFailedBit = 1ull << 62;
constexpr uint64_t kFlagBits = kAbsentBit | kFailedBit;
constexpr int kErrorRemote = 6;   // moecommRemoteError
constexpr int kErrorTimeout = 8;  // moecommTimeout

// What a wait for one flag found.
enum FlagState : int { kFlagArrived = 0, kFlagMissing = 1, kFlagFailed = 2 };

// One thread: spins until *flag == target (arrived). The target with kFailedBit is a failed
// call (kFlagFailed); the target with kAbsentBit (the peer has this rank masked), a larger
// value (the peer moved on), a timeout, or the peer being masked meanwhile (by another block)
// is missing, and the caller masks. With laterCounts a larger value counts as arrived: the
// caller knows the operation's data arrived (another block saw all of its flags) and a later
// flag can only be one that does not write data here (a sender that masked this rank). An
// older operation's flag is waited past. After the budget the flag gets one last look.
__device__ int waitFlag(const LowLatencyParams& p, const uint64_t* flag, uint64_t target, int peer,
                        bool laterCounts = false) {
  const uint64_t start = globalTimerNs();
  bool lastLook = false;
  for (uint32_t polls = 0;; ++polls) {
    const uint64_t value = loadAcquireSys(flag);
    if (value == target) return kFlagArrived;
    if (value == (target | kFailedBit)) return kFlagFailed;
    if ((value & ~kFlagBits) > target && laterCounts) return kFlagArrived;
    if ((value & ~kFlagBits) >= target || lastLook) return kFlagMissing;
    if ((polls & 63u) == 63u) {
      if (loadVolatile(&p.state->rankMask[peer]) != 0) return kFlagMissing;
      lastLook = globalTimerNs() - start > p.timeoutNs;
    }
  }
}

// What a block's wait for every rank's flags found: the ranks whose B flags all arrived, and
// those with a flag of a failed call.
struct RanksWaited {
  uint32_t arrived;
  uint32_t failed;
};

// The whole block: waits for flags[r][0..B) == target for every rank r of `ranks` (default:
// all) that is not masked (flagsOf(r) gives the array).
template <typename FlagsOf>
__device__ RanksWaited waitAll(const LowLatencyParams& p, uint64_t target, FlagsOf flagsOf, uint32_t ranks = ~0u) {
  ranks &= allRanks(p.numRanks);
  __shared__ uint32_t missing;
  __shared__ uint32_t failed;
  if (threadIdx.x == 0) {
    missing = 0;
    failed = 0;
  }
  __syncthreads();
  const int B = p.numBlocks;
  for (int i = threadIdx.x; i < p.numRanks * B; i += blockDim.x) {
    const int r = i / B;
    if (((ranks >> r) & 1u) == 0) continue;
    const int state = maskedForWaits(p, r) ? kFlagMissing : waitFlag(p, flagsOf(r) + i % B, target, r);
    if (state != kFlagArrived) atomicOr(state == kFlagFailed ? &failed : &missing, 1u << r);
  }
  __syncthreads();
  return RanksWaited{ranks & ~missing & ~failed, failed & ~missing};
}

// Threads 0..R-1: masks every rank outside `ready` that is not masked yet.
__device__ void maskAllBut(const LowLatencyParams& p, uint32_t ready) {
  const int r = threadIdx.x;
  if (r < p.numRanks && ((ready >> r) & 1u) == 0 && loadVolatile(&p.state->rankMask[r]) == 0) maskRank(p, r);
}

// Every block, on entry to a send half: the ranks it may write to, i.e. the unmasked ones all
// of whose blocks finished reading what the previous operation on this slot put there. Ranks
// that fail are masked; the others will see this block's flag missing and mask this rank.
__device__ uint32_t sendTargets(const LowLatencyParams& p, uint64_t sequence) {
  const uint32_t ready = waitAll(p, sequence - 1, [&](int r) { return releasedFlags(p, r); }).arrived;
  maskAllBut(p, ready);
  return ready;
}

// The agreement's first compare-and-swap expects the slot's previous operation's decision
// (sequence - 1, present) instead of loading the word first: one round trip instead of two when
// that guess holds (a wrong guess only costs the retry with the value returned). Measured on 2x
// H200 (PERF.md, seventeenth session): dispatch -0.1 to -0.2 us, combine unchanged. Developer
// switch MOECOMM_LL_CAS_GUESS=0: the word is loaded first, as before.
#ifndef MOECOMM_LL_CAS_GUESS
#define MOECOMM_LL_CAS_GUESS 1
#endif
constexpr bool kCasGuess = MOECOMM_LL_CAS_GUESS != 0;

// Every block, on entry to a receive half, after waitAll: the sources whose send half arrived,
// the same set in every block of the grid (the first block to decide on a source wins). A
// source decided absent is masked, unless this block saw its failed-call flag: then the
// operation reports moecommRemoteError (through the async error) and the source stays unmasked.
// flagsOf(s): the flags that say s's part is here (sent flags; with kOneFlag off, a dispatch's
// listed flags). overlap() runs on every thread while the decisions' atomics are in flight (a
// receive issues there the loads it can start before knowing the sources); the barrier that
// ends this function also ends it. The result differs from waited.arrived only when another
// block decided otherwise (a source that arrived as a block timed out).
template <typename FlagsOf, typename Overlap>
__device__ uint32_t decideSources(const LowLatencyParams& p, uint64_t sequence, const RanksWaited& waited,
                                  FlagsOf flagsOf, Overlap overlap) {
  __shared__ uint32_t present;
  if (threadIdx.x == 0) present = 0;
  __syncthreads();
  const int s = threadIdx.x;
  const bool decides = s < p.numRanks;
  bool mine = decides && ((waited.arrived >> s) & 1u) != 0;
  unsigned long long* word = decides ? &p.state->decision[p.slot][s] : nullptr;
  const unsigned long long proposal = (sequence << 2) | (mine ? kDecidedPresent : kDecidedAbsent);
  unsigned long long seen = 0;
  unsigned long long before = 0;
  if (decides) {
    seen = kCasGuess ? ((sequence - 1) << 2) | kDecidedPresent : *reinterpret_cast<volatile unsigned long long*>(word);
    before = (seen >> 2) != sequence ? atomicCAS(word, seen, proposal) : seen;
  }
  overlap();
  if (decides) {
    while ((seen >> 2) != sequence) {
      if (before == seen) {
        seen = proposal;
        break;
      }
      seen = before;
      if ((seen >> 2) != sequence) before = atomicCAS(word, seen, proposal);
    }
    const bool decided = (seen & 3u) == kDecidedPresent;
    if (decided && !mine) {
      // Another block saw all of s's flags, so s's data is here and stays until this
      // operation is released; a flag of s may have been overwritten since by one that writes
      // no data here (s masked this rank later): laterCounts. Bounded like every wait.
      mine = true;
      for (int j = 0; j < p.numBlocks && mine; ++j) {
        mine = waitFlag(p, flagsOf(s) + j, sequence, s, true) == kFlagArrived;
      }
    }
    if (decided && mine) atomicOr(&present, 1u << s);
    if (!decided && ((waited.failed >> s) & 1u) != 0) {
      atomicCAS(p.hostError, 0, kErrorRemote);
    } else if (!decided && loadVolatile(&p.state->rankMask[s]) == 0) {
      maskRank(p, s);
    }
  }
  __syncthreads();
  return present;
}

// The dispatch's receive half loads the sources' T words and counts while the agreement's
// atomics are in flight (decideSources' overlap), for the sources this block saw arrive, and
// again when the grid decided otherwise. Measured on 2x H200 (PERF.md, seventeenth session):
// dispatch -0.3 to -0.4 us beyond the CAS guess (predicted -0.4 to -0.7 for both). The same for
// the combine (its first round's markers and first row chunks preloaded) changed nothing there
// (the rows' loads, ~2.5 us from HBM, are the step, not the round trips before them) and was
// removed. Developer switch MOECOMM_LL_OVERLAP_AGREEMENT=0: loaded after the agreement.
#ifndef MOECOMM_LL_OVERLAP_AGREEMENT
#define MOECOMM_LL_OVERLAP_AGREEMENT 1
#endif
constexpr bool kOverlapAgreement = MOECOMM_LL_OVERLAP_AGREEMENT != 0;

// Threads 0..R-1, after a barrier: this block's flag of `region` (sentOffset, listedOffset)
// on every target, with kAbsentBit on every other rank.
__device__ void signalTargets(const LowLatencyParams& p, uint32_t targets, uint64_t sequence, uint64_t region) {
  const int r = threadIdx.x;
  if (r < p.numRanks) {
    const bool target = ((targets >> r) & 1u) != 0;
    if (target || r != p.rank) signalFlag(p, r, region, blockIdx.x, target ? sequence : sequence | kAbsentBit);
  }
}

// Every block at the end of its send half: its flag on every target (after all of the block's
// stores), the flag with kAbsentBit on every other rank (masked: it gets nothing and must not
// wait for this rank until its timeout), and the slot's sequence from the last block (every
// block read it on entry).
__device__ void finishSend(const LowLatencyParams& p, uint32_t targets, uint64_t sequence) {
  __syncthreads();
  signalTargets(p, targets, sequence, p.sentOffset);
  if (threadIdx.x == 0) {
    unsigned int* counter = &p.state->blocksDone[p.slot];
    if (atomicAdd(counter, 1u) == gridDim.x - 1) {
      *counter = 0;
      p.state->slotSequence[p.slot] = sequence;
    }
  }
}

// Developer experiment, off by default (build with -DMOECOMM_LL_DEFERRED_RELEASE=1; measured at one
// rank: +2.8 µs per dispatch, PERF.md seventh session): a receive half does not store its released
// flags at its end, where the release waits for the block's output stores and the flags' own round
// trip ends the kernel; it records them as pending (LowLatencyParams::pendingReleased), and the
// next low-latency kernel on the caller's stream stores them at its start, when nothing is
// outstanding. A peer needs this rank's release of operation n only for operation n + 2 on the
// slot, which it reaches after this rank's operation n + 1 has started, so the flag always comes in
// lockstep use (a send-only operation n + 1 included). The release kernel of abandoned halves may
// run beside a kernel of the stream and takes no part. Prediction: -1 to -1.5 µs per dispatch and
// per combine. Not safe with moecommEpComplete on another stream than the next operations' (review,
// seventh session): the pending flags of a receive half completed on stream B are stored only by a
// later kernel, and a send half of operation n + 2 on stream A that waits for this rank's own
// release of the slot would time out and mask the rank.
#ifndef MOECOMM_LL_DEFERRED_RELEASE
#define MOECOMM_LL_DEFERRED_RELEASE 0
#endif
constexpr bool kDeferredRelease = MOECOMM_LL_DEFERRED_RELEASE != 0;

// Every block at the end of its receive half: it has read all it needed from its slot.
__device__ void finishReceive(const LowLatencyParams& p, uint64_t sequence) {
  __syncthreads();
  if (kDeferredRelease) {
    if (threadIdx.x == 0) p.pendingReleased[static_cast<uint64_t>(p.slot) * p.numBlocks + blockIdx.x] = sequence;
    return;
  }
  const int r = threadIdx.x;
  if (r < p.numRanks) signalFlag(p, r, p.releasedOffset, blockIdx.x, sequence);
}

// kDeferredRelease, at the start of a kernel of the caller's stream: stores the released flags
// that earlier receive halves left pending, for block entry blockIdx.x of both slots (or every
// entry with allBlocks, a one-block kernel). Each entry is taken and cleared in one atomicExch,
// so two kernels of the EP that overlap (streams the caller orders badly) cannot lose one. The
// earlier kernel's reads of the slot are complete (kernel boundary): the release waits for
// nothing.
__device__ void flushPendingReleases(const LowLatencyParams& p, bool allBlocks) {
  if constexpr (kDeferredRelease) {
    __shared__ unsigned long long taken[kThreads];
    const int R = p.numRanks;
    const int first = allBlocks ? 0 : static_cast<int>(blockIdx.x);
    const int blocks = allBlocks ? p.numBlocks : 1;
    const int entries = kLowLatencyDeviceSlots * blocks;
    auto entryOf = [&](int e) {
      return reinterpret_cast<unsigned long long*>(p.pendingReleased) +
             (static_cast<uint64_t>(e / blocks) * p.numBlocks + first + e % blocks);
    };
    for (int base = 0; base < entries; base += kThreads) {
      const int n = min(kThreads, entries - base);
      if (static_cast<int>(threadIdx.x) < n) taken[threadIdx.x] = atomicExch(entryOf(base + threadIdx.x), 0ull);
      __syncthreads();
      for (int i = threadIdx.x; i < n * R; i += blockDim.x) {
        const int e = base + i / R;
        const uint64_t sequence = taken[i / R];
        if (sequence != 0) signalFlag(p, i % R, p.releasedOffset, first + e % blocks, sequence, e / blocks);
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ void unpackBf16(const int4& v, uint16_t* out) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = static_cast<uint16_t>(words[i] & 0xffffu);
    out[2 * i + 1] = static_cast<uint16_t>(words[i] >> 16);
  }
}

// Block-wide exclusive scan of one int per thread (threadIdx.x < kThreads); returns the
// prefix of this thread and sets *total. Every thread of the block must call it.
__device__ int blockExclusiveScan(int value, int* total) {
  __shared__ int warpSums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warpSums[warp] = inclusive;
  __syncthreads();
  int before = 0;
  int sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warpSums[w];
    sum += warpSums[w];
  }
  __syncthreads();  // warpSums may be reused by the next call
  *total = sum;
  return before + inclusive - value;
}

// ---- Dispatch send ------------------------------------------------------------------------
// Work is flat over (token, 16-byte chunk) across the whole grid, so every SM of the budget
// sends from the first microsecond whatever T is; each thread loads kSendUnroll chunks before
// it converts and stores any. Default 1 (developer switch MOECOMM_LL_SEND_UNROLL): 4 made the
// FP8 dispatch 13 KB larger and 0.1 to 1.3 us slower at one rank (PERF.md, eighth session).

#ifndef MOECOMM_LL_SEND_UNROLL
#define MOECOMM_LL_SEND_UNROLL 1
#endif
constexpr int kSendUnroll = MOECOMM_LL_SEND_UNROLL;
static_assert(kSendUnroll >= 1, "MOECOMM_LL_SEND_UNROLL must be at least 1");

// Casts BF16 rows to FP8 (dtype.h arithmetic, as reference::castRowToFp8) and stores the bytes
// and the FP32 scales into every destination's staging row. A thread owns 16 channels; the 8
// lanes of a 128-channel scale block (never split between tokens, since H % 128 == 0, and in
// one warp, since chunks per row are a multiple of 8) reduce their amax with shuffles.
__device__ void sendFp8Rows(const LowLatencyParams& p, const uint32_t* tokenRanks, uint32_t targets) {
  const int chunksPerRow = p.hidden / 16;
  const int total = p.numTokens * chunksPerRow;  // < 2^31: checked when the EP is made
  const int stride = gridDim.x * blockDim.x;
  const uint64_t rowBase = p.rowsOffset + static_cast<uint64_t>(p.rank) * p.maxTokens * p.rowPitch;
  for (int base = blockIdx.x * blockDim.x; base < total; base += stride * kSendUnroll) {
    int4 raw[kSendUnroll][2];
    uint32_t destinations[kSendUnroll];
    int token[kSendUnroll];
    int chunk[kSendUnroll];
#pragma unroll
    for (int u = 0; u < kSendUnroll; ++u) {
      const int g = base + u * stride + threadIdx.x;
      token[u] = g < total ? g / chunksPerRow : 0;
      chunk[u] = g < total ? g % chunksPerRow : 0;
      destinations[u] = g < total ? tokenRanks[token[u]] & targets : 0;
      raw[u][0] = make_int4(0, 0, 0, 0);
      raw[u][1] = make_int4(0, 0, 0, 0);
      if (destinations[u] != 0) {
        const int4* source = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) +
                                                           static_cast<uint64_t>(token[u]) * p.hidden * 2) +
                             2 * chunk[u];
        raw[u][0] = source[0];
        raw[u][1] = source[1];
      }
    }
#pragma unroll
    for (int u = 0; u < kSendUnroll; ++u) {
      if (base + u * stride >= total) break;  // the same for the whole block
      uint16_t values[16];
      unpackBf16(raw[u][0], values);
      unpackBf16(raw[u][1], values + 8);
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(bf16ToFloat(values[i])));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
      if (destinations[u] == 0) continue;
      amax = fmaxf(amax, kFp8MinAmax);
      float scale = amax / kFp8E4m3Max;
      if (p.roundScale) scale = roundScaleUpToPowerOfTwo(scale);
      const float inverse = 1.0f / scale;
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          word |= static_cast<uint32_t>(floatToE4m3(bf16ToFloat(values[4 * w + b]) * inverse)) << (8 * b);
        }
        words[w] = word;
      }
      const int4 q = make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                               static_cast<int>(words[3]));
      const uint64_t stagingRow = rowBase + static_cast<uint64_t>(token[u]) * p.rowPitch;
      for (uint32_t left = destinations[u]; left != 0; left &= left - 1) {
        uint8_t* staged = windowSlot(p, __ffs(left) - 1) + stagingRow;
        reinterpret_cast<int4*>(staged)[chunk[u]] = q;
        if ((chunk[u] & 7) == 0) reinterpret_cast<float*>(staged + p.hidden)[chunk[u] / 8] = scale;
      }
    }
  }
}

__device__ void sendBf16Rows(const LowLatencyParams& p, const uint32_t* tokenRanks, uint32_t targets) {
  const int chunksPerRow = p.hidden / 8;
  const int total = p.numTokens * chunksPerRow;
  const int stride = gridDim.x * blockDim.x;
  const uint64_t rowBase = p.rowsOffset + static_cast<uint64_t>(p.rank) * p.maxTokens * p.rowPitch;
  for (int base = blockIdx.x * blockDim.x + threadIdx.x; base < total; base += stride * kSendUnroll) {
    int4 values[kSendUnroll];
    uint32_t destinations[kSendUnroll];
#pragma unroll
    for (int u = 0; u < kSendUnroll; ++u) {
      const int g = base + u * stride;
      destinations[u] = g < total ? tokenRanks[g / chunksPerRow] & targets : 0;
      if (destinations[u] != 0) {
        values[u] =
            reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) +
                                          static_cast<uint64_t>(g / chunksPerRow) * p.hidden * 2)[g % chunksPerRow];
      }
    }
#pragma unroll
    for (int u = 0; u < kSendUnroll; ++u) {
      const int g = base + u * stride;
      const uint64_t stagingRow = rowBase + static_cast<uint64_t>(g / chunksPerRow) * p.rowPitch;
      for (uint32_t left = destinations[u]; left != 0; left &= left - 1) {
        reinterpret_cast<int4*>(windowSlot(p, __ffs(left) - 1) + stagingRow)[g % chunksPerRow] = values[u];
      }
    }
  }
}

// The lists: for every expert e on a target rank, this rank's tokens that select it, ascending,
// as entries t * 32 + (the first k naming e), and their count, written into e's rank's slot
// (lists[this rank][le][0..count), listCounts[this rank][le]): the receive half then places
// rows without scanning any ids. Block b lists experts b, b + B, ... over (expert, 32-token
// chunk) items in windows of kItems: a ballot per item, a block scan of the counts, the
// ballot again to place each entry. Runs before the rows (v5), under the same sent flags
// (kOneFlag; with it off, under listed flags of their own).
constexpr int kItems = kThreads;

// The lists' id loads are issued eight at a time (the loop over a runtime K issued them one
// round trip after another), and each thread keeps the k of its first two items in registers
// between the lists' two passes instead of loading them again. Measured at one rank (PERF.md,
// eighth session): dispatch -0.2 us (per expert) and -0.2 to -0.6 (per rank). Developer switch
// MOECOMM_LL_LIST_LOADS=0: the loads as before.
#ifndef MOECOMM_LL_LIST_LOADS
#define MOECOMM_LL_LIST_LOADS 1
#endif
constexpr bool kListLoads = MOECOMM_LL_LIST_LOADS != 0;

// The dispatch's send half loads the slot's sequence before the ids' first pass and uses it
// after, so the two cold loads overlap (the kernel used to wait for the sequence before it
// loaded any id), and that pass divides in 32 bits (the 64-bit division has a slow path
// between the id loads). Measured at one rank (PERF.md, eighth session): "targets seen" 1 us
// earlier, dispatch -0.7 to -0.8 us. Developer switch MOECOMM_LL_EARLY_SEQUENCE=0: the 64-bit
// division, and the sequence loaded after the first pass (before the eighth session it was
// loaded, and waited for, at the kernel's entry).
#ifndef MOECOMM_LL_EARLY_SEQUENCE
#define MOECOMM_LL_EARLY_SEQUENCE 1
#endif
constexpr bool kEarlySequence = MOECOMM_LL_EARLY_SEQUENCE != 0;

// The first k of token t's ids naming expert, or -1 (the caller's ids; a bad id names nothing).
__device__ int firstKOf(const LowLatencyParams& p, int t, int expert) {
  const int64_t row = static_cast<int64_t>(t) * p.topk;
  if constexpr (kListLoads) {
    for (int k0 = 0; k0 < p.topk; k0 += kIdGroup) {
      int64_t ids[kIdGroup];
      loadIdGroup(ids, k0, p.topk, [&](int k) { return loadExpertId(p.topkIdx, p.topkIdxIs64, row + k); });
#pragma unroll
      for (int j = 0; j < kIdGroup; ++j) {
        if (ids[j] == expert) return k0 + j;
      }
    }
    return -1;
  }
  int first = -1;
  for (int k = p.topk - 1; k >= 0; --k) {
    if (loadExpertId(p.topkIdx, p.topkIdxIs64, row + k) == expert) first = k;
  }
  return first;
}

__device__ void sendLists(const LowLatencyParams& p, uint32_t targets) {
  __shared__ int itemCount[kItems];
  __shared__ int itemBase[kItems];  // entries of the block before the item (over all windows)
  __shared__ int carriedStart;      // where the expert that runs on into the next window started
  const int T = p.numTokens;
  const int L = p.localExperts;
  const int chunks = (T + 31) / 32;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int myExperts =
      static_cast<int>(blockIdx.x) < p.numExperts ? (p.numExperts - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto expertOf = [&](int j) { return static_cast<int>(blockIdx.x) + j * static_cast<int>(gridDim.x); };
  auto targeted = [&](int e) { return ((targets >> (e / L)) & 1u) != 0; };
  auto countOf = [&](int e) {
    return reinterpret_cast<int*>(windowSlot(p, e / L) + p.listCountsOffset) + p.rank * L + e % L;
  };
  if (chunks == 0) {
    for (int j = threadIdx.x; j < myExperts; j += blockDim.x) {
      if (targeted(expertOf(j))) *countOf(expertOf(j)) = 0;
    }
    return;
  }
  const int totalItems = myExperts * chunks;
  int rowsBefore = 0;
  for (int windowStart = 0; windowStart < totalItems; windowStart += kItems) {
    const int windowItems = min(kItems, totalItems - windowStart);
    int kept0 = -1;  // kListLoads: k of the thread's first two items of the window
    int kept1 = -1;
    for (int i = warp, n = 0; i < windowItems; i += kWarps, ++n) {
      const int item = windowStart + i;
      const int e = expertOf(item / chunks);
      const int t = (item % chunks) * 32 + lane;
      const int k = targeted(e) && t < T ? firstKOf(p, t, e) : -1;
      if (kListLoads && n == 0) kept0 = k;
      if (kListLoads && n == 1) kept1 = k;
      const bool selects = k >= 0;
      const uint32_t ballot = __ballot_sync(0xffffffffu, selects);
      if (lane == 0) itemCount[i] = __popc(ballot);
    }
    __syncthreads();
    MC_LL_PROFILE(kLlKernelDispatch, 16);
    const int count = static_cast<int>(threadIdx.x) < windowItems ? itemCount[threadIdx.x] : 0;
    int windowRows = 0;
    const int before = blockExclusiveScan(count, &windowRows);
    if (static_cast<int>(threadIdx.x) < windowItems) itemBase[threadIdx.x] = rowsBefore + before;
    __syncthreads();
    MC_LL_PROFILE(kLlKernelDispatch, 17);
    for (int i = warp, n = 0; i < windowItems; i += kWarps, ++n) {
      const int item = windowStart + i;
      const int c = item % chunks;
      const int e = expertOf(item / chunks);
      if (!targeted(e)) continue;  // the same for the whole warp
      const int first = item - c;  // the expert's first item
      const int start = first >= windowStart ? itemBase[first - windowStart] : carriedStart;
      const int t = c * 32 + lane;
      const int k = kListLoads && n < 2 ? (n == 0 ? kept0 : kept1) : t < T ? firstKOf(p, t, e) : -1;
      const uint32_t ballot = __ballot_sync(0xffffffffu, k >= 0);
      if (k >= 0) {
        int* list = reinterpret_cast<int*>(windowSlot(p, e / L) + p.listsOffset) +
                    (static_cast<uint64_t>(p.rank) * L + e % L) * p.maxTokens;
        list[itemBase[i] - start + __popc(ballot & ((1u << lane) - 1u))] = t * 32 + k;
      }
      if (c == chunks - 1 && lane == 0) *countOf(e) = itemBase[i] + itemCount[i] - start;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int last = windowStart + windowItems - 1;
      const int first = last - last % chunks;
      if (first >= windowStart) carriedStart = itemBase[first - windowStart];
    }
    rowsBefore += windowRows;
    __syncthreads();
  }
}

// Transports with puts (device/ll_transport.cuh), after a barrier: the lists and counts this
// block wrote (experts blockIdx.x, + B, ...; sendLists), a warp per expert.
__device__ void putLists(const LowLatencyParams& p, uint32_t targets) {
  const int L = p.localExperts;
  const int lane = threadIdx.x & 31;
  for (int e = blockIdx.x + (threadIdx.x >> 5) * gridDim.x; e < p.numExperts; e += kWarps * gridDim.x) {
    const int d = e / L;
    if (((targets >> d) & 1u) == 0 || !needsPut(p, d)) continue;
    const uint64_t item = static_cast<uint64_t>(p.rank) * L + e % L;
    const int count = reinterpret_cast<const int*>(windowSlot(p, d) + p.listCountsOffset)[item];
    putRange(p, d, p.listsOffset + item * p.maxTokens * sizeof(int),
             static_cast<uint64_t>(min(max(count, 0), p.maxTokens)) * sizeof(int), lane, 32);
    putRange(p, d, p.listCountsOffset + item * sizeof(int), sizeof(int), lane, 1);
  }
}

// Transports with puts, after a barrier: the rows this block stored in its flat (token, chunk)
// loop (both send loops give block b the chunk windows [b * blockDim.x + j * stride, +
// blockDim.x)), split at row boundaries into pieces, a warp per piece, put to each of the
// token's destinations: the bytes, and for FP8 the scales (one per 8 chunks; pieces start
// and end at multiples of 8 chunks, since windows and rows do).
__device__ void putSentRows(const LowLatencyParams& p, const uint32_t* tokenRanks, uint32_t targets, bool fp8) {
  const int chunksPerRow = fp8 ? p.hidden / 16 : p.hidden / 8;
  const int total = p.numTokens * chunksPerRow;
  const int stride = gridDim.x * blockDim.x;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  int piece = 0;
  for (int start = blockIdx.x * blockDim.x; start < total; start += stride) {
    const int end = min(start + static_cast<int>(blockDim.x), total);
    for (int t = start / chunksPerRow; t * chunksPerRow < end; ++t, ++piece) {
      if (piece % kWarps != warp) continue;
      const int c0 = max(start - t * chunksPerRow, 0);
      const int c1 = min(end - t * chunksPerRow, chunksPerRow);
      const uint64_t row = p.rowsOffset + (static_cast<uint64_t>(p.rank) * p.maxTokens + t) * p.rowPitch;
      for (uint32_t left = tokenRanks[t] & targets & p.putPeers; left != 0; left &= left - 1) {
        const int d = __ffs(left) - 1;
        putRange(p, d, row + 16ull * c0, 16ull * (c1 - c0), lane, 32);
        if (fp8) putRange(p, d, row + p.hidden + 4ull * (c0 / 8), 4ull * ((c1 - c0 + 7) / 8), lane, 32);
      }
    }
  }
}

// The dispatch publishes no listed flags: its lists go out under the sent flags with the rows,
// and the receive half agrees on the sent flags and then needs no second wait before the copy.
// Each block of a send half skips one system-scope release (its list stores' round trip: 1.3
// us on 2x H200, 0.7 at one rank) before it casts the rows, and each block of a receive half
// one wait for every source's flags (0.5-0.6 us). It gives up placing rows while the peers'
// rows are in flight, which the receive half, starting after its own sent flags, barely used.
// Measured at one rank (PERF.md, ninth session): dispatch -0.9 us, per-rank dispatch -0.3 to
// -0.7, graph -0.5 to -1.0 (predicted -1 to -1.3; -1.5 to -2.5 on 2 GPUs, not yet measured).
// Developer switch MOECOMM_LL_ONE_FLAG=0: listed flags before the rows, as before (every rank
// must run the same protocol: a rank built with it off waits for listed flags that default
// peers never store, times out and masks them). A source that dies between its lists and its
// rows is then absent (masked, counts 0) instead of reported as moecommTimeout.
#ifndef MOECOMM_LL_ONE_FLAG
#define MOECOMM_LL_ONE_FLAG 1
#endif
constexpr bool kOneFlag = MOECOMM_LL_ONE_FLAG != 0;

// Rows first (default since the tenth session; -DMOECOMM_LL_ROWS_FIRST=0 turns it off; needs
// kOneFlag; measured at one rank -0.5 to -0.9 us per dispatch, PERF.md ninth session; every LL
// suite passed on it at 1, 2 and 4 ranks sharing one GPU; not yet measured across a link):
// the dispatch's send half casts and stores its rows right after the targets' wait, before the
// T word, ids and lists, so the rows cross the links while the block builds its lists; the one
// sent flag covers both. With one flag nothing is gained by lists that arrive before the rows.
// On 2x H200 (ninth session's timeline) the lists took 2.5 us before the rows and the rows'
// crossing 2.7 us before the sent flags. Prediction: dispatch -1.5 to -2.5 us on 2 GPUs (more
// on 4, where the rows take longer to cross), within +-0.3 us at one rank (no link). (Profile
// event 3, rows stored, then comes right after event 2.)
#ifndef MOECOMM_LL_ROWS_FIRST
#define MOECOMM_LL_ROWS_FIRST MOECOMM_LL_ONE_FLAG  // (off with MOECOMM_LL_ONE_FLAG=0)
#endif
constexpr bool kRowsFirst = MOECOMM_LL_ROWS_FIRST != 0;
static_assert(!kRowsFirst || kOneFlag, "MOECOMM_LL_ROWS_FIRST needs MOECOMM_LL_ONE_FLAG");

// kPuts: the instantiation for transports with puts (p.putPeers != 0); without, the put code
// is not compiled in at all, so the nvlink kernels keep the code of the kernels before the
// transport interface (a cold branch in the same kernel cost ~2 µs per combine, measured).
// Ends by publishing the sent flags (finishSend). Reads the slot's sequence
// from `sequenceWord` (before the first pass over the ids with kEarlySequence, after it
// otherwise) and returns the operation's sequence (that + 1) in *sequenceOut; stores `maskWord`
// (loadMaskWord, loaded at the kernel's entry) into the block's mask snapshot before its first
// wait.
template <bool kPuts>
__device__ void dispatchSend(const LowLatencyParams& p, const volatile uint64_t* sequenceWord, uint64_t* sequenceOut,
                             int maskWord, int4* dynamicShared, bool fp8, bool perRank) {
  uint32_t* tokenRanks = reinterpret_cast<uint32_t*>(dynamicShared);  // [T]: ranks holding its experts
  const int K = p.topk;
  const int T = p.numTokens;
  // kEarlySequence: the slot's sequence is loaded before the ids and used after them.
  const uint64_t early = kEarlySequence ? *sequenceWord : 0;
  // From the caller's ids only, so it overlaps the wait for the targets (which syncs the block).
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    uint32_t ranks = 0;
#pragma unroll 8
    for (int k = 0; k < K; ++k) {
      const int64_t expert = loadExpertId(p.topkIdx, p.topkIdxIs64, static_cast<int64_t>(t) * K + k);
      if (expert >= 0 && expert < p.numExperts) {
        ranks |= 1u << (kEarlySequence ? static_cast<int>(expert) / p.localExperts
                                       : static_cast<int>(expert / p.localExperts));
      }
    }
    tokenRanks[t] = ranks;
  }
  const uint64_t sequence = (kEarlySequence ? early : *sequenceWord) + 1;
  *sequenceOut = sequence;
  storeMaskSnapshot(p, maskWord);  // (sendTargets syncs the block before it waits)
  MC_LL_PROFILE(kLlKernelDispatch, 10);
  const uint32_t targets = sendTargets(p, sequence);
  MC_LL_PROFILE(kLlKernelDispatch, 1);
  auto sendTheRows = [&]() {
    if (fp8) {
      sendFp8Rows(p, tokenRanks, targets);
    } else {
      sendBf16Rows(p, tokenRanks, targets);
    }
    if (kPuts && (targets & p.putPeers) != 0) {
      __syncthreads();
      putSentRows(p, tokenRanks, targets, fp8);
    }
  };
  if (kRowsFirst) sendTheRows();  // (they cross the links while the lists are built)
  if (blockIdx.x == 0) {
    const int d = threadIdx.x;
    if (d < p.numRanks && ((targets >> d) & 1u) != 0) {
      reinterpret_cast<int*>(windowSlot(p, d) + p.tokensOffset)[p.rank] =
          T | (lowLatencyFormat(fp8, p.roundScale, perRank) << kLowLatencyFormatShift);
      putRange(p, d, p.tokensOffset + sizeof(int) * p.rank, sizeof(int), 0, 1);
    }
  }
  // Bad ids are reported (and count as -1 everywhere). The per-rank combine also needs every
  // selection's id and weight on the expert's rank. (Grid-stride, so few blocks store them: a
  // contiguous share per block made the per-rank dispatch ~1 µs slower on 4x H200, A/B.)
  const int64_t entries = static_cast<int64_t>(T) * K;
  const int64_t entryStride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < entries; g += entryStride) {
    int64_t expert = loadExpertId(p.topkIdx, p.topkIdxIs64, g);
    if (expert < -1 || expert >= p.numExperts) {
      atomicCAS(p.hostError, 0, kErrorInvalidArgument);
      expert = -1;
    }
    if (!perRank) continue;
    const float weight = p.topkWeights[g];
    const uint64_t at = static_cast<uint64_t>(p.rank) * p.maxTokens * K + g;
    for (uint32_t left = targets; left != 0; left &= left - 1) {
      uint8_t* target = windowSlot(p, __ffs(left) - 1);
      reinterpret_cast<int*>(target + p.topkOffset)[at] = static_cast<int>(expert);
      reinterpret_cast<float*>(target + p.weightsOffset)[at] = weight;
    }
  }
  MC_LL_PROFILE(kLlKernelDispatch, 11);
  // The lists (and with them the T, ids and weights above) go out first; with kOneFlag off,
  // under the listed flags, so receivers can place rows while the rows are in flight.
  sendLists(p, targets);
  __syncthreads();
  MC_LL_PROFILE(kLlKernelDispatch, 12);
  if (kPuts && (targets & p.putPeers) != 0) {
    putLists(p, targets);
    for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x; perRank && first < entries;
         first += entryStride) {
      const uint64_t at = (static_cast<uint64_t>(p.rank) * p.maxTokens * K + first) * sizeof(int);
      const uint64_t bytes =
          static_cast<uint64_t>(min(entries - first, static_cast<int64_t>(blockDim.x))) * sizeof(int);
      for (uint32_t left = targets; left != 0; left &= left - 1) {
        putRange(p, __ffs(left) - 1, p.topkOffset + at, bytes, threadIdx.x, blockDim.x);
        putRange(p, __ffs(left) - 1, p.weightsOffset + at, bytes, threadIdx.x, blockDim.x);
      }
    }
    __syncthreads();
  }
  if (!kOneFlag) signalTargets(p, targets, sequence, p.listedOffset);
  MC_LL_PROFILE(kLlKernelDispatch, 2);
  if (!kRowsFirst) sendTheRows();
  MC_LL_PROFILE(kLlKernelDispatch, 3);
  finishSend(p, targets, sequence);
  MC_LL_PROFILE(kLlKernelDispatch, 4);
}

// ---- Dispatch receive ---------------------------------------------------------------------
// Every block scans the (expert, source) counts, takes a contiguous share of the rows, finds
// each row's list entry, then copies its rows flat over (row, 16-byte chunk, then scale) with
// several loads in flight per thread.

#ifndef MOECOMM_LL_COPY_UNROLL
#define MOECOMM_LL_COPY_UNROLL 8
#endif
constexpr int kCopyUnroll = MOECOMM_LL_COPY_UNROLL;
static_assert(kCopyUnroll >= 1, "MOECOMM_LL_COPY_UNROLL must be at least 1");
constexpr int kBatchRows = 256;  // rows whose addresses a block keeps in shared memory at once

// The whole block: copies `batch` rows (ids batchId, staging rows batchFrom) into the caller's
// recvX, and their scales into recvScales, in one flat loop over 16-byte chunks and scales.
__device__ void copyBatch(const LowLatencyParams& p, int batch, const uint8_t* const* batchFrom, const int* batchId,
                          bool fp8) {
  const int rowBytes = fp8 ? p.hidden : 2 * p.hidden;
  const int chunksPerRow = rowBytes / 16;
  const int scales = fp8 ? p.hidden / kFp8ScaleBlock : 0;
  const int dataItems = batch * chunksPerRow;
  const int items = dataItems + batch * scales;
  uint8_t* recvX = static_cast<uint8_t*>(p.recvX);
  for (int base = threadIdx.x; base < items; base += blockDim.x * kCopyUnroll) {
    int4 values[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int f = base + u * blockDim.x;
      if (f < dataItems) {
        values[u] = __ldcg(reinterpret_cast<const int4*>(batchFrom[f / chunksPerRow]) + f % chunksPerRow);
      } else if (f < items) {
        const int g = f - dataItems;
        values[u].x = __ldcg(reinterpret_cast<const int*>(batchFrom[g / scales] + p.hidden) + g % scales);
      }
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int f = base + u * blockDim.x;
      if (f < dataItems) {
        reinterpret_cast<int4*>(recvX + static_cast<uint64_t>(batchId[f / chunksPerRow]) * rowBytes)[f % chunksPerRow] =
            values[u];
      } else if (f < items) {
        const int g = f - dataItems;
        const uint64_t at = static_cast<uint64_t>(batchId[g / scales]) * scales + g % scales;
        const float scale = __int_as_float(values[u].x);
        if (p.ue8m0) {
          static_cast<uint8_t*>(p.recvScales)[at] = ue8m0FromPowerOfTwo(scale);
        } else {
          static_cast<float*>(p.recvScales)[at] = scale;
        }
      }
    }
  }
}

// The bulk-copy path of the receive copy: lane 0 of each of the first `slots` warps moves
// whole rows with the bulk-copy engine (global -> a shared-memory slot of the warp -> recvX,
// and the FP8 scales -> recvScales), rows warp, warp + slots, ... of the batch. A row costs no
// registers and no per-16-byte instructions, so an SM copies at the engine's rate instead of
// its load/store units'. Used when the rows and scales are whole 16-byte units at 16-byte
// aligned addresses and the scales need no conversion (not UE8M0); otherwise copyBatch.
// Dynamic shared memory of the receive half: itemStart ints, then kBulkSlotsMax mbarriers,
// then the slots (lowLatencyBulkStageBytes, sized for a BF16 row, the larger kind).
constexpr int kBulkSlotsMax = kWarps;

struct BulkStage {
  uint64_t* barriers;  // [kBulkSlotsMax]
  uint8_t* data;       // slots of `unit` bytes
  int slots;           // 0: the bulk path is off for this call
  uint32_t unit;
};

MC_HOST_DEVICE inline uint64_t lowLatencyItemStartBytes(int numRanks, int localExperts) {
  return roundUp((static_cast<uint64_t>(numRanks) * localExperts + 1) * sizeof(int), 128);
}

__device__ BulkStage bulkStageOf(const LowLatencyParams& p, int* itemStart, bool fp8) {
  uint8_t* base = reinterpret_cast<uint8_t*>(itemStart) + lowLatencyItemStartBytes(p.numRanks, p.localExperts);
  BulkStage stage{reinterpret_cast<uint64_t*>(base), base + kBulkSlotsMax * sizeof(uint64_t), 0, 0};
  const uint32_t scaleBytes = fp8 ? p.hidden / 32 : 0;  // FP32 per 128 channels
  stage.unit = (fp8 ? p.hidden : 2 * p.hidden) + scaleBytes;
  const uint64_t stageBytes = lowLatencyBulkStageBytes(p.hidden);
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(p.recvX) | (fp8 ? reinterpret_cast<uintptr_t>(p.recvScales) : 0)) & 15u) == 0;
  if (aligned && !p.ue8m0 && scaleBytes % 16 == 0 && stage.unit % 16 == 0) {
    const uint64_t fit = stageBytes / stage.unit;
    stage.slots = static_cast<int>(fit < kBulkSlotsMax ? fit : kBulkSlotsMax);
  }
  return stage;
}

// Lane 0 of warps < stage.slots: copies rows warp, warp + slots, ... of the batch. parity: this
// warp's mbarrier phase, carried across batches. The caller's barrier after the acquire of the
// rows' flags precedes this; the async proxy is fenced here.
__device__ void bulkCopyBatch(const LowLatencyParams& p, int batch, const uint8_t* const* batchFrom, const int* batchId,
                              const BulkStage& stage, uint32_t* parity, bool fp8) {
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) != 0 || warp >= stage.slots) return;
  const uint32_t dataBytes = fp8 ? p.hidden : 2 * p.hidden;
  const uint32_t scaleBytes = stage.unit - dataBytes;
  uint8_t* slot = stage.data + static_cast<uint64_t>(warp) * stage.unit;
  uint64_t* barrier = stage.barriers + warp;
  fenceProxyAsyncGlobal();
  for (int r = warp; r < batch; r += stage.slots) {
    bulkWaitRead<0>();  // the slot's previous row has been read out
    mbarrierArriveExpectTx(barrier, stage.unit);
    bulkLoad(slot, batchFrom[r], stage.unit, barrier);
    while (!mbarrierTryWait(barrier, *parity)) {
    }
    *parity ^= 1u;
    const uint64_t id = static_cast<uint64_t>(batchId[r]);
    bulkStore(static_cast<uint8_t*>(p.recvX) + id * dataBytes, slot, dataBytes);
    if (scaleBytes != 0) bulkStore(static_cast<uint8_t*>(p.recvScales) + id * scaleBytes, slot + dataBytes, scaleBytes);
    bulkCommit();
  }
}

// Per-rank combine: what the combine's send half needs besides the rows, for every selection
// (s, t, k) of a received token: the source's weight, and rowOf = -1 unless the expert is
// local (the blocks that place the local rows set those). Flat over the grid; also each
// source's T.
__device__ void keepSelections(const LowLatencyParams& p, const int* ids, const int* sourceTokens) {
  const int K = p.topk;
  const int perSource = p.maxTokens * K;
  const int entries = p.numRanks * perSource;
  const int firstLocal = p.rank * p.localExperts;
  const float* weights = reinterpret_cast<const float*>(mySlot(p) + p.weightsOffset);
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < p.numRanks) {
    p.routing.sourceTokens[threadIdx.x] = sourceTokens[threadIdx.x];
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < entries; i += gridDim.x * blockDim.x) {
    const int s = i / perSource;
    if (i - s * perSource >= sourceTokens[s] * K) continue;
    p.routing.weights[i] = __ldcg(weights + i);
    const int expert = __ldcg(ids + i);
    if (expert < firstLocal || expert >= firstLocal + p.localExperts) p.routing.rowOf[i] = -1;
  }
}

// kOneFlag off, the whole block, before it copies any row: every present source's sent flags
// (its rows are here). A source that sent its lists but not its rows within the budget (it died
// in between) is masked and the call reports moecommTimeout: its rows in recvX are not valid.
__device__ void waitRows(const LowLatencyParams& p, uint64_t sequence, uint32_t sources) {
  const RanksWaited rows = waitAll(
      p, sequence, [&](int r) { return sentFlags(p, r); }, sources);
  const int s = threadIdx.x;
  if (s < p.numRanks && ((sources >> s) & 1u) != 0 && ((rows.arrived >> s) & 1u) == 0) {
    atomicCAS(p.hostError, 0, kErrorTimeout);
    if (loadVolatile(&p.state->rankMask[s]) == 0) maskRank(p, s);
  }
}

// The receive half of a dispatch. The rows of local expert le are its sources' lists, sources
// ascending (each list ascending in token): item (le, s) = le * R + s. Every block reads every
// item's count (one round trip) and scans them in shared memory, so the grid shares the rows
// evenly (a contiguous range per block, whatever the experts' sizes); then batches of
// kBatchRows rows: each thread finds its row's item (a binary search), reads the list entry,
// writes the routing and the staging address, and the block copies the batch into recvX.
__device__ void dispatchReceive(const LowLatencyParams& p, uint64_t sequence, int* itemStart, bool fp8, bool perRank) {
  __shared__ int sourceTokens[kLowLatencyMaxRanks];
  __shared__ const uint8_t* batchFrom[kBatchRows];
  __shared__ int batchId[kBatchRows];
  const int R = p.numRanks;
  const int K = p.topk;
  const int L = p.localExperts;
  const int items = R * L;
  const int slotsPerExpert = R * p.maxTokens;
  const BulkStage stage = bulkStageOf(p, itemStart, fp8);
  uint32_t parity = 0;  // lane 0 of a bulk-copy warp: its mbarrier's phase
  if (threadIdx.x == 0) {
    for (int w = 0; w < stage.slots; ++w) mbarrierInit(stage.barriers + w, 1);
    fenceBarrierInit();
  }
  const uint8_t* mine = mySlot(p);
  const int* globalIds = reinterpret_cast<const int*>(mine + p.topkOffset);
  const int* listCounts = reinterpret_cast<const int*>(mine + p.listCountsOffset);
  const int* lists = reinterpret_cast<const int*>(mine + p.listsOffset);
  const int* tokens = reinterpret_cast<const int*>(mine + p.tokensOffset);
  // The sources' T words (threads s < R) and the counts as written (0 for absent sources), in
  // one round trip (T first: the counts' stores to shared memory wait for their loads).
  int word = 0;
  auto loadCounts = [&](uint32_t from) {
    if (static_cast<int>(threadIdx.x) < R) word = ((from >> threadIdx.x) & 1u) != 0 ? __ldcg(tokens + threadIdx.x) : 0;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
      const int s = i % R;
      itemStart[i] = ((from >> s) & 1u) != 0 ? __ldcg(listCounts + s * L + i / R) : 0;
    }
  };
  // Agreed on the sent flags: everything is here (kOneFlag off: on the listed flags, everything
  // but the rows). With kOverlapAgreement the counts of the sources this block saw arrive are
  // loaded while the agreement's atomics are in flight, and again if the grid decided otherwise.
  const auto flagsOf = [&](int r) { return kOneFlag ? sentFlags(p, r) : listedFlags(p, r); };
  const RanksWaited waited = waitAll(p, sequence, flagsOf);
  MC_LL_PROFILE(kLlKernelDispatch, 18);
  const uint32_t sources = decideSources(p, sequence, waited, flagsOf, [&] {
    if (kOverlapAgreement) loadCounts(waited.arrived);
  });
  MC_LL_PROFILE(kLlKernelDispatch, 19);
  MC_LL_PROFILE(kLlKernelDispatch, 5);
  if (!kOverlapAgreement || sources != waited.arrived) loadCounts(sources);
  if (static_cast<int>(threadIdx.x) < R) {
    const int s = threadIdx.x;
    // A source whose row format differs from this rank's is absent for this operation.
    const bool agrees = (word >> kLowLatencyFormatShift) == lowLatencyFormat(fp8, p.roundScale, perRank);
    sourceTokens[s] = agrees ? min(max(word & ((1 << kLowLatencyFormatShift) - 1), 0), p.maxTokens) : 0;
    if (!agrees && ((sources >> s) & 1u) != 0 && blockIdx.x == 0) {
      atomicOr(p.hostFormatPeers, static_cast<int>(1u << s));
      atomicCAS(p.hostError, 0, kErrorInvalidArgument);
    }
  }
  __syncthreads();
  MC_LL_PROFILE(kLlKernelDispatch, 13);
  // Exclusive scan of the clamped counts, kThreads items at a time (in place: each thread
  // reads its own item before the scan's first barrier and writes it after the last).
  int total = 0;
  for (int first = 0; first < items; first += kThreads) {
    const int i = first + threadIdx.x;
    const int count = i < items ? min(max(itemStart[i], 0), sourceTokens[i % R]) : 0;
    int chunkTotal = 0;
    const int before = blockExclusiveScan(count, &chunkTotal);
    if (i < items) itemStart[i] = total + before;
    total += chunkTotal;
  }
  if (threadIdx.x == 0) itemStart[items] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int le = blockIdx.x; le < L; le += gridDim.x) {
      const int rows = itemStart[(le + 1) * R] - itemStart[le * R];
      p.recvCount[le] = rows;
      p.routing.recvCount[le] = rows;
      if (p.cumulativeRecvStats != nullptr) atomicAdd(p.cumulativeRecvStats + le, rows);  // no wait
    }
  }
  if (perRank) keepSelections(p, globalIds, sourceTokens);
  MC_LL_PROFILE(kLlKernelDispatch, 6);
  const int perBlock = (total + gridDim.x - 1) / gridDim.x;
  const int begin = min(total, static_cast<int>(blockIdx.x) * perBlock);
  const int end = min(total, begin + perBlock);
  bool profiled = false;
  for (int batchStart = begin; batchStart < end; batchStart += kBatchRows) {
    const int batch = min(kBatchRows, end - batchStart);
    if (static_cast<int>(threadIdx.x) < batch) {
      const int g = batchStart + threadIdx.x;
      int lo = 0;  // the last item starting at or before g (empty items share a start)
      int hi = items;
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (itemStart[mid] <= g) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      const int s = lo % R;
      const int le = lo / R;
      const int entry = __ldcg(lists + (static_cast<uint64_t>(s) * L + le) * p.maxTokens + (g - itemStart[lo]));
      const int t = min(entry >> 5, p.maxTokens - 1);
      const int firstK = min(entry & 31, K - 1);  // a bad entry must not index past the token's row
      const int id = le * slotsPerExpert + g - itemStart[le * R];
      const int info = s * p.maxTokens + t;
      p.routing.srcInfo[id] = info;
      p.routing.firstK[id] = static_cast<uint8_t>(firstK);
      if (p.recvSrcInfo != nullptr) p.recvSrcInfo[id] = info;
      if (perRank) {
        // Every selection of the token naming this expert reads this row.
        const int expert = p.rank * L + le;
        const uint64_t at = static_cast<uint64_t>(info) * K;
        for (int k = firstK; k < K; ++k) {
          if (__ldcg(globalIds + at + k) == expert) p.routing.rowOf[at + k] = id;
        }
      }
      batchId[threadIdx.x] = id;
      batchFrom[threadIdx.x] = mine + p.rowsOffset + static_cast<uint64_t>(info) * p.rowPitch;
    }
    __syncthreads();
    if (!profiled) {
      MC_LL_PROFILE(kLlKernelDispatch, 7);
      profiled = true;
      if (!kOneFlag) waitRows(p, sequence, sources);
      MC_LL_PROFILE(kLlKernelDispatch, 14);
    }
    if (stage.slots > 0) {
      bulkCopyBatch(p, batch, batchFrom, batchId, stage, &parity, fp8);
    } else {
      copyBatch(p, batch, batchFrom, batchId, fp8);
    }
    __syncthreads();
  }
  MC_LL_PROFILE(kLlKernelDispatch, 15);
  if ((threadIdx.x & 31) == 0 && static_cast<int>(threadIdx.x >> 5) < stage.slots) bulkWait<0>();  // recvX written
  MC_LL_PROFILE(kLlKernelDispatch, 8);
  finishReceive(p, sequence);
  MC_LL_PROFILE(kLlKernelDispatch, 9);
}

// Developer measurement, off by default (build with -DMOECOMM_LL_EMPTY_BODY=1; results are
// wrong, bench with -c 0): the dispatch and combine kernels return at once, so their kernel-only
// time is the launch cost of these kernels' shape (grid, registers, shared memory, parameters)
// against the bench's plain empty kernel.
#ifndef MOECOMM_LL_EMPTY_BODY
#define MOECOMM_LL_EMPTY_BODY 0
#endif

template <bool kPuts, int kForms>
__global__ void __launch_bounds__(kThreads, 1) dispatchKernel(const LowLatencyParams p) {
  extern __shared__ int4 dispatchShared[];
  if (MOECOMM_LL_EMPTY_BODY && p.numBlocks > 0)
    return;  // (a run-time test: the body, its registers and shared memory stay)
  MC_LL_PROFILE(kLlKernelDispatch, 0);
  const bool fp8 = formFp8(kForms, p);
  const bool perRank = formPerRank(kForms, p);
  flushPendingReleases(p, false);
  const bool send = (p.phases & kLowLatencyPhaseSend) != 0;
  const bool receive = (p.phases & kLowLatencyPhaseReceive) != 0;
  // The send half reads the slot's sequence itself (kEarlySequence: overlapped with the ids).
  uint64_t sequence = 0;
  const int maskWord = loadMaskWord(p);
  if (send) {
    dispatchSend<kPuts>(p, sequenceWordOf(p), &sequence, maskWord, dispatchShared, fp8, perRank);
  } else {
    sequence = currentSequence(p);
    storeMaskSnapshot(p, maskWord);  // (the barrier below comes before any wait)
  }
  if (receive) {
    __syncthreads();  // the send half's shared memory is reused
    dispatchReceive(p, sequence, reinterpret_cast<int*>(dispatchShared), fp8, perRank);
  }
}

// ---- Combine send -------------------------------------------------------------------------
// Every received row goes to [t][k] of its token's rank, with a marker holding the sequence.

// Transports with puts, a warp: the combine row at `row` of peer's window and its marker.
__device__ void putCombineRow(const LowLatencyParams& p, int peer, const int4* row, int lane) {
  const uint64_t rowBytes = 2ull * p.hidden;
  const uint64_t entry =
      (reinterpret_cast<const uint8_t*>(row) - (windowSlot(p, peer) + p.combineRowsOffset)) / rowBytes;
  putRange(p, peer, p.combineRowsOffset + entry * rowBytes, rowBytes, lane, 32);
  putRange(p, peer, p.markersOffset + sizeof(uint32_t) * entry, sizeof(uint32_t), lane, 1);
}

template <bool kPuts>
__device__ void combineSend(const LowLatencyParams& p, uint64_t sequence) {
  __shared__ const int4* batchFrom[kBatchRows];
  __shared__ int4* batchTo[kBatchRows];
  __shared__ int expertStart[kLowLatencyMaxLocalExperts + 1];  // received rows before expert le
  const int L = p.localExperts;
  // The received rows, expert by expert, from the dispatch's counts (a block scan), read
  // before the targets are waited for.
  int total = 0;
  for (int first = 0; first < L; first += kThreads) {
    const int le = first + threadIdx.x;
    const int count = le < L ? max(0, p.routing.recvCount[le]) : 0;
    int chunkTotal = 0;
    const int before = blockExclusiveScan(count, &chunkTotal);
    if (le < L) expertStart[le] = total + before;
    total += chunkTotal;
  }
  if (threadIdx.x == 0) expertStart[L] = total;
  const uint32_t targets = sendTargets(p, sequence);
  MC_LL_PROFILE(kLlKernelCombine, 1);
  const int K = p.topk;
  const int slotsPerExpert = p.numRanks * p.maxTokens;
  const uint64_t rowBytes = 2ull * p.hidden;
  const int chunksPerRow = p.hidden / 8;
  // A contiguous share of the received rows per block, in batches whose addresses (and the
  // sequence markers) are worked out first.
  const int perBlock = (total + gridDim.x - 1) / gridDim.x;
  const int begin = min(total, static_cast<int>(blockIdx.x) * perBlock);
  const int end = min(total, begin + perBlock);
  const uint8_t* outputs = static_cast<const uint8_t*>(p.expertOutputs);
  MC_LL_PROFILE(kLlKernelCombine, 2);
  for (int first = begin; first < end; first += kBatchRows) {
    const int batch = min(kBatchRows, end - first);
    if (static_cast<int>(threadIdx.x) < batch) {
      // Row g of the flat order: its expert by binary search over expertStart.
      const int g = first + threadIdx.x;
      int lo = 0;
      int hi = L;  // expertStart[lo] <= g < expertStart[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (expertStart[mid] <= g) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      const int id = lo * slotsPerExpert + (g - expertStart[lo]);
      const int info = p.routing.srcInfo[id];
      const int source = info / p.maxTokens;
      int4* to = nullptr;
      if (((targets >> source) & 1u) != 0) {
        const uint64_t entry = static_cast<uint64_t>(info % p.maxTokens) * K + p.routing.firstK[id];
        uint8_t* base = windowSlot(p, source);
        to = reinterpret_cast<int4*>(base + p.combineRowsOffset + entry * rowBytes);
        reinterpret_cast<uint32_t*>(base + p.markersOffset)[entry] = static_cast<uint32_t>(sequence);
      }
      batchFrom[threadIdx.x] = reinterpret_cast<const int4*>(outputs + static_cast<uint64_t>(id) * rowBytes);
      batchTo[threadIdx.x] = to;
    }
    __syncthreads();
    const int rowsTotal = batch * chunksPerRow;
    for (int base = threadIdx.x; base < rowsTotal; base += blockDim.x * kCopyUnroll) {
      int4 values[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f < rowsTotal && batchTo[f / chunksPerRow] != nullptr) {
          values[u] = batchFrom[f / chunksPerRow][f % chunksPerRow];
        }
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int f = base + u * blockDim.x;
        if (f >= rowsTotal) continue;
        int4* to = batchTo[f / chunksPerRow];
        if (to != nullptr) to[f % chunksPerRow] = values[u];
      }
    }
    __syncthreads();
    if (kPuts && (targets & p.putPeers) != 0) {
      for (int i = threadIdx.x >> 5; i < batch; i += kWarps) {
        if (batchTo[i] == nullptr) continue;
        const int id = static_cast<int>((reinterpret_cast<const uint8_t*>(batchFrom[i]) - outputs) / rowBytes);
        putCombineRow(p, p.routing.srcInfo[id] / p.maxTokens, batchTo[i], threadIdx.x & 31);
      }
      __syncthreads();
    }
  }
  MC_LL_PROFILE(kLlKernelCombine, 3);
  finishSend(p, targets, sequence);
  MC_LL_PROFILE(kLlKernelCombine, 4);
}

// ---- Combine receive ----------------------------------------------------------------------
// Block b reduces tokens b, b + grid, ...: first the row and weight of every (token, k) of a
// round of tokens (the first round's ids and weights are loaded before the sources are waited
// for: they are the caller's), then flat over (token, 8-channel chunk), two chunks per thread
// at a time with all their rows' loads in flight, and the fmaf chain in k order.

// The whole block: for items i < count of up to J rows each (rows[i * J + j] for j <
// rowCounts[i], or j < J when rowCounts is null; nullptr rows are skipped; weights[i * J + j]),
// stores bf16(acc) with acc = fmaf(weight, row, acc) over j ascending from +0.0f into target(i)
// (a BF16 row of H channels, or nullptr for none), flat over (item, 8-channel chunk):
// kChunks chunks per thread at a time, kRows rows of each loaded before any is added, so
// kChunks * kRows loads are in flight.
template <int kChunks, int kRows, typename Target>
__device__ void reduceRows(const LowLatencyParams& p, int count, int J, const int* rowCounts, const int4* const* rows,
                           const float* weights, Target target) {
  const int chunks = p.hidden / 8;
  const int total = count * chunks;
  for (int f0 = threadIdx.x; f0 < total; f0 += kChunks * blockDim.x) {
    float acc[kChunks][8];
    int item[kChunks];
    int c[kChunks];
    int n[kChunks];
    int most = 0;
#pragma unroll
    for (int h = 0; h < kChunks; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
      const int f = f0 + h * blockDim.x;
      item[h] = min(f, total - 1) / chunks;
      c[h] = f % chunks;
      n[h] = f < total ? (rowCounts != nullptr ? rowCounts[item[h]] : J) : 0;
      most = max(most, n[h]);
    }
    for (int j0 = 0; j0 < most; j0 += kRows) {
      int4 loaded[kChunks][kRows];
#pragma unroll
      for (int h = 0; h < kChunks; ++h) {
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int4* row = j0 + u < n[h] ? rows[item[h] * J + j0 + u] : nullptr;
          loaded[h][u] = row != nullptr ? __ldcg(row + c[h]) : make_int4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int h = 0; h < kChunks; ++h) {
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (j0 + u >= n[h] || rows[item[h] * J + j0 + u] == nullptr) continue;
          uint16_t values[8];
          unpackBf16(loaded[h][u], values);
          const float weight = weights[item[h] * J + j0 + u];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[h][i] = __fmaf_rn(weight, bf16ToFloat(values[i]), acc[h][i]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kChunks; ++h) {
      if (f0 + h * static_cast<int>(blockDim.x) >= total) continue;
      int4* to = target(item[h]);
      if (to == nullptr) continue;
      uint32_t words[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        words[i] = static_cast<uint32_t>(floatToBf16(acc[h][2 * i])) |
                   (static_cast<uint32_t>(floatToBf16(acc[h][2 * i + 1])) << 16);
      }
      to[c[h]] = make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                           static_cast<int>(words[3]));
    }
  }
}

// Per-rank form (MOECOMM_LL_PER_RANK_COMBINE), send half: for every received (source, token)
// with a selection on this rank, p = bf16(fmaf chain over k ascending of weight x local expert
// row) goes to [t][this rank] of the source's slot, with a marker. The rows and weights per
// selection come from the dispatch (LowLatencyRouting::rowOf, weights); the pairs are split
// into a contiguous share per block, a round of kThreads / K pairs at a time.
// Per-rank send: chunks per thread at a time, and rows of each loaded together (a build may
// override them for a sweep: -DMOECOMM_LL_SEND_ITEMS=.. -DMOECOMM_LL_SEND_ROWS=..).
#ifndef MOECOMM_LL_SEND_ITEMS
#define MOECOMM_LL_SEND_ITEMS 2
#endif
#ifndef MOECOMM_LL_SEND_ROWS
#define MOECOMM_LL_SEND_ROWS 8
#endif
constexpr int kSendItems = MOECOMM_LL_SEND_ITEMS;
constexpr int kSendRows = MOECOMM_LL_SEND_ROWS;

template <bool kPuts>
__device__ void combineSendPerRank(const LowLatencyParams& p, uint64_t sequence) {
  __shared__ const int4* rows[kThreads];
  __shared__ float weights[kThreads];
  __shared__ int4* pairTarget[kThreads];
  __shared__ int pairRows[kThreads];                  // local selections of the pair, compacted to the front
  __shared__ int pairStart[kLowLatencyMaxRanks + 1];  // pairs of sources before s
  const int R = p.numRanks;
  const int K = p.topk;
  if (threadIdx.x == 0) {
    int pairs = 0;
    for (int s = 0; s < R; ++s) {
      pairStart[s] = pairs;
      pairs += min(max(p.routing.sourceTokens[s], 0), p.maxTokens);
    }
    pairStart[R] = pairs;
  }
  const uint32_t targets = sendTargets(p, sequence);  // syncs the block
  MC_LL_PROFILE(kLlKernelCombine, 1);
  const int total = pairStart[R];
  const int perBlock = (total + gridDim.x - 1) / gridDim.x;
  const int begin = min(total, static_cast<int>(blockIdx.x) * perBlock);
  const int end = min(total, begin + perBlock);
  const int pairsPerRound = kThreads / K;
  const int slotInRound = threadIdx.x / K;
  const int k = threadIdx.x % K;
  const uint64_t rowBytes = 2ull * p.hidden;
  const uint8_t* outputs = static_cast<const uint8_t*>(p.expertOutputs);
  auto sourceOf = [&](int pair) {
    int s = 0;
    while (pairStart[s + 1] <= pair) ++s;
    return s;
  };
  MC_LL_PROFILE(kLlKernelCombine, 2);
  for (int round = begin; round < end; round += pairsPerRound) {
    const int roundPairs = min(pairsPerRound, end - round);
    __syncthreads();  // the previous round's reduction is done with rows, weights, targets
    if (slotInRound < roundPairs) {
      const int pair = round + slotInRound;
      const int s = sourceOf(pair);
      const int4* row = nullptr;
      float weight = 0.0f;
      if (((targets >> s) & 1u) != 0) {
        const int i = ((s * p.maxTokens) + (pair - pairStart[s])) * K + k;
        const int id = p.routing.rowOf[i];
        if (id >= 0) {
          row = reinterpret_cast<const int4*>(outputs + static_cast<uint64_t>(id) * rowBytes);
          weight = p.routing.weights[i];
        }
      }
      rows[threadIdx.x] = row;
      weights[threadIdx.x] = weight;
    }
    __syncthreads();
    if (round == begin) MC_LL_PROFILE(kLlKernelCombine, 10);
    if (static_cast<int>(threadIdx.x) < roundPairs) {
      const int pair = round + threadIdx.x;
      // The pair's local selections to the front, k order kept: its loads then go out together.
      int found = 0;
      for (int j = 0; j < K; ++j) {
        const int4* row = rows[threadIdx.x * K + j];
        if (row == nullptr) continue;
        rows[threadIdx.x * K + found] = row;
        weights[threadIdx.x * K + found] = weights[threadIdx.x * K + j];
        ++found;
      }
      pairRows[threadIdx.x] = found;
      int4* to = nullptr;
      if (found > 0) {
        const int s = sourceOf(pair);
        const uint64_t entry = static_cast<uint64_t>(pair - pairStart[s]) * R + p.rank;
        uint8_t* base = windowSlot(p, s);
        to = reinterpret_cast<int4*>(base + p.combineRowsOffset + entry * rowBytes);
        reinterpret_cast<uint32_t*>(base + p.markersOffset)[entry] = static_cast<uint32_t>(sequence);
      }
      pairTarget[threadIdx.x] = to;
    }
    __syncthreads();
    if (round == begin) MC_LL_PROFILE(kLlKernelCombine, 11);
    reduceRows<kSendItems, kSendRows>(p, roundPairs, K, pairRows, rows, weights, [&](int i) { return pairTarget[i]; });
    if (round == begin) MC_LL_PROFILE(kLlKernelCombine, 12);
    if (kPuts && (targets & p.putPeers) != 0) {
      __syncthreads();
      for (int i = threadIdx.x >> 5; i < roundPairs; i += kWarps) {
        if (pairTarget[i] != nullptr) putCombineRow(p, sourceOf(round + i), pairTarget[i], threadIdx.x & 31);
      }
    }
  }
  MC_LL_PROFILE(kLlKernelCombine, 3);
  finishSend(p, targets, sequence);
  MC_LL_PROFILE(kLlKernelCombine, 4);
}

// Receive half, both forms. Per token, J rows: one per selection k (default: the expert's row
// at [t][first k naming it], weight w_k), or one per expert rank r (per-rank form: the partial
// at [t][r], weight 1, and fmaf(1, p, acc) is exactly acc + p). A row is used only when its
// rank is present and its marker holds this operation (else the rank did not receive the
// token: it had masked this rank).

// The slot entry of row j of a token (its ids tokenIds[0..K)), or -1 when the row does not exist
// or its rank is not in `sources`.
__device__ __forceinline__ int receiveEntry(const LowLatencyParams& p, const int* tokenIds, int t, int j, bool perRank,
                                            uint32_t sources) {
  const int K = p.topk;
  if (perRank) {
    // j is the expert rank: present if one selection names one of its experts.
    bool present = false;
    for (int i = 0; i < K && !present; ++i) present = tokenIds[i] >= 0 && tokenIds[i] / p.localExperts == j;
    return present && ((sources >> j) & 1u) != 0 ? t * p.numRanks + j : -1;
  }
  const int expert = tokenIds[j];
  if (expert < 0 || ((sources >> (expert / p.localExperts)) & 1u) == 0) return -1;
  int first = j;
  for (int i = 0; i < j; ++i) {
    if (tokenIds[i] == expert) {
      first = i;
      break;
    }
  }
  return t * K + first;
}

__device__ void combineReceive(const LowLatencyParams& p, uint64_t sequence, bool perRank) {
  __shared__ const int4* rows[kThreads];
  __shared__ float weights[kThreads];
  __shared__ int ids[kThreads];
  const int K = p.topk;
  const int R = p.numRanks;
  const int T = p.numTokens;
  const int J = perRank ? R : K;
  const int W = max(K, J);  // threads per token: one per id, and one per row
  const int tokensPerRound = kThreads / W;
  const int myTokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  const int slotInRound = threadIdx.x / W;
  const int k = threadIdx.x % W;
  const bool rowThread = slotInRound < tokensPerRound && k < J;
  const uint8_t* mine = mySlot(p);
  const uint32_t* markers = reinterpret_cast<const uint32_t*>(mine + p.markersOffset);
  const uint64_t rowBytes = 2ull * p.hidden;
  // ids[] (and, default form, weights[]) of the round starting at token `round`.
  auto loadRound = [&](int round) {
    if (slotInRound >= tokensPerRound || k >= K) return;
    const int j = round + slotInRound;
    const bool mapped = j < myTokens;
    const int64_t base = static_cast<int64_t>(blockIdx.x + j * gridDim.x) * K;
    int64_t expert = mapped ? loadExpertId(p.topkIdx, p.topkIdxIs64, base + k) : -1;
    if (expert < -1 || expert >= p.numExperts) expert = -1;
    ids[threadIdx.x] = static_cast<int>(expert);
    if (!perRank) weights[threadIdx.x] = mapped && expert >= 0 ? p.topkWeights[base + k] : 0.0f;
  };
  // Row threads: rows[] and weights[] of the round (after its ids[] are stored), for `sources`.
  auto markRound = [&](int round, uint32_t sources) {
    if (!rowThread) return;
    const int j = round + slotInRound;
    const int t = blockIdx.x + j * gridDim.x;
    const int entry = j < myTokens ? receiveEntry(p, ids + slotInRound * W, t, k, perRank, sources) : -1;
    const bool marked = entry >= 0 && __ldcg(markers + entry) == static_cast<uint32_t>(sequence);
    rows[slotInRound * J + k] =
        marked ? reinterpret_cast<const int4*>(mine + p.combineRowsOffset + static_cast<uint64_t>(entry) * rowBytes)
               : nullptr;
    if (perRank) weights[slotInRound * J + k] = 1.0f;
  };
  if (myTokens > 0) loadRound(0);
  const auto flagsOf = [&](int r) { return sentFlags(p, r); };
  const RanksWaited waited = waitAll(p, sequence, flagsOf);
  MC_LL_PROFILE(kLlKernelCombine, 18);
  const uint32_t sources = decideSources(p, sequence, waited, flagsOf, [] {});
  MC_LL_PROFILE(kLlKernelCombine, 19);
  MC_LL_PROFILE(kLlKernelCombine, 5);
  for (int round = 0; round < myTokens; round += tokensPerRound) {
    if (round > 0) {
      __syncthreads();
      loadRound(round);
      __syncthreads();
    }
    markRound(round, sources);
    __syncthreads();
    if (round == 0) MC_LL_PROFILE(kLlKernelCombine, 6);
    const int roundTokens = min(tokensPerRound, myTokens - round);
    reduceRows<2, 8>(p, roundTokens, J, nullptr, rows, weights, [&](int i) {
      const int t = blockIdx.x + (round + i) * gridDim.x;
      return reinterpret_cast<int4*>(static_cast<uint8_t*>(p.out) + static_cast<uint64_t>(t) * p.hidden * 2);
    });
  }
  MC_LL_PROFILE(kLlKernelCombine, 8);
  finishReceive(p, sequence);
  MC_LL_PROFILE(kLlKernelCombine, 9);
}

template <bool kPuts, int kForms>
__global__ void __launch_bounds__(kThreads) combineKernel(const LowLatencyParams p) {
  if (MOECOMM_LL_EMPTY_BODY && p.numBlocks > 0)
    return;  // (a run-time test: the body, its registers and shared memory stay)
  MC_LL_PROFILE(kLlKernelCombine, 0);
  storeMaskSnapshot(p, loadMaskWord(p));  // (every wait starts with a barrier)
  flushPendingReleases(p, false);
  const bool perRank = formPerRank(kForms, p);
  const bool send = (p.phases & kLowLatencyPhaseSend) != 0;
  const uint64_t sequence = currentSequence(p) + (send ? 1 : 0);
  if (send && perRank) {
    combineSendPerRank<kPuts>(p, sequence);
  } else if (send) {
    combineSend<kPuts>(p, sequence);
  }
  if ((p.phases & kLowLatencyPhaseReceive) != 0) {
    __syncthreads();
    combineReceive(p, sequence, perRank);
  }
}

// Receives nothing but waits like a receive half (every unmasked source's flags of this
// operation, a failed call's counting), since a released flag that came before a peer's send
// half would read as "moved on" there; then releases every block's flag. One block.
__device__ void releaseSlot(const LowLatencyParams& p, uint64_t sequence) {
  const RanksWaited waited = waitAll(p, sequence, [&](int r) { return sentFlags(p, r); });
  maskAllBut(p, waited.arrived | waited.failed);
  __syncthreads();
  for (int i = threadIdx.x; i < p.numRanks * p.numBlocks; i += blockDim.x) {
    signalFlag(p, i / p.numBlocks, p.releasedOffset, i % p.numBlocks, sequence);
  }
}

__global__ void __launch_bounds__(kThreads) releaseKernel(const LowLatencyParams p) {
  storeMaskSnapshot(p, loadMaskWord(p));
  releaseSlot(p, currentSequence(p));
}

// A call that failed on this rank before its kernel ran: the operation is consumed like a
// sent one, with every block's sent flag carrying kFailedBit (kAbsentBit for masked ranks),
// and then released like an abandoned one. One block.
__global__ void __launch_bounds__(kThreads) failedKernel(const LowLatencyParams p) {
  storeMaskSnapshot(p, loadMaskWord(p));
  flushPendingReleases(p, true);
  const uint64_t sequence = currentSequence(p) + 1;
  const uint32_t targets = sendTargets(p, sequence);
  for (int i = threadIdx.x; i < p.numRanks * p.numBlocks; i += blockDim.x) {
    const int r = i / p.numBlocks;
    const bool target = ((targets >> r) & 1u) != 0;
    if (target || r != p.rank) {
      // Both kinds: a dispatch's receivers agree on the listed flags (kOneFlag off) or the
      // sent ones, a combine's on the sent.
      const uint64_t value = sequence | (target ? kFailedBit : kAbsentBit);
      signalFlag(p, r, p.listedOffset, i % p.numBlocks, value);
      signalFlag(p, r, p.sentOffset, i % p.numBlocks, value);
    }
  }
  if (threadIdx.x == 0) p.state->slotSequence[p.slot] = sequence;
  releaseSlot(p, sequence);
}

}  // namespace

bool lowLatencyDeferredRelease() { return kDeferredRelease; }

int lowLatencyProfile(int kernel, int blocks, unsigned long long* out) {
#ifdef MOECOMM_KERNEL_PROFILE
  if (kernel < 0 || kernel >= kLowLatencyKernels || blocks > kProfileBlocks) return -1;
  const size_t row = sizeof(unsigned long long) * kLowLatencyProfileEvents;
  const cudaError_t err =
      cudaMemcpyFromSymbol(out, gLowLatencyProfile, row * blocks, row * kProfileBlocks * static_cast<size_t>(kernel));
  return err == cudaSuccess ? kLowLatencyProfileEvents : -1;
#else
  (void)kernel;
  (void)blocks;
  (void)out;
  return -1;
#endif
}

uint64_t lowLatencyDispatchSendSharedBytes(const LowLatencyParams& params) {
  return (static_cast<uint64_t>(params.maxTokens) * sizeof(uint32_t) + 15) / 16 * 16;
}

#if MOECOMM_LL_SPLIT_FORMS
// The dispatch kernels' forms (each also with and without puts).
constexpr int kDispatchForms[] = {kFormFp8 | kFormPerExpert, kFormFp8 | kFormPerRank, kFormBf16 | kFormPerExpert,
                                  kFormBf16 | kFormPerRank};

// The forms of a launch.
static int launchForms(const LowLatencyParams& params) {
  return (params.fp8 != 0 ? kFormFp8 : kFormBf16) | (params.perRank != 0 ? kFormPerRank : kFormPerExpert);
}
#endif

template <int kForms>
void addDispatchKernels(std::vector<const void*>* kernels) {
  kernels->push_back(reinterpret_cast<const void*>(dispatchKernel<false, kForms>));
  kernels->push_back(reinterpret_cast<const void*>(dispatchKernel<true, kForms>));
}

// Every dispatch kernel a launch may use (for the per-kernel attributes).
static std::vector<const void*> dispatchKernels() {
  std::vector<const void*> kernels;
#if MOECOMM_LL_SPLIT_FORMS  // (the preprocessor, so that builds with the switch off instantiate one kernel)
  addDispatchKernels<kDispatchForms[0]>(&kernels);
  addDispatchKernels<kDispatchForms[1]>(&kernels);
  addDispatchKernels<kDispatchForms[2]>(&kernels);
  addDispatchKernels<kDispatchForms[3]>(&kernels);
#else
  addDispatchKernels<0>(&kernels);
#endif
  return kernels;
}

int allowLowLatencySharedMemory(uint64_t maxDynamicSharedBytes) {
  // The attribute is per kernel and process-wide: always the same (largest) value, so EPs of
  // different shapes never lower it under one another.
  for (const void* kernel : dispatchKernels()) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(maxDynamicSharedBytes));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int64_t lowLatencyDispatchStaticSharedBytes() {
  int64_t most = 0;
  for (const void* kernel : dispatchKernels()) {
    cudaFuncAttributes attributes{};
    if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) return -1;
    most = std::max(most, static_cast<int64_t>(attributes.sharedSizeBytes));
  }
  return most;
}

uint64_t lowLatencyDispatchRecvSharedBytes(const LowLatencyParams& params) {
  return lowLatencyItemStartBytes(params.numRanks, params.localExperts) + kBulkSlotsMax * sizeof(uint64_t) +
         lowLatencyBulkStageBytes(params.hidden);
}

template <int kForms>
void launchDispatch(const LowLatencyParams& params, uint64_t shared, CUstream_st* stream) {
  if (params.putPeers != 0) {
    dispatchKernel<true, kForms><<<params.numBlocks, kThreads, shared, stream>>>(params);
  } else {
    dispatchKernel<false, kForms><<<params.numBlocks, kThreads, shared, stream>>>(params);
  }
}

int launchLowLatencyDispatch(const LowLatencyParams& params, CUstream_st* stream) {
  uint64_t shared = 0;
  if ((params.phases & kLowLatencyPhaseSend) != 0) shared = lowLatencyDispatchSendSharedBytes(params);
  if ((params.phases & kLowLatencyPhaseReceive) != 0) {
    const uint64_t receive = lowLatencyDispatchRecvSharedBytes(params);
    if (receive > shared) shared = receive;
  }
#if MOECOMM_LL_SPLIT_FORMS
  switch (launchForms(params)) {
    case kDispatchForms[0]:
      launchDispatch<kDispatchForms[0]>(params, shared, stream);
      break;
    case kDispatchForms[1]:
      launchDispatch<kDispatchForms[1]>(params, shared, stream);
      break;
    case kDispatchForms[2]:
      launchDispatch<kDispatchForms[2]>(params, shared, stream);
      break;
    default:
      launchDispatch<kDispatchForms[3]>(params, shared, stream);
      break;
  }
#else
  launchDispatch<0>(params, shared, stream);
#endif
  return static_cast<int>(cudaGetLastError());
}

template <int kForms>
void launchCombine(const LowLatencyParams& params, CUstream_st* stream) {
  if (params.putPeers != 0) {
    combineKernel<true, kForms><<<params.numBlocks, kThreads, 0, stream>>>(params);
  } else {
    combineKernel<false, kForms><<<params.numBlocks, kThreads, 0, stream>>>(params);
  }
}

int launchLowLatencyCombine(const LowLatencyParams& params, CUstream_st* stream) {
  // The combine's kernel depends on the form only (its rows are BF16).
#if MOECOMM_LL_SPLIT_FORMS
  if ((launchForms(params) & kFormPerRank) != 0) {
    launchCombine<kFormPerRank>(params, stream);
  } else {
    launchCombine<kFormPerExpert>(params, stream);
  }
#else
  launchCombine<0>(params, stream);
#endif
  return static_cast<int>(cudaGetLastError());
}

int launchLowLatencyRelease(const LowLatencyParams& params, CUstream_st* stream) {
  releaseKernel<<<1, kThreads, 0, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

int launchLowLatencyFailed(const LowLatencyParams& params, CUstream_st* stream) {
  failedKernel<<<1, kThreads, 0, stream>>>(params);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace device
}  // namespace moecomm
