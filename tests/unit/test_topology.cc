// Topology: selection on saved machines (fixtures), JSON format and its validation, live
// discovery on this machine, and the communicator's entry point with its env variables.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

using nlohmann::json;

std::string fixturePath(const std::string& name) {
  const char* dir = std::getenv("MOECOMM_TEST_FIXTURES");
  return std::string(dir ? dir : "tests/fixtures") + "/" + name;
}

std::string readText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

void writeText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

TopoGraph loadFixture(const std::string& name) {
  TopoGraph graph;
  moecommResult_t result = topoLoadFile(fixturePath(name), &graph);
  EXPECT_EQ(result, moecommSuccess) << lastErrorText();
  return graph;
}

TopoSelection selectOrFail(const TopoGraph& graph) {
  TopoSelection selection;
  moecommResult_t result = topoSelect(graph, &selection);
  EXPECT_EQ(result, moecommSuccess) << lastErrorText();
  return selection;
}

std::string nicName(const TopoGraph& graph, const TopoGpuChoice& choice) {
  return choice.nic_node < 0 ? "" : graph.nodes[choice.nic_node].name;
}

// Sets (or unsets, for nullptr) an environment variable for the life of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_old_ = old != nullptr;
    if (had_old_) old_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_old_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, old_;
  bool had_old_ = false;
};

// Builds small graphs in code for the selection rules the fixtures do not isolate.
class GraphBuilder {
 public:
  GraphBuilder() { topoAddNode(&graph_, TopoNodeKind::kMachine, -1, "box"); }
  int add(TopoNodeKind kind, int parent, const std::string& name, int numa, const std::string& bus_id = "") {
    int id = topoAddNode(&graph_, kind, parent, name);
    graph_.nodes[id].numa = numa;
    graph_.nodes[id].pci_bus_id = bus_id;
    if (kind == TopoNodeKind::kNic) graph_.nodes[id].rdma = true;
    return id;
  }
  void nvlink(int a, int b) {
    TopoLink link;
    link.a = a;
    link.b = b;
    link.kind = TopoLinkKind::kNvlink;
    graph_.links.push_back(link);
  }
  TopoGraph& graph() { return graph_; }

 private:
  TopoGraph graph_;
};

// ---------------------------------------------------------------------------------------
// Fixtures: the machines we do not have
// ---------------------------------------------------------------------------------------

TEST(TopoFixtureRail8, EachGpuGetsTheNicOnItsSwitch) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  TopoSelection selection = selectOrFail(graph);
  ASSERT_EQ(selection.gpus.size(), 8u);
  // DGX-style names skip the storage NICs; the bus id order is what defines the rails.
  const std::vector<std::string> expected = {"mlx5_0", "mlx5_3", "mlx5_4",  "mlx5_5",
                                             "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11"};
  const std::vector<int> nics = topoSortedRdmaNics(graph);
  ASSERT_EQ(nics.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const TopoGpuChoice& choice = selection.gpus[i];
    EXPECT_EQ(choice.gpu_index, i);
    EXPECT_EQ(choice.nic_node, nics[i]) << "GPU " << i;
    EXPECT_EQ(nicName(graph, choice), expected[i]) << "GPU " << i;
    EXPECT_EQ(choice.nic_path, TopoPathClass::kSameSwitch) << "GPU " << i;
    EXPECT_EQ(choice.nic_hops, 2) << "GPU " << i;
    EXPECT_TRUE(choice.rail_aligned) << "GPU " << i;
    EXPECT_EQ(graph.nodes[choice.gpu_node].parent, graph.nodes[choice.nic_node].parent) << "GPU " << i;
  }
}

TEST(TopoFixtureRail8, AllGpusFormOneNvlinkDomain) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  TopoSelection selection = selectOrFail(graph);
  ASSERT_EQ(selection.nvlink_domains.size(), 1u);
  EXPECT_EQ(selection.nvlink_domains[0], (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  for (const TopoGpuChoice& choice : selection.gpus) EXPECT_EQ(choice.nvlink_domain, 0);
}

TEST(TopoFixtureRail8, BmcDisplayIsNotAGpu) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  int bmc = topoFindByBusId(graph, "0000:03:00.0");
  ASSERT_GE(bmc, 0);
  EXPECT_EQ(graph.nodes[bmc].kind, TopoNodeKind::kPciDevice);
  EXPECT_EQ(topoSortedGpus(graph).size(), 8u);
}

TEST(TopoFixtureNvlink4, NoNicAndOneDomain) {
  TopoGraph graph = loadFixture("topo_4gpu_nvlink_nonic.json");
  TopoSelection selection = selectOrFail(graph);
  ASSERT_EQ(selection.gpus.size(), 4u);
  for (const TopoGpuChoice& choice : selection.gpus) {
    EXPECT_EQ(choice.nic_node, -1) << "GPU " << choice.gpu_index;
    EXPECT_EQ(choice.nvlink_domain, 0) << "GPU " << choice.gpu_index;
  }
  ASSERT_EQ(selection.nvlink_domains.size(), 1u);
  EXPECT_EQ(selection.nvlink_domains[0].size(), 4u);
}

TEST(TopoFixturePcieOnly, BothGpusGetTheOneNic) {
  TopoGraph graph = loadFixture("topo_2gpu_pcie_only.json");
  TopoSelection selection = selectOrFail(graph);
  ASSERT_EQ(selection.gpus.size(), 2u);
  EXPECT_EQ(nicName(graph, selection.gpus[0]), "mlx5_0");
  EXPECT_EQ(nicName(graph, selection.gpus[1]), "mlx5_0");
  // GPU 0 shares the NIC's root complex; GPU 1 reaches it across root complexes.
  EXPECT_EQ(selection.gpus[0].nic_path, TopoPathClass::kSameHostBridge);
  EXPECT_EQ(selection.gpus[1].nic_path, TopoPathClass::kSameNuma);
}

TEST(TopoFixturePcieOnly, PeerToPeerDoesNotMakeADomain) {
  TopoGraph graph = loadFixture("topo_2gpu_pcie_only.json");
  TopoSelection selection = selectOrFail(graph);
  ASSERT_EQ(selection.nvlink_domains.size(), 2u);
  EXPECT_EQ(selection.gpus[0].nvlink_domain, 0);
  EXPECT_EQ(selection.gpus[1].nvlink_domain, 1);
}

// ---------------------------------------------------------------------------------------
// Selection rules on graphs built in code
// ---------------------------------------------------------------------------------------

TEST(TopoSelect, TiesAreBrokenRailAlignedByBusId) {
  GraphBuilder builder;
  int bridge = builder.add(TopoNodeKind::kHostBridge, 0, "pci0000:00", 0);
  // Names run opposite to bus ids: the rails follow bus ids.
  for (int i = 0; i < 4; ++i) {
    char bus[16];
    std::snprintf(bus, sizeof(bus), "0000:%02x:00.0", 0x10 + 2 * i);
    builder.add(TopoNodeKind::kGpu, bridge, "gpu" + std::to_string(i), 0, bus);
    std::snprintf(bus, sizeof(bus), "0000:%02x:00.0", 0x11 + 2 * i);
    builder.add(TopoNodeKind::kNic, bridge, "mlx5_" + std::to_string(3 - i), 0, bus);
  }
  TopoSelection selection = selectOrFail(builder.graph());
  ASSERT_EQ(selection.gpus.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(nicName(builder.graph(), selection.gpus[i]), "mlx5_" + std::to_string(3 - i));
    EXPECT_TRUE(selection.gpus[i].rail_aligned);
    EXPECT_EQ(selection.gpus[i].nic_path, TopoPathClass::kSameHostBridge);
  }
}

TEST(TopoSelect, FewerNicsSpreadEvenlyOverTheGpus) {
  GraphBuilder builder;
  int bridge = builder.add(TopoNodeKind::kHostBridge, 0, "pci0000:00", 0);
  for (int i = 0; i < 4; ++i) {
    builder.add(TopoNodeKind::kGpu, bridge, "gpu" + std::to_string(i), 0, "0000:2" + std::to_string(i) + ":00.0");
  }
  builder.add(TopoNodeKind::kNic, bridge, "mlx5_0", 0, "0000:30:00.0");
  builder.add(TopoNodeKind::kNic, bridge, "mlx5_1", 0, "0000:31:00.0");
  TopoSelection selection = selectOrFail(builder.graph());
  const std::vector<std::string> expected = {"mlx5_0", "mlx5_0", "mlx5_1", "mlx5_1"};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(nicName(builder.graph(), selection.gpus[i]), expected[i]) << "GPU " << i;
}

TEST(TopoSelect, SameNumaBeatsRailPosition) {
  GraphBuilder builder;
  int numa0 = builder.add(TopoNodeKind::kNuma, 0, "numa0", 0);
  int numa1 = builder.add(TopoNodeKind::kNuma, 0, "numa1", 1);
  int bridge0 = builder.add(TopoNodeKind::kHostBridge, numa0, "pci0000:10", 0);
  int bridge1 = builder.add(TopoNodeKind::kHostBridge, numa1, "pci0000:90", 1);
  builder.add(TopoNodeKind::kGpu, bridge0, "gpu0", 0, "0000:11:00.0");
  builder.add(TopoNodeKind::kGpu, bridge1, "gpu1", 1, "0000:91:00.0");
  // NIC 0 by bus id sits on NUMA 1, NIC 1 on NUMA 0: locality must win over rail order.
  builder.add(TopoNodeKind::kNic, bridge1, "mlx5_0", 1, "0000:05:00.0");
  builder.add(TopoNodeKind::kNic, bridge0, "mlx5_1", 0, "0000:95:00.0");
  TopoSelection selection = selectOrFail(builder.graph());
  EXPECT_EQ(nicName(builder.graph(), selection.gpus[0]), "mlx5_1");
  EXPECT_EQ(nicName(builder.graph(), selection.gpus[1]), "mlx5_0");
  EXPECT_FALSE(selection.gpus[0].rail_aligned);
  EXPECT_EQ(selection.gpus[0].nic_path, TopoPathClass::kSameHostBridge);
}

TEST(TopoSelect, CrossNumaNicIsUsedWhenItIsTheOnlyOne) {
  GraphBuilder builder;
  int socket0 = builder.add(TopoNodeKind::kCpuSocket, 0, "package0", 0);
  int socket1 = builder.add(TopoNodeKind::kCpuSocket, 0, "package1", 1);
  builder.add(TopoNodeKind::kGpu, socket0, "gpu0", 0, "0000:11:00.0");
  builder.add(TopoNodeKind::kNic, socket1, "mlx5_0", 1, "0000:91:00.0");
  TopoSelection selection = selectOrFail(builder.graph());
  EXPECT_EQ(nicName(builder.graph(), selection.gpus[0]), "mlx5_0");
  EXPECT_EQ(selection.gpus[0].nic_path, TopoPathClass::kCrossNuma);
}

TEST(TopoSelect, NicWithoutRdmaIsNotChosen) {
  GraphBuilder builder;
  int bridge = builder.add(TopoNodeKind::kHostBridge, 0, "pci0000:00", 0);
  builder.add(TopoNodeKind::kGpu, bridge, "gpu0", 0, "0000:01:00.0");
  int ethernet = builder.add(TopoNodeKind::kNic, bridge, "eth0", 0, "0000:02:00.0");
  builder.graph().nodes[ethernet].rdma = false;
  TopoSelection selection = selectOrFail(builder.graph());
  EXPECT_EQ(selection.gpus[0].nic_node, -1);
}

TEST(TopoSelect, NvlinkComponentsAreTransitiveAndNamedBySmallestIndex) {
  GraphBuilder builder;
  int bridge = builder.add(TopoNodeKind::kHostBridge, 0, "pci0000:00", 0);
  std::vector<int> gpus;
  // Node order differs from bus id order so that domain ids must come from the sorted index.
  for (const char* bus : {"0000:05:00.0", "0000:01:00.0", "0000:04:00.0", "0000:02:00.0", "0000:03:00.0"}) {
    gpus.push_back(builder.add(TopoNodeKind::kGpu, bridge, bus, 0, bus));
  }
  // Sorted indices: 01->0, 02->1, 03->2, 04->3, 05->4. Links 01-03 and 03-05 chain {0,2,4};
  // 02-04 gives {1,3}.
  builder.nvlink(gpus[1], gpus[4]);
  builder.nvlink(gpus[4], gpus[0]);
  builder.nvlink(gpus[3], gpus[2]);
  TopoSelection selection = selectOrFail(builder.graph());
  ASSERT_EQ(selection.nvlink_domains.size(), 2u);
  EXPECT_EQ(selection.nvlink_domains[0], (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(selection.nvlink_domains[1], (std::vector<int>{1, 3}));
  const std::vector<int> expected = {0, 1, 0, 1, 0};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(selection.gpus[i].nvlink_domain, expected[i]) << "GPU " << i;
}

TEST(TopoSelect, ChoiceIsFoundByBusIdOrCudaOrdinal) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  TopoSelection selection = selectOrFail(graph);
  for (const char* spelling : {"0000:9D:00.0", "9d:00.0", "00000000:9d:00.0"}) {
    const TopoGpuChoice* choice = topoChoiceByBusId(graph, selection, spelling);
    ASSERT_NE(choice, nullptr) << spelling;
    EXPECT_EQ(choice->gpu_index, 4);
    EXPECT_EQ(nicName(graph, *choice), "mlx5_6");
  }
  const TopoGpuChoice* by_ordinal = topoChoiceByCudaDevice(graph, selection, 5);
  ASSERT_NE(by_ordinal, nullptr);
  EXPECT_EQ(graph.nodes[by_ordinal->gpu_node].pci_bus_id, "0000:c3:00.0");
  EXPECT_EQ(topoChoiceByBusId(graph, selection, "0000:18:00.0"), nullptr);  // a NIC, not a GPU
  EXPECT_EQ(topoChoiceByBusId(graph, selection, "garbage"), nullptr);
  EXPECT_EQ(topoChoiceByCudaDevice(graph, selection, 8), nullptr);
}

TEST(TopoSelect, DescriptionNamesNicPathAndDomain) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  TopoSelection selection = selectOrFail(graph);
  std::string line = topoDescribeChoice(graph, selection, selection.gpus[3]);
  EXPECT_NE(line.find("0000:61:00.0"), std::string::npos) << line;
  EXPECT_NE(line.find("mlx5_5"), std::string::npos) << line;
  EXPECT_NE(line.find("same_switch"), std::string::npos) << line;
  EXPECT_NE(line.find("NVLink domain 0 (8 GPUs)"), std::string::npos) << line;
  std::string all = topoDescribeSelection(graph, selection);
  EXPECT_EQ(std::count(all.begin(), all.end(), '\n'), 8);

  TopoGraph nonic = loadFixture("topo_4gpu_nvlink_nonic.json");
  TopoSelection nonic_selection = selectOrFail(nonic);
  EXPECT_NE(topoDescribeChoice(nonic, nonic_selection, nonic_selection.gpus[0]).find("no RDMA NIC"), std::string::npos);
  json described = json::parse(topoSelectionToJson(nonic, nonic_selection));
  EXPECT_TRUE(described["gpus"][0]["nic"].is_null());
  EXPECT_EQ(described["nvlink_domains"][0]["gpu_indices"].size(), 4u);
}

TEST(TopoBusId, AcceptsCommonSpellingsAndRejectsTheRest) {
  std::string out;
  EXPECT_TRUE(topoNormalizeBusId("0000:1B:00.0", &out));
  EXPECT_EQ(out, "0000:1b:00.0");
  EXPECT_TRUE(topoNormalizeBusId("1b:00.1", &out));
  EXPECT_EQ(out, "0000:1b:00.1");
  EXPECT_TRUE(topoNormalizeBusId("00000001:1b:00.0", &out));
  EXPECT_EQ(out, "0001:1b:00.0");
  for (const char* bad :
       {"", "zz", "0000:1b:00", " 1b:00.0", "0000:1b:20.0", "0000:1b:00.8", "0000:1b:00.0x", "1:2:3:4.0", "-1:00.0"}) {
    EXPECT_FALSE(topoNormalizeBusId(bad, &out)) << "\"" << bad << "\"";
  }
}

// ---------------------------------------------------------------------------------------
// JSON format
// ---------------------------------------------------------------------------------------

TEST(TopoJson, RoundTripOfEveryFixtureIsIdentical) {
  for (const char* name : {"topo_8gpu_8nic_rail.json", "topo_4gpu_nvlink_nonic.json", "topo_2gpu_pcie_only.json"}) {
    TopoGraph graph = loadFixture(name);
    std::string text = topoGraphToJson(graph);
    TopoGraph again;
    ASSERT_EQ(topoGraphFromJson(text, &again), moecommSuccess) << name << ": " << lastErrorText();
    EXPECT_TRUE(again == graph) << name;
    EXPECT_EQ(topoGraphToJson(again), text) << name;
    EXPECT_EQ(json::parse(text)["format_version"], kTopoFormatVersion);
  }
}

TEST(TopoJson, FileDumpAndLoadRoundTrip) {
  TopoGraph graph = loadFixture("topo_8gpu_8nic_rail.json");
  std::string path = ::testing::TempDir() + "moecomm_topo_roundtrip.json";
  ASSERT_EQ(topoDumpFile(graph, path), moecommSuccess) << lastErrorText();
  TopoGraph loaded;
  ASSERT_EQ(topoLoadFile(path, &loaded), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(loaded == graph);
  std::remove(path.c_str());
}

TEST(TopoJson, MissingFileIsASystemError) {
  TopoGraph graph;
  EXPECT_EQ(topoLoadFile("/nonexistent/moecomm_topo.json", &graph), moecommSystemError);
  EXPECT_NE(std::string(lastErrorText()).find("/nonexistent/moecomm_topo.json"), std::string::npos);
}

// Each case edits the 2-GPU fixture in one way that must be refused, and names a word the
// error sentence has to contain.
struct MalformedCase {
  const char* name;
  const char* expected_text;
  void (*edit)(json* document);
};

const MalformedCase kMalformedCases[] = {
    {"MissingFormatVersion", "format_version", [](json* d) { d->erase("format_version"); }},
    {"FutureFormatVersion", "format_version 99", [](json* d) { (*d)["format_version"] = 99; }},
    {"NodesNotAnArray", "\"nodes\"", [](json* d) { (*d)["nodes"] = "none"; }},
    {"MissingLinks", "\"links\"", [](json* d) { d->erase("links"); }},
    {"NodeWithoutKind", "\"kind\"", [](json* d) { (*d)["nodes"][5].erase("kind"); }},
    {"NodeWithoutParent", "\"parent\"", [](json* d) { (*d)["nodes"][3].erase("parent"); }},
    {"UnknownNodeKind", "\"tpu\"", [](json* d) { (*d)["nodes"][5]["kind"] = "tpu"; }},
    {"UnknownLinkKind", "\"infinity_fabric\"", [](json* d) { (*d)["links"][0]["kind"] = "infinity_fabric"; }},
    {"DanglingLinkId", "node ids", [](json* d) { (*d)["links"][0]["b"] = 400; }},
    {"DanglingParentId", "not a node id", [](json* d) { (*d)["nodes"][4]["parent"] = 77; }},
    {"IdsOutOfOrder", "in order", [](json* d) { (*d)["nodes"][2]["id"] = 9; }},
    {"ParentCycle", "loops", [](json* d) { (*d)["nodes"][1]["parent"] = 3; }},
    {"TwoRoots", "machine",
     [](json* d) {
       (*d)["nodes"][1]["kind"] = "machine";
       (*d)["nodes"][1]["parent"] = nullptr;
     }},
    {"ChildOfALeaf", "cannot have children", [](json* d) { (*d)["nodes"][6]["parent"] = 5; }},
    {"BadBusId", "0000:17:00.0", [](json* d) { (*d)["nodes"][5]["pci_bus_id"] = "17-00-0"; }},
    {"GpuWithoutBusId", "no PCI bus id", [](json* d) { (*d)["nodes"][5].erase("pci_bus_id"); }},
    {"DuplicateGpuBusId", "reuses", [](json* d) { (*d)["nodes"][10]["pci_bus_id"] = "0000:17:00.0"; }},
    {"NicWithoutRdmaField", "\"rdma\"", [](json* d) { (*d)["nodes"][7].erase("rdma"); }},
    {"StringWhereIntegerBelongs", "expected an integer", [](json* d) { (*d)["nodes"][5]["numa"] = "zero"; }},
    {"BadHexField", "0x10de", [](json* d) { (*d)["nodes"][5]["pci_vendor"] = "nvidia"; }},
    {"UnknownNodeField", "\"nmua\"", [](json* d) { (*d)["nodes"][5]["nmua"] = 0; }},
    {"NvlinkToANic", "two GPUs",
     [](json* d) {
       (*d)["links"].push_back({{"a", 5}, {"b", 7}, {"kind", "nvlink"}});
     }},
    {"SelfLink", "itself", [](json* d) { (*d)["links"][0]["b"] = (*d)["links"][0]["a"]; }},
    {"NegativeBandwidth", "number >= 0", [](json* d) { (*d)["links"][0]["bandwidth_gbs"] = -3; }},
};

// Names the case in test listings instead of a byte dump of the struct.
void PrintTo(const MalformedCase& malformed, std::ostream* out) { *out << malformed.name; }

class TopoJsonMalformed : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(TopoJsonMalformed, IsRefusedWithASentence) {
  json document = json::parse(readText(fixturePath("topo_2gpu_pcie_only.json")));
  // The indices used by the edits: 5 GPU 0, 6 the NIC's root port, 7 the NIC, 10 GPU 1.
  ASSERT_EQ(document["nodes"][5]["kind"], "gpu");
  ASSERT_EQ(document["nodes"][6]["kind"], "pcie_switch");
  ASSERT_EQ(document["nodes"][7]["kind"], "nic");
  ASSERT_EQ(document["nodes"][10]["kind"], "gpu");
  GetParam().edit(&document);
  TopoGraph graph;
  clearError();
  EXPECT_EQ(topoGraphFromJson(document.dump(), &graph), moecommInvalidArgument);
  std::string text = lastErrorText();
  EXPECT_NE(text.find(GetParam().expected_text), std::string::npos) << "error text: " << text;
  EXPECT_TRUE(graph.nodes.empty()) << "a refused file must leave the output untouched";
}

INSTANTIATE_TEST_SUITE_P(Cases, TopoJsonMalformed, ::testing::ValuesIn(kMalformedCases),
                         [](const ::testing::TestParamInfo<MalformedCase>& info) { return info.param.name; });

TEST(TopoJson, TextThatIsNotJsonIsRefused) {
  TopoGraph graph;
  for (const char* text : {"", "{", "[1, 2]", "null", "{\"format_version\": 1, \"nodes\": [], \"links\": []}"}) {
    clearError();
    EXPECT_EQ(topoGraphFromJson(text, &graph), moecommInvalidArgument) << text;
    EXPECT_STRNE(lastErrorText(), "") << text;
  }
}

// ---------------------------------------------------------------------------------------
// Live discovery on this machine (no GPU, no RDMA NIC here; GPUs where they exist)
// ---------------------------------------------------------------------------------------

TEST(TopoDiscover, LiveDiscoverySucceedsAndReloads) {
  TopoGraph graph;
  ASSERT_EQ(topoDiscover(&graph), moecommSuccess) << lastErrorText();
  ASSERT_FALSE(graph.nodes.empty());
  EXPECT_EQ(graph.nodes[0].kind, TopoNodeKind::kMachine);
  EXPECT_EQ(graph.source.rfind("hwloc ", 0), 0u) << graph.source;
  EXPECT_FALSE(graph.nvlink_method.empty());
  int numa_nodes = 0;
  for (const TopoNode& node : graph.nodes) numa_nodes += node.kind == TopoNodeKind::kNuma;
  EXPECT_GE(numa_nodes, 1);
  EXPECT_EQ(topoValidate(graph), moecommSuccess) << lastErrorText();

  TopoGraph reloaded;
  ASSERT_EQ(topoGraphFromJson(topoGraphToJson(graph), &reloaded), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(reloaded == graph);
  TopoSelection selection;
  EXPECT_EQ(topoSelect(graph, &selection), moecommSuccess) << lastErrorText();
  EXPECT_EQ(selection.gpus.size(), topoSortedGpus(graph).size());
}

TEST(TopoDiscover, PciNodesMatchSysfs) {
  TopoGraph graph;
  ASSERT_EQ(topoDiscoverCached(&graph), moecommSuccess) << lastErrorText();
  for (const TopoNode& node : graph.nodes) {
    if (node.pci_bus_id.empty()) continue;
    std::ifstream vendor("/sys/bus/pci/devices/" + node.pci_bus_id + "/vendor");
    EXPECT_TRUE(vendor.good()) << node.pci_bus_id << " is not in sysfs";
  }
}

TEST(TopoDiscover, CachedDiscoveryIsStable) {
  TopoGraph first, second;
  ASSERT_EQ(topoDiscoverCached(&first), moecommSuccess) << lastErrorText();
  ASSERT_EQ(topoDiscoverCached(&second), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(first == second);
}

// ---------------------------------------------------------------------------------------
// topoBuildForRank and MOECOMM_TOPO_FILE / MOECOMM_TOPO_DUMP_FILE
// ---------------------------------------------------------------------------------------

json buildForRank(int cuda_device) {
  std::string text;
  moecommResult_t result = topoBuildForRank(cuda_device, &text);
  EXPECT_EQ(result, moecommSuccess) << lastErrorText();
  json document = json::parse(text, nullptr, false);
  EXPECT_FALSE(document.is_discarded()) << text;
  return document;
}

TEST(TopoBuild, ReplaysTopoFile) {
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_8gpu_8nic_rail.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
  json document = buildForRank(3);
  EXPECT_EQ(document["format_version"], kTopoFormatVersion);
  EXPECT_EQ(document["origin"], "file:" + fixturePath("topo_8gpu_8nic_rail.json"));
  EXPECT_EQ(document["graph"]["host"], "dgx-h100-01");
  EXPECT_EQ(document["selection"]["gpus"].size(), 8u);
  const json& rank = document["this_rank"];
  EXPECT_EQ(rank["cuda_device"], 3);
  EXPECT_EQ(rank["gpu_index"], 3);
  EXPECT_EQ(rank["pci_bus_id"], "0000:61:00.0");
  EXPECT_EQ(rank["matched_by"], "cuda_device");
  EXPECT_EQ(rank["nic"]["name"], "mlx5_5");
  EXPECT_EQ(rank["nic"]["path"], "same_switch");
  EXPECT_EQ(rank["nvlink_domain"], 0);
  EXPECT_EQ(rank["nvlink_domain_gpus"].size(), 8u);
  EXPECT_TRUE(rank["gpu"].is_number_integer());
}

TEST(TopoBuild, EveryRankOfThePcieBoxSharesTheNic) {
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_2gpu_pcie_only.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
  for (int device = 0; device < 2; ++device) {
    json rank = buildForRank(device)["this_rank"];
    EXPECT_EQ(rank["nic"]["name"], "mlx5_0") << device;
    EXPECT_EQ(rank["nvlink_domain"], device) << device;
    EXPECT_EQ(rank["nvlink_domain_gpus"], json::array({device}));
  }
}

TEST(TopoBuild, HostRankHasNoGpu) {
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_8gpu_8nic_rail.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
  json rank = buildForRank(-1)["this_rank"];
  EXPECT_TRUE(rank["cuda_device"].is_null());
  EXPECT_TRUE(rank["gpu"].is_null());
  EXPECT_TRUE(rank["nic"].is_null());
  EXPECT_TRUE(rank["nvlink_domain"].is_null());
}

TEST(TopoBuild, DeviceMissingFromTheGraphIsNullNotAnError) {
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_4gpu_nvlink_nonic.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
  json rank = buildForRank(6)["this_rank"];
  EXPECT_EQ(rank["cuda_device"], 6);
  EXPECT_TRUE(rank["gpu"].is_null());
  EXPECT_NE(rank["description"].get<std::string>().find("not in the topology"), std::string::npos);
}

TEST(TopoBuild, WritesTheDumpFileOfALoadedGraph) {
  std::string path = ::testing::TempDir() + "moecomm_topo_dump_loaded.json";
  std::remove(path.c_str());
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_2gpu_pcie_only.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", path.c_str());
  buildForRank(0);
  TopoGraph dumped;
  ASSERT_EQ(topoLoadFile(path, &dumped), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(dumped == loadFixture("topo_2gpu_pcie_only.json"));
  std::remove(path.c_str());
}

TEST(TopoBuild, WritesTheDumpFileOfTheLiveMachine) {
  std::string pattern = ::testing::TempDir() + "moecomm_topo_dump_live_%p.json";
  std::string path = ::testing::TempDir() + "moecomm_topo_dump_live_" + std::to_string(getpid()) + ".json";
  ScopedEnv file("MOECOMM_TOPO_FILE", nullptr);
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", pattern.c_str());
  json document = buildForRank(-1);
  EXPECT_EQ(document["origin"], "discovery");
  TopoGraph dumped, live;
  ASSERT_EQ(topoLoadFile(path, &dumped), moecommSuccess) << lastErrorText();
  ASSERT_EQ(topoDiscoverCached(&live), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(dumped == live);
  std::remove(path.c_str());
}

TEST(TopoBuild, ConcurrentRanksShareOneDumpPath) {
  // moecommCommInitAll builds the topology of several ranks from several threads at once.
  std::string path = ::testing::TempDir() + "moecomm_topo_dump_concurrent.json";
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_8gpu_8nic_rail.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", path.c_str());
  std::vector<std::thread> threads;
  std::vector<moecommResult_t> results(8, moecommInternalError);
  std::vector<std::string> nics(8);
  for (int device = 0; device < 8; ++device) {
    threads.emplace_back([device, &results, &nics] {
      std::string text;
      results[device] = topoBuildForRank(device, &text);
      json document = json::parse(text, nullptr, false);
      if (!document.is_discarded() && document["this_rank"]["nic"].is_object()) {
        nics[device] = document["this_rank"]["nic"]["name"].get<std::string>();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::vector<std::string> expected = {"mlx5_0", "mlx5_3", "mlx5_4",  "mlx5_5",
                                             "mlx5_6", "mlx5_9", "mlx5_10", "mlx5_11"};
  for (int device = 0; device < 8; ++device) {
    EXPECT_EQ(results[device], moecommSuccess) << device;
    EXPECT_EQ(nics[device], expected[device]) << device;
  }
  TopoGraph dumped;
  ASSERT_EQ(topoLoadFile(path, &dumped), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(dumped == loadFixture("topo_8gpu_8nic_rail.json"));
  std::remove(path.c_str());
}

TEST(TopoBuild, OutputReplaysAsATopoFile) {
  std::string path = ::testing::TempDir() + "moecomm_topo_build_output.json";
  {
    ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_8gpu_8nic_rail.json").c_str());
    ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
    std::string text;
    ASSERT_EQ(topoBuildForRank(0, &text), moecommSuccess) << lastErrorText();
    writeText(path, text);
  }
  TopoGraph replayed;
  ASSERT_EQ(topoLoadFile(path, &replayed), moecommSuccess) << lastErrorText();
  EXPECT_TRUE(replayed == loadFixture("topo_8gpu_8nic_rail.json"));
  std::remove(path.c_str());
}

TEST(TopoBuild, MalformedTopoFileIsInvalidArgument) {
  std::string path = ::testing::TempDir() + "moecomm_topo_malformed.json";
  writeText(path,
            "{\"format_version\": 1, \"nodes\": [{\"id\": 0, \"kind\": \"mainframe\", \"parent\": null}], "
            "\"links\": []}");
  ScopedEnv file("MOECOMM_TOPO_FILE", path.c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", nullptr);
  std::string text;
  EXPECT_EQ(topoBuildForRank(0, &text), moecommInvalidArgument);
  std::string error = lastErrorText();
  EXPECT_NE(error.find(path), std::string::npos) << error;
  EXPECT_NE(error.find("mainframe"), std::string::npos) << error;
  std::remove(path.c_str());
}

TEST(TopoBuild, UnwritableDumpFileIsASystemError) {
  ScopedEnv file("MOECOMM_TOPO_FILE", fixturePath("topo_2gpu_pcie_only.json").c_str());
  ScopedEnv dump("MOECOMM_TOPO_DUMP_FILE", "/nonexistent-dir/moecomm_topo.json");
  std::string text;
  EXPECT_EQ(topoBuildForRank(0, &text), moecommSystemError);
  EXPECT_NE(std::string(lastErrorText()).find("MOECOMM_TOPO_DUMP_FILE"), std::string::npos) << lastErrorText();
}

TEST(TopoBuild, BadArgumentsAreRefused) {
  std::string text;
  EXPECT_EQ(topoBuildForRank(0, nullptr), moecommInvalidArgument);
  EXPECT_EQ(topoBuildForRank(-2, &text), moecommInvalidArgument);
  EXPECT_NE(std::string(lastErrorText()).find("-2"), std::string::npos);
}

}  // namespace
}  // namespace moecomm
