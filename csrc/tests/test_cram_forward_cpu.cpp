// The fused CRAM forward's routing stage on the CPU: the router's epilogue against a direct
// evaluation of its formula, forced paths, and the compacted row lists.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cram_forward/cram_forward.h"
#include "test_util.h"

using namespace cram;

struct RouterCase {
  int64_t batch = 3, L = 37, d = 8, hidden = 5, paths = 3;
  std::vector<float> hidden_x, working_out, gap, q_hat, w_state, w_out, b_out;
  std::vector<int64_t> forced;
  std::vector<float> predicted, scores;
  std::vector<int64_t> path, episodic_rows, semantic_rows;
  std::vector<uint8_t> route;
  int64_t episodic_count = -1, semantic_count = -1;

  explicit RouterCase(int seed) {
    std::mt19937 rng(seed);
    const int64_t n = batch * L;
    hidden_x = cram_test::random_vector<float>(n * hidden, rng);
    working_out = cram_test::random_vector<float>(n * d, rng);
    gap = cram_test::random_vector<float>(n, rng, 0, 3);
    q_hat = cram_test::random_vector<float>(n, rng, 0, 1);
    w_state = cram_test::random_vector<float>(hidden * 3, rng);
    w_out = cram_test::random_vector<float>(paths * hidden, rng, -2, 2);
    b_out = cram_test::random_vector<float>(paths, rng, -0.1, 0.1);
    forced.assign(n, -1);
    predicted.assign(n * paths, 0);
    scores.assign(n * paths, 0);
    path.assign(n, -7);
    route.assign(n, 7);
    episodic_rows.assign(n, -7);
    semantic_rows.assign(n, -7);
  }

  void run(double episodic_price, double semantic_reward, bool with_forced) {
    CramRouterParams p;
    p.dtype = DType::kFloat32;
    p.batch = batch;
    p.seqlen = L;
    p.d_model = d;
    p.hidden = hidden;
    p.n_paths = paths;
    p.episodic_price = episodic_price;
    p.semantic_reward = semantic_reward;
    p.hidden_x_batch_stride = L * hidden;
    p.hidden_x_row_stride = hidden;
    p.working_out_batch_stride = L * d;
    p.working_out_row_stride = d;
    p.hidden_x = hidden_x.data();
    p.working_out = working_out.data();
    p.gap = gap.data();
    p.q_hat = q_hat.data();
    p.w_state = w_state.data();
    p.w_out = w_out.data();
    p.b_out = b_out.data();
    p.forced_path = with_forced ? forced.data() : nullptr;
    p.predicted = predicted.data();
    p.scores = scores.data();
    p.path = path.data();
    p.route = route.data();
    p.episodic_rows = episodic_rows.data();
    p.episodic_count = &episodic_count;
    p.semantic_rows = semantic_rows.data();
    p.semantic_count = &semantic_count;
    cram_router_cpu(p);
  }
};

// predicted, scores and the argmin match the formula of cram_forward.h evaluated in double.
void test_router_formula() {
  RouterCase c(0);
  const double episodic_price = 0.3, semantic_reward = 0.5;
  c.run(episodic_price, semantic_reward, false);
  std::vector<double> predicted, scores;
  for (int64_t token = 0; token < c.batch * c.L; ++token) {
    double sum_sq = 0;
    for (int64_t k = 0; k < c.d; ++k) sum_sq += double(c.working_out[token * c.d + k]) * c.working_out[token * c.d + k];
    const double features[3] = {std::log1p(double(c.gap[token])), std::sqrt(sum_sq / c.d), c.q_hat[token]};
    std::vector<double> hidden(c.hidden);
    for (int64_t j = 0; j < c.hidden; ++j) {
      double h = c.hidden_x[token * c.hidden + j];
      for (int f = 0; f < 3; ++f) h += double(c.w_state[f * c.hidden + j]) * features[f];
      hidden[j] = std::max(h, 0.0);
    }
    for (int64_t path = 0; path < c.paths; ++path) {
      double out = c.b_out[path];
      for (int64_t j = 0; j < c.hidden; ++j) out += double(c.w_out[path * c.hidden + j]) * hidden[j];
      predicted.push_back(out);
      scores.push_back(out + (path == kPathEpisodic ? episodic_price : 0) -
                       (path == kPathSemantic ? semantic_reward * c.q_hat[token] : 0));
    }
    const float* s = &c.scores[token * c.paths];
    const int64_t best = std::min_element(s, s + c.paths) - s;
    CRAM_EXPECT(c.path[token] == best, "token %ld: path %ld, argmin %ld", long(token), long(c.path[token]), long(best));
    CRAM_EXPECT(c.route[token] == (best == kPathEpisodic), "token %ld: route", long(token));
  }
  CRAM_EXPECT(cram_test::close_ratio(c.predicted, predicted, 1e-5, 1e-5) <= 1, "predicted");
  CRAM_EXPECT(cram_test::close_ratio(c.scores, scores, 1e-5, 1e-5) <= 1, "scores");
}

// Forced paths win; the row lists hold exactly each path's tokens, ascending, with their counts.
void test_forced_paths_and_compaction() {
  RouterCase c(1);
  for (int64_t token = 0; token < c.batch * c.L; ++token) c.forced[token] = token % 4 == 0 ? token % 3 : -1;
  c.run(0.1, 0.05, true);
  std::vector<int64_t> episodic, semantic;
  for (int64_t token = 0; token < c.batch * c.L; ++token) {
    if (c.forced[token] >= 0) CRAM_EXPECT(c.path[token] == c.forced[token], "token %ld not forced", long(token));
    if (c.path[token] == kPathEpisodic) episodic.push_back(token);
    if (c.path[token] == kPathSemantic) semantic.push_back(token);
  }
  CRAM_EXPECT(c.episodic_count == int64_t(episodic.size()), "episodic count %ld", long(c.episodic_count));
  CRAM_EXPECT(c.semantic_count == int64_t(semantic.size()), "semantic count %ld", long(c.semantic_count));
  CRAM_EXPECT(std::equal(episodic.begin(), episodic.end(), c.episodic_rows.begin()), "episodic rows");
  CRAM_EXPECT(std::equal(semantic.begin(), semantic.end(), c.semantic_rows.begin()), "semantic rows");
  CRAM_EXPECT(!episodic.empty() && !semantic.empty(), "a mix of paths");
}

int main() {
  test_router_formula();
  test_forced_paths_and_compaction();
  return cram_test::report("test_cram_forward_cpu");
}
