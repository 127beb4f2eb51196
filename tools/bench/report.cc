#include "report.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "common.h"
#include "workload.h"

namespace moecomm_bench {
namespace {

std::string Quote(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
      out += escaped;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string Number(double value) {
  if (!std::isfinite(value)) return "null";
  char text[32];
  std::snprintf(text, sizeof(text), "%.4f", value);
  return text;
}

double Gbps(int64_t bytes, double microseconds) { return microseconds > 0 ? bytes / microseconds / 1e3 : NAN; }

}  // namespace

Reporter::Reporter(const Options& options, const RunInfo& info) : options_(options), info_(info) {}

void Reporter::PrintHeader() const {
  if (info_.rank != 0) return;
  const Options& o = options_;
  std::printf("# moecomm-bench %s, %s backend, %d ranks, GPU %s, commit %s\n", info_.libraryVersion.c_str(),
              info_.backend.c_str(), info_.nranks, info_.gpuName.empty() ? "none" : info_.gpuName.c_str(),
              info_.commit.empty() ? "unknown" : info_.commit.c_str());
  std::printf("# workload %s: T=%d tokens/rank, H=%d, top-%d of %d experts%s, dispatch %s, combine bf16, seed %llu\n",
              o.workload.c_str(), o.tokens, o.hidden, o.topk, o.experts, o.zipf > 0 ? " (Zipf 1.2 popularity)" : "",
              o.lowLatency ? (std::string("bf16 in, ") + DtypeName(o.dtype) + " received").c_str() : DtypeName(o.dtype),
              static_cast<unsigned long long>(o.seed));
  if (o.lowLatency) {
    std::printf("# low-latency combine: %s\n",
                o.llPerRank ? "per rank (MOECOMM_LL_PER_RANK_COMBINE: the dispatch takes the weights; one BF16 partial "
                              "per (token, expert rank))"
                            : "per expert (one row per (token, expert), weights given to the combine)");
  }
  std::printf("# SM budget %d%s, %d iterations after %d warm-up, check %s\n", o.smBudget,
              o.smBudget == 0 ? " (library default)" : "", o.iters, o.warmup, o.check ? "on" : "off");
  std::printf(
      "# bandwidth (GB/s = 1e9 B/s): normal dispatch = rows this rank received (own included) x %zu B "
      "(%s: %s);\n#   normal combine = the same rows x 2H; low-latency dispatch = valid (token, expert) "
      "selections sent x %zu B; LL combine = selections x 2H\n",
      DispatchRowBytes(o.dtype, o.hidden), DtypeName(o.dtype), o.dtype == DispatchType::kFp8 ? "H + 4H/128" : "2H",
      LowLatencySelectionBytes(o.dtype, o.hidden));
  if (info_.backend == "cuda") {
    std::printf(
        "# time: whole-call = CUDA events on the caller's stream around the call, L2 flushed and ranks aligned "
        "before each sample;\n");
  } else {
    std::printf("# time: whole-call = host clock around the call (the host backend is synchronous);\n");
  }
  std::printf(
      "#   kernel-only: column 'kernel_us' (kernel_method in JSON says how it was taken); rank 0 shown, every "
      "rank in -J;\n#   median/p10/p90 over the timed iterations; 'vs_NCCL' = NCCL median / this median\n");
  if (info_.rooflineGbps > 0) {
    std::printf("# roofline: %.1f GB/s = one-way peer copy %.1f GB/s (1 GiB cudaMemcpyPeerAsync, median) x R/(R-1)\n",
                info_.rooflineGbps, info_.linkOneWayGbps);
  } else {
    std::printf("# roofline: not measured (%s)\n", info_.rooflineNote.c_str());
  }
  if (!info_.ncclBuilt) std::printf("# NCCL baseline: not built\n");
  std::printf("%-10s %-16s %-13s %10s %10s %10s %10s %12s %9s %7s %8s %-9s\n", "impl", "op", "status", "median_us",
              "p10_us", "p90_us", "kernel_us", "bytes", "GB/s", "%roof", "vs_NCCL", "check");
  std::fflush(stdout);
}

void Reporter::Add(const Measurement& m) {
  if (!options_.jsonPath.empty()) {
    const std::string line = JsonLine(m) + "\n";
    // One write() per line with O_APPEND: lines from the ranks do not interleave.
    const int fd = ::open(options_.jsonPath.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) BENCH_FAIL("open(" + options_.jsonPath + ")", std::strerror(errno));
    const ssize_t written = ::write(fd, line.data(), line.size());
    ::close(fd);
    if (written != static_cast<ssize_t>(line.size())) BENCH_FAIL("write(" + options_.jsonPath + ")", "short write");
  }
  if (info_.rank != 0) {
    // The table shows rank 0; another rank's failed check would otherwise be only in the JSON.
    if (m.check == "failed") {
      std::fprintf(stderr, "moecomm-bench rank %d: %s %s check failed: %s\n", info_.rank, m.impl.c_str(), m.op.c_str(),
                   m.message.c_str());
    }
    return;
  }
  if (m.status != "ok") {
    std::printf("%-10s %-16s %-13s %s\n", m.impl.c_str(), m.op.c_str(), m.status.c_str(), m.message.c_str());
  } else {
    const double gbps = Gbps(m.bytes, m.whole.median);
    char kernel[32] = "n/a", roof[16] = "-", ratio[16] = "-";
    if (m.hasKernel) std::snprintf(kernel, sizeof(kernel), "%.1f", m.kernel.median);
    if (info_.rooflineGbps > 0 && m.bytes > 0)
      std::snprintf(roof, sizeof(roof), "%.1f", 100.0 * gbps / info_.rooflineGbps);
    if (m.baselineUs > 0) std::snprintf(ratio, sizeof(ratio), "%.2fx", m.baselineUs / m.whole.median);
    std::printf("%-10s %-16s %-13s %10.1f %10.1f %10.1f %10s %12lld %9.2f %7s %8s %-9s\n", m.impl.c_str(), m.op.c_str(),
                m.status.c_str(), m.whole.median, m.whole.p10, m.whole.p90, kernel, static_cast<long long>(m.bytes),
                m.bytes > 0 ? gbps : 0.0, roof, ratio, m.check.c_str());
    if (!m.message.empty()) std::printf("           note: %s\n", m.message.c_str());
  }
  std::fflush(stdout);
}

std::string Reporter::JsonLine(const Measurement& m) const {
  const Options& o = options_;
  const bool ok = m.status == "ok";
  const double gbps = ok ? Gbps(m.bytes, m.whole.median) : NAN;
  std::string j = "{";
  auto field = [&](const char* key, const std::string& value) {
    if (j.size() > 1) j += ",";
    j += Quote(key) + ":" + value;
  };
  field("date", Quote(info_.date));
  field("host", Quote(info_.host));
  field("gpu", info_.gpuName.empty() ? "null" : Quote(info_.gpuName));
  field("gpu_count", std::to_string(info_.gpuCount));
  field("nranks", std::to_string(info_.nranks));
  field("rank", std::to_string(info_.rank));
  field("library_version", Quote(info_.libraryVersion));
  field("commit", info_.commit.empty() ? "null" : Quote(info_.commit));
  field("build", info_.build.empty() ? "null" : Quote(info_.build));
  field("backend", Quote(info_.backend));
  field("workload", Quote(o.workload));
  field("tokens_per_rank", std::to_string(o.tokens));
  field("hidden", std::to_string(o.hidden));
  field("topk", std::to_string(o.topk));
  field("experts", std::to_string(o.experts));
  field("zipf", Number(o.zipf));
  field("dtype", Quote(DtypeName(o.dtype)));
  field("seed", std::to_string(o.seed));
  field("sm_budget", std::to_string(o.smBudget));
  field("l2_flush", o.flushL2 ? "true" : "false");
  field("iters", std::to_string(o.iters));
  field("warmup", std::to_string(o.warmup));
  field("mode", Quote(m.mode));
  // Which low-latency combine form the run used (null outside low-latency mode).
  field("ll_combine", m.mode != "low_latency" ? "null" : Quote(o.llPerRank ? "per_rank" : "per_expert"));
  // Where normal mode's recv_x and combine input lived (null outside normal mode).
  field("buffers", m.mode != "normal" ? "null"
                                      : Quote(o.symmetricX         ? "symmetric-x"
                                              : o.symmetricBuffers ? "symmetric"
                                                                   : "device"));
  field("impl", Quote(m.impl));
  field("op", Quote(m.op));
  field("status", Quote(m.status));
  field("message", Quote(m.message));
  field("samples", std::to_string(m.whole.samples));
  field("whole_median_us", ok ? Number(m.whole.median) : "null");
  field("whole_p10_us", ok ? Number(m.whole.p10) : "null");
  field("whole_p90_us", ok ? Number(m.whole.p90) : "null");
  field("kernel_median_us", ok && m.hasKernel ? Number(m.kernel.median) : "null");
  field("kernel_p10_us", ok && m.hasKernel ? Number(m.kernel.p10) : "null");
  field("kernel_p90_us", ok && m.hasKernel ? Number(m.kernel.p90) : "null");
  field("kernel_method", Quote(m.kernelMethod));
  field("host_call_median_us", ok && m.hasHost ? Number(m.host.median) : "null");
  field("bytes", std::to_string(m.bytes));
  field("bytes_rule", Quote(m.bytesRule));
  field("gbps", Number(gbps));
  field("roofline_gbps", info_.rooflineGbps > 0 ? Number(info_.rooflineGbps) : "null");
  field("link_oneway_gbps", info_.linkOneWayGbps > 0 ? Number(info_.linkOneWayGbps) : "null");
  field("ratio_vs_nccl", ok && m.baselineUs > 0 ? Number(m.baselineUs / m.whole.median) : "null");
  field("check", Quote(m.check));
  return j + "}";
}

}  // namespace moecomm_bench
