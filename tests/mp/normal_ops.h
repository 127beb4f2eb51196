// Normal-mode dispatch and combine driven through the public API and checked, every element,
// against the reference in reference.h. Used by the Dispatch, Combine and Shapes suites.
#pragma once

#include <string>
#include <vector>

#include "mp/mp_common.h"

namespace moecomm_mp {

enum class Sizing {
  kExact,      // moecommEpNotifyDispatch, then buffers of exactly N rows
  kWorstCase,  // *handle == NULL and recvCapacity = nranks * maxTokensPerRank
  kReuse,      // *handle already holds this routing; buffers of exactly N rows
};

struct DispatchCase {
  moecommDataType_t xType = moecommBfloat16;
  moecommDataType_t indexType = moecommInt64;
  bool withWeights = true;
  bool withTopkOutputs = true;  // recvTopkIdx / recvTopkWeights requested
  Sizing sizing = Sizing::kWorstCase;
  int expertAlignment = 1;

  std::string Describe() const;
};

// Dispatches this rank's inputs (all[rank]) and checks every output and the handle's source
// info. On Sizing::kExact and kWorstCase a new handle is stored in *handle; on kReuse *handle
// must already hold the routing of `all`.
void DispatchAndCheck(moecommEp_t ep, const EpShape& shape, const std::vector<RankInputs>& all,
                      const DispatchCase& dispatch_case, ScopedHandle* handle);

struct CombineCase {
  bool withBias = false;
  bool withWeights = false;
  std::string Describe() const;
};

// Combines random per-row expert outputs (and weights) through `handle`, which holds the
// routing of `all`, and checks combinedX (and combinedTopkWeights) bit for bit. Draws the
// inputs of every rank from `random`, so every rank must call it with the same generator state.
void CombineAndCheck(moecommEp_t ep, const EpShape& shape, const std::vector<RankInputs>& all,
                     const CombineCase& combine_case, moecommEpHandle_t handle, Random& random);

// "(from rank 2 token 5)" for received row `row`.
RowLabel SourceLabel(const std::vector<SourceToken>& sources);

}  // namespace moecomm_mp
