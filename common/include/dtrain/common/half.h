// float32 <-> float16 (IEEE 754 binary16) and bfloat16 conversions for
// tensors on the wire (fp16/bf16 transport), without LibTorch.
//
// Both round to nearest, ties to even, as c10::Half and c10::BFloat16 do;
// NaN stays NaN, overflow becomes infinity, small values become fp16
// subnormals or zero. tests/common checks every fp16 and bf16 bit pattern and
// random floats against LibTorch's conversions.
#pragma once

#include <cstdint>
#include <cstring>

namespace dtrain::half {

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  const uint32_t u = Bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

inline float Bf16ToFloat(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToFp16(float f);
float Fp16ToFloat(uint16_t h);

}  // namespace dtrain::half
