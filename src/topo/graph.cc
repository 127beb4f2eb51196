// Names, bus ids, structural validation and orderings of the topology graph.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <set>

#include "core/error.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

struct KindName {
  int kind;
  const char* name;
};

constexpr KindName kNodeKindNames[] = {
    {static_cast<int>(TopoNodeKind::kMachine), "machine"},
    {static_cast<int>(TopoNodeKind::kCpuSocket), "cpu_socket"},
    {static_cast<int>(TopoNodeKind::kNuma), "numa"},
    {static_cast<int>(TopoNodeKind::kHostBridge), "host_bridge"},
    {static_cast<int>(TopoNodeKind::kPcieSwitch), "pcie_switch"},
    {static_cast<int>(TopoNodeKind::kGpu), "gpu"},
    {static_cast<int>(TopoNodeKind::kNic), "nic"},
    {static_cast<int>(TopoNodeKind::kPciDevice), "pci_device"},
};

constexpr KindName kLinkKindNames[] = {
    {static_cast<int>(TopoLinkKind::kPci), "pci"},
    {static_cast<int>(TopoLinkKind::kNvlink), "nvlink"},
    {static_cast<int>(TopoLinkKind::kNet), "net"},
    {static_cast<int>(TopoLinkKind::kP2p), "p2p"},
};

bool isLeafKind(TopoNodeKind kind) {
  return kind == TopoNodeKind::kGpu || kind == TopoNodeKind::kNic || kind == TopoNodeKind::kPciDevice;
}

// Bus ids identify GPUs and NICs across hwloc, CUDA and saved files, so two of them may not
// share one.
moecommResult_t validateBusIds(const TopoGraph& graph) {
  std::set<std::string> seen;
  for (const TopoNode& node : graph.nodes) {
    bool needs_bus_id = node.kind == TopoNodeKind::kGpu || node.kind == TopoNodeKind::kNic;
    if (node.pci_bus_id.empty()) {
      MC_REQUIRE(!needs_bus_id, moecommInvalidArgument, "topology node %d (%s) has no PCI bus id", node.id,
                 topoNodeKindName(node.kind));
      continue;
    }
    std::string canonical;
    MC_REQUIRE(topoNormalizeBusId(node.pci_bus_id, &canonical) && canonical == node.pci_bus_id, moecommInvalidArgument,
               "topology node %d has PCI bus id \"%s\", expected the form 0000:17:00.0", node.id,
               node.pci_bus_id.c_str());
    if (!needs_bus_id) continue;
    MC_REQUIRE(seen.insert(node.pci_bus_id).second, moecommInvalidArgument,
               "topology node %d reuses PCI bus id %s of another GPU or NIC", node.id, node.pci_bus_id.c_str());
  }
  return moecommSuccess;
}

moecommResult_t validateTree(const TopoGraph& graph) {
  const int count = static_cast<int>(graph.nodes.size());
  MC_REQUIRE(count > 0, moecommInvalidArgument, "the topology has no nodes (it needs at least the machine)");
  int roots = 0;
  for (int i = 0; i < count; ++i) {
    const TopoNode& node = graph.nodes[i];
    MC_REQUIRE(node.id == i, moecommInvalidArgument,
               "topology node at position %d has id %d; ids must be 0..%d in order", i, node.id, count - 1);
    if (node.kind == TopoNodeKind::kMachine) {
      MC_REQUIRE(node.parent == -1, moecommInvalidArgument, "topology node %d is a machine but has a parent (%d)", i,
                 node.parent);
      ++roots;
      continue;
    }
    MC_REQUIRE(node.parent >= 0 && node.parent < count, moecommInvalidArgument,
               "topology node %d (%s) has parent %d, which is not a node id", i, topoNodeKindName(node.kind),
               node.parent);
    const TopoNode& parent = graph.nodes[node.parent];
    MC_REQUIRE(!isLeafKind(parent.kind), moecommInvalidArgument,
               "topology node %d has parent %d, a %s, which cannot have children", i, node.parent,
               topoNodeKindName(parent.kind));
  }
  MC_REQUIRE(roots == 1, moecommInvalidArgument, "the topology has %d machine nodes; exactly one is the root", roots);
  // Every parent chain must reach the root within `count` steps, otherwise it loops.
  for (int i = 0; i < count; ++i) {
    int at = i;
    int steps = 0;
    while (at != -1 && steps <= count) {
      at = graph.nodes[at].parent;
      ++steps;
    }
    MC_REQUIRE(at == -1, moecommInvalidArgument, "topology node %d has a parent chain that loops", i);
  }
  return moecommSuccess;
}

moecommResult_t validateLinks(const TopoGraph& graph) {
  const int count = static_cast<int>(graph.nodes.size());
  for (size_t i = 0; i < graph.links.size(); ++i) {
    const TopoLink& link = graph.links[i];
    MC_REQUIRE(link.a >= 0 && link.a < count && link.b >= 0 && link.b < count, moecommInvalidArgument,
               "topology link %zu joins %d and %d, but node ids are 0..%d", i, link.a, link.b, count - 1);
    MC_REQUIRE(link.a != link.b, moecommInvalidArgument, "topology link %zu joins node %d to itself", i, link.a);
    MC_REQUIRE(link.bandwidth_gbs >= 0, moecommInvalidArgument, "topology link %zu has negative bandwidth", i);
    bool gpu_pair = graph.nodes[link.a].kind == TopoNodeKind::kGpu && graph.nodes[link.b].kind == TopoNodeKind::kGpu;
    MC_REQUIRE(gpu_pair || (link.kind != TopoLinkKind::kNvlink && link.kind != TopoLinkKind::kP2p),
               moecommInvalidArgument, "topology link %zu is %s but joins a %s and a %s; it must join two GPUs", i,
               topoLinkKindName(link.kind), topoNodeKindName(graph.nodes[link.a].kind),
               topoNodeKindName(graph.nodes[link.b].kind));
  }
  return moecommSuccess;
}

bool lessByBusIdThenName(const TopoNode& x, const TopoNode& y) {
  if (x.pci_bus_id != y.pci_bus_id) return x.pci_bus_id < y.pci_bus_id;
  if (x.name != y.name) return x.name < y.name;
  return x.id < y.id;
}

std::vector<int> sortedNodes(const TopoGraph& graph, bool (*keep)(const TopoNode&)) {
  std::vector<int> ids;
  for (const TopoNode& node : graph.nodes) {
    if (keep(node)) ids.push_back(node.id);
  }
  std::sort(ids.begin(), ids.end(), [&](int x, int y) { return lessByBusIdThenName(graph.nodes[x], graph.nodes[y]); });
  return ids;
}

}  // namespace

bool TopoNode::operator==(const TopoNode& o) const {
  return id == o.id && kind == o.kind && parent == o.parent && name == o.name && pci_bus_id == o.pci_bus_id &&
         model == o.model && numa == o.numa && cuda_device == o.cuda_device && rdma == o.rdma &&
         pci_vendor == o.pci_vendor && pci_device == o.pci_device && pci_class == o.pci_class &&
         link_gbs == o.link_gbs && pcie_gen == o.pcie_gen && pcie_width == o.pcie_width &&
         memory_bytes == o.memory_bytes && os_devices == o.os_devices;
}

bool TopoLink::operator==(const TopoLink& o) const {
  return a == o.a && b == o.b && kind == o.kind && bandwidth_gbs == o.bandwidth_gbs &&
         p2p_perf_rank == o.p2p_perf_rank && native_atomics == o.native_atomics && detail == o.detail;
}

bool TopoGraph::operator==(const TopoGraph& o) const {
  return source == o.source && host == o.host && nvlink_method == o.nvlink_method && nodes == o.nodes &&
         links == o.links;
}

const char* topoNodeKindName(TopoNodeKind kind) {
  for (const KindName& entry : kNodeKindNames) {
    if (entry.kind == static_cast<int>(kind)) return entry.name;
  }
  return "unknown";
}

const char* topoLinkKindName(TopoLinkKind kind) {
  for (const KindName& entry : kLinkKindNames) {
    if (entry.kind == static_cast<int>(kind)) return entry.name;
  }
  return "unknown";
}

bool topoNodeKindFromName(const std::string& name, TopoNodeKind* kind) {
  for (const KindName& entry : kNodeKindNames) {
    if (name == entry.name) {
      *kind = static_cast<TopoNodeKind>(entry.kind);
      return true;
    }
  }
  return false;
}

bool topoLinkKindFromName(const std::string& name, TopoLinkKind* kind) {
  for (const KindName& entry : kLinkKindNames) {
    if (name == entry.name) {
      *kind = static_cast<TopoLinkKind>(entry.kind);
      return true;
    }
  }
  return false;
}

bool topoNormalizeBusId(const std::string& text, std::string* canonical) {
  unsigned domain = 0, bus = 0, device = 0, function = 0;
  int consumed = 0;
  // Count the colons to tell "bb:dd.f" from "dddd:bb:dd.f"; sscanf alone would accept both
  // shapes ambiguously.
  size_t colons = std::count(text.begin(), text.end(), ':');
  if (colons == 2) {
    if (std::sscanf(text.c_str(), "%8x:%2x:%2x.%1x%n", &domain, &bus, &device, &function, &consumed) != 4) return false;
  } else if (colons == 1) {
    if (std::sscanf(text.c_str(), "%2x:%2x.%1x%n", &bus, &device, &function, &consumed) != 3) return false;
  } else {
    return false;
  }
  if (consumed != static_cast<int>(text.size()) || domain > 0xffff || device > 0x1f || function > 7) return false;
  // sscanf's %x skips leading blanks and accepts a sign; refuse both.
  for (char c : text) {
    if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') return false;
  }
  char out[32];
  std::snprintf(out, sizeof(out), "%04x:%02x:%02x.%x", domain, bus, device, function);
  *canonical = out;
  return true;
}

int topoAddNode(TopoGraph* graph, TopoNodeKind kind, int parent, const std::string& name) {
  TopoNode node;
  node.id = static_cast<int>(graph->nodes.size());
  node.kind = kind;
  node.parent = parent;
  node.name = name;
  graph->nodes.push_back(node);
  return node.id;
}

moecommResult_t topoValidate(const TopoGraph& graph) {
  MC_CHECK(validateTree(graph));
  MC_CHECK(validateBusIds(graph));
  MC_CHECK(validateLinks(graph));
  return moecommSuccess;
}

std::vector<int> topoSortedGpus(const TopoGraph& graph) {
  return sortedNodes(graph, [](const TopoNode& node) { return node.kind == TopoNodeKind::kGpu; });
}

std::vector<int> topoSortedRdmaNics(const TopoGraph& graph) {
  return sortedNodes(graph, [](const TopoNode& node) { return node.kind == TopoNodeKind::kNic && node.rdma; });
}

int topoFindByBusId(const TopoGraph& graph, const std::string& bus_id) {
  std::string canonical;
  if (!topoNormalizeBusId(bus_id, &canonical)) return -1;
  for (const TopoNode& node : graph.nodes) {
    if (node.pci_bus_id == canonical) return node.id;
  }
  return -1;
}

}  // namespace moecomm
