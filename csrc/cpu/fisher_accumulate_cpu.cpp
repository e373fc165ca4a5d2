// CPU kernels of fvvae_fast::fisher_accumulate: forward and backward, float and double.
//
// Forward. A work unit is (group of consecutive sets, tile of NC decoder rows c0:c1). A
// group is either one set longer than a row tile or several short sets with at most NT
// rows in all, so short sets still share one large decoder GEMM. For each tile of <= NT
// rows t0:t1 of the group:
//
//   A = z[t0:t1] W[c0:c1]^T                       GEMM [NT, NC]  (scratch, one per thread)
//   for each set s the tile touches (rows t:u):
//     A[t:u] = r = (ReLU(A + b) - x) * inv_var * [A + b > 0]        in place, tile hot
//     G[s, c0:c1, :d] (+)= r^T z[t:u]             GEMM [NC, d]   (straight into the output)
//     G[s, c0:c1,  d] (+)= sum_t r_t               column sums of the segment
//
// so mu_x and r only ever exist for one [NT, NC] tile per thread, and the [NC, d+1] block
// of the output a unit owns stays in L2 while it accumulates. (G in another type than the
// accumulation, out_dtype = bfloat16 say: the block accumulates in a per-thread scratch
// block, converted into G once, when the set's last rows are in.) Each unit writes every
// element of its blocks (the first rows of a set use beta = 0, empty sets get zeros), in a
// fixed order; units are handed to threads dynamically (longest first) and no two units
// write the same block, so there are no atomics, no shared accumulators, and the result
// does not depend on the schedule or on which thread ran what.
//
// Backward. Units are 1 (one thread) or 2 per thread contiguous row chunks. For each row
// tile t0:t1 (inside one set s, P = grad[s]) and C tile c0:c1:
//
//   A = z W[c0:c1]^T,  Q = z P[c0:c1, :d]^T            GEMMs [NT, NC]
//   m = [A + b > 0], diff = (ReLU(A + b) - x) m, q = Q + P[c0:c1, d]
//   da = inv_var m q;  dx = -da;  db += sum_t da;  dinv_var += sum_t diff q
//   dW[c0:c1] += da^T z                                 GEMM  [NC, d]  (the chunk's partial)
//   dz (+)= da W[c0:c1] + (diff inv_var) P[c0:c1, :d]   GEMMs [NT, d]
//
// dx and dz rows belong to one chunk; dW, db, dinv_var are per-chunk partials (chunk 0
// writes the outputs) summed in chunk order at the end: deterministic for a fixed number
// of threads. An upstream grad in another type (G's out_dtype) is converted per [NC, d+1]
// tile of P into scratch, where the GEMMs read it.
//
// The tile GEMMs call the BLAS that torch links (MKL's sgemm_/dgemm_, single-threaded
// inside our OpenMP region) when torch exports it, else at::addmm_ on tensor views.

#include "fisher_accumulate_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

// The Fortran BLAS entry points (LP64) and MKL's thread control, as exported by
// libtorch_cpu when torch is built with MKL. Weak: null when absent, and then the
// kernels use at::addmm_ instead (never a link or load error).
#if defined(__GNUC__) && !defined(_WIN32)
#define FV_HAVE_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// C interface (mkl.h maps mkl_set_num_threads_local to it; the lowercase symbol is the
// Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}
#else
#define FV_HAVE_WEAK_BLAS 0
#endif

namespace fvvae_fast::cpu {
namespace {

// ---- tile sizes -------------------------------------------------------------------
constexpr int64_t kRowTile = 256;              // NT: descriptors per forward tile (at most)
constexpr int64_t kBackwardRowTile = 64;       // descriptors per backward tile
constexpr double kScratchShare = 0.04;         // all [NT, NC] scratch tiles <= 4% of the output
constexpr int64_t kOutTileBytes = 512 * 1024;  // the [NC, d+1] output block of a unit stays in L2
constexpr int64_t kBackwardScratchBytes = 64 * 1024;  // each of the two [NT, NC] backward tiles
constexpr int64_t kWholeSetBytes = 1024 * 1024;        // a set's [C, d+1] block the normalisation keeps whole
// Outputs this large are always their own mmap under glibc (its largest mmap threshold), so
// advising transparent huge pages on them affects nothing else in the process.
constexpr int64_t kHugePageMinBytes = int64_t(32) << 20;
constexpr size_t kHugePage = size_t(2) << 20;  // a transparent huge page (x86-64)

std::atomic<int> g_gemm{static_cast<int>(Gemm::kAuto)};
std::atomic<bool> g_poison{false};
std::atomic<bool> g_huge_pages{true};

// ---- GEMM (column-major BLAS convention) ------------------------------------------
// C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, all column-major with leading dims.
// beta = 0 never reads C.

template <typename T>
void torch_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // A column-major [r, q] matrix with leading dim ld is a row-major view with strides (1, ld).
  auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return trans ? at::from_blob(const_cast<T*>(ptr), {rows, cols}, {ld, 1}, opts)
                 : at::from_blob(const_cast<T*>(ptr), {rows, cols}, {1, ld}, opts);
  };
  at::Tensor ct = view(c, m, n, ldc, false);
  ct.addmm_(view(a, m, k, lda, ta == 'T'), view(b, k, n, ldb, tb == 'T'), beta, alpha);
}

// The loops BLAS would run, reading exactly the elements it may read: slow, for the
// sanitizer test (AddressSanitizer sees every access, which it cannot inside MKL).
template <typename T>
void naive_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = T(0);
      for (int64_t l = 0; l < k; ++l) {
        const T av = ta == 'T' ? a[l + i * lda] : a[i + l * lda];
        const T bv = tb == 'T' ? b[j + l * ldb] : b[l + j * ldb];
        acc += av * bv;
      }
      T& cij = c[i + j * ldc];
      cij = beta == T(0) ? alpha * acc : alpha * acc + beta * cij;
    }
  }
}

bool fits_int(std::initializer_list<int64_t> dims) {
  for (int64_t v : dims) {
    if (v > INT_MAX) return false;
  }
  return true;
}

template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto mode = static_cast<Gemm>(g_gemm.load(std::memory_order_relaxed));
  if (mode == Gemm::kNaive) {
    naive_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#if FV_HAVE_WEAK_BLAS
  if (mode == Gemm::kAuto && k > 0 && fits_int({m, n, k, lda, ldb, ldc})) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      if (sgemm_ != nullptr) {
        sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
        return;
      }
    } else {
      if (dgemm_ != nullptr) {
        dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
        return;
      }
    }
  }
#endif
  torch_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// 64-byte aligned scratch from torch's CPU allocator (visible to its memory profiling).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t elems)
      : ptr_(c10::GetCPUAllocator()->allocate(static_cast<size_t>(std::max<int64_t>(elems, 1)) * sizeof(T))) {
    if (g_poison.load(std::memory_order_relaxed)) {
      std::fill(data(), data() + elems, std::numeric_limits<T>::quiet_NaN());
    }
  }
  T* data() { return static_cast<T*>(ptr_.get()); }

 private:
  c10::DataPtr ptr_;
};

template <typename T>
void poison(T* ptr, int64_t elems) {
  if (g_poison.load(std::memory_order_relaxed)) std::fill(ptr, ptr + elems, std::numeric_limits<T>::quiet_NaN());
}

// dst[i] = src[i] rounded to nearest (even) in To.
template <typename From, typename To>
void convert(const From* __restrict src, int64_t elems, To* __restrict dst) {
  for (int64_t i = 0; i < elems; ++i) dst[i] = static_cast<To>(src[i]);
}

// ---- element-wise tile passes -------------------------------------------------------
// The arithmetic follows the reference term by term (multiplying by the mask rather
// than selecting), so NaN/Inf propagate exactly as in fvvae_fast.ops.reference.

// a: [nt, nc] (ld nc) holds W z on entry and r on exit; x: [nt, nc] with leading dim ldx.
// colsum[i] = sum_t r[t, i].
template <typename T>
FV_INLINE void residual_tile_body(int64_t nt, int64_t nc, T* __restrict a, const T* __restrict x, int64_t ldx,
                                  const T* __restrict b, const T* __restrict iv, T* __restrict colsum) {
  for (int64_t i = 0; i < nc; ++i) colsum[i] = T(0);
  for (int64_t t = 0; t < nt; ++t) {
    T* __restrict at = a + t * nc;
    const T* __restrict xt = x + t * ldx;
    for (int64_t i = 0; i < nc; ++i) {
      const T v = at[i] + b[i];
      const T mask = v > T(0) ? T(1) : T(0);
      const T relu = v < T(0) ? T(0) : v;  // ReLU that keeps NaN (as clamp_min does)
      const T r = (relu - xt[i]) * iv[i] * mask;
      at[i] = r;
      colsum[i] += r;
    }
  }
}

// Backward pass over one tile. On entry a = W z, q = P[:, :d] z (both [nt, nc], ld nc).
// On exit a = diff * inv_var (= r), q = da; gx rows get -da; gbs/gvs get the column sums.
template <typename T>
FV_INLINE void backward_tile_body(int64_t nt, int64_t nc, T* __restrict a, T* __restrict q, const T* __restrict x,
                                  T* __restrict gx, int64_t ldx, const T* __restrict b, const T* __restrict pb,
                                  const T* __restrict iv, T* __restrict gbs, T* __restrict gvs) {
  for (int64_t i = 0; i < nc; ++i) {
    gbs[i] = T(0);
    gvs[i] = T(0);
  }
  for (int64_t t = 0; t < nt; ++t) {
    T* __restrict at = a + t * nc;
    T* __restrict qt = q + t * nc;
    const T* __restrict xt = x + t * ldx;
    T* __restrict gxt = gx + t * ldx;
    for (int64_t i = 0; i < nc; ++i) {
      const T v = at[i] + b[i];
      const T mask = v > T(0) ? T(1) : T(0);
      const T relu = v < T(0) ? T(0) : v;
      const T diff = (relu - xt[i]) * mask;
      const T qq = qt[i] + pb[i];
      const T da = iv[i] * mask * qq;
      gxt[i] = -da;
      gbs[i] += da;
      gvs[i] += diff * qq;
      at[i] = diff * iv[i];
      qt[i] = da;
    }
  }
}

FV_CLONES void residual_tile(int64_t nt, int64_t nc, float* a, const float* x, int64_t ldx, const float* b,
                             const float* iv, float* colsum) {
  residual_tile_body<float>(nt, nc, a, x, ldx, b, iv, colsum);
}
FV_CLONES void residual_tile(int64_t nt, int64_t nc, double* a, const double* x, int64_t ldx, const double* b,
                             const double* iv, double* colsum) {
  residual_tile_body<double>(nt, nc, a, x, ldx, b, iv, colsum);
}
FV_CLONES void backward_tile(int64_t nt, int64_t nc, float* a, float* q, const float* x, float* gx, int64_t ldx,
                             const float* b, const float* pb, const float* iv, float* gbs, float* gvs) {
  backward_tile_body<float>(nt, nc, a, q, x, gx, ldx, b, pb, iv, gbs, gvs);
}
FV_CLONES void backward_tile(int64_t nt, int64_t nc, double* a, double* q, const double* x, double* gx, int64_t ldx,
                             const double* b, const double* pb, const double* iv, double* gbs, double* gvs) {
  backward_tile_body<double>(nt, nc, a, q, x, gx, ldx, b, pb, iv, gbs, gvs);
}

// The normalisation epilogue on a block of n consecutive elements of vec(G[s]) (in place):
// y = -scale * g, g <- sign(y) sqrt|y|; returns sum |y|, the block's share of ||sign(y) sqrt|y|||^2.
// The sum runs in kLanes float partials (vectorised) flushed into a double every kFlush elements.
constexpr int64_t kLanes = 16;
constexpr int64_t kFlush = 1024;

template <typename T, bool kScaled>
FV_INLINE double signed_sqrt_body(int64_t n, T* __restrict g, const T* __restrict scale) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kFlush) {
    const int64_t i1 = std::min(n, i0 + kFlush);
    T lanes[kLanes] = {};
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const T y = kScaled ? -(scale[i + l] * g[i + l]) : -g[i + l];
        lanes[l] += std::fabs(y);
        g[i + l] = std::copysign(std::sqrt(std::fabs(y)), y);
      }
    }
    for (; i < i1; ++i) {
      const T y = kScaled ? -(scale[i] * g[i]) : -g[i];
      lanes[0] += std::fabs(y);
      g[i] = std::copysign(std::sqrt(std::fabs(y)), y);
    }
    for (int64_t l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  }
  return total;
}

FV_CLONES double signed_sqrt_block(int64_t n, float* g, const float* scale) {
  return scale ? signed_sqrt_body<float, true>(n, g, scale) : signed_sqrt_body<float, false>(n, g, nullptr);
}
FV_CLONES double signed_sqrt_block(int64_t n, double* g, const double* scale) {
  return scale ? signed_sqrt_body<double, true>(n, g, scale) : signed_sqrt_body<double, false>(n, g, nullptr);
}

// dst[i] = src[i] * factor, rounded to O (src and dst may be the same array).
template <typename T, typename O>
void scale_into(const T* src, int64_t n, T factor, O* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<O>(src[i] * factor);
}

// 1 / max(sqrt(sum_sq), eps), the L2 normalisation's factor.
template <typename T>
T inverse_norm(double sum_sq, T eps) {
  return static_cast<T>(1.0 / std::max(std::sqrt(sum_sq), static_cast<double>(eps)));
}

// ---- scheduling ---------------------------------------------------------------------

int64_t round_down16(int64_t v) { return std::max<int64_t>(16, v / 16 * 16); }

// Forward tile sizes. NT: rows of a tile (one decoder GEMM); NC: decoder rows of a tile,
// so the [NC, d+1] output block of a unit stays in L2 across its row tiles
// (kOutTileBytes). The [NT, NC] scratch of all threads together stays under kScratchShare
// of the output (and within [16 KiB, 256 KiB] per thread).
struct Tiles {
  int64_t nt;
  int64_t nc;
};

template <typename T>
Tiles forward_tiles(const Problem& p, int64_t threads, bool whole_sets) {
  const int64_t es = static_cast<int64_t>(sizeof(T));
  const double out_bytes = static_cast<double>(p.s) * static_cast<double>(p.c) * static_cast<double>(p.d + 1) * es;
  const int64_t budget =
      static_cast<int64_t>(std::clamp(out_bytes * kScratchShare / threads, 16.0 * 1024, 256.0 * 1024)) / es;
  int64_t nt = std::min(kRowTile, std::max<int64_t>(p.n, 1));
  int64_t nc = std::min(p.c, round_down16(kOutTileBytes / ((p.d + 1) * es)));
  // the normalisation wants a set's whole vector in one unit, normalised while it is in cache, unless
  // that leaves tiles of fewer than 128 rows (short GEMMs cost more than a last pass over the output)
  const bool keep_c = whole_sets && p.c * (p.d + 1) * es <= kWholeSetBytes && budget >= kRowTile / 2 * p.c;
  if (keep_c) nc = p.c;
  // shrink the larger side first, down to 128 x 128, then 32 rows and 16 columns
  while (nt * nc > budget) {
    if (keep_c && nt > 32) {
      nt /= 2;
    } else if (nc > 256 || (nt <= 128 && nc > 128)) {
      nc = round_down16(nc / 2);
    } else if (nt > 32) {
      nt /= 2;
    } else if (nc > 16) {
      nc = round_down16(nc / 2);
    } else {
      break;
    }
  }
  return {nt, std::min(nc, p.c)};
}

// Groups of consecutive sets with at most nt rows in all, so that short sets share one
// decoder GEMM; a set longer than nt is a group of its own (split into row tiles).
// Returns the first set of every group, then S.
std::vector<int64_t> group_sets(const int64_t* offsets, int64_t num_sets, int64_t nt) {
  std::vector<int64_t> starts{0};
  int64_t rows = 0;
  for (int64_t s = 0; s < num_sets; ++s) {
    const int64_t len = offsets[s + 1] - offsets[s];
    if (s > starts.back() && rows + len > nt) {
      starts.push_back(s);
      rows = 0;
    }
    rows += len;
  }
  starts.push_back(num_sets);
  return starts;
}

int64_t num_threads() { return std::max<int64_t>(1, at::in_parallel_region() ? 1 : at::get_num_threads()); }

// Runs body(state, u) for every u in [0, units) on `threads` OpenMP threads; units are
// handed out one at a time in order (dynamic schedule), so a thread slowed down by other
// work on the machine does not hold the others up. Callers make the result independent of
// which thread runs which unit. state = make_state() is per thread (scratch buffers); MKL
// runs single-threaded inside. The first exception is rethrown after the region.
template <typename MakeState, typename Body>
void for_each_unit(int64_t units, int64_t threads, const MakeState& make_state, const Body& body) {
  if (units <= 0) return;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto record = [&] {
#if defined(_OPENMP)
#pragma omp critical(fvvae_fast_cpu_error)
#endif
    if (!error) error = std::current_exception();
    failed.store(true);
  };
  const int team = static_cast<int>(std::min<int64_t>(threads, units));
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) if (team > 1)
#endif
  {
    OneBlasThread one_blas_thread;
    std::optional<decltype(make_state())> state;
    try {
      state.emplace(make_state());
    } catch (...) {
      record();
    }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t u = 0; u < units; ++u) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        body(*state, u);
      } catch (...) {
        record();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!g_huge_pages.load(std::memory_order_relaxed) || bytes < kHugePageMinBytes) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(ptr) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // best effort
#else
  (void)ptr;
  (void)bytes;
#endif
}

// ---- outputs ------------------------------------------------------------------------

namespace {

constexpr size_t kCacheBlocks = 2;
constexpr size_t kCacheMaxBytes = size_t(1) << 30;
std::atomic<bool> g_output_cache{true};

// Freed output buffers kept for the next output of the same size (a loop over batches of frames
// then touches the same pages every call). Leaked on purpose: tensors may be freed at exit, after
// static destructors have run.
class OutputCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].second == bytes) {
        void* ptr = blocks_[i].first;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        return ptr;
      }
    }
    return nullptr;
  }
  void give(void* ptr, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!g_output_cache.load() || bytes > kCacheMaxBytes) {
        evicted = ptr;
      } else {
        size_t held = bytes;
        for (const auto& b : blocks_) held += b.second;
        if (blocks_.size() == kCacheBlocks || held > kCacheMaxBytes) {  // the oldest goes
          evicted = blocks_.front().first;
          blocks_.erase(blocks_.begin());
        }
        blocks_.emplace_back(ptr, bytes);
      }
    }
    std::free(evicted);
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& b : blocks_) std::free(b.first);
    blocks_.clear();
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
};

OutputCache& output_cache() {
  static auto* cache = new OutputCache();
  return *cache;
}

struct CachedBlock {
  void* ptr;
  size_t size;
};

void release_block(void* context) {
  auto* block = static_cast<CachedBlock*>(context);
  output_cache().give(block->ptr, block->size);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!g_output_cache.load() || bytes < static_cast<size_t>(kHugePageMinBytes)) return at::empty(sizes, options);
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = output_cache().take(size);
  if (ptr == nullptr) {
    ptr = std::aligned_alloc(kHugePage, size);
    TORCH_CHECK(ptr != nullptr, "fvvae_fast: could not allocate an output of ", size, " bytes");
    advise_huge_pages(ptr, static_cast<int64_t>(size));
  }
  // a resizable storage: growing the tensor later moves it to torch's allocator and frees this block
  c10::DataPtr data(ptr, new CachedBlock{ptr, size}, &release_block, at::Device(at::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(), true);
  return at::empty({0}, options).set_(std::move(storage), 0, sizes);
}

void set_output_cache(bool on) {
  g_output_cache.store(on);
  if (!on) output_cache().clear();
}

// ---- forward ------------------------------------------------------------------------

template <typename T, typename O>
void forward(const Problem& p, const T* x, const T* z, const T* weight, const T* bias, const T* inv_var,
             const int64_t* offsets, O* out, const Normalize<T>* normalize) {
  constexpr bool kInPlace = std::is_same_v<T, O>;  // accumulate straight into G
  const int64_t C = p.c, d = p.d, D1 = d + 1;
  advise_huge_pages(out, p.s * C * D1 * static_cast<int64_t>(sizeof(O)));
  poison(out, p.s * C * D1);
  if (p.s == 0) return;
  const int64_t threads = num_threads();
  const Tiles tiles = forward_tiles<T>(p, threads, normalize != nullptr);
  const int64_t nt = tiles.nt;
  const std::vector<int64_t> groups = group_sets(offsets, p.s, nt);
  const int64_t num_groups = static_cast<int64_t>(groups.size()) - 1;
  int64_t nc = tiles.nc;  // narrower C tiles until every thread has >= 2 units
  while (nc > 32 && num_groups * ((C + nc - 1) / nc) < 2 * threads) nc = round_down16(nc / 2);
  const int64_t ctiles = (C + nc - 1) / nc;
  auto group_rows = [&](int64_t g) { return offsets[groups[g + 1]] - offsets[groups[g]]; };
  // unit = (group, C tile); the longest groups first so the dynamic schedule ends balanced
  std::vector<int64_t> order(static_cast<size_t>(num_groups * ctiles));
  for (size_t u = 0; u < order.size(); ++u) order[u] = static_cast<int64_t>(u);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t u, int64_t v) { return group_rows(u / ctiles) > group_rows(v / ctiles); });
  // Normalisation: a set's vector is whole in one unit when ctiles == 1; else each unit leaves its
  // block's sum |y| here and a last pass scales every set.
  std::vector<double> sum_sq(normalize != nullptr && ctiles > 1 ? static_cast<size_t>(p.s * ctiles) : 0, 0.0);
  // ... its signed roots waiting for that pass in T when O is 16-bit: in fp16 they overflow above 65504
  // (|y| > 4.3e9) and lose their digits below 6e-5, and either way they would be rounded twice.
  const bool staged = !sum_sq.empty() && sizeof(O) < sizeof(float);
  std::unique_ptr<T[]> roots(staged ? new T[static_cast<size_t>(p.s * C * D1)] : nullptr);
  if (staged) poison(roots.get(), p.s * C * D1);

  for_each_unit(
      static_cast<int64_t>(order.size()), threads,
      [&] { return Scratch<T>(nt * nc + nc + (kInPlace ? 0 : nc * D1)); },
      [&](Scratch<T>& scratch, int64_t k) {
        const int64_t u = order[static_cast<size_t>(k)];
        const int64_t g = u / ctiles, c0 = (u % ctiles) * nc, ncu = std::min(nc, C - c0);
        const int64_t s_begin = groups[g], s_end = groups[g + 1];
        const int64_t lo = offsets[s_begin], hi = offsets[s_end];
        T* a = scratch.data();    // [rows, ncu]: W z, then r
        T* colsum = a + nt * nc;  // [ncu]
        T* acc = colsum + nc;     // [ncu, d+1]: the accumulators of G[s, c0:c0+ncu] (unless in place)
        // G[s, c0:c0+ncu, :]: an [ncu, d+1] block, leading dim d+1
        auto block = [&](int64_t s) { return out + (s * C + c0) * D1; };
        auto staged_block = [&](int64_t s) { return roots.get() + (s * C + c0) * D1; };
        for (int64_t s = s_begin; s < s_end; ++s) {
          if (offsets[s] != offsets[s + 1]) continue;
          if (staged) {
            std::fill(staged_block(s), staged_block(s) + ncu * D1, T(0));
          } else {
            std::fill(block(s), block(s) + ncu * D1, O(0));
          }
        }
        // the set's block is complete in gs: G, or (normalize) its part of the Fisher vector, in O
        auto finish = [&](int64_t s, T* gs) {
          if (normalize == nullptr) {
            if constexpr (!kInPlace) convert(gs, ncu * D1, block(s));
            return;
          }
          const double sq = signed_sqrt_block(ncu * D1, gs, normalize->scale ? normalize->scale + c0 * D1 : nullptr);
          if (ctiles == 1) {
            scale_into(gs, ncu * D1, inverse_norm(sq, normalize->eps), block(s));
          } else {
            sum_sq[static_cast<size_t>(s * ctiles + c0 / nc)] = sq;
            if (staged) {
              std::copy(gs, gs + ncu * D1, staged_block(s));
            } else if constexpr (!kInPlace) {
              convert(gs, ncu * D1, block(s));
            }
          }
        };
        int64_t s = s_begin;
        for (int64_t t0 = lo; t0 < hi; t0 += nt) {
          const int64_t t1 = std::min(t0 + nt, hi);
          // a^T [ncu, rows] = W[c0:c0+ncu] z[t0:t1]^T   (a is [rows, ncu] row-major)
          gemm<T>('T', 'N', ncu, t1 - t0, d, T(1), weight + c0 * d, d, z + t0 * d, d, T(0), a, ncu);
          // the tile's rows of each set it touches
          for (int64_t t = t0; t < t1;) {
            while (offsets[s + 1] <= t) ++s;  // sets that ended before t (or are empty)
            const int64_t seg_end = std::min(offsets[s + 1], t1), rows = seg_end - t;
            const bool first = t == offsets[s];
            T* at = a + (t - t0) * ncu;
            T* gs;
            if constexpr (kInPlace) {
              gs = block(s);
            } else {
              gs = acc;
            }
            residual_tile(rows, ncu, at, x + t * C + c0, C, bias + c0, inv_var + c0, colsum);
            // G^T [d, ncu] (+)= z[t:seg_end]^T r   (G block row-major [ncu, d], leading dim d+1)
            gemm<T>('N', 'T', d, ncu, rows, T(1), z + t * d, d, at, ncu, first ? T(0) : T(1), gs, D1);
            if (first) {
              for (int64_t i = 0; i < ncu; ++i) gs[i * D1 + d] = colsum[i];
            } else {
              for (int64_t i = 0; i < ncu; ++i) gs[i * D1 + d] += colsum[i];
            }
            if (seg_end == offsets[s + 1]) finish(s, gs);  // the set is complete
            t = seg_end;
          }
        }
      });
  if (sum_sq.empty()) return;
  at::parallel_for(0, p.s, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double sq = 0;
      for (int64_t k = 0; k < ctiles; ++k) sq += sum_sq[static_cast<size_t>(s * ctiles + k)];
      O* row = out + s * C * D1;
      if (staged) {
        scale_into(roots.get() + s * C * D1, C * D1, inverse_norm(sq, normalize->eps), row);
      } else {
        scale_into(row, C * D1, static_cast<O>(inverse_norm(sq, normalize->eps)), row);
      }
    }
  });
}

// ---- backward -----------------------------------------------------------------------

template <typename T, typename Gr>
void backward(const Problem& p, const Gr* grad, const T* x, const T* z, const T* weight, const T* bias,
              const T* inv_var, const int64_t* offsets, T* gx, T* gz, T* gw, T* gb, T* gv) {
  constexpr bool kInPlace = std::is_same_v<T, Gr>;  // the GEMMs read grad itself
  const int64_t N = p.n, C = p.c, d = p.d, D1 = d + 1;
  advise_huge_pages(gx, N * C * static_cast<int64_t>(sizeof(T)));
  advise_huge_pages(gz, N * d * static_cast<int64_t>(sizeof(T)));
  poison(gx, N * C);
  poison(gz, N * d);
  std::fill(gw, gw + C * d, T(0));
  std::fill(gb, gb + C, T(0));
  std::fill(gv, gv + C, T(0));
  if (N == 0) return;
  const int64_t threads = num_threads();
  // Row chunks: 1 with one thread, else 2 per thread (of >= nt rows). Chunk k owns its rows
  // of dx and dz and one partial (dW, db, dinv_var); chunk 0's partial is the output itself.
  // Chunks depend only on N and the thread count and the partials are summed in chunk
  // order: deterministic for a fixed thread count, whatever the schedule.
  const int64_t nt = kBackwardRowTile;
  const int64_t chunks = threads == 1 ? 1 : std::clamp<int64_t>((N + nt - 1) / nt, 1, 2 * threads);
  const int64_t nc = std::min<int64_t>(C, round_down16(kBackwardScratchBytes / (nt * static_cast<int64_t>(sizeof(T)))));
  const int64_t part_elems = C * d + 2 * C;
  std::vector<T> partials(static_cast<size_t>((chunks - 1) * part_elems), T(0));

  for_each_unit(
      chunks, threads, [&] { return Scratch<T>(2 * nt * nc + 3 * nc + (kInPlace ? 0 : nc * D1)); },
      [&](Scratch<T>& scratch, int64_t chunk) {
        T* a = scratch.data();   // [nt, nc]: W z, then diff * inv_var
        T* q = a + nt * nc;      // [nt, nc]: P[:, :d] z, then da
        T* pb = q + nt * nc;     // [nc]: P[c0:c1, d], gathered
        T* gbs = pb + nc;        // [nc]: tile column sums of da
        T* gvs = gbs + nc;       // [nc]: tile column sums of diff * q
        T* ptile = gvs + nc;     // [nc, d+1]: P[c0:c1] converted to T (unless in place)
        T* pw = chunk == 0 ? gw : partials.data() + (chunk - 1) * part_elems;
        T* pbias = chunk == 0 ? gb : pw + C * d;
        T* pvar = chunk == 0 ? gv : pw + C * d + C;
        const int64_t r0 = N * chunk / chunks, r1 = N * (chunk + 1) / chunks;
        // the set holding row r0 (the last set starting at or before it)
        int64_t s = std::upper_bound(offsets, offsets + p.s + 1, r0) - offsets - 1;
        for (int64_t t0 = r0; t0 < r1;) {
          while (offsets[s + 1] <= t0) ++s;  // skip empty sets
          const int64_t rows = std::min({nt, r1 - t0, offsets[s + 1] - t0});
          const Gr* pm = grad + s * C * D1;  // P = grad[s]: [C, d+1]
          T* gzt = gz + t0 * d;              // dz rows of the tile: [rows, d]
          for (int64_t c0 = 0; c0 < C; c0 += nc) {
            const int64_t ncu = std::min(nc, C - c0);
            const T* wc = weight + c0 * d;  // W[c0:c0+ncu]: [ncu, d], leading dim d
            const T* pc;                    // P[c0:c0+ncu, :d]: leading dim d+1
            if constexpr (kInPlace) {
              pc = pm + c0 * D1;
            } else {
              convert(pm + c0 * D1, ncu * D1, ptile);
              pc = ptile;
            }
            for (int64_t i = 0; i < ncu; ++i) pb[i] = pc[i * D1 + d];
            gemm<T>('T', 'N', ncu, rows, d, T(1), wc, d, z + t0 * d, d, T(0), a, ncu);
            gemm<T>('T', 'N', ncu, rows, d, T(1), pc, D1, z + t0 * d, d, T(0), q, ncu);
            backward_tile(rows, ncu, a, q, x + t0 * C + c0, gx + t0 * C + c0, C, bias + c0, pb, inv_var + c0, gbs,
                          gvs);
            for (int64_t i = 0; i < ncu; ++i) {
              pbias[c0 + i] += gbs[i];
              pvar[c0 + i] += gvs[i];
            }
            // dW^T [d, ncu] += z^T da      (dW block row-major [ncu, d])
            gemm<T>('N', 'T', d, ncu, rows, T(1), z + t0 * d, d, q, ncu, T(1), pw + c0 * d, d);
            // dz^T [d, rows] (+)= W_c^T da^T + P_c^T r^T
            gemm<T>('N', 'N', d, rows, ncu, T(1), wc, d, q, ncu, c0 == 0 ? T(0) : T(1), gzt, d);
            gemm<T>('N', 'N', d, rows, ncu, T(1), pc, D1, a, ncu, T(1), gzt, d);
          }
          t0 += rows;
        }
      });

  // Sum the partials in chunk order (deterministic).
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const T* pw = partials.data() + (chunk - 1) * part_elems;
    for (int64_t i = 0; i < C * d; ++i) gw[i] += pw[i];
    for (int64_t i = 0; i < C; ++i) {
      gb[i] += pw[C * d + i];
      gv[i] += pw[C * d + C + i];
    }
  }
}

#define FV_INSTANTIATE(T, O)                                                                              \
  template void forward<T, O>(const Problem&, const T*, const T*, const T*, const T*, const T*, const int64_t*, \
                              O*, const Normalize<T>*);                                                       \
  template void backward<T, O>(const Problem&, const O*, const T*, const T*, const T*, const T*, const T*,     \
                               const int64_t*, T*, T*, T*, T*, T*);
#define FV_INSTANTIATE_ALL(T)     \
  FV_INSTANTIATE(T, float)        \
  FV_INSTANTIATE(T, double)       \
  FV_INSTANTIATE(T, c10::Half)    \
  FV_INSTANTIATE(T, c10::BFloat16)
FV_INSTANTIATE_ALL(float)
FV_INSTANTIATE_ALL(double)
#undef FV_INSTANTIATE_ALL
#undef FV_INSTANTIATE

OneBlasThread::OneBlasThread() {
#if FV_HAVE_WEAK_BLAS
  if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
}
OneBlasThread::~OneBlasThread() {
#if FV_HAVE_WEAK_BLAS
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
#endif
}

void tile_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void tile_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool blas_available() {
#if FV_HAVE_WEAK_BLAS
  return sgemm_ != nullptr && dgemm_ != nullptr;
#else
  return false;
#endif
}

void set_gemm(Gemm mode) { g_gemm.store(static_cast<int>(mode)); }
Gemm gemm_mode() { return static_cast<Gemm>(g_gemm.load()); }
void set_poison(bool on) { g_poison.store(on); }
void set_huge_pages(bool on) { g_huge_pages.store(on); }
bool poison_enabled() { return g_poison.load(); }

}  // namespace fvvae_fast::cpu
