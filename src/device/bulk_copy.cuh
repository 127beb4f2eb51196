// Named wrappers for Hopper's bulk-copy engine (cp.async.bulk, 1-D) and the shared-memory
// mbarriers it completes on (sm_90). Kernels use these instead of inline asm.
//
// Ordering rules the callers follow:
//  - global data that this thread learned about through an acquire (a peer's rows behind a
//    tail word) is read by the async proxy only after fenceProxyAsyncGlobal() in the issuing
//    thread;
//  - a freshly initialised mbarrier is published with fenceBarrierInit() and a barrier of the
//    threads that use it;
//  - every thread that reads shared memory a bulk load wrote waits on the stage's mbarrier
//    itself (mbarrierTryWait), which makes the bytes visible to it.
#pragma once

#include <cstdint>

namespace moecomm {
namespace device {

__device__ __forceinline__ uint32_t sharedAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void mbarrierInit(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sharedAddress(barrier)), "r"(arrivals) : "memory");
}

__device__ __forceinline__ void fenceBarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void fenceProxyAsyncGlobal() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

__device__ __forceinline__ void fenceProxyAsyncShared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// One arrival (release at CTA scope: the arriving thread's earlier writes are visible to a
// thread whose wait sees the phase complete).
__device__ __forceinline__ void mbarrierArrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sharedAddress(barrier)) : "memory");
}

// One arrival that also announces `bytes` of bulk copies completing on this phase.
__device__ __forceinline__ void mbarrierArriveExpectTx(uint64_t* barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sharedAddress(barrier)), "r"(bytes)
               : "memory");
}

// True once the phase of the given parity completed (the hardware may suspend briefly).
__device__ __forceinline__ bool mbarrierTryWait(uint64_t* barrier, uint32_t parity) {
  uint32_t done = 0;
  asm volatile(
      "{\n"
      ".reg .pred complete;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
      "selp.u32 %0, 1, 0, complete;\n"
      "}\n"
      : "=r"(done)
      : "r"(sharedAddress(barrier)), "r"(parity)
      : "memory");
  return done != 0;
}

// Global -> this CTA's shared memory; completes `bytes` on barrier. bytes % 16 == 0, both
// addresses 16-byte aligned.
__device__ __forceinline__ void bulkLoad(void* sharedDst, const void* globalSrc, uint32_t bytes, uint64_t* barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   sharedAddress(sharedDst)),
               "l"(globalSrc), "r"(bytes), "r"(sharedAddress(barrier))
               : "memory");
}

// Shared memory -> global, tracked by the issuing thread's bulk groups.
__device__ __forceinline__ void bulkStore(void* globalDst, const void* sharedSrc, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(globalDst),
               "r"(sharedAddress(sharedSrc)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulkCommit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's committed bulk groups still read shared memory.
template <int N>
__device__ __forceinline__ void bulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Waits until at most N of this thread's committed bulk groups are incomplete (writes done).
template <int N>
__device__ __forceinline__ void bulkWait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace device
}  // namespace moecomm
