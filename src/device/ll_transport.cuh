// How the low-latency kernels reach their peers: the transport interface (issue 4, point 6).
// The kernels (device/low_latency.cu) never store into a peer's memory on their own; they use
// three operations, and a transport decides what each one does, per peer:
//
//   windowSlot(p, peer) where this rank stores bytes bound for the current slot of `peer`'s
//                       symmetric buffer, at the same offsets they will have there;
//   putRange(...)       makes a finished range of that window travel to the peer (called by a
//                       group of threads after the stores it covers, e.g. after a barrier);
//   signalFlag(...)     one thread: release-stores a 64-bit flag into the peer's buffer, after
//                       a barrier that follows the block's stores and puts.
//
// Nothing is ever read from a peer: a rank polls flags and reads data in its own buffer only,
// where every transport delivers them.
//
// Transports, chosen per peer (LowLatencyParams::putPeers, MOECOMM_LL_TRANSPORT):
//   nvlink  window = the peer's buffer as mapped here; put = nothing (the stores went over
//           NVLink already); signal = st.release.sys into the mapped flag, whose cumulativity
//           orders every store of the block made before the barrier.
//   staged  window = a local mirror of the peer's buffer (ordinary device memory); put = the
//           calling threads copy the range from the mirror into the mapped peer buffer;
//           signal as nvlink. It has the shape of a put-based network: stores stay local until
//           put, so a range the kernels forget to put never arrives and the GPU tests see it.
//
// An RDMA transport implements the same three operations and leaves the kernels as they are:
// window = its registered send buffer (a mirror, as staged), put = one RDMA write of the range
// (a work request posted by one thread of the group), signal = an RDMA write of the flag
// ordered after the queue pair's earlier puts (fenced). See docs/ep-low-latency-gpu.md.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "device/low_latency.h"

namespace moecomm {
namespace device {

// Byte offset of the current slot in every rank's buffer.
__device__ __forceinline__ uint64_t slotStart(const LowLatencyParams& p) {
  return p.slotOffset + static_cast<uint64_t>(p.slot) * p.slotBytes;
}

// Where this rank stores bytes bound for the current slot of `peer` (its own: its slot).
__device__ __forceinline__ uint8_t* windowSlot(const LowLatencyParams& p, int peer) {
  return p.windows[peer] + slotStart(p);
}

// Whether stores into peer's window need a put to arrive.
__device__ __forceinline__ bool needsPut(const LowLatencyParams& p, int peer) {
  return ((p.putPeers >> peer) & 1u) != 0;
}

// `lanes` threads (lane = 0..lanes-1 each): puts bytes [offset, offset + bytes) of the current
// slot from this rank's window of `peer` to the peer. The stores it covers must be ordered
// before it (the same thread, or a barrier). 16-byte units when the range allows, else 4-byte
// (every range of the kernels is a multiple of 4 bytes at a 4-byte offset).
__device__ __forceinline__ void putRange(const LowLatencyParams& p, int peer, uint64_t offset, uint64_t bytes, int lane,
                                         int lanes) {
  if (!needsPut(p, peer) || bytes == 0) return;
  const uint8_t* from = p.windows[peer] + slotStart(p) + offset;
  uint8_t* to = p.peers[peer] + slotStart(p) + offset;
  if (((reinterpret_cast<uintptr_t>(from) | reinterpret_cast<uintptr_t>(to) | bytes) & 15u) == 0) {
    const int4* source = reinterpret_cast<const int4*>(from);
    int4* target = reinterpret_cast<int4*>(to);
    for (uint64_t i = lane; i < bytes / 16; i += lanes) target[i] = source[i];
  } else {
    const uint32_t* source = reinterpret_cast<const uint32_t*>(from);
    uint32_t* target = reinterpret_cast<uint32_t*>(to);
    for (uint64_t i = lane; i < bytes / 4; i += lanes) target[i] = source[i];
  }
}

// Offset of flag [slot][source][block] of a flag region (sentOffset, releasedOffset,
// listedOffset) in every rank's buffer; slot -1: the current one.
__device__ __forceinline__ uint64_t flagOffset(const LowLatencyParams& p, uint64_t region, int source, int block,
                                               int slot = -1) {
  const uint64_t s = static_cast<uint64_t>(slot < 0 ? p.slot : slot);
  return region + ((s * p.numRanks + source) * p.numBlocks + block) * sizeof(uint64_t);
}

// One thread: flag [slot][this rank][block] of `region` in peer's buffer = value, released
// after everything the thread's block stored and put before its last barrier (slot -1: the
// current one).
__device__ __forceinline__ void signalFlag(const LowLatencyParams& p, int peer, uint64_t region, int block,
                                           uint64_t value, int slot = -1) {
  storeReleaseSys(reinterpret_cast<uint64_t*>(p.peers[peer] + flagOffset(p, region, p.rank, block, slot)), value);
}

// This rank's flags [slot][source][0..B) of `region` (read with acquire loads).
__device__ __forceinline__ const uint64_t* localFlags(const LowLatencyParams& p, uint64_t region, int source) {
  return reinterpret_cast<const uint64_t*>(p.peers[p.rank] + flagOffset(p, region, source, 0));
}

}  // namespace device
}  // namespace moecomm
