// CPU kernels of FV-VAE training (Algorithm 1): the element-wise work around the step's GEMMs, fused so
// that each (N, C) array is read or written once where plain torch makes a pass per operator. At the
// demo's shape an (N, C) array is 3 MB and leaves the caches between operators, so a pass costs as much as
// a small GEMM.
//
//   dropout_keep_cpu(n, c, seed, threshold)        the dropout keep mask (n, c) bool: 16-bit slices of a
//       counter-based hash (splitmix64 of seed + word index) compared with threshold; the same mask for a
//       seed whatever the thread count.
//   normalize_dropout_cpu(x, keep, scale, l2, eps) -> (xp, x_in): xp = x / max(||x_t||, eps) per row (l2)
//       or x, and the encoder's input x_in = xp * keep * scale: one read of x, one write of each.
//   bias_relu_cpu_(h, bias): h = max(h + bias, 0) in place (a hidden layer after its GEMM).
//   reconstruction_error_cpu(z, weight, bias, x, inv_var) -> (sq, msum, m): the data term of L_rec (Eq. 8)
//       with the decoder, a = z W^T + bias block by block: sq_c = sum_t (ReLU(a_tc) - x_tc)^2, the gradient
//       factor m_tc = [a_tc > 0] (a_tc - x_tc) / sigma_c^2 (d/da of sum_c sq_c / (2 sigma_c^2)) and its
//       column sums msum (the bias gradient). Rows are cut into fixed blocks whose partial sums are added
//       in order: deterministic.
//   adadelta_step_cpu(params, grads, square_avgs, acc_deltas, lr, rho, eps): torch.optim.Adadelta's step,
//       one pass per parameter.
//
// The schemas are defined in Python (fvvae_fast/ops/training.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/fisher_accumulate_cpu.h"  // FV_CLONES, tile_gemm, the poison hook

namespace {

constexpr int64_t kRowBlock = 32;  // rows per task; a block of partial column sums each

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name,
              " must be a dense CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous (N, C) matrix, got shape ",
              t.sizes(), " and strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

at::Tensor dropout_keep_cpu(int64_t n, int64_t c, int64_t seed, int64_t threshold) {
  TORCH_CHECK(n >= 0 && c >= 0, "dropout_keep_cpu: n and c must be >= 0, got ", n, " and ", c);
  TORCH_CHECK(threshold >= -32768 && threshold <= 32768, "dropout_keep_cpu: threshold must be in [-32768, 32768]");
  at::Tensor keep = at::empty({n, c}, at::TensorOptions().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const int64_t total = n * c, words = (total + 3) / 4;
  const uint64_t base = static_cast<uint64_t>(seed);
  at::parallel_for(0, words, 16384, [&](int64_t lo, int64_t hi) {
    const int64_t full = std::min(hi, total / 4);  // words whose 4 elements all exist
#pragma omp simd
    for (int64_t w = lo; w < full; ++w) {
      const uint64_t bits = splitmix64(base + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(w + 1));
      for (int64_t i = 0; i < 4; ++i) {
        out[4 * w + i] = static_cast<int16_t>(static_cast<uint16_t>(bits >> (16 * i))) >= threshold;
      }
    }
    for (int64_t w = std::max(lo, full); w < hi; ++w) {  // the last, partial word
      const uint64_t bits = splitmix64(base + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(w + 1));
      for (int64_t i = 4 * w; i < total; ++i) {
        out[i] = static_cast<int16_t>(static_cast<uint16_t>(bits >> (16 * (i - 4 * w)))) >= threshold;
      }
    }
  });
  return keep;
}

// The row loops are branch-free (a random mask would mispredict every other branch), restrict-qualified
// and compiled for AVX-512, AVX2 and the baseline (FV_CLONES), so that they vectorise.
template <typename T>
FV_INLINE void normalize_dropout_rows(const T* __restrict__ x, const uint8_t* __restrict__ keep, int64_t rows, int64_t c,
                                      T scale, bool l2, T eps, T* __restrict__ xp, T* __restrict__ x_in) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* __restrict__ row = x + t * c;
    const uint8_t* __restrict__ k = keep + t * c;
    T* __restrict__ p = xp + t * c;
    T* __restrict__ q = x_in + t * c;
    T inv = T(1);
    if (l2) {
      T ss = T(0);
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < c; ++j) ss += row[j] * row[j];
      inv = T(1) / std::max(std::sqrt(ss), eps);
    }
    const T s = scale * inv;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      p[j] = row[j] * inv;
      q[j] = row[j] * (s * static_cast<T>(k[j]));
    }
  }
}

FV_CLONES void normalize_dropout_rows(const float* x, const uint8_t* keep, int64_t rows, int64_t c, float scale, bool l2,
                                      float eps, float* xp, float* x_in) {
  normalize_dropout_rows<float>(x, keep, rows, c, scale, l2, eps, xp, x_in);
}
FV_CLONES void normalize_dropout_rows(const double* x, const uint8_t* keep, int64_t rows, int64_t c, double scale,
                                      bool l2, double eps, double* xp, double* x_in) {
  normalize_dropout_rows<double>(x, keep, rows, c, scale, l2, eps, xp, x_in);
}

template <typename T>
void normalize_dropout_kernel(const T* x, const bool* keep, int64_t n, int64_t c, double scale, bool l2, double eps,
                              T* xp, T* x_in) {
  at::parallel_for(0, n, kRowBlock, [&](int64_t lo, int64_t hi) {
    normalize_dropout_rows(x + lo * c, reinterpret_cast<const uint8_t*>(keep) + lo * c, hi - lo, c, static_cast<T>(scale), l2, static_cast<T>(eps),
                           xp + lo * c, x_in + lo * c);
  });
}

std::tuple<at::Tensor, at::Tensor> normalize_dropout_cpu(const at::Tensor& x, const at::Tensor& keep, double scale,
                                                         bool l2, double eps) {
  constexpr const char* op = "normalize_dropout_cpu";
  check_matrix(op, "x", x);
  TORCH_CHECK(keep.defined() && keep.device().is_cpu() && keep.scalar_type() == at::kBool && keep.is_contiguous() &&
                  keep.sizes().equals(x.sizes()),
              op, ": keep must be a contiguous CPU bool tensor of x's shape ", x.sizes());
  at::Tensor xp = at::empty_like(x), x_in = at::empty_like(x);
  if (fvvae_fast::cpu::poison_enabled()) {
    xp.fill_(std::numeric_limits<double>::quiet_NaN());
    x_in.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    normalize_dropout_kernel<scalar_t>(x.data_ptr<scalar_t>(), keep.data_ptr<bool>(), x.size(0), x.size(1), scale, l2,
                                       eps, xp.data_ptr<scalar_t>(), x_in.data_ptr<scalar_t>());
  });
  return {xp, x_in};
}

// Rows of one block: am holds a0 = z W^T on entry and m on return; with a = a0 + bias,
// acc (c,) float64 += (ReLU(a) - x)^2, msum (c,) float64 += m, m = [a > 0] (a - x) inv_var.
template <typename T>
FV_INLINE void reconstruction_rows(T* am, const T* __restrict__ bias, const T* __restrict__ x,
                                   const T* __restrict__ inv_var, int64_t rows, int64_t c, double* __restrict__ acc,
                                   double* __restrict__ msum) {
  for (int64_t t = 0; t < rows; ++t) {
    T* r = am + t * c;  // read and written at the same index only
    const T* __restrict__ xr = x + t * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const T a = r[j] + bias[j];
      const T on = static_cast<T>(a > T(0));
      const T err = on * a - xr[j];  // ReLU(a) - x
      const T g = on * err * inv_var[j];
      acc[j] += static_cast<double>(err * err);
      msum[j] += static_cast<double>(g);
      r[j] = g;
    }
  }
}

FV_CLONES void reconstruction_rows(float* am, const float* bias, const float* x, const float* inv_var, int64_t rows,
                                   int64_t c, double* acc, double* msum) {
  reconstruction_rows<float>(am, bias, x, inv_var, rows, c, acc, msum);
}
FV_CLONES void reconstruction_rows(double* am, const double* bias, const double* x, const double* inv_var,
                                   int64_t rows, int64_t c, double* acc, double* msum) {
  reconstruction_rows<double>(am, bias, x, inv_var, rows, c, acc, msum);
}

// Per block of rows: the decoder's GEMM z W^T straight into the block's rows of m (still in cache for
// the element-wise pass, never a separate (N, C) array), then the pass.
template <typename T>
void reconstruction_kernel(const T* z, const T* weight, const T* bias, const T* x, const T* inv_var, int64_t n,
                           int64_t c, int64_t d, T* sq, T* msum, T* m) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(static_cast<size_t>(2 * blocks * c), 0.0);  // per block: sq, then msum
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t first = b * kRowBlock, rows = std::min(n, first + kRowBlock) - first;
      T* am = m + first * c;
      fvvae_fast::cpu::tile_gemm('T', 'N', c, rows, d, T(1), weight, d, z + first * d, d, T(0), am, c);
      double* acc = partial.data() + 2 * b * c;
      reconstruction_rows(am, bias, x + first * c, inv_var, rows, c, acc, acc + c);
    }
  });
  for (int64_t j = 0; j < c; ++j) {
    double s = 0.0, g = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      s += partial[2 * b * c + j];
      g += partial[(2 * b + 1) * c + j];
    }
    sq[j] = static_cast<T>(s);
    msum[j] = static_cast<T>(g);
  }
}

void check_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& like) {
  TORCH_CHECK(v.defined() && v.device().is_cpu() && v.dim() == 1 && v.is_contiguous() && v.size(0) == like.size(1) &&
                  v.scalar_type() == like.scalar_type(),
              op, ": ", name, " must be a contiguous (C,) CPU tensor of dtype ", like.scalar_type(), ", got ",
              v.sizes(), " ", v.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_error_cpu(const at::Tensor& z, const at::Tensor& weight,
                                                                        const at::Tensor& bias, const at::Tensor& x,
                                                                        const at::Tensor& inv_var) {
  constexpr const char* op = "reconstruction_error_cpu";
  check_matrix(op, "z", z);
  check_matrix(op, "weight", weight);
  check_matrix(op, "x", x);
  const int64_t n = x.size(0), c = x.size(1), d = z.size(1);
  TORCH_CHECK(z.size(0) == n && weight.size(0) == c && weight.size(1) == d && z.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              op, ": need z (N, d), weight (C, d) and x (N, C) of one dtype, got ", z.sizes(), ", ", weight.sizes(),
              " and ", x.sizes());
  check_vector(op, "bias", bias, x);
  check_vector(op, "inv_var", inv_var, x);
  at::Tensor sq = at::empty({c}, x.options()), msum = at::empty_like(sq), m = at::empty_like(x);
  if (fvvae_fast::cpu::poison_enabled()) {
    for (at::Tensor* t : {&sq, &msum, &m}) t->fill_(std::numeric_limits<double>::quiet_NaN());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    reconstruction_kernel<scalar_t>(z.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                    x.data_ptr<scalar_t>(), inv_var.data_ptr<scalar_t>(), n, c, d,
                                    sq.data_ptr<scalar_t>(), msum.data_ptr<scalar_t>(), m.data_ptr<scalar_t>());
  });
  return {sq, msum, m};
}

// h = max(h + bias, 0) in place: a hidden layer's bias and ReLU in one pass over its GEMM's output.
template <typename T>
FV_INLINE void bias_relu_rows(T* __restrict__ h, const T* __restrict__ bias, int64_t rows, int64_t c) {
  for (int64_t t = 0; t < rows; ++t) {
    T* __restrict__ r = h + t * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) r[j] = std::max(r[j] + bias[j], T(0));
  }
}

FV_CLONES void bias_relu_rows(float* h, const float* bias, int64_t rows, int64_t c) {
  bias_relu_rows<float>(h, bias, rows, c);
}
FV_CLONES void bias_relu_rows(double* h, const double* bias, int64_t rows, int64_t c) {
  bias_relu_rows<double>(h, bias, rows, c);
}

at::Tensor& bias_relu_cpu_(at::Tensor& h, const at::Tensor& bias) {
  constexpr const char* op = "bias_relu_cpu_";
  check_matrix(op, "h", h);
  check_vector(op, "bias", bias, h);
  const int64_t c = h.size(1);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), op, [&] {
    scalar_t* p = h.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    at::parallel_for(0, h.size(0), kRowBlock, [&](int64_t lo, int64_t hi) { bias_relu_rows(p + lo * c, b, hi - lo, c); });
  });
  return h;
}

// One AdaDelta step of torch.optim.Adadelta (no weight decay, not maximising) on every parameter, one pass
// each: s = rho s + (1 - rho) g^2; u = sqrt(a + eps) / sqrt(s + eps) g; a = rho a + (1 - rho) u^2; p -= lr u.
template <typename T>
FV_INLINE void adadelta_elements(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s, T* __restrict__ a,
                                 int64_t n, T lr, T rho, T eps) {
  const T keep = T(1) - rho;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T sq = rho * s[i] + keep * g[i] * g[i];
    const T u = std::sqrt(a[i] + eps) / std::sqrt(sq + eps) * g[i];
    s[i] = sq;
    a[i] = rho * a[i] + keep * u * u;
    p[i] -= lr * u;
  }
}

FV_CLONES void adadelta_elements(float* p, const float* g, float* s, float* a, int64_t n, float lr, float rho,
                                 float eps) {
  adadelta_elements<float>(p, g, s, a, n, lr, rho, eps);
}
FV_CLONES void adadelta_elements(double* p, const double* g, double* s, double* a, int64_t n, double lr, double rho,
                                 double eps) {
  adadelta_elements<double>(p, g, s, a, n, lr, rho, eps);
}

void adadelta_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList acc_deltas, double lr, double rho, double eps) {
  constexpr const char* op = "adadelta_step_cpu";
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && square_avgs.size() == k && acc_deltas.size() == k, op,
              ": params, grads, square_avgs and acc_deltas must have one entry per parameter");
  for (size_t i = 0; i < k; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
                op, ": parameter ", i, " must be a contiguous float32/float64 CPU tensor");
    for (const at::Tensor* t : {&grads[i], &square_avgs[i], &acc_deltas[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == p.scalar_type() &&
                      t->sizes().equals(p.sizes()),
                  op, ": the gradient and state of parameter ", i, " must be contiguous CPU tensors of its shape and dtype");
    }
  }
  for (size_t i = 0; i < k; ++i) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), op, [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* s = square_avgs[i].data_ptr<scalar_t>();
      scalar_t* a = acc_deltas[i].data_ptr<scalar_t>();
      at::parallel_for(0, params[i].numel(), 16384, [&](int64_t lo, int64_t hi) {
        adadelta_elements(p + lo, g + lo, s + lo, a + lo, hi - lo, static_cast<scalar_t>(lr),
                          static_cast<scalar_t>(rho), static_cast<scalar_t>(eps));
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) {
  m.impl("normalize_dropout_cpu", TORCH_FN(normalize_dropout_cpu));
  m.impl("reconstruction_error_cpu", TORCH_FN(reconstruction_error_cpu));
  m.impl("bias_relu_cpu_", TORCH_FN(bias_relu_cpu_));
  m.impl("adadelta_step_cpu", TORCH_FN(adadelta_step_cpu));
}

TORCH_LIBRARY_IMPL(fvvae_fast, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_cpu", TORCH_FN(dropout_keep_cpu));
}
