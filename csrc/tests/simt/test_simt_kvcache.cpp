// routed_attention_kvcache_cuda, run by the SIMT emulator, against routed_attention_kvcache_cpu:
// each runs on its own copy of the caches; the caches must match bit for bit after the append,
// the outputs within a tolerance (float32/float64 directly; float16/bfloat16 against the CPU
// twin's float64 run on the same rounded inputs, FlashAttention's rule).
//
// Cache slots a correct kernel never reads (past the visible range, masked out) and the padding
// after each row hold NaN, so a read of one shows as a NaN output; the output padding holds a
// sentinel that must survive.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>  // the SIMT emulator's: its launch count

#include "../test_util.h"
#include "routed_attention/routed_attention.h"

using namespace cram;
using cram_test::dtype_of;
using cram_test::max_abs_error;
using cram_test::rounded_to;
using cram_test::widened;

namespace {

constexpr double kOutSentinel = 7.0;  // exact in every dtype; no attention output reaches it

struct KVCacheCase {
  const char* name;
  int64_t batch, heads, kv_heads, n_new, capacity, head_dim;
  bool append;           // k_new / v_new given
  bool with_key_mask;
  bool broadcast_route;  // route (batch, 1, n_new) with head stride 0
  int64_t pad;           // elements after each row of q, out, caches and new entries
  std::vector<int32_t> cache_seqlens;
  int64_t mask_all_batch = -1;  // a batch whose key_mask keeps no slot: its routed rows are 0
};

// Inputs in float64 before rounding to the dtype under test, and the layout of every buffer.
struct KVCacheInputs {
  const KVCacheCase& c;
  int64_t row, new_rows_per_head, route_head_stride, mask_stride;
  std::vector<double> q, k_cache, v_cache, k_new, v_new;
  std::vector<uint8_t> route, key_mask;

  KVCacheInputs(const KVCacheCase& c_, unsigned seed) : c(c_) {
    std::mt19937 rng(seed);
    row = c.head_dim + c.pad;
    mask_stride = c.capacity + 3;
    const double nan = std::nan("");
    q = cram_test::random_vector<double>(c.batch * c.heads * c.n_new * row, rng);
    k_cache = cram_test::random_vector<double>(c.batch * c.kv_heads * c.capacity * row, rng);
    v_cache = cram_test::random_vector<double>(k_cache.size(), rng);
    k_new = cram_test::random_vector<double>(c.batch * c.kv_heads * c.n_new * row, rng);
    v_new = cram_test::random_vector<double>(k_new.size(), rng);
    if (c.with_key_mask) {
      key_mask.assign(c.batch * mask_stride, 0);
      std::bernoulli_distribution keep(0.7);
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t j = 0; j < c.capacity; ++j) key_mask[b * mask_stride + j] = b != c.mask_all_batch && keep(rng);
    }
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t h = 0; h < c.kv_heads; ++h)
        for (int64_t j = 0; j < c.capacity; ++j) {
          const bool unwritten = j >= c.cache_seqlens[b];  // the append fills [L, L + n_new)
          const bool masked = c.with_key_mask && !key_mask[b * mask_stride + j];
          for (int64_t e = 0; e < row; ++e) {
            const int64_t at = ((b * c.kv_heads + h) * c.capacity + j) * row + e;
            if (unwritten || masked || e >= c.head_dim) k_cache[at] = v_cache[at] = nan;
          }
        }
    for (auto* rows : {&q, &k_new, &v_new})
      for (size_t at = c.head_dim; at < rows->size(); at += row)
        for (int64_t e = 0; e < c.pad; ++e) (*rows)[at + e] = nan;
    route_head_stride = c.broadcast_route ? 0 : c.n_new;
    const int64_t route_heads = c.broadcast_route ? 1 : c.heads;
    route.assign(c.batch * route_heads * c.n_new, 0);
    std::bernoulli_distribution routed(0.7);
    for (auto& r : route) r = routed(rng);
    route[0] = 0;                 // at least one row unrouted
    route[route.size() - 1] = 1;  // and one routed
  }

  template <typename T>
  RoutedAttentionKVCacheParams params(const std::vector<T>& q_t, std::vector<T>& k_cache_t, std::vector<T>& v_cache_t,
                                      const std::vector<T>& k_new_t, const std::vector<T>& v_new_t,
                                      std::vector<T>& out_t) const {
    RoutedAttentionKVCacheParams p{};
    p.dtype = dtype_of<T>();
    p.batch = c.batch;
    p.heads = c.heads;
    p.kv_heads = c.kv_heads;
    p.seqlen_new = c.n_new;
    p.capacity = c.capacity;
    p.head_dim = c.head_dim;
    p.scale = 1.5 / std::sqrt(double(c.head_dim));
    p.q_batch_stride = p.out_batch_stride = c.heads * c.n_new * row;
    p.q_head_stride = p.out_head_stride = c.n_new * row;
    p.q_row_stride = p.out_row_stride = row;
    p.k_cache_batch_stride = p.v_cache_batch_stride = c.kv_heads * c.capacity * row;
    p.k_cache_head_stride = p.v_cache_head_stride = c.capacity * row;
    p.k_cache_row_stride = p.v_cache_row_stride = row;
    p.k_new_batch_stride = p.v_new_batch_stride = c.kv_heads * c.n_new * row;
    p.k_new_head_stride = p.v_new_head_stride = c.n_new * row;
    p.k_new_row_stride = p.v_new_row_stride = row;
    p.route_batch_stride = (c.broadcast_route ? 1 : c.heads) * c.n_new;
    p.route_head_stride = route_head_stride;
    p.route_row_stride = 1;
    p.key_mask_batch_stride = c.with_key_mask ? mask_stride : 0;
    p.q = q_t.data();
    p.k_cache = k_cache_t.data();
    p.v_cache = v_cache_t.data();
    p.k_new = c.append ? k_new_t.data() : nullptr;
    p.v_new = c.append ? v_new_t.data() : nullptr;
    p.cache_seqlens = c.cache_seqlens.data();
    p.route = route.data();
    p.key_mask = c.with_key_mask ? key_mask.data() : nullptr;
    p.out = out_t.data();
    return p;
  }
};

struct Outputs {
  std::vector<double> out, k_cache, v_cache;
};

template <typename T> Outputs run(const KVCacheInputs& in, bool on_cuda) {
  const std::vector<T> q = rounded_to<T>(in.q), k_new = rounded_to<T>(in.k_new), v_new = rounded_to<T>(in.v_new);
  std::vector<T> k_cache = rounded_to<T>(in.k_cache), v_cache = rounded_to<T>(in.v_cache);
  std::vector<T> out(in.q.size(), from_float<T>(kOutSentinel));
  const RoutedAttentionKVCacheParams p = in.params(q, k_cache, v_cache, k_new, v_new, out);
  if (on_cuda) {
    // routed_attention_kvcache.cu's count: the append (when there are new entries), the attention.
    const uint64_t launches_before = simt::launch_count, expected = p.k_new ? 2 : 1;
    routed_attention_kvcache_cuda(p, nullptr);
    CRAM_EXPECT(simt::launch_count - launches_before == expected, "routed_attention_kvcache_cuda made %llu launches, "
                "expected %llu", static_cast<unsigned long long>(simt::launch_count - launches_before),
                static_cast<unsigned long long>(expected));
  } else {
    routed_attention_kvcache_cpu(p);
  }
  return {widened(out), widened(k_cache), widened(v_cache)};
}

// Bit-for-bit equality of two widened buffers (NaN equals NaN: the unwritten slots).
bool same_bits(const std::vector<double>& a, const std::vector<double>& b, int64_t& first_difference) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) {
      first_difference = int64_t(i);
      return false;
    }
  return a.size() == b.size();
}

template <typename T> void check_case(const KVCacheCase& c, unsigned seed) {
  const KVCacheInputs in(c, seed);
  const char* dtype = dtype_name(dtype_of<T>());
  const Outputs cpu = run<T>(in, false), cuda = run<T>(in, true);

  int64_t at = -1;
  CRAM_EXPECT(same_bits(cuda.k_cache, cpu.k_cache, at), "%s %s: k_cache differs at %lld", c.name, dtype, (long long)at);
  CRAM_EXPECT(same_bits(cuda.v_cache, cpu.v_cache, at), "%s %s: v_cache differs at %lld", c.name, dtype, (long long)at);
  if (c.append) {  // the new entries landed at [L, L + n_new) (both kernels could agree on a wrong slot)
    const std::vector<double> k_new = widened(rounded_to<T>(in.k_new));
    int64_t wrong = 0;
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t h = 0; h < c.kv_heads; ++h)
        for (int64_t i = 0; i < c.n_new; ++i)
          for (int64_t e = 0; e < c.head_dim; ++e)
            wrong += cuda.k_cache[((b * c.kv_heads + h) * c.capacity + c.cache_seqlens[b] + i) * in.row + e] !=
                     k_new[((b * c.kv_heads + h) * c.n_new + i) * in.row + e];
    CRAM_EXPECT(wrong == 0, "%s %s: %lld appended key elements are not the new keys", c.name, dtype, (long long)wrong);
  }

  int64_t nonzero = 0;
  for (double x : cpu.out) nonzero += x != 0 && x != kOutSentinel;
  CRAM_EXPECT(nonzero > 0, "%s %s: every output is 0, the case tests nothing", c.name, dtype);

  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    // Summation order (8 warps round-robin vs one stream) and exp (__expf vs exp_approx) differ.
    const double tol = std::is_same_v<T, float> ? 2e-6 : 1e-13;
    const double ratio = cram_test::close_ratio(cuda.out, cpu.out, tol, tol);
    CRAM_EXPECT(ratio <= 1, "%s %s: out differs from the CPU twin (ratio %g)", c.name, dtype, ratio);
  } else {
    const Outputs reference = run<double>(in, false);
    // Rounded inputs are the same for all three runs, so the 16-bit runs differ from the float64
    // one by their float32 accumulation and the final rounding, which the two kernels share:
    // k = 2 (FlashAttention's factor) leaves room for a rounding that falls on the other side
    // of a tie; atol covers rows whose CPU error happens to be 0.
    const double cpu_error = max_abs_error(cpu.out, reference.out), cuda_error = max_abs_error(cuda.out, reference.out);
    CRAM_EXPECT(cuda_error <= 2 * cpu_error + 1e-5, "%s %s: CUDA error %g vs CPU twin error %g (float64 reference)",
                c.name, dtype, cuda_error, cpu_error);
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<KVCacheCase> cases = {
      // Decoding one token per stream, GQA, one empty cache, spare capacity.
      {"one new row, GQA", 3, 4, 2, 1, 40, 8, true, false, false, 0, {0, 17, 33}},
      // Several new rows attend causally among themselves; head_dim at its maximum.
      {"several new rows, key mask, d max", 2, 2, 1, 3, 24, kAttentionMaxHeadDim, true, true, false, 0, {0, 13}, 0},
      // Without new entries the rows are the cache's last n_new positions; a cache shorter than
      // n_new leaves rows with no visible key. head_dim 40: lanes past it in the second column.
      {"no new entries", 3, 2, 2, 2, 30, 40, false, true, false, 0, {0, 1, 25}},
      // Free strides (padded rows), a per-batch route broadcast over heads, odd head_dim.
      {"padded strides, broadcast route", 2, 3, 3, 4, 50, 33, true, false, true, 5, {46, 5}},
      // A long cache: many keys per warp, and the CPU twin's key blocks of 64.
      {"long cache, GQA 4:1", 1, 4, 1, 2, 150, 64, true, true, false, 1, {140}},
      {"long cache, no new entries", 2, 2, 1, 1, 140, 16, false, false, false, 0, {139, 70}},
  };
  unsigned seed = 1;
  for (const KVCacheCase& c : cases) {
    check_case<float>(c, seed);
    check_case<double>(c, seed);
    check_case<fp16_t>(c, seed);
    check_case<bf16_t>(c, seed);
    ++seed;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("test_simt_kvcache: %zu cases x 4 dtypes in %.1f s\n", cases.size(), seconds);
  return cram_test::report("test_simt_kvcache");
}
