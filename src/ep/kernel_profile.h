// Developer timelines of the CUDA kernels (builds with -DMOECOMM_KERNEL_PROFILE): formats the
// global-timer stamps a kernel family recorded per block and event into one log line.
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace moecomm {

// stamps[block][event]; the earliest event-0 stamp over the blocks (the kernel's start).
inline unsigned long long profileOrigin(const unsigned long long* stamps, int blocks, int events) {
  unsigned long long origin = ~0ull;
  for (int b = 0; b < blocks; ++b) origin = std::min(origin, stamps[static_cast<size_t>(b) * events]);
  return origin;
}

// A stamp of this call (not zero, not stale, not an SM id in a slot of its own): true.
inline bool profileStampOfCall(unsigned long long v, unsigned long long origin) {
  return v >= origin && v - origin < 10000000000ull;
}

// " eN=min/median/max" per event, in microseconds after origin, over the blocks that recorded
// it (a zero or stale stamp is left out).
inline std::string profileLine(const unsigned long long* stamps, int blocks, int events, unsigned long long origin) {
  std::string line;
  for (int e = 0; e < events; ++e) {
    std::vector<double> at;
    for (int b = 0; b < blocks; ++b) {
      const unsigned long long v = stamps[static_cast<size_t>(b) * events + e];
      if (profileStampOfCall(v, origin)) at.push_back((v - origin) / 1000.0);
    }
    if (at.empty()) continue;
    std::sort(at.begin(), at.end());
    char text[96];
    std::snprintf(text, sizeof(text), " e%d=%.1f/%.1f/%.1f", e, at.front(), at[at.size() / 2], at.back());
    line += text;
  }
  return line;
}

}  // namespace moecomm
