// JSON values of the topology for code inside src/topo that composes larger documents
// (build.cc). Kept out of topology.h so that its users do not compile nlohmann/json.
#pragma once

#include <nlohmann/json.hpp>

#include "topo/topology.h"

namespace moecomm {

// ordered_json keeps keys in the order written, so documents read in a sensible order
// (id, kind, parent, ...) and stay byte-for-byte stable between runs.
using TopoJson = nlohmann::ordered_json;

TopoJson topoGraphJsonValue(const TopoGraph& graph);
TopoJson topoChoiceJsonValue(const TopoGraph& graph, const TopoSelection& selection, const TopoGpuChoice& choice);
TopoJson topoSelectionJsonValue(const TopoGraph& graph, const TopoSelection& selection);
// Serializes without throwing: invalid UTF-8 in names is replaced, never an exception.
std::string topoJsonText(const TopoJson& value);

}  // namespace moecomm
