// MC_HOST_DEVICE: functions that both host code and CUDA kernels call (plain inline in host
// compilers, __host__ __device__ under nvcc).
#pragma once

#if defined(__CUDACC__)
#define MC_HOST_DEVICE __host__ __device__
#else
#define MC_HOST_DEVICE
#endif
