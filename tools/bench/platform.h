// Where the bench's buffers live and how it times: GPU memory with CUDA events on one stream,
// or host memory with the host clock (--host-smoke, the host backend). The libmoecomm runner
// and the checks are written once against this interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moecomm.h"
#include "options.h"

namespace moecomm_bench {

class Platform {
 public:
  virtual ~Platform() = default;
  virtual bool OnGpu() const = 0;
  virtual moecommStream_t Stream() const = 0;

  // Buffers freed with the platform. what names the buffer in error messages.
  virtual void* Alloc(size_t bytes, const std::string& what) = 0;
  virtual void Upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void Download(void* dst, const void* src, size_t bytes) = 0;
  // Fills with a byte pattern (outputs are poisoned before checked runs).
  virtual void Fill(void* dst, int byte, size_t bytes) = 0;
  virtual void Synchronize() = 0;

  // Before each timed sample: evict the L2 (GPU); the host platform also aligns the ranks here.
  virtual void PrepareSample() = 0;
  // One timed sample around whatever is issued in between; EndSample returns microseconds.
  // gated (GPU): the stream is held by a gate kernel until EndSample, so the sample is the GPU
  // time of the queued work alone, without the host time spent issuing it (kernel-only). The
  // GPU platform aligns the ranks (SetBarrier) after the gate, just before the sample starts.
  virtual void BeginSample(bool gated = false) = 0;
  virtual double EndSample() = 0;

  // Queues a kernel of blocks x threads that does nothing (GPU; false elsewhere).
  virtual bool LaunchEmpty(int blocks, int threads) {
    (void)blocks;
    (void)threads;
    return false;
  }

  // The combine input the checks expect: rows packed rows -> BF16 expert outputs (workload.h).
  virtual void ExpertOutputs(const void* packedRows, int64_t rows, DispatchType type, int hidden, int rank,
                             void* out) = 0;

  // A stream-ordered barrier across ranks used by PrepareSample (the NCCL allreduce when
  // NCCL is built); without one, samples are not aligned across ranks.
  void SetBarrier(std::function<void()> barrier) { barrier_ = std::move(barrier); }
  // false: PrepareSample leaves the L2 as the previous sample left it (--no-flush).
  void SetFlushL2(bool flush) { flushL2_ = flush; }
  bool HasBarrier() const { return static_cast<bool>(barrier_); }

 protected:
  std::function<void()> barrier_;
  bool flushL2_ = true;
};

std::unique_ptr<Platform> MakeHostPlatform();
#if BENCH_HAVE_CUDA
std::unique_ptr<Platform> MakeGpuPlatform(int device);
#endif

}  // namespace moecomm_bench
