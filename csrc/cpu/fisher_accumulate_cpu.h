// CPU kernels of fvvae_fast::fisher_accumulate (forward and backward), on raw pointers.
//
// The op entry points (argument checks, dtype handling, registration) are in
// csrc/fisher_accumulate.cpp; this header is the contract between the two files, and gives the
// other CPU ops (csrc/sum_of_squares.cpp, csrc/train_loss.cpp) the debug hooks and the ISA clones.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// Element-wise tile passes are compiled for AVX-512, AVX2 and the baseline, picked at
// load time (the extension itself is built for the baseline ISA).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__)
#define FV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FV_CLONES
#endif

#if defined(__GNUC__)
#define FV_INLINE inline __attribute__((always_inline))
#else
#define FV_INLINE inline
#endif

namespace fvvae_fast::cpu {

// Shapes of one call. Every array is dense row-major; all pointers are valid for
// the sizes below (the caller has checked them).
struct Problem {
  int64_t n;  // rows of x and z (N)
  int64_t c;  // descriptor dim (C)
  int64_t d;  // latent dim (d)
  int64_t s;  // number of sets (S); offsets has s + 1 entries, 0 = o[0] <= ... <= o[s] = n
};

// The Fisher vector's normalisation, fused into the forward's epilogue (paper Eq. 13, then the
// signed square root and the L2 normalisation of section 4):
//   y = -scale * vec(G[s]),  out[s] = sign(y) sqrt|y| / max(||sign(y) sqrt|y|||, eps)
// scale: (C * (d+1)) diagonal whitening F^(-1/2), or null for F = I.
template <typename T>
struct Normalize {
  const T* scale;
  T eps;
};

// G[s] = sum_t r_t [z_t; 1]^T for every set, computed in T (float or double).
//   x (N, C), z (N, d), weight (C, d), bias (C,), inv_var (C,), offsets (S+1,)
//   out (S, C, d+1) in O (float, double, c10::Half or c10::BFloat16): every element is written
//   (empty sets get zeros); O = T accumulates in place, any other O is converted from the T
//   accumulators once per output block. With `normalize`, out holds the normalised vectors instead.
template <typename T, typename O>
void forward(const Problem& p, const T* x, const T* z, const T* weight, const T* bias, const T* inv_var,
             const int64_t* offsets, O* out, const Normalize<T>* normalize = nullptr);

// Gradients of <grad, G>, computed in T; grad (S, C, d+1) in Gr (any of the types of O above,
// converted to T tile by tile).
//   gx (N, C) and gz (N, d): every element is written.
//   gw (C, d), gb (C,), gv (C,): every element is written.
template <typename T, typename Gr>
void backward(const Problem& p, const Gr* grad, const T* x, const T* z, const T* weight, const T* bias,
              const T* inv_var, const int64_t* offsets, T* gx, T* gz, T* gw, T* gb, T* gv);

// MKL runs single-threaded on the calling thread while one of these lives: the kernels parallelise
// across tiles themselves, and MKL's own threads inside theirs would oversubscribe the cores.
class OneBlasThread {
 public:
  OneBlasThread();
  ~OneBlasThread();
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_ = 0;
};

// C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, all column-major with leading dims (BLAS's
// convention; a row-major [r, q] matrix is a column-major [q, r] one); beta = 0 never reads C. Runs the
// GEMM mode below on the calling thread (the kernels parallelise over tiles).
void tile_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void tile_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// Debug and test hooks (process-wide):
// - the tile GEMMs: kAuto calls the BLAS that torch links (MKL sgemm_/dgemm_) when torch
//   exports it, else at::addmm_ on tensor views (kTorch); kNaive runs plain loops in this
//   library (slow; lets AddressSanitizer or valgrind see every access the GEMMs make).
enum class Gemm { kAuto = 0, kTorch = 1, kNaive = 2 };
bool blas_available();
void set_gemm(Gemm mode);
Gemm gemm_mode();
// - fill every output and scratch buffer with NaN before computing, so an element the
//   kernel forgot to write shows up as NaN.
void set_poison(bool poison);
bool poison_enabled();
// - advise transparent huge pages on outputs of at least 32 MiB (on by default on Linux):
//   their first-touch page faults otherwise cost as much as the GEMMs of short sets.
void set_huge_pages(bool on);
void advise_huge_pages(void* ptr, int64_t bytes);
// - keep freed outputs of at least 32 MiB (at most two, 1 GiB in all) for the next output of the
//   same size (on by default): a fresh mapping is page-faulted and zeroed by the kernel on first
//   touch, which costs more than the op itself at frame-sized sets.
void set_output_cache(bool on);
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fvvae_fast::cpu
