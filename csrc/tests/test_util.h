// Minimal checks for the native unit tests: each test file is an executable that prints what
// failed and exits non-zero (ctest reports it).
#pragma once

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

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

inline int report(const char* name) {
  if (failures()) std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
  else std::printf("%s: all checks passed\n", name);
  return failures() ? 1 : 0;
}

}  // namespace cram_test
