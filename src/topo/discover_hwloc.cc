// Discovery of the host with hwloc 2.x: packages, NUMA nodes, PCI host bridges and bridges,
// GPUs, NICs and the other PCI devices hwloc considers important.
#include <hwloc.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "topo/topology.h"

#if HWLOC_API_VERSION < 0x00020000 || HWLOC_API_VERSION >= 0x00030000
#error "libmoecomm's topology discovery is written for the hwloc 2.x API"
#endif

namespace moecomm {
namespace {

struct HwlocTopologyDeleter {
  void operator()(hwloc_topology* topology) const { hwloc_topology_destroy(topology); }
};
using HwlocTopologyPtr = std::unique_ptr<hwloc_topology, HwlocTopologyDeleter>;
// In C++ the attribute structs are nested in the union.
using PciAttr = hwloc_obj_attr_u::hwloc_pcidev_attr_s;
using BridgeAttr = hwloc_obj_attr_u::hwloc_bridge_attr_s;

std::string infoOf(hwloc_obj_t obj, const char* name) {
  const char* value = hwloc_obj_get_info_by_name(obj, name);
  return value ? value : "";
}

std::string busIdOf(const PciAttr& pci) {
  char text[32];
  std::snprintf(text, sizeof(text), "%04x:%02x:%02x.%x", static_cast<unsigned>(pci.domain), pci.bus, pci.dev, pci.func);
  return text;
}

// hwloc reports the link speed in GB/s as a float; two decimals are all that is meaningful,
// and rounding keeps the JSON readable ("31.51", not "31.507699966430664").
double roundGbs(float gbs) { return std::round(static_cast<double>(gbs) * 100.0) / 100.0; }

std::string readSysfsLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

// hwloc folds speed and width into one bandwidth; the generation and width are worth
// keeping apart (a Gen4 x16 slot and a Gen5 x8 slot look the same in GB/s).
void readPcieLink(const std::string& bus_id, TopoNode* node) {
  const std::string dir = "/sys/bus/pci/devices/" + bus_id + "/";
  double gts = std::atof(readSysfsLine(dir + "current_link_speed").c_str());
  static const struct {
    double gts;
    int gen;
  } kGenerations[] = {{2.5, 1}, {5, 2}, {8, 3}, {16, 4}, {32, 5}, {64, 6}};
  for (const auto& entry : kGenerations) {
    if (std::fabs(gts - entry.gts) < 0.1) node->pcie_gen = entry.gen;
  }
  node->pcie_width = std::atoi(readSysfsLine(dir + "current_link_width").c_str());
  if (node->pcie_width < 0 || node->pcie_width > 32) node->pcie_width = 0;
}

bool startsWith(const char* text, const char* prefix) {
  return text != nullptr && std::strncmp(text, prefix, std::strlen(prefix)) == 0;
}

// The OS devices hwloc hangs below a PCI device say what it is more reliably than the class
// code: an RDMA device has an OpenFabrics child, a compute GPU a CUDA/OpenCL/Level Zero
// co-processor or an NVML/RSMI GPU child.
struct OsDeviceSummary {
  std::vector<std::string> names;
  std::string openfabrics;  // first OpenFabrics name (mlx5_0)
  std::string network;      // first network interface name (ibp24s0, eth0)
  bool compute = false;     // a CUDA/OpenCL/NVML/RSMI/Level Zero device
  int cuda_ordinal = -1;    // from hwloc's own CUDA plugin ("cuda3"), when it ran
};

OsDeviceSummary summarizeOsDevices(hwloc_obj_t pci) {
  OsDeviceSummary summary;
  for (hwloc_obj_t child = pci->io_first_child; child != nullptr; child = child->next_sibling) {
    if (child->type != HWLOC_OBJ_OS_DEVICE || child->name == nullptr) continue;
    summary.names.push_back(child->name);
    switch (child->attr->osdev.type) {
      case HWLOC_OBJ_OSDEV_OPENFABRICS:
        if (summary.openfabrics.empty()) summary.openfabrics = child->name;
        break;
      case HWLOC_OBJ_OSDEV_NETWORK:
        if (summary.network.empty()) summary.network = child->name;
        break;
      case HWLOC_OBJ_OSDEV_COPROC:
        summary.compute = true;
        if (startsWith(child->name, "cuda")) summary.cuda_ordinal = std::atoi(child->name + 4);
        break;
      case HWLOC_OBJ_OSDEV_GPU:
        // DRM nodes (card0, renderD128) exist for any display adapter, a BMC's included;
        // only library-backed GPU devices (nvml0, rsmi0) mark a compute GPU.
        if (!startsWith(child->name, "card") && !startsWith(child->name, "renderD") &&
            !startsWith(child->name, "controlD")) {
          summary.compute = true;
        }
        break;
      default:
        break;
    }
  }
  return summary;
}

TopoNodeKind classifyPciDevice(const PciAttr& pci, const OsDeviceSummary& os) {
  const unsigned base_class = pci.class_id >> 8;
  constexpr unsigned kVendorNvidia = 0x10de;
  if ((pci.vendor_id == kVendorNvidia && base_class == 0x03) || os.compute) return TopoNodeKind::kGpu;
  if (base_class == 0x02 || !os.openfabrics.empty() || !os.network.empty()) return TopoNodeKind::kNic;
  return TopoNodeKind::kPciDevice;
}

class HwlocWalker {
 public:
  explicit HwlocWalker(TopoGraph* graph) : graph_(graph) {}

  // Pass 1: the CPU side (machine, packages, NUMA nodes), so that pass 2 can hang each PCI
  // hierarchy below the NUMA node it is local to.
  void walkCpuSide(hwloc_obj_t obj, int graph_parent) {
    if (obj->type == HWLOC_OBJ_MACHINE) {
      std::string host = infoOf(obj, "HostName");
      graph_parent = topoAddNode(graph_, TopoNodeKind::kMachine, -1, host);
      graph_->nodes[graph_parent].numa = singleNuma(obj);
      cpu_nodes_[obj] = graph_parent;
    } else if (obj->type == HWLOC_OBJ_PACKAGE) {
      graph_parent = topoAddNode(graph_, TopoNodeKind::kCpuSocket, graph_parent, "package" + osIndexText(obj));
      graph_->nodes[graph_parent].numa = singleNuma(obj);
      graph_->nodes[graph_parent].model = infoOf(obj, "CPUModel");
      cpu_nodes_[obj] = graph_parent;
    }
    for (hwloc_obj_t memory = obj->memory_first_child; memory != nullptr; memory = memory->next_sibling) {
      addMemory(memory, graph_parent);
    }
    for (hwloc_obj_t child = obj->first_child; child != nullptr; child = child->next_sibling) {
      walkCpuSide(child, graph_parent);
    }
  }

  // Pass 2: every I/O subtree, attached where hwloc says it is local.
  void walkIoSide(hwloc_obj_t obj) {
    if (obj->io_first_child != nullptr) {
      int numa = singleNuma(obj);
      int graph_parent = numa >= 0 && numa_nodes_.count(numa) ? numa_nodes_[numa] : nearestCpuNode(obj);
      for (hwloc_obj_t io = obj->io_first_child; io != nullptr; io = io->next_sibling) addIo(io, graph_parent, numa);
    }
    for (hwloc_obj_t child = obj->first_child; child != nullptr; child = child->next_sibling) walkIoSide(child);
  }

 private:
  static std::string osIndexText(hwloc_obj_t obj) {
    return obj->os_index == HWLOC_UNKNOWN_INDEX ? std::string("?") : std::to_string(obj->os_index);
  }

  // The NUMA node an object is local to, when exactly one is.
  static int singleNuma(hwloc_obj_t obj) {
    if (obj->nodeset == nullptr || hwloc_bitmap_weight(obj->nodeset) != 1) return -1;
    return hwloc_bitmap_first(obj->nodeset);
  }

  int nearestCpuNode(hwloc_obj_t obj) {
    for (hwloc_obj_t at = obj; at != nullptr; at = at->parent) {
      auto found = cpu_nodes_.find(at);
      if (found != cpu_nodes_.end()) return found->second;
    }
    return 0;  // the machine, always node 0
  }

  void addMemory(hwloc_obj_t memory, int graph_parent) {
    if (memory->type == HWLOC_OBJ_NUMANODE) {
      int id = topoAddNode(graph_, TopoNodeKind::kNuma, graph_parent, "numa" + osIndexText(memory));
      TopoNode& node = graph_->nodes[id];
      node.numa = memory->os_index == HWLOC_UNKNOWN_INDEX ? -1 : static_cast<int>(memory->os_index);
      node.memory_bytes = memory->attr->numanode.local_memory;
      if (node.numa >= 0) numa_nodes_[node.numa] = id;
      return;
    }
    // Memory-side caches sit between their parent and the NUMA nodes they cache.
    for (hwloc_obj_t child = memory->memory_first_child; child != nullptr; child = child->next_sibling) {
      addMemory(child, graph_parent);
    }
  }

  int addPciNode(TopoNodeKind kind, int graph_parent, int numa, const PciAttr& pci, const std::string& name) {
    int id = topoAddNode(graph_, kind, graph_parent, name);
    TopoNode& node = graph_->nodes[id];
    node.pci_bus_id = busIdOf(pci);
    node.numa = numa;
    node.pci_vendor = pci.vendor_id;
    node.pci_device = pci.device_id;
    node.pci_class = pci.class_id;
    node.link_gbs = roundGbs(pci.linkspeed);
    readPcieLink(node.pci_bus_id, &node);
    TopoLink link;
    link.a = id;
    link.b = graph_parent;
    link.kind = TopoLinkKind::kPci;
    link.bandwidth_gbs = node.link_gbs;
    link.detail = "hwloc";
    graph_->links.push_back(link);
    return id;
  }

  void addIo(hwloc_obj_t obj, int graph_parent, int numa) {
    if (obj->type == HWLOC_OBJ_BRIDGE) {
      int id;
      const BridgeAttr& bridge = obj->attr->bridge;
      if (bridge.upstream_type == HWLOC_OBJ_BRIDGE_HOST) {
        char name[32];
        std::snprintf(name, sizeof(name), "pci%04x:%02x", static_cast<unsigned>(bridge.downstream.pci.domain),
                      bridge.downstream.pci.secondary_bus);
        id = topoAddNode(graph_, TopoNodeKind::kHostBridge, graph_parent, name);
        graph_->nodes[id].numa = numa;
      } else {
        id = addPciNode(TopoNodeKind::kPcieSwitch, graph_parent, numa, bridge.upstream.pci, "");
        graph_->nodes[id].name = "bridge@" + graph_->nodes[id].pci_bus_id;
      }
      for (hwloc_obj_t child = obj->io_first_child; child != nullptr; child = child->next_sibling) {
        addIo(child, id, numa);
      }
      return;
    }
    if (obj->type == HWLOC_OBJ_PCI_DEVICE) {
      addPciDevice(obj, graph_parent, numa);
      return;
    }
    // OS devices without a PCI parent (soft-RoCE, virtual interfaces, block devices) are not
    // where GPU traffic goes; they are left out.
    MC_TRACE(kLogTopo, "topology: skipping I/O object %s of type %d outside PCI", obj->name ? obj->name : "?",
             static_cast<int>(obj->type));
  }

  void addPciDevice(hwloc_obj_t obj, int graph_parent, int numa) {
    const PciAttr& pci = obj->attr->pcidev;
    OsDeviceSummary os = summarizeOsDevices(obj);
    TopoNodeKind kind = classifyPciDevice(pci, os);
    int id = addPciNode(kind, graph_parent, numa, pci, "");
    TopoNode& node = graph_->nodes[id];
    node.os_devices = os.names;
    node.model = infoOf(obj, "PCIDevice");
    if (kind == TopoNodeKind::kNic) {
      node.rdma = !os.openfabrics.empty();
      node.name = !os.openfabrics.empty() ? os.openfabrics
                  : !os.network.empty()   ? os.network
                                          : "nic@" + node.pci_bus_id;
    } else if (kind == TopoNodeKind::kGpu) {
      node.cuda_device = os.cuda_ordinal;
      node.name = os.cuda_ordinal >= 0 ? "cuda" + std::to_string(os.cuda_ordinal) : "gpu@" + node.pci_bus_id;
    } else {
      node.name = os.names.empty() ? "pci@" + node.pci_bus_id : os.names.front();
    }
    // Functions behind a PCI device (rare, e.g. an upstream port hwloc typed as a device)
    // are still part of the hierarchy.
    for (hwloc_obj_t child = obj->io_first_child; child != nullptr; child = child->next_sibling) {
      if (child->type != HWLOC_OBJ_OS_DEVICE) addIo(child, id, numa);
    }
  }

  TopoGraph* graph_;
  std::map<hwloc_obj_t, int> cpu_nodes_;  // machine and packages -> graph node
  std::map<int, int> numa_nodes_;         // NUMA os index -> graph node
};

// hwloc unloads its plugins when the last topology is destroyed, and the memory that
// libpciaccess (behind the pci plugin) never frees is then reported by LeakSanitizer from an
// unknown module. One empty topology kept for the life of the process keeps them loaded.
void keepHwlocPluginsLoaded() {
  static hwloc_topology_t anchor = [] {
    hwloc_topology_t topology = nullptr;
    if (hwloc_topology_init(&topology) != 0) topology = nullptr;
    return topology;
  }();
  (void)anchor;
}

moecommResult_t loadHwlocTopology(HwlocTopologyPtr* out) {
  keepHwlocPluginsLoaded();
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) {
    return setError(moecommSystemError, "hwloc_topology_init failed: %s", std::strerror(errno));
  }
  HwlocTopologyPtr topology(raw);
  // KEEP_IMPORTANT keeps GPUs, NICs, storage and the bridges that lead to them, and drops
  // the rest (host bridges' own functions, unclassified devices), which keeps the graph short.
  if (hwloc_topology_set_io_types_filter(topology.get(), HWLOC_TYPE_FILTER_KEEP_IMPORTANT) != 0) {
    return setError(moecommSystemError, "hwloc_topology_set_io_types_filter failed: %s", std::strerror(errno));
  }
  // These plugins add nothing we use and can be slow or intrusive: OpenCL creates contexts on
  // every GPU, "gl" contacts X servers. Unknown names are harmless, so the result is ignored.
  for (const char* component : {"opencl", "gl", "levelzero", "rsmi"}) {
    (void)hwloc_topology_set_components(topology.get(), HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, component);
  }
  if (hwloc_topology_load(topology.get()) != 0) {
    return setError(moecommSystemError, "hwloc_topology_load failed: %s", std::strerror(errno));
  }
  *out = std::move(topology);
  return moecommSuccess;
}

}  // namespace

moecommResult_t topoDiscover(TopoGraph* graph) {
  HwlocTopologyPtr topology;
  MC_CHECK(loadHwlocTopology(&topology));
  TopoGraph discovered;
  hwloc_obj_t root = hwloc_get_root_obj(topology.get());
  HwlocWalker walker(&discovered);
  walker.walkCpuSide(root, -1);
  if (discovered.nodes.empty() || discovered.nodes[0].kind != TopoNodeKind::kMachine) {
    return setError(moecommInternalError, "hwloc returned a topology whose root is not a machine");
  }
  walker.walkIoSide(root);
  std::string version = infoOf(root, "hwlocVersion");
  discovered.source = "hwloc " + (version.empty() ? std::string("2.x") : version);
  discovered.host = discovered.nodes[0].name;
  if (discovered.host.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    discovered.host = host;
    discovered.nodes[0].name = host;
  }

  std::vector<TopoCudaGpu> cuda_gpus;
  std::vector<TopoCudaPeer> cuda_peers;
  MC_CHECK(topoProbeCuda(&cuda_gpus, &cuda_peers));
  topoMergeCuda(cuda_gpus, cuda_peers, &discovered);

  moecommResult_t valid = topoValidate(discovered);
  if (valid != moecommSuccess) {
    addErrorContext("the discovered topology is inconsistent");
    return moecommInternalError;
  }
  MC_INFO(kLogTopo, "topology: %s on %s found %zu nodes and %zu links", discovered.source.c_str(),
          discovered.host.c_str(), discovered.nodes.size(), discovered.links.size());
  *graph = std::move(discovered);
  return moecommSuccess;
}

moecommResult_t topoDiscoverCached(TopoGraph* graph) {
  static std::mutex mutex;
  static bool cached = false;
  static TopoGraph* cache = new TopoGraph();  // never destroyed: usable during exit
  std::lock_guard<std::mutex> lock(mutex);
  if (!cached) {
    MC_CHECK(topoDiscover(cache));
    cached = true;
  }
  *graph = *cache;
  return moecommSuccess;
}

}  // namespace moecomm
