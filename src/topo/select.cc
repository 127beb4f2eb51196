// Choices made from the graph: each GPU's NIC (closest by PCIe path, ties broken by rail
// position) and NVLink domain (connected components over NVLink links).
#include <algorithm>
#include <numeric>
#include <string>
#include <tuple>

#include "core/error.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

struct PathInfo {
  TopoPathClass path = TopoPathClass::kCrossNuma;
  int hops = 0;
  bool operator==(const PathInfo& other) const { return path == other.path && hops == other.hops; }
  bool operator<(const PathInfo& other) const {
    return std::make_tuple(static_cast<int>(path), hops) < std::make_tuple(static_cast<int>(other.path), other.hops);
  }
};

std::vector<int> ancestry(const TopoGraph& graph, int node) {
  std::vector<int> chain;
  // topoValidate guarantees the chain ends; the bound only protects against a graph that
  // skipped validation.
  for (int at = node; at >= 0 && chain.size() <= graph.nodes.size(); at = graph.nodes[at].parent) chain.push_back(at);
  return chain;
}

// The lowest common ancestor decides how far traffic climbs: a shared switch keeps it off
// the root complex, a shared host bridge off the CPU fabric, a shared NUMA node off the
// socket interconnect. Hops break ties inside one class.
PathInfo pathBetween(const TopoGraph& graph, int from, int to) {
  std::vector<int> up_from = ancestry(graph, from);
  std::vector<int> up_to = ancestry(graph, to);
  PathInfo info;
  for (size_t j = 0; j < up_to.size(); ++j) {
    auto found = std::find(up_from.begin(), up_from.end(), up_to[j]);
    if (found == up_from.end()) continue;
    int common = up_to[j];
    info.hops = static_cast<int>((found - up_from.begin()) + j);
    switch (graph.nodes[common].kind) {
      case TopoNodeKind::kPcieSwitch:
        info.path = TopoPathClass::kSameSwitch;
        break;
      case TopoNodeKind::kHostBridge:
        info.path = TopoPathClass::kSameHostBridge;
        break;
      case TopoNodeKind::kNuma:
        info.path = TopoPathClass::kSameNuma;
        break;
      default: {
        // A graph may hang devices straight below a socket or the machine; their NUMA
        // fields still tell whether the path crosses the interconnect.
        int numa_from = graph.nodes[from].numa, numa_to = graph.nodes[to].numa;
        info.path = numa_from >= 0 && numa_from == numa_to ? TopoPathClass::kSameNuma : TopoPathClass::kCrossNuma;
        break;
      }
    }
    return info;
  }
  return info;
}

// The rail a GPU belongs to: NIC i for GPU i when the counts match, else the GPUs spread
// evenly over the NICs (GPU i of G uses NIC i*N/G).
size_t railPosition(size_t gpu_index, size_t gpu_count, size_t nic_count) {
  if (gpu_count == nic_count) return gpu_index;
  return gpu_index * nic_count / gpu_count;
}

void chooseNics(const TopoGraph& graph, const std::vector<int>& gpus, TopoSelection* selection) {
  const std::vector<int> nics = topoSortedRdmaNics(graph);
  if (nics.empty()) return;
  std::vector<int> load(nics.size(), 0);
  for (size_t i = 0; i < gpus.size(); ++i) {
    std::vector<PathInfo> paths(nics.size());
    for (size_t j = 0; j < nics.size(); ++j) paths[j] = pathBetween(graph, gpus[i], nics[j]);
    const PathInfo best = *std::min_element(paths.begin(), paths.end());
    const size_t rail = railPosition(i, gpus.size(), nics.size());
    size_t chosen = nics.size();
    if (paths[rail] == best) {
      chosen = rail;
    } else {
      // The rail NIC is farther than another: take the closest, and among equally close ones
      // the least used so far, so GPUs do not pile onto the first NIC.
      for (size_t j = 0; j < nics.size(); ++j) {
        if (paths[j] == best && (chosen == nics.size() || load[j] < load[chosen])) chosen = j;
      }
    }
    ++load[chosen];
    TopoGpuChoice& choice = selection->gpus[i];
    choice.nic_node = nics[chosen];
    choice.nic_path = paths[chosen].path;
    choice.nic_hops = paths[chosen].hops;
    choice.rail_aligned = chosen == rail;
  }
}

int findRoot(std::vector<int>* parent, int x) {
  while ((*parent)[x] != x) {
    (*parent)[x] = (*parent)[(*parent)[x]];
    x = (*parent)[x];
  }
  return x;
}

void chooseNvlinkDomains(const TopoGraph& graph, const std::vector<int>& gpus, TopoSelection* selection) {
  std::vector<int> index_of_node(graph.nodes.size(), -1);
  for (size_t i = 0; i < gpus.size(); ++i) index_of_node[gpus[i]] = static_cast<int>(i);
  std::vector<int> parent(gpus.size());
  std::iota(parent.begin(), parent.end(), 0);
  for (const TopoLink& link : graph.links) {
    if (link.kind != TopoLinkKind::kNvlink) continue;
    int a = index_of_node[link.a], b = index_of_node[link.b];
    if (a < 0 || b < 0) continue;
    int root_a = findRoot(&parent, a), root_b = findRoot(&parent, b);
    // The smaller index becomes the root, so a domain's root is its smallest GPU index:
    // the domain id.
    if (root_a != root_b) parent[std::max(root_a, root_b)] = std::min(root_a, root_b);
  }
  std::vector<int> domain_slot(gpus.size(), -1);
  for (size_t i = 0; i < gpus.size(); ++i) {
    int root = findRoot(&parent, static_cast<int>(i));
    selection->gpus[i].nvlink_domain = root;
    if (domain_slot[root] < 0) {
      domain_slot[root] = static_cast<int>(selection->nvlink_domains.size());
      selection->nvlink_domains.emplace_back();
    }
    selection->nvlink_domains[domain_slot[root]].push_back(static_cast<int>(i));
  }
}

}  // namespace

const char* topoPathClassName(TopoPathClass path) {
  switch (path) {
    case TopoPathClass::kSameSwitch:
      return "same_switch";
    case TopoPathClass::kSameHostBridge:
      return "same_host_bridge";
    case TopoPathClass::kSameNuma:
      return "same_numa";
    case TopoPathClass::kCrossNuma:
      return "cross_numa";
  }
  return "unknown";
}

moecommResult_t topoSelect(const TopoGraph& graph, TopoSelection* selection) {
  MC_CHECK(topoValidate(graph));
  TopoSelection result;
  const std::vector<int> gpus = topoSortedGpus(graph);
  result.gpus.resize(gpus.size());
  for (size_t i = 0; i < gpus.size(); ++i) {
    result.gpus[i].gpu_node = gpus[i];
    result.gpus[i].gpu_index = static_cast<int>(i);
  }
  chooseNics(graph, gpus, &result);
  chooseNvlinkDomains(graph, gpus, &result);
  *selection = std::move(result);
  return moecommSuccess;
}

const TopoGpuChoice* topoChoiceByBusId(const TopoGraph& graph, const TopoSelection& selection,
                                       const std::string& bus_id) {
  std::string canonical;
  if (!topoNormalizeBusId(bus_id, &canonical)) return nullptr;
  for (const TopoGpuChoice& choice : selection.gpus) {
    if (graph.nodes[choice.gpu_node].pci_bus_id == canonical) return &choice;
  }
  return nullptr;
}

const TopoGpuChoice* topoChoiceByCudaDevice(const TopoGraph& graph, const TopoSelection& selection, int cuda_device) {
  if (cuda_device < 0) return nullptr;
  for (const TopoGpuChoice& choice : selection.gpus) {
    if (graph.nodes[choice.gpu_node].cuda_device == cuda_device) return &choice;
  }
  return nullptr;
}

std::string topoDescribeChoice(const TopoGraph& graph, const TopoSelection& selection, const TopoGpuChoice& choice) {
  const TopoNode& gpu = graph.nodes[choice.gpu_node];
  std::string text = "GPU " + std::to_string(choice.gpu_index) + " " + gpu.name + " " + gpu.pci_bus_id + " numa " +
                     std::to_string(gpu.numa) + " -> ";
  if (choice.nic_node >= 0) {
    const TopoNode& nic = graph.nodes[choice.nic_node];
    text += "NIC " + nic.name + " " + nic.pci_bus_id + " (" + topoPathClassName(choice.nic_path) + ", " +
            std::to_string(choice.nic_hops) + " hops" + (choice.rail_aligned ? ", rail-aligned)" : ")");
  } else {
    text += "no RDMA NIC";
  }
  size_t domain_size = 0;
  for (const auto& domain : selection.nvlink_domains) {
    if (!domain.empty() && domain.front() == choice.nvlink_domain) domain_size = domain.size();
  }
  text += ", NVLink domain " + std::to_string(choice.nvlink_domain) + " (" + std::to_string(domain_size) +
          (domain_size == 1 ? " GPU)" : " GPUs)");
  return text;
}

std::string topoDescribeSelection(const TopoGraph& graph, const TopoSelection& selection) {
  if (selection.gpus.empty()) return "no GPU in the topology\n";
  std::string text;
  for (const TopoGpuChoice& choice : selection.gpus) text += topoDescribeChoice(graph, selection, choice) + "\n";
  return text;
}

}  // namespace moecomm
