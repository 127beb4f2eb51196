// What the CUDA runtime knows about GPUs: ordinals, bus ids and peer access. Any CUDA error,
// "no driver" included, means "no GPUs": the library must run on machines without them.
#include <cstdio>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "topo/topology.h"

#if MOECOMM_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moecomm {
namespace {

#if MOECOMM_HAVE_CUDA
// Logs a failed CUDA call and clears the runtime's last error so that the caller's next
// cudaGetLastError does not report our probing.
bool cudaOk(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return true;
  MC_INFO(kLogTopo, "topology: %s failed (%s); treating it as no GPU information", what, cudaGetErrorString(status));
  (void)cudaGetLastError();
  return false;
}

void probePeers(int count, std::vector<TopoCudaPeer>* peers) {
  for (int a = 0; a < count; ++a) {
    for (int b = a + 1; b < count; ++b) {
      TopoCudaPeer peer;
      peer.a = a;
      peer.b = b;
      int forward = 0, backward = 0;
      if (!cudaOk(cudaDeviceCanAccessPeer(&forward, a, b), "cudaDeviceCanAccessPeer") ||
          !cudaOk(cudaDeviceCanAccessPeer(&backward, b, a), "cudaDeviceCanAccessPeer")) {
        continue;
      }
      peer.can_access = forward == 1 && backward == 1;
      int value = 0;
      if (cudaOk(cudaDeviceGetP2PAttribute(&value, cudaDevP2PAttrPerformanceRank, a, b), "cudaDeviceGetP2PAttribute")) {
        peer.perf_rank = value;
      }
      if (cudaOk(cudaDeviceGetP2PAttribute(&value, cudaDevP2PAttrNativeAtomicSupported, a, b),
                 "cudaDeviceGetP2PAttribute")) {
        peer.native_atomics = value;
      }
      peers->push_back(peer);
    }
  }
}
#endif

int numaOfPciDevice(const std::string& bus_id) {
  std::ifstream in("/sys/bus/pci/devices/" + bus_id + "/numa_node");
  int numa = -1;
  if (!(in >> numa)) return -1;
  return numa;
}

int findGpuNode(const TopoGraph& graph, int cuda_device) {
  for (const TopoNode& node : graph.nodes) {
    if (node.kind == TopoNodeKind::kGpu && node.cuda_device == cuda_device) return node.id;
  }
  return -1;
}

// Where a GPU hwloc did not report goes: below its NUMA node when the graph has it, else
// below the machine.
int parentForMissingGpu(const TopoGraph& graph, int numa) {
  int machine = 0;
  for (const TopoNode& node : graph.nodes) {
    if (node.kind == TopoNodeKind::kNuma && numa >= 0 && node.numa == numa) return node.id;
    if (node.kind == TopoNodeKind::kMachine) machine = node.id;
  }
  return machine;
}

}  // namespace

moecommResult_t topoProbeCuda(std::vector<TopoCudaGpu>* gpus, std::vector<TopoCudaPeer>* peers) {
  gpus->clear();
  peers->clear();
#if MOECOMM_HAVE_CUDA
  int count = 0;
  if (!cudaOk(cudaGetDeviceCount(&count), "cudaGetDeviceCount")) return moecommSuccess;
  for (int ordinal = 0; ordinal < count; ++ordinal) {
    char bus_id[64] = {0};
    if (!cudaOk(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), ordinal), "cudaDeviceGetPCIBusId")) continue;
    TopoCudaGpu gpu;
    gpu.ordinal = ordinal;
    if (!topoNormalizeBusId(bus_id, &gpu.pci_bus_id)) {
      MC_WARN(kLogTopo, "topology: CUDA device %d has an unreadable PCI bus id \"%s\"; leaving it out", ordinal,
              bus_id);
      continue;
    }
    gpus->push_back(gpu);
  }
  probePeers(count, peers);
#endif
  return moecommSuccess;
}

bool topoCudaBusId(int cuda_device, std::string* bus_id) {
#if MOECOMM_HAVE_CUDA
  char text[64] = {0};
  if (!cudaOk(cudaDeviceGetPCIBusId(text, sizeof(text), cuda_device), "cudaDeviceGetPCIBusId")) return false;
  return topoNormalizeBusId(text, bus_id);
#else
  (void)cuda_device;
  (void)bus_id;
  return false;
#endif
}

void topoMergeCuda(const std::vector<TopoCudaGpu>& gpus, const std::vector<TopoCudaPeer>& peers, TopoGraph* graph) {
#if MOECOMM_HAVE_CUDA
  graph->nvlink_method = gpus.empty() ? "none: CUDA reported no device"
                                      : "cuda_p2p: peer access with native atomics is NVLink, without is PCIe P2P";
#else
  graph->nvlink_method = "none: built without CUDA";
#endif
  // When CUDA answered, its ordinals are the ones this process uses; any ordinal hwloc's own
  // CUDA plugin recorded is dropped rather than trusted.
  for (TopoNode& node : graph->nodes) {
    if (node.kind == TopoNodeKind::kGpu && !gpus.empty() && node.cuda_device >= 0) {
      node.cuda_device = -1;
      node.name = "gpu@" + node.pci_bus_id;
    }
  }
  for (const TopoCudaGpu& gpu : gpus) {
    int id = topoFindByBusId(*graph, gpu.pci_bus_id);
    if (id >= 0 && graph->nodes[id].kind != TopoNodeKind::kGpu && graph->nodes[id].kind != TopoNodeKind::kPciDevice) {
      MC_WARN(kLogTopo, "topology: CUDA device %d is at %s, which hwloc reports as a %s; leaving it out", gpu.ordinal,
              gpu.pci_bus_id.c_str(), topoNodeKindName(graph->nodes[id].kind));
      continue;
    }
    if (id < 0) {
      int numa = numaOfPciDevice(gpu.pci_bus_id);
      id = topoAddNode(graph, TopoNodeKind::kGpu, parentForMissingGpu(*graph, numa), "");
      graph->nodes[id].pci_bus_id = gpu.pci_bus_id;
      graph->nodes[id].numa = numa;
    }
    TopoNode& node = graph->nodes[id];
    node.kind = TopoNodeKind::kGpu;  // hwloc may have typed an unfamiliar accelerator as a plain device
    node.cuda_device = gpu.ordinal;
    node.name = "cuda" + std::to_string(gpu.ordinal);
  }
  for (const TopoCudaPeer& peer : peers) {
    if (!peer.can_access) continue;
    TopoLink link;
    link.a = findGpuNode(*graph, peer.a);
    link.b = findGpuNode(*graph, peer.b);
    if (link.a < 0 || link.b < 0) continue;
    // The runtime cannot name the wire. Native atomics between peers exist over NVLink and
    // not over PCIe, so they are the hint; the raw attributes stay in the link for review.
    link.kind = peer.native_atomics == 1 ? TopoLinkKind::kNvlink : TopoLinkKind::kP2p;
    link.p2p_perf_rank = peer.perf_rank;
    link.native_atomics = peer.native_atomics;
    link.detail = "cuda_p2p";
    graph->links.push_back(link);
  }
}

}  // namespace moecomm
