// Checked CUDA and NCCL calls: a failure names the call, the rank and the bench's step.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common.h"

#define BENCH_CUDA(call)                                                                                      \
  do {                                                                                                        \
    const cudaError_t bench_cuda_ = (call);                                                                   \
    if (bench_cuda_ != cudaSuccess)                                                                           \
      BENCH_FAIL(#call, std::string(cudaGetErrorName(bench_cuda_)) + ": " + cudaGetErrorString(bench_cuda_)); \
  } while (0)

// After a kernel launch: launch errors now, and (with synchronous checks) faults.
#define BENCH_LAUNCHED(kernel) BENCH_CUDA((static_cast<void>(kernel), cudaGetLastError()))

#if BENCH_HAVE_NCCL
#include <nccl.h>
#define BENCH_NCCL(call, comm)                                                                         \
  do {                                                                                                 \
    const ncclResult_t bench_nccl_ = (call);                                                           \
    if (bench_nccl_ != ncclSuccess)                                                                    \
      BENCH_FAIL(#call, std::string(ncclGetErrorString(bench_nccl_)) + ": " + ncclGetLastError(comm)); \
  } while (0)
#endif
