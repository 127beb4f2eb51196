// The link roofline, measured in the same run: a 1 GiB peer copy from this rank's GPU to the
// next rank's, one rank at a time so no link is shared while measured; the median of several
// copies gives the one-way bandwidth, and the roofline is that times R/(R-1) (a rank's own
// tokens do not cross a link). Every rank ends up with the minimum over the ranks.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "nccl_context.h"

namespace moecomm_bench {

struct Roofline {
  double oneWayGbps = -1.0;
  double rooflineGbps = -1.0;
  std::string note;  // why it was not measured, or how
};

// Assumes rank r runs on device localRank and the next rank on device (localRank + 1) % R,
// all devices visible to every process (no CUDA_VISIBLE_DEVICES restriction).
Roofline MeasureRoofline(NcclContext& nccl, int rank, int nranks, int device, cudaStream_t stream);

}  // namespace moecomm_bench
