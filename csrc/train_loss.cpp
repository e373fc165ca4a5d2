// CPU kernels of FV-VAE training (Algorithm 1). At the demo's shape an (N, C) array is 3 MB and leaves the
// caches between operators, so an element-wise pass costs as much as a small GEMM. train_step_cpu runs a
// whole step tile by tile, so that no (N, C) array leaves the cache (a single process's training); the
// other kernels fuse the element-wise work around the GEMMs of FVVAE.loss under autograd (data-parallel
// training, fine-tuning), each reading or writing an (N, C) array once.
//
//   train_step_cpu(x, rows, keep, eps, labels, layers..., decoder, classifier, sigma_z, inv_var, ...): the
//       loss terms of Eq. 8 and the gradients of every weight (below).
//   dropout_keep_cpu(n, c, seed, threshold)        the dropout keep mask (n, c) bool: 16-bit halves of a
//       counter-based hash (fmix32 of the word index keyed by the seed) compared with threshold; the same
//       mask for a seed whatever the thread count.
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
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cpu/fisher_accumulate_cpu.h"  // FV_CLONES, tile_gemm, the poison hook

namespace {

constexpr int64_t kRowBlock = 32;  // rows per task; a block of partial column sums each

// murmur3's 32-bit finaliser: a bijection whose output bits each depend on every input bit. On 32-bit
// lanes it vectorises (AVX2/AVX-512 multiply 32-bit integers; 64-bit multiplies do not).
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6BU;
  h ^= h >> 13;
  h *= 0xC2B2AE35U;
  return h ^ (h >> 16);
}

void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name,
              " must be a dense CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous (N, C) matrix, got shape ",
              t.sizes(), " and strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Keep mask: element i takes the 16-bit half (i % 2) of word i / 2, a hash of the word's index keyed by the
// seed's two halves (two rounds of fmix32).
FV_CLONES void dropout_keep_words(int64_t first, int64_t last, uint32_t k0, uint32_t k1, int16_t threshold,
                                  uint8_t* out) {
#pragma omp simd
  for (int64_t w = first; w < last; ++w) {
    const uint32_t bits = fmix32(fmix32(static_cast<uint32_t>(w) ^ k0) + k1 + static_cast<uint32_t>(w >> 32));
    out[2 * w] = static_cast<int16_t>(bits & 0xFFFFU) >= threshold;
    out[2 * w + 1] = static_cast<int16_t>(bits >> 16) >= threshold;
  }
}

at::Tensor dropout_keep_cpu(int64_t n, int64_t c, int64_t seed, int64_t threshold) {
  TORCH_CHECK(n >= 0 && c >= 0, "dropout_keep_cpu: n and c must be >= 0, got ", n, " and ", c);
  TORCH_CHECK(threshold >= -32768 && threshold <= 32767, "dropout_keep_cpu: threshold must be in [-32768, 32767]");
  const int64_t total = n * c, words = (total + 1) / 2;
  // one spare byte, so that the last word may write its second half
  at::Tensor storage = at::empty({2 * words}, at::TensorOptions().dtype(at::kBool));
  uint8_t* out = reinterpret_cast<uint8_t*>(storage.data_ptr<bool>());
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  at::parallel_for(0, words, 32768, [&](int64_t lo, int64_t hi) {
    dropout_keep_words(lo, hi, k0, k1, static_cast<int16_t>(threshold), out);
  });
  return storage.narrow(0, 0, total).view({n, c});
}

// The row loops are branch-free (a random mask would mispredict every other branch), restrict-qualified
// and compiled for AVX-512, AVX2 and the baseline (FV_CLONES), so that they vectorise.
template <typename T>
FV_INLINE void normalize_dropout_rows(const T* __restrict__ x, const uint8_t* __restrict__ keep, int64_t rows,
                                      int64_t c,
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

FV_CLONES void normalize_dropout_rows(const float* x, const uint8_t* keep, int64_t rows, int64_t c, float scale,
                                      bool l2,
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
    normalize_dropout_rows(x + lo * c, reinterpret_cast<const uint8_t*>(keep) + lo * c, hi - lo, c,
                           static_cast<T>(scale), l2, static_cast<T>(eps),
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
    fvvae_fast::cpu::OneBlasThread one_blas_thread;
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
    at::parallel_for(0, h.size(0), kRowBlock,
                     [&](int64_t lo, int64_t hi) { bias_relu_rows(p + lo * c, b, hi - lo, c); });
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
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() &&
                    (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
                op, ": parameter ", i, " must be a contiguous float32/float64 CPU tensor");
    for (const at::Tensor* t : {&grads[i], &square_avgs[i], &acc_deltas[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == p.scalar_type() &&
                      t->sizes().equals(p.sizes()),
                  op, ": the gradient and state of parameter ", i,
                  " must be contiguous CPU tensors of its shape and dtype");
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

// ---- the whole step, tile by tile ------------------------------------------------------------------
// train_step_cpu runs the forward and backward of FVVAE.loss (Eq. 8; Algorithm 1, lines 5-11) on tiles of
// kStepTile rows, so that every (rows, C) array of the step lives in the L2 cache of the thread that made
// it: x (or the batch's rows of the training data, gathered here) -> (xp, x_in) -> hidden layers -> mu
// -> z = mu + eps sigma_z -> a = z W_dec^T + b -> the reconstruction and classification terms, then back
// through the same layers. Each of G groups of tiles (G = the thread count) adds its weight gradients in its
// own buffers (GEMMs with beta = 1); the groups are added in order at the end. The descriptor-free terms (log sigma_x, the KL's sigma_z part) are the
// caller's (fvvae_fast/ops/training.py), which gets sq_c = sum_t (ReLU(a_tc) - x_tc)^2 and
// g_ez_j = sum_t dL/dz_tj eps_tj for them.

constexpr int64_t kStepTile = 128;  // single-threaded MKL: 150 GFLOP/s at 128 rows, 66 at 64 (C = 384)

template <typename T>
struct StepNet {
  std::vector<const T*> w, b;      // hidden layers, then mu: (out, in) and (out,)
  std::vector<int64_t> in, out;    // their widths
  const T *wd, *bd, *wc, *bc;      // decoder (C, d), (C,); classifier (K, d), (K,) or null
  const T *sigma_z, *iv_rec;       // (d,); (C,) = inv_var * c_rec
  int64_t n, c, d, k;
  const T* x;                      // (n, c), or the rows' source when rows is given
  const int64_t* rows;             // (n,): row t is x[rows[t]]; or null
  const uint8_t* keep;             // (n, c) or null
  const T* eps;
  const int64_t* labels;           // (n,) or null
  T scale, norm_eps, c_reg, c_cls;
  bool l2;
};

// One group's gradient buffers (in the parameters' order: hidden and mu layers' W and b, decoder W and b,
// classifier W and b) and sums.
template <typename T>
struct StepGrads {
  std::vector<std::vector<T>> gw, gb;
  std::vector<T> gwd, gwc, gbc;
  std::vector<double> sq, gbd, gez;
  double mu_sq = 0.0, ce = 0.0;

  explicit StepGrads(const StepNet<T>& net) {
    for (size_t l = 0; l < net.w.size(); ++l) {
      gw.emplace_back(static_cast<size_t>(net.out[l] * net.in[l]), T(0));
      gb.emplace_back(static_cast<size_t>(net.out[l]), T(0));
    }
    gwd.assign(static_cast<size_t>(net.c * net.d), T(0));
    gwc.assign(static_cast<size_t>(net.k * net.d), T(0));
    gbc.assign(static_cast<size_t>(net.k), T(0));
    sq.assign(static_cast<size_t>(net.c), 0.0);
    gbd.assign(static_cast<size_t>(net.c), 0.0);
    gez.assign(static_cast<size_t>(net.d), 0.0);
  }
};

template <typename T>
void add_column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* r = m + t * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += r[j];
  }
}

template <typename T>
void step_tile(const StepNet<T>& net, int64_t t0, int64_t rows, StepGrads<T>& g, std::vector<std::vector<T>>& act,
               std::vector<T>& xp, std::vector<T>& xin, std::vector<T>& z, std::vector<T>& am, std::vector<T>& lg,
               std::vector<T>& gz, std::vector<T>& gh, std::vector<T>& gh2, const std::vector<uint8_t>& ones) {
  using fvvae_fast::cpu::tile_gemm;
  const int64_t c = net.c, d = net.d, k = net.k, layers = static_cast<int64_t>(net.w.size());
  // x -> xp (the reconstruction's target) and x_in (the encoder's input), row by row from the source
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t r = net.rows != nullptr ? net.rows[t0 + t] : t0 + t;
    const uint8_t* k = net.keep != nullptr ? net.keep + (t0 + t) * c : ones.data();
    normalize_dropout_rows(net.x + r * c, k, 1, c, net.keep != nullptr ? net.scale : T(1), net.l2, net.norm_eps,
                           xp.data() + t * c, xin.data() + t * c);
  }
  // hidden layers (bias + ReLU) and mu (bias only): act[l] = layer l's output
  const T* in = xin.data();
  for (int64_t l = 0; l < layers; ++l) {
    T* out = act[l].data();
    const int64_t o = net.out[l], i = net.in[l];
    tile_gemm('T', 'N', o, rows, i, T(1), net.w[l], i, in, i, T(0), out, o);
    if (l + 1 < layers) {
      bias_relu_rows(out, net.b[l], rows, o);
    } else {
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t j = 0; j < o; ++j) out[t * o + j] += net.b[l][j];
    }
    in = out;
  }
  const T* mu = act[layers - 1].data();
  const T* eps = net.eps + t0 * d;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < d; ++j) {
      const T m = mu[t * d + j];
      g.mu_sq += static_cast<double>(m * m);
      z[t * d + j] = m + eps[t * d + j] * net.sigma_z[j];
    }
  }
  // decoder and reconstruction: am = dL/da = c_rec [a > 0] (a - x) inv_var; gbd += its column sums
  tile_gemm('T', 'N', c, rows, d, T(1), net.wd, d, z.data(), d, T(0), am.data(), c);
  reconstruction_rows(am.data(), net.bd, xp.data(), net.iv_rec, rows, c, g.sq.data(), g.gbd.data());
  tile_gemm('N', 'T', d, c, rows, T(1), z.data(), d, am.data(), c, T(1), g.gwd.data(), d);
  tile_gemm('N', 'N', d, rows, c, T(1), net.wd, d, am.data(), c, T(0), gz.data(), d);
  // classifier: lg = dL/dlogits = c_cls (softmax - onehot)
  if (net.wc != nullptr) {
    tile_gemm('T', 'N', k, rows, d, T(1), net.wc, d, z.data(), d, T(0), lg.data(), k);
    for (int64_t t = 0; t < rows; ++t) {
      T* r = lg.data() + t * k;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < k; ++j) top = std::max(top, r[j] += net.bc[j]);
      T total = T(0);
      for (int64_t j = 0; j < k; ++j) total += std::exp(r[j] - top);
      const int64_t y = net.labels[t0 + t];
      g.ce += static_cast<double>(std::log(total) + top - r[y]);
      for (int64_t j = 0; j < k; ++j) r[j] = net.c_cls * std::exp(r[j] - top) / total;
      r[y] -= net.c_cls;
    }
    add_column_sums(lg.data(), rows, k, g.gbc.data());
    tile_gemm('N', 'T', d, k, rows, T(1), z.data(), d, lg.data(), k, T(1), g.gwc.data(), d);
    tile_gemm('N', 'N', d, rows, k, T(1), net.wc, d, lg.data(), k, T(1), gz.data(), d);
  }
  // z = mu + eps sigma_z: gez += dL/dz eps; dL/dmu = dL/dz + c_reg mu (the KL's mu^2 / 2)
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < d; ++j) {
      g.gez[j] += static_cast<double>(gz[t * d + j] * eps[t * d + j]);
      gz[t * d + j] += net.c_reg * mu[t * d + j];
    }
  }
  // back through mu and the hidden layers: gh = dL/d(layer l's output)
  const T* gout = gz.data();
  for (int64_t l = layers - 1; l >= 0; --l) {
    const int64_t o = net.out[l], i = net.in[l];
    const T* lin = l == 0 ? xin.data() : act[l - 1].data();
    add_column_sums(gout, rows, o, g.gb[l].data());
    tile_gemm('N', 'T', i, o, rows, T(1), lin, i, gout, o, T(1), g.gw[l].data(), i);
    if (l == 0) break;
    T* gin = gout == gh.data() ? gh2.data() : gh.data();
    tile_gemm('N', 'N', i, rows, o, T(1), net.w[l], i, gout, o, T(0), gin, i);
    const T* h = act[l - 1].data();
    for (int64_t e = 0; e < rows * i; ++e) gin[e] = h[e] > T(0) ? gin[e] : T(0);  // the hidden ReLU
    gout = gin;
  }
}

template <typename T>
std::vector<at::Tensor> train_step_kernel(const StepNet<T>& net, const at::TensorOptions& opts) {
  const int64_t tiles = (net.n + kStepTile - 1) / kStepTile;
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  std::vector<StepGrads<T>> grads;
  for (int64_t q = 0; q < groups; ++q) grads.emplace_back(net);
  int64_t widest = std::max(net.c, net.d);
  for (int64_t o : net.out) widest = std::max(widest, o);
  const auto run_groups = [&](int64_t lo, int64_t hi) {
    fvvae_fast::cpu::OneBlasThread one_blas_thread;
    const size_t tile = static_cast<size_t>(kStepTile);
    std::vector<std::vector<T>> act;
    for (int64_t o : net.out) act.emplace_back(tile * o);
    std::vector<T> xp(tile * net.c), xin(tile * net.c), z(tile * net.d), am(tile * net.c),
        lg(tile * std::max<int64_t>(net.k, 1)), gz(tile * widest), gh(tile * widest), gh2(tile * widest);
    const std::vector<uint8_t> ones(static_cast<size_t>(net.c), 1);  // the keep mask without dropout
    for (int64_t q = lo; q < hi; ++q) {
      for (int64_t s = q * tiles / groups; s < (q + 1) * tiles / groups; ++s) {
        const int64_t t0 = s * kStepTile, rows = std::min(net.n, t0 + kStepTile) - t0;
        step_tile(net, t0, rows, grads[q], act, xp, xin, z, am, lg, gz, gh, gh2, ones);
      }
    }
  };
#if defined(_OPENMP)
#pragma omp parallel for num_threads(groups) schedule(static, 1)
#endif
  for (int64_t q = 0; q < groups; ++q) run_groups(q, q + 1);
  // the groups' sums, in order
  std::vector<at::Tensor> out;
  at::Tensor sums = at::zeros({2}, opts.dtype(at::kDouble)), sq = at::zeros({net.c}, opts.dtype(at::kDouble)),
             gez = at::zeros({net.d}, opts.dtype(at::kDouble)), gbd = at::zeros({net.c}, opts);
  at::Tensor gwd = at::zeros({net.c, net.d}, opts), gwc = at::zeros({net.k, net.d}, opts),
             gbc = at::zeros({net.k}, opts);
  std::vector<at::Tensor> gw, gb;
  for (size_t l = 0; l < net.w.size(); ++l) {
    gw.push_back(at::zeros({net.out[l], net.in[l]}, opts));
    gb.push_back(at::zeros({net.out[l]}, opts));
  }
  auto add = [](at::Tensor& dst, const auto& src) {
    using S = typename std::decay_t<decltype(src)>::value_type;
    S* p = dst.data_ptr<S>();
    for (size_t e = 0; e < src.size(); ++e) p[e] += src[e];
  };
  for (const StepGrads<T>& g : grads) {
    sums.data_ptr<double>()[0] += g.mu_sq;
    sums.data_ptr<double>()[1] += g.ce;
    add(sq, g.sq);
    add(gez, g.gez);
    T* pb = gbd.data_ptr<T>();
    for (int64_t j = 0; j < net.c; ++j) pb[j] += static_cast<T>(g.gbd[j]);
    add(gwd, g.gwd);
    add(gwc, g.gwc);
    add(gbc, g.gbc);
    for (size_t l = 0; l < net.w.size(); ++l) {
      add(gw[l], g.gw[l]);
      add(gb[l], g.gb[l]);
    }
  }
  out = {sums, sq, gez, gwd, gbd, gwc, gbc};
  for (size_t l = 0; l < net.w.size(); ++l) {
    out.push_back(gw[l]);
    out.push_back(gb[l]);
  }
  return out;
}

std::vector<at::Tensor> train_step_cpu(const at::Tensor& x, const std::optional<at::Tensor>& rows,
                                       const std::optional<at::Tensor>& keep,
                                       const at::Tensor& eps, const std::optional<at::Tensor>& labels,
                                       at::TensorList weights, at::TensorList biases, const at::Tensor& w_dec,
                                       const at::Tensor& b_dec, const std::optional<at::Tensor>& w_cls,
                                       const std::optional<at::Tensor>& b_cls, const at::Tensor& sigma_z,
                                       const at::Tensor& inv_var, double scale, bool l2, double norm_eps,
                                       double c_rec, double c_reg, double c_cls) {
  constexpr const char* op = "train_step_cpu";
  check_matrix(op, "x", x);
  check_matrix(op, "eps", eps);
  check_matrix(op, "w_dec", w_dec);
  const int64_t n = rows.has_value() ? rows->numel() : x.size(0), c = x.size(1), d = w_dec.size(1);
  const auto dtype = x.scalar_type();
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->is_contiguous(), op,
                ": rows must be a contiguous (N,) int64 tensor");
    if (n > 0) {
      TORCH_CHECK(rows->min().item<int64_t>() >= 0 && rows->max().item<int64_t>() < x.size(0), op,
                  ": rows must index x's ", x.size(0), " rows");
    }
  }
  TORCH_CHECK(weights.size() == biases.size() && !weights.empty(), op, ": one bias per layer, at least the mu layer");
  TORCH_CHECK(eps.size(0) == n && eps.size(1) == d && w_dec.size(0) == c, op, ": eps must be (N, d) and w_dec (C, d)");
  int64_t width = c;
  for (size_t l = 0; l < weights.size(); ++l) {
    check_matrix(op, "weights[l]", weights[l]);
    TORCH_CHECK(weights[l].size(1) == width && weights[l].scalar_type() == dtype && biases[l].dim() == 1 &&
                    biases[l].size(0) == weights[l].size(0) && biases[l].is_contiguous() &&
                    biases[l].scalar_type() == dtype,
                op, ": layer ", l, " does not chain: weight ", weights[l].sizes(), ", bias ", biases[l].sizes());
    width = weights[l].size(0);
  }
  TORCH_CHECK(width == d, op, ": the last layer gives ", width, " values, the decoder takes d = ", d);
  for (const at::Tensor* t : {&eps, &w_dec, &b_dec, &sigma_z, &inv_var}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), op, ": every tensor must be contiguous ", dtype);
  }
  TORCH_CHECK(b_dec.numel() == c && inv_var.numel() == c && sigma_z.numel() == d, op,
              ": b_dec and inv_var must be (C,), sigma_z (d,)");
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->is_contiguous() && keep->dim() == 2 && keep->size(0) == n &&
                    keep->size(1) == c,
                op, ": keep must be a contiguous (N, C) bool tensor");
  }
  const bool cls = w_cls.has_value();
  int64_t k = 0;
  if (cls) {
    check_matrix(op, "w_cls", *w_cls);
    k = w_cls->size(0);
    TORCH_CHECK(w_cls->size(1) == d && w_cls->scalar_type() == dtype && b_cls.has_value() && b_cls->numel() == k &&
                    b_cls->is_contiguous() && b_cls->scalar_type() == dtype,
                op, ": w_cls must be (K, d) and b_cls (K,) of x's dtype");
    TORCH_CHECK(labels.has_value() && labels->scalar_type() == at::kLong && labels->numel() == n &&
                    labels->is_contiguous(),
                op, ": labels (N,) int64 are needed with the classifier");
    if (n > 0) {
      TORCH_CHECK(labels->min().item<int64_t>() >= 0 && labels->max().item<int64_t>() < k, op,
                  ": labels must be in [0, ", k, ")");
    }
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    using T = scalar_t;
    StepNet<T> net;
    int64_t in = c;
    for (size_t l = 0; l < weights.size(); ++l) {
      net.w.push_back(weights[l].data_ptr<T>());
      net.b.push_back(biases[l].data_ptr<T>());
      net.in.push_back(in);
      net.out.push_back(weights[l].size(0));
      in = weights[l].size(0);
    }
    at::Tensor iv_rec = inv_var * c_rec;
    net.wd = w_dec.data_ptr<T>();
    net.bd = b_dec.data_ptr<T>();
    net.wc = cls ? w_cls->data_ptr<T>() : nullptr;
    net.bc = cls ? b_cls->data_ptr<T>() : nullptr;
    net.sigma_z = sigma_z.data_ptr<T>();
    net.iv_rec = iv_rec.data_ptr<T>();
    net.n = n;
    net.c = c;
    net.d = d;
    net.k = k;
    net.x = x.data_ptr<T>();
    net.rows = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
    net.keep = keep.has_value() ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
    net.eps = eps.data_ptr<T>();
    net.labels = cls ? labels->data_ptr<int64_t>() : nullptr;
    net.scale = static_cast<T>(scale);
    net.norm_eps = static_cast<T>(norm_eps);
    net.c_reg = static_cast<T>(c_reg);
    net.c_cls = static_cast<T>(c_cls);
    net.l2 = l2;
    out = train_step_kernel<T>(net, x.options());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) {
  m.impl("normalize_dropout_cpu", TORCH_FN(normalize_dropout_cpu));
  m.impl("reconstruction_error_cpu", TORCH_FN(reconstruction_error_cpu));
  m.impl("bias_relu_cpu_", TORCH_FN(bias_relu_cpu_));
  m.impl("adadelta_step_cpu", TORCH_FN(adadelta_step_cpu));
  m.impl("train_step_cpu", TORCH_FN(train_step_cpu));
}

TORCH_LIBRARY_IMPL(fvvae_fast, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_cpu", TORCH_FN(dropout_keep_cpu));
}
