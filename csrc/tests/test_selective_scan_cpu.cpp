// Selective scan CPU kernel against a plain sequential reference (forward, checkpoints) and
// against central finite differences of that reference (backward), in double.
#include <vector>

#include "selective_scan/selective_scan.h"
#include "common/cpu_math.h"
#include "test_util.h"

using namespace cram;

struct Problem {
  int batch, dim, L, N, groups;
  bool softplus, with_z, with_D, with_bias, with_dt;
  std::vector<double> u, delta, A, B, C, D, z, bias, dt;
};

Problem make_problem(int batch, int dim, int L, int N, int groups, bool flags, unsigned seed) {
  std::mt19937 rng(seed);
  Problem p{};
  p.batch = batch; p.dim = dim; p.L = L; p.N = N; p.groups = groups;
  p.softplus = p.with_z = p.with_D = p.with_bias = p.with_dt = flags;
  p.u = cram_test::random_vector<double>(size_t(batch) * dim * L, rng);
  // Without softplus the raw delta is the step: positive, or the state grows without bound.
  p.delta = cram_test::random_vector<double>(size_t(batch) * dim * L, rng, flags ? -1 : 0.01, 0.5);
  p.A = cram_test::random_vector<double>(size_t(dim) * N, rng, -1.5, -0.1);
  p.B = cram_test::random_vector<double>(size_t(batch) * groups * N * L, rng);
  p.C = cram_test::random_vector<double>(size_t(batch) * groups * N * L, rng);
  p.D = cram_test::random_vector<double>(dim, rng);
  p.z = cram_test::random_vector<double>(size_t(batch) * dim * L, rng);
  p.bias = cram_test::random_vector<double>(dim, rng, -0.3, 0.3);
  p.dt = cram_test::random_vector<double>(size_t(batch) * L, rng, 0.2, 2.0);
  return p;
}

// The definition, one step at a time.
std::vector<double> reference(const Problem& p) {
  std::vector<double> out(p.u.size());
  const int per_group = p.dim / p.groups;
  for (int b = 0; b < p.batch; ++b)
    for (int d = 0; d < p.dim; ++d) {
      std::vector<double> h(p.N, 0.0);
      const int g = d / per_group;
      for (int t = 0; t < p.L; ++t) {
        const size_t i = (size_t(b) * p.dim + d) * p.L + t;
        double x = p.delta[i] + (p.with_bias ? p.bias[d] : 0.0);
        double step = (p.softplus ? softplus(x) : x) * (p.with_dt ? p.dt[size_t(b) * p.L + t] : 1.0);
        double y = p.with_D ? p.D[d] * p.u[i] : 0.0;
        for (int n = 0; n < p.N; ++n) {
          const size_t j = ((size_t(b) * p.groups + g) * p.N + n) * p.L + t;
          h[n] = std::exp(step * p.A[size_t(d) * p.N + n]) * h[n] + step * p.u[i] * p.B[j];
          y += p.C[j] * h[n];
        }
        out[i] = p.with_z ? y * p.z[i] / (1 + std::exp(-p.z[i])) : y;
      }
    }
  return out;
}

SelectiveScanParams params_for(Problem& p, std::vector<double>& out, std::vector<double>& states) {
  SelectiveScanParams s{};
  s.input_type = DType::kFloat64;
  s.batch = p.batch; s.dim = p.dim; s.seqlen = p.L; s.dstate = p.N; s.n_groups = p.groups;
  s.n_chunks = int(scan_checkpoint_count(p.L));
  s.delta_softplus = p.softplus;
  s.u_batch_stride = s.delta_batch_stride = s.z_batch_stride = s.out_batch_stride = int64_t(p.dim) * p.L;
  s.u_d_stride = s.delta_d_stride = s.z_d_stride = s.out_d_stride = p.L;
  s.B_batch_stride = s.C_batch_stride = int64_t(p.groups) * p.N * p.L;
  s.B_group_stride = s.C_group_stride = int64_t(p.N) * p.L;
  s.B_dstate_stride = s.C_dstate_stride = p.L;
  s.u = p.u.data(); s.delta = p.delta.data(); s.A = p.A.data(); s.B = p.B.data(); s.C = p.C.data();
  s.D = p.with_D ? p.D.data() : nullptr;
  s.z = p.with_z ? p.z.data() : nullptr;
  s.delta_bias = p.with_bias ? p.bias.data() : nullptr;
  s.dt_scale = p.with_dt ? p.dt.data() : nullptr;
  out.assign(p.u.size(), 0.0);
  states.assign(size_t(p.batch) * p.dim * s.n_chunks * p.N, 0.0);
  s.out = out.data();
  s.chunk_states = states.data();
  return s;
}

void test_forward(Problem p) {
  std::vector<double> out, states;
  selective_scan_fwd_cpu(params_for(p, out, states));
  CRAM_EXPECT(cram_test::close_ratio(out, reference(p), 1e-12, 1e-10) <= 1, "forward dim=%d L=%d", p.dim, p.L);
}

// Loss = Σ w ⊙ out; the kernel's gradients must match central differences of the reference.
void test_backward(Problem p) {
  std::mt19937 rng(7);
  const std::vector<double> w = cram_test::random_vector<double>(p.u.size(), rng);
  auto loss = [&](const Problem& q) {
    const std::vector<double> o = reference(q);
    double s = 0;
    for (size_t i = 0; i < o.size(); ++i) s += w[i] * o[i];
    return s;
  };
  std::vector<double> out, states;
  SelectiveScanParams fwd = params_for(p, out, states);
  selective_scan_fwd_cpu(fwd);
  SelectiveScanBwdParams bwd{};
  static_cast<SelectiveScanParams&>(bwd) = fwd;
  bwd.dout_batch_stride = bwd.du_batch_stride = bwd.ddelta_batch_stride = bwd.dz_batch_stride = fwd.u_batch_stride;
  bwd.dout_d_stride = bwd.du_d_stride = bwd.ddelta_d_stride = bwd.dz_d_stride = fwd.u_d_stride;
  bwd.dB_batch_stride = bwd.dC_batch_stride = fwd.B_batch_stride;
  bwd.dB_group_stride = bwd.dC_group_stride = fwd.B_group_stride;
  bwd.dB_dstate_stride = bwd.dC_dstate_stride = fwd.B_dstate_stride;
  std::vector<double> du(p.u.size()), ddelta(p.u.size()), dz(p.u.size()), dA(p.A.size()), dB(p.B.size()),
      dC(p.C.size()), dD(p.dim), dbias(p.dim), ddt(p.dt.size());
  bwd.dout = w.data();
  bwd.du = du.data(); bwd.ddelta = ddelta.data(); bwd.dz = p.with_z ? dz.data() : nullptr;
  bwd.dA = dA.data(); bwd.dB = dB.data(); bwd.dC = dC.data();
  bwd.dD = p.with_D ? dD.data() : nullptr;
  bwd.ddelta_bias = p.with_bias ? dbias.data() : nullptr;
  bwd.ddt_scale = p.with_dt ? ddt.data() : nullptr;
  selective_scan_bwd_cpu(bwd);

  struct Grad { const char* name; std::vector<double> Problem::*input; const std::vector<double>* grad; bool used; };
  const Grad grads[] = {{"u", &Problem::u, &du, true}, {"delta", &Problem::delta, &ddelta, true},
                        {"A", &Problem::A, &dA, true}, {"B", &Problem::B, &dB, true},
                        {"C", &Problem::C, &dC, true}, {"D", &Problem::D, &dD, p.with_D},
                        {"z", &Problem::z, &dz, p.with_z}, {"delta_bias", &Problem::bias, &dbias, p.with_bias},
                        {"dt_scale", &Problem::dt, &ddt, p.with_dt}};
  const double eps = 1e-6;
  for (const Grad& g : grads) {
    if (!g.used) continue;
    std::vector<double> numeric((p.*g.input).size());
    for (size_t i = 0; i < numeric.size(); ++i) {
      Problem plus = p, minus = p;
      (plus.*g.input)[i] += eps;
      (minus.*g.input)[i] -= eps;
      numeric[i] = (loss(plus) - loss(minus)) / (2 * eps);
    }
    CRAM_EXPECT(cram_test::close_ratio(*g.grad, numeric, 1e-7, 1e-6) <= 1, "d%s (dim=%d L=%d)", g.name, p.dim, p.L);
  }
}

int main() {
  // Shapes that cover: one step, a partial channel block, several blocks per group, groups,
  // several checkpoint chunks with a partial last chunk (L > 2 kScanCheckpointChunk), and every
  // optional input on and off.
  const int several_chunks = 2 * kScanCheckpointChunk + 9;
  for (bool flags : {true, false}) {
    test_forward(make_problem(1, 3, 1, 2, 1, flags, 1));
    test_forward(make_problem(2, 37, 70, 5, 1, flags, 2));
    test_forward(make_problem(2, 40, several_chunks, 4, 2, flags, 3));
    test_backward(make_problem(1, 3, several_chunks, 2, 1, flags, 4));
    test_backward(make_problem(2, 18, 9, 3, 2, flags, 5));
  }
  return cram_test::report("test_selective_scan_cpu");
}
