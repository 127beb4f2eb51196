// The one table of MOECOMM_* environment variables: name, type, default, one line of doc.
// docs/env.md is generated from it (`moecomm-info --env-markdown`), and a test keeps the
// two in step. Add a variable here and nowhere else.
//
// X(id, NAME, type, default, doc)   type: Int, String
#pragma once

#define MOECOMM_ENV_TABLE(X)                                                                                      \
  X(Backend, "MOECOMM_BACKEND", String, "auto",                                                                   \
    "Backend when the config says auto: auto (CUDA if the rank has a GPU, else host), host or cuda.")             \
  X(BootstrapTimeout, "MOECOMM_BOOTSTRAP_TIMEOUT", Int, "60000",                                                  \
    "Milliseconds any bootstrap wait (connect, allgather, barrier, send, recv) may take before Timeout.")         \
  X(SocketIfname, "MOECOMM_SOCKET_IFNAME", String, "",                                                            \
    "Network interface for the bootstrap (e.g. eth0); empty = first non-loopback interface, else loopback.")      \
  X(Debug, "MOECOMM_DEBUG", String, "NONE", "Log level: NONE, WARN, INFO or TRACE.")                              \
  X(DebugSubsys, "MOECOMM_DEBUG_SUBSYS", String, "ALL",                                                           \
    "Comma list of INIT, BOOTSTRAP, TOPO, EP, MEM, TRANSPORT, ENV or ALL; a leading ^ excludes them.")            \
  X(DebugFile, "MOECOMM_DEBUG_FILE", String, "",                                                                  \
    "Write the log to this file instead of stderr; %h expands to the host name, %p to the pid.")                  \
  X(ConfigFile, "MOECOMM_CONFIG_FILE", String, "",                                                                \
    "JSON file of defaults: an object whose keys are MOECOMM_* names; the environment wins over it.")             \
  X(TopoFile, "MOECOMM_TOPO_FILE", String, "",                                                                    \
    "Load the topology from this JSON file instead of discovering it (replay of a saved machine).")               \
  X(TopoDumpFile, "MOECOMM_TOPO_DUMP_FILE", String, "",                                                           \
    "Write the discovered topology as JSON to this file when a communicator is created.")                         \
  X(EpNumSms, "MOECOMM_EP_NUM_SMS", Int, "24", "SM budget of the EP kernels when the EP config leaves it 0.")     \
  X(EpSendBatch, "MOECOMM_EP_SEND_BATCH", Int, "0",                                                             \
    "A normal-mode sending channel publishes its tail every this many rows: 0 (default) the dispatch 64 on 4 "  \
    "or more ranks, else 32, the combine 32; 32, 64 or 128 set both (developer sweep; rounded down to a "       \
    "multiple of the sending warps; the combine ramps up to it).")                                              \
  X(EpDispatchSendWarps, "MOECOMM_EP_DISPATCH_SEND_WARPS", Int, "0",                                            \
    "Developer sweep: warps of the 16 per normal-mode dispatch block that send (1-15; 0: 6, 8 for a direct "    \
    "dispatch); the others receive.")                                                                            \
  X(EpCombineSendWarps, "MOECOMM_EP_COMBINE_SEND_WARPS", Int, "0",                                              \
    "Developer sweep: warps of the 16 per normal-mode combine block that send (1-15; 0: 72 / channels, 3 to "   \
    "8); the others reduce.")                                                                                    \
  X(EpDispatchVariant, "MOECOMM_EP_DISPATCH_VARIANT", Int, "0",                                                 \
    "Developer sweep: normal-mode dispatch, 0 default, 1 bulk-copy copy-out, 2 senders prefetch rows by bulk "   \
    "copies, 3 senders prefetch and store rows by bulk copies.")                                                 \
  X(EpCombineVariant, "MOECOMM_EP_COMBINE_VARIANT", Int, "1",                                                   \
    "Normal-mode combine reduction: 1 (default) deeper register pipeline on <= 8 ranks without bias, else 0; "  \
    "0 registers; 2 bulk copies into shared memory (developer sweep).")                                          \
  X(EpPull, "MOECOMM_EP_PULL", Int, "0",                                                                       \
    "Developer sweep: normal-mode rows that cross a link are pulled by the receivers from the sender's own "    \
    "staging instead of pushed into the receiver's: 1 dispatch, 2 combine, 3 both, 0 neither.")                 \
  X(EpDirectCombine, "MOECOMM_EP_DIRECT_COMBINE", Int, "1",                                                     \
    "Normal-mode combine reads the peers' expert outputs straight from their memory when every rank's combine "  \
    "input (and weights) lies in moecommMemAlloc memory at the same offset: 1 when possible, 0 never.")          \
  X(EpDirectDispatch, "MOECOMM_EP_DIRECT_DISPATCH", Int, "1",                                                   \
    "Normal-mode dispatch stores x rows straight into the destinations' recvX when every rank's recvX lies in "  \
    "moecommMemAlloc memory at the same offset (default kernels only): 1 when possible, 0 never.")              \
  X(EpBalancedDispatch, "MOECOMM_EP_BALANCED_DISPATCH", Int, "1",                                               \
    "Normal-mode direct dispatch: 1 makes the sending warps of every block claim the rank's tokens one at "     \
    "a time, so blocks on SMs that push slowly send fewer rows (2x H200: 5-9 % faster, "                        \
    "docs/ep-normal-gpu.md); 0 makes each block send its own channel's tokens. Every rank must use the "        \
    "same value, else none balances.")                                                                          \
  X(EpDispatchPullX, "MOECOMM_EP_DISPATCH_PULL_X", Int, "0",                                                    \
    "Developer, measured slower on 2 GPUs: 1 makes the normal-mode receivers read x rows from the sources' x "  \
    "when every rank's x lies in moecommMemAlloc memory at the same offset (the senders push only scales, "     \
    "ids, weights and token; default kernels only); 0 never.")                                                  \
  X(EpRingStages, "MOECOMM_EP_RING_STAGES", Int, "4",                                                           \
    "Bulk-copy variants: shared-memory stages per receiving warp, 2-32 (fewer if they do not fit).")            \
  X(EpRingStageBytes, "MOECOMM_EP_RING_STAGE_BYTES", Int, "4096",                                               \
    "Bulk-copy variants: bytes per stage, a multiple of 16 from 512 to 65536.")                                 \
  X(EpCluster, "MOECOMM_EP_CLUSTER", Int, "2",                                                                  \
    "Normal-mode dispatch and combine launched in thread-block clusters of this many blocks (1-8; 1: a plain "  \
    "launch; a channel count it does not divide, or a device without clusters: plain). It changes where the "   \
    "hardware places the blocks: fewer land on SMs that push slowly (2x H200: BF16 dispatch 8 % faster).")      \
  X(LlTimeout, "MOECOMM_LL_TIMEOUT", Int, "10000",                                                                \
    "Milliseconds a low-latency operation waits for a peer before masking it.")                                   \
  X(LlTransport, "MOECOMM_LL_TRANSPORT", String, "nvlink",                                                        \
    "How the low-latency kernels reach peers: nvlink (stores into the mapped peer buffer) or staged (stores "     \
    "into a local mirror, then explicit puts: the shape of an RDMA transport, for testing the kernels' "          \
    "transport interface).")                                                                                      \
  X(KernelTimeout, "MOECOMM_KERNEL_TIMEOUT", Int, "30000",                                                        \
    "Milliseconds a GPU spin-wait may last before the kernel gives up and reports Timeout.")                      \
  X(Rank, "MOECOMM_RANK", Int, "-1", "This process's rank, read by moecommCommInitFromEnv (set by moecomm-run).") \
  X(Nranks, "MOECOMM_NRANKS", Int, "0", "The rank count, read by moecommCommInitFromEnv (set by moecomm-run).")   \
  X(UniqueId, "MOECOMM_UNIQUE_ID", String, "",                                                                    \
    "The communicator id as hex text, read by moecommCommInitFromEnv (set by moecomm-run).")                      \
  X(LocalRank, "MOECOMM_LOCAL_RANK", Int, "-1",                                                                   \
    "The rank's index among the ranks of its host (set by moecomm-run); programs use it to pick a GPU.")          \
  X(NvlinkShare, "MOECOMM_NVLINK_SHARE", String, "auto",                                                          \
    "How GPU ranks share symmetric memory: auto, inprocess (threads of one process), cumem (cuMem POSIX-fd "      \
    "handles) or ipc (legacy CUDA IPC); every rank must use the same value.")
