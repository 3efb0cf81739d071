// Minimal checks for the native unit tests: each test file is an executable that prints what
// failed and exits non-zero (ctest reports it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../common/dtype.h"

namespace cram_test {

inline int& failures() {
  static int count = 0;
  return count;
}

#define CRAM_EXPECT(cond, ...)                                            \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                  \
      std::fprintf(stderr, "\n");                                         \
      ++::cram_test::failures();                                          \
    }                                                                     \
  } while (0)

// Largest |a - b| / (atol + rtol |b|) over two equally long arrays; <= 1 means all close.
// NaN in one array where the other has a number (or different sizes) counts as infinitely far.
template <typename A, typename B>
double close_ratio(const std::vector<A>& a, const std::vector<B>& b, double atol, double rtol) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = double(a[i]), y = double(b[i]);
    if (std::isnan(x) || std::isnan(y)) {
      if (!(std::isnan(x) && std::isnan(y))) return INFINITY;
      continue;
    }
    worst = std::max(worst, std::fabs(x - y) / (atol + rtol * std::fabs(y)));
  }
  return worst;
}

template <typename T>
std::vector<T> random_vector(size_t n, std::mt19937& rng, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(dist(rng));
  return v;
}

// The DType tag of a storage type, and vectors moved between float64 and a storage type.
template <typename T> constexpr cram::DType dtype_of();
template <> constexpr cram::DType dtype_of<float>() { return cram::DType::kFloat32; }
template <> constexpr cram::DType dtype_of<double>() { return cram::DType::kFloat64; }
template <> constexpr cram::DType dtype_of<cram::fp16_t>() { return cram::DType::kFloat16; }
template <> constexpr cram::DType dtype_of<cram::bf16_t>() { return cram::DType::kBFloat16; }

template <typename T> std::vector<T> rounded_to(const std::vector<double>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = cram::from_float<T>(x[i]);
  return out;
}
template <typename T> std::vector<double> widened(const std::vector<T>& x) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = double(cram::to_float(x[i]));
  return out;
}

// Largest finite |x|.
inline double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x)
    if (std::isfinite(v)) m = std::max(m, std::fabs(v));
  return m;
}

// Largest |got - want|; infinite where one is NaN or infinite and the other is not the same
// (or the sizes differ).
inline double max_abs_error(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return INFINITY;
  double worst = 0;
  for (size_t n = 0; n < want.size(); ++n) {
    if (std::isfinite(want[n]) && std::isfinite(got[n])) worst = std::max(worst, std::fabs(got[n] - want[n]));
    else if (!(got[n] == want[n] || (std::isnan(got[n]) && std::isnan(want[n])))) return INFINITY;
  }
  return worst;
}

inline int report(const char* name) {
  if (failures()) std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
  else std::printf("%s: all checks passed\n", name);
  return failures() ? 1 : 0;
}

}  // namespace cram_test
