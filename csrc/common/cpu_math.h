// Math for the CPU kernels: SIMD vector types, and scalar and vector functions written so that
// gcc/clang vectorise loops that call the scalar forms.
//
// std::exp is an opaque libm call that blocks vectorisation; `exp_approx` is inline arithmetic
// (range reduction to 2^k · e^r, |r| <= ln2/2, and a degree-6 polynomial) accurate to about
// 1 ulp in float, one definition for a float and for a vector of floats. It keeps IEEE
// semantics where it matters: NaN in gives NaN out, large negative arguments (and -inf) give 0
// (through the subnormal range), large positive ones give +inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "dtype.h"

// The scalar functions must be inlined into the loops that call them for those loops to
// vectorise; GCC's heuristics sometimes decline in large kernels, so they are forced.
#define CRAM_INLINE inline __attribute__((always_inline))

namespace cram {

// ---------------------------------------------------------------------------------------------
// SIMD vectors: GCC/Clang vector extensions sized to the widest unit the target has, so one
// generic code path serves every element type and instruction set.
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#else
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 16;
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int lanes = kVectorBytes / sizeof(T);
};
template <typename T> using Vec = typename Simd<T>::vec;
typedef int32_t VecI32 __attribute__((vector_size(kVectorBytes)));

template <typename T> CRAM_INLINE Vec<T> splat(T x) { return Vec<T>{} + x; }
template <typename T> CRAM_INLINE Vec<T> max_vec(Vec<T> a, Vec<T> b) { return b > a ? b : a; }
// Unaligned loads and stores of one vector.
template <typename T> CRAM_INLINE Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> CRAM_INLINE void store_vec(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// Sum of the lanes, in lane order (call as lane_sum<T>(v)).
template <typename T> CRAM_INLINE T lane_sum(Vec<T> v) {
  T sum = v[0];
  for (int i = 1; i < Simd<T>::lanes; ++i) sum += v[i];
  return sum;
}

// Σ a[c] · b[c] accumulated in acc_t: in SIMD lanes (then summed in lane order) where both
// operands are acc_t already, element by element where one is widened from a 16-bit type.
template <typename acc_t, typename A, typename B>
CRAM_INLINE acc_t dot(const A* a, const B* b, int64_t n) {
  acc_t sum = 0;
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, A> && std::is_same_v<acc_t, B>) {
    constexpr int W = Simd<acc_t>::lanes;
    Vec<acc_t> acc{};
    for (; c + W <= n; c += W) acc += load_vec(a + c) * load_vec(b + c);
    sum = lane_sum<acc_t>(acc);
  }
  for (; c < n; ++c) sum += acc_t(to_float(a[c])) * acc_t(to_float(b[c]));
  return sum;
}

namespace detail {
// Lanes 0, 2, 4, ... (kOdd: 1, 3, 5, ...) of the concatenation of a and b.
template <int kOdd, typename V, int... I>
CRAM_INLINE V every_other_lane(V a, V b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, (2 * I + kOdd)...);
}
}  // namespace detail

// Transposes a square block of vectors in place: afterwards v[j][i] is the old v[i][j]. Each
// round deinterleaves pairs of vectors; log2(lanes) rounds make the transpose.
template <typename T> CRAM_INLINE void transpose_vecs(Vec<T>* v) {
  constexpr int kLanes = Simd<T>::lanes;
  using Order = std::make_integer_sequence<int, kLanes>;
  for (int round = 1; round < kLanes; round *= 2) {
    Vec<T> next[kLanes];
    for (int i = 0; i < kLanes / 2; ++i) {
      next[i] = detail::every_other_lane<0>(v[2 * i], v[2 * i + 1], Order{});
      next[i + kLanes / 2] = detail::every_other_lane<1>(v[2 * i], v[2 * i + 1], Order{});
    }
    for (int i = 0; i < kLanes; ++i) v[i] = next[i];
  }
}

// The lane sums of `lanes` vectors at once, as one vector: result[j] = Σ_i v[j][i]. Each round
// adds neighbouring lanes of pairs of vectors, halving the vectors and packing their sums, so
// the whole costs about 3 operations per vector instead of a sequential sum's one per lane.
// The order of the additions is fixed (pairwise), so results are deterministic.
template <typename T> CRAM_INLINE Vec<T> lane_sums(const Vec<T>* v) {
  constexpr int kLanes = Simd<T>::lanes;
  using Order = std::make_integer_sequence<int, kLanes>;
  Vec<T> level[kLanes];
  for (int i = 0; i < kLanes; ++i) level[i] = v[i];
  for (int n = kLanes; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      level[i] = detail::every_other_lane<0>(level[2 * i], level[2 * i + 1], Order{}) +
                 detail::every_other_lane<1>(level[2 * i], level[2 * i + 1], Order{});
  return level[0];
}

// ---------------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------------

namespace detail {

CRAM_INLINE int32_t float_bits(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
}
CRAM_INLINE VecI32 float_bits(Vec<float> x) { return reinterpret_cast<VecI32>(x); }
CRAM_INLINE float bits_float(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
}
CRAM_INLINE Vec<float> bits_float(VecI32 i) { return reinterpret_cast<Vec<float>>(i); }

constexpr float kExpRoundShift = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer

// e^x = p · 2^k for a finite x: k = round(x · log2 e) sits in the low mantissa bits of
// `shifted` (read by exp_power_k), and p = e^(x - k·ln 2) comes from a polynomial on the
// Cody-Waite reduced argument. F is float or Vec<float>: the same operations, lane-wise.
template <typename F>
struct ExpSplit {
  F p, shifted;
};
template <typename F>
CRAM_INLINE ExpSplit<F> exp_split(F x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const F zero{};
  const F shifted = x * kLog2e + kExpRoundShift;
  const F k = shifted - kExpRoundShift;
  const F r = (x - k * kLn2Hi) - k * kLn2Lo;
  F p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return {p, shifted};
}
// The integer k of exp_split (NaN in `shifted` only reaches p).
template <typename F>
CRAM_INLINE auto exp_power_k(F shifted) {
  return float_bits(shifted) - float_bits(kExpRoundShift);
}

template <typename F>
CRAM_INLINE F exp_approx(F x) {
  const F zero{};
  const auto underflow = x < -103.0f;  // e^-103 is below the smallest float subnormal
  const auto overflow = x > 88.7228f;
  const F xc = underflow ? zero : (overflow ? zero : x);  // NaN passes through unchanged
  const ExpSplit<F> e = exp_split(xc);
  // 2^k in two halves so that k down to -149 (subnormal results) stays representable.
  const auto ki = exp_power_k(e.shifted);
  const auto k1 = ki >> 1, k2 = ki - k1;
  const F y = e.p * bits_float((k1 + 127) << 23) * bits_float((k2 + 127) << 23);
  return underflow ? zero : (overflow ? zero + INFINITY : y);
}

// e^x for x <= 0, the softmax weights' case, in about half exp_approx's operations: no
// overflow path, and results below 2^-126 (x below about -87.3) flush to 0, so the power of two
// needs no split. x is clamped where k reaches -127, whose 2^k built from exponent bits 0 is 0.
template <typename F>
CRAM_INLINE F exp_nonpositive(F x) {
  constexpr float kFlushBelow = -88.0f;  // rounds to k = -127
  const F floor = F{} + kFlushBelow;
  const F xc = floor > x ? floor : x;  // NaN passes through unchanged (and -inf becomes 0)
  const ExpSplit<F> e = exp_split(xc);
  return e.p * bits_float((exp_power_k(e.shifted) + 127) << 23);
}

}  // namespace detail

CRAM_INLINE float exp_approx(float x) { return detail::exp_approx(x); }
CRAM_INLINE Vec<float> exp_approx(Vec<float> x) { return detail::exp_approx(x); }
// Double inputs are for exactness (gradcheck), not speed: the library exp.
CRAM_INLINE double exp_approx(double x) { return std::exp(x); }
CRAM_INLINE Vec<double> exp_approx(Vec<double> x) {
  for (int i = 0; i < Simd<double>::lanes; ++i) x[i] = std::exp(x[i]);
  return x;
}

CRAM_INLINE float exp_nonpositive(float x) { return detail::exp_nonpositive(x); }
CRAM_INLINE Vec<float> exp_nonpositive(Vec<float> x) { return detail::exp_nonpositive(x); }
CRAM_INLINE double exp_nonpositive(double x) { return exp_approx(x); }
CRAM_INLINE Vec<double> exp_nonpositive(Vec<double> x) { return exp_approx(x); }

// Natural log of a positive normal float: x = 2^e · m with m in [√½, √2), log m by a
// polynomial in m - 1 (about 1 ulp).
CRAM_INLINE float log_approx(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  const uint32_t mbits = (bits & 0x007fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.0f : e;
  const float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * e - 0.5f * z;
  return f + y + 0.693359375f * e;
}

// log(1 + e) without losing e's digits when e is small: log(u) · e / (u - 1) with u = 1 + e
// cancels the rounding error of u.
CRAM_INLINE float log1p_approx(float e) {
  const float u = 1.0f + e;
  return u == 1.0f ? e : log_approx(u) * (e / (u - 1.0f));
}

// softplus(x) = log(1 + e^x), linear above 20 as torch.nn.functional.softplus.
CRAM_INLINE float softplus(float x) { return x > 20.0f ? x : log1p_approx(exp_approx(x)); }
CRAM_INLINE double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
CRAM_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
CRAM_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
CRAM_INLINE Vec<float> sigmoid(Vec<float> x) { return 1.0f / (1.0f + exp_approx(-x)); }
CRAM_INLINE Vec<double> sigmoid(Vec<double> x) { return 1.0 / (1.0 + exp_approx(-x)); }

}  // namespace cram
