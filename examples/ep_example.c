/*
 * ep_example: one MoE layer's communication with libmoecomm, from C.
 *
 *   moecomm-run -n 2 ./moecomm_example     (or just ./moecomm_example for one rank)
 *
 * Each rank routes its tokens to top-k experts, dispatches them (exact sizing: the counts first,
 * then buffers of exactly the right size), plays the experts (each received token is scaled by
 * the sum of its local experts' weights), combines the results back, and checks every element
 * against a direct computation from its own inputs.
 *
 * Host backend only for now: all buffers are malloc'ed CPU memory. (The CUDA backend takes the
 * same calls with device buffers and a stream.)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moecomm.h"

#define TOKENS 32
#define HIDDEN 256
#define TOPK 2
#define EXPERTS_PER_RANK 4

#define CHECK(call)                                                                                      \
  do {                                                                                                   \
    moecommResult_t result_ = (call);                                                                    \
    if (result_ != moecommSuccess) {                                                                     \
      fprintf(stderr, "%s: %s: %s\n", #call, moecommGetErrorString(result_), moecommGetLastError(NULL)); \
      exit(1);                                                                                           \
    }                                                                                                    \
  } while (0)

static float bf16_to_float(uint16_t bits) {
  uint32_t wide = (uint32_t)bits << 16;
  float value;
  memcpy(&value, &wide, sizeof(value));
  return value;
}

static uint16_t float_to_bf16(float value) { /* round to nearest even; inputs here are finite */
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static uint32_t next_random(uint32_t* state) { /* xorshift32 */
  *state ^= *state << 13;
  *state ^= *state >> 17;
  *state ^= *state << 5;
  return *state;
}

/* Under moecomm-run, the communicator its environment describes; alone, a communicator of one rank. */
static moecommComm_t init_comm(void) {
  moecommComm_t comm;
  moecommConfig_t config = MOECOMM_CONFIG_INIT;
  config.backend = moecommBackendHost;
  if (getenv("MOECOMM_RANK") != NULL) {
    CHECK(moecommCommInitFromEnv(&comm, &config));
  } else {
    moecommUniqueId id;
    CHECK(moecommGetUniqueId(&id));
    CHECK(moecommCommInitRank(&comm, 1, id, 0, &config));
  }
  return comm;
}

/* The sum of token t's weights for the experts on rank r, k ascending (what rank r's experts apply). */
static float weight_on_rank(const int64_t* topk_idx, const float* weights, int t, int r, int* reached) {
  float sum = 0.0f;
  int k;
  for (k = 0; k < TOPK; ++k) {
    if (topk_idx[t * TOPK + k] >= 0 && topk_idx[t * TOPK + k] / EXPERTS_PER_RANK == r) {
      sum += weights[t * TOPK + k];
      *reached = 1;
    }
  }
  return sum;
}

/* The "experts": each received row times the sum of its local experts' weights (-1 entries carry 0). */
static void play_experts(int rows, const uint16_t* recv_x, const int64_t* recv_idx, const float* recv_weights,
                         uint16_t* expert_out) {
  int n, k, h;
  for (n = 0; n < rows; ++n) {
    float weight_sum = 0.0f;
    for (k = 0; k < TOPK; ++k) weight_sum += recv_idx[n * TOPK + k] >= 0 ? recv_weights[n * TOPK + k] : 0.0f;
    for (h = 0; h < HIDDEN; ++h) {
      expert_out[n * HIDDEN + h] = float_to_bf16(bf16_to_float(recv_x[n * HIDDEN + h]) * weight_sum);
    }
  }
}

/* Elements of combined that differ from the sum over ranks (ascending, FP32) of what each rank's
 * experts returned for the token, rounded to BF16. */
static long count_mismatches(int nranks, const uint16_t* x, const int64_t* topk_idx, const float* topk_weights,
                             const uint16_t* combined) {
  long mismatches = 0;
  int t, h, r, reached;
  for (t = 0; t < TOKENS; ++t) {
    for (h = 0; h < HIDDEN; ++h) {
      float sum = 0.0f;
      for (r = 0; r < nranks; ++r) {
        float weight_sum;
        reached = 0;
        weight_sum = weight_on_rank(topk_idx, topk_weights, t, r, &reached);
        if (reached) sum += bf16_to_float(float_to_bf16(bf16_to_float(x[t * HIDDEN + h]) * weight_sum));
      }
      mismatches += float_to_bf16(sum) != combined[t * HIDDEN + h];
    }
  }
  return mismatches;
}

int main(void) {
  static uint16_t x[TOKENS * HIDDEN], combined[TOKENS * HIDDEN];
  static int64_t topk_idx[TOKENS * TOPK];
  static float topk_weights[TOKENS * TOPK];
  moecommEpConfig_t ep_config = MOECOMM_EP_CONFIG_INIT;
  moecommEpLayoutArgs_t layout = MOECOMM_EP_LAYOUT_ARGS_INIT;
  moecommEpDispatchArgs_t dispatch = MOECOMM_EP_DISPATCH_ARGS_INIT;
  moecommEpCombineArgs_t combine = MOECOMM_EP_COMBINE_ARGS_INIT;
  moecommEpHandle_t handle = NULL;
  moecommEp_t ep;
  moecommComm_t comm = init_comm();
  int rank, nranks, num_experts, num_recv, t, k;
  int* tokens_per_rank;
  uint16_t *recv_x, *expert_out;
  int64_t* recv_idx;
  float* recv_weights;
  long mismatches;
  uint32_t state;

  CHECK(moecommCommUserRank(comm, &rank));
  CHECK(moecommCommCount(comm, &nranks));
  num_experts = EXPERTS_PER_RANK * nranks;

  /* This rank's tokens, each routed to TOPK distinct experts with random positive weights. */
  state = 2463534242u + 7919u * (uint32_t)rank;
  for (t = 0; t < TOKENS * HIDDEN; ++t) x[t] = float_to_bf16((float)(next_random(&state) % 2001) / 1000.0f - 1.0f);
  for (t = 0; t < TOKENS; ++t) {
    int first = (int)(next_random(&state) % (uint32_t)num_experts);
    for (k = 0; k < TOPK; ++k) {
      topk_idx[t * TOPK + k] = (first + k * (num_experts / TOPK + 1)) % num_experts;
      topk_weights[t * TOPK + k] = (float)(1 + next_random(&state) % 100) / 100.0f;
    }
  }

  ep_config.numExperts = num_experts;
  ep_config.hidden = HIDDEN;
  ep_config.maxTokensPerRank = TOKENS;
  ep_config.topk = TOPK;
  CHECK(moecommEpCreate(comm, &ep_config, &ep));

  /* Layout: how many of this rank's tokens go to each rank. */
  tokens_per_rank = calloc((size_t)nranks, sizeof(int));
  layout.numTokens = TOKENS;
  layout.topkIdx = topk_idx;
  layout.tokensPerRank = tokens_per_rank;
  CHECK(moecommEpGetLayout(ep, &layout, NULL));

  /* Exact sizing: learn N, allocate exactly N rows, then dispatch with the handle. */
  dispatch.numTokens = TOKENS;
  dispatch.x = x;
  dispatch.topkIdx = topk_idx;
  dispatch.topkWeights = topk_weights;
  CHECK(moecommEpNotifyDispatch(ep, &dispatch, &handle, &num_recv, NULL, NULL));
  recv_x = malloc((size_t)(num_recv + 1) * HIDDEN * sizeof(uint16_t));
  expert_out = malloc((size_t)(num_recv + 1) * HIDDEN * sizeof(uint16_t));
  recv_idx = malloc((size_t)(num_recv + 1) * TOPK * sizeof(int64_t));
  recv_weights = malloc((size_t)(num_recv + 1) * TOPK * sizeof(float));
  dispatch.recvCapacity = num_recv;
  dispatch.recvX = recv_x;
  dispatch.recvTopkIdx = recv_idx;
  dispatch.recvTopkWeights = recv_weights;
  CHECK(moecommEpDispatch(ep, &dispatch, &handle, NULL));

  play_experts(num_recv, recv_x, recv_idx, recv_weights, expert_out);
  combine.x = expert_out;
  combine.combinedX = combined;
  CHECK(moecommEpCombine(ep, &combine, handle, NULL));

  mismatches = count_mismatches(nranks, x, topk_idx, topk_weights, combined);

  printf(
      "ep_example: rank %d of %d: %d tokens, %d experts top-%d, hidden %d; %d sent to rank 0, %d received; "
      "combine %s (%ld of %d elements differ)\n",
      rank, nranks, TOKENS, num_experts, TOPK, HIDDEN, tokens_per_rank[0], num_recv, mismatches ? "WRONG" : "OK",
      mismatches, TOKENS * HIDDEN);
  CHECK(moecommEpHandleDestroy(handle));
  CHECK(moecommEpDestroy(ep));
  CHECK(moecommCommDestroy(comm));
  free(tokens_per_rank);
  free(recv_x);
  free(expert_out);
  free(recv_idx);
  free(recv_weights);
  return mismatches ? 1 : 0;
}
