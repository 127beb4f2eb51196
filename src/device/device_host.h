// Plain-data parameter structs shared by the host launchers and the CUDA kernels. Kernels
// never see C++ objects from the rest of the library, only these.
#pragma once

#include <cstdint>

namespace moecomm {
namespace device {

struct LayoutParams {
  const void* topkIdx;  // [numTokens, topk] int32 or int64
  int topkIdxIs64;      // 1: int64, 0: int32
  int numTokens;
  int topk;
  int numExperts;
  int numRanks;
  int* tokensPerRank;      // [numRanks] or nullptr
  int* tokensPerExpert;    // [numExperts] or nullptr
  uint8_t* isTokenInRank;  // [numTokens, numRanks] or nullptr
  // Device int, 0 on entry: set to 1 + (t * topk + k) of the first entry found outside
  // [-1, numExperts); the host reads it to report the bad id.
  int* badEntry;
};

// Intranode normal-mode EP (intranode.cu). One struct for every kernel of the family; the
// fields a kernel does not use are ignored.
//
// Channels: a call's tokens are split into numChannels contiguous ranges, one per block of
// the grid (grid size = numChannels = the SM budget). In every block half the warps send and
// half receive, so pushing rows over NVLink and copying them out of the staging area overlap.
//
// Symmetric buffer of every rank (offsets from its base, identical on every rank):
//   ctrl     uint64 [9 kinds: count (even sequence), tail, ack, count (odd sequence), the
//                   direct paths' first row and rows held (even, then odd sequence), and the
//                   balanced dispatch's block tails]
//                   [3 ops: notify, dispatch, combine][C][R]
//            count[op][c][s]: written by source s's channel c: (tag << 32) | rows it sends;
//                             double-buffered by the sequence's parity (see countWord)
//            tail[op][c][s]:  written by source s's channel c: (tag << 32) | rows written so far
//            ack[op][c][d]:   written by destination d's channel c: the last sequence it consumed
//   experts  int [2 ops: notify, dispatch][2 parities][R source][C][E/R]: per-local-expert counts
//   dispatch staging [R source][C * chunkRows] rows of dispatchRowBytes
//   combine staging  [R source][C * chunkRows] rows of combineRowBytes
// where tag is the low 32 bits of the call's sequence number, kept on the device (EpState)
// so that a CUDA graph replays correctly.
constexpr int kOpNotify = 0;
constexpr int kOpDispatch = 1;
constexpr int kOpCombine = 2;
constexpr int kOps = 3;
// Developer timelines (intranodeProfile) also keep the last dispatch that computed its routing
// (a new handle) apart from the last dispatch of any kind.
constexpr int kProfileDispatchRouted = kOps;
// Control word kinds per (op, channel, rank) in the symmetric buffer: count (even and odd
// sequence), tail, ack, the direct paths' first row and rows held (even and odd sequence), and
// the balanced dispatch's block tails (intranode.cu).
constexpr int kCtrlKinds = 9;

// Developer variants of the normal-mode receivers (MOECOMM_EP_DISPATCH_VARIANT,
// MOECOMM_EP_COMBINE_VARIANT; docs/ep-normal-gpu.md, "Variants"). 0 is the default kernel.
constexpr int kDispatchVariantRegisters = 0;  // lanes copy rows out through registers
constexpr int kDispatchVariantBulk = 1;       // bulk copies staging -> shared ring -> output
constexpr int kDispatchVariantPrefetch = 2;   // senders prefetch rows into a shared ring by bulk copies
constexpr int kDispatchVariantBulkSend = 3;   // as 2, and the senders store rows by bulk copies too
constexpr int kDispatchVariants = 4;
// The dispatch variants whose sending warps keep a ring of staged rows in shared memory.
constexpr bool dispatchSendersUseRing(int variant) {
  return variant == kDispatchVariantPrefetch || variant == kDispatchVariantBulkSend;
}
constexpr int kCombineVariantRegisters = 0;  // 4 chunks x 2 ranks of 16 bytes in flight per lane
constexpr int kCombineVariantDeep = 1;       // every rank's row in one pass (R <= 8, no bias; else 0)
constexpr int kCombineVariantBulk = 2;       // bulk copies into a shared ring, reduced from shared memory
constexpr int kCombineVariants = 3;

// Device-resident per-EP state.
struct EpDeviceState {
  unsigned long long sequence[kOps];  // last completed call per op
  unsigned int finishedBlocks[kOps];  // blocks of the running call that finished
  unsigned int abort;                 // set on the first timeout: later waits give up at once
  unsigned int dispatchClaim;         // balanced dispatch: the next token a sending warp claims
};

// Mapped host words of the EP (written by kernels, read by the host).
struct EpHostWords {
  int error;      // first error code (moecommResult_t) recorded by any kernel
  int badEntry;   // layout: 1 + index of the first bad top-k entry
  int errorPeer;  // the rank waited for when a wait timed out
  int errorChannel;
  int errorOp;
  int notify[1];  // notify: [1 + E/R] total rows and raw per-local-expert sums
};

struct IntranodeParams {
  uint8_t* const* peers;  // device array [R]: every rank's symmetric buffer, as this rank maps it
  EpDeviceState* state;
  EpHostWords* host;  // mapped
  int rank;
  int numRanks;
  int numExperts;
  int hidden;
  int topk;
  int maxTokens;
  int numChannels;  // grid size (the SM budget)
  int chunkRows;    // staging rows per (source, channel): ceil(maxTokens / numChannels)
  uint64_t ctrlOffset;
  uint64_t expertsOffset;
  uint64_t dispatchOffset;
  uint64_t dispatchRowBytes;
  uint64_t combineOffset;
  uint64_t combineRowBytes;
  // Offsets inside a dispatch row of this call (they depend on the dtype):
  // [x][scales (FP8)][idx int64, idxStride][weights f32 K, 16-byte padded][source token int];
  // rowExtent = the bytes a row occupies (a multiple of 16).
  uint64_t rowScalesOffset;
  uint64_t rowIdxOffset;
  uint64_t rowWeightsOffset;
  uint64_t rowSrcOffset;
  uint64_t rowExtent;
  int idxStride;             // int64 per token in handleIdx: topk rounded up to even (16-byte rows)
  uint64_t sharedIntsBytes;  // dynamic shared memory of the dispatch and combine kernels (int tables)
  // Fixed when the EP is created (environment): the tail batch, how many of a block's 16 warps
  // send (the rest receive), the receivers' variants, and the shared-memory ring of the bulk-copy variants
  // (ringStages stages of ringStageBytes per receiving warp, after the int tables).
  int sendBatch;     // a dispatch sending channel publishes its tail every this many tokens
  int combineBatch;  // a combine sending channel, every this many ordinals (after its ramp)
  int dispatchSendWarps;
  int combineSendWarps;
  int dispatchVariant;
  int combineVariant;
  int pull;  // MOECOMM_EP_PULL: bit 0 dispatch, bit 1 combine (see exchangeRow)
  int ringStages;
  int ringStageBytes;
  int cluster;         // MOECOMM_EP_CLUSTER: dispatch and combine in clusters of this many blocks (1: plain)
  uint64_t timeoutNs;  // bound of every spin-wait

  // The handle's device routing.
  int64_t* handleIdx;  // [maxT, idxStride] normalized expert ids (-1: none)
  int* pos;            // [maxT, R]: ordinal of token t among its channel's tokens for rank r, -1 if not sent
  int* chanCount;      // [C, R]: tokens of channel c sent to rank r
  int* chanExpert;     // [C, E]: selections of channel c's tokens per expert
  int* selfToken;      // [C, chunkRows]: token of each ordinal a channel sends to this rank itself
  int* recvOffset;     // [R, C]: first received row of (source, channel)
  int* recvCount;      // [R, C]: rows received from (source, channel)
  int* srcRank;        // [R * maxT] per received row
  int* srcIndex;       // [R * maxT]
  int* numRecv;        // [1]

  // Dispatch call.
  int numTokens;
  int xIsFp8;
  const void* x;
  const float* xScales;
  const void* topkIdx;
  int topkIdxIs64;
  const float* topkWeights;
  int alignment;
  int recvCapacity;
  void* recvX;
  float* recvXScales;
  void* recvTopkIdx;
  float* recvTopkWeights;
  int* outNumRecv;
  int* outPerExpert;
  int route;  // 1: compute the routing from topkIdx first
  // Direct dispatch (docs/ep-normal-gpu.md): every rank's recvX lies in one moecommMemAlloc
  // allocation at the same offset, so senders store x rows straight into the destination's
  // recvX (the rest of a row still goes through the staging area).
  int dispatchDirect;
  // A dispatch with this handle ran before (launched outside stream capture, so recvOffset /
  // recvCount hold its layout by the time this kernel runs): the direct dispatch's receivers
  // tell the sources where their rows go at once instead of after the count exchange.
  int spansKnown;
  // Balanced dispatch (MOECOMM_EP_BALANCED_DISPATCH; a direct dispatch only): the sending warps
  // of every block claim the rank's tokens one at a time from a counter (EpDeviceState), so a
  // block on an SM that pushes slowly sends fewer rows; a row's small parts go to the staging
  // slot of its (source, channel, ordinal) as in the unbalanced dispatch, and a receiver copies
  // them out once every block of the source published its block tail.
  int dispatchBalanced;
  void* const* recvXPeers;  // device table [R]: the allocation holding recvX, as this rank maps it
  uint64_t recvXOffset;
  // Pulled dispatch (MOECOMM_EP_DISPATCH_PULL_X; docs/ep-normal-gpu.md): every rank's x lies in
  // one moecommMemAlloc allocation at the same offset, so the senders push only each row's
  // small parts and the receivers read the x rows from the source's x; a sending channel ends
  // only when every destination acked the call (its x may change after that).
  int dispatchPullX;
  void* const* xPeers;  // device table [R]: the allocation holding x, as this rank maps it
  uint64_t xOffset;

  // Combine call.
  const void* combineX;
  const float* combineWeights;
  const void* bias;
  void* combinedX;
  float* combinedWeights;
  // Direct combine (docs/ep-normal-gpu.md): every rank's combineX, and its combineWeights
  // unless no rank passed any, lie in one moecommMemAlloc allocation at the same offset, so
  // the reducers read the peers' rows where they are and nothing is staged.
  int combineDirect;
  void* const* combinePeerX;  // device table [R]: the allocation holding combineX, as this rank maps it
  uint64_t combineXOffset;
  void* const* combinePeerWeights;  // likewise for combineWeights; nullptr: no rank passed weights
  uint64_t combineWeightsOffset;
};

}  // namespace device
}  // namespace moecomm
