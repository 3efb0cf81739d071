// The streaming CPU kernels, in double: selective_state_update step by step against the scan
// kernel, the scan from an initial state (chunked) against the whole scan, and the key/value
// cache attention against a plain softmax over the visible slots.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "routed_attention/routed_attention.h"
#include "selective_scan/selective_scan.h"
#include "test_util.h"

using namespace cram;

struct Scan {
  int batch, dim, L, N, groups;
  std::vector<double> u, delta, A, B, C, D, z, bias, dt;  // (batch, dim, L), B/C (batch, groups, N, L)
};

Scan make_scan(int batch, int dim, int L, int N, int groups, unsigned seed) {
  std::mt19937 rng(seed);
  Scan s{batch, dim, L, N, groups};
  const size_t seq = size_t(batch) * dim * L, bc = size_t(batch) * groups * N * L;
  s.u = cram_test::random_vector<double>(seq, rng);
  s.delta = cram_test::random_vector<double>(seq, rng, -1, 0.5);
  s.A = cram_test::random_vector<double>(size_t(dim) * N, rng, -1.5, -0.1);
  s.B = cram_test::random_vector<double>(bc, rng);
  s.C = cram_test::random_vector<double>(bc, rng);
  s.D = cram_test::random_vector<double>(dim, rng);
  s.z = cram_test::random_vector<double>(seq, rng);
  s.bias = cram_test::random_vector<double>(dim, rng, -0.3, 0.3);
  s.dt = cram_test::random_vector<double>(size_t(batch) * L, rng, 0.2, 2.0);
  return s;
}

// Steps [t0, t0 + len) of the scan from `initial` (null: 0): out (batch, dim, len), and the
// final state (batch, dim, N).
void scan_range(const Scan& s, int t0, int len, const double* initial, std::vector<double>& out,
                std::vector<double>& last) {
  SelectiveScanParams p{};
  p.input_type = DType::kFloat64;
  p.batch = s.batch; p.dim = s.dim; p.seqlen = len; p.dstate = s.N; p.n_groups = s.groups;
  p.n_chunks = int(scan_checkpoint_count(len));
  p.delta_softplus = true;
  p.u_batch_stride = p.delta_batch_stride = p.z_batch_stride = int64_t(s.dim) * s.L;
  p.u_d_stride = p.delta_d_stride = p.z_d_stride = s.L;
  p.out_batch_stride = int64_t(s.dim) * len;
  p.out_d_stride = len;
  p.B_batch_stride = p.C_batch_stride = int64_t(s.groups) * s.N * s.L;
  p.B_group_stride = p.C_group_stride = int64_t(s.N) * s.L;
  p.B_dstate_stride = p.C_dstate_stride = s.L;
  std::vector<double> dt(size_t(s.batch) * len);
  for (int b = 0; b < s.batch; ++b)
    for (int t = 0; t < len; ++t) dt[size_t(b) * len + t] = s.dt[size_t(b) * s.L + t0 + t];
  p.u = s.u.data() + t0; p.delta = s.delta.data() + t0; p.z = s.z.data() + t0;
  p.B = s.B.data() + t0; p.C = s.C.data() + t0;
  p.A = s.A.data(); p.D = s.D.data(); p.delta_bias = s.bias.data(); p.dt_scale = dt.data();
  p.initial_state = initial;
  out.assign(size_t(s.batch) * s.dim * len, 0.0);
  std::vector<double> states(size_t(s.batch) * s.dim * p.n_chunks * s.N);
  p.out = out.data();
  p.chunk_states = states.data();
  selective_scan_fwd_cpu(p);
  last.resize(size_t(s.batch) * s.dim * s.N);
  for (size_t row = 0; row < size_t(s.batch) * s.dim; ++row)
    for (int n = 0; n < s.N; ++n) last[row * s.N + n] = states[(row * p.n_chunks + p.n_chunks - 1) * s.N + n];
}

void test_steps_and_chunks(const Scan& s, int split) {
  std::vector<double> whole, whole_last, head, head_last, tail, tail_last;
  scan_range(s, 0, s.L, nullptr, whole, whole_last);
  scan_range(s, 0, split, nullptr, head, head_last);
  scan_range(s, split, s.L - split, head_last.data(), tail, tail_last);
  std::vector<double> chunked(whole.size());
  for (size_t row = 0; row < size_t(s.batch) * s.dim; ++row)
    for (int t = 0; t < s.L; ++t)
      chunked[row * s.L + t] = t < split ? head[row * split + t] : tail[row * (s.L - split) + t - split];
  CRAM_EXPECT(cram_test::close_ratio(chunked, whole, 1e-13, 1e-12) <= 1, "chunked scan, split %d", split);
  CRAM_EXPECT(cram_test::close_ratio(tail_last, whole_last, 1e-13, 1e-12) <= 1, "chunked last state");

  // selective_state_update, one position at a time from the zero state.
  std::vector<double> state(size_t(s.batch) * s.dim * s.N, 0.0), stepped(whole.size());
  std::vector<double> x(size_t(s.batch) * s.dim), delta(x.size()), z(x.size()), y(x.size());
  std::vector<double> B(size_t(s.batch) * s.groups * s.N), C(B.size()), dt(s.batch);
  for (int t = 0; t < s.L; ++t) {
    for (size_t row = 0; row < x.size(); ++row) {
      x[row] = s.u[row * s.L + t];
      delta[row] = s.delta[row * s.L + t];
      z[row] = s.z[row * s.L + t];
    }
    for (size_t i = 0; i < B.size(); ++i) {
      B[i] = s.B[i * s.L + t];
      C[i] = s.C[i * s.L + t];
    }
    for (int b = 0; b < s.batch; ++b) dt[b] = s.dt[size_t(b) * s.L + t];
    SelectiveStateUpdateParams p{};
    p.input_type = DType::kFloat64;
    p.batch = s.batch; p.dim = s.dim; p.dstate = s.N; p.n_groups = s.groups;
    p.dt_softplus = true;
    p.state_batch_stride = int64_t(s.dim) * s.N;
    p.state_d_stride = s.N;
    p.x_batch_stride = p.dt_batch_stride = p.z_batch_stride = p.out_batch_stride = s.dim;
    p.B_batch_stride = p.C_batch_stride = int64_t(s.groups) * s.N;
    p.B_group_stride = p.C_group_stride = s.N;
    p.state = state.data(); p.x = x.data(); p.dt = delta.data(); p.A = s.A.data();
    p.B = B.data(); p.C = C.data(); p.D = s.D.data(); p.z = z.data(); p.dt_bias = s.bias.data();
    p.dt_scale = dt.data(); p.out = y.data();
    selective_state_update_cpu(p);
    for (size_t row = 0; row < y.size(); ++row) stepped[row * s.L + t] = y[row];
  }
  CRAM_EXPECT(cram_test::close_ratio(stepped, whole, 1e-13, 1e-12) <= 1, "steps (dim=%d L=%d)", s.dim, s.L);
  CRAM_EXPECT(cram_test::close_ratio(state, whole_last, 1e-13, 1e-12) <= 1, "state after the steps");
}

// Cache attention: batch b holds lengths[b] entries; n_new rows and entries are appended.
void test_kvcache(int batch, int heads, int kv_heads, int n_new, int capacity, int d, bool masked, unsigned seed) {
  std::mt19937 rng(seed);
  auto k_cache = cram_test::random_vector<double>(size_t(batch) * kv_heads * capacity * d, rng);
  auto v_cache = cram_test::random_vector<double>(k_cache.size(), rng);
  const auto q = cram_test::random_vector<double>(size_t(batch) * heads * n_new * d, rng);
  const auto k = cram_test::random_vector<double>(size_t(batch) * kv_heads * n_new * d, rng);
  const auto v = cram_test::random_vector<double>(k.size(), rng);
  std::vector<int32_t> lengths(batch);
  std::vector<uint8_t> route(size_t(batch) * n_new), key_mask(size_t(batch) * capacity);
  for (int b = 0; b < batch; ++b) lengths[b] = (b * 7) % (capacity - n_new + 1);
  for (auto& r : route) r = rng() % 3 != 0;
  for (auto& m : key_mask) m = !masked || rng() % 4 != 0;

  RoutedAttentionKVCacheParams p{};
  p.dtype = DType::kFloat64;
  p.batch = batch; p.heads = heads; p.kv_heads = kv_heads; p.seqlen_new = n_new;
  p.capacity = capacity; p.head_dim = d; p.scale = 0.3;
  p.q_batch_stride = int64_t(heads) * n_new * d; p.q_head_stride = int64_t(n_new) * d; p.q_row_stride = d;
  p.k_cache_batch_stride = p.v_cache_batch_stride = int64_t(kv_heads) * capacity * d;
  p.k_cache_head_stride = p.v_cache_head_stride = int64_t(capacity) * d;
  p.k_cache_row_stride = p.v_cache_row_stride = d;
  p.k_new_batch_stride = p.v_new_batch_stride = int64_t(kv_heads) * n_new * d;
  p.k_new_head_stride = p.v_new_head_stride = int64_t(n_new) * d;
  p.k_new_row_stride = p.v_new_row_stride = d;
  p.out_batch_stride = p.q_batch_stride; p.out_head_stride = p.q_head_stride; p.out_row_stride = d;
  p.route_batch_stride = n_new; p.route_head_stride = 0; p.route_row_stride = 1;
  p.key_mask_batch_stride = capacity;
  std::vector<double> out(q.size(), std::numeric_limits<double>::quiet_NaN());
  auto k_after = k_cache, v_after = v_cache;
  p.q = q.data(); p.k_cache = k_after.data(); p.v_cache = v_after.data(); p.k_new = k.data(); p.v_new = v.data();
  p.cache_seqlens = lengths.data(); p.route = route.data(); p.key_mask = key_mask.data(); p.out = out.data();
  routed_attention_kvcache_cpu(p);

  std::vector<double> expected(q.size(), 0.0);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < kv_heads; ++h)
      for (int i = 0; i < n_new; ++i)
        for (int c = 0; c < d; ++c) {
          const size_t dst = ((size_t(b) * kv_heads + h) * capacity + lengths[b] + i) * d + c;
          const size_t src = ((size_t(b) * kv_heads + h) * n_new + i) * d + c;
          k_cache[dst] = k[src];
          v_cache[dst] = v[src];
        }
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n_new; ++i) {
        if (!route[size_t(b) * n_new + i]) continue;
        const int kvh = h / (heads / kv_heads), end = lengths[b] + i + 1;
        const double* qi = &q[((size_t(b) * heads + h) * n_new + i) * d];
        std::vector<double> scores(end, -INFINITY);
        double top = -INFINITY;
        for (int j = 0; j < end; ++j) {
          if (!key_mask[size_t(b) * capacity + j]) continue;
          double sum = 0;
          for (int c = 0; c < d; ++c) sum += qi[c] * k_cache[((size_t(b) * kv_heads + kvh) * capacity + j) * d + c];
          scores[j] = 0.3 * sum;
          top = std::max(top, scores[j]);
        }
        double total = 0;
        for (int j = 0; j < end; ++j) total += scores[j] == -INFINITY ? 0.0 : std::exp(scores[j] - top);
        for (int j = 0; j < end; ++j) {
          if (scores[j] == -INFINITY) continue;
          const double w = std::exp(scores[j] - top) / total;
          for (int c = 0; c < d; ++c)
            expected[((size_t(b) * heads + h) * n_new + i) * d + c] += w * v_cache[((size_t(b) * kv_heads + kvh) * capacity + j) * d + c];
        }
      }
  CRAM_EXPECT(cram_test::close_ratio(out, expected, 1e-13, 1e-11) <= 1, "kvcache out (n_new=%d d=%d)", n_new, d);
  CRAM_EXPECT(k_after == k_cache && v_after == v_cache, "kvcache append (n_new=%d)", n_new);
}

int main() {
  // A partial channel block, groups, and a split on and off a checkpoint boundary.
  const Scan long_scan = make_scan(2, 20, 2 * kScanCheckpointChunk + 5, 4, 2, 1);
  for (int split : {1, kScanCheckpointChunk, kScanCheckpointChunk + 7}) test_steps_and_chunks(long_scan, split);
  test_steps_and_chunks(make_scan(1, 37, 9, 3, 1, 2), 4);
  for (bool masked : {false, true}) {
    test_kvcache(3, 4, 2, 1, 150, 16, masked, 3);   // GQA, several key blocks
    test_kvcache(2, 2, 2, 3, 40, 13, masked, 4);    // head dim that is not a vector multiple
    test_kvcache(2, 4, 1, 2, 70, 32, masked, 5);    // one key/value head
  }
  return cram_test::report("test_streaming_cpu");
}
