// Native unit test of the routed-attention CPU kernels against a naive triple-loop reference
// (forward and analytic backward, in double), plus a finite-difference check of the kernel's
// double backward. No torch; exits nonzero and prints the failing case on any mismatch.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "routed_attention/routed_attention.h"
#include "test_util.h"

namespace {

using cram::RoutedAttentionBwdParams;
using cram_test::dtype_of;

struct Case {
  std::string name;
  int batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  bool is_causal;
  double route_fraction;  // probability a row is routed
  bool per_head_route;
  double key_share;       // probability a key exists, 0: no key_mask (at most
                          // kAttentionSparseKeysShare: the kernels visit only the kept keys);
                          // batch 0 also masks key 0, so its causal row 0 sees no key
};

// Inputs in double; q has a padded row stride so the kernel's strides are exercised.
struct Inputs {
  Case c;
  int64_t q_row_stride;
  std::vector<double> q, k, v, dout;
  std::vector<uint8_t> route, key_mask;

  double& q_at(int b, int h, int i, int x) {
    return q[((static_cast<int64_t>(b) * c.heads + h) * c.seqlen_q + i) * q_row_stride + x];
  }
  int64_t kv_index(int b, int h, int j, int x) const {
    return ((static_cast<int64_t>(b) * c.kv_heads + h) * c.seqlen_k + j) * c.head_dim + x;
  }
  int64_t q_index(int b, int h, int i, int x) const {  // contiguous (out, dout, dq)
    return ((static_cast<int64_t>(b) * c.heads + h) * c.seqlen_q + i) * c.head_dim + x;
  }
  bool routed(int b, int h, int i) const {
    return route[(static_cast<int64_t>(b) * (c.per_head_route ? c.heads : 1) + (c.per_head_route ? h : 0)) *
                     c.seqlen_q + i] != 0;
  }
  bool visible(int b, int i, int j) const {
    return (!c.is_causal || j <= i) && (key_mask.empty() || key_mask[b * c.seqlen_k + j]);
  }
};

Inputs make_inputs(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::bernoulli_distribution routed(c.route_fraction), kept(c.key_share);
  Inputs in{c, c.head_dim + 3, {}, {}, {}, {}, {}, {}};
  in.q.assign(static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q * in.q_row_stride, 0.0);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < c.seqlen_q; ++i)
        for (int x = 0; x < c.head_dim; ++x) in.q_at(b, h, i, x) = normal(rng);
  const int64_t kv_size = static_cast<int64_t>(c.batch) * c.kv_heads * c.seqlen_k * c.head_dim;
  for (int64_t n = 0; n < kv_size; ++n) in.k.push_back(normal(rng));
  for (int64_t n = 0; n < kv_size; ++n) in.v.push_back(normal(rng));
  for (int64_t n = 0; n < static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q * c.head_dim; ++n)
    in.dout.push_back(normal(rng));
  const int64_t route_size = static_cast<int64_t>(c.batch) * (c.per_head_route ? c.heads : 1) * c.seqlen_q;
  for (int64_t n = 0; n < route_size; ++n) in.route.push_back(routed(rng));
  if (c.key_share > 0) {
    for (int64_t n = 0; n < static_cast<int64_t>(c.batch) * c.seqlen_k; ++n) in.key_mask.push_back(kept(rng));
    in.key_mask[0] = 0;
  }
  return in;
}

struct Outputs {
  std::vector<double> out, lse, dq, dk, dv;
};

// Naive reference: softmax over visible keys per routed row; analytic gradients.
Outputs reference(const Inputs& in, double scale) {
  const Case& c = in.c;
  const int d = c.head_dim, group = c.heads / c.kv_heads;
  Outputs r;
  r.out.assign(in.dout.size(), 0.0);
  r.dq.assign(in.dout.size(), 0.0);
  r.dk.assign(in.k.size(), 0.0);
  r.dv.assign(in.v.size(), 0.0);
  r.lse.assign(static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q, -std::numeric_limits<double>::infinity());
  Inputs& q = const_cast<Inputs&>(in);
  std::vector<double> p(c.seqlen_k), dp(c.seqlen_k);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < c.seqlen_q; ++i) {
        if (!in.routed(b, h, i)) continue;
        const int kvh = h / group;
        double max_score = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < c.seqlen_k; ++j) {
          if (!in.visible(b, i, j)) continue;
          double s = 0;
          for (int x = 0; x < d; ++x) s += q.q_at(b, h, i, x) * in.k[in.kv_index(b, kvh, j, x)];
          p[j] = s * scale;
          max_score = std::max(max_score, p[j]);
        }
        if (max_score == -std::numeric_limits<double>::infinity()) continue;  // no visible key
        double sum = 0;
        for (int j = 0; j < c.seqlen_k; ++j) sum += in.visible(b, i, j) ? (p[j] = std::exp(p[j] - max_score)) : 0.0;
        r.lse[(static_cast<int64_t>(b) * c.heads + h) * c.seqlen_q + i] = max_score + std::log(sum);
        for (int j = 0; j < c.seqlen_k; ++j) {
          if (!in.visible(b, i, j)) continue;
          p[j] /= sum;
          for (int x = 0; x < d; ++x) r.out[in.q_index(b, h, i, x)] += p[j] * in.v[in.kv_index(b, kvh, j, x)];
        }
        // Backward: dP = dO·V, dS = P (dP - Σ dO·O), dQ = scale dS K, dK = scale dS q, dV = P dO.
        double dout_dot_out = 0;
        for (int x = 0; x < d; ++x) dout_dot_out += in.dout[in.q_index(b, h, i, x)] * r.out[in.q_index(b, h, i, x)];
        for (int j = 0; j < c.seqlen_k; ++j) {
          if (!in.visible(b, i, j)) continue;
          dp[j] = 0;
          for (int x = 0; x < d; ++x) dp[j] += in.dout[in.q_index(b, h, i, x)] * in.v[in.kv_index(b, kvh, j, x)];
          const double ds = p[j] * (dp[j] - dout_dot_out);
          for (int x = 0; x < d; ++x) {
            r.dq[in.q_index(b, h, i, x)] += scale * ds * in.k[in.kv_index(b, kvh, j, x)];
            r.dk[in.kv_index(b, kvh, j, x)] += scale * ds * q.q_at(b, h, i, x);
            r.dv[in.kv_index(b, kvh, j, x)] += p[j] * in.dout[in.q_index(b, h, i, x)];
          }
        }
      }
  return r;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// Runs the kernels on `in` stored as T; returns forward and backward results widened to double.
template <typename T>
Outputs run_kernels(const Inputs& in, double scale) {
  const Case& c = in.c;
  const std::vector<T> q = cast<T>(in.q), k = cast<T>(in.k), v = cast<T>(in.v), dout = cast<T>(in.dout);
  // out gets padded rows, so the kernels' zeroing of unrouted rows must honour its row stride.
  const int64_t out_row_stride = c.head_dim + 2, n_rows = static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q;
  std::vector<T> out(n_rows * out_row_stride, T(7)), lse(n_rows);
  std::vector<T> dq(out.size(), T(0)), dk(k.size(), T(0)), dv(v.size(), T(0));
  RoutedAttentionBwdParams p{};
  p.dtype = dtype_of<T>();
  p.batch = c.batch, p.heads = c.heads, p.kv_heads = c.kv_heads;
  p.seqlen_q = c.seqlen_q, p.seqlen_k = c.seqlen_k, p.head_dim = c.head_dim;
  p.scale = static_cast<float>(scale);
  p.is_causal = c.is_causal;
  p.q_row_stride = in.q_row_stride;
  p.q_head_stride = c.seqlen_q * in.q_row_stride;
  p.q_batch_stride = c.heads * p.q_head_stride;
  p.k_row_stride = p.v_row_stride = c.head_dim;
  p.k_head_stride = p.v_head_stride = static_cast<int64_t>(c.seqlen_k) * c.head_dim;
  p.k_batch_stride = p.v_batch_stride = c.kv_heads * p.k_head_stride;
  p.out_row_stride = out_row_stride;
  p.out_head_stride = c.seqlen_q * out_row_stride;
  p.out_batch_stride = c.heads * p.out_head_stride;
  p.dout_row_stride = c.head_dim;
  p.dout_head_stride = static_cast<int64_t>(c.seqlen_q) * c.head_dim;
  p.dout_batch_stride = c.heads * p.dout_head_stride;
  p.route_row_stride = 1;
  p.route_head_stride = c.per_head_route ? c.seqlen_q : 0;  // 0: one route per batch, shared by heads
  p.route_batch_stride = static_cast<int64_t>(c.per_head_route ? c.heads : 1) * c.seqlen_q;
  p.key_mask_batch_stride = c.seqlen_k;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.dout = dout.data();
  p.route = in.route.data();
  p.key_mask = in.key_mask.empty() ? nullptr : in.key_mask.data();
  p.out = out.data(), p.lse = lse.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  cram::routed_attention_fwd_cpu(p);
  cram::routed_attention_bwd_cpu(p);
  auto widen = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  std::vector<double> out_rows;  // without the padding
  for (int64_t row = 0; row < n_rows; ++row)
    out_rows.insert(out_rows.end(), out.begin() + row * out_row_stride, out.begin() + row * out_row_stride + c.head_dim);
  return {out_rows, widen(lse), widen(dq), widen(dk), widen(dv)};
}

int failures = 0;

void expect_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                  double tol) {
  for (size_t n = 0; n < want.size(); ++n) {
    const bool both_minus_inf = std::isinf(want[n]) && want[n] < 0 && got[n] == want[n];
    if (both_minus_inf || std::abs(got[n] - want[n]) <= tol * (1 + std::abs(want[n]))) continue;
    std::printf("FAIL %s: element %zu is %.9g, expected %.9g (tolerance %g)\n", what.c_str(), n, got[n], want[n], tol);
    ++failures;
    return;
  }
}

template <typename T>
void check_against_reference(const Case& c, unsigned seed, double tol) {
  const Inputs in = make_inputs(c, seed);
  // The params carry the scale as a float; the reference uses that same value.
  const double scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  const Outputs want = reference(in, scale), got = run_kernels<T>(in, scale);
  const std::string tag = c.name + (sizeof(T) == 4 ? " [float]" : " [double]") + " seed " + std::to_string(seed);
  expect_close(tag + " out", got.out, want.out, tol);
  expect_close(tag + " lse", got.lse, want.lse, tol);
  expect_close(tag + " dq", got.dq, want.dq, tol);
  expect_close(tag + " dk", got.dk, want.dk, tol);
  expect_close(tag + " dv", got.dv, want.dv, tol);
}

// Central differences of L = Σ dout ⊙ out(q, k, v) against the kernel's double backward, on a
// few coordinates of each input.
void check_finite_differences(const Case& c, unsigned seed) {
  Inputs in = make_inputs(c, seed);
  const double scale = 0.7, eps = 1e-6;
  const Outputs analytic = run_kernels<double>(in, scale);
  auto loss = [&](const Inputs& x) {
    const std::vector<double> out = run_kernels<double>(x, scale).out;
    double total = 0;
    for (size_t n = 0; n < out.size(); ++n) total += out[n] * x.dout[n];
    return total;
  };
  auto check = [&](const char* name, std::vector<double> Inputs::*tensor, const std::vector<double>& grad,
                   auto index_of_grad) {
    std::vector<double>& x = in.*tensor;
    for (size_t n = 0; n < x.size(); n += x.size() / 7 + 1) {
      const int64_t g = index_of_grad(n);
      if (g < 0) continue;
      const double saved = x[n];
      x[n] = saved + eps;
      const double up = loss(in);
      x[n] = saved - eps;
      const double down = loss(in);
      x[n] = saved;
      const double numeric = (up - down) / (2 * eps);
      if (std::abs(numeric - grad[g]) > 1e-6 * (1 + std::abs(numeric))) {
        std::printf("FAIL %s finite differences: d%s[%zu] is %.9g, numerically %.9g\n", c.name.c_str(), name, n,
                    grad[g], numeric);
        ++failures;
        return;
      }
    }
  };
  const int64_t padded = in.q_row_stride;
  check("q", &Inputs::q, analytic.dq, [&](size_t n) -> int64_t {
    const int64_t row = static_cast<int64_t>(n) / padded, x = static_cast<int64_t>(n) % padded;
    return x < c.head_dim ? row * c.head_dim + x : -1;  // padding is not an element
  });
  check("k", &Inputs::k, analytic.dk, [](size_t n) { return static_cast<int64_t>(n); });
  check("v", &Inputs::v, analytic.dv, [](size_t n) { return static_cast<int64_t>(n); });
}

}  // namespace

int main() {
  const Case cases[] = {
      // name, batch, heads, kv_heads, Lq, Lk, d, causal, route fraction, per-head route, key share
      {"causal gqa partial route", 2, 4, 2, 37, 37, 24, true, 0.6, true, 0.0},
      {"non-causal key_mask", 2, 2, 1, 29, 29, 16, false, 0.7, false, 0.8},
      {"causal key_mask row without keys", 2, 3, 3, 40, 40, 8, true, 1.0, true, 0.8},
      {"causal Lq < Lk", 1, 2, 1, 20, 45, 12, true, 0.8, false, 0.0},
      {"causal Lq > Lk", 1, 2, 2, 50, 13, 20, true, 0.5, true, 0.0},
      {"non-causal Lq != Lk gqa", 2, 4, 1, 33, 70, 7, false, 0.9, true, 0.0},
      {"multi-block d64 all routed", 1, 2, 1, 150, 150, 64, true, 1.0, false, 0.0},
      {"sparse route int64_t", 1, 2, 2, 300, 300, 40, true, 0.05, true, 0.8},
      {"causal sparse key_mask, kept keys over two blocks", 2, 4, 2, 500, 500, 16, true, 0.3, true, 0.2},
      {"non-causal sparse key_mask Lq != Lk", 1, 2, 1, 90, 300, 8, false, 0.5, false, 0.25},
      {"nothing routed", 1, 2, 1, 17, 17, 8, true, 0.0, false, 0.0},
      {"odd head_dim 1", 1, 1, 1, 21, 21, 1, true, 1.0, false, 0.0},
      {"head_dim 256", 1, 1, 1, 19, 19, 256, false, 0.7, false, 0.0},
  };
  unsigned seed = 1234;
  for (const Case& c : cases) {
    check_against_reference<double>(c, seed, 1e-10);
    check_against_reference<float>(c, seed, 2e-4);
    ++seed;
  }
  check_finite_differences({"fd causal gqa key_mask", 1, 4, 2, 11, 11, 5, true, 0.7, true, 0.8}, 99);
  check_finite_differences({"fd non-causal Lq != Lk", 2, 2, 1, 6, 9, 3, false, 0.8, false, 0.0}, 100);
  check_finite_differences({"fd causal sparse key_mask", 1, 2, 1, 24, 24, 4, true, 0.7, false, 0.3}, 101);
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all routed attention CPU checks passed\n");
  return 0;
}
