// The communicator's entry point: topology for one rank (discover or replay, dump, select),
// and the JSON documents of the selection.
#include <unistd.h>

#include <string>

#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "topo/json_value.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

// Several hosts may share a file system, and several processes a host: %h and %p in the
// dump path (as in MOECOMM_DEBUG_FILE) give each its own file.
std::string expandDumpPath(const std::string& pattern) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size() && (pattern[i + 1] == 'h' || pattern[i + 1] == 'p')) {
      if (pattern[i + 1] == 'h') {
        char host[256] = {0};
        gethostname(host, sizeof(host) - 1);
        out += host;
      } else {
        out += std::to_string(getpid());
      }
      ++i;
      continue;
    }
    out += pattern[i];
  }
  return out;
}

TopoJson nicJson(const TopoGraph& graph, const TopoGpuChoice& choice) {
  if (choice.nic_node < 0) return nullptr;
  const TopoNode& nic = graph.nodes[choice.nic_node];
  TopoJson out;
  out["node"] = nic.id;
  out["name"] = nic.name;
  out["pci_bus_id"] = nic.pci_bus_id;
  out["path"] = topoPathClassName(choice.nic_path);
  out["hops"] = choice.nic_hops;
  out["rail_aligned"] = choice.rail_aligned;
  return out;
}

const std::vector<int>* domainOf(const TopoSelection& selection, int domain_id) {
  for (const auto& domain : selection.nvlink_domains) {
    if (!domain.empty() && domain.front() == domain_id) return &domain;
  }
  return nullptr;
}

struct RankMatch {
  const TopoGpuChoice* choice = nullptr;
  const char* matched_by = nullptr;
};

// The real bus id wins when CUDA answers: it is what the hardware is. A graph replayed from
// another machine (or a build without CUDA) falls back to the ordinal recorded in the graph.
RankMatch findRankGpu(const TopoGraph& graph, const TopoSelection& selection, int cuda_device) {
  RankMatch match;
  if (cuda_device < 0) return match;
  std::string bus_id;
  if (topoCudaBusId(cuda_device, &bus_id)) {
    match.choice = topoChoiceByBusId(graph, selection, bus_id);
    match.matched_by = "pci_bus_id";
  }
  if (match.choice == nullptr) {
    match.choice = topoChoiceByCudaDevice(graph, selection, cuda_device);
    match.matched_by = "cuda_device";
  }
  if (match.choice == nullptr) match.matched_by = nullptr;
  return match;
}

TopoJson thisRankJson(const TopoGraph& graph, const TopoSelection& selection, int cuda_device) {
  TopoJson out;
  out["cuda_device"] = cuda_device < 0 ? TopoJson(nullptr) : TopoJson(cuda_device);
  RankMatch match = findRankGpu(graph, selection, cuda_device);
  if (match.choice == nullptr) {
    out["gpu"] = nullptr;
    out["gpu_index"] = nullptr;
    out["pci_bus_id"] = nullptr;
    out["matched_by"] = nullptr;
    out["nic"] = nullptr;
    out["nvlink_domain"] = nullptr;
    out["nvlink_domain_gpus"] = TopoJson::array();
    out["description"] = cuda_device < 0 ? "host rank: no GPU"
                                         : "CUDA device " + std::to_string(cuda_device) + " is not in the topology";
    return out;
  }
  const TopoGpuChoice& choice = *match.choice;
  out["gpu"] = choice.gpu_node;
  out["gpu_index"] = choice.gpu_index;
  out["pci_bus_id"] = graph.nodes[choice.gpu_node].pci_bus_id;
  out["matched_by"] = match.matched_by;
  out["nic"] = nicJson(graph, choice);
  out["nvlink_domain"] = choice.nvlink_domain;
  const std::vector<int>* domain = domainOf(selection, choice.nvlink_domain);
  out["nvlink_domain_gpus"] = domain ? TopoJson(*domain) : TopoJson::array();
  out["description"] = topoDescribeChoice(graph, selection, choice);
  return out;
}

moecommResult_t obtainGraph(TopoGraph* graph, std::string* origin) {
  const std::string file = envString(Env::TopoFile);
  if (!file.empty()) {
    MC_CHECK(topoLoadFile(file, graph));
    *origin = "file:" + file;
    MC_INFO(kLogTopo, "topology: loaded %zu nodes and %zu links from MOECOMM_TOPO_FILE=%s", graph->nodes.size(),
            graph->links.size(), file.c_str());
    return moecommSuccess;
  }
  MC_CHECK(topoDiscoverCached(graph));
  *origin = "discovery";
  return moecommSuccess;
}

}  // namespace

TopoJson topoChoiceJsonValue(const TopoGraph& graph, const TopoSelection& selection, const TopoGpuChoice& choice) {
  const TopoNode& gpu = graph.nodes[choice.gpu_node];
  TopoJson out;
  out["gpu_index"] = choice.gpu_index;
  out["node"] = gpu.id;
  out["name"] = gpu.name;
  out["pci_bus_id"] = gpu.pci_bus_id;
  out["cuda_device"] = gpu.cuda_device < 0 ? TopoJson(nullptr) : TopoJson(gpu.cuda_device);
  out["numa"] = gpu.numa < 0 ? TopoJson(nullptr) : TopoJson(gpu.numa);
  out["nic"] = nicJson(graph, choice);
  out["nvlink_domain"] = choice.nvlink_domain;
  (void)selection;
  return out;
}

TopoJson topoSelectionJsonValue(const TopoGraph& graph, const TopoSelection& selection) {
  TopoJson out;
  out["gpus"] = TopoJson::array();
  for (const TopoGpuChoice& choice : selection.gpus)
    out["gpus"].push_back(topoChoiceJsonValue(graph, selection, choice));
  out["nvlink_domains"] = TopoJson::array();
  for (const auto& domain : selection.nvlink_domains) {
    TopoJson entry;
    entry["domain"] = domain.front();
    entry["gpu_indices"] = domain;
    out["nvlink_domains"].push_back(entry);
  }
  return out;
}

std::string topoSelectionToJson(const TopoGraph& graph, const TopoSelection& selection) {
  return topoJsonText(topoSelectionJsonValue(graph, selection));
}

namespace {

moecommResult_t buildForRank(int cudaDevice, std::string* json) {
  TopoGraph graph;
  std::string origin;
  MC_CHECK(obtainGraph(&graph, &origin));

  const std::string dump_pattern = envString(Env::TopoDumpFile);
  if (!dump_pattern.empty()) {
    const std::string dump_path = expandDumpPath(dump_pattern);
    moecommResult_t dumped = topoDumpFile(graph, dump_path);
    if (dumped != moecommSuccess) {
      addErrorContext("MOECOMM_TOPO_DUMP_FILE");
      return dumped;
    }
    MC_INFO(kLogTopo, "topology: written to %s", dump_path.c_str());
  }

  TopoSelection selection;
  MC_CHECK(topoSelect(graph, &selection));

  TopoJson document;
  document["format_version"] = kTopoFormatVersion;
  document["origin"] = origin;
  document["graph"] = topoGraphJsonValue(graph);
  document["selection"] = topoSelectionJsonValue(graph, selection);
  document["this_rank"] = thisRankJson(graph, selection, cudaDevice);
  if (cudaDevice >= 0 && document["this_rank"]["gpu"].is_null()) {
    MC_WARN(kLogTopo, "topology: CUDA device %d is not in the topology (%s); no NIC or NVLink domain chosen for it",
            cudaDevice, origin.c_str());
  }
  MC_INFO(kLogTopo, "topology for CUDA device %d: %s", cudaDevice,
          document["this_rank"]["description"].get<std::string>().c_str());
  *json = topoJsonText(document);
  return moecommSuccess;
}

}  // namespace

moecommResult_t topoBuildForRank(int cudaDevice, std::string* json) {
  MC_REQUIRE(json != nullptr, moecommInvalidArgument, "topoBuildForRank: the output string is null");
  MC_REQUIRE(cudaDevice >= -1, moecommInvalidArgument,
             "topoBuildForRank: CUDA device %d is invalid (use -1 for a host rank)", cudaDevice);
  // Nothing below is expected to throw; the firewall keeps a bad_alloc or a JSON surprise
  // from crossing into the communicator.
  try {
    return buildForRank(cudaDevice, json);
  } catch (const std::exception& error) {
    return setError(moecommInternalError, "building the topology failed: %s", error.what());
  }
}

}  // namespace moecomm
