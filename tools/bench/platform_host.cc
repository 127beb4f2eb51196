#include <chrono>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "platform.h"
#include "workload.h"

namespace moecomm_bench {
namespace {

// The host backend completes every call before returning, so the host clock around the
// call is both the whole-call and the "kernel" time.
class HostPlatform final : public Platform {
 public:
  ~HostPlatform() override {
    for (void* buffer : buffers_) std::free(buffer);
  }
  bool OnGpu() const override { return false; }
  moecommStream_t Stream() const override { return nullptr; }
  void* Alloc(size_t bytes, const std::string& what) override {
    void* buffer = std::malloc(bytes == 0 ? 1 : bytes);
    if (buffer == nullptr) BENCH_FAIL("malloc(" + what + ")", std::to_string(bytes) + " bytes");
    buffers_.push_back(buffer);
    return buffer;
  }
  void Upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void Download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void Fill(void* dst, int byte, size_t bytes) override { std::memset(dst, byte, bytes); }
  void Synchronize() override {}
  void PrepareSample() override {
    if (barrier_) barrier_();
  }
  void BeginSample(bool /*gated*/) override { start_ = std::chrono::steady_clock::now(); }
  double EndSample() override {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start_).count();
  }
  void ExpertOutputs(const void* packedRows, int64_t rows, DispatchType type, int hidden, int rank,
                     void* out) override {
    const size_t rowBytes = DispatchRowBytes(type, hidden);
    for (int64_t row = 0; row < rows; ++row) {
      ExpertOutputRow(static_cast<const uint8_t*>(packedRows) + row * rowBytes, type, hidden, rank,
                      static_cast<uint16_t*>(out) + row * hidden);
    }
  }

 private:
  std::vector<void*> buffers_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

std::unique_ptr<Platform> MakeHostPlatform() { return std::make_unique<HostPlatform>(); }

}  // namespace moecomm_bench
