#include "options.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>

#include "common.h"

namespace moecomm_bench {
namespace {

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: moecomm-run -n N moecomm-bench [flags]\n"
               "  -w, --workload W   W-prefill | W-decode | W-skew | custom (default W-prefill)\n"
               "  -T N               tokens per rank        (custom, or override)\n"
               "  -H N               hidden size\n"
               "  -K N               top-k\n"
               "  -E N               number of experts (a multiple of the rank count)\n"
               "  --dtype fp8|bf16   dispatch data type (combine is always bf16)\n"
               "  -s SEED            routing/data seed (rank r generates its tokens from SEED+r)\n"
               "  -n N               timed iterations (default 50)\n"
               "  -W N               warm-up iterations (default 10)\n"
               "  -c 0|1             check results against the host reference (default 1)\n"
               "  -S N               SM budget passed to the EP config (0 = library default)\n"
               "  -J PATH            append one JSON object per measurement to PATH\n"
               "  --ll               low-latency mode (moecommEpLowLatencyDispatch/Combine)\n"
               "  --graph            with --ll: also capture dispatch+combine in a CUDA graph, time replays\n"
               "  --ll-per-rank      with --ll: MOECOMM_LL_PER_RANK_COMBINE (the dispatch takes the weights, the\n"
               "                     combine sums per expert rank and gets topkWeights = NULL)\n"
               "  --buffers device|symmetric|symmetric-x\n"
               "                     normal mode: recv_x and the combine input from cudaMalloc (default) or\n"
               "                     moecommMemAlloc (direct dispatch and combine: docs/ep-normal-gpu.md);\n"
               "                     symmetric-x: x there too (with MOECOMM_EP_DISPATCH_PULL_X=1 the pulled dispatch)\n"
               "  --no-baseline      skip the NCCL baseline\n"
               "  --no-roofline      skip the peer-copy roofline\n"
               "  --no-flush         do not evict the L2 before each sample (warm-cache timings)\n"
               "  --host             host backend and host buffers, the workload asked for (no GPU needed)\n"
               "  --host-smoke       host backend, tiny workload, normal and low-latency (CI; no GPU)\n");
}

bool ParseInt(const char* text, long min, long max, long* out) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < min || value > max) return false;
  *out = value;
  return true;
}

}  // namespace

const char* DtypeName(DispatchType type) { return type == DispatchType::kFp8 ? "fp8" : "bf16"; }

bool ParseOptions(int argc, char** argv, Options* options, int* exitCode) {
  *exitCode = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto bad = [&](const char* why) {
      std::fprintf(stderr, "moecomm-bench: %s: %s\n", flag.c_str(), why);
      PrintUsage(stderr);
      *exitCode = 2;
      return false;
    };
    if (flag == "-h" || flag == "--help") {
      PrintUsage(stdout);
      return false;
    }
    if (flag == "--ll") {
      options->lowLatency = true;
      continue;
    }
    if (flag == "--graph") {
      options->graph = true;
      continue;
    }
    if (flag == "--ll-per-rank") {
      options->llPerRank = true;
      continue;
    }
    if (flag == "--no-flush") {
      options->flushL2 = false;
      continue;
    }
    if (flag == "--host") {
      options->host = true;
      continue;
    }
    if (flag == "--host-smoke") {
      options->hostSmoke = true;
      continue;
    }
    if (flag == "--no-baseline") {
      options->baseline = false;
      continue;
    }
    if (flag == "--no-roofline") {
      options->roofline = false;
      continue;
    }
    static const char* const kValueFlags[] = {"-w", "--workload", "--dtype", "--buffers", "-J", "-s", "-T",
                                              "-H", "-K",         "-E",      "-n",        "-W", "-c", "-S"};
    if (std::find(std::begin(kValueFlags), std::end(kValueFlags), flag) == std::end(kValueFlags))
      return bad("unknown flag");
    if (i + 1 >= argc) return bad("needs a value");
    const char* value = argv[++i];
    long number = 0;
    if (flag == "-w" || flag == "--workload") {
      options->workload = value;
    } else if (flag == "--dtype") {
      if (std::strcmp(value, "fp8") == 0) {
        options->dtype = DispatchType::kFp8;
      } else if (std::strcmp(value, "bf16") == 0) {
        options->dtype = DispatchType::kBf16;
      } else {
        return bad("expected fp8 or bf16");
      }
      options->dtypeGiven = true;
    } else if (flag == "--buffers") {
      if (std::strcmp(value, "device") != 0 && std::strcmp(value, "symmetric") != 0 &&
          std::strcmp(value, "symmetric-x") != 0)
        return bad("expected device, symmetric or symmetric-x");
      options->symmetricBuffers = std::strcmp(value, "device") != 0;
      options->symmetricX = std::strcmp(value, "symmetric-x") == 0;
    } else if (flag == "-J") {
      options->jsonPath = value;
    } else if (flag == "-s") {
      char* end = nullptr;
      options->seed = std::strtoull(value, &end, 10);
      if (end == value || *end != '\0') return bad("expected an unsigned integer");
    } else {
      int* target = nullptr;
      long min = 1, max = 1L << 30;
      if (flag == "-T")
        target = &options->tokens;
      else if (flag == "-H")
        target = &options->hidden;
      else if (flag == "-K") {
        target = &options->topk;
        max = 32;
      } else if (flag == "-E")
        target = &options->experts;
      else if (flag == "-n")
        target = &options->iters;
      else if (flag == "-W") {
        target = &options->warmup;
        min = 0;
      } else if (flag == "-c") {
        target = &options->check;
        min = 0;
        max = 1;
      } else if (flag == "-S") {
        target = &options->smBudget;
        min = 0;
        max = 1024;
      }
      if (target == nullptr) return bad("unknown flag");
      if (!ParseInt(value, min, max, &number)) return bad("value out of range");
      *target = static_cast<int>(number);
    }
  }
  return true;
}

void ResolveWorkload(int nranks, Options* options) {
  struct Shape {
    int tokens, hidden, topk, experts;
    double zipf;
    DispatchType dtype;
  } shape{0, 0, 0, 0, 0.0, DispatchType::kFp8};
  if (options->hostSmoke) {
    shape = {16, 256, 4, 4 * nranks, options->workload == "W-skew" ? 1.2 : 0.0, DispatchType::kFp8};
    if (options->workload == "W-prefill") options->workload = "host-smoke";
  } else if (options->workload == "W-prefill") {
    shape = {4096, 7168, 8, 256, 0.0, DispatchType::kFp8};
  } else if (options->workload == "W-decode") {
    shape = {128, 7168, 8, 256, 0.0, DispatchType::kFp8};
  } else if (options->workload == "W-skew") {
    shape = {4096, 7168, 8, 256, 1.2, DispatchType::kFp8};
  } else if (options->workload != "custom") {
    BENCH_FAIL("workload '" + options->workload + "'", "unknown (W-prefill, W-decode, W-skew or custom)");
  }
  if (options->tokens == 0) options->tokens = shape.tokens;
  if (options->hidden == 0) options->hidden = shape.hidden;
  if (options->topk == 0) options->topk = shape.topk;
  if (options->experts == 0) options->experts = shape.experts;
  options->zipf = shape.zipf;
  if (!options->dtypeGiven) options->dtype = shape.dtype;
  if (options->tokens <= 0 || options->hidden <= 0 || options->topk <= 0 || options->experts <= 0)
    BENCH_FAIL("workload 'custom'", "needs -T, -H, -K and -E");
  if (options->experts % nranks != 0)
    BENCH_FAIL("-E " + std::to_string(options->experts),
               "must be a multiple of the rank count " + std::to_string(nranks));
  if (options->topk > options->experts) BENCH_FAIL("-K", "top-k larger than the expert count");
  if ((2 * options->hidden) % 16 != 0) BENCH_FAIL("-H", "a BF16 row (2H bytes) must be a multiple of 16 bytes");
  if (options->dtype == DispatchType::kFp8 && options->hidden % 128 != 0) BENCH_FAIL("-H", "FP8 needs H % 128 == 0");
  if (nranks > 64) BENCH_FAIL("rank count", "moecomm-bench supports at most 64 ranks");
  if (options->graph && !options->lowLatency) BENCH_FAIL("--graph", "is only implemented with --ll");
  if (options->symmetricBuffers && options->lowLatency)
    BENCH_FAIL("--buffers", "applies to normal mode, not with --ll");
  if (options->llPerRank && !options->lowLatency && !options->hostSmoke)
    BENCH_FAIL("--ll-per-rank", "applies to the low-latency combine: add --ll");
}

}  // namespace moecomm_bench
