// Scalar math for the CPU kernels, written so that gcc/clang vectorise loops that call it.
//
// std::exp is an opaque libm call that blocks vectorisation; `exp_approx` is inline arithmetic
// (range reduction to 2^k · e^r, |r| <= ln2/2, and a degree-6 polynomial) accurate to about
// 1 ulp in float. It keeps IEEE semantics where it matters: NaN in gives NaN out, large negative
// arguments (and -inf) give 0, large positive ones give +inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cram {

inline float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -103.0f;  // e^-103 is below the smallest float subnormal
  const bool overflow = x > 88.7228f;
  const float xc = underflow ? 0.0f : (overflow ? 0.0f : x);  // NaN passes through unchanged
  const float k = std::nearbyint(xc * kLog2e);
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^k in two halves so that k down to -149 (subnormal results) stays representable.
  const int32_t ki = static_cast<int32_t>(k == k ? k : 0.0f);  // NaN stays in p, not in the cast
  const int32_t k1 = ki / 2, k2 = ki - k1;
  const uint32_t b1 = static_cast<uint32_t>(k1 + 127) << 23;
  const uint32_t b2 = static_cast<uint32_t>(k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  const float y = p * s1 * s2;
  return underflow ? 0.0f : (overflow ? INFINITY : y);
}
inline double exp_approx(double x) { return std::exp(x); }

// Natural log of a positive normal float: x = 2^e · m with m in [√½, √2), log m by a
// polynomial in m - 1 (about 1 ulp).
inline float log_approx(float x) {
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
inline float log1p_approx(float e) {
  const float u = 1.0f + e;
  return u == 1.0f ? e : log_approx(u) * (e / (u - 1.0f));
}

// softplus(x) = log(1 + e^x), linear above 20 as torch.nn.functional.softplus.
inline float softplus(float x) { return x > 20.0f ? x : log1p_approx(exp_approx(x)); }
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace cram
