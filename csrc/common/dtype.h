// Element types the kernels accept, without any torch header.
//
// The binding layer maps a tensor's dtype to `DType`; each kernel file turns the runtime tag into
// a template argument with CRAM_DTYPE_SWITCH (one switch per launch, as Mamba's static switches).
// On the CPU the 16-bit types are plain storage structs converted to float for arithmetic;
// CUDA sources use their own native types (see csrc/common/cuda_dtype.cuh).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace cram {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// 16-bit storage types for the CPU kernels: loads widen to float, stores round to nearest even.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Stores an accumulator value (float, or double for double tensors) as element type T.
template <typename T> inline T from_float(float x);
template <typename T> inline T from_float(double x) { return from_float<T>(static_cast<float>(x)); }
template <> inline float from_float<float>(float x) { return x; }
template <> inline double from_float<double>(float x) { return x; }
template <> inline double from_float<double>(double x) { return x; }
template <> inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <> inline fp16_t from_float<fp16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero: let float addition do the rounding
    float f;
    std::memcpy(&f, &abs, sizeof(f));
    f += 0.5f;  // 0.5 = 2^-1: aligns the fp16 subnormal grid (2^-24) to float's last mantissa bits
    uint32_t r;
    std::memcpy(&r, &f, sizeof(r));
    return fp16_t{static_cast<uint16_t>(sign | (r - 0x3f000000u))};
  }
  const uint32_t mant_odd = (abs >> 13) & 1u;
  const uint32_t rounded = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return fp16_t{static_cast<uint16_t>(sign | (rounded >> 13))};
}

// Accumulation type: float64 for float64 inputs, float32 otherwise.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

}  // namespace cram

// Expands BODY with `scalar_t` bound to the storage type of DTYPE (CPU kernels).
#define CRAM_DTYPE_SWITCH(DTYPE, NAME, ...)                                              \
  [&] {                                                                                  \
    switch (DTYPE) {                                                                     \
      case ::cram::DType::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }    \
      case ::cram::DType::kFloat64: { using scalar_t = double; return __VA_ARGS__(); }   \
      case ::cram::DType::kFloat16: { using scalar_t = ::cram::fp16_t; return __VA_ARGS__(); } \
      case ::cram::DType::kBFloat16: { using scalar_t = ::cram::bf16_t; return __VA_ARGS__(); } \
    }                                                                                    \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype");              \
  }()
