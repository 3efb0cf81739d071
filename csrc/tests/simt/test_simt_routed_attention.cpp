// Routed attention's CUDA launchers (routed_attention_fwd_cuda, routed_attention_bwd_cuda) against
// their CPU twins, the CUDA kernels run on the CPU by the SIMT emulator (simt.h).
//
// float32 / float64 results are compared directly. For float16 / bfloat16 both are compared with
// the float64 run of the CPU twin on the same rounded inputs, FlashAttention's rule: the CUDA
// error may be at most kTwinErrorFactor times the CPU twin's own error, plus a small atol.
// The cases cover both kernel families (tensor-core: fp16 / bf16, head_dim 64 and 128, 16-byte
// rows; SIMT: everything else), the tensor-core forward with and without key splits (the
// emulator's 4 multiprocessors make few tiles split), causal and not, Lq == Lk and Lq != Lk,
// routes of no rows, a few, about half and all rows (shared by the heads or per head), GQA,
// key masks with rows that see no key, and padded q and out rows.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "../test_util.h"
#include "routed_attention/routed_attention.h"
#include "routed_attention/routed_attention_common.cuh"  // the workspace views: the forward's plan

using cram_test::max_abs;
using cram_test::max_abs_error;

namespace {

using cram::DType;
using cram::RoutedAttentionBwdParams;

// Host memory standing in for device memory: 16-byte aligned (cp.async, ldmatrix) and of the
// exact size, so that AddressSanitizer sees any read past a tensor's end.
template <typename T> struct Aligned16 {
  using value_type = T;
  Aligned16() = default;
  template <typename U> Aligned16(const Aligned16<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(16))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(16)); }
  template <typename U> bool operator==(const Aligned16<U>&) const { return true; }
};
using Bytes = std::vector<unsigned char, Aligned16<unsigned char>>;

size_t element_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}
DType accumulation_type(DType t) { return t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

double load(const unsigned char* at, DType t) {
  switch (t) {
    case DType::kFloat64: { double x; std::memcpy(&x, at, 8); return x; }
    case DType::kFloat32: { float x; std::memcpy(&x, at, 4); return x; }
    case DType::kFloat16: { cram::fp16_t x; std::memcpy(&x, at, 2); return cram::to_float(x); }
    case DType::kBFloat16: { cram::bf16_t x; std::memcpy(&x, at, 2); return cram::to_float(x); }
  }
  return NAN;
}

void store(unsigned char* at, DType t, double value) {
  switch (t) {
    case DType::kFloat64: std::memcpy(at, &value, 8); return;
    case DType::kFloat32: { const float x = static_cast<float>(value); std::memcpy(at, &x, 4); return; }
    case DType::kFloat16: { const auto x = cram::from_float<cram::fp16_t>(static_cast<float>(value)); std::memcpy(at, &x, 2); return; }
    case DType::kBFloat16: { const auto x = cram::from_float<cram::bf16_t>(static_cast<float>(value)); std::memcpy(at, &x, 2); return; }
  }
}

Bytes encode(const std::vector<double>& values, DType t) {
  Bytes bytes(values.size() * element_bytes(t));
  for (size_t n = 0; n < values.size(); ++n) store(bytes.data() + n * element_bytes(t), t, values[n]);
  return bytes;
}

std::vector<double> decode(const Bytes& bytes, DType t) {
  std::vector<double> values(bytes.size() / element_bytes(t));
  for (size_t n = 0; n < values.size(); ++n) values[n] = load(bytes.data() + n * element_bytes(t), t);
  return values;
}

// The forward kernel a case must reach (routed_attention_fwd.cu).
enum class FwdPath { kSimt, kTensorCore, kTensorCoreSplitKeys };

struct Case {
  const char* name;
  DType dtype;
  int batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  bool is_causal;
  double route_fraction;   // probability a row is routed
  bool per_head_route;     // else one route per batch, head stride 0. Per head with 3 or more
                           // heads, head 1 of batch 0 routes no row (a pair without tiles
                           // between pairs with tiles, in the tensor-core forward's list)
  double key_share;        // 0: no key_mask; else the probability a key is kept. Key 0 of batch 0
                           // is always hidden and row 0 of batch 0, head 0 always routed: under
                           // causal masking a routed row that sees no key
  bool last_batch_masked;  // the key_mask hides every key of the last batch (no row there sees a key)
  int q_row_pad, out_row_pad;  // extra elements per row (q: filled with NaN, never read)
  FwdPath path;
};

// One case's inputs as float64 values already rounded to the case's dtype, so that the float64
// run of the CPU twin sees the very inputs the 16-bit runs see.
struct Inputs {
  Case c;
  int64_t q_row_stride;
  std::vector<double> q, k, v, dout;
  std::vector<uint8_t> route, key_mask;

  int64_t route_index(int b, int h, int i) const {
    return (static_cast<int64_t>(b) * (c.per_head_route ? c.heads : 1) + (c.per_head_route ? h : 0)) * c.seqlen_q + i;
  }
  bool routed(int b, int h, int i) const { return route[route_index(b, h, i)] != 0; }
  bool sees_a_key(int b, int i) const {
    const int n_keys = c.is_causal ? std::min(c.seqlen_k, i + 1) : c.seqlen_k;
    for (int j = 0; j < n_keys; ++j)
      if (key_mask.empty() || key_mask[static_cast<int64_t>(b) * c.seqlen_k + j]) return true;
    return false;
  }
  // Tiles of the tensor-core forward's list: ceil(routed rows / kTileRows) per (batch, head).
  int tensor_core_tiles() const {
    int tiles = 0;
    for (int b = 0; b < c.batch; ++b)
      for (int h = 0; h < c.heads; ++h) {
        int count = 0;
        for (int i = 0; i < c.seqlen_q; ++i) count += routed(b, h, i);
        tiles += (count + cram::cuda::kTileRows - 1) / cram::cuda::kTileRows;
      }
    return tiles;
  }
};

Inputs make_inputs(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::bernoulli_distribution routed(c.route_fraction), kept(c.key_share);
  auto rounded = [&](double x) { return load(encode({x}, c.dtype).data(), c.dtype); };
  Inputs in{c, c.head_dim + c.q_row_pad, {}, {}, {}, {}, {}, {}};
  const int64_t q_rows = static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q;
  const int64_t kv_size = static_cast<int64_t>(c.batch) * c.kv_heads * c.seqlen_k * c.head_dim;
  for (int64_t row = 0; row < q_rows; ++row)
    for (int x = 0; x < in.q_row_stride; ++x) in.q.push_back(x < c.head_dim ? rounded(normal(rng)) : NAN);
  for (int64_t n = 0; n < kv_size; ++n) in.k.push_back(rounded(normal(rng)));
  for (int64_t n = 0; n < kv_size; ++n) in.v.push_back(rounded(normal(rng)));
  for (int64_t n = 0; n < q_rows * c.head_dim; ++n) in.dout.push_back(rounded(normal(rng)));
  for (int64_t n = 0; n < static_cast<int64_t>(c.batch) * (c.per_head_route ? c.heads : 1) * c.seqlen_q; ++n)
    in.route.push_back(routed(rng));
  if (c.per_head_route && c.heads >= 3)
    std::fill_n(in.route.begin() + in.route_index(0, 1, 0), c.seqlen_q, uint8_t{0});
  if (c.key_share > 0) {
    for (int64_t n = 0; n < static_cast<int64_t>(c.batch) * c.seqlen_k; ++n) in.key_mask.push_back(kept(rng));
    in.key_mask[0] = 0;
    in.route[in.route_index(0, 0, 0)] = 1;
    if (c.last_batch_masked)
      std::fill(in.key_mask.end() - c.seqlen_k, in.key_mask.end(), uint8_t{0});
  }
  return in;
}

// One run's tensors as stored: q, k, v, dout, out in the run's dtype; lse, dq, dk, dv in its
// accumulation type (as the binding layer allocates them, dq, dk, dv zeroed).
struct Run {
  DType dtype;
  Bytes q, k, v, dout, out, lse, dq, dk, dv;
  int plan_tiles = -1, plan_splits = -1;  // the CUDA forward's plan (tensor-core path only)
  uint64_t fwd_launches = 0, bwd_launches = 0;  // kernel launches of the CUDA forward, backward
};

constexpr unsigned char kWorkspaceFill = 0xa5;  // the workspace arrives uninitialised

Run prepare(const Inputs& in, DType dtype) {
  const Case& c = in.c;
  const DType acc = accumulation_type(dtype);
  const int64_t q_rows = static_cast<int64_t>(c.batch) * c.heads * c.seqlen_q;
  Run r{dtype, encode(in.q, dtype), encode(in.k, dtype), encode(in.v, dtype), encode(in.dout, dtype),
        // out (padded rows) and lse start as NaN: an element the forward leaves unwritten shows.
        encode(std::vector<double>(q_rows * (c.head_dim + c.out_row_pad), NAN), dtype),
        encode(std::vector<double>(q_rows, NAN), acc),
        encode(std::vector<double>(q_rows * c.head_dim, 0.0), acc),
        encode(std::vector<double>(in.k.size(), 0.0), acc),
        encode(std::vector<double>(in.v.size(), 0.0), acc)};
  return r;
}

// Parameters as fill_attention_params (csrc/bindings.cpp) sets them for these layouts.
RoutedAttentionBwdParams params(const Inputs& in, Run& r, double scale) {
  const Case& c = in.c;
  RoutedAttentionBwdParams p{};
  p.dtype = r.dtype;
  p.batch = c.batch, p.heads = c.heads, p.kv_heads = c.kv_heads;
  p.seqlen_q = c.seqlen_q, p.seqlen_k = c.seqlen_k, p.head_dim = c.head_dim;
  p.scale = scale;
  p.is_causal = c.is_causal;
  p.q_row_stride = in.q_row_stride;
  p.q_head_stride = c.seqlen_q * in.q_row_stride;
  p.q_batch_stride = c.heads * p.q_head_stride;
  p.k_row_stride = p.v_row_stride = c.head_dim;
  p.k_head_stride = p.v_head_stride = static_cast<int64_t>(c.seqlen_k) * c.head_dim;
  p.k_batch_stride = p.v_batch_stride = c.kv_heads * p.k_head_stride;
  p.out_row_stride = c.head_dim + c.out_row_pad;
  p.out_head_stride = c.seqlen_q * p.out_row_stride;
  p.out_batch_stride = c.heads * p.out_head_stride;
  p.dout_row_stride = c.head_dim;
  p.dout_head_stride = static_cast<int64_t>(c.seqlen_q) * c.head_dim;
  p.dout_batch_stride = c.heads * p.dout_head_stride;
  p.route_row_stride = 1;
  p.route_head_stride = c.per_head_route ? c.seqlen_q : 0;
  p.route_batch_stride = static_cast<int64_t>(c.per_head_route ? c.heads : 1) * c.seqlen_q;
  p.key_mask_batch_stride = in.key_mask.empty() ? 0 : c.seqlen_k;
  p.q = r.q.data(), p.k = r.k.data(), p.v = r.v.data(), p.dout = r.dout.data();
  p.route = in.route.data();
  p.key_mask = in.key_mask.empty() ? nullptr : in.key_mask.data();
  p.out = r.out.data(), p.lse = r.lse.data();
  p.dq = r.dq.data(), p.dk = r.dk.data(), p.dv = r.dv.data();
  return p;
}

void forward(const Inputs& in, Run& r, double scale, bool cuda) {
  const RoutedAttentionBwdParams p = params(in, r, scale);
  if (!cuda) return cram::routed_attention_fwd_cpu(p);
  Bytes workspace(cram::routed_attention_cuda_workspace_bytes(p), kWorkspaceFill);
  const uint64_t launches_before = simt::launch_count;
  cram::routed_attention_fwd_cuda(p, workspace.data(), nullptr);
  r.fwd_launches = simt::launch_count - launches_before;
  const cram::cuda::RoutedRows rows = cram::cuda::routed_rows(p, workspace.data());
  r.plan_tiles = rows.plan[0], r.plan_splits = rows.plan[1];
}

void backward(const Inputs& in, Run& r, double scale, bool cuda) {
  const RoutedAttentionBwdParams p = params(in, r, scale);
  if (!cuda) return cram::routed_attention_bwd_cpu(p);
  Bytes workspace(cram::routed_attention_cuda_workspace_bytes(p), kWorkspaceFill);
  const uint64_t launches_before = simt::launch_count;
  cram::routed_attention_bwd_cuda(p, workspace.data(), nullptr);
  r.bwd_launches = simt::launch_count - launches_before;
}

// A run's results as float64: out without its row padding, lse, dq, dk, dv.
struct Results {
  std::vector<double> out, lse, dq, dk, dv;
};

Results results(const Inputs& in, const Run& r) {
  const int d = in.c.head_dim, stride = d + in.c.out_row_pad;
  const std::vector<double> padded = decode(r.out, r.dtype);
  Results x;
  for (size_t row = 0; row < padded.size() / stride; ++row)
    x.out.insert(x.out.end(), padded.begin() + row * stride, padded.begin() + row * stride + d);
  const DType acc = accumulation_type(r.dtype);
  x.lse = decode(r.lse, acc), x.dq = decode(r.dq, acc), x.dk = decode(r.dk, acc), x.dv = decode(r.dv, acc);
  return x;
}

// float32: the SIMT kernels and the CPU twin both accumulate in float, in different orders (and
// dq by atomics); float64 likewise in double. Relative to each tensor's largest magnitude.
double tight_tolerance(DType t) { return t == DType::kFloat64 ? 1e-12 : 2e-6; }

// float16 / bfloat16: CUDA error <= kTwinErrorFactor x the CPU twin's error + kTwinAtol x the
// largest magnitude, on the results as the op returns them (out in the dtype, lse in float, dq,
// dk, dv cast to the dtype by the binding layer). The twin rounds only those results to 16 bits;
// the tensor-core kernels also round P (forward and backward) and dS (backward) to 16 bits as mma
// operands, an error of the order of that final rounding which the twin does not make: a factor
// above FlashAttention's 2.
constexpr double kTwinErrorFactor = 3.0;
constexpr double kTwinAtol = 1e-5;

// Worst ratio of a case's comparisons to their limits (<= 1 passes), printed per case.
struct Verdict {
  std::string tag;
  double worst = 0;
  void expect(const char* tensor, double ratio, const char* detail) {
    CRAM_EXPECT(ratio <= 1.0, "%s %s: %s (ratio to the limit %.3g)", tag.c_str(), tensor, detail, ratio);
    worst = std::max(worst, std::isnan(ratio) ? INFINITY : ratio);
  }
};

void compare_tight(Verdict& v, const char* tensor, const std::vector<double>& cuda, const std::vector<double>& cpu,
                   DType dtype) {
  const double tol = tight_tolerance(dtype);
  const double ratio = cram_test::close_ratio(cuda, cpu, tol * max_abs(cpu), tol);
  char detail[160];
  std::snprintf(detail, sizeof detail, "CUDA vs CPU max |diff| %.3g, largest |value| %.3g", max_abs_error(cuda, cpu),
                max_abs(cpu));
  v.expect(tensor, ratio, detail);
}

void compare_to_twin_error(Verdict& v, const char* tensor, const std::vector<double>& cuda,
                           const std::vector<double>& cpu, const std::vector<double>& reference) {
  const double cuda_error = max_abs_error(cuda, reference), cpu_error = max_abs_error(cpu, reference);
  const double limit = kTwinErrorFactor * cpu_error + kTwinAtol * max_abs(reference);
  char detail[200];
  std::snprintf(detail, sizeof detail, "CUDA error %.3g, CPU twin error %.3g, limit %.3g (vs float64)", cuda_error,
                cpu_error, limit);
  v.expect(tensor, cuda_error == 0 ? 0.0 : cuda_error / limit, detail);
}

// Rows not routed, and routed rows without a visible key: out exactly 0, lse -inf, dq 0 (the
// convention of routed_attention.h). Returns how many rows that is; reports the first that is not.
int check_empty_rows(const Inputs& in, const Results& got, const char* tag) {
  const Case& c = in.c;
  int empty_rows = 0;
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.heads; ++h)
      for (int i = 0; i < c.seqlen_q; ++i) {
        if (in.routed(b, h, i) && in.sees_a_key(b, i)) continue;
        ++empty_rows;
        const int64_t row = (static_cast<int64_t>(b) * c.heads + h) * c.seqlen_q + i;
        bool zero = got.lse[row] == -INFINITY;
        for (int x = 0; x < c.head_dim; ++x)
          zero = zero && got.out[row * c.head_dim + x] == 0 && got.dq[row * c.head_dim + x] == 0;
        if (!zero) {
          CRAM_EXPECT(false, "%s: %s row (b %d, h %d, i %d) has out or dq not 0, or lse %g, not -inf", tag,
                      in.routed(b, h, i) ? "keyless routed" : "unrouted", b, h, i, got.lse[row]);
          return empty_rows;
        }
      }
  return empty_rows;
}

void check_case(const Case& c, unsigned seed) {
  const auto start = std::chrono::steady_clock::now();
  const Inputs in = make_inputs(c, seed);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  Verdict verdict{std::string(c.name) + " [" + cram::dtype_name(c.dtype) + "]"};
  const char* tag = verdict.tag.c_str();

  Run cpu = prepare(in, c.dtype), cuda = prepare(in, c.dtype);
  forward(in, cpu, scale, false);
  forward(in, cuda, scale, true);

  // The forward took the path the case is for, with the launches routed_attention_fwd.cu counts:
  // compaction, clearing and attention, and the tile plan on the tensor-core path.
  const uint64_t fwd_launches = c.path == FwdPath::kSimt ? 3 : 4;
  CRAM_EXPECT(cuda.fwd_launches == fwd_launches, "%s: the forward made %llu launches, expected %llu", tag,
              static_cast<unsigned long long>(cuda.fwd_launches), static_cast<unsigned long long>(fwd_launches));
  if (c.path == FwdPath::kSimt) {
    int untouched;
    std::memset(&untouched, kWorkspaceFill, sizeof untouched);
    CRAM_EXPECT(cuda.plan_tiles == untouched, "%s: the SIMT forward, but a tile plan was made", tag);
  } else {
    CRAM_EXPECT(cuda.plan_tiles == in.tensor_core_tiles(), "%s: tensor-core plan of %d tiles, expected %d", tag,
                cuda.plan_tiles, in.tensor_core_tiles());
    if (c.path == FwdPath::kTensorCoreSplitKeys)
      CRAM_EXPECT(cuda.plan_splits > 1, "%s: expected split key ranges, plan has %d split(s)", tag, cuda.plan_splits);
    else
      CRAM_EXPECT(cuda.plan_splits == 1, "%s: expected whole key ranges, plan has %d splits", tag, cuda.plan_splits);
  }

  // out's row padding is never written.
  {
    const size_t pad_bytes = c.out_row_pad * element_bytes(c.dtype), row_bytes = c.head_dim * element_bytes(c.dtype);
    const Bytes fill = encode(std::vector<double>(c.out_row_pad, NAN), c.dtype);
    for (size_t at = row_bytes; pad_bytes && at < cuda.out.size(); at += row_bytes + pad_bytes)
      if (std::memcmp(cuda.out.data() + at, fill.data(), pad_bytes) != 0) {
        CRAM_EXPECT(false, "%s: the forward wrote out's row padding at byte %zu", tag, at);
        break;
      }
  }

  // Both backwards start from the CPU twin's forward results, so that they compare the backward
  // only; the CUDA forward's out and lse are kept for the comparison.
  const Results cuda_forward = results(in, cuda);
  cuda.out = cpu.out, cuda.lse = cpu.lse;
  backward(in, cpu, scale, false);
  backward(in, cuda, scale, true);
  // routed_attention_bwd.cu's count: compaction, row dots, the dK/dV/dQ kernel.
  CRAM_EXPECT(cuda.bwd_launches == 3, "%s: the backward made %llu launches, expected 3", tag,
              static_cast<unsigned long long>(cuda.bwd_launches));
  Results got = results(in, cuda);
  got.out = cuda_forward.out, got.lse = cuda_forward.lse;
  const Results twin = results(in, cpu);

  const int empty_rows = check_empty_rows(in, got, tag);

  if (c.dtype == DType::kFloat32 || c.dtype == DType::kFloat64) {
    compare_tight(verdict, "out", got.out, twin.out, c.dtype);
    compare_tight(verdict, "lse", got.lse, twin.lse, c.dtype);
    compare_tight(verdict, "dq", got.dq, twin.dq, c.dtype);
    compare_tight(verdict, "dk", got.dk, twin.dk, c.dtype);
    compare_tight(verdict, "dv", got.dv, twin.dv, c.dtype);
  } else {
    Run exact = prepare(in, DType::kFloat64);
    forward(in, exact, scale, false);
    backward(in, exact, scale, false);
    const Results reference = results(in, exact);
    auto returned = [&](const std::vector<double>& grad) { return decode(encode(grad, c.dtype), c.dtype); };
    compare_to_twin_error(verdict, "out", got.out, twin.out, reference.out);
    compare_to_twin_error(verdict, "lse", got.lse, twin.lse, reference.lse);
    compare_to_twin_error(verdict, "dq", returned(got.dq), returned(twin.dq), reference.dq);
    compare_to_twin_error(verdict, "dk", returned(got.dk), returned(twin.dk), reference.dk);
    compare_to_twin_error(verdict, "dv", returned(got.dv), returned(twin.dv), reference.dv);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%-60s %-8s %s, %d rows empty, worst ratio to limit %.3f, %.1f s\n", c.name, cram::dtype_name(c.dtype),
              c.path == FwdPath::kSimt ? "SIMT" : c.path == FwdPath::kTensorCore ? "tensor cores"
                                                                                  : "tensor cores, split keys",
              empty_rows, verdict.worst, seconds);
}

}  // namespace

int main() {
  // The split / whole expectations below are for the emulator's default 4 multiprocessors:
  // tensor-core key ranges split when a call has at most 3 tiles of 64 routed rows.
  setenv("SIMT_SM_COUNT", "4", 1);
  using enum DType;
  using enum FwdPath;
  const Case cases[] = {
      // name, dtype, batch, heads, kv_heads, Lq, Lk, head_dim, causal, route fraction, per-head
      // route, key share, last batch masked, q pad, out pad, forward path
      // Tensor cores (q rows padded by 8 elements: still 16-byte aligned).
      {"causal gqa all rows", kFloat16, 1, 2, 1, 100, 100, 64, true, 1.0, false, 0, false, 8, 0, kTensorCore},
      {"causal gqa sparse per-head route", kBFloat16, 1, 3, 1, 130, 130, 128, true, 0.05, true, 0, false, 8, 0,
       kTensorCoreSplitKeys},
      {"non-causal Lq < Lk half key_mask keyless batch", kFloat16, 2, 1, 1, 70, 150, 64, false, 0.5, false, 0.6,
       true, 8, 0, kTensorCoreSplitKeys},
      {"causal Lq > Lk gqa half per-head key_mask out padded", kBFloat16, 1, 2, 1, 150, 90, 64, true, 0.5, true,
       0.7, false, 8, 2, kTensorCore},
      {"non-causal Lq < Lk all rows one tile", kBFloat16, 1, 1, 1, 60, 300, 64, false, 1.0, false, 0, false, 8, 0,
       kTensorCoreSplitKeys},
      {"causal Lq < Lk d128 half per-head key_mask", kFloat16, 1, 2, 2, 160, 200, 128, true, 0.5, true, 0.8, false,
       8, 0, kTensorCore},
      {"no row routed", kFloat16, 1, 2, 1, 70, 70, 64, true, 0.0, false, 0, false, 8, 0, kTensorCore},
      // SIMT: fp32, fp64, other head dims, unaligned rows.
      {"unaligned q rows causal half", kFloat16, 1, 1, 1, 70, 70, 64, true, 0.5, false, 0, false, 3, 0, kSimt},
      {"causal gqa half per-head key_mask out padded", kFloat32, 2, 4, 2, 77, 77, 32, true, 0.5, true, 0.8, false, 3, 1,
       kSimt},
      {"non-causal Lq < Lk gqa all rows d64", kFloat32, 1, 2, 1, 40, 90, 64, false, 1.0, false, 0, false, 3, 0, kSimt},
      {"non-causal all rows key_mask keyless batch", kFloat64, 2, 1, 1, 45, 70, 48, false, 1.0, false, 0.7, true, 3, 0,
       kSimt},
      {"causal Lq > Lk sparse per-head", kFloat64, 1, 2, 2, 90, 37, 16, true, 0.1, true, 0, false, 3, 0, kSimt},
      {"head_dim 256 non-causal half", kFloat64, 1, 1, 1, 33, 33, 256, false, 0.5, false, 0, false, 3, 2, kSimt},
      {"causal Lq < Lk gqa half d80", kFloat16, 1, 2, 1, 50, 90, 80, true, 0.5, false, 0, false, 3, 0, kSimt},
      {"non-causal Lq < Lk sparse per-head key_mask keyless batch", kBFloat16, 2, 2, 2, 50, 66, 32, false, 0.1, true,
       0.5, true, 3, 0, kSimt},
      {"no row routed", kFloat32, 1, 2, 2, 40, 40, 32, true, 0.0, false, 0, false, 3, 0, kSimt},
  };
  unsigned seed = 2024;
  for (const Case& c : cases) check_case(c, seed++);
  return cram_test::report("test_simt_routed_attention");
}
