// One decoding step of a CRAM layer on the CPU (cram_forward.h, CramStepParams).
//
// The projections are matrix-vector products for a few streams: each weight row is read once
// and applied to every stream while it sits in L1 (parallel over output features once there is
// enough work to share). The scan step, the router and the cached attention are the kernels of
// the separate ops, run on this step's buffers, so each piece of math has one implementation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/parallel.h"
#include "../routed_attention/routed_attention.h"
#include "../selective_scan/selective_scan.h"
#include "cram_forward.h"

namespace cram {
namespace {

// Multiply-adds below which a product runs on the calling thread: a decoding step's products are
// a few thousand, and waking a thread costs more than that.
constexpr int64_t kMinParallelMacs = 1 << 15;

// y_r = W·x_r + bias (bias nullable) for the streams r in rows[0, n_rows), W (n_out, n_in) with
// row stride w_stride. The product is rounded to out_t (scalar_t, as a GEMM's output is); with
// `accumulate` it is then added to y_r (and rounded again), as an in-place add would.
template <typename scalar_t, typename out_t = scalar_t>
void linear(const scalar_t* W, int64_t w_stride, const scalar_t* bias, int64_t n_out, int64_t n_in,
            const scalar_t* x, int64_t x_stride, out_t* y, int64_t y_stride, const int64_t* rows,
            int64_t n_rows, bool accumulate) {
  using acc_t = typename AccType<scalar_t>::type;
  if (n_rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, kMinParallelMacs / std::max<int64_t>(1, n_in * n_rows));
  parallel_for(n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* w = W + i * w_stride;
      const acc_t b = bias ? acc_t(to_float(bias[i])) : acc_t(0);
      for (int64_t k = 0; k < n_rows; ++k) {
        const int64_t r = rows[k];
        const out_t product = from_float<out_t>(dot<acc_t>(w, x + r * x_stride, n_in) + b);
        out_t& out = y[r * y_stride + i];
        out = accumulate ? from_float<out_t>(acc_t(to_float(out)) + acc_t(to_float(product))) : product;
      }
    }
  });
}

template <typename scalar_t>
void step(const CramStepParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t batch = p.batch, d = p.d_model, d_inner = p.d_inner, R = p.dt_rank, N = p.dstate;
  const int64_t H = p.hidden, n_dbl = R + 2 * N, kv_dim = p.kv_heads * p.head_dim;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* gap = static_cast<const scalar_t*>(p.gap);
  auto* out = static_cast<scalar_t*>(p.out);
  auto weight = [](const void* w) { return static_cast<const scalar_t*>(w); };
  const scalar_t* const no_bias = nullptr;
  std::vector<int64_t> every_stream(batch);
  for (int64_t b = 0; b < batch; ++b) every_stream[b] = b;
  const int64_t* all = every_stream.data();

  // Working memory: the projections, then the scan step on their outputs.
  std::vector<scalar_t> xz(batch * 2 * d_inner), x_dbl(batch * n_dbl), delta(batch * d_inner),
      y(batch * d_inner);
  std::vector<acc_t> dt_scale(batch);
  linear(weight(p.in_proj), d, no_bias, 2 * d_inner, d, x, d, xz.data(), 2 * d_inner, all, batch,
         false);
  linear(weight(p.x_proj), d_inner, no_bias, n_dbl, d_inner, xz.data(), 2 * d_inner, x_dbl.data(),
         n_dbl, all, batch, false);
  linear(weight(p.dt_proj), R, no_bias, d_inner, R, x_dbl.data(), n_dbl, delta.data(), d_inner, all,
         batch, false);
  for (int64_t b = 0; b < batch; ++b)  // log1p in the element type, as the composed op takes it
    dt_scale[b] = to_float(from_float<scalar_t>(std::log1p(acc_t(to_float(gap[b])))));
  SelectiveStateUpdateParams scan{};
  scan.input_type = p.dtype;
  scan.batch = batch;
  scan.dim = d_inner;
  scan.dstate = N;
  scan.n_groups = 1;
  scan.dt_softplus = true;
  scan.state_batch_stride = p.state_batch_stride;
  scan.state_d_stride = p.state_d_stride;
  scan.x_batch_stride = scan.z_batch_stride = 2 * d_inner;
  scan.dt_batch_stride = scan.out_batch_stride = d_inner;
  scan.B_batch_stride = scan.C_batch_stride = n_dbl;
  scan.state = p.state;
  scan.x = xz.data();
  scan.z = xz.data() + d_inner;
  scan.dt = delta.data();
  scan.B = x_dbl.data() + R;
  scan.C = x_dbl.data() + R + N;
  scan.A = p.A;
  scan.D = p.D;
  scan.dt_bias = p.dt_bias;
  scan.dt_scale = dt_scale.data();
  scan.out = y.data();
  selective_state_update_cpu(scan);
  linear(weight(p.out_proj), d_inner, no_bias, d, d_inner, y.data(), d_inner, out, d, all, batch,
         false);

  // The router's decision, from the x-part of its hidden layer and the scan output.
  std::vector<acc_t> hidden_x(batch * H);  // the accumulation type, as cram_forward.h says
  std::vector<scalar_t> w_state(3 * H);
  const scalar_t* w1 = weight(p.router_w1);
  linear(w1, d + 3, weight(p.router_b1), H, d, x, d, hidden_x.data(), H, all, batch, false);
  for (int64_t j = 0; j < H; ++j)
    for (int64_t f = 0; f < 3; ++f) w_state[f * H + j] = w1[j * (d + 3) + d + f];
  std::vector<uint8_t> route(batch);
  std::vector<int64_t> episodic_rows(batch), semantic_rows(batch);
  int64_t n_episodic = 0, n_semantic = 0;
  CramRouterParams router{};
  router.dtype = p.dtype;
  router.batch = batch;
  router.seqlen = 1;
  router.d_model = d;
  router.hidden = H;
  router.n_paths = p.n_paths;
  router.episodic_price = p.episodic_price;
  router.semantic_reward = p.semantic_reward;
  router.hidden_x_batch_stride = router.hidden_x_row_stride = H;
  router.working_out_batch_stride = router.working_out_row_stride = d;
  router.hidden_x = hidden_x.data();
  router.working_out = out;
  router.gap = gap;
  router.q_hat = p.q_hat;
  router.w_state = w_state.data();
  router.w_out = p.router_w2;
  router.b_out = p.router_b2;
  router.predicted = p.predicted;
  router.scores = p.scores;
  router.path = p.path;
  router.route = route.data();
  router.episodic_rows = episodic_rows.data();
  router.episodic_count = &n_episodic;
  router.semantic_rows = semantic_rows.data();
  router.semantic_count = &n_semantic;
  cram_router_cpu(router);

  // Episodic memory: every stream's key and value join the cache; the routed streams attend.
  const scalar_t* w_qkv = weight(p.qkv);
  std::vector<scalar_t> kv(batch * 2 * kv_dim), q(batch * d);
  linear(w_qkv + d * d, d, no_bias, 2 * kv_dim, d, x, d, kv.data(), 2 * kv_dim, all, batch, false);
  linear(w_qkv, d, no_bias, d, d, x, d, q.data(), d, episodic_rows.data(), n_episodic, false);
  RoutedAttentionKVCacheParams attention{};
  attention.dtype = p.dtype;
  attention.batch = batch;
  attention.heads = p.heads;
  attention.kv_heads = p.kv_heads;
  attention.seqlen_new = 1;
  attention.capacity = p.capacity;
  attention.head_dim = p.head_dim;
  attention.scale = p.scale;
  attention.q_batch_stride = attention.out_batch_stride = d;
  attention.q_head_stride = attention.out_head_stride = p.head_dim;
  attention.k_cache_batch_stride = attention.v_cache_batch_stride = p.cache_batch_stride;
  attention.k_cache_head_stride = attention.v_cache_head_stride = p.cache_head_stride;
  attention.k_cache_row_stride = attention.v_cache_row_stride = p.cache_row_stride;
  attention.k_new_batch_stride = attention.v_new_batch_stride = 2 * kv_dim;
  attention.k_new_head_stride = attention.v_new_head_stride = p.head_dim;
  attention.route_batch_stride = 1;
  attention.key_mask_batch_stride = p.key_mask_batch_stride;
  attention.q = q.data();
  attention.k_cache = p.k_cache;
  attention.v_cache = p.v_cache;
  attention.k_new = kv.data();
  attention.v_new = kv.data() + kv_dim;
  attention.cache_seqlens = p.cache_seqlens;
  attention.route = route.data();
  attention.key_mask = p.key_mask;
  attention.out = p.attention_out;
  routed_attention_kvcache_cpu(attention);
  linear(weight(p.attn_out), d, no_bias, d, d, static_cast<const scalar_t*>(p.attention_out), d,
         out, d, episodic_rows.data(), n_episodic, true);

  // Semantic memory on the streams routed to it.
  if (p.rank == 0 || n_semantic == 0) return;
  std::vector<scalar_t> h(batch * p.rank);
  linear(weight(p.semantic_down), d, weight(p.semantic_down_bias), p.rank, d, x, d, h.data(),
         p.rank, semantic_rows.data(), n_semantic, false);
  for (int64_t k = 0; k < n_semantic; ++k) {
    scalar_t* row = h.data() + semantic_rows[k] * p.rank;
    for (int64_t j = 0; j < p.rank; ++j)
      if (to_float(row[j]) < 0.0f) row[j] = from_float<scalar_t>(0.0f);  // ReLU; NaN stays
  }
  linear(weight(p.semantic_up), p.rank, weight(p.semantic_up_bias), d, p.rank, h.data(), p.rank,
         out, d, semantic_rows.data(), n_semantic, true);
}

}  // namespace

void cram_step_cpu(const CramStepParams& params) {
  CRAM_DTYPE_SWITCH(params.dtype, "cram_step_cpu", [&] { step<scalar_t>(params); });
}

}  // namespace cram
