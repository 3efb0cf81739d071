// The fused CRAM forward's routing stage on the CPU (see cram_forward.h for the math).
//
// One pass over the tokens, in parallel blocks: each token's working-memory norm, the router's
// hidden layer and its `paths` outputs are computed in a small per-thread buffer (SIMD loops
// over the hidden units: w_state is stored feature-major for that) and only the results are
// stored. The compaction then runs once over the (batch, L) path codes, serially, so the row
// lists come out in ascending order (a few microseconds even at batch 8 x 8192).
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/parallel.h"
#include "cram_forward.h"

namespace cram {
namespace {

template <typename scalar_t>
void route_tokens(const CramRouterParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto* hidden_x = static_cast<const acc_t*>(p.hidden_x);
  const auto* working_out = static_cast<const scalar_t*>(p.working_out);
  const auto* gap = static_cast<const scalar_t*>(p.gap);
  const auto* q_hat = static_cast<const scalar_t*>(p.q_hat);
  const auto* w_state = static_cast<const scalar_t*>(p.w_state);
  const auto* w_out = static_cast<const scalar_t*>(p.w_out);
  const auto* b_out = static_cast<const scalar_t*>(p.b_out);
  auto* predicted = static_cast<scalar_t*>(p.predicted);
  auto* scores = static_cast<scalar_t*>(p.scores);
  const int64_t L = p.seqlen, H = p.hidden, P = p.n_paths;
  const acc_t inv_sqrt_d = acc_t(1) / std::sqrt(acc_t(p.d_model));
  // The prices as the unfused router forms them: the episodic price a Python float stored in a
  // tensor of the inputs' dtype, the semantic one -semantic_reward · q̂ computed in the
  // accumulation type and rounded once.
  const acc_t episodic_price = to_float(from_float<scalar_t>(p.episodic_price));
  const acc_t semantic_price = static_cast<acc_t>(-p.semantic_reward);

  parallel_for(p.batch * L, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hidden(H);
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / L, t = token % L;
      const scalar_t* wo = working_out + b * p.working_out_batch_stride + t * p.working_out_row_stride;
      acc_t sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t c = 0; c < p.d_model; ++c) {
        const acc_t v = to_float(wo[c]);
        sum_sq += v * v;
      }
      // Each feature rounded to the tensors' dtype, as the unfused router concatenates them.
      const acc_t q = q_hat ? to_float(q_hat[token]) : acc_t(0);
      const acc_t features[3] = {
          to_float(from_float<scalar_t>(std::log1p(to_float(gap[token])))),
          to_float(from_float<scalar_t>(std::sqrt(sum_sq) * inv_sqrt_d)), q};
      const acc_t* hx = hidden_x + b * p.hidden_x_batch_stride + t * p.hidden_x_row_stride;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const acc_t h = hx[j] + to_float(w_state[j]) * features[0] +
                        to_float(w_state[H + j]) * features[1] + to_float(w_state[2 * H + j]) * features[2];
        hidden[j] = h < acc_t(0) ? acc_t(0) : h;  // NaN passes, as in F.relu
      }
      int64_t best = 0;
      acc_t best_score = 0;
      for (int64_t path = 0; path < P; ++path) {
        acc_t out = to_float(b_out[path]);
        const scalar_t* w = w_out + path * H;
#pragma omp simd reduction(+ : out)
        for (int64_t j = 0; j < H; ++j) out += to_float(w[j]) * hidden[j];
        const scalar_t stored = from_float<scalar_t>(out);
        acc_t price = 0;
        if (path == kPathEpisodic) price = episodic_price;
        if (path == kPathSemantic) price = to_float(from_float<scalar_t>(semantic_price * q));
        const acc_t score = to_float(from_float<scalar_t>(to_float(stored) + price));
        predicted[token * P + path] = stored;
        scores[token * P + path] = from_float<scalar_t>(score);
        // argmin's convention: the first minimum, a NaN counting as the minimum.
        if (path == 0 || (std::isnan(score) ? !std::isnan(best_score) : score < best_score)) {
          best = path;
          best_score = score;
        }
      }
      const int64_t forced = p.forced_path ? p.forced_path[token] : -1;
      const int64_t chosen = forced >= 0 && forced < P ? forced : best;
      p.path[token] = chosen;
      p.route[token] = chosen == kPathEpisodic;
    }
  });

  int64_t n_episodic = 0, n_semantic = 0;
  for (int64_t token = 0; token < p.batch * L; ++token) {
    if (p.path[token] == kPathEpisodic) p.episodic_rows[n_episodic++] = token;
    if (p.path[token] == kPathSemantic) p.semantic_rows[n_semantic++] = token;
  }
  *p.episodic_count = n_episodic;
  *p.semantic_count = n_semantic;
}

}  // namespace

void cram_router_cpu(const CramRouterParams& params) {
  CRAM_DTYPE_SWITCH(params.dtype, "cram_router_cpu", [&] { route_tokens<scalar_t>(params); });
}

}  // namespace cram
