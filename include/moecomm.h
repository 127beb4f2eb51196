/*
 * libmoecomm: expert-parallel all-to-all (MoE dispatch and combine) for GPUs and CPUs.
 *
 * This is the library's only public header. It is plain C99 and also compiles as C++.
 * It does not include any CUDA header: streams and events are passed as the opaque
 * pointers `struct CUstream_st*` / `struct CUevent_st*`, which are exactly the types
 * behind cudaStream_t / cudaEvent_t, so CUDA users pass theirs without a cast.
 *
 * Conventions
 *  - Every function returns moecommResult_t. On failure, moecommGetLastError() returns a
 *    sentence (thread-local) saying what was wrong.
 *  - Argument structs begin with `size`, `magic`, `version`; initialise them with the
 *    matching MOECOMM_*_INIT macro, then set the fields you need. A struct whose size or
 *    magic is wrong is rejected with moecommInvalidArgument.
 *  - "[IN]" arguments are read, "[OUT]" written. "device" pointers are in GPU memory for
 *    communicators on the CUDA backend and in host memory for the host backend; "host"
 *    pointers are always host memory.
 *  - Operations that take a stream are asynchronous on that stream for the CUDA backend.
 *    On the host backend they complete before returning and the stream is ignored.
 *  - Collective calls (marked "Collective") must be made by every rank of the communicator
 *    in the same order.
 */
#ifndef MOECOMM_H_
#define MOECOMM_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MOECOMM_API
#elif defined(__GNUC__)
#define MOECOMM_API __attribute__((visibility("default")))
#else
#define MOECOMM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------ */
/* Version                                                                              */
/* ------------------------------------------------------------------------------------ */

#define MOECOMM_MAJOR 0
#define MOECOMM_MINOR 1
#define MOECOMM_PATCH 0
/* MOECOMM_VERSION_CODE = major * 10000 + minor * 100 + patch. */
#define MOECOMM_VERSION(major, minor, patch) ((major)*10000 + (minor)*100 + (patch))
#define MOECOMM_VERSION_CODE MOECOMM_VERSION(MOECOMM_MAJOR, MOECOMM_MINOR, MOECOMM_PATCH)

/* ------------------------------------------------------------------------------------ */
/* Results and errors                                                                   */
/* ------------------------------------------------------------------------------------ */

/* Numeric values never change once released. */
typedef enum {
  moecommSuccess = 0,
  moecommUnhandledCudaError = 1, /* a CUDA call failed */
  moecommSystemError = 2,        /* a system call (socket, shm, mmap, ...) failed */
  moecommInternalError = 3,      /* a bug in libmoecomm */
  moecommInvalidArgument = 4,    /* a bad argument: null pointer, out of range, bad struct */
  moecommInvalidUsage = 5,       /* a valid argument used at the wrong time (destroyed comm, after abort) */
  moecommRemoteError = 6,        /* a peer failed or disconnected */
  moecommInProgress = 7,         /* a non-blocking operation has not finished yet */
  moecommTimeout = 8,            /* a bounded wait ran out of time */
  moecommNotSupported = 9,       /* the operation is not available in this build or on this system */
  moecommNumResults = 10
} moecommResult_t;

/* [OUT] version: MOECOMM_VERSION_CODE of the loaded library (may differ from the header's). */
MOECOMM_API moecommResult_t moecommGetVersion(int* version);

/* A short, static name for a result code ("invalid argument"). Never NULL. */
MOECOMM_API const char* moecommGetErrorString(moecommResult_t result);

/* The text of the last error raised by a libmoecomm call on the calling thread, or "" when
 * the last call succeeded. comm may be NULL; the text is per thread either way. Never NULL. */
struct moecommComm;
MOECOMM_API const char* moecommGetLastError(struct moecommComm* comm);

/* ------------------------------------------------------------------------------------ */
/* Handles and basic types                                                              */
/* ------------------------------------------------------------------------------------ */

typedef struct moecommComm* moecommComm_t;         /* a communicator: one rank of a group */
typedef struct moecommEp* moecommEp_t;             /* one MoE layer shape on a communicator */
typedef struct moecommEpHandle* moecommEpHandle_t; /* one routing (who sends what to whom) */

typedef struct CUstream_st* moecommStream_t; /* same type as cudaStream_t; NULL = legacy default */
typedef struct CUevent_st* moecommEvent_t;   /* same type as cudaEvent_t */

#define MOECOMM_UNIQUE_ID_BYTES 128
/* Identifies one communicator while it is being created: rank 0's rendezvous address and a
 * random tag. Produced by moecommGetUniqueId on one rank and sent to the others by the caller. */
typedef struct {
  char internal[MOECOMM_UNIQUE_ID_BYTES];
} moecommUniqueId;

typedef enum {
  moecommBfloat16 = 0,   /* bf16, 2 bytes */
  moecommFloat8E4M3 = 1, /* fp8 e4m3fn, 1 byte */
  moecommFloat32 = 2,
  moecommInt32 = 3,
  moecommInt64 = 4
} moecommDataType_t;

typedef enum {
  moecommBackendAuto = 0, /* CUDA when the rank has a GPU, else host */
  moecommBackendHost = 1, /* CPU memory, ranks as processes (POSIX shm) or threads */
  moecommBackendCuda = 2  /* GPU memory, NVLink */
} moecommBackend_t;

/* ------------------------------------------------------------------------------------ */
/* Communicator                                                                          */
/* ------------------------------------------------------------------------------------ */

/* Allocator callbacks let a framework supply memory for the library's private
 * (non-symmetric) buffers from its own pool. alloc returns 0 on success. */
typedef int (*moecommAllocFn_t)(void* ctx, size_t bytes, int device, void** ptr);
typedef void (*moecommFreeFn_t)(void* ctx, void* ptr, size_t bytes, int device);

#define MOECOMM_CONFIG_MAGIC 0x6d63436fu /* "mcCo" */
typedef struct {
  size_t size;              /* sizeof(moecommConfig_t) */
  unsigned magic;           /* MOECOMM_CONFIG_MAGIC */
  unsigned version;         /* MOECOMM_VERSION_CODE */
  moecommBackend_t backend; /* default moecommBackendAuto (env MOECOMM_BACKEND) */
  int device;               /* CUDA device of this rank; -1 = the calling thread's current device */
  int timeoutMs;            /* bound on every bootstrap wait; 0 = MOECOMM_BOOTSTRAP_TIMEOUT */
  int blocking;             /* reserved, must be 0 or 1 */
  moecommAllocFn_t allocFn; /* NULL = cudaMalloc / malloc */
  moecommFreeFn_t freeFn;   /* required when allocFn is set */
  void* allocCtx;           /* passed to allocFn / freeFn */
} moecommConfig_t;
#define MOECOMM_CONFIG_INIT                                                                                        \
  {                                                                                                                \
    sizeof(moecommConfig_t), MOECOMM_CONFIG_MAGIC, MOECOMM_VERSION_CODE, moecommBackendAuto, -1, 0, 0, NULL, NULL, \
        NULL                                                                                                       \
  }

/* [OUT] uniqueId: a fresh id. Call on one rank (usually rank 0), which must then call
 * moecommCommInitRank with rank 0; hand the id to the other ranks by any means. */
MOECOMM_API moecommResult_t moecommGetUniqueId(moecommUniqueId* uniqueId);

/* The id as 256 lowercase hex characters plus a NUL, for passing through text channels
 * (environment variables, command lines). [OUT] buffer of at least bufferBytes >= 257. */
#define MOECOMM_UNIQUE_ID_STRING_BYTES (2 * MOECOMM_UNIQUE_ID_BYTES + 1)
MOECOMM_API moecommResult_t moecommUniqueIdToString(const moecommUniqueId* uniqueId, char* buffer, size_t bufferBytes);
/* [IN] text from moecommUniqueIdToString. [OUT] uniqueId. */
MOECOMM_API moecommResult_t moecommUniqueIdFromString(const char* text, moecommUniqueId* uniqueId);

/* Collective over nranks processes or threads. Blocks until every rank arrived or the
 * bootstrap timeout ran out (moecommTimeout).
 * [OUT] comm   new communicator
 * [IN]  nranks 1..65536
 * [IN]  id     from moecommGetUniqueId
 * [IN]  rank   0..nranks-1, each exactly once
 * [IN]  config NULL = defaults */
MOECOMM_API moecommResult_t moecommCommInitRank(moecommComm_t* comm, int nranks, moecommUniqueId id, int rank,
                                                const moecommConfig_t* config);

/* moecommCommInitRank with rank, nranks and id from the environment variables that
 * moecomm-run sets: MOECOMM_RANK, MOECOMM_NRANKS, MOECOMM_UNIQUE_ID (moecommUniqueIdToString
 * text). A missing or malformed variable is moecommInvalidUsage. */
MOECOMM_API moecommResult_t moecommCommInitFromEnv(moecommComm_t* comm, const moecommConfig_t* config);

/* One process drives n ranks (threads are created internally for the rendezvous).
 * [OUT] comms   array of n communicators, rank i in comms[i]
 * [IN]  n       number of ranks, >= 1
 * [IN]  devices n CUDA device ordinals, or NULL: devices 0..n-1 on the CUDA backend, and
 *               host ranks on the host backend (or when no GPU is present). */
MOECOMM_API moecommResult_t moecommCommInitAll(moecommComm_t* comms, int n, const int* devices);

/* Caller-supplied bootstrap (MPI, torch.distributed, an NCCL communicator, ...).
 * allgather: every rank contributes `bytes` bytes at sendbuf; recvbuf receives nranks*bytes,
 *            rank i's contribution at offset i*bytes. Return 0 on success.
 * barrier:   returns when every rank has entered it. Return 0 on success.
 * Both are called from the thread that calls moecomm functions on this comm, and must
 * themselves be bounded. */
typedef int (*moecommAllgatherFn_t)(void* ctx, const void* sendbuf, void* recvbuf, size_t bytes);
typedef int (*moecommBarrierFn_t)(void* ctx);
#define MOECOMM_EXTERNAL_BOOTSTRAP_MAGIC 0x6d634578u /* "mcEx" */
typedef struct {
  size_t size;
  unsigned magic; /* MOECOMM_EXTERNAL_BOOTSTRAP_MAGIC */
  unsigned version;
  moecommAllgatherFn_t allgather; /* required */
  moecommBarrierFn_t barrier;     /* required */
  void* ctx;                      /* passed to both */
} moecommExternalBootstrap_t;
#define MOECOMM_EXTERNAL_BOOTSTRAP_INIT \
  { sizeof(moecommExternalBootstrap_t), MOECOMM_EXTERNAL_BOOTSTRAP_MAGIC, MOECOMM_VERSION_CODE, NULL, NULL, NULL }

/* Collective through the callbacks. The bootstrap struct is copied; ctx must stay valid
 * until moecommCommDestroy. */
MOECOMM_API moecommResult_t moecommCommInitExternal(moecommComm_t* comm, int nranks, int rank,
                                                    const moecommExternalBootstrap_t* bootstrap,
                                                    const moecommConfig_t* config);

/* Frees the communicator. Collective in the sense that peers may still be using shared
 * memory: it synchronises with them (bounded) before unmapping. Objects created on it
 * (EPs, memory) must have been destroyed; any left are freed. */
MOECOMM_API moecommResult_t moecommCommDestroy(moecommComm_t comm);

/* Marks the communicator aborted and unblocks every wait in bounded time; safe from any
 * thread. Every later call on it (except Destroy, Abort, GetAsyncError and the queries)
 * returns moecommInvalidUsage. Call moecommCommDestroy afterwards to free it. */
MOECOMM_API moecommResult_t moecommCommAbort(moecommComm_t comm);

/* [OUT] asyncError: moecommSuccess, or the first error raised asynchronously (a kernel
 * timeout, a dead peer, a bad expert id seen on the GPU, a peer whose low-latency call failed
 * on its side). Collects what the kernels of the communicator's EPs recorded so far; callable
 * from any thread. Non-blocking; the error stays set. */
MOECOMM_API moecommResult_t moecommCommGetAsyncError(moecommComm_t comm, moecommResult_t* asyncError);

MOECOMM_API moecommResult_t moecommCommCount(moecommComm_t comm, int* count);
MOECOMM_API moecommResult_t moecommCommUserRank(moecommComm_t comm, int* rank);
/* [OUT] device: the CUDA device ordinal, or -1 for a host-backend rank. */
MOECOMM_API moecommResult_t moecommCommDevice(moecommComm_t comm, int* device);
/* [OUT] backend: the backend actually chosen. */
MOECOMM_API moecommResult_t moecommCommBackend(moecommComm_t comm, moecommBackend_t* backend);

/* JSON text of the topology as found and the choices made for this rank (GPU, NIC, NVLink
 * domain). [OUT] json points at a string owned by the comm, valid until it is destroyed. */
MOECOMM_API moecommResult_t moecommCommGetTopology(moecommComm_t comm, const char** json);

/* ------------------------------------------------------------------------------------ */
/* Memory                                                                               */
/* ------------------------------------------------------------------------------------ */

/* Collective: symmetric memory that every rank can reach. Host backend: POSIX shared memory.
 * CUDA backend: device memory mapped by every peer over NVLink (cuMem POSIX-fd handles,
 * legacy CUDA IPC, or peer access inside one process; see docs/nvlink-memory.md).
 * Every rank passes the same size; the memory starts zeroed.
 * Normal-mode EP calls are faster when every rank's dispatch recvX, or combine x (and
 * topkWeights), lies in one such allocation at the same offset: the senders then write rows
 * straight into the destination's recvX (with the default kernels), and the combine reads the
 * peers' rows in place (docs/ep-normal-gpu.md, "Direct dispatch and combine"); anything else
 * works unchanged, through the staging area.
 * [OUT] ptr local address of this rank's buffer
 * [IN]  bytes > 0 */
MOECOMM_API moecommResult_t moecommMemAlloc(moecommComm_t comm, void** ptr, size_t bytes);
/* Collective: frees memory from moecommMemAlloc. */
MOECOMM_API moecommResult_t moecommMemFree(moecommComm_t comm, void* ptr);
/* Records a caller buffer with the communicator so operations may use it without copies.
 * Local (not collective). Overlapping registrations are rejected. */
MOECOMM_API moecommResult_t moecommMemRegister(moecommComm_t comm, void* ptr, size_t bytes);
MOECOMM_API moecommResult_t moecommMemDeregister(moecommComm_t comm, void* ptr);

/* ------------------------------------------------------------------------------------ */
/* Expert parallelism                                                                    */
/* ------------------------------------------------------------------------------------ */

/* Expert e lives on rank e / (numExperts / nranks). */
#define MOECOMM_MAX_TOPK 32

typedef enum {
  moecommEpModeNormal = 0,     /* high throughput (training, prefill) */
  moecommEpModeLowLatency = 1, /* decode: fixed shapes, expert-major output */
  moecommEpModeBoth = 2        /* both kinds of buffer */
} moecommEpMode_t;

#define MOECOMM_EP_CONFIG_MAGIC 0x6d634570u /* "mcEp" */
typedef struct {
  size_t size;
  unsigned magic; /* MOECOMM_EP_CONFIG_MAGIC */
  unsigned version;
  int numExperts;       /* E: > 0 and a multiple of the rank count */
  int hidden;           /* H: a BF16 row (2H bytes) must be a multiple of 16 bytes */
  int maxTokensPerRank; /* upper bound on T in every call, > 0 */
  int topk;             /* K: 1..MOECOMM_MAX_TOPK */
  moecommEpMode_t mode;
  int numSms;         /* SM budget of the GPU kernels; 0 = MOECOMM_EP_NUM_SMS */
  size_t bufferBytes; /* symmetric buffer per rank: 0 or at least moecommEpGetBufferSizeHint
                         (the host backend allocates bufferBytes when larger; the CUDA backend
                         allocates what it needs and checks bufferBytes only as a lower bound) */
} moecommEpConfig_t;
#define MOECOMM_EP_CONFIG_INIT \
  { sizeof(moecommEpConfig_t), MOECOMM_EP_CONFIG_MAGIC, MOECOMM_VERSION_CODE, 0, 0, 0, 0, moecommEpModeNormal, 0, 0 }

/* [OUT] bytes: the symmetric buffer each rank needs for this config (the worst case) on the
 * communicator's backend: the host backend's shared-memory segment, or the CUDA backend's
 * device buffers (normal mode, plus low latency unless the mode is normal) for this rank's
 * device and SM budget. */
MOECOMM_API moecommResult_t moecommEpGetBufferSizeHint(moecommComm_t comm, const moecommEpConfig_t* config,
                                                       size_t* bytes);

/* Collective. Every rank must pass an identical config (checked: a difference is
 * moecommInvalidArgument on every rank). Allocates the EP's symmetric buffers. */
MOECOMM_API moecommResult_t moecommEpCreate(moecommComm_t comm, const moecommEpConfig_t* config, moecommEp_t* ep);
/* Collective. Handles created on the EP must have been destroyed; any left are freed. */
MOECOMM_API moecommResult_t moecommEpDestroy(moecommEp_t ep);

/* ---- Layout (local, no communication) ---- */

#define MOECOMM_EP_LAYOUT_ARGS_MAGIC 0x6d634c61u /* "mcLa" */
typedef struct {
  size_t size;
  unsigned magic;
  unsigned version;
  int numTokens;                 /* [IN] T, 0..maxTokensPerRank */
  const void* topkIdx;           /* [IN] device [T,K] int64 or int32; -1 = no expert */
  moecommDataType_t topkIdxType; /* [IN] moecommInt64 or moecommInt32 */
  int* tokensPerRank;            /* [OUT] device [R]: tokens of this rank bound for each rank */
  int* tokensPerExpert;          /* [OUT] device [E]: (token, expert) selections per expert */
  uint8_t* isTokenInRank;        /* [OUT] device [T,R]: 1 if token t goes to rank r, else 0 */
} moecommEpLayoutArgs_t;
#define MOECOMM_EP_LAYOUT_ARGS_INIT                                                                                 \
  {                                                                                                                 \
    sizeof(moecommEpLayoutArgs_t), MOECOMM_EP_LAYOUT_ARGS_MAGIC, MOECOMM_VERSION_CODE, 0, NULL, moecommInt64, NULL, \
        NULL, NULL                                                                                                  \
  }

/* Asynchronous on stream. Any output pointer may be NULL to skip it. An expert id outside
 * [-1, E) is moecommInvalidArgument (host backend: detected before any output is written;
 * CUDA backend: reported through moecommCommGetAsyncError). */
MOECOMM_API moecommResult_t moecommEpGetLayout(moecommEp_t ep, const moecommEpLayoutArgs_t* args,
                                               moecommStream_t stream);

/* ---- Normal-mode dispatch and combine ---- */

#define MOECOMM_EP_DISPATCH_ARGS_MAGIC 0x6d634469u /* "mcDi" */
typedef struct {
  size_t size;
  unsigned magic;
  unsigned version;
  int numTokens;                 /* [IN] T, 0..maxTokensPerRank */
  moecommDataType_t xType;       /* [IN] moecommBfloat16 or moecommFloat8E4M3 */
  const void* x;                 /* [IN] device [T,H] */
  const float* xScales;          /* [IN] device [T,H/128] FP32, FP8 only (one scale per 128 channels) */
  const void* topkIdx;           /* [IN] device [T,K]; -1 = none */
  moecommDataType_t topkIdxType; /* [IN] moecommInt64 or moecommInt32 */
  const float* topkWeights;      /* [IN] device [T,K] or NULL */
  int expertAlignment;           /* [IN] >= 1: per-expert counts are rounded up to a multiple */
  int recvCapacity;              /* [IN] rows allocated in every recv buffer; must be >= N */
  void* recvX;                   /* [OUT] device [N,H] (xType) */
  float* recvXScales;            /* [OUT] device [N,H/128], FP8 only */
  void* recvTopkIdx;             /* [OUT] device [N,K] (topkIdxType) local expert ids, others -1; or NULL */
  float* recvTopkWeights;        /* [OUT] device [N,K], 0 where recvTopkIdx is -1; or NULL */
  int* numRecvTokens;            /* [OUT] device [1]: N; or NULL */
  int* recvTokensPerExpert;      /* [OUT] device [E/R] aligned counts; or NULL */
  moecommEvent_t waitEvent;      /* [IN] optional: the stream waits for it first */
} moecommEpDispatchArgs_t;
#define MOECOMM_EP_DISPATCH_ARGS_INIT                                                                                \
  {                                                                                                                  \
    sizeof(moecommEpDispatchArgs_t), MOECOMM_EP_DISPATCH_ARGS_MAGIC, MOECOMM_VERSION_CODE, 0, moecommBfloat16, NULL, \
        NULL, NULL, moecommInt64, NULL, 1, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL                               \
  }

/* Exact sizing, step one (collective): exchanges the counts for one routing and blocks the
 * host until they are known.
 * [IN]  args->numTokens, topkIdx, topkIdxType, expertAlignment (other fields ignored)
 * [OUT] handle               the routing, to pass to moecommEpDispatch / moecommEpCombine
 * [OUT] numRecvTokens        host: rows this rank will receive (N)
 * [OUT] recvTokensPerExpert  host [E/R] or NULL: selections per local expert, each rounded
 *                            up to a multiple of expertAlignment */
MOECOMM_API moecommResult_t moecommEpNotifyDispatch(moecommEp_t ep, const moecommEpDispatchArgs_t* args,
                                                    moecommEpHandle_t* handle, int* numRecvTokens,
                                                    int* recvTokensPerExpert, moecommStream_t stream);

/* Collective. Sends each token once to every rank holding one of its experts. Received rows
 * are ordered by source rank, then source token index.
 * handle: if *handle is NULL, the counts are exchanged inside the call (no host sync on the
 *         CUDA backend; recvCapacity = nranks * maxTokensPerRank is always enough) and a new
 *         handle is returned in *handle. If *handle is a handle from an earlier
 *         moecommEpNotifyDispatch / moecommEpDispatch on this EP, its routing is reused and
 *         topkIdx is not read again (it must describe the same routing).
 * N larger than recvCapacity is moecommInvalidArgument (host backend) or an async error. */
MOECOMM_API moecommResult_t moecommEpDispatch(moecommEp_t ep, const moecommEpDispatchArgs_t* args,
                                              moecommEpHandle_t* handle, moecommStream_t stream);

#define MOECOMM_EP_COMBINE_ARGS_MAGIC 0x6d63436du /* "mcCm" */
typedef struct {
  size_t size;
  unsigned magic;
  unsigned version;
  const void* x;              /* [IN] device [N,H] BF16, one row per received token */
  const float* topkWeights;   /* [IN] device [N,K] or NULL: carried back and summed */
  const void* bias;           /* [IN] device [T,H] BF16 or NULL: added to the sum */
  void* combinedX;            /* [OUT] device [T,H] BF16 */
  float* combinedTopkWeights; /* [OUT] device [T,K] or NULL (required when topkWeights is set) */
  moecommEvent_t waitEvent;   /* [IN] optional */
} moecommEpCombineArgs_t;
#define MOECOMM_EP_COMBINE_ARGS_INIT                                                                                   \
  {                                                                                                                    \
    sizeof(moecommEpCombineArgs_t), MOECOMM_EP_COMBINE_ARGS_MAGIC, MOECOMM_VERSION_CODE, NULL, NULL, NULL, NULL, NULL, \
        NULL                                                                                                           \
  }

/* Collective. combinedX[t] = bf16( (sum over receiving ranks r, ascending, of float(x_r[row]))
 * + float(bias[t]) ), accumulated in FP32: bitwise reproducible. Tokens sent nowhere get the
 * bias (or zero). */
MOECOMM_API moecommResult_t moecommEpCombine(moecommEp_t ep, const moecommEpCombineArgs_t* args,
                                             moecommEpHandle_t handle, moecommStream_t stream);

/* Frees a handle (local). It does not wait for the device: the calls already issued with the
 * handle still run, and the EP reuses the handle's device memory only behind them (normal mode:
 * on the device, through an event; low-latency mode: in stream order, so keep an EP's
 * low-latency calls on one stream). A handle captured into a CUDA graph must stay alive while
 * the graph is replayed. */
MOECOMM_API moecommResult_t moecommEpHandleDestroy(moecommEpHandle_t handle);
/* [OUT] numRecvTokens: N as known on the host (exact sizing), or -1 when the counts stayed on
 * the device (worst-case sizing on the CUDA backend). */
MOECOMM_API moecommResult_t moecommEpHandleGetNumRecvTokens(moecommEpHandle_t handle, int* numRecvTokens);
/* [OUT] srcRank / srcIndex: host [N] each (either may be NULL): the source rank and source
 * token index of every received row. Host copies; blocks on the CUDA backend. */
MOECOMM_API moecommResult_t moecommEpHandleGetSourceInfo(moecommEpHandle_t handle, int* srcRank, int* srcIndex,
                                                         int capacity);

/* ---- Low-latency (decode) mode ---- */

/* flags for low-latency calls */
#define MOECOMM_LL_SEND_ONLY 0x1u   /* only send; moecommEpComplete receives later */
#define MOECOMM_LL_ROUND_SCALE 0x2u /* FP8 scales rounded up to a power of two */
#define MOECOMM_LL_UE8M0 0x4u       /* FP8 scales packed as UE8M0 exponents (implies ROUND_SCALE; H % 512 == 0) */
#define MOECOMM_LL_ZERO_COPY 0x8u   /* combine: x was written into moecommEpLowLatencyCombineBuffer */
/* dispatch: this handle's combine sums each token's selections per expert rank on that rank
 * and sends one partial per (token, rank) instead of one row per (token, expert): fewer link
 * bytes, a different rounding (see moecommEpLowLatencyCombine). Needs topkWeights. */
#define MOECOMM_LL_PER_RANK_COMBINE 0x10u

#define MOECOMM_EP_LL_DISPATCH_ARGS_MAGIC 0x6d634c64u /* "mcLd" */
typedef struct {
  size_t size;
  unsigned magic;
  unsigned version;
  int numTokens;                 /* [IN] T, 0..maxTokensPerRank */
  const void* x;                 /* [IN] device [T,H] BF16 */
  const void* topkIdx;           /* [IN] device [T,K]; -1 = none */
  moecommDataType_t topkIdxType; /* [IN] moecommInt64 or moecommInt32 */
  moecommDataType_t recvType;    /* [IN] moecommFloat8E4M3 (cast in the kernel) or moecommBfloat16 */
  unsigned flags;                /* [IN] MOECOMM_LL_* */
  void* recvX;                   /* [OUT] device [E/R, R*maxTokensPerRank, H] of recvType */
  void* recvScales;              /* [OUT] FP8 only. device FP32 [E/R, R*maxT, H/128], or with
                                            MOECOMM_LL_UE8M0 int32 [E/R, R*maxT, H/512] (4 exponent
                                            bytes per int32, channel block 4i+j in byte j) */
  int* recvCount;                /* [OUT] device [E/R]: rows received per local expert */
  int* recvSrcInfo;              /* [OUT] device [E/R, R*maxT] or NULL: src rank * maxT + src token */
  int* cumulativeRecvStats;      /* [IN/OUT] device [E/R] or NULL: recvCount is added to it */
  moecommEvent_t waitEvent;      /* [IN] optional */
  const float* topkWeights;      /* [IN] device [T,K] with MOECOMM_LL_PER_RANK_COMBINE (the weights
                                            its combine applies), else NULL */
} moecommEpLowLatencyDispatchArgs_t;
#define MOECOMM_EP_LL_DISPATCH_ARGS_INIT                                                                               \
  {                                                                                                                    \
    sizeof(moecommEpLowLatencyDispatchArgs_t), MOECOMM_EP_LL_DISPATCH_ARGS_MAGIC, MOECOMM_VERSION_CODE, 0, NULL, NULL, \
        moecommInt64, moecommFloat8E4M3, 0u, NULL, NULL, NULL, NULL, NULL, NULL, NULL                                  \
  }

/* Collective. Rows of each local expert are packed from slot 0, ordered by source rank then
 * source token index. *handle receives a new handle, used by the combine and destroyed by the caller with
 * moecommEpHandleDestroy. With MOECOMM_LL_SEND_ONLY the outputs are valid only after
 * moecommEpComplete(handle). At most two low-latency operations may be in flight (sent but
 * not completed); a third is moecommInvalidUsage. Operations alternate between two buffer
 * slots: operation n needs operation n - 2 completed (else moecommInvalidUsage). */
MOECOMM_API moecommResult_t moecommEpLowLatencyDispatch(moecommEp_t ep, const moecommEpLowLatencyDispatchArgs_t* args,
                                                        moecommEpHandle_t* handle, moecommStream_t stream);

#define MOECOMM_EP_LL_COMBINE_ARGS_MAGIC 0x6d634c63u /* "mcLc" */
typedef struct {
  size_t size;
  unsigned magic;
  unsigned version;
  const void* x;                 /* [IN] device [E/R, R*maxT, H] BF16 expert outputs (dispatch layout) */
  const void* topkIdx;           /* [IN] device [T,K], the dispatch's */
  moecommDataType_t topkIdxType; /* [IN] */
  const float* topkWeights;      /* [IN] device [T,K]; NULL for a MOECOMM_LL_PER_RANK_COMBINE handle */
  void* out;                     /* [OUT] device [T,H] BF16: bf16(acc), acc = fmaf(weight[t][k], y_k, acc)
                                            over k ascending from +0.0f (y_k the expert output row) */
  unsigned flags;                /* [IN] MOECOMM_LL_SEND_ONLY, MOECOMM_LL_ZERO_COPY */
  moecommEvent_t waitEvent;      /* [IN] optional */
} moecommEpLowLatencyCombineArgs_t;
#define MOECOMM_EP_LL_COMBINE_ARGS_INIT                                                                           \
  {                                                                                                               \
    sizeof(moecommEpLowLatencyCombineArgs_t), MOECOMM_EP_LL_COMBINE_ARGS_MAGIC, MOECOMM_VERSION_CODE, NULL, NULL, \
        moecommInt64, NULL, NULL, 0u, NULL                                                                        \
  }

/* Collective. handle is the dispatch's. Entries whose expert is -1 or on a masked rank add
 * nothing. The number of tokens is the dispatch's T.
 * If the dispatch set MOECOMM_LL_PER_RANK_COMBINE, the dispatch's topkWeights are used
 * (args->topkWeights must be NULL) and the sum is taken per rank first:
 *   p_r = bf16(fmaf chain over k ascending, from +0.0f, of the entries whose expert is on r)
 *   out = bf16(+0.0f + p_r0 + p_r1 + ...)  FP32 adds over the ranks r with entries, ascending. */
MOECOMM_API moecommResult_t moecommEpLowLatencyCombine(moecommEp_t ep, const moecommEpLowLatencyCombineArgs_t* args,
                                                       moecommEpHandle_t handle, moecommStream_t stream);

/* Receives what a MOECOMM_LL_SEND_ONLY dispatch or combine sent. Asynchronous on stream.
 * Not collective: it involves only the calling rank (peers signal through shared flags).
 * Completing the older of two in-flight operations first lets the next one start.
 * stream may differ from the send's: the receive then waits for the send half (except under
 * stream capture, where both must be on one stream). Later calls on the handle follow the
 * stream order of this one's stream. */
MOECOMM_API moecommResult_t moecommEpComplete(moecommEp_t ep, moecommEpHandle_t handle, moecommStream_t stream);

/* Zero-copy combine: [OUT] buffer device [E/R, R*maxT, H] BF16 that the caller may write expert
 * outputs into before moecommEpLowLatencyCombine with MOECOMM_LL_ZERO_COPY. */
MOECOMM_API moecommResult_t moecommEpLowLatencyCombineBuffer(moecommEp_t ep, void** buffer);

/* Rank masking (low-latency mode). mask is host [R]: 1 = masked (skipped, its tokens absent). */
MOECOMM_API moecommResult_t moecommEpGetRankMask(moecommEp_t ep, int* mask);
MOECOMM_API moecommResult_t moecommEpSetRankMask(moecommEp_t ep, const int* mask);
MOECOMM_API moecommResult_t moecommEpClearRankMask(moecommEp_t ep);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOECOMM_H_ */
