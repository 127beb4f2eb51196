// The NCCL baseline: what a user without an EP library does with NCCL on the same data.
//
// dispatch = layout kernel (per-destination counts and an order-keeping permutation; a token
//            goes once per destination rank) + grouped ncclSend/ncclRecv of the counts + host
//            sync for them + permute kernel + grouped ncclSend/ncclRecv of the packed rows
//            (FP8 payload + FP32 scales as bytes, or BF16);
// combine  = grouped ncclSend/ncclRecv of the BF16 rows back + unpermute-and-sum kernel
//            (FP32 accumulation, ascending rank, BF16 out).
// Both are timed whole-call with events on the stream. Bytes are counted as for libmoecomm.
#pragma once

#include <vector>

#include "nccl_context.h"
#include "platform.h"
#include "report.h"

namespace moecomm_bench {

// Returns the "dispatch" and "combine" measurements (check filled when options.check).
std::vector<Measurement> RunNcclBaseline(NcclContext& nccl, Platform& platform, const Options& options, int rank,
                                         int nranks);

}  // namespace moecomm_bench
