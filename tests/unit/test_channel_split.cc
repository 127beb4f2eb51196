// The normal mode's token split over channels (device_host.h): light channels take their
// share, the ranges tile the tokens in order, and no range outgrows the staging rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "device/device_host.h"

namespace moecomm {
namespace device {
namespace {

struct Split {
  uint8_t light[kMaxLightChannels] = {};
  int share = kChannelUnits;
  int units[kMaxLightChannels + 1] = {};
  void fill() { fillChannelUnits(light, share, units); }
};

// Checks every range of numTokens tokens over numChannels channels; returns the sizes.
std::vector<int> checkRanges(const Split& split, int numTokens, int numChannels, int chunkRows) {
  std::vector<int> sizes;
  int expectFirst = 0;
  for (int c = 0; c < numChannels; ++c) {
    int first = -1;
    int last = -1;
    channelTokenRange(split.units, numTokens, numChannels, c, &first, &last);
    EXPECT_EQ(first, expectFirst) << "channel " << c << " of " << numChannels << ", " << numTokens << " tokens";
    EXPECT_LE(first, last) << "channel " << c;
    EXPECT_LE(last - first, chunkRows) << "channel " << c << " of " << numChannels << ", " << numTokens << " tokens";
    sizes.push_back(last - first);
    expectFirst = last;
  }
  EXPECT_EQ(expectFirst, numTokens) << numChannels << " channels";
  return sizes;
}

TEST(ChannelSplit, AllAlikeIsEven) {
  Split split;
  split.fill();
  for (int C : {1, 7, 24, 132}) {
    for (int T : {0, 1, 23, 24, 4096, 4097}) {
      const int bound = chunkRowsBound(4097, C, split.share);
      EXPECT_EQ(bound, (4097 + C - 1) / C);
      const std::vector<int> sizes = checkRanges(split, T, C, bound);
      for (int size : sizes) EXPECT_LE(size, (T + C - 1) / C) << C << " channels, " << T << " tokens";
      for (int size : sizes) EXPECT_GE(size, T / C) << C << " channels, " << T << " tokens";
    }
  }
}

TEST(ChannelSplit, LightChannelsTakeTheirShare) {
  Split split;
  split.share = 80;
  const int C = 24;
  for (int c = 0; c < 8; ++c) split.light[c] = 1;
  split.fill();
  const int T = 4096;
  const std::vector<int> sizes = checkRanges(split, T, C, chunkRowsBound(T, C, split.share));
  // 16 channels of 100 units and 8 of 80: 2240 units, 182.86 and 146.29 tokens.
  for (int c = 0; c < C; ++c) {
    if (c < 8) {
      EXPECT_GE(sizes[c], 146) << c;
      EXPECT_LE(sizes[c], 147) << c;
    } else {
      EXPECT_GE(sizes[c], 182) << c;
      EXPECT_LE(sizes[c], 183) << c;
    }
  }
}

TEST(ChannelSplit, RandomLightSetsStayWithinTheStaging) {
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 400; ++trial) {
    const int C = 1 + static_cast<int>(rng() % 300);
    Split split;
    split.share = 1 + static_cast<int>(rng() % kChannelUnits);
    // Up to as many light channels as allowed, anywhere below kMaxLightChannels.
    const int want = maxLightChannels(C) == 0 ? 0 : static_cast<int>(rng() % (maxLightChannels(C) + 1));
    for (int taken = 0; taken < want;) {
      const int c = static_cast<int>(rng() % std::min(C, kMaxLightChannels));
      if (split.light[c] != 0) continue;
      split.light[c] = 1;
      ++taken;
    }
    split.fill();
    const int maxT = static_cast<int>(rng() % 9000);
    const int bound = chunkRowsBound(maxT, C, split.share);
    EXPECT_GE(bound, (maxT + C - 1) / C);
    for (int T : {0, 1, maxT / 3, maxT - 1, maxT}) {
      if (T < 0) continue;
      checkRanges(split, T, C, bound);
    }
  }
}

TEST(ChannelSplit, AtMostHalfTheChannelsAreLight) {
  EXPECT_EQ(maxLightChannels(1), 0);
  EXPECT_EQ(maxLightChannels(24), 12);
  EXPECT_EQ(maxLightChannels(25), 12);
  EXPECT_EQ(maxLightChannels(1000), kMaxLightChannels);
  // With 12 of 24 channels light at 80 %, a full channel takes 4096 * 100 / 2160 tokens.
  EXPECT_EQ(chunkRowsBound(4096, 24, 80), 190);
}

}  // namespace
}  // namespace device
}  // namespace moecomm
