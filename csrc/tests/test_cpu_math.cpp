// The CPU kernels' building blocks: 16-bit conversions and the vectorisable exp.
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/cpu_math.h"
#include "common/dtype.h"
#include "test_util.h"

using namespace cram;

// Every bf16/fp16 bit pattern widens to float and narrows back to itself (NaNs stay NaN).
void test_16bit_round_trip() {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float bf = to_float(bf16_t{uint16_t(bits)}), hf = to_float(fp16_t{uint16_t(bits)});
    if (std::isnan(bf)) CRAM_EXPECT(std::isnan(to_float(from_float<bf16_t>(bf))), "bf16 nan %x", bits);
    else CRAM_EXPECT(from_float<bf16_t>(bf).bits == bits, "bf16 %x", bits);
    if (std::isnan(hf)) CRAM_EXPECT(std::isnan(to_float(from_float<fp16_t>(hf))), "fp16 nan %x", bits);
    else CRAM_EXPECT(from_float<fp16_t>(hf).bits == bits, "fp16 %x", bits);
  }
}

// Narrowing rounds to the nearest representable value, ties to even: compare with the two
// neighbours of each float between consecutive 16-bit values.
void test_16bit_rounding() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-70000.f, 70000.f);
  for (int i = 0; i < 200000; ++i) {
    const float x = i % 2 ? dist(rng) : dist(rng) * 1e-6f;
    const float h = to_float(from_float<fp16_t>(x));
    const float b = to_float(from_float<bf16_t>(x));
    // The rounded value is at least as close as the values one 16-bit step away from it.
    for (int dir : {-1, 1}) {
      const fp16_t hn{uint16_t(from_float<fp16_t>(x).bits + dir)};
      const bf16_t bn{uint16_t(from_float<bf16_t>(x).bits + dir)};
      if (std::isfinite(h) && std::isfinite(to_float(hn)))
        CRAM_EXPECT(std::fabs(h - x) <= std::fabs(to_float(hn) - x), "fp16 rounding of %g", x);
      if (std::isfinite(to_float(bn)))
        CRAM_EXPECT(std::fabs(b - x) <= std::fabs(to_float(bn) - x), "bf16 rounding of %g", x);
    }
    if (std::fabs(x) >= 65520.f) CRAM_EXPECT(std::isinf(h), "fp16 overflow of %g", x);
  }
}

void test_exp_approx() {
  double worst_ulp = 0;
  for (float x = -110.f; x < 89.f; x += 0.0137f) {
    const float got = exp_approx(x);
    const double want = std::exp(double(x));
    if (want < std::numeric_limits<float>::min()) {  // subnormal range: absolute error
      CRAM_EXPECT(std::fabs(got - want) <= 2e-45 * 2, "exp(%g) = %g, want %g", x, got, want);
      continue;
    }
    if (want > std::numeric_limits<float>::max()) {
      CRAM_EXPECT(std::isinf(got), "exp(%g) should overflow", x);
      continue;
    }
    const double ulp = std::fabs(got - want) / (std::nextafter(float(want), INFINITY) - float(want));
    worst_ulp = std::max(worst_ulp, ulp);
  }
  CRAM_EXPECT(worst_ulp <= 2.0, "exp_approx worst error %.2f ulp", worst_ulp);
  CRAM_EXPECT(std::isnan(exp_approx(std::numeric_limits<float>::quiet_NaN())), "nan");
  CRAM_EXPECT(exp_approx(-INFINITY) == 0.0f, "exp(-inf)");
  CRAM_EXPECT(std::isinf(exp_approx(INFINITY)), "exp(inf)");
  CRAM_EXPECT(exp_approx(0.0f) == 1.0f, "exp(0)");
}

void test_exp_nonpositive() {
  double worst_ulp = 0;
  for (float x = -110.f; x <= 0.f; x += 0.0137f) {
    const float got = exp_nonpositive(x);
    const double want = std::exp(double(x));
    if (want < std::numeric_limits<float>::min()) {  // flushed to 0 or a normal float near 2^-126
      CRAM_EXPECT(got == 0.0f || std::fabs(got - want) <= want * 1e-6, "exp(%g) = %g, want %g", x, got, want);
      continue;
    }
    const double ulp = std::fabs(got - want) / (std::nextafter(float(want), INFINITY) - float(want));
    worst_ulp = std::max(worst_ulp, ulp);
    CRAM_EXPECT(got == exp_approx(x), "exp_nonpositive(%g) = %g differs from exp_approx's %g", x, got, exp_approx(x));
  }
  CRAM_EXPECT(worst_ulp <= 2.0, "exp_nonpositive worst error %.2f ulp", worst_ulp);
  CRAM_EXPECT(std::isnan(exp_nonpositive(std::numeric_limits<float>::quiet_NaN())), "nan");
  CRAM_EXPECT(exp_nonpositive(-INFINITY) == 0.0f, "exp(-inf)");
  CRAM_EXPECT(exp_nonpositive(0.0f) == 1.0f, "exp(0)");
  const Vec<float> lanes = exp_nonpositive(splat(-1.5f));
  for (int i = 0; i < Simd<float>::lanes; ++i) CRAM_EXPECT(lanes[i] == exp_nonpositive(-1.5f), "vector lane %d", i);
}

void test_softplus_and_sigmoid() {
  double worst_softplus = 0, worst_sigmoid = 0;
  for (float x = -40.f; x < 30.f; x += 0.00731f) {
    const double sp = x > 20 ? double(x) : std::log1p(std::exp(double(x)));
    const double sg = 1.0 / (1.0 + std::exp(-double(x)));
    worst_softplus = std::max(worst_softplus, std::fabs(softplus(x) - sp) / sp);
    worst_sigmoid = std::max(worst_sigmoid, std::fabs(sigmoid(x) - sg) / sg);
  }
  CRAM_EXPECT(worst_softplus < 5e-7, "softplus worst relative error %.3g", worst_softplus);
  CRAM_EXPECT(worst_sigmoid < 5e-7, "sigmoid worst relative error %.3g", worst_sigmoid);
  CRAM_EXPECT(std::isnan(softplus(std::numeric_limits<float>::quiet_NaN())), "softplus(nan)");
  for (float x = 1e-30f; x < 1e30f; x *= 1.37f) {
    const double rel = std::fabs(log_approx(x) - std::log(double(x))) / std::fabs(std::log(double(x)) + 1e-30);
    CRAM_EXPECT(rel < 3e-7 || std::fabs(log_approx(x) - std::log(double(x))) < 1e-7, "log(%g)", x);
  }
}

int main() {
  test_softplus_and_sigmoid();
  test_16bit_round_trip();
  test_16bit_rounding();
  test_exp_approx();
  test_exp_nonpositive();
  return cram_test::report("test_cpu_math");
}
