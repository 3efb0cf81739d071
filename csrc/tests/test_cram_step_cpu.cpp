// One CRAM decoding step on the CPU (cram_step_cpu), in double, against a direct evaluation of
// the formula of cram_forward.h for each stream: the outputs, the chosen paths, the advanced
// state and the caches with the new entries.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cram_forward/cram_forward.h"
#include "test_util.h"

using namespace cram;

using Vector = std::vector<double>;

// y = W x + bias for W (rows, cols) row-major with row stride `stride`.
Vector matvec(const double* W, int64_t rows, int64_t cols, int64_t stride, const double* x,
              const double* bias = nullptr) {
  Vector y(rows);
  for (int64_t i = 0; i < rows; ++i) {
    double sum = bias ? bias[i] : 0.0;
    for (int64_t j = 0; j < cols; ++j) sum += W[i * stride + j] * x[j];
    y[i] = sum;
  }
  return y;
}

struct StepCase {
  int64_t batch = 24, d = 8, d_inner = 16, R = 1, N = 4, H = 8, paths = 3, heads = 2, kv_heads = 1,
          head_dim = 4, capacity = 6, rank = 3;
  double episodic_price, semantic_reward;
  Vector x, gap, q_hat, state, k_cache, v_cache;
  Vector in_proj, x_proj, dt_proj, A, D, dt_bias, out_proj, w1, b1, w2, b2, qkv, attn_out, down, down_b, up, up_b;
  std::vector<int32_t> lengths;
  std::vector<uint8_t> key_mask;

  StepCase(unsigned seed, double episodic_price_, double semantic_reward_)
      : episodic_price(episodic_price_), semantic_reward(semantic_reward_) {
    std::mt19937 rng(seed);
    auto random = [&](int64_t n, double lo = -1, double hi = 1) { return cram_test::random_vector<double>(n, rng, lo, hi); };
    const int64_t kv_dim = kv_heads * head_dim;
    x = random(batch * d);
    gap = random(batch, 0, 3);
    q_hat = random(batch, 0, 1);
    state = random(batch * d_inner * N);
    k_cache = random(batch * kv_heads * capacity * head_dim);
    v_cache = random(k_cache.size());
    in_proj = random(2 * d_inner * d);
    x_proj = random((R + 2 * N) * d_inner, -0.5, 0.5);
    dt_proj = random(d_inner * R);
    A = random(d_inner * N, -1.5, -0.1);
    D = random(d_inner);
    dt_bias = random(d_inner, -0.3, 0.3);
    out_proj = random(d * d_inner, -0.5, 0.5);
    w1 = random(H * (d + 3));
    b1 = random(H, -0.1, 0.1);
    // Path q's prediction falls with the hidden units j = q (mod paths): which path is lowest
    // varies from stream to stream, so every path is taken.
    w2 = random(paths * H, -0.1, 0.1);
    for (int64_t q = 0; q < paths; ++q)
      for (int64_t j = q; j < H; j += paths) w2[q * H + j] -= 1.0;
    b2 = random(paths, -0.1, 0.1);
    qkv = random((d + 2 * kv_dim) * d);
    attn_out = random(d * d);
    down = random(rank * d);
    down_b = random(rank, -0.1, 0.1);
    up = random(d * rank);
    up_b = random(d, -0.1, 0.1);
    lengths.resize(batch);
    for (int64_t b = 0; b < batch; ++b) lengths[b] = int32_t(b % capacity);
    key_mask.resize(batch * capacity);
    for (int64_t i = 0; i < batch * capacity; ++i) key_mask[i] = rng() % 4 != 0;
    for (int64_t b = 0; b < batch; ++b) key_mask[b * capacity + lengths[b]] = 1;  // the new entry
  }
};

void test_step(unsigned seed, double episodic_price, double semantic_reward) {
  StepCase c(seed, episodic_price, semantic_reward);
  const int64_t batch = c.batch, d = c.d, di = c.d_inner, N = c.N, R = c.R, P = c.paths;
  const int64_t kv_dim = c.kv_heads * c.head_dim;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Vector state = c.state, k_cache = c.k_cache, v_cache = c.v_cache;
  Vector out(batch * d, nan), predicted(batch * P, nan), scores(batch * P, nan), attention(batch * d, nan);
  std::vector<int64_t> path(batch, -7);

  CramStepParams p{};
  p.dtype = DType::kFloat64;
  p.batch = batch; p.d_model = d; p.d_inner = di; p.dt_rank = R; p.dstate = N; p.hidden = c.H;
  p.n_paths = P; p.heads = c.heads; p.kv_heads = c.kv_heads; p.head_dim = c.head_dim;
  p.capacity = c.capacity; p.rank = c.rank;
  p.episodic_price = episodic_price; p.semantic_reward = semantic_reward;
  p.scale = 1.0 / std::sqrt(double(c.head_dim));
  p.state_batch_stride = di * N; p.state_d_stride = N;
  p.cache_batch_stride = c.kv_heads * c.capacity * c.head_dim;
  p.cache_head_stride = c.capacity * c.head_dim;
  p.cache_row_stride = c.head_dim;
  p.key_mask_batch_stride = c.capacity;
  p.x = c.x.data(); p.gap = c.gap.data(); p.q_hat = c.q_hat.data(); p.state = state.data();
  p.k_cache = k_cache.data(); p.v_cache = v_cache.data(); p.cache_seqlens = c.lengths.data();
  p.key_mask = c.key_mask.data();
  p.in_proj = c.in_proj.data(); p.x_proj = c.x_proj.data(); p.dt_proj = c.dt_proj.data();
  p.A = c.A.data(); p.D = c.D.data(); p.dt_bias = c.dt_bias.data(); p.out_proj = c.out_proj.data();
  p.router_w1 = c.w1.data(); p.router_b1 = c.b1.data(); p.router_w2 = c.w2.data(); p.router_b2 = c.b2.data();
  p.qkv = c.qkv.data(); p.attn_out = c.attn_out.data();
  p.semantic_down = c.down.data(); p.semantic_down_bias = c.down_b.data();
  p.semantic_up = c.up.data(); p.semantic_up_bias = c.up_b.data();
  p.out = out.data(); p.path = path.data(); p.predicted = predicted.data(); p.scores = scores.data();
  p.attention_out = attention.data();
  cram_step_cpu(p);

  Vector expected_state = c.state, expected_k = c.k_cache, expected_v = c.v_cache;
  Vector expected_out, expected_predicted, expected_scores, expected_attention;
  int taken[3] = {0, 0, 0};
  for (int64_t b = 0; b < batch; ++b) {
    const double* x = &c.x[b * d];
    // Working memory: one scan step.
    const Vector xz = matvec(c.in_proj.data(), 2 * di, d, d, x);
    const Vector x_dbl = matvec(c.x_proj.data(), R + 2 * N, di, di, xz.data());
    const Vector delta = matvec(c.dt_proj.data(), di, R, R, x_dbl.data());
    Vector y(di);
    for (int64_t k = 0; k < di; ++k) {
      const double step = std::log1p(std::exp(delta[k] + c.dt_bias[k])) * std::log1p(c.gap[b]);
      double* h = &expected_state[(b * di + k) * N];
      double sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        h[n] = std::exp(step * c.A[k * N + n]) * h[n] + step * xz[k] * x_dbl[R + n];
        sum += h[n] * x_dbl[R + N + n];
      }
      const double z = xz[di + k];
      y[k] = (sum + c.D[k] * xz[k]) * z / (1 + std::exp(-z));
    }
    Vector o = matvec(c.out_proj.data(), d, di, di, y.data());
    // The router.
    double norm = 0;
    for (double v : o) norm += v * v;
    const double features[3] = {std::log1p(c.gap[b]), std::sqrt(norm / d), c.q_hat[b]};
    Vector hidden = matvec(c.w1.data(), c.H, d, d + 3, x, c.b1.data());
    for (int64_t j = 0; j < c.H; ++j) {
      for (int f = 0; f < 3; ++f) hidden[j] += c.w1[j * (d + 3) + d + f] * features[f];
      hidden[j] = std::max(hidden[j], 0.0);
    }
    const Vector pred = matvec(c.w2.data(), P, c.H, c.H, hidden.data(), c.b2.data());
    const double prices[3] = {0, episodic_price, -semantic_reward * c.q_hat[b]};
    int64_t best = 0;
    for (int64_t q = 0; q < P; ++q) {
      expected_predicted.push_back(pred[q]);
      expected_scores.push_back(pred[q] + prices[q]);
      if (pred[q] + prices[q] < pred[best] + prices[best]) best = q;
    }
    CRAM_EXPECT(path[b] == best, "stream %ld: path %ld, expected %ld", long(b), long(path[b]), long(best));
    ++taken[best];
    // Episodic memory: append, then attend if routed.
    const Vector kv = matvec(c.qkv.data() + d * d, 2 * kv_dim, d, d, x);
    for (int64_t h = 0; h < c.kv_heads; ++h)
      for (int64_t e = 0; e < c.head_dim; ++e) {
        const int64_t slot = ((b * c.kv_heads + h) * c.capacity + c.lengths[b]) * c.head_dim + e;
        expected_k[slot] = kv[h * c.head_dim + e];
        expected_v[slot] = kv[kv_dim + h * c.head_dim + e];
      }
    Vector att(d, 0.0);
    if (best == kPathEpisodic) {
      const Vector q = matvec(c.qkv.data(), d, d, d, x);
      for (int64_t h = 0; h < c.heads; ++h) {
        const int64_t kvh = h / (c.heads / c.kv_heads);
        Vector weights(c.lengths[b] + 1, 0.0);
        double top = -INFINITY, total = 0;
        for (int64_t j = 0; j <= c.lengths[b]; ++j) {
          if (!c.key_mask[b * c.capacity + j]) continue;
          double s = 0;
          for (int64_t e = 0; e < c.head_dim; ++e)
            s += q[h * c.head_dim + e] * expected_k[((b * c.kv_heads + kvh) * c.capacity + j) * c.head_dim + e];
          weights[j] = s * p.scale;
          top = std::max(top, weights[j]);
        }
        for (int64_t j = 0; j <= c.lengths[b]; ++j)
          total += weights[j] = c.key_mask[b * c.capacity + j] ? std::exp(weights[j] - top) : 0.0;
        for (int64_t j = 0; j <= c.lengths[b]; ++j)
          for (int64_t e = 0; e < c.head_dim; ++e)
            att[h * c.head_dim + e] += weights[j] / total *
                                       expected_v[((b * c.kv_heads + kvh) * c.capacity + j) * c.head_dim + e];
      }
      const Vector projected = matvec(c.attn_out.data(), d, d, d, att.data());
      for (int64_t k = 0; k < d; ++k) o[k] += projected[k];
    }
    // Semantic memory.
    if (best == kPathSemantic) {
      Vector h = matvec(c.down.data(), c.rank, d, d, x, c.down_b.data());
      for (double& v : h) v = std::max(v, 0.0);
      const Vector recalled = matvec(c.up.data(), d, c.rank, c.rank, h.data(), c.up_b.data());
      for (int64_t k = 0; k < d; ++k) o[k] += recalled[k];
    }
    expected_out.insert(expected_out.end(), o.begin(), o.end());
    expected_attention.insert(expected_attention.end(), att.begin(), att.end());
  }
  CRAM_EXPECT(taken[0] > 0 && taken[1] > 0 && taken[2] > 0, "every path taken (%d / %d / %d)", taken[0], taken[1], taken[2]);
  CRAM_EXPECT(cram_test::close_ratio(out, expected_out, 1e-12, 1e-10) <= 1, "out (seed %u)", seed);
  CRAM_EXPECT(cram_test::close_ratio(attention, expected_attention, 1e-12, 1e-10) <= 1, "attention_out");
  CRAM_EXPECT(cram_test::close_ratio(predicted, expected_predicted, 1e-12, 1e-10) <= 1, "predicted");
  CRAM_EXPECT(cram_test::close_ratio(scores, expected_scores, 1e-12, 1e-10) <= 1, "scores");
  CRAM_EXPECT(cram_test::close_ratio(state, expected_state, 1e-12, 1e-10) <= 1, "state");
  CRAM_EXPECT(cram_test::close_ratio(k_cache, expected_k, 1e-12, 1e-10) <= 1 &&
                  cram_test::close_ratio(v_cache, expected_v, 1e-12, 1e-10) <= 1,
              "caches with the new entries");
}

int main() {
  for (unsigned seed : {0u, 1u, 2u}) test_step(seed, 0.1, 0.2);
  return cram_test::report("test_cram_step_cpu");
}
