// The selective scan's CUDA launchers, run by the SIMT emulator, against their CPU twins:
// selective_scan_fwd_cuda (out, chunk_states), selective_scan_bwd_cuda (every gradient) and
// selective_state_update_cuda (out, state), for float32, float64, float16 and bfloat16.
//
// float32 / float64 runs are compared with the CPU twin directly. A 16-bit run is compared, as
// the CPU twin's 16-bit run is, with the CPU twin in float64 on the same (rounded) inputs: the
// CUDA error may be at most kErrorFactor times the CPU twin's own error plus a small atol.
//
// Inputs and outputs live in padded, aligned storage where the case asks for it: every padding
// element holds a NaN sentinel that must survive (no write outside a row), and rows start on or
// off 16-byte boundaries so that both the vector and the scalar loads / stores run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "selective_scan/selective_scan.h"
#include "tests/test_util.h"

using namespace cram;
using cram_test::dtype_of;
using cram_test::max_abs;
using cram_test::max_abs_error;

namespace {

// FlashAttention's rule allows the fused kernel 2x the reference implementation's error; here
// both sides accumulate in float32 but in different orders (warp-tree scans and block atomics
// against sequential lanes) and with different exp implementations, so 3x: an indexing or
// conversion bug still shows as an error of the order of the 16-bit epsilon or more.
constexpr double kErrorFactor = 3.0;

template <typename T> double to_double(T x) { return double(to_float(x)); }
template <typename T> T from_double(double x) { return from_float<T>(x); }
// x as the nearest value of storage type T.
template <typename T> double round_to(double x) { return to_double(from_double<T>(x)); }

// How the non-contiguous dimensions of a tensor are laid out.
enum class Padding {
  kNone,     // contiguous
  kOdd,      // every outer stride 3 elements longer than its extent: rows off 16-byte boundaries
  kAligned,  // every outer stride rounded up to 16 elements, plus 16: rows on 16-byte boundaries
};

// Storage offsets of a tensor's logical elements (row-major); the last dimension is contiguous.
struct Layout {
  std::vector<int64_t> sizes, strides, offsets;
  int64_t storage = 0;

  Layout(std::vector<int64_t> sizes_, Padding padding) : sizes(std::move(sizes_)), strides(sizes.size()) {
    int64_t extent = 1;  // elements spanned by one index of the dimension being laid out
    for (int k = int(sizes.size()) - 1; k >= 0; --k) {
      strides[k] = extent;
      int64_t span = sizes[k] * extent;
      if (k > 0 && padding == Padding::kOdd) span += 3;
      if (k > 0 && padding == Padding::kAligned) span = (span + 15) / 16 * 16 + 16;
      extent = span;
    }
    storage = std::max<int64_t>(extent, 1);
    offsets.push_back(0);
    for (int k = int(sizes.size()) - 1; k >= 0; --k) {
      std::vector<int64_t> next;
      next.reserve(offsets.size() * sizes[k]);
      // offsets holds the inner dimensions' offsets; prepend dimension k.
      for (int64_t i = 0; i < sizes[k]; ++i)
        for (int64_t inner : offsets) next.push_back(i * strides[k] + inner);
      offsets = std::move(next);
    }
  }
  int64_t count() const { return int64_t(offsets.size()); }
};

// A tensor of storage type T in 64-byte aligned memory, padding filled with a NaN sentinel.
template <typename T>
class Buffer {
 public:
  Buffer(const Layout& layout, double fill) : layout_(layout), data_(allocate(layout.storage)) {
    const T sentinel = from_double<T>(NAN);
    for (int64_t i = 0; i < layout_.storage; ++i) data_.get()[i] = sentinel;
    for (int64_t off : layout_.offsets) data_.get()[off] = from_double<T>(fill);
  }
  Buffer(const Layout& layout, const std::vector<double>& values) : Buffer(layout, 0.0) {
    for (int64_t i = 0; i < layout_.count(); ++i) data_.get()[layout_.offsets[i]] = from_double<T>(values[i]);
  }
  T* data() { return data_.get(); }
  const Layout& layout() const { return layout_; }
  std::vector<double> values() const {
    std::vector<double> v(layout_.count());
    for (int64_t i = 0; i < layout_.count(); ++i) v[i] = to_double(data_.get()[layout_.offsets[i]]);
    return v;
  }
  // Whether every element outside the logical ones still holds the sentinel.
  bool padding_intact() const {
    std::vector<bool> logical(layout_.storage, false);
    for (int64_t off : layout_.offsets) logical[off] = true;
    const T sentinel = from_double<T>(NAN);
    for (int64_t i = 0; i < layout_.storage; ++i)
      if (!logical[i] && std::memcmp(&data_.get()[i], &sentinel, sizeof(T)) != 0) return false;
    return true;
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  static std::unique_ptr<T, Free> allocate(int64_t n) {
    return std::unique_ptr<T, Free>(static_cast<T*>(::operator new(sizeof(T) * n, std::align_val_t(64))));
  }
  Layout layout_;
  std::unique_ptr<T, Free> data_;
};


// float32 / float64: CUDA against the CPU twin, element by element, relative to each element and
// to the tensor's magnitude (a long sum may cancel to much less than its terms).
void expect_close(const char* what, const char* tensor, const std::vector<double>& cuda,
                  const std::vector<double>& cpu, double rel) {
  const double ratio = cram_test::close_ratio(cuda, cpu, rel * std::max(max_abs(cpu), 1e-30), rel);
  CRAM_EXPECT(ratio <= 1, "%s: %s differs from the CPU twin: %.3g x the tolerance (rel %.1e, max|cpu| %.3g)",
              what, tensor, ratio, rel, max_abs(cpu));
}

// 16-bit: max |CUDA - ref| <= kErrorFactor max |CPU twin - ref| + atol, ref = the CPU twin in
// float64 on the same inputs.
void expect_within_cpu_error(const char* what, const char* tensor, const std::vector<double>& cuda,
                             const std::vector<double>& cpu, const std::vector<double>& ref) {
  const double cuda_err = max_abs_error(cuda, ref), cpu_err = max_abs_error(cpu, ref);
  const double atol = 1e-5 * max_abs(ref);
  CRAM_EXPECT(std::isfinite(cuda_err) && cuda_err <= kErrorFactor * cpu_err + atol,
              "%s: %s error %.3g against float64, the CPU twin's %.3g (max|ref| %.3g)", what, tensor, cuda_err,
              cpu_err, max_abs(ref));
}

enum class Device { kCpu, kCuda };

// ---------------------------------------------------------------------------------------------
// Selective scan: forward and backward
// ---------------------------------------------------------------------------------------------

struct ScanCase {
  const char* name;
  int batch, dim, L, N, groups;
  bool with_D, with_z, with_bias, with_dt_scale, with_initial_state, softplus;
  Padding padding;
  double delta_lo, delta_hi;  // raw delta range (positive without softplus: Δ is delta then)
};

// Inputs in logical row-major order: u, delta, z, dout (batch, dim, L); B, C (batch, groups, N, L);
// A (dim, N); D, bias (dim); dt_scale (batch, L); h0 (batch, dim, N).
struct ScanInputs {
  std::vector<double> u, delta, z, dout, B, C, A, D, bias, dt_scale, h0;
};

ScanInputs make_scan_inputs(const ScanCase& c, unsigned seed) {
  std::mt19937 rng(seed);
  const size_t seq = size_t(c.batch) * c.dim * c.L, bc = size_t(c.batch) * c.groups * c.N * c.L;
  ScanInputs in;
  in.u = cram_test::random_vector<double>(seq, rng);
  in.delta = cram_test::random_vector<double>(seq, rng, c.delta_lo, c.delta_hi);
  in.z = cram_test::random_vector<double>(seq, rng, -3, 3);
  in.dout = cram_test::random_vector<double>(seq, rng);
  in.B = cram_test::random_vector<double>(bc, rng);
  in.C = cram_test::random_vector<double>(bc, rng);
  in.A = cram_test::random_vector<double>(size_t(c.dim) * c.N, rng, -1.5, -0.1);
  in.D = cram_test::random_vector<double>(c.dim, rng);
  in.bias = cram_test::random_vector<double>(c.dim, rng, -0.3, 0.3);
  in.dt_scale = cram_test::random_vector<double>(size_t(c.batch) * c.L, rng, 0.2, 2.0);
  in.h0 = cram_test::random_vector<double>(size_t(c.batch) * c.dim * c.N, rng);
  return in;
}

// The inputs as storage type T holds them (sequence tensors) and its accumulation type
// (parameters), so that a float64 run on the result sees exactly what a T run sees.
template <typename T>
ScanInputs rounded_scan_inputs(ScanInputs in) {
  using acc_t = typename AccType<T>::type;
  for (auto* v : {&in.u, &in.delta, &in.z, &in.dout, &in.B, &in.C})
    for (double& x : *v) x = round_to<T>(x);
  for (auto* v : {&in.A, &in.D, &in.bias, &in.dt_scale, &in.h0})
    for (double& x : *v) x = round_to<acc_t>(x);
  return in;
}

struct ScanOutputs {
  std::vector<double> out, chunk_states, du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, ddt_scale, dinitial_state;
};

// The forward, then the backward from the forward's own checkpoints, as the bindings run them
// (selective_scan_fwd / selective_scan_bwd in csrc/bindings.cpp): chunk_states and the shared
// gradients zeroed, the other outputs uninitialised (NaN here).
template <typename T>
ScanOutputs run_scan(const ScanCase& c, const ScanInputs& in, Device device) {
  using acc_t = typename AccType<T>::type;
  const int64_t batch = c.batch, dim = c.dim, L = c.L, N = c.N, groups = c.groups;
  const int64_t n_chunks = scan_checkpoint_count(L);
  const Layout seq({batch, dim, L}, c.padding), bc({batch, groups, N, L}, c.padding);
  const Layout A_layout({dim, N}, Padding::kNone), per_channel({dim}, Padding::kNone),
      dt_layout({batch, L}, Padding::kNone), state_layout({batch, dim, N}, Padding::kNone),
      checkpoints({batch, dim, n_chunks, N}, Padding::kNone);

  Buffer<T> u(seq, in.u), delta(seq, in.delta), z(seq, in.z), dout(seq, in.dout), B(bc, in.B), C(bc, in.C);
  Buffer<acc_t> A(A_layout, in.A), D(per_channel, in.D), bias(per_channel, in.bias), dt_scale(dt_layout, in.dt_scale),
      h0(state_layout, in.h0);
  Buffer<T> out(seq, NAN);
  Buffer<acc_t> chunk_states(checkpoints, 0.0);

  SelectiveScanParams p{};
  p.input_type = dtype_of<T>();
  p.batch = batch;
  p.dim = dim;
  p.seqlen = L;
  p.dstate = N;
  p.n_groups = groups;
  p.n_chunks = n_chunks;
  p.delta_softplus = c.softplus;
  p.u_batch_stride = seq.strides[0];
  p.u_d_stride = seq.strides[1];
  p.delta_batch_stride = p.z_batch_stride = p.out_batch_stride = p.u_batch_stride;
  p.delta_d_stride = p.z_d_stride = p.out_d_stride = p.u_d_stride;
  p.B_batch_stride = p.C_batch_stride = bc.strides[0];
  p.B_group_stride = p.C_group_stride = bc.strides[1];
  p.B_dstate_stride = p.C_dstate_stride = bc.strides[2];
  p.u = u.data();
  p.delta = delta.data();
  p.A = A.data();
  p.B = B.data();
  p.C = C.data();
  p.D = c.with_D ? D.data() : nullptr;
  p.z = c.with_z ? z.data() : nullptr;
  p.delta_bias = c.with_bias ? bias.data() : nullptr;
  p.dt_scale = c.with_dt_scale ? dt_scale.data() : nullptr;
  p.out = out.data();
  p.chunk_states = chunk_states.data();
  p.initial_state = c.with_initial_state ? h0.data() : nullptr;
  if (device == Device::kCuda) selective_scan_fwd_cuda(p, nullptr);
  else selective_scan_fwd_cpu(p);

  Buffer<T> du(seq, NAN), ddelta(seq, NAN), dz(seq, NAN);
  Buffer<acc_t> dA(A_layout, 0.0), dB(bc, 0.0), dC(bc, 0.0), dD(per_channel, 0.0), ddelta_bias(per_channel, 0.0),
      ddt_scale(dt_layout, 0.0), dinitial_state(state_layout, 0.0);
  SelectiveScanBwdParams g{};
  static_cast<SelectiveScanParams&>(g) = p;
  g.out = nullptr;  // the backward gets no output tensor
  g.out_batch_stride = g.out_d_stride = 0;
  g.dout_batch_stride = g.du_batch_stride = g.ddelta_batch_stride = g.dz_batch_stride = seq.strides[0];
  g.dout_d_stride = g.du_d_stride = g.ddelta_d_stride = g.dz_d_stride = seq.strides[1];
  g.dB_batch_stride = g.dC_batch_stride = bc.strides[0];
  g.dB_group_stride = g.dC_group_stride = bc.strides[1];
  g.dB_dstate_stride = g.dC_dstate_stride = bc.strides[2];
  g.dout = dout.data();
  g.du = du.data();
  g.ddelta = ddelta.data();
  g.dz = c.with_z ? dz.data() : nullptr;
  g.dA = dA.data();
  g.dB = dB.data();
  g.dC = dC.data();
  g.dD = c.with_D ? dD.data() : nullptr;
  g.ddelta_bias = c.with_bias ? ddelta_bias.data() : nullptr;
  g.ddt_scale = c.with_dt_scale ? ddt_scale.data() : nullptr;
  g.dinitial_state = c.with_initial_state ? dinitial_state.data() : nullptr;
  if (device == Device::kCuda) selective_scan_bwd_cuda(g, nullptr);
  else selective_scan_bwd_cpu(g);

  const char* who = device == Device::kCuda ? "CUDA" : "CPU";
  const std::pair<const char*, bool> padding[] = {
      {"out", out.padding_intact()}, {"du", du.padding_intact()}, {"ddelta", ddelta.padding_intact()},
      {"dz", dz.padding_intact()},   {"dB", dB.padding_intact()}, {"dC", dC.padding_intact()}};
  for (const auto& [tensor, intact] : padding)
    CRAM_EXPECT(intact, "%s (%s, %s): a write into the padding of %s", c.name, dtype_name(dtype_of<T>()), who, tensor);

  ScanOutputs o;
  o.out = out.values();
  o.chunk_states = chunk_states.values();
  o.du = du.values();
  o.ddelta = ddelta.values();
  if (c.with_z) o.dz = dz.values();
  o.dA = dA.values();
  o.dB = dB.values();
  o.dC = dC.values();
  if (c.with_D) o.dD = dD.values();
  if (c.with_bias) o.ddelta_bias = ddelta_bias.values();
  if (c.with_dt_scale) o.ddt_scale = ddt_scale.values();
  if (c.with_initial_state) o.dinitial_state = dinitial_state.values();
  return o;
}

using ScanField = std::vector<double> ScanOutputs::*;
const std::pair<const char*, ScanField> kScanFields[] = {
    {"out", &ScanOutputs::out},       {"chunk_states", &ScanOutputs::chunk_states},
    {"du", &ScanOutputs::du},         {"ddelta", &ScanOutputs::ddelta},
    {"dz", &ScanOutputs::dz},         {"dA", &ScanOutputs::dA},
    {"dB", &ScanOutputs::dB},         {"dC", &ScanOutputs::dC},
    {"dD", &ScanOutputs::dD},         {"ddelta_bias", &ScanOutputs::ddelta_bias},
    {"ddt_scale", &ScanOutputs::ddt_scale}, {"dinitial_state", &ScanOutputs::dinitial_state}};

// float32 / float64: the CUDA launchers against the CPU twin in the same dtype.
template <typename T>
void test_scan_direct(const ScanCase& c, const ScanInputs& raw, double rel) {
  const ScanInputs in = rounded_scan_inputs<T>(raw);
  const ScanOutputs cuda = run_scan<T>(c, in, Device::kCuda), cpu = run_scan<T>(c, in, Device::kCpu);
  char what[160];
  std::snprintf(what, sizeof what, "%s (%s)", c.name, dtype_name(dtype_of<T>()));
  for (const auto& [tensor, field] : kScanFields) expect_close(what, tensor, cuda.*field, cpu.*field, rel);
}

// float16 / bfloat16: both against the CPU twin in float64 on the same rounded inputs.
template <typename T>
void test_scan_16bit(const ScanCase& c, const ScanInputs& raw) {
  const ScanInputs in = rounded_scan_inputs<T>(raw);
  const ScanOutputs cuda = run_scan<T>(c, in, Device::kCuda), cpu = run_scan<T>(c, in, Device::kCpu),
                    ref = run_scan<double>(c, in, Device::kCpu);
  char what[160];
  std::snprintf(what, sizeof what, "%s (%s)", c.name, dtype_name(dtype_of<T>()));
  for (const auto& [tensor, field] : kScanFields) expect_within_cpu_error(what, tensor, cuda.*field, cpu.*field, ref.*field);
}

// ---------------------------------------------------------------------------------------------
// Selective state update (one streaming step)
// ---------------------------------------------------------------------------------------------

struct StepCase {
  const char* name;
  int batch, dim, N, groups;
  bool with_D, with_z, with_bias, with_dt_scale, softplus;
  Padding padding;
  int steps;  // consecutive updates of the same state, each with fresh inputs
};

// Per step: x, dt, z (batch, dim); B, C (batch, groups, N); dt_scale (batch). Fixed: A (dim, N),
// D, bias (dim); the starting state (batch, dim, N).
struct StepInputs {
  std::vector<std::vector<double>> x, dt, z, B, C, dt_scale;
  std::vector<double> A, D, bias, state;
};

StepInputs make_step_inputs(const StepCase& c, unsigned seed) {
  std::mt19937 rng(seed);
  const size_t rows = size_t(c.batch) * c.dim, bc = size_t(c.batch) * c.groups * c.N;
  StepInputs in;
  for (int s = 0; s < c.steps; ++s) {
    in.x.push_back(cram_test::random_vector<double>(rows, rng));
    in.dt.push_back(cram_test::random_vector<double>(rows, rng, c.softplus ? -1.0 : 0.01, 0.5));
    in.z.push_back(cram_test::random_vector<double>(rows, rng, -3, 3));
    in.B.push_back(cram_test::random_vector<double>(bc, rng));
    in.C.push_back(cram_test::random_vector<double>(bc, rng));
    in.dt_scale.push_back(cram_test::random_vector<double>(c.batch, rng, 0.2, 2.0));
  }
  in.A = cram_test::random_vector<double>(size_t(c.dim) * c.N, rng, -1.5, -0.1);
  in.D = cram_test::random_vector<double>(c.dim, rng);
  in.bias = cram_test::random_vector<double>(c.dim, rng, -0.3, 0.3);
  in.state = cram_test::random_vector<double>(rows * c.N, rng);
  return in;
}

template <typename T>
StepInputs rounded_step_inputs(StepInputs in) {
  using acc_t = typename AccType<T>::type;
  for (auto* steps : {&in.x, &in.dt, &in.z, &in.B, &in.C})
    for (auto& v : *steps)
      for (double& x : v) x = round_to<T>(x);
  for (auto& v : in.dt_scale)
    for (double& x : v) x = round_to<acc_t>(x);
  for (auto* v : {&in.A, &in.D, &in.bias, &in.state})
    for (double& x : *v) x = round_to<acc_t>(x);
  return in;
}

struct StepOutputs {
  std::vector<double> out;    // every step's output, one after the other
  std::vector<double> state;  // after the last step
};

template <typename T>
StepOutputs run_steps(const StepCase& c, const StepInputs& in, Device device) {
  using acc_t = typename AccType<T>::type;
  const int64_t batch = c.batch, dim = c.dim, N = c.N, groups = c.groups;
  const Layout rows({batch, dim}, c.padding), bc({batch, groups, N}, c.padding),
      state_layout({batch, dim, N}, c.padding);
  const Layout A_layout({dim, N}, Padding::kNone), per_channel({dim}, Padding::kNone), per_batch({batch}, Padding::kNone);
  Buffer<acc_t> state(state_layout, in.state), A(A_layout, in.A), D(per_channel, in.D), bias(per_channel, in.bias);
  StepOutputs o;
  for (int s = 0; s < c.steps; ++s) {
    Buffer<T> x(rows, in.x[s]), dt(rows, in.dt[s]), z(rows, in.z[s]), B(bc, in.B[s]), C(bc, in.C[s]), out(rows, NAN);
    Buffer<acc_t> dt_scale(per_batch, in.dt_scale[s]);
    SelectiveStateUpdateParams p{};
    p.input_type = dtype_of<T>();
    p.batch = batch;
    p.dim = dim;
    p.dstate = N;
    p.n_groups = groups;
    p.dt_softplus = c.softplus;
    p.state_batch_stride = state_layout.strides[0];
    p.state_d_stride = state_layout.strides[1];
    p.x_batch_stride = p.dt_batch_stride = p.z_batch_stride = p.out_batch_stride = rows.strides[0];
    p.B_batch_stride = p.C_batch_stride = bc.strides[0];
    p.B_group_stride = p.C_group_stride = bc.strides[1];
    p.state = state.data();
    p.x = x.data();
    p.dt = dt.data();
    p.A = A.data();
    p.B = B.data();
    p.C = C.data();
    p.D = c.with_D ? D.data() : nullptr;
    p.z = c.with_z ? z.data() : nullptr;
    p.dt_bias = c.with_bias ? bias.data() : nullptr;
    p.dt_scale = c.with_dt_scale ? dt_scale.data() : nullptr;
    p.out = out.data();
    if (device == Device::kCuda) selective_state_update_cuda(p, nullptr);
    else selective_state_update_cpu(p);
    CRAM_EXPECT(out.padding_intact() && state.padding_intact(), "%s (%s, %s): a write into the padding of out or state",
                c.name, dtype_name(dtype_of<T>()), device == Device::kCuda ? "CUDA" : "CPU");
    const std::vector<double> step_out = out.values();
    o.out.insert(o.out.end(), step_out.begin(), step_out.end());
  }
  o.state = state.values();
  return o;
}

template <typename T>
void test_steps_direct(const StepCase& c, const StepInputs& raw, double rel) {
  const StepInputs in = rounded_step_inputs<T>(raw);
  const StepOutputs cuda = run_steps<T>(c, in, Device::kCuda), cpu = run_steps<T>(c, in, Device::kCpu);
  char what[160];
  std::snprintf(what, sizeof what, "%s (%s)", c.name, dtype_name(dtype_of<T>()));
  expect_close(what, "out", cuda.out, cpu.out, rel);
  expect_close(what, "state", cuda.state, cpu.state, rel);
}

template <typename T>
void test_steps_16bit(const StepCase& c, const StepInputs& raw) {
  const StepInputs in = rounded_step_inputs<T>(raw);
  const StepOutputs cuda = run_steps<T>(c, in, Device::kCuda), cpu = run_steps<T>(c, in, Device::kCpu),
                    ref = run_steps<double>(c, in, Device::kCpu);
  char what[160];
  std::snprintf(what, sizeof what, "%s (%s)", c.name, dtype_name(dtype_of<T>()));
  expect_within_cpu_error(what, "out", cuda.out, cpu.out, ref.out);
  expect_within_cpu_error(what, "state", cuda.state, cpu.state, ref.state);
}

// Tolerances of the direct comparisons: float32 differs by rounding (exp implementations,
// summation order) that grows along a scan; float64 by the same, at float64's epsilon.
constexpr double kRelFloat32 = 1e-5, kRelFloat64 = 1e-12;

}  // namespace

int main() {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  constexpr int kChunk = kScanCheckpointChunk;
  // Each case is small (the emulator runs every CUDA thread as an OS thread) but together they
  // reach every path of the kernels: one step; lengths off multiples of 8 and 32 (the last lane's
  // items partly past L, scalar loads); exactly one checkpoint chunk; several chunks with a
  // partial last one; N = 1, 16 and kScanMaxDState (lanes own several n of the carried state);
  // groups > 1 with group sizes off multiples of the block's 4 channels (spare warps) and several
  // blocks per group; every optional input on and off; softplus on, off and above its linear
  // threshold (20); contiguous, odd-padded and 16-byte aligned padded strides.
  const ScanCase scan_cases[] = {
      // name                               batch dim L                N  groups D      z      bias   dt     h0     softplus padding            delta range
      {"one step",                           1,   3,  1,               2, 1,     true,  true,  true,  true,  true,  true,  Padding::kNone,    -1, 0.5},
      {"L=37, N=16, bare",                   1,   3,  37,              16, 1,    false, false, false, false, false, false, Padding::kOdd,     0.01, 0.5},
      {"L=40, aligned rows, groups=2",       2,   8,  40,              4, 2,     true,  true,  false, true,  true,  true,  Padding::kAligned, -1, 0.5},
      {"one chunk",                          1,   5,  kChunk,          4, 1,     true,  true,  true,  true,  true,  true,  Padding::kNone,    -1, 0.5},
      {"3 chunks, partial last, groups=2",   2,   10, 2 * kChunk + 75, 1, 2,     true,  false, true,  true,  true,  true,  Padding::kOdd,     -1, 0.5},
      {"2 chunks, 8 steps in the last",      1,   4,  kChunk + 8,      2, 1,     false, true,  false, true,  false, false, Padding::kAligned, 0.01, 0.5},
      {"softplus past its threshold",        1,   4,  50,              8, 1,     true,  true,  true,  false, false, true,  Padding::kNone,    -4, 30},
  };
  // The largest state in float32 only: N meets no dtype-specific code, and every n costs a
  // few dozen emulated warp barriers per block.
  const ScanCase largest_state = {"N=kScanMaxDState", 1, 3, 45, kScanMaxDState, 1, true, true, true, true, true, true,
                                  Padding::kNone, -1, 0.5};
  const StepCase step_cases[] = {
      // name                                   batch dim  N    groups D     z      bias   dt     softplus padding           steps
      {"step: one channel, N=1",                 1,   1,   1,   1,  true,  true,  true,  true,  true,  Padding::kNone,    2},
      {"step: blocks straddling groups",         2,   300, 16,  2,  true,  true,  true,  true,  true,  Padding::kOdd,     2},
      {"step: small groups, bare",               2,   160, 5,   5,  false, false, false, false, false, Padding::kAligned, 2},
      {"step: N=kScanMaxDState, partial block",  1,   130, kScanMaxDState, 1, true, false, true, true, true, Padding::kOdd, 2},
  };

  unsigned seed = 1;
  for (const ScanCase& c : scan_cases) {
    const auto case_start = Clock::now();
    const ScanInputs raw = make_scan_inputs(c, seed++);
    test_scan_direct<float>(c, raw, kRelFloat32);
    test_scan_direct<double>(c, raw, kRelFloat64);
    test_scan_16bit<fp16_t>(c, raw);
    test_scan_16bit<bf16_t>(c, raw);
    std::printf("  %-36s %6.1f s\n", c.name, std::chrono::duration<double>(Clock::now() - case_start).count());
  }
  {
    const auto case_start = Clock::now();
    test_scan_direct<float>(largest_state, make_scan_inputs(largest_state, seed++), kRelFloat32);
    std::printf("  %-36s %6.1f s\n", largest_state.name, std::chrono::duration<double>(Clock::now() - case_start).count());
  }
  for (const StepCase& c : step_cases) {
    const auto case_start = Clock::now();
    const StepInputs raw = make_step_inputs(c, seed++);
    test_steps_direct<float>(c, raw, kRelFloat32);
    test_steps_direct<double>(c, raw, kRelFloat64);
    test_steps_16bit<fp16_t>(c, raw);
    test_steps_16bit<bf16_t>(c, raw);
    std::printf("  %-36s %6.1f s\n", c.name, std::chrono::duration<double>(Clock::now() - case_start).count());
  }
  std::printf("total %.1f s\n", std::chrono::duration<double>(Clock::now() - start).count());
  return cram_test::report("test_simt_selective_scan");
}
