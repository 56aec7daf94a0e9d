#include "dtrain/common/half.h"

#include <cmath>

namespace dtrain::half {

uint16_t FloatToFp16(float f) {
  const uint32_t u = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: infinity
  if (abs < 0x38800000u) {
    // Below the smallest normal fp16 (2^-14): a subnormal (or zero), in units
    // of 2^-24, rounded to nearest even by the float addition below.
    const float magic = FromBits(0x3f000000u);  // 0.5: aligns 2^-24 units at the mantissa's end
    const float v = FromBits(abs) + magic;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(Bits(v) - Bits(magic)));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits.
  const uint32_t mant_odd = (abs >> 13) & 1u;
  uint32_t v = abs + 0xc8000fffu + mant_odd;  // (-112 << 23) + rounding
  return static_cast<uint16_t>(sign | static_cast<uint16_t>(v >> 13));
}

float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant x 2^-24.
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return FromBits(Bits(v) | sign);
  }
  if (exp == 31) return FromBits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return FromBits(sign | ((exp + 112) << 23) | (mant << 13));
}

}  // namespace dtrain::half
