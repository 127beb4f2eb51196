// The pure EP reference functions (src/ep/host_reference.h) and the number formats
// (src/ep/dtype.h): tiny hand-computed cases with exact expected arrays, and randomized
// properties on larger ones.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "ep/dtype.h"
#include "ep/host_reference.h"

namespace moecomm {
namespace {

using reference::EpShape;

uint16_t bf16(float value) { return floatToBf16(value); }
float fromBits(uint32_t bits) { return bitsToFloat(bits); }

EpShape makeShape(int ranks, int experts, int hidden, int topk, int maxTokens) {
  EpShape shape;
  shape.numRanks = ranks;
  shape.numExperts = experts;
  shape.hidden = hidden;
  shape.topk = topk;
  shape.maxTokensPerRank = maxTokens;
  return shape;
}

// ---- BF16 ---------------------------------------------------------------------------------------

TEST(Dtype, Bf16EveryValueRoundTrips) {
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const uint16_t code = static_cast<uint16_t>(v);
    const float value = bf16ToFloat(code);
    const uint16_t back = floatToBf16(value);
    if (std::isnan(value)) {
      EXPECT_EQ(back, code | 0x0040) << std::hex << v;  // made quiet, sign and payload kept
    } else {
      EXPECT_EQ(back, code) << std::hex << v;
    }
  }
}

TEST(Dtype, Bf16RoundsTiesToEven) {
  EXPECT_EQ(bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // halfway, 1.0 is even: down
  EXPECT_EQ(bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // halfway, 0x3f81 is odd: up
  EXPECT_EQ(bf16(fromBits(0x3f808001)), 0x3f81);             // just above halfway: up
  EXPECT_EQ(bf16(fromBits(0x3f807fff)), 0x3f80);             // just below halfway: down
  EXPECT_EQ(bf16(-1.0f - std::ldexp(1.0f, -8)), 0xbf80);     // negative ties behave the same
}

TEST(Dtype, Bf16KeepsNaNAndOverflowsToInfinity) {
  EXPECT_EQ(floatToBf16(fromBits(0x7f800001)), 0x7fc0);  // payload only in dropped bits: still NaN
  EXPECT_EQ(floatToBf16(fromBits(0xff800001)), 0xffc0);
  EXPECT_EQ(floatToBf16(fromBits(0x7fc12345)), 0x7fc1);
  EXPECT_EQ(floatToBf16(FLT_MAX), 0x7f80);
  EXPECT_EQ(floatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(floatToBf16(-0.0f), 0x8000);
}

// ---- FP8 e4m3fn ---------------------------------------------------------------------------------

TEST(Dtype, Fp8EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const float value = e4m3ToFloat(code);
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(value)) << c;
      EXPECT_EQ(floatToE4m3(value), kFp8E4m3NaN) << c;
    } else {
      EXPECT_EQ(floatToE4m3(value), code) << c << " = " << value;
    }
  }
}

TEST(Dtype, Fp8KnownValues) {
  EXPECT_EQ(floatToE4m3(448.0f), 0x7e);
  EXPECT_EQ(floatToE4m3(1.0f), 0x38);
  EXPECT_EQ(floatToE4m3(-2.0f), 0xc0);
  EXPECT_EQ(floatToE4m3(std::ldexp(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(floatToE4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(floatToE4m3(7 * std::ldexp(1.0f, -9)), 0x07);
  EXPECT_EQ(e4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(e4m3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::signbit(e4m3ToFloat(0x80)));
}

TEST(Dtype, Fp8SaturatesAndMapsNaN) {
  EXPECT_EQ(floatToE4m3(449.0f), 0x7e);
  EXPECT_EQ(floatToE4m3(464.0f), 0x7e);
  EXPECT_EQ(floatToE4m3(1e6f), 0x7e);
  EXPECT_EQ(floatToE4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(floatToE4m3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(floatToE4m3(-500.0f), 0xfe);
  EXPECT_EQ(floatToE4m3(std::nanf("")), 0x7f);
  EXPECT_EQ(floatToE4m3(-std::nanf("")), 0x7f);
}

TEST(Dtype, Fp8TinyValuesRoundToZero) {
  EXPECT_EQ(floatToE4m3(std::ldexp(1.0f, -10)), 0x00);  // exactly half of 2^-9: tie to even 0
  EXPECT_EQ(floatToE4m3(std::ldexp(1.01f, -10)), 0x01);
  EXPECT_EQ(floatToE4m3(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(floatToE4m3(1e-30f), 0x00);
  EXPECT_EQ(floatToE4m3(-1e-30f), 0x80);
  EXPECT_EQ(floatToE4m3(fromBits(0x00000001)), 0x00);       // FP32 subnormal
  EXPECT_EQ(floatToE4m3(3 * std::ldexp(1.0f, -10)), 0x02);  // 1.5 steps: tie to even 2
}

// Every midpoint between neighbouring finite codes rounds to the even one; nudges either
// way round to the nearer.
TEST(Dtype, Fp8MidpointsRoundToEven) {
  for (int c = 0; c < 0x7e; ++c) {
    const float low = e4m3ToFloat(static_cast<uint8_t>(c));
    const float high = e4m3ToFloat(static_cast<uint8_t>(c + 1));
    const float mid = (low + high) / 2;  // exact: both have few significant bits
    EXPECT_EQ(floatToE4m3(mid), c % 2 == 0 ? c : c + 1) << "between codes " << c << " and " << c + 1;
    EXPECT_EQ(floatToE4m3(std::nextafter(mid, 0.0f)), c) << c;
    EXPECT_EQ(floatToE4m3(std::nextafter(mid, 1000.0f)), c + 1) << c;
    EXPECT_EQ(floatToE4m3(-mid), 0x80 | (c % 2 == 0 ? c : c + 1)) << c;
  }
}

// Against a brute-force nearest search over all finite codes.
TEST(Dtype, Fp8MatchesBruteForceNearest) {
  std::mt19937 random(7);
  std::uniform_real_distribution<float> exponent(-12.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    const float value = std::exp2(exponent(random)) * (i % 2 == 0 ? 1.0f : -1.0f);
    const double magnitude = std::fabs(static_cast<double>(value));
    int best = 0;
    double bestDistance = 1e300;
    for (int c = 0; c <= 0x7e; ++c) {
      const double distance = std::fabs(e4m3ToFloat(static_cast<uint8_t>(c)) - magnitude);
      if (distance < bestDistance || (distance == bestDistance && c % 2 == 0)) {
        best = c;
        bestDistance = distance;
      }
    }
    if (magnitude >= 448.0) best = 0x7e;
    const int expected = (value < 0 ? 0x80 : 0) | best;
    ASSERT_EQ(floatToE4m3(value), expected) << value;
  }
}

TEST(Dtype, PowerOfTwoScaleRoundsUp) {
  EXPECT_EQ(roundScaleUpToPowerOfTwo(1.0f), 1.0f);
  EXPECT_EQ(roundScaleUpToPowerOfTwo(1.5f), 2.0f);
  EXPECT_EQ(roundScaleUpToPowerOfTwo(0.3f), 0.5f);
  EXPECT_EQ(roundScaleUpToPowerOfTwo(std::ldexp(1.0f, -20)), std::ldexp(1.0f, -20));
  EXPECT_EQ(roundScaleUpToPowerOfTwo(std::nextafter(std::ldexp(1.0f, -20), 1.0f)), std::ldexp(1.0f, -19));
  std::mt19937 random(3);
  std::uniform_real_distribution<float> exponent(-30.0f, 30.0f);
  for (int i = 0; i < 1000; ++i) {
    const float scale = std::exp2(exponent(random));
    EXPECT_EQ(roundScaleUpToPowerOfTwo(scale), std::ldexp(1.0f, static_cast<int>(std::ceil(std::log2(double(scale))))))
        << scale;
  }
}

TEST(Dtype, Ue8m0IsTheBiasedExponent) {
  EXPECT_EQ(ue8m0FromPowerOfTwo(1.0f), 127);
  EXPECT_EQ(ue8m0FromPowerOfTwo(std::ldexp(1.0f, -10)), 117);
  EXPECT_EQ(ue8m0FromPowerOfTwo(2.0f), 128);
  for (int e = 1; e < 255; ++e) {
    const float value = ue8m0ToFloat(static_cast<uint8_t>(e));
    EXPECT_EQ(value, std::ldexp(1.0f, e - 127));
    EXPECT_EQ(ue8m0FromPowerOfTwo(value), e);
  }
  EXPECT_TRUE(std::isnan(ue8m0ToFloat(0xff)));
  EXPECT_EQ(ue8m0ToFloat(0), std::ldexp(1.0f, -127));
}

// ---- Expert ids ---------------------------------------------------------------------------------

TEST(HostRef, WidenAndNarrowTopkIdx) {
  const std::vector<int32_t> narrow = {3, -1, 0, 7};
  std::vector<int64_t> wide(4);
  reference::widenTopkIdx(narrow.data(), moecommInt32, 4, wide.data());
  EXPECT_EQ(wide, (std::vector<int64_t>{3, -1, 0, 7}));
  std::vector<int32_t> back(4);
  reference::narrowTopkIdx(wide.data(), 4, moecommInt32, back.data());
  EXPECT_EQ(back, narrow);
  std::vector<int64_t> copy(4);
  reference::narrowTopkIdx(wide.data(), 4, moecommInt64, copy.data());
  EXPECT_EQ(copy, wide);
}

TEST(HostRef, ValidateTopkIdxNamesFirstBadEntry) {
  const std::vector<int64_t> ids = {0, 1, 8, -1, 9, 2};  // [3][2]; first bad is [1][0]
  clearError();
  EXPECT_EQ(reference::validateTopkIdx(ids.data(), 3, 2, 8), moecommInvalidArgument);
  EXPECT_STREQ(lastErrorText(), "topkIdx[1][0] = 8 is outside [-1, 8)");
}

TEST(HostRef, ValidateTopkIdxRejectsBelowMinusOne) {
  const std::vector<int64_t> ids = {0, -2};
  EXPECT_EQ(reference::validateTopkIdx(ids.data(), 1, 2, 8), moecommInvalidArgument);
  EXPECT_STREQ(lastErrorText(), "topkIdx[0][1] = -2 is outside [-1, 8)");
  const std::vector<int64_t> good = {-1, 7};
  EXPECT_EQ(reference::validateTopkIdx(good.data(), 1, 2, 8), moecommSuccess);
}

TEST(HostRef, RepeatedExpert) {
  const int64_t row[] = {4, 2, 4, -1, -1};
  EXPECT_FALSE(reference::isRepeatedExpert(row, 0));
  EXPECT_FALSE(reference::isRepeatedExpert(row, 1));
  EXPECT_TRUE(reference::isRepeatedExpert(row, 2));
  EXPECT_FALSE(reference::isRepeatedExpert(row, 3));
  EXPECT_TRUE(reference::isRepeatedExpert(row, 4));
}

// ---- Layout and routing -------------------------------------------------------------------------

TEST(HostRef, LayoutHandComputed) {
  const EpShape shape = makeShape(2, 4, 8, 2, 4);
  const std::vector<int64_t> ids = {0, 3, 1, -1, -1, -1, 2, 2};  // 4 tokens
  std::vector<int> perRank(2, -7), perExpert(4, -7);
  std::vector<uint8_t> inRank(8, 9);
  reference::computeLayout(shape, ids.data(), 4, perRank.data(), perExpert.data(), inRank.data());
  EXPECT_EQ(inRank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0, 0, 1}));
  EXPECT_EQ(perRank, (std::vector<int>{2, 2}));
  EXPECT_EQ(perExpert, (std::vector<int>{1, 1, 2, 1}));  // the repeated expert 2 counts twice
}

TEST(HostRef, LayoutOutputsAreOptional) {
  const EpShape shape = makeShape(2, 4, 8, 1, 4);
  const std::vector<int64_t> ids = {3, 0};
  std::vector<int> perRank(2);
  reference::computeLayout(shape, ids.data(), 2, perRank.data(), nullptr, nullptr);
  EXPECT_EQ(perRank, (std::vector<int>{1, 1}));
}

TEST(HostRef, RoutingHandComputed) {
  const EpShape shape = makeShape(3, 6, 8, 2, 4);
  // [source][destination] token counts and [source][expert] selection counts.
  const std::vector<int> perRank = {1, 2, 0,             //
                                    3, 0, 1,             //
                                    2, 2, 2};            //
  const std::vector<int> perExpert = {1, 0, 2, 1, 0, 0,  //
                                      2, 2, 0, 0, 1, 0,  //
                                      1, 1, 1, 2, 3, 0};
  EXPECT_EQ(reference::numRecvTokens(shape, perRank.data(), 0), 6);
  EXPECT_EQ(reference::numRecvTokens(shape, perRank.data(), 1), 4);
  EXPECT_EQ(reference::numRecvTokens(shape, perRank.data(), 2), 3);
  EXPECT_EQ(reference::recvRowBase(shape, perRank.data(), 0, 0), 0);
  EXPECT_EQ(reference::recvRowBase(shape, perRank.data(), 0, 2), 4);
  EXPECT_EQ(reference::recvRowBase(shape, perRank.data(), 2, 2), 1);
  std::vector<int> local(2);
  reference::recvTokensPerExpert(shape, perExpert.data(), 1, 1, local.data());
  EXPECT_EQ(local, (std::vector<int>{3, 3}));
  reference::recvTokensPerExpert(shape, perExpert.data(), 2, 4, local.data());
  EXPECT_EQ(local, (std::vector<int>{4, 0}));
}

TEST(HostRef, AlignUp) {
  EXPECT_EQ(reference::alignUp(0, 4), 0);
  EXPECT_EQ(reference::alignUp(1, 4), 4);
  EXPECT_EQ(reference::alignUp(4, 4), 4);
  EXPECT_EQ(reference::alignUp(5, 1), 5);
  EXPECT_EQ(reference::alignUp(129, 128), 256);
}

// ---- Normal dispatch and combine ----------------------------------------------------------------

// Two ranks, experts 0,1 on rank 0 and 2,3 on rank 1, hidden 8, top-2.
struct TinyDispatch {
  EpShape shape = makeShape(2, 4, 8, 2, 3);
  std::vector<int64_t> ids[2] = {{0, 3, 2, -1, -1, -1}, {1, 0, 3, 2}};  // rank 0: 3 tokens; rank 1: 2
  std::vector<float> weights[2] = {{0.5f, 0.25f, 1.0f, 0.0f, 0.0f, 0.0f}, {0.125f, 2.0f, 3.0f, 4.0f}};
  std::vector<uint16_t> x[2];
  std::vector<uint8_t> inRank[2];
  int tokens[2] = {3, 2};

  TinyDispatch() {
    for (int r = 0; r < 2; ++r) {
      for (int t = 0; t < tokens[r]; ++t) {
        for (int h = 0; h < 8; ++h) x[r].push_back(bf16(100.0f * r + 10.0f * t + h));
      }
      inRank[r].resize(tokens[r] * 2);
      reference::computeLayout(shape, ids[r].data(), tokens[r], nullptr, nullptr, inRank[r].data());
    }
  }
  std::vector<reference::DispatchSource> sources() const {
    std::vector<reference::DispatchSource> out(2);
    for (int r = 0; r < 2; ++r) {
      out[r].numTokens = tokens[r];
      out[r].isTokenInRank = inRank[r].data();
      out[r].x = reinterpret_cast<const uint8_t*>(x[r].data());
      out[r].topkIdx = ids[r].data();
      out[r].topkWeights = weights[r].data();
    }
    return out;
  }
};

TEST(HostRef, DispatchGatherHandComputed) {
  TinyDispatch tiny;
  const auto sources = tiny.sources();
  // Rank 1 receives: rank 0 token 0 (expert 3), rank 0 token 1 (expert 2), rank 1 token 1 (3, 2).
  std::vector<uint16_t> recvX(3 * 8);
  std::vector<int64_t> recvIds(3 * 2, 99);
  std::vector<float> recvWeights(3 * 2, 99.0f);
  std::vector<int> srcRank(3), srcIndex(3);
  reference::DispatchOutput out;
  out.recvX = reinterpret_cast<uint8_t*>(recvX.data());
  out.recvTopkIdx = recvIds.data();
  out.recvTopkWeights = recvWeights.data();
  out.srcRank = srcRank.data();
  out.srcIndex = srcIndex.data();
  EXPECT_EQ(reference::dispatchGather(tiny.shape, 1, sources.data(), 16, out), 3);
  EXPECT_EQ(srcRank, (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(srcIndex, (std::vector<int>{0, 1, 1}));
  EXPECT_EQ(recvIds, (std::vector<int64_t>{-1, 1, 0, -1, 1, 0}));
  EXPECT_EQ(recvWeights, (std::vector<float>{0.0f, 0.25f, 1.0f, 0.0f, 3.0f, 4.0f}));
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(recvX[0 * 8 + h], tiny.x[0][0 * 8 + h]);
    EXPECT_EQ(recvX[1 * 8 + h], tiny.x[0][1 * 8 + h]);
    EXPECT_EQ(recvX[2 * 8 + h], tiny.x[1][1 * 8 + h]);
  }
  // Rank 0 receives rank 0 token 0 and rank 1 token 0.
  std::vector<int> src0(2);
  reference::DispatchOutput out0;
  out0.srcRank = src0.data();
  EXPECT_EQ(reference::dispatchGather(tiny.shape, 0, sources.data(), 16, out0), 2);
  EXPECT_EQ(src0, (std::vector<int>{0, 1}));
}

TEST(HostRef, DispatchGatherCopiesFp8RowsAndScales) {
  const EpShape shape = makeShape(1, 2, 256, 1, 2);
  const std::vector<int64_t> ids = {1, -1};
  std::vector<uint8_t> x(2 * 256);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i * 7);
  const std::vector<float> scales = {0.5f, 0.25f, 8.0f, 16.0f};
  std::vector<uint8_t> inRank(2);
  reference::computeLayout(shape, ids.data(), 2, nullptr, nullptr, inRank.data());
  reference::DispatchSource source;
  source.numTokens = 2;
  source.isTokenInRank = inRank.data();
  source.x = x.data();
  source.xScales = scales.data();
  std::vector<uint8_t> recvX(256, 0);
  std::vector<float> recvScales(2, 0.0f);
  reference::DispatchOutput out;
  out.recvX = recvX.data();
  out.recvXScales = recvScales.data();
  EXPECT_EQ(reference::dispatchGather(shape, 0, &source, 256, out), 1);
  EXPECT_EQ(recvX, std::vector<uint8_t>(x.begin(), x.begin() + 256));
  EXPECT_EQ(recvScales, (std::vector<float>{0.5f, 0.25f}));
}

TEST(HostRef, CombineReduceHandComputed) {
  TinyDispatch tiny;
  // Per-rank routing counts: rank 0 sends [1, 2], rank 1 sends [1, 1].
  const std::vector<int> perRank = {1, 2, 1, 1};
  // Receivers' expert outputs: rank 0 got 2 rows, rank 1 got 3 rows.
  std::vector<uint16_t> y0 = std::vector<uint16_t>(2 * 8), y1 = std::vector<uint16_t>(3 * 8);
  for (int h = 0; h < 8; ++h) {
    y0[0 * 8 + h] = bf16(1.0f + h);  // rank 0 token 0
    y0[1 * 8 + h] = bf16(50.0f);     // rank 1 token 0
    y1[0 * 8 + h] = bf16(0.5f);      // rank 0 token 0
    y1[1 * 8 + h] = bf16(-2.0f);     // rank 0 token 1
    y1[2 * 8 + h] = bf16(70.0f);     // rank 1 token 1
  }
  const std::vector<float> w0 = {1, 2, 30, 40}, w1 = {0.5f, 0.25f, 7, 8, 50, 60};
  std::vector<reference::CombineSource> receivers(2);
  receivers[0].x = y0.data();
  receivers[0].topkWeights = w0.data();
  receivers[1].x = y1.data();
  receivers[1].topkWeights = w1.data();
  std::vector<uint16_t> bias(3 * 8, bf16(0.25f));
  std::vector<uint16_t> out(3 * 8, 0xdead);
  std::vector<float> weightsOut(3 * 2, 99.0f);
  reference::combineReduce(tiny.shape, 0, 3, tiny.inRank[0].data(), perRank.data(), receivers.data(), bias.data(),
                           out.data(), weightsOut.data());
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(out[0 * 8 + h], bf16(1.0f + h + 0.5f + 0.25f)) << h;  // both ranks, then bias
    EXPECT_EQ(out[1 * 8 + h], bf16(-2.0f + 0.25f)) << h;            // rank 1 only
    EXPECT_EQ(out[2 * 8 + h], bf16(0.25f)) << h;                    // sent nowhere: the bias
  }
  EXPECT_EQ(weightsOut, (std::vector<float>{1.5f, 2.25f, 7.0f, 8.0f, 0.0f, 0.0f}));
  // Rank 1's tokens: token 0 on rank 0 (row 1) only, token 1 on rank 1 (row 2) only; no bias.
  std::vector<uint16_t> out1(2 * 8);
  reference::combineReduce(tiny.shape, 1, 2, tiny.inRank[1].data(), perRank.data(), receivers.data(), nullptr,
                           out1.data(), nullptr);
  EXPECT_EQ(out1[0], bf16(50.0f));
  EXPECT_EQ(out1[8], bf16(70.0f));
}

// The weights are summed in rank order: 2^24 + 1 + 1 is 2^24 in FP32, 1 + 1 + 2^24 is not.
TEST(HostRef, CombineSumsInRankOrder) {
  const EpShape shape = makeShape(3, 3, 8, 3, 1);
  const std::vector<int64_t> ids = {0, 1, 2};
  std::vector<uint8_t> inRank(3);
  std::vector<int> perRankRow(3);
  reference::computeLayout(shape, ids.data(), 1, perRankRow.data(), nullptr, inRank.data());
  std::vector<int> perRank(9, 0);
  for (int r = 0; r < 3; ++r) perRank[r] = perRankRow[r];  // only rank 0 sends
  std::vector<uint16_t> y(8, 0);
  const std::vector<float> w0 = {16777216.0f, 0, 0}, w1 = {1.0f, 0, 0}, w2 = {1.0f, 0, 0};
  std::vector<reference::CombineSource> receivers(3);
  const float* weights[3] = {w0.data(), w1.data(), w2.data()};
  for (int r = 0; r < 3; ++r) {
    receivers[r].x = y.data();
    receivers[r].topkWeights = weights[r];
  }
  std::vector<uint16_t> out(8);
  std::vector<float> weightsOut(3);
  reference::combineReduce(shape, 0, 1, inRank.data(), perRank.data(), receivers.data(), nullptr, out.data(),
                           weightsOut.data());
  EXPECT_EQ(weightsOut[0], 16777216.0f);
  EXPECT_EQ(out[0], 0);  // +0.0, not -0.0
}

// Random routing over 4 ranks: every (token, rank) pair with isTokenInRank set arrives exactly
// once, in (source, token) order, and an identity "expert" round trip sums each row once per
// destination.
TEST(HostRef, RandomDispatchCombineProperties) {
  const EpShape shape = makeShape(4, 16, 16, 3, 20);
  std::mt19937 random(11);
  std::uniform_int_distribution<int> expert(-1, 15), tokens(0, 20), value(-8, 8);
  std::vector<std::vector<int64_t>> ids(4);
  std::vector<std::vector<uint16_t>> x(4);
  std::vector<std::vector<uint8_t>> inRank(4);
  std::vector<int> perRank(16), perExpert(64);
  std::vector<reference::DispatchSource> sources(4);
  for (int r = 0; r < 4; ++r) {
    const int count = tokens(random);
    for (int i = 0; i < count * 3; ++i) ids[r].push_back(expert(random));
    for (int i = 0; i < count * 16; ++i) x[r].push_back(bf16(static_cast<float>(value(random))));
    inRank[r].resize(count * 4);
    reference::computeLayout(shape, ids[r].data(), count, perRank.data() + 4 * r, perExpert.data() + 16 * r,
                             inRank[r].data());
    sources[r] = {count,   inRank[r].data(), reinterpret_cast<const uint8_t*>(x[r].data()),
                  nullptr, ids[r].data(),    nullptr};
  }
  std::vector<std::vector<uint16_t>> received(4);
  for (int dest = 0; dest < 4; ++dest) {
    const int n = reference::numRecvTokens(shape, perRank.data(), dest);
    received[dest].resize(static_cast<size_t>(n) * 16);
    std::vector<int> srcRank(n), srcIndex(n);
    std::vector<int64_t> recvIds(static_cast<size_t>(n) * 3);
    reference::DispatchOutput out;
    out.recvX = reinterpret_cast<uint8_t*>(received[dest].data());
    out.recvTopkIdx = recvIds.data();
    out.srcRank = srcRank.data();
    out.srcIndex = srcIndex.data();
    ASSERT_EQ(reference::dispatchGather(shape, dest, sources.data(), 32, out), n);
    std::set<std::pair<int, int>> seen;
    std::vector<int> localSelections(4, 0);
    for (int row = 0; row < n; ++row) {
      EXPECT_TRUE(seen.insert({srcRank[row], srcIndex[row]}).second) << "row " << row << " arrived twice";
      if (row > 0) {
        EXPECT_LT(std::make_pair(srcRank[row - 1], srcIndex[row - 1]), std::make_pair(srcRank[row], srcIndex[row]));
      }
      EXPECT_EQ(inRank[srcRank[row]][srcIndex[row] * 4 + dest], 1);
      for (int k = 0; k < 3; ++k) {
        if (recvIds[row * 3 + k] >= 0) ++localSelections[recvIds[row * 3 + k]];
      }
    }
    std::vector<int> expected(4);
    reference::recvTokensPerExpert(shape, perExpert.data(), dest, 1, expected.data());
    EXPECT_EQ(localSelections, expected);
  }
  std::vector<reference::CombineSource> receivers(4);
  for (int r = 0; r < 4; ++r) receivers[r].x = received[r].data();
  for (int s = 0; s < 4; ++s) {
    const int count = static_cast<int>(ids[s].size() / 3);
    std::vector<uint16_t> out(static_cast<size_t>(count) * 16);
    reference::combineReduce(shape, s, count, inRank[s].data(), perRank.data(), receivers.data(), nullptr, out.data(),
                             nullptr);
    for (int t = 0; t < count; ++t) {
      int destinations = 0;
      for (int r = 0; r < 4; ++r) destinations += inRank[s][t * 4 + r];
      for (int h = 0; h < 16; ++h) {
        ASSERT_EQ(out[t * 16 + h], bf16(0.0f + destinations * bf16ToFloat(x[s][t * 16 + h])))
            << s << " " << t << " " << h;
      }
    }
  }
}

// ---- FP8 cast ------------------------------------------------------------------------------------

TEST(HostRef, CastRowToFp8HandComputed) {
  std::vector<uint16_t> row(256, bf16(0.0f));
  row[0] = bf16(448.0f);  // block 0: amax 448, so scale is exactly 1
  row[1] = bf16(1.0f);
  row[2] = bf16(-3.5f);
  row[3] = bf16(0.1f);  // bf16(0.1) = 0.10009765625 -> 1.625 * 2^-4 = code 0x1d
  std::vector<uint8_t> q(256, 0xaa);
  std::vector<float> scales(2, -1.0f);
  reference::castRowToFp8(row.data(), 256, false, q.data(), scales.data(), nullptr);
  EXPECT_EQ(scales[0], 1.0f);
  EXPECT_EQ(q[0], 0x7e);
  EXPECT_EQ(q[1], 0x38);
  EXPECT_EQ(q[2], 0xc6);
  EXPECT_EQ(q[3], 0x1d);
  EXPECT_EQ(q[4], 0x00);
  // Block 1 is all zero: amax is clamped to 1e-4 and every code is 0.
  EXPECT_EQ(scales[1], 1e-4f / 448.0f);
  for (int c = 128; c < 256; ++c) EXPECT_EQ(q[c], 0x00) << c;
}

TEST(HostRef, CastRowToFp8RoundScaleAndUe8m0) {
  std::vector<uint16_t> row(128, bf16(0.0f));
  row[0] = bf16(3.0f);  // amax 3: scale 3/448 rounds up to 2^-7
  row[1] = bf16(-1.0f);
  std::vector<uint8_t> q(128), exponents(1);
  std::vector<float> scales(1);
  reference::castRowToFp8(row.data(), 128, true, q.data(), scales.data(), exponents.data());
  EXPECT_EQ(scales[0], 0.0078125f);
  EXPECT_EQ(exponents[0], 120);
  EXPECT_EQ(q[0], 0x7c);  // 3 * 128 = 384 = 1.5 * 2^8
  EXPECT_EQ(q[1], 0xf0);  // -128 = -1.0 * 2^7
}

TEST(HostRef, CastRowToFp8DequantizesClose) {
  std::mt19937 random(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<uint16_t> row(1024);
  for (auto& v : row) v = bf16(normal(random));
  for (bool roundScale : {false, true}) {
    std::vector<uint8_t> q(1024);
    std::vector<float> scales(8);
    reference::castRowToFp8(row.data(), 1024, roundScale, q.data(), scales.data(), nullptr);
    for (int c = 0; c < 1024; ++c) {
      const float x = bf16ToFloat(row[c]);
      const float back = e4m3ToFloat(q[c]) * scales[c / 128];
      // e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step.
      EXPECT_NEAR(back, x, std::fabs(x) / 16 + scales[c / 128] * std::ldexp(1.0f, -9)) << c;
    }
  }
}

// ---- Low-latency dispatch and combine --------------------------------------------------------------

// Two ranks, experts 0,1 on rank 0 and 2,3 on rank 1, hidden 128, top-2, maxT 3.
struct TinyLowLatency {
  EpShape shape = makeShape(2, 4, 128, 2, 3);
  std::vector<int64_t> ids[2] = {{1, 2, 3, -1, 1, 1}, {0, 1, -1, -1}};
  std::vector<uint16_t> x[2];
  int tokens[2] = {3, 2};
  TinyLowLatency() {
    for (int r = 0; r < 2; ++r) {
      for (int t = 0; t < tokens[r]; ++t) {
        for (int h = 0; h < 128; ++h) x[r].push_back(bf16(static_cast<float>(r * 16 + t * 4) + h / 64.0f));
      }
    }
  }
  std::vector<reference::LowLatencySource> sources() const {
    std::vector<reference::LowLatencySource> out(2);
    for (int r = 0; r < 2; ++r) out[r] = {tokens[r], ids[r].data(), x[r].data()};
    return out;
  }
};

TEST(HostRef, LowLatencyPackHandComputed) {
  TinyLowLatency tiny;
  const auto sources = tiny.sources();
  const size_t slots = 6;  // R * maxT
  std::vector<uint16_t> recvX(2 * slots * 128, 0xdead);
  std::vector<int> count(2, -1), srcInfo(2 * slots, -9), stats = {10, 20};
  reference::LowLatencyDispatchOutput out;
  out.recvType = moecommBfloat16;
  out.recvX = recvX.data();
  out.recvCount = count.data();
  out.recvSrcInfo = srcInfo.data();
  out.cumulativeRecvStats = stats.data();
  reference::lowLatencyPack(tiny.shape, 0, sources.data(), nullptr, out);
  // Expert 0: rank 1 token 0. Expert 1: rank 0 token 0, rank 0 token 2 (listed twice, placed
  // once), rank 1 token 0.
  EXPECT_EQ(count, (std::vector<int>{1, 3}));
  EXPECT_EQ(stats, (std::vector<int>{11, 23}));
  EXPECT_EQ(srcInfo, (std::vector<int>{3, -9, -9, -9, -9, -9, 0, 2, 3, -9, -9, -9}));
  for (int h = 0; h < 128; ++h) {
    EXPECT_EQ(recvX[(0 * slots + 0) * 128 + h], tiny.x[1][h]);
    EXPECT_EQ(recvX[(1 * slots + 1) * 128 + h], tiny.x[0][2 * 128 + h]);
  }
  EXPECT_EQ(recvX[(0 * slots + 1) * 128], 0xdead);  // slots past the count are untouched
}

TEST(HostRef, LowLatencyPackSkipsMaskedRanks) {
  TinyLowLatency tiny;
  const auto sources = tiny.sources();
  std::vector<uint16_t> recvX(2 * 6 * 128);
  std::vector<int> count(2), srcInfo(12, -9);
  const int mask[2] = {1, 0};
  reference::LowLatencyDispatchOutput out;
  out.recvType = moecommBfloat16;
  out.recvX = recvX.data();
  out.recvCount = count.data();
  out.recvSrcInfo = srcInfo.data();
  reference::lowLatencyPack(tiny.shape, 0, sources.data(), mask, out);
  EXPECT_EQ(count, (std::vector<int>{1, 1}));
  EXPECT_EQ(srcInfo[6], 3);
}

TEST(HostRef, LowLatencyPackFp8MatchesCast) {
  TinyLowLatency tiny;
  const auto sources = tiny.sources();
  std::vector<uint8_t> recvX(2 * 6 * 128);
  std::vector<uint8_t> exponents(2 * 6, 0);
  std::vector<int> count(2);
  reference::LowLatencyDispatchOutput out;
  out.recvType = moecommFloat8E4M3;
  out.ue8m0 = true;
  out.roundScale = true;
  out.recvX = recvX.data();
  out.recvScales = exponents.data();
  out.recvCount = count.data();
  reference::lowLatencyPack(tiny.shape, 1, sources.data(), nullptr, out);
  EXPECT_EQ(count, (std::vector<int>{1, 1}));  // expert 2: rank 0 token 0; expert 3: rank 0 token 1
  std::vector<uint8_t> q(128), e(1);
  reference::castRowToFp8(tiny.x[0].data() + 128, 128, true, q.data(), nullptr, e.data());
  EXPECT_EQ(std::vector<uint8_t>(recvX.begin() + 6 * 128, recvX.begin() + 7 * 128), q);
  EXPECT_EQ(exponents[6], e[0]);
}

TEST(HostRef, LowLatencySelectionSlotsHandComputed) {
  TinyLowLatency tiny;
  std::vector<int> counts(2 * 4);
  for (int r = 0; r < 2; ++r) {
    reference::lowLatencyPlacementCounts(tiny.shape, tiny.ids[r].data(), tiny.tokens[r], counts.data() + 4 * r);
  }
  EXPECT_EQ(counts, (std::vector<int>{0, 2, 1, 1, 1, 1, 0, 0}));
  std::vector<int> slots(6, 99);
  reference::lowLatencySelectionSlots(tiny.shape, 0, tiny.ids[0].data(), 3, counts.data(), nullptr, slots.data());
  EXPECT_EQ(slots, (std::vector<int>{0, 0, 0, -1, 1, 1}));
  std::vector<int> slots1(4, 99);
  reference::lowLatencySelectionSlots(tiny.shape, 1, tiny.ids[1].data(), 2, counts.data(), nullptr, slots1.data());
  EXPECT_EQ(slots1, (std::vector<int>{0, 2, -1, -1}));
  // Rank 0 masks rank 0 (row 0 of the masks): rank 1's token 0 moves to slot 0 of expert 1.
  const std::vector<int> masks = {1, 0, 0, 0};
  reference::lowLatencySelectionSlots(tiny.shape, 1, tiny.ids[1].data(), 2, counts.data(), masks.data(), slots1.data());
  EXPECT_EQ(slots1, (std::vector<int>{0, 0, -1, -1}));
  reference::lowLatencySelectionSlots(tiny.shape, 0, tiny.ids[0].data(), 3, counts.data(), masks.data(), slots.data());
  EXPECT_EQ(slots, (std::vector<int>{-1, 0, 0, -1, -1, -1}));
}

// Random routing and masks: every selection's slot points at a row whose source info names it.
TEST(HostRef, LowLatencySlotsAgreeWithPack) {
  const EpShape shape = makeShape(3, 6, 128, 4, 5);
  std::mt19937 random(17);
  std::uniform_int_distribution<int> expert(-1, 5), tokens(0, 5), coin(0, 3);
  for (int round = 0; round < 20; ++round) {
    std::vector<std::vector<int64_t>> ids(3);
    std::vector<std::vector<uint16_t>> x(3);
    std::vector<reference::LowLatencySource> sources(3);
    std::vector<int> counts(3 * 6), masks(9);
    for (int r = 0; r < 3; ++r) {
      const int count = tokens(random);
      for (int i = 0; i < count * 4; ++i) ids[r].push_back(expert(random));
      x[r].assign(static_cast<size_t>(count) * 128, 0);
      sources[r] = {count, ids[r].data(), x[r].data()};
      reference::lowLatencyPlacementCounts(shape, ids[r].data(), count, counts.data() + 6 * r);
      for (int s = 0; s < 3; ++s) masks[r * 3 + s] = coin(random) == 0 ? 1 : 0;
    }
    std::vector<std::vector<int>> srcInfo(3, std::vector<int>(2 * 15, -1));
    std::vector<std::vector<int>> recvCount(3, std::vector<int>(2));
    for (int r = 0; r < 3; ++r) {
      std::vector<uint16_t> recvX(2 * 15 * 128);
      reference::LowLatencyDispatchOutput out;
      out.recvType = moecommBfloat16;
      out.recvX = recvX.data();
      out.recvCount = recvCount[r].data();
      out.recvSrcInfo = srcInfo[r].data();
      reference::lowLatencyPack(shape, r, sources.data(), masks.data() + 3 * r, out);
    }
    for (int s = 0; s < 3; ++s) {
      const int count = sources[s].numTokens;
      std::vector<int> slots(static_cast<size_t>(count) * 4);
      reference::lowLatencySelectionSlots(shape, s, ids[s].data(), count, counts.data(), masks.data(), slots.data());
      for (int t = 0; t < count; ++t) {
        for (int k = 0; k < 4; ++k) {
          const int64_t e = ids[s][t * 4 + k];
          const int slot = slots[t * 4 + k];
          if (e == -1) {
            EXPECT_EQ(slot, -1);
            continue;
          }
          const int r = static_cast<int>(e / 2);
          if (masks[r * 3 + s] != 0) {
            EXPECT_EQ(slot, -1);
            continue;
          }
          ASSERT_GE(slot, 0);
          ASSERT_LT(slot, recvCount[r][e % 2]);
          EXPECT_EQ(srcInfo[r][(e % 2) * 15 + slot], s * 5 + t);
        }
      }
    }
  }
}

TEST(HostRef, LowLatencyCombineHandComputed) {
  const EpShape shape = makeShape(2, 4, 8, 3, 2);  // 4 slots per expert
  // Token 0 selects experts 1 (slot 0), 2 (slot 1) and nothing; token 1 selects expert 3 twice
  // (slot 0 both) and expert 0 (slot 2).
  const std::vector<int64_t> ids = {1, 2, -1, 3, 0, 3};
  const std::vector<int> slots = {0, 1, -1, 0, 2, 0};
  const std::vector<float> weights = {0.5f, 2.0f, 100.0f, 0.25f, 1.0f, 0.75f};
  std::vector<uint16_t> y0(2 * 4 * 8, bf16(0.0f)), y1(2 * 4 * 8, bf16(0.0f));
  for (int h = 0; h < 8; ++h) {
    y0[(1 * 4 + 0) * 8 + h] = bf16(4.0f);   // expert 1, slot 0
    y0[(0 * 4 + 2) * 8 + h] = bf16(-8.0f);  // expert 0, slot 2
    y1[(0 * 4 + 1) * 8 + h] = bf16(3.0f);   // expert 2, slot 1
    y1[(1 * 4 + 0) * 8 + h] = bf16(h);      // expert 3, slot 0
  }
  const uint16_t* outputs[2] = {y0.data(), y1.data()};
  std::vector<uint16_t> out(16);
  reference::lowLatencyCombine(shape, 2, ids.data(), weights.data(), slots.data(), outputs, nullptr, out.data());
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(out[h], bf16(0.5f * 4 + 2.0f * 3)) << h;
    EXPECT_EQ(out[8 + h], bf16(0.25f * h - 8.0f + 0.75f * h)) << h;
  }
  const int mask[2] = {0, 1};  // rank 1's experts (2 and 3) contribute nothing
  reference::lowLatencyCombine(shape, 2, ids.data(), weights.data(), slots.data(), outputs, mask, out.data());
  EXPECT_EQ(out[0], bf16(2.0f));
  EXPECT_EQ(out[8], bf16(-8.0f));
}

TEST(HostRef, LowLatencyCombineRowsSkipsNullRows) {
  const EpShape shape = makeShape(1, 4, 8, 3, 1);
  std::vector<uint16_t> a(8, bf16(2.0f)), b(8, bf16(-1.0f));
  const uint16_t* rows[6] = {a.data(), nullptr, b.data(), nullptr, nullptr, nullptr};
  const std::vector<float> weights = {0.5f, 100.0f, 3.0f, 1.0f, 1.0f, 1.0f};
  std::vector<uint16_t> out(16, 0xdead);
  reference::lowLatencyCombineRows(shape, 2, weights.data(), rows, out.data());
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(out[h], bf16(-2.0f));  // 0.5 * 2 + 3 * -1
    EXPECT_EQ(out[8 + h], 0x0000);   // nothing selected: +0
  }
}

// The sum uses fused multiply-adds: with w = 1 + 2^-23 and y = 1 + 2^-7 after a first term
// of 1, the fused result rounds above the bf16 midpoint and the unfused one onto it.
TEST(HostRef, LowLatencyCombineUsesFusedMultiplyAdd) {
  const EpShape shape = makeShape(1, 2, 8, 2, 1);
  const std::vector<int64_t> ids = {0, 1};
  const std::vector<int> slots = {0, 0};
  const std::vector<float> weights = {1.0f, 1.0f + std::ldexp(1.0f, -23)};
  std::vector<uint16_t> y(2 * 1 * 8);
  for (int h = 0; h < 8; ++h) {
    y[h] = bf16(1.0f);
    y[8 + h] = bf16(1.0f + std::ldexp(1.0f, -7));
  }
  const uint16_t* outputs[1] = {y.data()};
  std::vector<uint16_t> out(8);
  reference::lowLatencyCombine(shape, 1, ids.data(), weights.data(), slots.data(), outputs, nullptr, out.data());
  EXPECT_EQ(out[0], 0x4001);  // 2 + 2^-6; unfused arithmetic would give 0x4000
}

// The per-rank form rounds each rank's partial to BF16 before the ranks are added. Token 0:
// experts 0 and 1 (rank 0) give 1 and 2^-8, expert 2 (rank 1) gives 2^-8. In k order the sum
// is 1 + 2^-7 (a BF16 value); per rank, p_0 = bf16(1 + 2^-8) = 1 (tie to even), p_1 = 2^-8,
// and bf16(1 + 2^-8) = 1 again. Token 1 selects nothing on rank 0 and rank 1's expert twice.
TEST(HostRef, LowLatencyCombinePerRankRoundsEachRank) {
  const EpShape shape = makeShape(2, 4, 8, 3, 2);  // 4 slots per expert
  const std::vector<int64_t> ids = {0, 2, 1, 3, -1, 3};
  const std::vector<int> slots = {0, 0, 0, 1, -1, 1};
  const std::vector<float> weights = {1.0f, 1.0f, 1.0f, 0.5f, 9.0f, 0.25f};
  std::vector<uint16_t> y0(2 * 4 * 8, bf16(0.0f)), y1(2 * 4 * 8, bf16(0.0f));
  for (int h = 0; h < 8; ++h) {
    y0[(0 * 4 + 0) * 8 + h] = bf16(1.0f);                   // expert 0, slot 0
    y0[(1 * 4 + 0) * 8 + h] = bf16(std::ldexp(1.0f, -8));   // expert 1, slot 0
    y1[(0 * 4 + 0) * 8 + h] = bf16(std::ldexp(1.0f, -8));   // expert 2, slot 0
    y1[(1 * 4 + 1) * 8 + h] = bf16(static_cast<float>(h));  // expert 3, slot 1
  }
  const uint16_t* outputs[2] = {y0.data(), y1.data()};
  std::vector<uint16_t> perExpert(16), perRank(16);
  reference::lowLatencyCombine(shape, 2, ids.data(), weights.data(), slots.data(), outputs, nullptr, perExpert.data());
  reference::lowLatencyCombine(shape, 2, ids.data(), weights.data(), slots.data(), outputs, nullptr, perRank.data(),
                               true);
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(perExpert[h], bf16(1.0f + std::ldexp(1.0f, -7))) << h;
    EXPECT_EQ(perRank[h], bf16(1.0f)) << h;
    EXPECT_EQ(perRank[8 + h], bf16(0.75f * h)) << h;
  }
  const int mask[2] = {1, 0};  // rank 0 masked: token 0 keeps rank 1's partial only
  reference::lowLatencyCombine(shape, 2, ids.data(), weights.data(), slots.data(), outputs, mask, perRank.data(), true);
  EXPECT_EQ(perRank[0], bf16(std::ldexp(1.0f, -8)));
}

}  // namespace
}  // namespace moecomm
