// The one binding layer: tensors in, checked params structs out, kernels launched.
//
// Every input is checked here, with a message naming the argument and what was expected, before
// any kernel runs (FlashAttention's flash_api.cpp is the model). The kernels themselves take raw
// pointers and strides and never see a tensor. The ops are registered with TORCH_LIBRARY; their
// fake (meta) implementations and autograd formulas live in cram_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#ifdef CRAM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/parallel.h"
#include "cram_forward/cram_forward.h"
#include "routed_attention/routed_attention.h"
#include "selective_scan/selective_scan.h"

namespace cram {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, n, grain, fn);
}

namespace {

DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name,
                 const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", layout, " = ", expected,
              ", got ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all inputs must be on one device");
}

void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name,
                 const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, " (", why,
              "), got ", t.scalar_type());
}

// The kernels need a unit stride along the last dimension; other strides are passed through.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// An optional input, contiguous (the tensor itself when it already is); undefined when absent.
at::Tensor contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

// Sizes travel to the kernels as int64_t, but the kernels count positions, channels and heads
// in 32-bit ints.
void check_fits_int32(int64_t size, const char* op, const char* what) {
  TORCH_CHECK(size <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ", size,
              " exceeds the kernels' 32-bit index range");
}

void check_device_supported(const at::Tensor& t, const char* op) {
#ifdef CRAM_WITH_CUDA
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), op, ": tensors must be on the CPU or a CUDA device, got ",
              t.device());
#else
  TORCH_CHECK(t.is_cpu(), op, ": tensors must be on the CPU (this build of cram_ext has no CUDA "
              "kernels; reinstall with CUDA available to use ", t.device(), ")");
#endif
}

// The one launch path of every op, after its inputs are checked and its params filled: the CPU
// kernel, or for tensors on a CUDA device the CUDA launcher, on that device's current stream.
// `cuda_launch` is a generic lambda, so builds without CUDA kernels never instantiate its body.
template <typename Params, typename CudaLaunch>
void launch(const at::Tensor& on, const Params& params, void (*cpu_kernel)(const Params&),
            [[maybe_unused]] CudaLaunch cuda_launch) {
#ifdef CRAM_WITH_CUDA
  if (on.is_cuda()) {
    c10::cuda::CUDAGuard guard(on.device());
    cuda_launch(params, static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
#endif
  cpu_kernel(params);
}

// ---------------------------------------------------------------------------------------------
// Selective scan
// ---------------------------------------------------------------------------------------------

struct ScanInputs {
  at::Tensor u, delta, A, B, C, D, z, delta_bias, dt_scale;
};

// Checks and normalises the scan's inputs; B and C become (batch, groups, N, L).
ScanInputs check_scan_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C,
                             const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                             const c10::optional<at::Tensor>& delta_bias,
                             const c10::optional<at::Tensor>& dt_scale) {
  const char* op = "selective_scan";
  check_device_supported(u, op);
  TORCH_CHECK(u.dim() == 3, op, ": u must have shape (batch, dim, L), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  for (const auto& [size, what] : {std::pair{batch, "batch"}, {dim, "dim"}, {L, "L"}})
    check_fits_int32(size, op, what);
  to_dtype(u, op, "u");
  const auto acc = accumulation_type(u.scalar_type());
  const char* acc_why = u.scalar_type() == at::kDouble ? "float64 like u" : "float32 parameters";
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must have shape (dim, N) = (", dim,
              ", N), got ", A.sizes());
  TORCH_CHECK(!A.is_complex(), op, ": A must be real (complex A is not supported)");
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kScanMaxDState, op, ": the state size N = A.size(1) must be in [1, ",
              kScanMaxDState, "], got ", N);
  check_shape(delta, u.sizes(), op, "delta", "(batch, dim, L)");
  TORCH_CHECK(B.dim() == 3 || B.dim() == 4, op,
              ": B must have shape (batch, N, L) or (batch, groups, N, L), got ", B.sizes());
  TORCH_CHECK(C.dim() == B.dim(), op, ": C must have the same number of dimensions as B (",
              B.dim(), "), got shape ", C.sizes());
  at::Tensor B4 = B.dim() == 3 ? B.unsqueeze(1) : B;
  at::Tensor C4 = C.dim() == 3 ? C.unsqueeze(1) : C;
  const int64_t groups = B4.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, op, ": the number of groups in B (", groups,
              ") must divide dim (", dim, ")");
  check_shape(B4, {batch, groups, N, L}, op, "B", "(batch, groups, N, L)");
  check_shape(C4, {batch, groups, N, L}, op, "C", "(batch, groups, N, L)");

  ScanInputs in;
  const std::pair<const at::Tensor*, const char*> same_dtype[] = {{&delta, "delta"}, {&B, "B"},
                                                                   {&C, "C"}};
  for (const auto& [t, name] : same_dtype) {
    check_same_device(*t, u, op, name, "u");
    check_dtype(*t, u.scalar_type(), op, name, "the dtype of u");
  }
  check_same_device(A, u, op, "A", "u");
  check_dtype(A, acc, op, "A", acc_why);
  in.u = last_dim_contiguous(u);
  in.delta = last_dim_contiguous(delta);
  in.A = A.contiguous();
  in.B = last_dim_contiguous(B4);
  in.C = last_dim_contiguous(C4);
  if (z) {
    check_same_device(*z, u, op, "z", "u");
    check_dtype(*z, u.scalar_type(), op, "z", "the dtype of u");
    check_shape(*z, u.sizes(), op, "z", "(batch, dim, L)");
    in.z = last_dim_contiguous(*z);
  }
  const std::pair<const c10::optional<at::Tensor>*, const char*> per_channel[] = {
      {&D, "D"}, {&delta_bias, "delta_bias"}};
  for (const auto& [t, name] : per_channel) {
    if (!*t) continue;
    check_same_device(**t, u, op, name, "u");
    check_dtype(**t, acc, op, name, acc_why);
    check_shape(**t, {dim}, op, name, "(dim,)");
  }
  if (D) in.D = D->contiguous();
  if (delta_bias) in.delta_bias = delta_bias->contiguous();
  if (dt_scale) {
    check_same_device(*dt_scale, u, op, "dt_scale", "u");
    check_dtype(*dt_scale, acc, op, "dt_scale", acc_why);
    check_shape(*dt_scale, {batch, L}, op, "dt_scale", "(batch, L)");
    in.dt_scale = dt_scale->contiguous();
  }
  return in;
}

// The optional initial state of a scan: (batch, dim, N) in the accumulation type, contiguous.
at::Tensor check_initial_state(const c10::optional<at::Tensor>& initial_state, const at::Tensor& u,
                               const at::Tensor& A, const char* op) {
  if (!initial_state) return at::Tensor();
  check_same_device(*initial_state, u, op, "initial_state", "u");
  check_dtype(*initial_state, accumulation_type(u.scalar_type()), op, "initial_state",
              "the scan state's type: float64 for float64 u, float32 otherwise");
  check_shape(*initial_state, {u.size(0), u.size(1), A.size(1)}, op, "initial_state",
              "(batch, dim, N)");
  return initial_state->contiguous();
}

// `out` is the forward's output; the backward passes an undefined tensor (it writes gradients).
void fill_scan_params(SelectiveScanParams& p, const ScanInputs& in, bool delta_softplus,
                      const at::Tensor& out, const at::Tensor& chunk_states) {
  p.input_type = to_dtype(in.u, "selective_scan", "u");
  p.batch = in.u.size(0);
  p.dim = in.u.size(1);
  p.seqlen = in.u.size(2);
  p.dstate = in.A.size(1);
  p.n_groups = in.B.size(1);
  p.n_chunks = chunk_states.size(2);
  p.delta_softplus = delta_softplus;
  p.u_batch_stride = in.u.stride(0);
  p.u_d_stride = in.u.stride(1);
  p.delta_batch_stride = in.delta.stride(0);
  p.delta_d_stride = in.delta.stride(1);
  p.B_batch_stride = in.B.stride(0);
  p.B_group_stride = in.B.stride(1);
  p.B_dstate_stride = in.B.stride(2);
  p.C_batch_stride = in.C.stride(0);
  p.C_group_stride = in.C.stride(1);
  p.C_dstate_stride = in.C.stride(2);
  p.z_batch_stride = in.z.defined() ? in.z.stride(0) : 0;
  p.z_d_stride = in.z.defined() ? in.z.stride(1) : 0;
  p.out_batch_stride = out.defined() ? out.stride(0) : 0;
  p.out_d_stride = out.defined() ? out.stride(1) : 0;
  p.u = in.u.const_data_ptr();
  p.delta = in.delta.const_data_ptr();
  p.A = in.A.const_data_ptr();
  p.B = in.B.const_data_ptr();
  p.C = in.C.const_data_ptr();
  p.D = in.D.defined() ? in.D.const_data_ptr() : nullptr;
  p.z = in.z.defined() ? in.z.const_data_ptr() : nullptr;
  p.delta_bias = in.delta_bias.defined() ? in.delta_bias.const_data_ptr() : nullptr;
  p.dt_scale = in.dt_scale.defined() ? in.dt_scale.const_data_ptr() : nullptr;
  p.out = out.defined() ? out.data_ptr() : nullptr;
  p.chunk_states = chunk_states.data_ptr();
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& dt_scale,
    bool delta_softplus, const c10::optional<at::Tensor>& initial_state) {
  ScanInputs in = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, dt_scale);
  const at::Tensor h0 = check_initial_state(initial_state, u, A, "selective_scan");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  at::Tensor out = at::empty({batch, dim, L}, u.options());
  at::Tensor chunk_states = at::zeros({batch, dim, scan_checkpoint_count(L), N},
                                      u.options().dtype(accumulation_type(u.scalar_type())));
  if (batch == 0 || dim == 0 || L == 0) {
    // No step: the state after the (empty) sequence is the one it started from.
    if (h0.defined() && chunk_states.numel() > 0) chunk_states.select(2, 0).copy_(h0);
    return {out, chunk_states};
  }
  SelectiveScanParams p;
  fill_scan_params(p, in, delta_softplus, out, chunk_states);
  p.initial_state = h0.defined() ? h0.const_data_ptr() : nullptr;
  launch(u, p, selective_scan_fwd_cpu,
         [](const auto& params, void* stream) { selective_scan_fwd_cuda(params, stream); });
  return {out, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>>
selective_scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                   const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                   const c10::optional<at::Tensor>& delta_bias,
                   const c10::optional<at::Tensor>& dt_scale, const at::Tensor& chunk_states,
                   bool delta_softplus, const c10::optional<at::Tensor>& initial_state) {
  const char* op = "selective_scan backward";
  ScanInputs in = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, dt_scale);
  const at::Tensor h0 = check_initial_state(initial_state, u, A, op);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const auto acc = accumulation_type(u.scalar_type());
  check_shape(dout, u.sizes(), op, "dout", "(batch, dim, L)");
  check_same_device(dout, u, op, "dout", "u");
  check_dtype(dout, u.scalar_type(), op, "dout", "the dtype of u");
  check_same_device(chunk_states, u, op, "chunk_states", "u");
  check_shape(chunk_states, {batch, dim, scan_checkpoint_count(L), N}, op, "chunk_states",
              "(batch, dim, n_chunks, N), as returned by the forward");
  check_dtype(chunk_states, acc, op, "chunk_states", "the accumulation type");
  at::Tensor dout_c = last_dim_contiguous(dout);
  at::Tensor states = chunk_states.contiguous();

  auto acc_opts = u.options().dtype(acc);
  at::Tensor du = at::empty_like(in.u, at::MemoryFormat::Contiguous);
  at::Tensor ddelta = at::empty_like(in.delta, at::MemoryFormat::Contiguous);
  at::Tensor dA = at::zeros_like(in.A);
  at::Tensor dB = at::zeros(in.B.sizes(), acc_opts);
  at::Tensor dC = at::zeros(in.C.sizes(), acc_opts);
  at::Tensor dD = D ? at::zeros({dim}, acc_opts) : at::Tensor();
  at::Tensor dz = z ? at::empty_like(in.z, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor ddelta_bias = delta_bias ? at::zeros({dim}, acc_opts) : at::Tensor();
  at::Tensor ddt_scale = dt_scale ? at::zeros({batch, L}, acc_opts) : at::Tensor();
  at::Tensor dinitial_state = h0.defined() ? at::zeros({batch, dim, N}, acc_opts) : at::Tensor();

  if (batch > 0 && dim > 0 && L > 0) {
    SelectiveScanBwdParams p;
    fill_scan_params(p, in, delta_softplus, at::Tensor(), states);
    p.dout_batch_stride = dout_c.stride(0);
    p.dout_d_stride = dout_c.stride(1);
    p.du_batch_stride = du.stride(0);
    p.du_d_stride = du.stride(1);
    p.ddelta_batch_stride = ddelta.stride(0);
    p.ddelta_d_stride = ddelta.stride(1);
    p.dz_batch_stride = dz.defined() ? dz.stride(0) : 0;
    p.dz_d_stride = dz.defined() ? dz.stride(1) : 0;
    p.dB_batch_stride = dB.stride(0);
    p.dB_group_stride = dB.stride(1);
    p.dB_dstate_stride = dB.stride(2);
    p.dC_batch_stride = dC.stride(0);
    p.dC_group_stride = dC.stride(1);
    p.dC_dstate_stride = dC.stride(2);
    p.dout = dout_c.const_data_ptr();
    p.du = du.data_ptr();
    p.ddelta = ddelta.data_ptr();
    p.dz = dz.defined() ? dz.data_ptr() : nullptr;
    p.dA = dA.data_ptr();
    p.dB = dB.data_ptr();
    p.dC = dC.data_ptr();
    p.dD = dD.defined() ? dD.data_ptr() : nullptr;
    p.ddelta_bias = ddelta_bias.defined() ? ddelta_bias.data_ptr() : nullptr;
    p.ddt_scale = ddt_scale.defined() ? ddt_scale.data_ptr() : nullptr;
    p.initial_state = h0.defined() ? h0.const_data_ptr() : nullptr;
    p.dinitial_state = dinitial_state.defined() ? dinitial_state.data_ptr() : nullptr;
    launch(u, p, selective_scan_bwd_cpu,
           [](const auto& params, void* stream) { selective_scan_bwd_cuda(params, stream); });
  } else {
    du.zero_();
    ddelta.zero_();
    if (dz.defined()) dz.zero_();
  }
  // Gradients come back in the inputs' own shapes and dtypes.
  dB = dB.to(u.scalar_type());
  dC = dC.to(u.scalar_type());
  if (B.dim() == 3) {
    dB = dB.squeeze(1);
    dC = dC.squeeze(1);
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  return {du, ddelta, dA, dB, dC, opt(dD), opt(dz), opt(ddelta_bias), opt(ddt_scale),
          opt(dinitial_state)};
}

// ---------------------------------------------------------------------------------------------
// Routed attention
// ---------------------------------------------------------------------------------------------

// A bool route of shape (batch, rows), shared by the heads, or (batch, heads, rows), as a
// (batch, heads, rows) view (head stride 0 when shared: no copy). `rows` names the row count.
at::Tensor checked_route(const at::Tensor& route, const at::Tensor& q, int64_t batch, int64_t heads,
                         int64_t n_rows, const char* op, const char* rows) {
  check_same_device(route, q, op, "route", "q");
  TORCH_CHECK(route.scalar_type() == at::kBool, op, ": route must be a bool tensor, got ",
              route.scalar_type());
  const std::string shared = std::string("(batch, ") + rows + ")";
  const std::string per_head = std::string("(batch, heads, ") + rows + ")";
  if (route.dim() == 2) {
    check_shape(route, {batch, n_rows}, op, "route", shared.c_str());
    return route.unsqueeze(1).expand({batch, heads, n_rows});
  }
  TORCH_CHECK(route.dim() == 3, op, ": route must have shape ", shared, " or ", per_head, ", got ",
              route.sizes());
  check_shape(route, {batch, heads, n_rows}, op, "route", per_head.c_str());
  return route;
}

// An optional bool key_mask of shape (batch, keys), contiguous; undefined when absent.
at::Tensor checked_key_mask(const c10::optional<at::Tensor>& key_mask, const at::Tensor& q,
                            int64_t batch, int64_t n_keys, const char* op, const char* keys) {
  if (!key_mask) return at::Tensor();
  check_same_device(*key_mask, q, op, "key_mask", "q");
  TORCH_CHECK(key_mask->scalar_type() == at::kBool, op, ": key_mask must be a bool tensor, got ",
              key_mask->scalar_type());
  const std::string layout = std::string("(batch, ") + keys + ")";
  check_shape(*key_mask, {batch, n_keys}, op, "key_mask", layout.c_str());
  return key_mask->contiguous();
}

struct AttentionInputs {
  at::Tensor q, k, v, route, key_mask;  // route: (batch, heads, Lq) view, maybe head-broadcast
};

AttentionInputs check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& route,
                                       const c10::optional<at::Tensor>& key_mask, double scale) {
  const char* op = "routed_attention";
  check_device_supported(q, op);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (batch, heads, Lq, head_dim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape (batch, kv_heads, Lk, head_dim), got ", k.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), Lq = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), Lk = k.size(2);
  for (const auto& [size, what] : {std::pair{batch * heads, "batch * heads"}, {Lq, "Lq"}, {Lk, "Lk"}})
    check_fits_int32(size, op, what);
  to_dtype(q, op, "q");
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_same_device(*t, q, op, name, "q");
    check_dtype(*t, q.scalar_type(), op, name, "the dtype of q");
  }
  TORCH_CHECK(k.size(0) == batch && k.size(3) == d, op, ": k must have shape (batch=", batch,
              ", kv_heads, Lk, head_dim=", d, "), got ", k.sizes());
  check_shape(v, k.sizes(), op, "v", "k's shape (batch, kv_heads, Lk, head_dim)");
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, op, ": the number of key/value heads (",
              kv_heads, ") must divide the number of query heads (", heads, ")");
  TORCH_CHECK(d >= 1 && d <= kAttentionMaxHeadDim, op, ": head_dim must be in [1, ",
              kAttentionMaxHeadDim, "], got ", d);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  AttentionInputs in;
  in.route = checked_route(route, q, batch, heads, Lq, op, "Lq");
  in.key_mask = checked_key_mask(key_mask, q, batch, Lk, op, "Lk");
  in.q = last_dim_contiguous(q);
  in.k = last_dim_contiguous(k);
  in.v = last_dim_contiguous(v);
  return in;
}

void fill_attention_params(RoutedAttentionParams& p, const AttentionInputs& in, bool is_causal,
                           double scale, const at::Tensor& out, const at::Tensor& lse) {
  p.dtype = to_dtype(in.q, "routed_attention", "q");
  p.batch = in.q.size(0);
  p.heads = in.q.size(1);
  p.kv_heads = in.k.size(1);
  p.seqlen_q = in.q.size(2);
  p.seqlen_k = in.k.size(2);
  p.head_dim = in.q.size(3);
  p.scale = scale;
  p.is_causal = is_causal;
  p.q_batch_stride = in.q.stride(0);
  p.q_head_stride = in.q.stride(1);
  p.q_row_stride = in.q.stride(2);
  p.k_batch_stride = in.k.stride(0);
  p.k_head_stride = in.k.stride(1);
  p.k_row_stride = in.k.stride(2);
  p.v_batch_stride = in.v.stride(0);
  p.v_head_stride = in.v.stride(1);
  p.v_row_stride = in.v.stride(2);
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.out_row_stride = out.stride(2);
  p.route_batch_stride = in.route.stride(0);
  p.route_head_stride = in.route.stride(1);
  p.route_row_stride = in.route.stride(2);
  p.key_mask_batch_stride = in.key_mask.defined() ? in.key_mask.stride(0) : 0;
  p.q = in.q.const_data_ptr();
  p.k = in.k.const_data_ptr();
  p.v = in.v.const_data_ptr();
  p.route = reinterpret_cast<const uint8_t*>(in.route.const_data_ptr<bool>());
  p.key_mask = in.key_mask.defined()
                   ? reinterpret_cast<const uint8_t*>(in.key_mask.const_data_ptr<bool>())
                   : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
}

// Device memory for the CUDA kernels' row compaction (a template: only CUDA launches instantiate it).
template <typename Params>
at::Tensor attention_cuda_workspace(const at::Tensor& q, const Params& params) {
  return at::empty({routed_attention_cuda_workspace_bytes(params)}, q.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> routed_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& route,
                                                        const c10::optional<at::Tensor>& key_mask,
                                                        bool is_causal, double scale) {
  AttentionInputs in = check_attention_inputs(q, k, v, route, key_mask, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(accumulation_type(q.scalar_type())));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  RoutedAttentionParams p;
  fill_attention_params(p, in, is_causal, scale, out, lse);
  launch(q, p, routed_attention_fwd_cpu, [&q](const auto& params, void* stream) {
    routed_attention_fwd_cuda(params, attention_cuda_workspace(q, params).data_ptr(), stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& route,
    const c10::optional<at::Tensor>& key_mask, bool is_causal, double scale) {
  const char* op = "routed_attention backward";
  AttentionInputs in = check_attention_inputs(q, k, v, route, key_mask, scale);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_same_device(*t, q, op, name, "q");
    check_dtype(*t, q.scalar_type(), op, name, "the dtype of q");
    check_shape(*t, q.sizes(), op, name, "q's shape (batch, heads, Lq, head_dim)");
  }
  const auto acc = accumulation_type(q.scalar_type());
  check_same_device(lse, q, op, "lse", "q");
  check_shape(lse, {q.size(0), q.size(1), q.size(2)}, op, "lse", "(batch, heads, Lq)");
  check_dtype(lse, acc, op, "lse", "the accumulation type");
  at::Tensor dout_c = last_dim_contiguous(dout);
  at::Tensor out_c = last_dim_contiguous(out);
  at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(acc));
  at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(acc));
  if (q.numel() > 0 && k.numel() > 0) {
    RoutedAttentionBwdParams p;
    fill_attention_params(p, in, is_causal, scale, out_c, lse_c);
    p.dout_batch_stride = dout_c.stride(0);
    p.dout_head_stride = dout_c.stride(1);
    p.dout_row_stride = dout_c.stride(2);
    p.dout = dout_c.const_data_ptr();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    launch(q, p, routed_attention_bwd_cpu, [&q](const auto& params, void* stream) {
      routed_attention_bwd_cuda(params, attention_cuda_workspace(q, params).data_ptr(), stream);
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Streaming: one scan step, routed attention against a key/value cache
// ---------------------------------------------------------------------------------------------

// A scan state updated in place: on x's device, in the accumulation type, of `shape`, with a
// unit stride along N.
void check_scan_state(const at::Tensor& state, const at::Tensor& x, at::IntArrayRef shape, const char* layout,
                      const char* op) {
  check_same_device(state, x, op, "state", "x");
  check_dtype(state, accumulation_type(x.scalar_type()), op, "state",
              "the scan state's type: float64 for float64 x, float32 otherwise");
  check_shape(state, shape, op, "state", layout);
  TORCH_CHECK(state.stride(2) == 1, op, ": state must be contiguous in its last dimension (it is "
              "updated in place), got strides ", state.strides());
}

// Mamba's selective_state_update with dt_scale; `state` is updated in place.
at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const c10::optional<at::Tensor>& D,
                                  const c10::optional<at::Tensor>& z,
                                  const c10::optional<at::Tensor>& dt_bias,
                                  const c10::optional<at::Tensor>& dt_scale, bool dt_softplus) {
  const char* op = "selective_state_update";
  check_device_supported(x, op);
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (batch, dim), got ", x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1);
  to_dtype(x, op, "x");
  const auto acc = accumulation_type(x.scalar_type());
  const char* acc_why = x.scalar_type() == at::kDouble ? "float64 like x" : "float32 parameters";
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must have shape (dim, N) = (", dim,
              ", N), got ", A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kScanMaxDState, op, ": the state size N = A.size(1) must be in [1, ",
              kScanMaxDState, "], got ", N);
  check_same_device(A, x, op, "A", "x");
  check_dtype(A, acc, op, "A", acc_why);
  check_scan_state(state, x, {batch, dim, N}, "(batch, dim, N)", op);
  check_shape(dt, x.sizes(), op, "dt", "(batch, dim)");
  TORCH_CHECK(B.dim() == 2 || B.dim() == 3, op,
              ": B must have shape (batch, N) or (batch, groups, N), got ", B.sizes());
  TORCH_CHECK(C.dim() == B.dim(), op, ": C must have the same number of dimensions as B (",
              B.dim(), "), got shape ", C.sizes());
  const at::Tensor B3 = last_dim_contiguous(B.dim() == 2 ? B.unsqueeze(1) : B);
  const at::Tensor C3 = last_dim_contiguous(C.dim() == 2 ? C.unsqueeze(1) : C);
  const int64_t groups = B3.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, op, ": the number of groups in B (", groups,
              ") must divide dim (", dim, ")");
  check_shape(B3, {batch, groups, N}, op, "B", "(batch, groups, N)");
  check_shape(C3, {batch, groups, N}, op, "C", "(batch, groups, N)");
  for (const auto& [t, name] : {std::pair{&dt, "dt"}, std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    check_same_device(*t, x, op, name, "x");
    check_dtype(*t, x.scalar_type(), op, name, "the dtype of x");
  }
  at::Tensor z_c;
  if (z) {
    check_same_device(*z, x, op, "z", "x");
    check_dtype(*z, x.scalar_type(), op, "z", "the dtype of x");
    check_shape(*z, x.sizes(), op, "z", "(batch, dim)");
    z_c = last_dim_contiguous(*z);
  }
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&dt_bias, "dt_bias"}}) {
    if (!*t) continue;
    check_same_device(**t, x, op, name, "x");
    check_dtype(**t, acc, op, name, acc_why);
    check_shape(**t, {dim}, op, name, "(dim,)");
  }
  if (dt_scale) {
    check_same_device(*dt_scale, x, op, "dt_scale", "x");
    check_dtype(*dt_scale, acc, op, "dt_scale", acc_why);
    check_shape(*dt_scale, {batch}, op, "dt_scale", "(batch,)");
  }
  const at::Tensor x_c = last_dim_contiguous(x), dt_c = last_dim_contiguous(dt), A_c = A.contiguous();
  const at::Tensor D_c = contiguous_or_none(D), bias_c = contiguous_or_none(dt_bias),
                   scale_c = contiguous_or_none(dt_scale);
  at::Tensor out = at::empty({batch, dim}, x.options());
  if (batch == 0 || dim == 0) return out;

  SelectiveStateUpdateParams p{};
  p.input_type = to_dtype(x, op, "x");
  p.batch = batch;
  p.dim = dim;
  p.dstate = N;
  p.n_groups = groups;
  p.dt_softplus = dt_softplus;
  p.state_batch_stride = state.stride(0);
  p.state_d_stride = state.stride(1);
  p.x_batch_stride = x_c.stride(0);
  p.dt_batch_stride = dt_c.stride(0);
  p.z_batch_stride = z_c.defined() ? z_c.stride(0) : 0;
  p.out_batch_stride = out.stride(0);
  p.B_batch_stride = B3.stride(0);
  p.B_group_stride = B3.stride(1);
  p.C_batch_stride = C3.stride(0);
  p.C_group_stride = C3.stride(1);
  p.state = state.data_ptr();
  p.x = x_c.const_data_ptr();
  p.dt = dt_c.const_data_ptr();
  p.A = A_c.const_data_ptr();
  p.B = B3.const_data_ptr();
  p.C = C3.const_data_ptr();
  p.D = D_c.defined() ? D_c.const_data_ptr() : nullptr;
  p.z = z_c.defined() ? z_c.const_data_ptr() : nullptr;
  p.dt_bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  p.dt_scale = scale_c.defined() ? scale_c.const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  launch(x, p, selective_state_update_cpu,
         [](const auto& params, void* stream) { selective_state_update_cuda(params, stream); });
  return out;
}

// On the CPU: every one of the `n_new` entries to append fits, cache_seqlens[b] + n_new <= capacity.
void check_cache_room_cpu(const at::Tensor& cache_seqlens, int64_t n_new, int64_t capacity, const char* op) {
  const int32_t* lengths = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < cache_seqlens.size(0); ++b) {
    TORCH_CHECK(lengths[b] >= 0, op, ": cache_seqlens[", b, "] = ", lengths[b], " is negative");
    TORCH_CHECK(lengths[b] <= capacity - n_new, op, ": the cache is full: batch ", b, " holds ", lengths[b],
                " entries and ", n_new, " new ones do not fit in capacity ", capacity,
                " (allocate a larger cache or evict entries)");
  }
}

// Routed attention against a key/value cache; k/v (when given) are written into the caches.
at::Tensor routed_attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
                                    const c10::optional<at::Tensor>& v,
                                    const at::Tensor& cache_seqlens, const at::Tensor& route,
                                    const c10::optional<at::Tensor>& key_mask, double scale) {
  const char* op = "routed_attention_with_kvcache";
  check_device_supported(q, op);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (batch, heads, n_new, head_dim), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must have shape (batch, kv_heads, capacity, head_dim), got ",
              k_cache.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), n_new = q.size(2), d = q.size(3);
  const int64_t kv_heads = k_cache.size(1), capacity = k_cache.size(2);
  to_dtype(q, op, "q");
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == d, op,
              ": k_cache must have shape (batch=", batch, ", kv_heads, capacity, head_dim=", d,
              "), got ", k_cache.sizes());
  check_shape(v_cache, k_cache.sizes(), op, "v_cache", "k_cache's shape (batch, kv_heads, capacity, head_dim)");
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_same_device(*t, q, op, name, "q");
    check_dtype(*t, q.scalar_type(), op, name, "the dtype of q");
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op, ": ", name,
                " must be contiguous in head_dim (it is written in place), got strides ", t->strides());
  }
  // A positive number of query heads too: with none the op would return before the append.
  TORCH_CHECK(kv_heads >= 1 && heads >= 1 && heads % kv_heads == 0, op, ": the number of key/value heads (",
              kv_heads, ") must divide the number of query heads (", heads, "), both positive");
  TORCH_CHECK(d >= 1 && d <= kAttentionMaxHeadDim, op, ": head_dim must be in [1, ",
              kAttentionMaxHeadDim, "], got ", d);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(k.has_value() == v.has_value(), op, ": k and v must be given together (the new "
              "entries to append) or both be None");
  at::Tensor k_c, v_c;
  if (k) {
    for (const auto& [t, name] : {std::pair{&*k, "k"}, std::pair{&*v, "v"}}) {
      check_same_device(*t, q, op, name, "q");
      check_dtype(*t, q.scalar_type(), op, name, "the dtype of q");
      check_shape(*t, {batch, kv_heads, n_new, d}, op, name, "(batch, kv_heads, n_new, head_dim)");
    }
    k_c = last_dim_contiguous(*k);
    v_c = last_dim_contiguous(*v);
  }
  check_same_device(cache_seqlens, q, op, "cache_seqlens", "q");
  check_dtype(cache_seqlens, at::kInt, op, "cache_seqlens", "as in flash_attn_with_kvcache");
  check_shape(cache_seqlens, {batch}, op, "cache_seqlens", "(batch,)");
  const at::Tensor seqlens = cache_seqlens.contiguous();
  // Every new entry must fit: cache_seqlens[b] + n_new <= capacity (without new entries,
  // cache_seqlens[b] <= capacity).
  const int64_t room = capacity - (k ? n_new : 0);
  if (q.is_cpu()) {
    check_cache_room_cpu(seqlens, k ? n_new : 0, capacity, op);
  } else if (batch > 0) {
    // On a GPU the lengths stay on the device: reading them would synchronise every decoding
    // step. The check is queued as a device-side assertion instead (it fails the CUDA context,
    // like an out-of-range index); the kernel skips entries past the capacity either way.
    at::_assert_async(at::logical_and(seqlens >= 0, seqlens <= room).all(),
                      "routed_attention_with_kvcache: the cache is full (cache_seqlens + n_new > "
                      "capacity) or a length is negative");
  }

  const at::Tensor route3 = checked_route(route, q, batch, heads, n_new, op, "n_new");
  const at::Tensor mask_c = checked_key_mask(key_mask, q, batch, capacity, op, "capacity");
  const at::Tensor q_c = last_dim_contiguous(q);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;

  RoutedAttentionKVCacheParams p{};
  p.dtype = to_dtype(q, op, "q");
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.seqlen_new = n_new;
  p.capacity = capacity;
  p.head_dim = d;
  p.scale = scale;
  p.q_batch_stride = q_c.stride(0);
  p.q_head_stride = q_c.stride(1);
  p.q_row_stride = q_c.stride(2);
  p.k_cache_batch_stride = k_cache.stride(0);
  p.k_cache_head_stride = k_cache.stride(1);
  p.k_cache_row_stride = k_cache.stride(2);
  p.v_cache_batch_stride = v_cache.stride(0);
  p.v_cache_head_stride = v_cache.stride(1);
  p.v_cache_row_stride = v_cache.stride(2);
  if (k) {
    p.k_new_batch_stride = k_c.stride(0);
    p.k_new_head_stride = k_c.stride(1);
    p.k_new_row_stride = k_c.stride(2);
    p.v_new_batch_stride = v_c.stride(0);
    p.v_new_head_stride = v_c.stride(1);
    p.v_new_row_stride = v_c.stride(2);
    p.k_new = k_c.const_data_ptr();
    p.v_new = v_c.const_data_ptr();
  }
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.out_row_stride = out.stride(2);
  p.route_batch_stride = route3.stride(0);
  p.route_head_stride = route3.stride(1);
  p.route_row_stride = route3.stride(2);
  p.key_mask_batch_stride = mask_c.defined() ? mask_c.stride(0) : 0;
  p.q = q_c.const_data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = seqlens.const_data_ptr<int32_t>();
  p.route = reinterpret_cast<const uint8_t*>(route3.const_data_ptr<bool>());
  p.key_mask = mask_c.defined() ? reinterpret_cast<const uint8_t*>(mask_c.const_data_ptr<bool>()) : nullptr;
  p.out = out.data_ptr();
  launch(q, p, routed_attention_kvcache_cpu,
         [](const auto& params, void* stream) { routed_attention_kvcache_cuda(params, stream); });
  return out;
}

}  // namespace
}  // namespace cram

TORCH_LIBRARY(cram_ext, m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? z, Tensor? delta_bias, Tensor? dt_scale, bool delta_softplus, "
        "Tensor? initial_state=None) -> (Tensor out, Tensor chunk_states)");
  m.def("selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? dt_scale, Tensor chunk_states, "
        "bool delta_softplus, Tensor? initial_state=None) -> (Tensor du, Tensor ddelta, Tensor dA, "
        "Tensor dB, Tensor dC, Tensor? dD, Tensor? dz, Tensor? ddelta_bias, Tensor? ddt_scale, "
        "Tensor? dinitial_state)");
  m.def("routed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor route, Tensor? key_mask, "
        "bool is_causal, float scale) -> (Tensor out, Tensor lse)");
  m.def("routed_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor route, Tensor? key_mask, bool is_causal, float scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
        "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? dt_scale, bool dt_softplus) "
        "-> Tensor");
  m.def("routed_attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, "
        "Tensor? v, Tensor cache_seqlens, Tensor route, Tensor? key_mask, float scale) -> Tensor");
}

// One implementation per op serves both devices: it checks, then launches the CPU or CUDA kernel.
namespace {
void register_kernels(torch::Library& m) {
  m.impl("selective_scan_fwd", &cram::selective_scan_fwd);
  m.impl("selective_scan_bwd", &cram::selective_scan_bwd);
  m.impl("routed_attention_fwd", &cram::routed_attention_fwd);
  m.impl("routed_attention_bwd", &cram::routed_attention_bwd);
  m.impl("selective_state_update", &cram::selective_state_update);
  m.impl("routed_attention_kvcache", &cram::routed_attention_kvcache);
}
}  // namespace

TORCH_LIBRARY_IMPL(cram_ext, CPU, m) { register_kernels(m); }
#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram_ext, CUDA, m) { register_kernels(m); }
#endif

// An importable module, so `import cram_ext._C` loads the library and registers the ops.
// It also carries the checkpoint interval, for the fake implementation's chunk_states shape, and
// the attention kernels' largest head_dim, past which routed_attention computes in PyTorch.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cram_ext kernels (ops live in torch.ops.cram_ext)";
  m.attr("SCAN_CHECKPOINT_CHUNK") = cram::kScanCheckpointChunk;
  m.attr("ATTENTION_MAX_HEAD_DIM") = cram::kAttentionMaxHeadDim;
}

// ---------------------------------------------------------------------------------------------
// Fused CRAM forward
// ---------------------------------------------------------------------------------------------

namespace cram {
namespace {

void check_weight(const at::Tensor& t, at::IntArrayRef expected, const at::Tensor& x, const char* op,
                  const char* name, const char* layout) {
  check_same_device(t, x, op, name, "x");
  check_dtype(t, x.scalar_type(), op, name, "the dtype of x");
  check_shape(t, expected, op, name, layout);
}

// A CRAM layer's weights, as the fused forward and its one-token step take them.
struct CramLayerWeights {
  const at::Tensor &in_proj, &x_proj, &dt_proj, &A, &D, &dt_bias, &out_proj;
  const at::Tensor &router_w1, &router_b1, &router_w2, &router_b2, &qkv, &attn_out;
  const c10::optional<at::Tensor> &semantic_down, &semantic_down_bias, &semantic_up, &semantic_up_bias;
};

// The sizes the weights imply, each weight checked against x (device, dtype) and the others.
struct CramLayerSizes {
  int64_t d, d_inner, dt_rank, N, hidden, n_paths, n_heads, head_dim, kv_heads, kv_dim;
  bool semantic;
};

CramLayerSizes check_layer_weights(const CramLayerWeights& w, const at::Tensor& x, int64_t d,
                                   int64_t n_heads, const char* op) {
  TORCH_CHECK(d >= 1, op, ": d_model (the last dimension of x) must be positive, got ", d);
  CramLayerSizes s{};
  s.d = d;
  const auto acc = accumulation_type(x.scalar_type());
  const char* acc_why = x.scalar_type() == at::kDouble ? "float64 like x" : "float32 parameters";
  TORCH_CHECK(w.in_proj.dim() == 2 && w.in_proj.size(0) % 2 == 0, op,
              ": in_proj_weight must have shape (2 * d_inner, d_model), got ", w.in_proj.sizes());
  s.d_inner = w.in_proj.size(0) / 2;
  check_weight(w.in_proj, {2 * s.d_inner, d}, x, op, "in_proj_weight", "(2 * d_inner, d_model)");
  TORCH_CHECK(w.dt_proj.dim() == 2, op, ": dt_proj_weight must have shape (d_inner, dt_rank), got ",
              w.dt_proj.sizes());
  s.dt_rank = w.dt_proj.size(1);
  check_weight(w.dt_proj, {s.d_inner, s.dt_rank}, x, op, "dt_proj_weight", "(d_inner, dt_rank)");
  TORCH_CHECK(w.A.dim() == 2 && w.A.size(0) == s.d_inner, op, ": A must have shape (d_inner, N) = (",
              s.d_inner, ", N), got ", w.A.sizes());
  s.N = w.A.size(1);
  TORCH_CHECK(s.N >= 1 && s.N <= kScanMaxDState, op, ": the state size N = A.size(1) must be in [1, ",
              kScanMaxDState, "], got ", s.N);
  check_same_device(w.A, x, op, "A", "x");
  check_dtype(w.A, acc, op, "A", acc_why);
  check_weight(w.x_proj, {s.dt_rank + 2 * s.N, s.d_inner}, x, op, "x_proj_weight",
               "(dt_rank + 2 * N, d_inner)");
  check_weight(w.out_proj, {d, s.d_inner}, x, op, "out_proj_weight", "(d_model, d_inner)");
  const std::pair<const at::Tensor*, const char*> per_channel[] = {{&w.D, "D"}, {&w.dt_bias, "dt_bias"}};
  for (const auto& [t, name] : per_channel) {
    check_same_device(*t, x, op, name, "x");
    check_dtype(*t, acc, op, name, acc_why);
    check_shape(*t, {s.d_inner}, op, name, "(d_inner,)");
  }

  TORCH_CHECK(w.router_w1.dim() == 2, op, ": router_w1 must have shape (hidden, d_model + 3), got ",
              w.router_w1.sizes());
  s.hidden = w.router_w1.size(0);
  check_weight(w.router_w1, {s.hidden, d + 3}, x, op, "router_w1", "(hidden, d_model + 3)");
  check_weight(w.router_b1, {s.hidden}, x, op, "router_b1", "(hidden,)");
  TORCH_CHECK(w.router_w2.dim() == 2 && (w.router_w2.size(0) == 2 || w.router_w2.size(0) == 3), op,
              ": router_w2 must have shape (paths, hidden) with 2 or 3 paths, got ", w.router_w2.sizes());
  s.n_paths = w.router_w2.size(0);
  check_weight(w.router_w2, {s.n_paths, s.hidden}, x, op, "router_w2", "(paths, hidden)");
  check_weight(w.router_b2, {s.n_paths}, x, op, "router_b2", "(paths,)");

  TORCH_CHECK(n_heads >= 1 && d % n_heads == 0, op, ": n_heads (", n_heads,
              ") must be positive and divide d_model (", d, ")");
  s.n_heads = n_heads;
  s.head_dim = d / n_heads;
  TORCH_CHECK(s.head_dim <= kAttentionMaxHeadDim, op, ": head_dim = d_model / n_heads must be at most ",
              kAttentionMaxHeadDim, ", got ", s.head_dim);
  TORCH_CHECK(w.qkv.dim() == 2 && w.qkv.size(0) > d && (w.qkv.size(0) - d) % (2 * s.head_dim) == 0,
              op, ": qkv_weight must have shape (d_model + 2 * kv_heads * head_dim, d_model), got ",
              w.qkv.sizes());
  s.kv_heads = (w.qkv.size(0) - d) / (2 * s.head_dim);
  s.kv_dim = s.kv_heads * s.head_dim;
  TORCH_CHECK(n_heads % s.kv_heads == 0, op, ": the number of key/value heads (", s.kv_heads,
              ") must divide n_heads (", n_heads, ")");
  check_weight(w.qkv, {d + 2 * s.kv_dim, d}, x, op, "qkv_weight",
               "(d_model + 2 * kv_heads * head_dim, d_model)");
  check_weight(w.attn_out, {d, d}, x, op, "attn_out_weight", "(d_model, d_model)");

  s.semantic = s.n_paths == 3;
  const std::pair<const c10::optional<at::Tensor>*, const char*> adapter[] = {
      {&w.semantic_down, "semantic_down_weight"}, {&w.semantic_down_bias, "semantic_down_bias"},
      {&w.semantic_up, "semantic_up_weight"}, {&w.semantic_up_bias, "semantic_up_bias"}};
  for (const auto& [t, name] : adapter)
    TORCH_CHECK(t->has_value() == s.semantic, op, ": ", name,
                s.semantic ? " is required: the router has a semantic path (3 paths)"
                           : " must be None: the router has no semantic path (2 paths)");
  if (s.semantic) {
    TORCH_CHECK(w.semantic_down->dim() == 2, op,
                ": semantic_down_weight must have shape (rank, d_model), got ", w.semantic_down->sizes());
    const int64_t rank = w.semantic_down->size(0);
    check_weight(*w.semantic_down, {rank, d}, x, op, "semantic_down_weight", "(rank, d_model)");
    check_weight(*w.semantic_down_bias, {rank}, x, op, "semantic_down_bias", "(rank,)");
    check_weight(*w.semantic_up, {d, rank}, x, op, "semantic_up_weight", "(d_model, rank)");
    check_weight(*w.semantic_up_bias, {d}, x, op, "semantic_up_bias", "(d_model,)");
  }
  return s;
}

// The router's decision for a (batch, L) grid of tokens (cram_forward.h), and the rows of each path.
struct Routing {
  at::Tensor predicted, scores, path, route, episodic_rows, episodic_count, semantic_rows, semantic_count;
};

// x_flat (batch·L, d_model); working_out (batch, L, d_model) with a unit last stride; gap, q_hat
// and forced_path (batch, L).
Routing route_tokens(const CramLayerWeights& w, const CramLayerSizes& s, const at::Tensor& x_flat,
                     const at::Tensor& working_out, const at::Tensor& gap,
                     const c10::optional<at::Tensor>& q_hat, const c10::optional<at::Tensor>& forced_path,
                     int64_t batch, int64_t L, double episodic_price, double semantic_reward,
                     const char* op) {
  const int64_t n_tokens = batch * L, d = s.d;
  // In the accumulation type (cram_forward.h): 16-bit inputs widened, float32/float64 as they are.
  const auto acc = accumulation_type(x_flat.scalar_type());
  const at::Tensor hidden_x =
      at::addmm(w.router_b1.to(acc), x_flat.to(acc), w.router_w1.narrow(1, 0, d).t().to(acc));
  const at::Tensor w_state = w.router_w1.narrow(1, d, 3).t().contiguous();   // (3, hidden)
  const at::Tensor gap_c = gap.contiguous(), w2 = w.router_w2.contiguous(), b2 = w.router_b2.contiguous();
  const at::Tensor q_hat_c = contiguous_or_none(q_hat), forced_c = contiguous_or_none(forced_path);
  const auto options = x_flat.options();
  Routing r;
  r.predicted = at::empty({batch, L, s.n_paths}, options);
  r.scores = at::empty({batch, L, s.n_paths}, options);
  r.path = at::empty({batch, L}, options.dtype(at::kLong));
  r.route = at::empty({batch, L}, options.dtype(at::kBool));
  r.episodic_rows = at::empty({n_tokens}, options.dtype(at::kLong));
  r.semantic_rows = at::empty({n_tokens}, options.dtype(at::kLong));
  r.episodic_count = at::zeros({}, options.dtype(at::kLong));
  r.semantic_count = at::zeros({}, options.dtype(at::kLong));
  CramRouterParams p;
  p.dtype = to_dtype(x_flat, op, "x");
  p.batch = batch;
  p.seqlen = L;
  p.d_model = d;
  p.hidden = s.hidden;
  p.n_paths = s.n_paths;
  p.episodic_price = episodic_price;
  p.semantic_reward = semantic_reward;
  p.hidden_x_batch_stride = L * hidden_x.stride(0);
  p.hidden_x_row_stride = hidden_x.stride(0);
  p.working_out_batch_stride = working_out.stride(0);
  p.working_out_row_stride = working_out.stride(1);
  p.hidden_x = hidden_x.const_data_ptr();
  p.working_out = working_out.const_data_ptr();
  p.gap = gap_c.const_data_ptr();
  p.q_hat = q_hat_c.defined() ? q_hat_c.const_data_ptr() : nullptr;
  p.w_state = w_state.const_data_ptr();
  p.w_out = w2.const_data_ptr();
  p.b_out = b2.const_data_ptr();
  p.forced_path = forced_c.defined() ? forced_c.const_data_ptr<int64_t>() : nullptr;
  p.predicted = r.predicted.data_ptr();
  p.scores = r.scores.data_ptr();
  p.path = r.path.data_ptr<int64_t>();
  p.route = reinterpret_cast<uint8_t*>(r.route.data_ptr<bool>());
  p.episodic_rows = r.episodic_rows.data_ptr<int64_t>();
  p.episodic_count = r.episodic_count.data_ptr<int64_t>();
  p.semantic_rows = r.semantic_rows.data_ptr<int64_t>();
  p.semantic_count = r.semantic_count.data_ptr<int64_t>();
  if (n_tokens > 0)
    launch(x_flat, p, cram_router_cpu,
           [](const auto& params, void* stream) { cram_router_cuda(params, stream); });
  return r;
}

// Rows of a path, for the stages that run only on them. On the CPU the counts the router just
// wrote are ordinary host memory, so the GEMMs gather exactly those rows. On a CUDA device
// reading them would stall the host; there the q projection and the two small output GEMMs run
// over every row (attention_out is 0 off the route, the adapter's output is masked), so the
// whole op stays asynchronous. Attention itself runs only for the routed rows on both.
at::Tensor rows_of(const at::Tensor& rows, const at::Tensor& count) {
  return rows.narrow(0, 0, *count.const_data_ptr<int64_t>());
}

// The queries (batch·L, d_model) for routed attention. On the CPU only the episodic rows are
// written: the attention kernel gathers exactly the routed rows, so the others are never read
// (zeroing them would cost a pass over a tensor the size of x).
at::Tensor episodic_queries(const CramLayerWeights& w, const CramLayerSizes& s, const at::Tensor& x_flat,
                            const Routing& r) {
  const at::Tensor w_q = w.qkv.narrow(0, 0, s.d);
  if (!x_flat.is_cpu()) return at::matmul(x_flat, w_q.t());
  const at::Tensor attended = rows_of(r.episodic_rows, r.episodic_count);
  at::Tensor q_flat = at::empty({x_flat.size(0), s.d}, x_flat.options());
  if (attended.numel() > 0)
    q_flat.index_copy_(0, attended, at::matmul(x_flat.index_select(0, attended), w_q.t()));
  return q_flat;
}

// Keys and values (batch·L, 2·kv_dim). On the CPU, with a key_mask sparse enough that routed
// attention reads only the kept rows (kAttentionSparseKeysShare), only those are computed and the
// others are left unwritten: an episodic buffer of written entries keeps a few percent of the
// tokens.
at::Tensor episodic_keys_values(const CramLayerWeights& w, const CramLayerSizes& s, const at::Tensor& x_flat,
                                const c10::optional<at::Tensor>& key_mask) {
  const at::Tensor w_kv = w.qkv.narrow(0, s.d, 2 * s.kv_dim);
  if (!x_flat.is_cpu() || !key_mask) return at::matmul(x_flat, w_kv.t());
  const at::Tensor kept = key_mask->flatten().nonzero().squeeze(1);
  if (!attention_reads_only_kept_keys(kept.numel(), key_mask->numel())) return at::matmul(x_flat, w_kv.t());
  at::Tensor kv = at::empty({x_flat.size(0), 2 * s.kv_dim}, x_flat.options());
  if (kept.numel() > 0) kv.index_copy_(0, kept, at::matmul(x_flat.index_select(0, kept), w_kv.t()));
  return kv;
}

// out_flat += 1[episodic]·W_o attention + 1[semantic]·f_sem(x), each over its path's rows.
void add_taken_paths(const CramLayerWeights& w, const CramLayerSizes& s, at::Tensor& out_flat,
                     const at::Tensor& x_flat, const at::Tensor& attention_flat, const Routing& r) {
  const bool gather_rows = x_flat.is_cpu();
  if (gather_rows) {
    const at::Tensor attended = rows_of(r.episodic_rows, r.episodic_count);
    if (attended.numel() > 0)
      out_flat.index_add_(0, attended, at::matmul(attention_flat.index_select(0, attended), w.attn_out.t()));
  } else {
    out_flat.addmm_(attention_flat, w.attn_out.t());
  }
  if (!s.semantic) return;
  if (gather_rows) {
    const at::Tensor recalled = rows_of(r.semantic_rows, r.semantic_count);
    if (recalled.numel() == 0) return;
    const at::Tensor h = at::relu(at::addmm(*w.semantic_down_bias, x_flat.index_select(0, recalled),
                                            w.semantic_down->t()));
    out_flat.index_add_(0, recalled, at::addmm(*w.semantic_up_bias, h, w.semantic_up->t()));
  } else {
    const at::Tensor h = at::relu(at::addmm(*w.semantic_down_bias, x_flat, w.semantic_down->t()));
    const at::Tensor f_sem = at::addmm(*w.semantic_up_bias, h, w.semantic_up->t());
    // Selected, not multiplied by a 0/1 mask: an overflowing f_sem must not make other rows NaN.
    out_flat.add_(at::where(r.path.view({out_flat.size(0), 1}).eq(kPathSemantic), f_sem, 0));
  }
}

// One CRAM layer's mixed path output, out_t = W_out·scan(x)_t + 1[episodic]·attention_t +
// 1[semantic]·f_sem(x_t), with the router's decision taken in between. The plain GEMMs are ATen
// calls; the scan, the router epilogue (with the row compaction) and the attention are kernels.
// Returns (out, path, attention_rows, predicted_loss, scores) and what the backward needs
// (scan_out, chunk_states, attention_out, lse, route).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
cram_forward_fwd(const at::Tensor& x, const at::Tensor& gap, const at::Tensor& in_proj_weight,
                 const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight, const at::Tensor& A,
                 const at::Tensor& D, const at::Tensor& dt_bias, const at::Tensor& out_proj_weight,
                 const at::Tensor& router_w1, const at::Tensor& router_b1,
                 const at::Tensor& router_w2, const at::Tensor& router_b2,
                 const at::Tensor& qkv_weight, const at::Tensor& attn_out_weight,
                 const c10::optional<at::Tensor>& semantic_down_weight,
                 const c10::optional<at::Tensor>& semantic_down_bias,
                 const c10::optional<at::Tensor>& semantic_up_weight,
                 const c10::optional<at::Tensor>& semantic_up_bias,
                 const c10::optional<at::Tensor>& q_hat, const c10::optional<at::Tensor>& key_mask,
                 const c10::optional<at::Tensor>& forced_path, int64_t n_heads,
                 double episodic_price, double semantic_reward) {
  const char* op = "cram_forward";
  check_device_supported(x, op);
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (batch, L, d_model), got ", x.sizes());
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2), n_tokens = batch * L;
  to_dtype(x, op, "x");
  const auto acc = accumulation_type(x.scalar_type());
  check_weight(gap, {batch, L}, x, op, "gap", "(batch, L)");
  const CramLayerWeights w{in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                           out_proj_weight, router_w1, router_b1, router_w2, router_b2, qkv_weight,
                           attn_out_weight, semantic_down_weight, semantic_down_bias,
                           semantic_up_weight, semantic_up_bias};
  const CramLayerSizes s = check_layer_weights(w, x, d, n_heads, op);
  const int64_t d_inner = s.d_inner, dt_rank = s.dt_rank, N = s.N;
  if (q_hat) check_weight(*q_hat, {batch, L}, x, op, "q_hat", "(batch, L)");
  if (key_mask) {
    check_same_device(*key_mask, x, op, "key_mask", "x");
    check_dtype(*key_mask, at::kBool, op, "key_mask", "the keys that exist");
    check_shape(*key_mask, {batch, L}, op, "key_mask", "(batch, L)");
  }
  if (forced_path) {
    check_same_device(*forced_path, x, op, "forced_path", "x");
    check_dtype(*forced_path, at::kLong, op, "forced_path", "a path index per token, -1 where not forced");
    check_shape(*forced_path, {batch, L}, op, "forced_path", "(batch, L)");
    // Values are checked where that costs no device synchronisation.
    TORCH_CHECK(!forced_path->is_cpu() || (forced_path->lt(-1) | forced_path->ge(s.n_paths)).any().item<bool>() == false,
                op, ": forced_path entries must be -1 (not forced) or a path index in [0, ", s.n_paths, ")");
  }
  TORCH_CHECK(std::isfinite(episodic_price) && std::isfinite(semantic_reward), op,
              ": episodic_price and semantic_reward must be finite, got ", episodic_price, " and ",
              semantic_reward);

  const at::Tensor xc = x.contiguous();
  const at::Tensor x_flat = xc.view({n_tokens, d});
  // Working memory. The GEMMs run channel-major, W · x_flatᵀ = (channels, batch·L), which read
  // as (batch, channels, L) with a unit L stride are the scan's layout with no transpose copies.
  auto as_sequence = [&](const at::Tensor& channels_by_tokens) {
    return channels_by_tokens.view({channels_by_tokens.size(0), batch, L}).permute({1, 0, 2});
  };
  const at::Tensor scan_channels = at::empty({d_inner, n_tokens}, x.options());
  const at::Tensor scan_out = as_sequence(scan_channels);                    // (batch, d_inner, L)
  at::Tensor chunk_states = at::zeros({batch, d_inner, scan_checkpoint_count(L), N}, x.options().dtype(acc));
  {  // The scan's inputs (the largest tensors of the op) are freed before the next stages allocate.
    const at::Tensor xz = at::mm(in_proj_weight, x_flat.t());                  // (2·d_inner, tokens)
    const at::Tensor u = xz.narrow(0, 0, d_inner);
    const at::Tensor x_dbl = at::mm(x_proj_weight, u);                         // (R + 2N, tokens)
    const at::Tensor delta = at::mm(dt_proj_weight, x_dbl.narrow(0, 0, dt_rank));
    const at::Tensor dt_scale = at::log1p(gap).to(acc).contiguous();
    ScanInputs scan = check_scan_inputs(
        as_sequence(u), as_sequence(delta), A, as_sequence(x_dbl.narrow(0, dt_rank, N)),
        as_sequence(x_dbl.narrow(0, dt_rank + N, N)), D, as_sequence(xz.narrow(0, d_inner, d_inner)),
        dt_bias, dt_scale);
    if (n_tokens > 0 && d_inner > 0) {
      SelectiveScanParams p;
      fill_scan_params(p, scan, /*delta_softplus=*/true, scan_out, chunk_states);
      launch(x, p, selective_scan_fwd_cpu,
             [](const auto& params, void* stream) { selective_scan_fwd_cuda(params, stream); });
    }
  }

  // The router reads ‖W_out y_t‖, a reduction over every channel of the scan: the scan output
  // goes to memory once, the GEMM reads it, and the router runs as the epilogue of that stage
  // (one kernel over the GEMM's output rows, which then accumulate the other paths in place).
  at::Tensor out = at::mm(scan_channels.t(), out_proj_weight.t()).view({batch, L, d});
  at::Tensor out_flat = out.view({n_tokens, d});
  const Routing r = route_tokens(w, s, x_flat, out, gap, q_hat, forced_path, batch, L,
                                 episodic_price, semantic_reward, op);

  const at::Tensor kv = episodic_keys_values(w, s, x_flat, key_mask);  // (tokens, 2·kv_dim)
  const at::Tensor k = kv.narrow(1, 0, s.kv_dim).view({batch, L, s.kv_heads, s.head_dim}).transpose(1, 2);
  const at::Tensor v = kv.narrow(1, s.kv_dim, s.kv_dim).view({batch, L, s.kv_heads, s.head_dim}).transpose(1, 2);
  const at::Tensor q = episodic_queries(w, s, x_flat, r).view({batch, L, n_heads, s.head_dim}).transpose(1, 2);
  at::Tensor attention_out = at::empty({batch, L, d}, x.options());
  at::Tensor lse = at::empty({batch, n_heads, L}, x.options().dtype(acc));
  const at::Tensor attention_heads = attention_out.view({batch, L, n_heads, s.head_dim}).transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  if (n_tokens > 0) {
    AttentionInputs in = check_attention_inputs(q, k, v, r.route, key_mask, scale);
    RoutedAttentionParams p;
    fill_attention_params(p, in, /*is_causal=*/true, scale, attention_heads, lse);
    launch(x, p, routed_attention_fwd_cpu, [&x](const auto& params, void* stream) {
      routed_attention_fwd_cuda(params, attention_cuda_workspace(x, params).data_ptr(), stream);
    });
  }
  add_taken_paths(w, s, out_flat, x_flat, attention_out.view({n_tokens, d}), r);
  return {out, r.path, r.episodic_count, r.predicted, r.scores, scan_out, chunk_states, attention_out,
          lse, r.route};
}

// cram_step on the CPU: one kernel for the whole step (cram_forward.h, CramStepParams), its
// inputs checked by cram_step. Returns what cram_step returns.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cram_step_on_cpu(const CramLayerWeights& w, const CramLayerSizes& s, const at::Tensor& x,
                 const at::Tensor& gap, const at::Tensor& state, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                 const c10::optional<at::Tensor>& q_hat, const c10::optional<at::Tensor>& key_mask,
                 double episodic_price, double semantic_reward) {
  const char* op = "cram_step";
  const int64_t batch = x.size(0), d = s.d, capacity = k_cache.size(2);
  const at::Tensor seqlens = cache_seqlens.contiguous();
  check_cache_room_cpu(seqlens, 1, capacity, op);
  // Held for the call: contiguous() returns the tensor itself when it already is.
  const at::Tensor x_c = x.contiguous(), gap_c = gap.contiguous();
  const at::Tensor q_hat_c = contiguous_or_none(q_hat), mask_c = contiguous_or_none(key_mask);
  const at::Tensor weights[] = {w.in_proj.contiguous(), w.x_proj.contiguous(), w.dt_proj.contiguous(),
                                w.A.contiguous(), w.D.contiguous(), w.dt_bias.contiguous(),
                                w.out_proj.contiguous(), w.router_w1.contiguous(), w.router_b1.contiguous(),
                                w.router_w2.contiguous(), w.router_b2.contiguous(), w.qkv.contiguous(),
                                w.attn_out.contiguous()};
  const at::Tensor adapter[] = {contiguous_or_none(w.semantic_down), contiguous_or_none(w.semantic_down_bias),
                                contiguous_or_none(w.semantic_up), contiguous_or_none(w.semantic_up_bias)};
  const auto options = x.options();
  at::Tensor out = at::empty({batch, d}, options), attention_out = at::empty({batch, d}, options);
  at::Tensor path = at::empty({batch}, options.dtype(at::kLong));
  at::Tensor predicted = at::empty({batch, s.n_paths}, options), scores = at::empty({batch, s.n_paths}, options);
  if (batch == 0) return {out, path, predicted, scores, attention_out};

  CramStepParams p{};
  p.dtype = to_dtype(x, op, "x");
  p.batch = batch;
  p.d_model = d;
  p.d_inner = s.d_inner;
  p.dt_rank = s.dt_rank;
  p.dstate = s.N;
  p.hidden = s.hidden;
  p.n_paths = s.n_paths;
  p.heads = s.n_heads;
  p.kv_heads = s.kv_heads;
  p.head_dim = s.head_dim;
  p.capacity = capacity;
  p.rank = adapter[0].defined() ? adapter[0].size(0) : 0;
  p.episodic_price = episodic_price;
  p.semantic_reward = semantic_reward;
  p.scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  p.state_batch_stride = state.stride(0);
  p.state_d_stride = state.stride(1);
  p.cache_batch_stride = k_cache.stride(0);
  p.cache_head_stride = k_cache.stride(1);
  p.cache_row_stride = k_cache.stride(2);
  p.key_mask_batch_stride = mask_c.defined() ? mask_c.stride(0) : 0;
  p.x = x_c.const_data_ptr();
  p.gap = gap_c.const_data_ptr();
  p.q_hat = q_hat_c.defined() ? q_hat_c.const_data_ptr() : nullptr;
  p.state = state.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = seqlens.const_data_ptr<int32_t>();
  p.key_mask = mask_c.defined() ? reinterpret_cast<const uint8_t*>(mask_c.const_data_ptr<bool>()) : nullptr;
  const void** weight_ptrs[] = {&p.in_proj, &p.x_proj, &p.dt_proj, &p.A, &p.D, &p.dt_bias, &p.out_proj,
                                &p.router_w1, &p.router_b1, &p.router_w2, &p.router_b2, &p.qkv, &p.attn_out};
  for (size_t i = 0; i < std::size(weights); ++i) *weight_ptrs[i] = weights[i].const_data_ptr();
  const void** adapter_ptrs[] = {&p.semantic_down, &p.semantic_down_bias, &p.semantic_up, &p.semantic_up_bias};
  for (size_t i = 0; i < std::size(adapter); ++i)
    *adapter_ptrs[i] = adapter[i].defined() ? adapter[i].const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.path = path.data_ptr<int64_t>();
  p.predicted = predicted.data_ptr();
  p.scores = scores.data_ptr();
  p.attention_out = attention_out.data_ptr();
  cram_step_cpu(p);
  return {out, path, predicted, scores, attention_out};
}

// One token per stream of `cram_forward`, continuing the streams: the scan advances `state`
// (selective_state_update) and the routed rows attend over the key/value cache, into which
// every stream's new key and value are written at cache_seqlens (routed_attention_kvcache).
// The caller keeps the cache's lengths and key_mask, as for routed_attention_with_kvcache.
// Returns (out, path, predicted_loss, scores, attention_out), each without the length dimension.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cram_step(const at::Tensor& x, const at::Tensor& gap, const at::Tensor& state,
          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
          const at::Tensor& in_proj_weight, const at::Tensor& x_proj_weight,
          const at::Tensor& dt_proj_weight, const at::Tensor& A, const at::Tensor& D,
          const at::Tensor& dt_bias, const at::Tensor& out_proj_weight, const at::Tensor& router_w1,
          const at::Tensor& router_b1, const at::Tensor& router_w2, const at::Tensor& router_b2,
          const at::Tensor& qkv_weight, const at::Tensor& attn_out_weight,
          const c10::optional<at::Tensor>& semantic_down_weight,
          const c10::optional<at::Tensor>& semantic_down_bias,
          const c10::optional<at::Tensor>& semantic_up_weight,
          const c10::optional<at::Tensor>& semantic_up_bias, const c10::optional<at::Tensor>& q_hat,
          const c10::optional<at::Tensor>& key_mask, int64_t n_heads, double episodic_price,
          double semantic_reward) {
  const char* op = "cram_step";
  check_device_supported(x, op);
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (batch, d_model) (one token per stream), got ",
              x.sizes());
  const int64_t batch = x.size(0), d = x.size(1);
  to_dtype(x, op, "x");
  check_weight(gap, {batch}, x, op, "gap", "(batch,)");
  const CramLayerWeights w{in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                           out_proj_weight, router_w1, router_b1, router_w2, router_b2, qkv_weight,
                           attn_out_weight, semantic_down_weight, semantic_down_bias,
                           semantic_up_weight, semantic_up_bias};
  const CramLayerSizes s = check_layer_weights(w, x, d, n_heads, op);
  if (q_hat) check_weight(*q_hat, {batch}, x, op, "q_hat", "(batch,)");
  check_scan_state(state, x, {batch, s.d_inner, s.N}, "(batch, d_inner, N)", op);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == batch && k_cache.size(1) == s.kv_heads &&
                  k_cache.size(3) == s.head_dim,
              op, ": k_cache must have shape (batch=", batch, ", kv_heads=", s.kv_heads,
              ", capacity, head_dim=", s.head_dim, "), got ", k_cache.sizes());
  const int64_t capacity = k_cache.size(2);
  check_shape(v_cache, k_cache.sizes(), op, "v_cache", "k_cache's shape (batch, kv_heads, capacity, head_dim)");
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_same_device(*t, x, op, name, "x");
    check_dtype(*t, x.scalar_type(), op, name, "the dtype of x");
    TORCH_CHECK(t->stride(3) == 1, op, ": ", name,
                " must be contiguous in head_dim (it is written in place), got strides ", t->strides());
  }
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), op, ": k_cache and v_cache must have the same "
              "strides, got ", k_cache.strides(), " and ", v_cache.strides());
  check_same_device(cache_seqlens, x, op, "cache_seqlens", "x");
  check_dtype(cache_seqlens, at::kInt, op, "cache_seqlens", "as in flash_attn_with_kvcache");
  check_shape(cache_seqlens, {batch}, op, "cache_seqlens", "(batch,)");
  if (key_mask) {
    check_same_device(*key_mask, x, op, "key_mask", "x");
    check_dtype(*key_mask, at::kBool, op, "key_mask", "the cache slots that are keys");
    check_shape(*key_mask, {batch, capacity}, op, "key_mask", "(batch, capacity)");
  }
  TORCH_CHECK(std::isfinite(episodic_price) && std::isfinite(semantic_reward), op,
              ": episodic_price and semantic_reward must be finite, got ", episodic_price, " and ",
              semantic_reward);

  if (x.is_cpu()) return cram_step_on_cpu(w, s, x, gap, state, k_cache, v_cache, cache_seqlens, q_hat,
                                          key_mask, episodic_price, semantic_reward);

  // On a CUDA device: the composition of the separate ops' kernels, asynchronous throughout (so
  // a decoding loop can be captured in a CUDA graph, which removes its launch cost).
  const at::Tensor x_c = x.contiguous();
  const at::Tensor xz = at::mm(x_c, in_proj_weight.t());                     // (batch, 2·d_inner)
  const at::Tensor x_dbl = at::mm(xz.narrow(1, 0, s.d_inner), x_proj_weight.t());  // (batch, R + 2N)
  const at::Tensor y = selective_state_update(
      state, xz.narrow(1, 0, s.d_inner), at::mm(x_dbl.narrow(1, 0, s.dt_rank), dt_proj_weight.t()), A,
      x_dbl.narrow(1, s.dt_rank, s.N), x_dbl.narrow(1, s.dt_rank + s.N, s.N), D,
      xz.narrow(1, s.d_inner, s.d_inner), dt_bias, at::log1p(gap).to(accumulation_type(x.scalar_type())),
      /*dt_softplus=*/true);
  at::Tensor out = at::mm(y, out_proj_weight.t());                          // (batch, d_model)
  const Routing r = route_tokens(w, s, x_c, out.view({batch, 1, d}), gap.view({batch, 1}),
                                 q_hat ? c10::optional<at::Tensor>(q_hat->view({batch, 1})) : c10::nullopt,
                                 c10::nullopt, batch, 1, episodic_price, semantic_reward, op);

  const at::Tensor kv = at::mm(x_c, qkv_weight.narrow(0, d, 2 * s.kv_dim).t());  // (batch, 2·kv_dim)
  const at::Tensor attention = routed_attention_kvcache(
      episodic_queries(w, s, x_c, r).view({batch, n_heads, 1, s.head_dim}), k_cache, v_cache,
      kv.narrow(1, 0, s.kv_dim).view({batch, s.kv_heads, 1, s.head_dim}),
      kv.narrow(1, s.kv_dim, s.kv_dim).view({batch, s.kv_heads, 1, s.head_dim}), cache_seqlens,
      r.route, key_mask, 1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  const at::Tensor attention_out = attention.view({batch, d});
  add_taken_paths(w, s, out, x_c, attention_out, r);
  return {out, r.path.view({batch}), r.predicted.view({batch, s.n_paths}),
          r.scores.view({batch, s.n_paths}), attention_out};
}

}  // namespace
}  // namespace cram

TORCH_LIBRARY_FRAGMENT(cram_ext, m) {
  m.def("cram_forward_fwd(Tensor x, Tensor gap, Tensor in_proj_weight, Tensor x_proj_weight, "
        "Tensor dt_proj_weight, Tensor A, Tensor D, Tensor dt_bias, Tensor out_proj_weight, "
        "Tensor router_w1, Tensor router_b1, Tensor router_w2, Tensor router_b2, Tensor qkv_weight, "
        "Tensor attn_out_weight, Tensor? semantic_down_weight, Tensor? semantic_down_bias, "
        "Tensor? semantic_up_weight, Tensor? semantic_up_bias, Tensor? q_hat, Tensor? key_mask, "
        "Tensor? forced_path, int n_heads, float episodic_price, float semantic_reward) "
        "-> (Tensor out, Tensor path, Tensor attention_rows, Tensor predicted_loss, Tensor scores, "
        "Tensor scan_out, Tensor chunk_states, Tensor attention_out, Tensor lse, Tensor route)");
}
TORCH_LIBRARY_FRAGMENT(cram_ext, m) {
  m.def("cram_step(Tensor x, Tensor gap, Tensor(a!) state, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor cache_seqlens, Tensor in_proj_weight, Tensor x_proj_weight, Tensor dt_proj_weight, "
        "Tensor A, Tensor D, Tensor dt_bias, Tensor out_proj_weight, Tensor router_w1, "
        "Tensor router_b1, Tensor router_w2, Tensor router_b2, Tensor qkv_weight, "
        "Tensor attn_out_weight, Tensor? semantic_down_weight, Tensor? semantic_down_bias, "
        "Tensor? semantic_up_weight, Tensor? semantic_up_bias, Tensor? q_hat, Tensor? key_mask, "
        "int n_heads, float episodic_price, float semantic_reward) "
        "-> (Tensor out, Tensor path, Tensor predicted_loss, Tensor scores, Tensor attention_out)");
}
namespace {
void register_fused_kernels(torch::Library& m) {
  m.impl("cram_forward_fwd", &cram::cram_forward_fwd);
  m.impl("cram_step", &cram::cram_step);
}
}  // namespace
TORCH_LIBRARY_IMPL(cram_ext, CPU, m) { register_fused_kernels(m); }
#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram_ext, CUDA, m) { register_fused_kernels(m); }
#endif
