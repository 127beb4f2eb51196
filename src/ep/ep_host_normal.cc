// Host backend, normal mode: moecommEpNotifyDispatch, moecommEpDispatch, moecommEpCombine.
#include <cstring>

#include "core/error.h"
#include "core/log.h"
#include "ep/ep_args.h"
#include "ep/ep_host.h"

namespace moecomm {

// Everything one dispatch call works out about its routing before and after the exchange.
struct HostEpBackend::DispatchPlan {
  moecommEpHandle* reused = nullptr;   // the caller's handle when its routing is reused
  bool hasTopkIdx = false;             // expert ids were passed (or there are no tokens)
  std::vector<int64_t> topkIdx;        // [T, K], normalized
  std::vector<uint8_t> isTokenInRank;  // [T, R]
  std::vector<int32_t> payload;        // this rank's [R] tokens per rank and [E] tokens per expert
  // After the exchange: every rank's counts, this rank's N and its rows' sources.
  std::vector<int> tokensPerRankAll;    // [R][R]
  std::vector<int> tokensPerExpertAll;  // [R][E]
  int numRecvTokens = 0;
  std::vector<int> srcRank;
  std::vector<int> srcIndex;
};

namespace {

// Splits the gathered sync payloads [R][R + E] into the two count matrices.
void splitCounts(const reference::EpShape& shape, const std::vector<int32_t>& gathered, std::vector<int>* perRank,
                 std::vector<int>* perExpert) {
  const size_t stride = static_cast<size_t>(shape.numRanks) + shape.numExperts;
  perRank->resize(static_cast<size_t>(shape.numRanks) * shape.numRanks);
  perExpert->resize(static_cast<size_t>(shape.numRanks) * shape.numExperts);
  for (int r = 0; r < shape.numRanks; ++r) {
    const int32_t* row = gathered.data() + r * stride;
    std::copy(row, row + shape.numRanks, perRank->begin() + static_cast<size_t>(r) * shape.numRanks);
    std::copy(row + shape.numRanks, row + stride, perExpert->begin() + static_cast<size_t>(r) * shape.numExperts);
  }
}

// This rank's layout as a sync payload: [R] tokens per rank, then [E] tokens per expert.
std::vector<int32_t> layoutPayload(const reference::EpShape& shape, const int64_t* topkIdx, int numTokens,
                                   std::vector<uint8_t>* isTokenInRank) {
  std::vector<int32_t> payload(static_cast<size_t>(shape.numRanks) + shape.numExperts);
  isTokenInRank->resize(static_cast<size_t>(numTokens) * shape.numRanks);
  reference::computeLayout(shape, topkIdx, numTokens, payload.data(), payload.data() + shape.numRanks,
                           isTokenInRank->data());
  return payload;
}

// The same payload rebuilt from a handle's stored counts.
std::vector<int32_t> handlePayload(const reference::EpShape& shape, int rank, const moecommEpHandle& handle) {
  std::vector<int32_t> payload;
  const int* perRank = handle.tokensPerRankAll.data() + static_cast<size_t>(rank) * shape.numRanks;
  const int* perExpert = handle.tokensPerExpertAll.data() + static_cast<size_t>(rank) * shape.numExperts;
  payload.insert(payload.end(), perRank, perRank + shape.numRanks);
  payload.insert(payload.end(), perExpert, perExpert + shape.numExperts);
  return payload;
}

size_t xRowBytes(const reference::EpShape& shape, moecommDataType_t xType) {
  return static_cast<size_t>(shape.hidden) * (xType == moecommFloat8E4M3 ? 1 : 2);
}

void fillRecvTokensPerExpert(const reference::EpShape& shape, const std::vector<int>& tokensPerExpertAll, int rank,
                             int alignment, int* out) {
  if (out != nullptr) reference::recvTokensPerExpert(shape, tokensPerExpertAll.data(), rank, alignment, out);
}

}  // namespace

// ---- Notify ---------------------------------------------------------------------------------

moecommResult_t HostEpBackend::notifyDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                              int* numRecvTokens, int* recvTokensPerExpert, moecommStream_t) {
  const uint64_t sequence = ep_->operationSequence++;
  std::vector<int64_t> topkIdx;
  std::vector<uint8_t> isTokenInRank;
  std::vector<int32_t> payload;
  moecommResult_t status = checkNotifyArgs(*ep_, args, handle, numRecvTokens);
  if (status == moecommSuccess)
    status = readTopkIdx(shape(), args->topkIdx, args->topkIdxType, args->numTokens, &topkIdx);
  if (status == moecommSuccess) payload = layoutPayload(shape(), topkIdx.data(), args->numTokens, &isTokenInRank);
  std::vector<int32_t> gathered;
  MC_CHECK(
      synchronize(SyncPhase::kNotify, sequence, -1, status, payload.empty() ? nullptr : payload.data(), &gathered));

  moecommEpHandle* created = newHandle(ep_, EpHandleKind::kNormal);
  created->numTokens = args->numTokens;
  created->isTokenInRank = std::move(isTokenInRank);
  splitCounts(shape(), gathered, &created->tokensPerRankAll, &created->tokensPerExpertAll);
  created->numRecvTokens = reference::numRecvTokens(shape(), created->tokensPerRankAll.data(), ep_->rank);
  *numRecvTokens = created->numRecvTokens;
  fillRecvTokensPerExpert(shape(), created->tokensPerExpertAll, ep_->rank, args->expertAlignment, recvTokensPerExpert);
  *handle = created;
  return moecommSuccess;
}

// ---- Dispatch -------------------------------------------------------------------------------

moecommResult_t HostEpBackend::prepareDispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                               DispatchPlan* plan) {
  MC_CHECK(checkDispatchArgs(*ep_, args, handle));
  MC_CHECK(checkNoWaitEvent(args->waitEvent));
  plan->reused = *handle;
  plan->hasTopkIdx = args->topkIdx != nullptr || args->numTokens == 0;
  if (plan->hasTopkIdx) {
    MC_CHECK(readTopkIdx(shape(), args->topkIdx, args->topkIdxType, args->numTokens, &plan->topkIdx));
  }
  if (plan->reused == nullptr) {
    plan->payload = layoutPayload(shape(), plan->topkIdx.data(), args->numTokens, &plan->isTokenInRank);
    return moecommSuccess;
  }
  plan->isTokenInRank = plan->reused->isTokenInRank;
  plan->payload = handlePayload(shape(), ep_->rank, *plan->reused);
  if (plan->hasTopkIdx) {
    // The ids must describe the handle's routing: a cheap check that catches stale handles.
    std::vector<uint8_t> isTokenInRank;
    layoutPayload(shape(), plan->topkIdx.data(), args->numTokens, &isTokenInRank);
    for (size_t i = 0; i < isTokenInRank.size(); ++i) {
      MC_REQUIRE(isTokenInRank[i] == plan->isTokenInRank[i], moecommInvalidArgument,
                 "topkIdx sends token %zu %s rank %zu, but the reused handle's routing does not: pass the handle "
                 "made for these expert ids",
                 i / shape().numRanks, isTokenInRank[i] != 0 ? "to" : "not to", i % shape().numRanks);
    }
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::publishDispatch(const moecommEpDispatchArgs_t& args, const DispatchPlan& plan) {
  const NormalDispatchRegion region(shape());
  uint8_t* base = normalRegion(ep_->rank);
  const size_t tokens = static_cast<size_t>(args.numTokens);
  const size_t topkEntries = tokens * shape().topk;
  const NormalDispatchHeader header{args.numTokens, static_cast<int32_t>(args.xType), plan.hasTopkIdx ? 1 : 0,
                                    args.topkWeights != nullptr || tokens == 0 ? 1 : 0};
  std::memcpy(base + region.header, &header, sizeof(header));
  if (tokens == 0) return moecommSuccess;
  std::memcpy(base + region.isTokenInRank, plan.isTokenInRank.data(), plan.isTokenInRank.size());
  if (plan.hasTopkIdx) std::memcpy(base + region.topkIdx, plan.topkIdx.data(), topkEntries * sizeof(int64_t));
  if (args.topkWeights != nullptr)
    std::memcpy(base + region.topkWeights, args.topkWeights, topkEntries * sizeof(float));
  if (args.xType == moecommFloat8E4M3) {
    std::memcpy(base + region.xScales, args.xScales, tokens * shape().scalesPerRow() * sizeof(float));
  }
  std::memcpy(base + region.x, args.x, tokens * xRowBytes(shape(), args.xType));
  return moecommSuccess;
}

// Checks that every source that sends this rank rows published what this rank's outputs need.
moecommResult_t HostEpBackend::checkDispatchSources(const moecommEpDispatchArgs_t& args, const DispatchPlan& plan) {
  const NormalDispatchRegion region(shape());
  const bool wantIds = args.recvTopkIdx != nullptr || args.recvTopkWeights != nullptr;
  for (int s = 0; s < shape().numRanks; ++s) {
    const int rows = plan.tokensPerRankAll[static_cast<size_t>(s) * shape().numRanks + ep_->rank];
    if (rows == 0) continue;
    NormalDispatchHeader header;
    std::memcpy(&header, normalRegion(s) + region.header, sizeof(header));
    MC_REQUIRE(header.xType == args.xType, moecommInvalidArgument,
               "rank %d dispatched x of type %d but this rank expects type %d: every rank must pass the same xType", s,
               header.xType, static_cast<int>(args.xType));
    MC_REQUIRE(!wantIds || header.hasTopkIdx != 0, moecommInvalidArgument,
               "recvTopkIdx / recvTopkWeights were requested, but rank %d passed no topkIdx", s);
    MC_REQUIRE(args.recvTopkWeights == nullptr || header.hasTopkWeights != 0, moecommInvalidArgument,
               "recvTopkWeights was requested, but rank %d passed no topkWeights", s);
    int published = 0;
    const uint8_t* inRank = normalRegion(s) + region.isTokenInRank;
    for (int t = 0; t < header.numTokens; ++t)
      published += inRank[static_cast<size_t>(t) * shape().numRanks + ep_->rank];
    MC_REQUIRE(published == rows, moecommInternalError, "rank %d published %d rows for this rank but its counts say %d",
               s, published, rows);
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::receiveDispatch(const moecommEpDispatchArgs_t& args, DispatchPlan* plan,
                                               const std::vector<int32_t>& gathered) {
  const int rank = ep_->rank;
  splitCounts(shape(), gathered, &plan->tokensPerRankAll, &plan->tokensPerExpertAll);
  if (plan->reused != nullptr) {
    MC_REQUIRE(plan->tokensPerRankAll == plan->reused->tokensPerRankAll &&
                   plan->tokensPerExpertAll == plan->reused->tokensPerExpertAll,
               moecommInvalidArgument,
               "the reused handle's routing differs from the peers' in this call: every rank must reuse the handle "
               "of the same routing");
  }
  plan->numRecvTokens = reference::numRecvTokens(shape(), plan->tokensPerRankAll.data(), rank);
  MC_REQUIRE(plan->numRecvTokens <= args.recvCapacity, moecommInvalidArgument,
             "this rank receives %d tokens but dispatch args->recvCapacity is %d", plan->numRecvTokens,
             args.recvCapacity);
  MC_CHECK(checkDispatchSources(args, *plan));

  const NormalDispatchRegion region(shape());
  std::vector<reference::DispatchSource> sources(shape().numRanks);
  for (int s = 0; s < shape().numRanks; ++s) {
    const uint8_t* base = normalRegion(s);
    NormalDispatchHeader header;
    std::memcpy(&header, base + region.header, sizeof(header));
    sources[s].numTokens = header.numTokens;
    sources[s].isTokenInRank = base + region.isTokenInRank;
    sources[s].x = base + region.x;
    sources[s].xScales = reinterpret_cast<const float*>(base + region.xScales);
    sources[s].topkIdx = reinterpret_cast<const int64_t*>(base + region.topkIdx);
    sources[s].topkWeights = reinterpret_cast<const float*>(base + region.topkWeights);
  }
  const size_t n = static_cast<size_t>(plan->numRecvTokens);
  std::vector<int64_t> recvTopkIdx(args.recvTopkIdx != nullptr ? n * shape().topk : 0);
  plan->srcRank.resize(n);
  plan->srcIndex.resize(n);
  reference::DispatchOutput out;
  out.recvX = static_cast<uint8_t*>(args.recvX);
  out.recvXScales = args.xType == moecommFloat8E4M3 ? args.recvXScales : nullptr;
  out.recvTopkIdx = args.recvTopkIdx != nullptr ? recvTopkIdx.data() : nullptr;
  out.recvTopkWeights = args.recvTopkWeights;
  out.srcRank = plan->srcRank.data();
  out.srcIndex = plan->srcIndex.data();
  reference::dispatchGather(shape(), rank, sources.data(), xRowBytes(shape(), args.xType), out);
  if (args.recvTopkIdx != nullptr) {
    reference::narrowTopkIdx(recvTopkIdx.data(), recvTopkIdx.size(), args.topkIdxType, args.recvTopkIdx);
  }
  if (args.numRecvTokens != nullptr) *args.numRecvTokens = plan->numRecvTokens;
  fillRecvTokensPerExpert(shape(), plan->tokensPerExpertAll, rank, args.expertAlignment, args.recvTokensPerExpert);
  return moecommSuccess;
}

moecommResult_t HostEpBackend::dispatch(const moecommEpDispatchArgs_t* args, moecommEpHandle_t* handle,
                                        moecommStream_t) {
  const uint64_t sequence = ep_->operationSequence++;
  DispatchPlan plan;
  moecommResult_t status = prepareDispatch(args, handle, &plan);
  if (status == moecommSuccess) status = publishDispatch(*args, plan);
  std::vector<int32_t> gathered;
  const int32_t* payload = status == moecommSuccess ? plan.payload.data() : nullptr;
  MC_CHECK(synchronize(SyncPhase::kDispatchPublished, sequence, -1, status, payload, &gathered));
  status = receiveDispatch(*args, &plan, gathered);
  MC_CHECK(synchronize(SyncPhase::kDispatchDone, sequence, -1, status, nullptr, nullptr));

  moecommEpHandle* target = plan.reused;
  if (target == nullptr) {
    target = newHandle(ep_, EpHandleKind::kNormal);
    target->numTokens = args->numTokens;
    target->isTokenInRank = std::move(plan.isTokenInRank);
    target->tokensPerRankAll = std::move(plan.tokensPerRankAll);
    target->tokensPerExpertAll = std::move(plan.tokensPerExpertAll);
    target->numRecvTokens = plan.numRecvTokens;
    *handle = target;
  }
  target->srcRank = std::move(plan.srcRank);
  target->srcIndex = std::move(plan.srcIndex);
  target->sourceInfoKnown = true;
  MC_TRACE(kLogEp, "rank %d dispatch #%llu: %d tokens out, %d in", ep_->rank, static_cast<unsigned long long>(sequence),
           args->numTokens, target->numRecvTokens);
  return moecommSuccess;
}

// ---- Combine --------------------------------------------------------------------------------

moecommResult_t HostEpBackend::publishCombine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle) {
  MC_CHECK(checkCombineArgs(*ep_, args, handle));
  MC_CHECK(checkNoWaitEvent(args->waitEvent));
  const NormalCombineRegion region(shape());
  uint8_t* base = normalRegion(ep_->rank);
  const size_t rows = static_cast<size_t>(handle->numRecvTokens);
  const NormalCombineHeader header{handle->numRecvTokens, args->topkWeights != nullptr || rows == 0 ? 1 : 0};
  std::memcpy(base + region.header, &header, sizeof(header));
  if (rows == 0) return moecommSuccess;
  std::memcpy(base + region.x, args->x, rows * shape().hidden * sizeof(uint16_t));
  if (args->topkWeights != nullptr) {
    std::memcpy(base + region.topkWeights, args->topkWeights, rows * shape().topk * sizeof(float));
  }
  return moecommSuccess;
}

moecommResult_t HostEpBackend::receiveCombine(const moecommEpCombineArgs_t& args, const moecommEpHandle& handle) {
  const NormalCombineRegion region(shape());
  std::vector<reference::CombineSource> receivers(shape().numRanks);
  for (int r = 0; r < shape().numRanks; ++r) {
    const uint8_t* base = normalRegion(r);
    const int rowsFromUs = handle.tokensPerRankAll[static_cast<size_t>(ep_->rank) * shape().numRanks + r];
    if (rowsFromUs > 0) {
      NormalCombineHeader header;
      std::memcpy(&header, base + region.header, sizeof(header));
      const int expected = reference::numRecvTokens(shape(), handle.tokensPerRankAll.data(), r);
      MC_REQUIRE(header.numRows == expected, moecommInvalidArgument,
                 "rank %d combined %d rows but this rank's handle says it received %d: every rank must pass the "
                 "handle of the same dispatch",
                 r, header.numRows, expected);
      MC_REQUIRE(args.combinedTopkWeights == nullptr || header.hasTopkWeights != 0, moecommInvalidArgument,
                 "combinedTopkWeights was requested, but rank %d passed no topkWeights", r);
    }
    receivers[r].x = reinterpret_cast<const uint16_t*>(base + region.x);
    receivers[r].topkWeights = reinterpret_cast<const float*>(base + region.topkWeights);
  }
  reference::combineReduce(shape(), ep_->rank, handle.numTokens, handle.isTokenInRank.data(),
                           handle.tokensPerRankAll.data(), receivers.data(), static_cast<const uint16_t*>(args.bias),
                           static_cast<uint16_t*>(args.combinedX), args.combinedTopkWeights);
  return moecommSuccess;
}

moecommResult_t HostEpBackend::combine(const moecommEpCombineArgs_t* args, moecommEpHandle_t handle, moecommStream_t) {
  const uint64_t sequence = ep_->operationSequence++;
  moecommResult_t status = publishCombine(args, handle);
  MC_CHECK(synchronize(SyncPhase::kCombinePublished, sequence, -1, status, nullptr, nullptr));
  status = receiveCombine(*args, *handle);
  return synchronize(SyncPhase::kCombineDone, sequence, -1, status, nullptr, nullptr);
}

}  // namespace moecomm
