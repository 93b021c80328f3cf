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
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// The fp16 conversions below compute every case and pick one with bit masks (no branches,
// no selects: GCC turns chains of selects back into multi-way branches it cannot vectorize),
// so compilers vectorize them; each case is exact integer arithmetic.

// All ones when a < b, else 0 (a and b below 2^31).
PO_HD uint32_t mask_below(uint32_t a, uint32_t b) { return static_cast<uint32_t>(static_cast<int32_t>(a - b) >> 31); }

PO_HD uint32_t pick_bits(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

PO_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                  // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;  // rebias the exponent by 127 - 15
  const uint32_t inf_nan = normal + 0x38000000u;     // exponent 31 -> 255, payload kept
  // subnormal or zero: value = em * 2^-24, exact in float32
  const uint32_t subnormal = float_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
  uint32_t magnitude = pick_bits(mask_below(em, 0x0400u), subnormal, normal);
  magnitude = pick_bits(mask_below(em, 0x7c00u), magnitude, inf_nan);
  return bits_float(sign | magnitude);
}

PO_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  // normal result: round the mantissa to 10 bits (nearest even), rebias the exponent
  const uint32_t normal = (abs + 0xfffu + ((abs >> 13) & 1u) - 0x38000000u) >> 13;
  // subnormal result (2^-25 <= |f| < 2^-14): round man * 2^(exp-150) to a multiple of 2^-24,
  // nearest even: add half a unit minus one plus the kept lsb, then shift
  const int32_t shift_raw = 126 - static_cast<int32_t>(abs >> 23);
  const uint32_t shift = static_cast<uint32_t>(shift_raw < 14 ? 14 : (shift_raw > 24 ? 24 : shift_raw));
  const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t subnormal = (man + ((1u << (shift - 1u)) - 1u) + ((man >> shift) & 1u)) >> shift;
  uint32_t r = pick_bits(mask_below(abs, 0x38800000u), subnormal, normal);
  r &= ~mask_below(abs, 0x33000000u);                       // below 2^-25: rounds to zero
  r = pick_bits(mask_below(abs, 0x477ff000u), r, 0x7c00u);  // rounds to infinity (and infinity)
  r = pick_bits(mask_below(0x7f800000u, abs), 0x7e00u, r);  // NaN -> quiet NaN
  return static_cast<uint16_t>(sign | r);
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
