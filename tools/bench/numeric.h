// Number formats shared by the host reference and the bench's GPU kernels, written once so
// both round the same way: BF16 (round to nearest even) and FP8 e4m3fn decoding.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define BENCH_HD __host__ __device__ __forceinline__
#else
#define BENCH_HD inline
#endif

namespace moecomm_bench {

BENCH_HD float BitsToFloat(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

BENCH_HD uint32_t FloatToBits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

BENCH_HD float Bf16ToFloat(uint16_t bits) { return BitsToFloat(static_cast<uint32_t>(bits) << 16); }

// Round to nearest even; NaN stays a quiet NaN.
BENCH_HD uint16_t FloatToBf16(float value) {
  const uint32_t bits = FloatToBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7f / 0xff are NaN; no infinity.
BENCH_HD float E4m3ToFloat(uint8_t bits) {
  const uint32_t sign = (bits >> 7) & 1u;
  const uint32_t exponent = (bits >> 3) & 0xfu;
  const uint32_t mantissa = bits & 7u;
  float magnitude;
  if (exponent == 0xfu && mantissa == 7u) {
    magnitude = BitsToFloat(0x7fc00000u);
  } else if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 0.001953125f;  // m/8 * 2^-6
  } else {
    magnitude = BitsToFloat(((exponent + 120u) << 23) | (mantissa << 20));
  }
  return sign ? -magnitude : magnitude;
}

}  // namespace moecomm_bench
