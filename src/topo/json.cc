// The topology graph as JSON: writing, and reading with a sentence for every malformed input.
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "topo/json_value.h"
#include "topo/topology.h"

namespace moecomm {
namespace {

std::string hexText(uint16_t value) {
  char text[8];
  std::snprintf(text, sizeof(text), "0x%04x", value);
  return text;
}

TopoJson nullIfNegative(int value) { return value < 0 ? TopoJson(nullptr) : TopoJson(value); }

TopoJson nodeJson(const TopoNode& node) {
  TopoJson out;
  out["id"] = node.id;
  out["kind"] = topoNodeKindName(node.kind);
  out["parent"] = nullIfNegative(node.parent);
  out["name"] = node.name;
  out["numa"] = nullIfNegative(node.numa);
  if (!node.pci_bus_id.empty()) out["pci_bus_id"] = node.pci_bus_id;
  if (!node.model.empty()) out["model"] = node.model;
  if (node.kind == TopoNodeKind::kGpu || node.cuda_device >= 0) out["cuda_device"] = nullIfNegative(node.cuda_device);
  if (node.kind == TopoNodeKind::kNic || node.rdma) out["rdma"] = node.rdma;
  if (node.pci_vendor != 0) out["pci_vendor"] = hexText(node.pci_vendor);
  if (node.pci_device != 0) out["pci_device"] = hexText(node.pci_device);
  if (node.pci_class != 0) out["pci_class"] = hexText(node.pci_class);
  if (node.link_gbs != 0) out["link_gbs"] = node.link_gbs;
  if (node.pcie_gen != 0) out["pcie_gen"] = node.pcie_gen;
  if (node.pcie_width != 0) out["pcie_width"] = node.pcie_width;
  if (node.memory_bytes != 0) out["memory_bytes"] = node.memory_bytes;
  if (!node.os_devices.empty()) out["os_devices"] = node.os_devices;
  return out;
}

TopoJson linkJson(const TopoLink& link) {
  TopoJson out;
  out["a"] = link.a;
  out["b"] = link.b;
  out["kind"] = topoLinkKindName(link.kind);
  out["bandwidth_gbs"] = link.bandwidth_gbs;
  if (link.p2p_perf_rank >= 0) out["p2p_perf_rank"] = link.p2p_perf_rank;
  if (link.native_atomics >= 0) out["native_atomics"] = link.native_atomics == 1;
  if (!link.detail.empty()) out["detail"] = link.detail;
  return out;
}

// ---------------------------------------------------------------------------------------
// Reading. Each helper names the object and field in its sentence, so a hand-edited file
// says exactly where it is wrong. Absent optional fields keep the struct's default.
// ---------------------------------------------------------------------------------------

moecommResult_t checkKeys(const TopoJson& object, const std::set<std::string>& known, const std::string& what) {
  for (const auto& item : object.items()) {
    MC_REQUIRE(known.count(item.key()) != 0, moecommInvalidArgument, "%s has an unknown field \"%s\"", what.c_str(),
               item.key().c_str());
  }
  return moecommSuccess;
}

moecommResult_t readInt(const TopoJson& object, const char* key, const std::string& what, bool required,
                        bool null_allowed, int* out) {
  auto found = object.find(key);
  if (found == object.end()) {
    MC_REQUIRE(!required, moecommInvalidArgument, "%s lacks the field \"%s\"", what.c_str(), key);
    return moecommSuccess;
  }
  if (found->is_null() && null_allowed) {
    *out = -1;
    return moecommSuccess;
  }
  MC_REQUIRE(found->is_number_integer(), moecommInvalidArgument, "%s has field \"%s\" = %s, expected an integer%s",
             what.c_str(), key, found->dump().c_str(), null_allowed ? " or null" : "");
  int64_t value = found->get<int64_t>();
  MC_REQUIRE(value >= -1 && value <= INT32_MAX, moecommInvalidArgument, "%s has field \"%s\" = %lld, out of range",
             what.c_str(), key, static_cast<long long>(value));
  *out = static_cast<int>(value);
  return moecommSuccess;
}

moecommResult_t readString(const TopoJson& object, const char* key, const std::string& what, bool required,
                           std::string* out) {
  auto found = object.find(key);
  if (found == object.end() || (!required && found->is_null())) {
    MC_REQUIRE(!required, moecommInvalidArgument, "%s lacks the field \"%s\"", what.c_str(), key);
    return moecommSuccess;
  }
  MC_REQUIRE(found->is_string(), moecommInvalidArgument, "%s has field \"%s\" = %s, expected a string", what.c_str(),
             key, found->dump().c_str());
  *out = found->get<std::string>();
  return moecommSuccess;
}

moecommResult_t readNumber(const TopoJson& object, const char* key, const std::string& what, double* out) {
  auto found = object.find(key);
  if (found == object.end()) return moecommSuccess;
  MC_REQUIRE(found->is_number() && found->get<double>() >= 0, moecommInvalidArgument,
             "%s has field \"%s\" = %s, expected a number >= 0", what.c_str(), key, found->dump().c_str());
  *out = found->get<double>();
  return moecommSuccess;
}

moecommResult_t readHex16(const TopoJson& object, const char* key, const std::string& what, uint16_t* out) {
  std::string text;
  MC_CHECK(readString(object, key, what, false, &text));
  if (text.empty()) return moecommSuccess;
  char* end = nullptr;
  unsigned long value = std::strtoul(text.c_str(), &end, 16);
  MC_REQUIRE(text.size() > 2 && text.compare(0, 2, "0x") == 0 && *end == '\0' && value <= 0xffff,
             moecommInvalidArgument, "%s has field \"%s\" = \"%s\", expected a hex number like \"0x10de\"",
             what.c_str(), key, text.c_str());
  *out = static_cast<uint16_t>(value);
  return moecommSuccess;
}

moecommResult_t readNodeKind(const TopoJson& object, const std::string& what, TopoNodeKind* kind) {
  std::string name;
  MC_CHECK(readString(object, "kind", what, true, &name));
  MC_REQUIRE(topoNodeKindFromName(name, kind), moecommInvalidArgument,
             "%s has kind \"%s\", not one of machine, cpu_socket, numa, host_bridge, pcie_switch, gpu, nic, "
             "pci_device",
             what.c_str(), name.c_str());
  return moecommSuccess;
}

moecommResult_t readPciFields(const TopoJson& object, const std::string& what, TopoNode* node) {
  std::string bus_id;
  MC_CHECK(readString(object, "pci_bus_id", what, false, &bus_id));
  if (!bus_id.empty()) {
    MC_REQUIRE(topoNormalizeBusId(bus_id, &node->pci_bus_id), moecommInvalidArgument,
               "%s has pci_bus_id \"%s\", expected the form 0000:17:00.0", what.c_str(), bus_id.c_str());
  }
  MC_CHECK(readHex16(object, "pci_vendor", what, &node->pci_vendor));
  MC_CHECK(readHex16(object, "pci_device", what, &node->pci_device));
  MC_CHECK(readHex16(object, "pci_class", what, &node->pci_class));
  MC_CHECK(readNumber(object, "link_gbs", what, &node->link_gbs));
  MC_CHECK(readInt(object, "pcie_gen", what, false, false, &node->pcie_gen));
  MC_CHECK(readInt(object, "pcie_width", what, false, false, &node->pcie_width));
  MC_REQUIRE(node->pcie_gen >= 0 && node->pcie_width >= 0, moecommInvalidArgument,
             "%s has a negative pcie_gen or pcie_width", what.c_str());
  return moecommSuccess;
}

moecommResult_t readNode(const TopoJson& object, size_t position, TopoNode* node) {
  std::string what = "topology node at position " + std::to_string(position);
  MC_REQUIRE(object.is_object(), moecommInvalidArgument, "%s is not a JSON object", what.c_str());
  static const std::set<std::string> kKnown = {"id",           "kind",      "parent",      "name",     "numa",
                                               "pci_bus_id",   "model",     "cuda_device", "rdma",     "pci_vendor",
                                               "pci_device",   "pci_class", "link_gbs",    "pcie_gen", "pcie_width",
                                               "memory_bytes", "os_devices"};
  MC_CHECK(checkKeys(object, kKnown, what));
  MC_CHECK(readInt(object, "id", what, true, false, &node->id));
  MC_CHECK(readNodeKind(object, what, &node->kind));
  MC_CHECK(readInt(object, "parent", what, true, true, &node->parent));
  MC_CHECK(readString(object, "name", what, false, &node->name));
  MC_CHECK(readString(object, "model", what, false, &node->model));
  MC_CHECK(readInt(object, "numa", what, false, true, &node->numa));
  MC_CHECK(readInt(object, "cuda_device", what, false, true, &node->cuda_device));
  MC_CHECK(readPciFields(object, what, node));
  auto rdma = object.find("rdma");
  if (rdma != object.end()) {
    MC_REQUIRE(rdma->is_boolean(), moecommInvalidArgument, "%s has field \"rdma\" = %s, expected true or false",
               what.c_str(), rdma->dump().c_str());
    node->rdma = rdma->get<bool>();
  } else {
    // Silence would mean "no RDMA" and quietly drop the NIC from selection; make it explicit.
    MC_REQUIRE(node->kind != TopoNodeKind::kNic, moecommInvalidArgument,
               "%s is a nic and lacks the field \"rdma\" (true when it has an RDMA device)", what.c_str());
  }
  auto memory = object.find("memory_bytes");
  if (memory != object.end()) {
    MC_REQUIRE(memory->is_number_unsigned(), moecommInvalidArgument,
               "%s has field \"memory_bytes\" = %s, expected an unsigned integer", what.c_str(),
               memory->dump().c_str());
    node->memory_bytes = memory->get<uint64_t>();
  }
  auto os_devices = object.find("os_devices");
  if (os_devices != object.end()) {
    MC_REQUIRE(os_devices->is_array(), moecommInvalidArgument, "%s has field \"os_devices\" that is not an array",
               what.c_str());
    for (const auto& name : *os_devices) {
      MC_REQUIRE(name.is_string(), moecommInvalidArgument, "%s has a non-string entry in \"os_devices\"", what.c_str());
      node->os_devices.push_back(name.get<std::string>());
    }
  }
  return moecommSuccess;
}

moecommResult_t readLink(const TopoJson& object, size_t position, TopoLink* link) {
  std::string what = "topology link at position " + std::to_string(position);
  MC_REQUIRE(object.is_object(), moecommInvalidArgument, "%s is not a JSON object", what.c_str());
  static const std::set<std::string> kKnown = {"a",     "b", "kind", "bandwidth_gbs", "p2p_perf_rank", "native_atomics",
                                               "detail"};
  MC_CHECK(checkKeys(object, kKnown, what));
  MC_CHECK(readInt(object, "a", what, true, false, &link->a));
  MC_CHECK(readInt(object, "b", what, true, false, &link->b));
  std::string kind;
  MC_CHECK(readString(object, "kind", what, true, &kind));
  MC_REQUIRE(topoLinkKindFromName(kind, &link->kind), moecommInvalidArgument,
             "%s has kind \"%s\", not one of pci, nvlink, net, p2p", what.c_str(), kind.c_str());
  MC_CHECK(readNumber(object, "bandwidth_gbs", what, &link->bandwidth_gbs));
  MC_CHECK(readInt(object, "p2p_perf_rank", what, false, true, &link->p2p_perf_rank));
  auto atomics = object.find("native_atomics");
  if (atomics != object.end() && !atomics->is_null()) {
    MC_REQUIRE(atomics->is_boolean(), moecommInvalidArgument,
               "%s has field \"native_atomics\" = %s, expected a boolean", what.c_str(), atomics->dump().c_str());
    link->native_atomics = atomics->get<bool>() ? 1 : 0;
  }
  MC_CHECK(readString(object, "detail", what, false, &link->detail));
  return moecommSuccess;
}

moecommResult_t readGraph(const TopoJson& document, TopoGraph* graph) {
  MC_REQUIRE(document.is_object(), moecommInvalidArgument, "the topology JSON is not an object");
  const TopoJson* object = &document;
  auto inner = document.find("graph");
  if (inner != document.end() && inner->is_object()) object = &*inner;
  int version = -1;
  MC_CHECK(readInt(*object, "format_version", "the topology", true, false, &version));
  MC_REQUIRE(version == kTopoFormatVersion, moecommInvalidArgument,
             "the topology has format_version %d; this library reads version %d", version, kTopoFormatVersion);
  MC_CHECK(readString(*object, "source", "the topology", false, &graph->source));
  MC_CHECK(readString(*object, "host", "the topology", false, &graph->host));
  MC_CHECK(readString(*object, "nvlink_method", "the topology", false, &graph->nvlink_method));
  auto nodes = object->find("nodes");
  MC_REQUIRE(nodes != object->end() && nodes->is_array(), moecommInvalidArgument,
             "the topology lacks a \"nodes\" array");
  auto links = object->find("links");
  MC_REQUIRE(links != object->end() && links->is_array(), moecommInvalidArgument,
             "the topology lacks a \"links\" array");
  for (size_t i = 0; i < nodes->size(); ++i) {
    TopoNode node;
    MC_CHECK(readNode((*nodes)[i], i, &node));
    graph->nodes.push_back(std::move(node));
  }
  for (size_t i = 0; i < links->size(); ++i) {
    TopoLink link;
    MC_CHECK(readLink((*links)[i], i, &link));
    graph->links.push_back(std::move(link));
  }
  return topoValidate(*graph);
}

}  // namespace

TopoJson topoGraphJsonValue(const TopoGraph& graph) {
  TopoJson out;
  out["format_version"] = kTopoFormatVersion;
  out["source"] = graph.source;
  out["host"] = graph.host;
  out["nvlink_method"] = graph.nvlink_method;
  out["nodes"] = TopoJson::array();
  for (const TopoNode& node : graph.nodes) out["nodes"].push_back(nodeJson(node));
  out["links"] = TopoJson::array();
  for (const TopoLink& link : graph.links) out["links"].push_back(linkJson(link));
  return out;
}

std::string topoJsonText(const TopoJson& value) {
  return value.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

std::string topoGraphToJson(const TopoGraph& graph) { return topoJsonText(topoGraphJsonValue(graph)); }

moecommResult_t topoGraphFromJson(const std::string& text, TopoGraph* graph) {
  TopoJson document = TopoJson::parse(text, nullptr, false);
  MC_REQUIRE(!document.is_discarded(), moecommInvalidArgument, "the topology is not valid JSON");
  TopoGraph parsed;
  // The readers check every type before converting, so nothing should throw; the catch is a
  // firewall for whatever nlohmann might still raise.
  try {
    MC_CHECK(readGraph(document, &parsed));
  } catch (const std::exception& error) {
    return setError(moecommInvalidArgument, "the topology JSON could not be read: %s", error.what());
  }
  *graph = std::move(parsed);
  return moecommSuccess;
}

moecommResult_t topoLoadFile(const std::string& path, TopoGraph* graph) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return setError(moecommSystemError, "cannot open the topology file %s: %s", path.c_str(), std::strerror(errno));
  }
  std::stringstream text;
  text << in.rdbuf();
  MC_REQUIRE(!in.bad(), moecommSystemError, "cannot read the topology file %s", path.c_str());
  moecommResult_t result = topoGraphFromJson(text.str(), graph);
  if (result != moecommSuccess) addErrorContext(("topology file " + path).c_str());
  return result;
}

moecommResult_t topoDumpFile(const TopoGraph& graph, const std::string& path) {
  // Unique per process and per call: communicators created by several threads of one
  // process (moecommCommInitAll) may dump to the same path at the same time.
  static std::atomic<unsigned> sequence{0};
  const std::string temporary = path + ".tmp." + std::to_string(getpid()) + "." + std::to_string(sequence++);
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) {
      return setError(moecommSystemError, "cannot create the topology file %s: %s", temporary.c_str(),
                      std::strerror(errno));
    }
    out << topoGraphToJson(graph);
    out.flush();
    if (!out) {
      std::remove(temporary.c_str());
      return setError(moecommSystemError, "cannot write the topology file %s", temporary.c_str());
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    int error = errno;
    std::remove(temporary.c_str());
    return setError(moecommSystemError, "cannot rename %s to %s: %s", temporary.c_str(), path.c_str(),
                    std::strerror(error));
  }
  return moecommSuccess;
}

}  // namespace moecomm
