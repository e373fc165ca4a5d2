// fvvae_fast::sum_of_squares_cpu: the diagonal Fisher-information update, sum_s g[s]^2 of g (S, D)
// in float64 (paper Eq. 12; docs/math.rst, "The kernels"), reading g once and writing nothing but the (D,) result.
//
// The schema is defined in Python (fvvae_fast/ops/sum_of_squares.py). Threads own disjoint column ranges
// and each adds the rows in order, so the result does not depend on the thread count; float32 input
// is widened element by element (no float64 copy of g).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "cpu/fisher_accumulate_cpu.h"

namespace {

constexpr int64_t kColumnGrain = 4096;  // columns per task: 32 KiB of float64 accumulators

template <typename T>
void sum_of_squares_kernel(const T* g, int64_t s, int64_t d, double* out) {
  at::parallel_for(0, d, kColumnGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) out[j] = 0.0;
    for (int64_t r = 0; r < s; ++r) {
      const T* row = g + r * d;
      for (int64_t j = lo; j < hi; ++j) {
        const double v = static_cast<double>(row[j]);
        out[j] += v * v;
      }
    }
  });
}

at::Tensor sum_of_squares_cpu(const at::Tensor& g) {
  constexpr const char* op = "sum_of_squares_cpu";
  TORCH_CHECK(g.defined(), op, ": g is undefined");
  TORCH_CHECK(g.device().is_cpu(), op, ": g must be a CPU tensor, got device ", g.device());
  TORCH_CHECK(g.layout() == at::kStrided, op, ": g must be a dense (strided) tensor");
  TORCH_CHECK(g.dim() == 2, op, ": g must be 2-D (S, D), got shape ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op,
              ": g must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(g.is_contiguous(), op, ": g must be contiguous, got strides ", g.strides());
  const int64_t s = g.size(0), d = g.size(1);
  at::Tensor out = at::empty({d}, g.options().dtype(at::kDouble));
  if (fvvae_fast::cpu::poison_enabled()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), op, [&] {
    sum_of_squares_kernel<scalar_t>(g.data_ptr<scalar_t>(), s, d, out.data_ptr<double>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) { m.impl("sum_of_squares_cpu", TORCH_FN(sum_of_squares_cpu)); }
