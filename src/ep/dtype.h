// Number formats of the EP data path, bit-exact and identical on host and device: BF16 and
// FP8 e4m3fn conversions and the UE8M0 scale exponents. The host reference backend and the
// CUDA kernels include this same header, so a GPU result can be compared bit for bit with
// the host's. Everything is integer arithmetic on the IEEE bits: no dependence on the FPU
// rounding mode, on fast-math flags or on library intrinsics whose NaN handling differs.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/host_device.h"

namespace moecomm {

// Largest finite e4m3fn magnitude (0x7e): values beyond it saturate to it.
constexpr float kFp8E4m3Max = 448.0f;
// One FP32 scale covers this many consecutive channels of a row.
constexpr int kFp8ScaleBlock = 128;
// The amax of a block is clamped to at least this before the scale is derived, so an
// all-zero block gets a finite, non-zero scale.
constexpr float kFp8MinAmax = 1e-4f;
// e4m3fn has no infinity; this is the NaN it produces.
constexpr uint8_t kFp8E4m3NaN = 0x7f;

MC_HOST_DEVICE inline uint32_t floatToBits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

MC_HOST_DEVICE inline float bitsToFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// ---- BF16 -------------------------------------------------------------------------------

// Exact: a BF16 value is the top half of an FP32.
MC_HOST_DEVICE inline float bf16ToFloat(uint16_t value) { return bitsToFloat(static_cast<uint32_t>(value) << 16); }

// Round to nearest, ties to even. A NaN keeps its sign and top payload bits and is made
// quiet (so a payload living only in the dropped bits cannot turn into an infinity);
// finite values that round past the largest BF16 become infinity, as IEEE rounding does.
MC_HOST_DEVICE inline uint16_t floatToBf16(float value) {
  const uint32_t bits = floatToBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t keptLowBit = (bits >> 16) & 1u;
  // Adding 0x7fff rounds up exactly when the dropped half is above 0x8000; the kept low bit
  // breaks the tie at 0x8000 towards even. A carry into the exponent is the correct result.
  return static_cast<uint16_t>((bits + 0x7fffu + keptLowBit) >> 16);
}

// ---- FP8 e4m3fn --------------------------------------------------------------------------
// 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal (steps of
// 2^-9); 0x7f / 0xff are NaN; there is no infinity; the largest finite value is 448 (0x7e).

MC_HOST_DEVICE inline float e4m3ToFloat(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t exponent = (code >> 3) & 0xfu;
  const uint32_t mantissa = code & 0x7u;
  if (exponent == 0xfu && mantissa == 0x7u) return bitsToFloat(sign | 0x7fc00000u);
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // mantissa * 2^-9, exact
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: re-bias the exponent from 7 to 127 and left-align the mantissa.
  return bitsToFloat(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Round to nearest, ties to even. NaN -> 0x7f (sign dropped). Magnitudes >= 448, infinities
// included, saturate to +-448 (0x7e / 0xfe), like cvt.rn.satfinite.e4m3x2.f32.
MC_HOST_DEVICE inline uint8_t floatToE4m3(float value) {
  const uint32_t bits = floatToBits(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return kFp8E4m3NaN;
  if (magnitude >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448.0f
  if (magnitude >= 0x3c800000u) {
    // Normal in e4m3 (>= 2^-6): keep 3 of the 23 mantissa bits with the same add-and-shift
    // rounding as BF16; a carry into the exponent is correct, and nothing below 448 can
    // round above 448 (0x7e).
    const uint32_t rounded = (magnitude + 0x7ffffu + ((magnitude >> 20) & 1u)) >> 20;
    return static_cast<uint8_t>(sign | (rounded - (120u << 3)));
  }
  // Subnormal in e4m3: the code is round(magnitude * 2^9) in 0..8 (8 is the smallest normal,
  // whose encoding is also 8). FP32 subnormals and anything below 2^-11 round to zero.
  const uint32_t biasedExponent = magnitude >> 23;
  if (biasedExponent < 127 - 11) return sign;
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;  // value = significand * 2^(e-23)
  const uint32_t shift = 14u + 127u - biasedExponent;                // 21..25
  uint32_t code = significand >> shift;
  const uint32_t remainder = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (remainder > half || (remainder == half && (code & 1u) != 0)) ++code;
  return static_cast<uint8_t>(sign | code);
}

// ---- Scales --------------------------------------------------------------------------------

// The smallest power of two >= scale, i.e. 2^ceil(log2(scale)), exactly, for a positive
// normal FP32 (the only kind of scale the FP8 cast makes). Infinity stays infinity.
MC_HOST_DEVICE inline float roundScaleUpToPowerOfTwo(float scale) {
  const uint32_t bits = floatToBits(scale);
  if ((bits & 0x7fffffu) == 0) return scale;
  return bitsToFloat((bits & 0xff800000u) + 0x800000u);
}

// UE8M0: an unsigned 8-bit biased exponent, value 2^(byte - 127). For a power-of-two scale
// it is just the FP32 exponent field.
MC_HOST_DEVICE inline uint8_t ue8m0FromPowerOfTwo(float powerOfTwoScale) {
  return static_cast<uint8_t>((floatToBits(powerOfTwoScale) >> 23) & 0xffu);
}

// 0xff is NaN; 0 is 2^-127 (an FP32 subnormal).
MC_HOST_DEVICE inline float ue8m0ToFloat(uint8_t exponent) {
  if (exponent == 0xffu) return bitsToFloat(0x7fc00000u);
  if (exponent == 0) return bitsToFloat(0x00400000u);
  return bitsToFloat(static_cast<uint32_t>(exponent) << 23);
}

}  // namespace moecomm
