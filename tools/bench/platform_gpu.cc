#include <atomic>
#include <exception>

#include "cuda_check.h"
#include "kernels.h"
#include "platform.h"

namespace moecomm_bench {
namespace {

class GpuPlatform final : public Platform {
 public:
  explicit GpuPlatform(int device) {
    BENCH_CUDA(cudaSetDevice(device));
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    BENCH_CUDA(cudaEventCreate(&start_));
    BENCH_CUDA(cudaEventCreate(&stop_));
    int l2Bytes = 0;
    BENCH_CUDA(cudaDeviceGetAttribute(&l2Bytes, cudaDevAttrL2CacheSize, device));
    // Writing twice the L2 evicts everything a previous sample left there.
    flushBytes_ = 2 * static_cast<size_t>(l2Bytes > 0 ? l2Bytes : (64 << 20));
    flush_ = Alloc(flushBytes_, "L2 flush buffer");
    void* gate = nullptr;
    BENCH_CUDA(cudaHostAlloc(&gate, sizeof(int), cudaHostAllocMapped));
    gate_ = static_cast<volatile int*>(gate);
    *gate_ = 1;
  }
  ~GpuPlatform() override {
    // No throwing here; and while an error unwinds, do not wait for work that may wait on peers.
    if (std::uncaught_exceptions() == 0) cudaStreamSynchronize(stream_);
    for (void* buffer : buffers_) cudaFree(buffer);
    if (gate_ != nullptr) {
      *gate_ = 1;
      cudaFreeHost(const_cast<int*>(gate_));
    }
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaStreamDestroy(stream_);
  }
  bool OnGpu() const override { return true; }
  moecommStream_t Stream() const override { return stream_; }
  void* Alloc(size_t bytes, const std::string& what) override {
    void* buffer = nullptr;
    const cudaError_t result = cudaMalloc(&buffer, bytes == 0 ? 16 : bytes);
    if (result != cudaSuccess)
      BENCH_FAIL("cudaMalloc(" + what + ", " + std::to_string(bytes) + " bytes)", cudaGetErrorString(result));
    buffers_.push_back(buffer);
    return buffer;
  }
  void Upload(void* dst, const void* src, size_t bytes) override {
    BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    BENCH_CUDA(cudaStreamSynchronize(stream_));
  }
  void Download(void* dst, const void* src, size_t bytes) override {
    BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    BENCH_CUDA(cudaStreamSynchronize(stream_));
  }
  void Fill(void* dst, int byte, size_t bytes) override { BENCH_CUDA(cudaMemsetAsync(dst, byte, bytes, stream_)); }
  void Synchronize() override { BENCH_CUDA(cudaStreamSynchronize(stream_)); }
  void PrepareSample() override {
    if (flushL2_) BENCH_CUDA(cudaMemsetAsync(flush_, ++flushByte_ & 0xff, flushBytes_, stream_));
  }
  // The ranks are aligned after the gate: a gate is opened by each rank's host at its own
  // time, and an alignment before it would let that skew into the sample.
  void BeginSample(bool gated) override {
    gated_ = gated;
    if (gated) {
      *gate_ = 0;
      LaunchGate(gate_, stream_);
    }
    if (barrier_) barrier_();
    BENCH_CUDA(cudaEventRecord(start_, stream_));
  }
  double EndSample() override {
    BENCH_CUDA(cudaEventRecord(stop_, stream_));
    if (gated_) {
      std::atomic_thread_fence(std::memory_order_seq_cst);
      *gate_ = 1;
      gated_ = false;
    }
    BENCH_CUDA(cudaEventSynchronize(stop_));
    float milliseconds = 0.0f;
    BENCH_CUDA(cudaEventElapsedTime(&milliseconds, start_, stop_));
    return 1000.0 * milliseconds;
  }
  bool LaunchEmpty(int blocks, int threads) override {
    moecomm_bench::LaunchEmpty(blocks, threads, stream_);
    return true;
  }
  void ExpertOutputs(const void* packedRows, int64_t rows, DispatchType type, int hidden, int rank,
                     void* out) override {
    LaunchExpertOutputs(static_cast<const uint8_t*>(packedRows), rows, type == DispatchType::kFp8, hidden, rank,
                        static_cast<uint16_t*>(out), stream_);
    Synchronize();
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  void* flush_ = nullptr;
  size_t flushBytes_ = 0;
  int flushByte_ = 0;
  volatile int* gate_ = nullptr;  // mapped host word the gate kernel waits on
  bool gated_ = false;
  std::vector<void*> buffers_;
};

}  // namespace

std::unique_ptr<Platform> MakeGpuPlatform(int device) { return std::make_unique<GpuPlatform>(device); }

}  // namespace moecomm_bench
