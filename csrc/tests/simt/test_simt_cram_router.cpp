// cram_router_cuda, run by the SIMT emulator, against cram_router_cpu: predicted and scores
// within a tolerance (float32/float64 directly; float16/bfloat16 against the CPU twin's float64
// run on the same rounded inputs, FlashAttention's rule), and the discrete outputs exactly: the
// path is the first minimum of the kernel's own stored scores (a NaN counting as the minimum)
// unless forced, the same as the CPU twin's wherever their scores agree bit for bit, route is
// path == episodic, and the row lists and counts are the compaction of those paths, ascending.
// Cases with exactly representable scores check the tie and NaN rules against known paths.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <tuple>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>  // the SIMT emulator's: its launch count

#include "../test_util.h"
#include "cram_forward/cram_forward.h"

using namespace cram;
using cram_test::dtype_of;
using cram_test::max_abs_error;
using cram_test::rounded_to;
using cram_test::widened;

namespace {

enum class Expect {
  kComputed,     // random weights: only the CPU twin knows the paths
  kExactScores,  // w_out = 0: scores = b_out + prices, exact in every dtype (ties by design)
  kOnePath,      // every token not forced takes `one_path`
};

struct RouterCase {
  const char* name;
  int64_t batch, L, d_model, hidden, paths;
  double episodic_price, semantic_reward;
  bool with_q_hat, with_forced;
  int64_t pad;  // elements after each row of hidden_x and working_out (free strides)
  Expect expect = Expect::kComputed;
  int64_t one_path = -1;
  std::vector<double> b_out = {};  // replaces the centring bias when given
  bool float32_only = false;       // the compaction is dtype-blind: a large case once suffices
};

struct RouterInputs {
  const RouterCase& c;
  int64_t n_tokens, hidden_x_row, hidden_x_batch, working_out_row, working_out_batch;
  std::vector<double> hidden_x, working_out, gap, q_hat, w_state, w_out, b_out;
  std::vector<int64_t> forced;

  RouterInputs(const RouterCase& c_, unsigned seed) : c(c_), n_tokens(c.batch * c.L) {
    std::mt19937 rng(seed);
    const double nan = std::nan("");
    // Batch strides past the rows' end, and NaN padding: a read outside a row shows in the results.
    hidden_x_row = c.hidden + c.pad;
    hidden_x_batch = c.L * hidden_x_row + 2;
    working_out_row = c.d_model + c.pad;
    working_out_batch = c.L * working_out_row + 3;
    hidden_x.assign(c.batch * hidden_x_batch, nan);
    working_out.assign(c.batch * working_out_batch, nan);
    std::uniform_real_distribution<double> unit(-1, 1);
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t t = 0; t < c.L; ++t) {
        for (int64_t j = 0; j < c.hidden; ++j) hidden_x[b * hidden_x_batch + t * hidden_x_row + j] = unit(rng);
        for (int64_t e = 0; e < c.d_model; ++e)
          working_out[b * working_out_batch + t * working_out_row + e] = 2 * unit(rng);
      }
    gap = cram_test::random_vector<double>(n_tokens, rng, 0, 3);
    q_hat = cram_test::random_vector<double>(n_tokens, rng, 0, 1);
    w_state = cram_test::random_vector<double>(3 * c.hidden, rng);
    w_out = cram_test::random_vector<double>(c.paths * c.hidden, rng, -2, 2);
    if (!c.b_out.empty()) b_out = c.b_out;
    else if (c.expect == Expect::kComputed) b_out = centring_bias();
    else b_out = cram_test::random_vector<double>(c.paths, rng, -0.1, 0.1);
    if (c.expect == Expect::kExactScores) {
      std::fill(w_out.begin(), w_out.end(), 0.0);
      const double levels[] = {0, 0.25, 0.5, 1};  // q̂ · semantic_reward exact, some giving ties
      for (int64_t t = 0; t < n_tokens; ++t) q_hat[t] = levels[t % 4];
    }
    // Forced codes: mostly none, every path, and codes out of range (ignored).
    const int64_t codes[] = {-1, -1, -1, -1, 0, 1, 2, 3, -4};
    forced.assign(n_tokens, -1);
    for (auto& f : forced) f = codes[rng() % 9];
  }

  // Minus the median over the tokens of each path's score without bias, so that random weights
  // send the tokens to every path rather than most to one.
  std::vector<double> centring_bias() const {
    std::vector<double> bias(c.paths);
    std::vector<double> score(n_tokens);
    for (int64_t p = 0; p < c.paths; ++p) {
      for (int64_t token = 0; token < n_tokens; ++token) {
        const int64_t b = token / c.L, t = token % c.L;
        double sum_sq = 0;
        const double* row = &working_out[b * working_out_batch + t * working_out_row];
        for (int64_t e = 0; e < c.d_model; ++e) sum_sq += row[e] * row[e];
        const double q = c.with_q_hat ? q_hat[token] : 0;
        const double features[3] = {std::log1p(gap[token]), std::sqrt(sum_sq / c.d_model), q};
        double s = p == kPathEpisodic ? c.episodic_price : p == kPathSemantic ? -c.semantic_reward * q : 0;
        for (int64_t j = 0; j < c.hidden; ++j) {
          double h = hidden_x[b * hidden_x_batch + t * hidden_x_row + j];
          for (int f = 0; f < 3; ++f) h += w_state[f * c.hidden + j] * features[f];
          s += w_out[p * c.hidden + j] * std::max(h, 0.0);
        }
        score[token] = s;
      }
      std::nth_element(score.begin(), score.begin() + n_tokens / 2, score.end());
      bias[p] = -score[n_tokens / 2];
    }
    return bias;
  }
};

struct RouterOutputs {
  std::vector<double> predicted, scores;
  std::vector<int64_t> path, episodic_rows, semantic_rows;
  std::vector<uint8_t> route;
  int64_t episodic_count = -1, semantic_count = -1;
};

constexpr int64_t kRowSentinel = -7;  // row-list entries past the count must stay untouched

template <typename T> RouterOutputs run(const RouterInputs& in, bool on_cuda) {
  using acc_t = typename AccType<T>::type;
  const RouterCase& c = in.c;
  const std::vector<acc_t> hidden_x = rounded_to<acc_t>(in.hidden_x);
  const std::vector<T> working_out = rounded_to<T>(in.working_out), gap = rounded_to<T>(in.gap),
                       q_hat = rounded_to<T>(in.q_hat), w_state = rounded_to<T>(in.w_state),
                       w_out = rounded_to<T>(in.w_out), b_out = rounded_to<T>(in.b_out);
  std::vector<T> predicted(in.n_tokens * c.paths), scores(in.n_tokens * c.paths);
  RouterOutputs r;
  r.path.assign(in.n_tokens, kRowSentinel);
  r.route.assign(in.n_tokens, 7);
  r.episodic_rows.assign(in.n_tokens, kRowSentinel);
  r.semantic_rows.assign(in.n_tokens, kRowSentinel);

  CramRouterParams p{};
  p.dtype = dtype_of<T>();
  p.batch = c.batch;
  p.seqlen = c.L;
  p.d_model = c.d_model;
  p.hidden = c.hidden;
  p.n_paths = c.paths;
  p.episodic_price = c.episodic_price;
  p.semantic_reward = c.semantic_reward;
  p.hidden_x_batch_stride = in.hidden_x_batch;
  p.hidden_x_row_stride = in.hidden_x_row;
  p.working_out_batch_stride = in.working_out_batch;
  p.working_out_row_stride = in.working_out_row;
  p.hidden_x = hidden_x.data();
  p.working_out = working_out.data();
  p.gap = gap.data();
  p.q_hat = c.with_q_hat ? q_hat.data() : nullptr;
  p.w_state = w_state.data();
  p.w_out = w_out.data();
  p.b_out = b_out.data();
  p.forced_path = c.with_forced ? in.forced.data() : nullptr;
  p.predicted = predicted.data();
  p.scores = scores.data();
  p.path = r.path.data();
  p.route = r.route.data();
  p.episodic_rows = r.episodic_rows.data();
  p.episodic_count = &r.episodic_count;
  p.semantic_rows = r.semantic_rows.data();
  p.semantic_count = &r.semantic_count;
  if (on_cuda) {
    // cram_forward.cu's count: routing, compaction.
    const uint64_t launches_before = simt::launch_count;
    cram_router_cuda(p, nullptr);
    CRAM_EXPECT(simt::launch_count - launches_before == 2, "cram_router_cuda made %llu launches, expected 2",
                static_cast<unsigned long long>(simt::launch_count - launches_before));
  } else {
    cram_router_cpu(p);
  }
  r.predicted = widened(predicted);
  r.scores = widened(scores);
  return r;
}

// argmin's convention (cram_forward.h): the first minimum, a NaN counting as the minimum.
int64_t first_argmin(const double* scores, int64_t paths) {
  int64_t best = 0;
  for (int64_t p = 1; p < paths; ++p)
    if (std::isnan(scores[p]) ? !std::isnan(scores[best]) : scores[p] < scores[best]) best = p;
  return best;
}

bool same_values(const double* a, const double* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) return false;
  return true;
}

template <typename T> void check_case(const RouterCase& c, unsigned seed) {
  const RouterInputs in(c, seed);
  const char* dtype = dtype_name(dtype_of<T>());
  const RouterOutputs cpu = run<T>(in, false), cuda = run<T>(in, true);
  const int64_t n = in.n_tokens, P = c.paths;

  // Predicted values and scores.
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    // Summation orders differ (lane-strided tree vs SIMD), and the state norm (sqrt(s) / sqrt(d)
    // vs sqrt(s) · (1 / sqrt(d))).
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    const double predicted_ratio = cram_test::close_ratio(cuda.predicted, cpu.predicted, tol, tol);
    const double scores_ratio = cram_test::close_ratio(cuda.scores, cpu.scores, tol, tol);
    CRAM_EXPECT(predicted_ratio <= 1, "%s %s: predicted differs from the CPU twin (ratio %g)", c.name, dtype,
                predicted_ratio);
    CRAM_EXPECT(scores_ratio <= 1, "%s %s: scores differ from the CPU twin (ratio %g)", c.name, dtype, scores_ratio);
  } else {
    const RouterOutputs reference = run<double>(in, false);
    // Both 16-bit runs round the same features, predictions and scores; k = 2 (FlashAttention's
    // factor) allows a rounding that the float32 difference puts on the other side of a tie,
    // which happens only where the CPU twin's own rounding error is near half an ulp.
    for (const auto& [ours, theirs, ref, what] :
         {std::tuple{&cuda.predicted, &cpu.predicted, &reference.predicted, "predicted"},
          std::tuple{&cuda.scores, &cpu.scores, &reference.scores, "scores"}}) {
      const double cuda_error = max_abs_error(*ours, *ref), cpu_error = max_abs_error(*theirs, *ref);
      CRAM_EXPECT(cuda_error <= 2 * cpu_error + 1e-5, "%s %s: %s: CUDA error %g vs CPU twin error %g (float64 "
                  "reference)", c.name, dtype, what, cuda_error, cpu_error);
      // The rounding points are the op's semantics (each feature, the price, the prediction and
      // the score rounded as the unfused router rounds them): rounding the same float32 values,
      // the two differ only where those straddle a rounding boundary, rarely. A missing or extra
      // rounding changes a large share of them while staying within the error bound above.
      int64_t differ = 0;
      for (size_t i = 0; i < ours->size(); ++i) differ += !same_values(&(*ours)[i], &(*theirs)[i], 1);
      CRAM_EXPECT(differ <= 1 + int64_t(ours->size()) / 50, "%s %s: %s: %lld of %zu differ from the CPU twin's", c.name,
                  dtype, what, (long long)differ, ours->size());
    }
  }

  // Paths: the kernel's own rule on its own scores, and the CPU twin's choice where the scores
  // agree (elsewhere a near-tie may fall either way; the scores' tolerance bounds that).
  int64_t rule_broken = 0, differs_on_same_scores = 0, flips = 0, route_wrong = 0, not_expected = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t forced = c.with_forced && in.forced[t] >= 0 && in.forced[t] < P ? in.forced[t] : -1;
    const int64_t own_choice = forced >= 0 ? forced : first_argmin(&cuda.scores[t * P], P);
    rule_broken += cuda.path[t] != own_choice;
    if (cuda.path[t] != cpu.path[t]) {
      if (same_values(&cuda.scores[t * P], &cpu.scores[t * P], P)) ++differs_on_same_scores;
      else ++flips;
    }
    route_wrong += cuda.route[t] != (cuda.path[t] == kPathEpisodic);
    int64_t expected = -1;
    if (c.expect == Expect::kOnePath) expected = forced >= 0 ? forced : c.one_path;
    if (c.expect == Expect::kExactScores) {
      const double q = c.with_q_hat ? in.q_hat[t] : 0;
      double exact[kRouterMaxPaths] = {in.b_out[0], in.b_out[1] + c.episodic_price,
                                       P > 2 ? in.b_out[2] - c.semantic_reward * q : 0};
      expected = forced >= 0 ? forced : first_argmin(exact, P);
    }
    not_expected += expected >= 0 && cuda.path[t] != expected;
  }
  CRAM_EXPECT(rule_broken == 0, "%s %s: %lld paths are not the first minimum of their scores (or the forced path)",
              c.name, dtype, (long long)rule_broken);
  CRAM_EXPECT(differs_on_same_scores == 0, "%s %s: %lld paths differ from the CPU twin's on equal scores", c.name,
              dtype, (long long)differs_on_same_scores);
  CRAM_EXPECT(route_wrong == 0, "%s %s: %lld route flags are not path == episodic", c.name, dtype,
              (long long)route_wrong);
  CRAM_EXPECT(not_expected == 0, "%s %s: %lld paths differ from the known ones", c.name, dtype,
              (long long)not_expected);
  if (c.expect != Expect::kComputed)
    CRAM_EXPECT(flips == 0, "%s %s: %lld paths differ from the CPU twin's on exact scores", c.name, dtype,
                (long long)flips);
  if (flips)
    std::printf("note: %s %s: %lld near-tie paths differ from the CPU twin's\n", c.name, dtype, (long long)flips);

  // Row lists: the CUDA paths compacted in order, entries past the counts untouched.
  std::vector<int64_t> episodic(n, kRowSentinel), semantic(n, kRowSentinel);
  int64_t n_episodic = 0, n_semantic = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (cuda.path[t] == kPathEpisodic) episodic[n_episodic++] = t;
    if (cuda.path[t] == kPathSemantic) semantic[n_semantic++] = t;
  }
  CRAM_EXPECT(cuda.episodic_count == n_episodic && cuda.episodic_rows == episodic,
              "%s %s: episodic rows (count %lld, expected %lld)", c.name, dtype, (long long)cuda.episodic_count,
              (long long)n_episodic);
  CRAM_EXPECT(cuda.semantic_count == n_semantic && cuda.semantic_rows == semantic,
              "%s %s: semantic rows (count %lld, expected %lld)", c.name, dtype, (long long)cuda.semantic_count,
              (long long)n_semantic);
  if (!flips)
    CRAM_EXPECT(cuda.episodic_count == cpu.episodic_count && cuda.semantic_count == cpu.semantic_count &&
                    cuda.episodic_rows == cpu.episodic_rows && cuda.semantic_rows == cpu.semantic_rows,
                "%s %s: row lists differ from the CPU twin's", c.name, dtype);
  if (c.expect == Expect::kComputed && n > 1)  // the random cases reach every path
    CRAM_EXPECT(cpu.episodic_count > 0 && cpu.episodic_count < n && (P == 2 || cpu.semantic_count > 0),
                "%s %s: a path no token takes (episodic %lld, semantic %lld of %lld)", c.name, dtype,
                (long long)cpu.episodic_count, (long long)cpu.semantic_count, (long long)n);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  const double nan = std::nan("");
  const std::vector<RouterCase> cases = {
      // 45 tokens: not a multiple of the 8 tokens of a block; forced codes in and out of range.
      {"3 paths, q_hat, forced", 3, 15, 8, 5, 3, 0.3, 0.7, true, true, 0},
      // d_model and hidden above a warp's 32 lanes and not multiples of it; padded strides.
      {"2 paths, no q_hat, forced, padded", 2, 13, 50, 45, 2, 0.2, 0.5, false, true, 3},
      {"3 paths, no q_hat", 1, 21, 32, 33, 3, 0.1, 0.7, false, false, 1},
      // 1034 tokens: two compaction tiles of 1024, the second partial.
      {"two compaction tiles", 2, 517, 6, 9, 3, 0.3, 0.3, true, false, 0, Expect::kComputed, -1, {}, true},
      {"one token", 1, 1, 3, 1, 3, 0.0, 0.5, true, false, 0},
      // Scores b_out + [0, 0.25, -0.5 q̂]: paths 0 and 1 tie (0 wins), a three-way tie at q̂ = 0.5.
      {"ties 0-1-2", 2, 11, 8, 5, 3, 0.25, 0.5, true, false, 0, Expect::kExactScores, -1, {0.5, 0.25, 0.75}},
      // Paths 1 and 2 tie at q̂ = 0.5 (1 wins); forced paths override ties.
      {"ties 1-2, forced", 2, 11, 8, 5, 3, 0.25, 0.5, true, true, 0, Expect::kExactScores, -1, {1.0, 0.25, 0.75}},
      // 2 paths, every score equal: path 0.
      {"2 paths, all tie", 1, 13, 8, 5, 2, 0.25, 0.5, false, false, 0, Expect::kExactScores, -1, {0.5, 0.25}},
      // Every token to attention, then none (and no semantic path).
      {"all episodic", 2, 9, 8, 5, 3, -50, 0.5, true, false, 0, Expect::kOnePath, kPathEpisodic},
      {"none episodic, 2 paths", 2, 9, 8, 5, 2, 50, 0.5, false, false, 0, Expect::kOnePath, kPathWorking},
      // A NaN score counts as the minimum: every token not forced takes the semantic path.
      {"NaN semantic score", 2, 11, 8, 5, 3, 0.3, 0.5, true, true, 0, Expect::kOnePath, kPathSemantic,
       {0.0, 0.0, nan}},
  };
  unsigned seed = 1;
  for (const RouterCase& c : cases) {
    check_case<float>(c, seed);
    if (!c.float32_only) {
      check_case<double>(c, seed);
      check_case<fp16_t>(c, seed);
      check_case<bf16_t>(c, seed);
    }
    ++seed;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("test_simt_cram_router: %zu cases in %.1f s\n", cases.size(), seconds);
  return cram_test::report("test_simt_cram_router");
}
