#include "nccl_baseline.h"

#include <algorithm>

#include "check.h"
#include "cuda_check.h"
#include "kernels.h"
#include "workload.h"

namespace moecomm_bench {
namespace {

class Baseline {
 public:
  Baseline(NcclContext& nccl, Platform& platform, const Options& options, int rank, int nranks)
      : nccl_(nccl),
        platform_(platform),
        options_(options),
        rank_(rank),
        nranks_(nranks),
        stream_(static_cast<cudaStream_t>(platform.Stream())) {}

  std::vector<Measurement> Run();

 private:
  void Setup();
  void Dispatch();
  void Combine();
  void CheckRun(Measurement* dispatch, Measurement* combine);

  NcclContext& nccl_;
  Platform& platform_;
  const Options& options_;
  const int rank_, nranks_;
  cudaStream_t stream_;
  int hidden_ = 0, tokens_ = 0;
  size_t rowBytes_ = 0, xBytes_ = 0, scaleBytes_ = 0;
  int64_t* topkIdx_ = nullptr;
  uint8_t* x_ = nullptr;
  float* scales_ = nullptr;
  int* position_ = nullptr;
  int* counts_ = nullptr;      // device [2R]: sent per rank, then received per rank
  int* hostCounts_ = nullptr;  // pinned [2R]
  uint8_t* sendRows_ = nullptr;
  uint8_t* recvRows_ = nullptr;
  uint16_t* expertOut_ = nullptr;
  uint16_t* backRows_ = nullptr;
  uint16_t* combined_ = nullptr;
  RankOffsets sendOffsets_{}, recvOffsets_{};
  int64_t received_ = 0;
};

void Baseline::Setup() {
  SetStep("nccl baseline: setup");
  hidden_ = options_.hidden;
  tokens_ = options_.tokens;
  rowBytes_ = DispatchRowBytes(options_.dtype, hidden_);
  const bool fp8 = options_.dtype == DispatchType::kFp8;
  xBytes_ = fp8 ? hidden_ : 2 * static_cast<size_t>(hidden_);
  scaleBytes_ = fp8 ? 4 * static_cast<size_t>(hidden_ / 128) : 0;
  const Routing routing = GenerateRouting(options_, rank_);
  const Tokens tokens = GenerateTokens(options_, options_.dtype, rank_);
  const size_t T = tokens_, R = nranks_;
  const size_t maxSent = T * std::min<size_t>(R, options_.topk);  // a token goes at most once per rank
  topkIdx_ = static_cast<int64_t*>(platform_.Alloc(routing.topkIdx.size() * 8, "baseline topk_idx"));
  x_ = static_cast<uint8_t*>(platform_.Alloc(tokens.x.size(), "baseline x"));
  scales_ = static_cast<float*>(platform_.Alloc(tokens.scales.size() * 4, "baseline x scales"));
  position_ = static_cast<int*>(platform_.Alloc(T * R * 4, "baseline positions [T,R]"));
  counts_ = static_cast<int*>(platform_.Alloc(2 * R * 4, "baseline counts"));
  sendRows_ = static_cast<uint8_t*>(platform_.Alloc(maxSent * rowBytes_, "baseline send rows"));
  recvRows_ = static_cast<uint8_t*>(platform_.Alloc(R * T * rowBytes_, "baseline recv rows"));
  expertOut_ = static_cast<uint16_t*>(platform_.Alloc(R * T * hidden_ * 2, "baseline expert outputs"));
  backRows_ = static_cast<uint16_t*>(platform_.Alloc(maxSent * hidden_ * 2, "baseline returned rows"));
  combined_ = static_cast<uint16_t*>(platform_.Alloc(T * hidden_ * 2, "baseline combined"));
  BENCH_CUDA(cudaMallocHost(&hostCounts_, 2 * R * 4));
  platform_.Upload(topkIdx_, routing.topkIdx.data(), routing.topkIdx.size() * 8);
  platform_.Upload(x_, tokens.x.data(), tokens.x.size());
  if (!tokens.scales.empty()) platform_.Upload(scales_, tokens.scales.data(), tokens.scales.size() * 4);
}

void Baseline::Dispatch() {
  ncclComm_t comm = nccl_.comm();
  LaunchRouteLayout(topkIdx_, tokens_, options_.topk, options_.experts / nranks_, nranks_, position_, counts_, stream_);
  BENCH_NCCL(ncclGroupStart(), comm);
  for (int peer = 0; peer < nranks_; ++peer) {
    BENCH_NCCL(ncclSend(counts_ + peer, 1, ncclInt32, peer, comm, stream_), comm);
    BENCH_NCCL(ncclRecv(counts_ + nranks_ + peer, 1, ncclInt32, peer, comm, stream_), comm);
  }
  BENCH_NCCL(ncclGroupEnd(), comm);
  // The host must know the counts to size the exchange: the sync a real user pays for.
  BENCH_CUDA(cudaMemcpyAsync(hostCounts_, counts_, 2 * nranks_ * sizeof(int), cudaMemcpyDeviceToHost, stream_));
  BENCH_CUDA(cudaStreamSynchronize(stream_));
  int64_t sent = 0;
  received_ = 0;
  for (int peer = 0; peer < nranks_; ++peer) {
    sendOffsets_.rows[peer] = sent;
    recvOffsets_.rows[peer] = received_;
    sent += hostCounts_[peer];
    received_ += hostCounts_[nranks_ + peer];
  }
  if (received_ > static_cast<int64_t>(nranks_) * tokens_)
    BENCH_FAIL("count exchange", "received count " + std::to_string(received_) + " exceeds R*T");
  LaunchPermuteRows(x_, static_cast<int>(xBytes_), scales_, static_cast<int>(scaleBytes_), tokens_, nranks_, position_,
                    sendOffsets_, sendRows_, stream_);
  BENCH_NCCL(ncclGroupStart(), comm);
  for (int peer = 0; peer < nranks_; ++peer) {
    BENCH_NCCL(ncclSend(sendRows_ + sendOffsets_.rows[peer] * rowBytes_, hostCounts_[peer] * rowBytes_, ncclUint8, peer,
                        comm, stream_),
               comm);
    BENCH_NCCL(ncclRecv(recvRows_ + recvOffsets_.rows[peer] * rowBytes_, hostCounts_[nranks_ + peer] * rowBytes_,
                        ncclUint8, peer, comm, stream_),
               comm);
  }
  BENCH_NCCL(ncclGroupEnd(), comm);
}

void Baseline::Combine() {
  ncclComm_t comm = nccl_.comm();
  const size_t bf16Row = 2 * static_cast<size_t>(hidden_);
  BENCH_NCCL(ncclGroupStart(), comm);
  for (int peer = 0; peer < nranks_; ++peer) {
    BENCH_NCCL(ncclSend(reinterpret_cast<uint8_t*>(expertOut_) + recvOffsets_.rows[peer] * bf16Row,
                        hostCounts_[nranks_ + peer] * bf16Row, ncclUint8, peer, comm, stream_),
               comm);
    BENCH_NCCL(ncclRecv(reinterpret_cast<uint8_t*>(backRows_) + sendOffsets_.rows[peer] * bf16Row,
                        hostCounts_[peer] * bf16Row, ncclUint8, peer, comm, stream_),
               comm);
  }
  BENCH_NCCL(ncclGroupEnd(), comm);
  LaunchUnpermuteSum(backRows_, tokens_, hidden_, nranks_, position_, sendOffsets_, combined_, stream_);
}

void Baseline::CheckRun(Measurement* dispatch, Measurement* combine) {
  SetStep("nccl baseline: checked run");
  platform_.Fill(recvRows_, 0xff, static_cast<size_t>(nranks_) * tokens_ * rowBytes_);
  platform_.Fill(combined_, 0xff, static_cast<size_t>(tokens_) * hidden_ * 2);
  Dispatch();
  platform_.Synchronize();
  int64_t expectedRows = 0;
  const std::vector<uint8_t> expected = ExpectedReceivedRows(options_, nranks_, rank_, &expectedRows);
  std::vector<uint8_t> got(static_cast<size_t>(std::max<int64_t>(received_, expectedRows)) * rowBytes_);
  std::string message;
  bool ok = received_ == expectedRows;
  if (!ok) message = "received " + std::to_string(received_) + " rows, expected " + std::to_string(expectedRows);
  if (ok) {
    platform_.Download(got.data(), recvRows_, received_ * rowBytes_);
    ok = CompareRows(got, expected, received_, rowBytes_, "dispatch rows", &message);
  }
  dispatch->check = ok ? "passed" : "failed";
  dispatch->message = message;
  platform_.ExpertOutputs(recvRows_, received_, options_.dtype, hidden_, rank_, expertOut_);
  Combine();
  platform_.Synchronize();
  std::vector<uint16_t> combined(static_cast<size_t>(tokens_) * hidden_);
  platform_.Download(combined.data(), combined_, combined.size() * 2);
  message.clear();
  ok = CompareBf16(combined, ExpectedCombined(options_, nranks_, rank_), hidden_, "combine output", &message);
  combine->check = ok ? "passed" : "failed";
  combine->message = message;
}

std::vector<Measurement> Baseline::Run() {
  Setup();
  Measurement dispatch, combine;
  dispatch.impl = combine.impl = "nccl";
  dispatch.op = "dispatch";
  combine.op = "combine";
  dispatch.mode = combine.mode = "normal";  // the baseline has no low-latency path
  dispatch.status = combine.status = "ok";
  dispatch.kernelMethod = combine.kernelMethod = "none: the baseline is several kernels and NCCL calls";
  const int64_t rows = ReceivedTokenCount(options_, nranks_, rank_);
  dispatch.bytes = rows * static_cast<int64_t>(rowBytes_);
  combine.bytes = rows * 2 * static_cast<int64_t>(hidden_);
  dispatch.bytesRule = "received rows (own included) x bytes per token";
  combine.bytesRule = "received rows x 2H";
  if (options_.check) CheckRun(&dispatch, &combine);
  // The combine input is the checked run's expert outputs (or made now): the same each time.
  SetStep("nccl baseline: warm-up");
  Dispatch();
  platform_.Synchronize();
  platform_.ExpertOutputs(recvRows_, received_, options_.dtype, hidden_, rank_, expertOut_);
  for (int i = 0; i < options_.warmup; ++i) {
    Dispatch();
    Combine();
  }
  platform_.Synchronize();
  std::vector<double> dispatchUs, combineUs;
  for (int i = 0; i < options_.iters; ++i) {
    SetStep("nccl baseline: timed dispatch " + std::to_string(i));
    platform_.PrepareSample();
    platform_.BeginSample();
    Dispatch();
    dispatchUs.push_back(platform_.EndSample());
    SetStep("nccl baseline: timed combine " + std::to_string(i));
    platform_.PrepareSample();
    platform_.BeginSample();
    Combine();
    combineUs.push_back(platform_.EndSample());
  }
  dispatch.whole = Summarize(dispatchUs);
  combine.whole = Summarize(combineUs);
  BENCH_CUDA(cudaFreeHost(hostCounts_));
  hostCounts_ = nullptr;
  return {dispatch, combine};
}

}  // namespace

std::vector<Measurement> RunNcclBaseline(NcclContext& nccl, Platform& platform, const Options& options, int rank,
                                         int nranks) {
  Baseline baseline(nccl, platform, options, rank, nranks);
  return baseline.Run();
}

}  // namespace moecomm_bench
