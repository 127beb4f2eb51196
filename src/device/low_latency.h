// Low-latency (decode) EP over NVLink: the plain-data parameters the kernels of
// device/low_latency.cu see, and their launchers. The host object that fills them is
// ep/ep_cuda_ll.{h,cc}; docs/ep-low-latency-gpu.md explains the protocol.
//
// Symmetric buffer of every rank (offsets from its base, identical on every rank):
//   sent      uint64 [2 slots][R source][B blocks]: block b of source s release-stores the
//             sequence of the operation whose send half it finished into sent[slot][s][b] of
//             every rank it sent to (B = numBlocks, the same on every rank);
//   released  uint64 [2 slots][R reader][B]: block b of rank d release-stores the sequence
//             whose receive half it finished into released[slot][d][b] of every rank: once all
//             B flags of d hold it, d's slot may be rewritten;
//   listed    uint64 [2 slots][R source][B]: like sent, for a dispatch's first part only (T,
//             counts, lists, ids and weights: everything but the rows), stored before the
//             block sends its rows; only with the developer switch MOECOMM_LL_ONE_FLAG=0 (by
//             default the sent flags cover the lists too), and by the failed-call kernel;
//   slot regions, kLowLatencyDeviceSlots of slotBytes each. A dispatch uses:
//             tokens  int [R source]: T of each source, with the source's row format in
//                     bits kLowLatencyFormatShift.. (lowLatencyFormat);
//             counts  int [R source][E_local]: how many of the source's tokens select each
//                     local expert;
//             lists   int [R source][E_local][maxT]: those tokens, ascending, as t * 32 + the
//                     first k of the token's row naming the expert;
//             topk    int32 [R source][maxT][K]: each source's expert ids (-1 for bad ones) and
//             weights float [R source][maxT][K]: its weights (both per-rank combine only);
//             rows    [R source][maxT] rows of rowPitch bytes: each token once per destination
//                     rank (FP8 e4m3 bytes [H] then FP32 scales [H/128], or BF16 [H]);
//           and a combine uses the same bytes as:
//             rows    [maxT token][K] BF16 rows of 2H bytes: expert output of (t, k), where k
//                     is the first entry of the token's row that names that expert; or, for a
//                     per-rank combine, [maxT token][R expert rank] BF16 partial sums;
//             markers uint32 [maxT][max(K, R)] (never overlaid): low 32 bits of the sequence
//                     that wrote the row.
// Sequences are per slot and live on the device (LowLatencyState::slotSequence): the send
// half of an operation uses slotSequence + 1 and stores it, the receive half reads it. A
// graph replay therefore continues the count, and every rank computes the same number for
// the same operation as long as all make the same calls.
#pragma once

#include <cstdint>

#include "core/host_device.h"

struct CUstream_st;

namespace moecomm {
namespace device {

constexpr int kLowLatencyMaxRanks = 32;  // ranks are bits of a uint32 in the kernels
constexpr int kLowLatencyDeviceSlots = 2;
constexpr int kLowLatencyThreads = 512;
constexpr int kLowLatencyMaxLocalExperts = 1024;  // the combine keeps a prefix per local expert

// What one launch runs (LowLatencyParams::phases): the send half, the receive half, or both
// (one kernel when the call is not send-only).
constexpr int kLowLatencyPhaseSend = 1;
constexpr int kLowLatencyPhaseReceive = 2;

// Kernels, for the developer timeline (lowLatencyProfile).
constexpr int kLlKernelDispatch = 0;
constexpr int kLlKernelCombine = 1;
constexpr int kLowLatencyKernels = 2;
// Events: 0 entry, 1 targets known, 2 send preamble done (dispatch: T, ids, lists and, with
// MOECOMM_LL_ONE_FLAG=0, their listed flags), 3 send data stored, 4 sent flags stored, 5 sources
// agreed, 6 receive preamble done, 7 rows placed (dispatch; with MOECOMM_LL_ONE_FLAG=0 the rows'
// flags are waited for after it), 8 data consumed, 9 released flags stored; finer points of the
// dispatch: 10 token ranks computed, 11 T and ids stored, 12 lists stored, 13 counts read, 14
// rows' flags seen (MOECOMM_LL_ONE_FLAG=0; otherwise right after 7), 15 copies issued (before the
// end's wait for them; 8 is after it), 16 lists' first pass done, 17 lists' scan done (16 and 17
// of the block's last window of list items); in both kernels: 18 sources' flags waited for, 19
// sources decided, after decideSources' last barrier (with MOECOMM_LL_OVERLAP_AGREEMENT, the
// loads overlapped with the decision issued); then (not times) the SM clock at events 0 and 9 (slots
// kLowLatencyProfileTimes and + 1).
constexpr int kLowLatencyProfileTimes = 20;
constexpr int kLowLatencyProfileEvents = kLowLatencyProfileTimes + 2;

// The row format a dispatch's sender and receivers must agree on, sent with T (T uses the bits
// below kLowLatencyFormatShift, so maxTokensPerRank < 2^28): FP8 rows, power-of-two scales
// (MOECOMM_LL_ROUND_SCALE or UE8M0), the per-rank combine's ids and weights. A receiver
// treats a source whose format differs as absent for the operation and reports
// moecommInvalidArgument (the peers in LowLatencyParams::hostFormatPeers).
constexpr int kLowLatencyFormatShift = 28;
MC_HOST_DEVICE inline int lowLatencyFormat(int fp8, int roundScale, int perRank) {
  return (fp8 != 0 ? 1 : 0) | (roundScale != 0 ? 2 : 0) | (perRank != 0 ? 4 : 0);
}

// Device memory private to one rank (not in the symmetric buffer).
struct LowLatencyState {
  uint64_t slotSequence[kLowLatencyDeviceSlots];
  // Blocks whose send half finished, per slot; the last one stores slotSequence and resets it.
  unsigned int blocksDone[kLowLatencyDeviceSlots];
  // The receive halves' agreement on each source, per slot: (sequence << 2) | 1 present or 2
  // absent. The first block to decide wins (atomicCAS); the others follow it.
  unsigned long long decision[kLowLatencyDeviceSlots][kLowLatencyMaxRanks];
  int rankMask[kLowLatencyMaxRanks];  // != 0: masked (the host's mask, plus timeouts)
};

// One dispatch's routing on its receiving rank, kept for the combine (device arrays of a
// handle; S = R * maxT rows per local expert).
struct LowLatencyRouting {
  int* recvCount;   // [E_local]
  int* srcInfo;     // [E_local, S]: source rank * maxT + source token
  uint8_t* firstK;  // [E_local, S]: first k of the source token's row naming this expert
  // Per-rank combine only (MOECOMM_LL_PER_RANK_COMBINE), indexed [R source][maxT][K]:
  int* rowOf;         // le * S + slot of selection (s, t, k) if its expert is local, else -1
  float* weights;     // the source's weight of selection (s, t, k)
  int* sourceTokens;  // [R]: T of each source the dispatch received (0: absent)
};

struct LowLatencyParams {
  // Shape.
  int rank;
  int numRanks;
  int numExperts;
  int localExperts;
  int hidden;
  int topk;
  int maxTokens;
  int numBlocks;  // grid size of every kernel (the SM budget, agreed by every rank)
  uint64_t timeoutNs;

  // Symmetric buffer and the transport (device/ll_transport.cuh): the kernels store bytes bound
  // for rank r's slot at windows[r] + slot start + offset and make them travel with a put when
  // bit r of putPeers is set (staged: windows[r] is a local mirror of r's buffer); flags go to
  // peers[r] directly.
  uint8_t* peers[kLowLatencyMaxRanks];  // every rank's buffer as mapped here
  uint8_t* windows[kLowLatencyMaxRanks];
  uint32_t putPeers;
  uint64_t sentOffset;
  uint64_t releasedOffset;
  uint64_t listedOffset;
  uint64_t slotOffset;
  uint64_t slotBytes;
  uint64_t tokensOffset;  // inside a slot
  uint64_t listCountsOffset;
  uint64_t listsOffset;
  uint64_t topkOffset;
  uint64_t weightsOffset;
  uint64_t rowsOffset;
  uint64_t rowPitch;  // dispatch staging row: 2H bytes (an FP8 row and its scales fit)
  uint64_t combineRowsOffset;
  uint64_t markersOffset;

  LowLatencyState* state;
  // [2 slots][numBlocks] (MOECOMM_LL_DEFERRED_RELEASE builds only, else null): the sequence
  // whose released flags a receive half left to the next low-latency kernel, 0 for none.
  uint64_t* pendingReleased;
  volatile int* hostMasked;  // mapped host [R]: set to 1 when a kernel masks a rank
  int* hostError;            // mapped host [1]: first error code (bad expert id)
  int* hostFormatPeers;      // mapped host [1]: bit s set when source s sent another row format

  // The call.
  int phases;  // kLowLatencyPhase* bits
  int slot;
  int numTokens;  // this rank's T
  const void* topkIdx;
  int topkIdxIs64;
  int perRank;  // MOECOMM_LL_PER_RANK_COMBINE: the dispatch keeps weights and rows per selection
  LowLatencyRouting routing;
  // Dispatch.
  const void* x;  // [T, H] BF16
  int fp8;
  int roundScale;
  int ue8m0;
  void* recvX;
  void* recvScales;
  int* recvCount;
  int* recvSrcInfo;
  int* cumulativeRecvStats;
  // Combine.
  const void* expertOutputs;  // [E_local, S, H] BF16
  const float* topkWeights;   // [T, K]: the combine's (default form) or the dispatch's (per rank)
  void* out;                  // [T, H] BF16
};

// Dynamic shared memory of the dispatch kernel: the send half keeps a destination mask per
// token, the receive half where each (local expert, source) item's rows start. The kernel
// takes the larger of the two.
uint64_t lowLatencyDispatchSendSharedBytes(const LowLatencyParams& params);
// The receive half's bulk-copy slots: as many BF16 rows (2H bytes) as fit in 96 KiB, at most
// one per warp (0 when a row is larger: the receive then copies through registers).
MC_HOST_DEVICE inline uint64_t lowLatencyBulkStageBytes(int hidden) {
  const uint64_t unit = 2ull * static_cast<uint64_t>(hidden);
  const uint64_t slots = unit == 0 ? 0 : 96ull * 1024 / unit;
  return (slots < kLowLatencyThreads / 32 ? slots : kLowLatencyThreads / 32) * unit;
}
uint64_t lowLatencyDispatchRecvSharedBytes(const LowLatencyParams& params);

// Each runs the halves params.phases names and returns a cudaError_t value (0 = success) so
// callers need no CUDA header.
int launchLowLatencyDispatch(const LowLatencyParams& params, CUstream_st* stream);
int launchLowLatencyCombine(const LowLatencyParams& params, CUstream_st* stream);
// For a send half whose receive half will never run (its handle was destroyed): waits for the
// operation's sent flags like a receive half, then stores this rank's released flags of
// params.slot on every rank without reading anything, so that neither this rank nor its peers
// time out on the slot.
int launchLowLatencyRelease(const LowLatencyParams& params, CUstream_st* stream);
// For a call that failed on this rank before its kernel was launched (bad arguments, a failed
// launch): consumes operation slotSequence + 1 of params.slot all the same. Its sent flags on
// every rank say "failed" (the peers treat this rank as absent for the operation, without
// masking it, and report moecommRemoteError), and once every peer's send half has arrived it
// releases the slot like launchLowLatencyRelease. One block; bounded waits.
int launchLowLatencyFailed(const LowLatencyParams& params, CUstream_st* stream);
// Whether the kernels were built with the MOECOMM_LL_DEFERRED_RELEASE experiment (then the host
// allocates LowLatencyParams::pendingReleased; otherwise it stays null).
bool lowLatencyDeferredRelease();
// Raises the dispatch kernel's dynamic shared memory limit (needed beyond 48 KiB). Pass the
// same value every time (the device's opt-in maximum less the kernel's static shared memory).
int allowLowLatencySharedMemory(uint64_t maxDynamicSharedBytes);
// The dispatch kernel's static shared memory in bytes, or -1 (a cudaError_t is then pending).
int64_t lowLatencyDispatchStaticSharedBytes();
// Developer timeline of the last call of `kernel` for `blocks` blocks: fills
// out[blocks][kLowLatencyProfileEvents] with global-timer stamps and returns the event count, or
// -1 when the library was built without -DMOECOMM_KERNEL_PROFILE.
int lowLatencyProfile(int kernel, int blocks, unsigned long long* out);

}  // namespace device
}  // namespace moecomm
