// The topology layer: a plain-data graph of one machine (what hwloc and CUDA found, or what a
// saved JSON file says), and the choices made from it for each GPU: its NIC and its NVLink
// domain. Discovery, JSON and selection are separate so that selection can be tested on
// saved graphs of machines we do not have. docs/topology.md describes the model and format.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moecomm.h"

namespace moecomm {

// Bumped when a field changes meaning or a required field is added; the loader refuses
// other versions rather than guessing.
constexpr int kTopoFormatVersion = 1;

enum class TopoNodeKind : int {
  kMachine = 0,     // the root: one host
  kCpuSocket = 1,   // a processor package
  kNuma = 2,        // a NUMA node (memory + the CPUs and I/O close to it)
  kHostBridge = 3,  // a PCI root complex: where a PCI hierarchy leaves the CPU
  kPcieSwitch = 4,  // a PCI-to-PCI bridge (switch port or root port); devices below one share it
  kGpu = 5,
  kNic = 6,
  kPciDevice = 7,  // any other PCI device kept for information (storage, BMC display, ...)
};

enum class TopoLinkKind : int {
  kPci = 0,     // a PCIe edge between a device or bridge and its parent
  kNvlink = 1,  // GPU to GPU over NVLink (directly or through NVSwitch)
  kNet = 2,     // a network link (NIC to NIC, between hosts); only in hand-written graphs
  kP2p = 3,     // GPU to GPU peer access without NVLink evidence (PCIe peer-to-peer)
};

struct TopoNode {
  int id = -1;  // index in TopoGraph::nodes; ids are 0..N-1 in order
  TopoNodeKind kind = TopoNodeKind::kPciDevice;
  int parent = -1;         // -1 only for the machine (the root)
  std::string name;        // "mlx5_0" for NICs, "cuda3" for GPUs, "numa1", "package0", ...
  std::string pci_bus_id;  // "0000:17:00.0" (lowercase) for PCI objects, else ""
  std::string model;       // "H100 SXM5 80GB", "MT2910 Family [ConnectX-7]", CPU model; "" unknown
  int numa = -1;           // os index of the local NUMA node, -1 unknown
  int cuda_device = -1;    // GPUs: CUDA ordinal in the discovering process, -1 unknown
  bool rdma = false;       // NICs: has an RDMA (OpenFabrics / verbs) device
  uint16_t pci_vendor = 0, pci_device = 0, pci_class = 0;  // 0 = unknown; class is base<<8|sub
  double link_gbs = 0;                                     // bandwidth of the upstream PCIe link in GB/s, 0 unknown
  int pcie_gen = 0;                                        // PCIe generation of that link, 0 unknown
  int pcie_width = 0;                                      // lanes of that link, 0 unknown
  uint64_t memory_bytes = 0;                               // NUMA nodes: local memory, 0 unknown
  std::vector<std::string> os_devices;                     // OS names attached (e.g. "mlx5_0", "ibp24s0", "nvidia0")

  bool operator==(const TopoNode& other) const;
  bool operator!=(const TopoNode& other) const { return !(*this == other); }
};

struct TopoLink {
  int a = -1, b = -1;  // node ids; undirected
  TopoLinkKind kind = TopoLinkKind::kPci;
  double bandwidth_gbs = 0;  // 0 unknown
  // NVLink / P2P evidence from CUDA: cudaDevP2PAttrPerformanceRank and
  // cudaDevP2PAttrNativeAtomicSupported, -1 when not measured (PCI links, loaded files).
  int p2p_perf_rank = -1;
  int native_atomics = -1;
  std::string detail;  // how the link was found: "hwloc", "cuda_p2p", "file", ...

  bool operator==(const TopoLink& other) const;
  bool operator!=(const TopoLink& other) const { return !(*this == other); }
};

struct TopoGraph {
  std::string source;         // "hwloc 2.9.0", or what the file said
  std::string host;           // host name
  std::string nvlink_method;  // how NVLink was told from PCIe P2P (docs/topology.md)
  std::vector<TopoNode> nodes;
  std::vector<TopoLink> links;

  bool operator==(const TopoGraph& other) const;
  bool operator!=(const TopoGraph& other) const { return !(*this == other); }
};

// ---------------------------------------------------------------------------------------
// Graph helpers (graph.cc)
// ---------------------------------------------------------------------------------------

const char* topoNodeKindName(TopoNodeKind kind);  // "machine", "cpu_socket", ...
const char* topoLinkKindName(TopoLinkKind kind);  // "pci", "nvlink", "net", "p2p"
bool topoNodeKindFromName(const std::string& name, TopoNodeKind* kind);
bool topoLinkKindFromName(const std::string& name, TopoLinkKind* kind);

// Parses "0000:17:00.0", "17:00.0" (domain 0) or "00000000:17:00.0" (the 8-digit domain
// CUDA and NVML sometimes print), any case; writes the canonical lowercase
// "dddd:bb:dd.f". Returns false on anything else.
bool topoNormalizeBusId(const std::string& text, std::string* canonical);

// Appends a node and returns its id.
int topoAddNode(TopoGraph* graph, TopoNodeKind kind, int parent, const std::string& name);
// Checks the structural rules every graph must satisfy (one machine root, parents in range
// and acyclic, leaves are leaves, links between existing distinct nodes, NVLink between GPUs,
// GPUs and NICs carry unique bus ids). Returns InvalidArgument with a sentence otherwise.
moecommResult_t topoValidate(const TopoGraph& graph);
// Node ids of the GPUs, or of the RDMA-capable NICs, ordered by bus id (then name): the
// order that defines "GPU i" and "NIC i".
std::vector<int> topoSortedGpus(const TopoGraph& graph);
std::vector<int> topoSortedRdmaNics(const TopoGraph& graph);
// Finds the node with this bus id (any accepted spelling); -1 when none.
int topoFindByBusId(const TopoGraph& graph, const std::string& bus_id);

// ---------------------------------------------------------------------------------------
// Discovery (discover_hwloc.cc, discover_cuda.cc)
// ---------------------------------------------------------------------------------------

// Builds the graph of this machine with hwloc (NUMA nodes, packages, PCI bridges, GPUs,
// NICs, other important PCI devices), then adds what CUDA knows (ordinals, NVLink / P2P
// links) when the build has CUDA and a driver answers. No GPU or no driver is not an error.
moecommResult_t topoDiscover(TopoGraph* graph);
// The same, done once per process and copied afterwards (discovery costs milliseconds to a
// second on large hosts, and every communicator of the process would repeat it).
moecommResult_t topoDiscoverCached(TopoGraph* graph);

// What CUDA reports, kept apart from hwloc so that it can be merged into any graph.
struct TopoCudaGpu {
  int ordinal = -1;
  std::string pci_bus_id;  // canonical
};
struct TopoCudaPeer {
  int a = -1, b = -1;       // ordinals, a < b
  bool can_access = false;  // cudaDeviceCanAccessPeer in both directions
  int perf_rank = -1;       // cudaDevP2PAttrPerformanceRank (a -> b)
  int native_atomics = -1;  // cudaDevP2PAttrNativeAtomicSupported (a -> b)
};
// Fills the lists; leaves them empty (and returns Success) when the build has no CUDA or
// any CUDA call fails, including "no driver".
moecommResult_t topoProbeCuda(std::vector<TopoCudaGpu>* gpus, std::vector<TopoCudaPeer>* peers);
// The canonical bus id of one CUDA device; false when the build has no CUDA or CUDA fails.
bool topoCudaBusId(int cuda_device, std::string* bus_id);
// Marks the GPUs CUDA reported (adding the ones hwloc missed) and adds a link for each pair
// with peer access: NVLink when the pair supports native atomics, P2P otherwise.
void topoMergeCuda(const std::vector<TopoCudaGpu>& gpus, const std::vector<TopoCudaPeer>& peers, TopoGraph* graph);

// ---------------------------------------------------------------------------------------
// JSON (json.cc)
// ---------------------------------------------------------------------------------------

// The graph as JSON text with "format_version" (pretty-printed, stable key order).
std::string topoGraphToJson(const TopoGraph& graph);
// Parses and validates. Accepts a bare graph or any object with a "graph" member (so the
// output of moecommCommGetTopology replays). InvalidArgument with a sentence when malformed.
moecommResult_t topoGraphFromJson(const std::string& text, TopoGraph* graph);
// File wrappers: SystemError when the file cannot be read or written. Writing goes through
// a temporary file and a rename so that concurrent writers never leave a torn file.
moecommResult_t topoLoadFile(const std::string& path, TopoGraph* graph);
moecommResult_t topoDumpFile(const TopoGraph& graph, const std::string& path);

// ---------------------------------------------------------------------------------------
// Selection (select.cc)
// ---------------------------------------------------------------------------------------

// How a GPU reaches its NIC, best first; the lowest common ancestor decides.
enum class TopoPathClass : int {
  kSameSwitch = 0,      // below a common PCIe switch, the host bridge not crossed
  kSameHostBridge = 1,  // through the common root complex
  kSameNuma = 2,        // across root complexes of one NUMA node
  kCrossNuma = 3,       // across the CPU interconnect
};
const char* topoPathClassName(TopoPathClass path);  // "same_switch", ...

struct TopoGpuChoice {
  int gpu_node = -1;   // node id
  int gpu_index = -1;  // position among the graph's GPUs sorted by bus id
  int nic_node = -1;   // -1 = no RDMA NIC on this host
  TopoPathClass nic_path = TopoPathClass::kCrossNuma;
  int nic_hops = 0;           // PCIe edges from the GPU up to the common ancestor and down to the NIC
  bool rail_aligned = false;  // the tie among equally close NICs was broken by rail position
  int nvlink_domain = -1;     // smallest gpu_index of the GPU's NVLink component
};

struct TopoSelection {
  std::vector<TopoGpuChoice> gpus;               // indexed by gpu_index
  std::vector<std::vector<int>> nvlink_domains;  // gpu_index lists, ordered by domain id
};

// Chooses the NIC and NVLink domain of every GPU (rules in docs/topology.md).
moecommResult_t topoSelect(const TopoGraph& graph, TopoSelection* selection);
// Finds a GPU's choice by PCI bus id (any accepted spelling) or by CUDA ordinal as recorded
// in the graph. Returns nullptr when the graph has no such GPU.
const TopoGpuChoice* topoChoiceByBusId(const TopoGraph& graph, const TopoSelection& selection,
                                       const std::string& bus_id);
const TopoGpuChoice* topoChoiceByCudaDevice(const TopoGraph& graph, const TopoSelection& selection, int cuda_device);
// One line for logs and tools: "GPU 3 cuda3 0000:5d:00.0 numa0 -> NIC mlx5_3 0000:5c:00.0
// (same_switch, 2 hops), NVLink domain 0 (8 GPUs)".
std::string topoDescribeChoice(const TopoGraph& graph, const TopoSelection& selection, const TopoGpuChoice& choice);
// One line per GPU, or a sentence saying there is none.
std::string topoDescribeSelection(const TopoGraph& graph, const TopoSelection& selection);
// The selection as JSON text: {"gpus": [...], "nvlink_domains": [[...]]}.
std::string topoSelectionToJson(const TopoGraph& graph, const TopoSelection& selection);

// ---------------------------------------------------------------------------------------
// Entry point for the communicator (build.cc)
// ---------------------------------------------------------------------------------------

// Discovers the topology (or loads MOECOMM_TOPO_FILE), writes it to MOECOMM_TOPO_DUMP_FILE
// when set, selects, and returns the JSON text that moecommCommGetTopology hands out:
//   {"format_version", "graph", "selection", "this_rank": {cuda_device, gpu, nic, nvlink_domain}}
// cudaDevice -1 is a host rank (no GPU). A GPU the graph does not contain is reported as
// null with a warning, not as an error: the communicator works without topology.
moecommResult_t topoBuildForRank(int cudaDevice, std::string* json);

}  // namespace moecomm
