// float <-> fp16 / bf16 conversions by bit manipulation (no cuda_fp16.h / cuda_bf16.h, which
// NVRTC does not ship). Round to nearest even, like torch's .to(dtype).
#pragma once
#include "common.h"

namespace pagedopt {

PO_HD uint32_t float_bits(float f) {
#ifdef PO_DEVICE_CODE
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

PO_HD float bits_float(uint32_t u) {
#ifdef PO_DEVICE_CODE
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

PO_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

PO_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

PO_HD float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // subnormal: value = man * 2^-24, exact in float32
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

PO_HD uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // result is subnormal (or zero): round abs * 2^24 to an integer, nearest even
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0
    uint32_t exp = abs >> 23;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14..24 (value = man * 2^(exp-150), target unit 2^-24)
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);  // round mantissa to 10 bits, nearest even
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

template <int ELEM>
struct Elem;

template <>
struct Elem<ELEM_F32> {
  typedef float storage;
  static PO_HD float load(float v) { return v; }
  static PO_HD float store(float v) { return v; }
};

template <>
struct Elem<ELEM_F16> {
  typedef uint16_t storage;
  static PO_HD float load(uint16_t v) { return half_to_float(v); }
  static PO_HD uint16_t store(float v) { return float_to_half(v); }
};

template <>
struct Elem<ELEM_BF16> {
  typedef uint16_t storage;
  static PO_HD float load(uint16_t v) { return bf16_to_float(v); }
  static PO_HD uint16_t store(float v) { return float_to_bf16(v); }
};

}  // namespace pagedopt
