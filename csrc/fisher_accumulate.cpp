// fvvae_fast::fisher_accumulate_cpu / fisher_accumulate_backward_cpu / fisher_vectors_cpu: argument checks,
// dtype handling and registration of the CPU kernels (csrc/cpu/fisher_accumulate_cpu.cpp).
//
// The schemas are defined in Python (fvvae_fast/ops/fisher_accumulate.py); this file only
// implements them with TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m). The Python wrapper has
// already validated the inputs, but these ops can be called directly through torch.ops, so
// every precondition the kernels rely on is checked again here (shapes, dtypes,
// contiguity, offsets values) and reported as a RuntimeError naming the op and argument.
//
// float32 and float64 run natively; float16 and bfloat16 are computed in float32 and their
// gradients are cast back to the input dtype. G is written in out_dtype (default: the compute
// dtype) straight from the accumulators; the upstream grad may come in any floating dtype.
//
// The module is importable as fvvae_fast._C; it exposes test hooks (process-wide):
//   _blas_available() -> bool        the kernels call the BLAS torch links (else at::addmm_)
//   _set_gemm("auto"|"torch"|"naive") the tile GEMMs: BLAS, at::addmm_ on views, plain loops
//   _set_poison(bool)                fill outputs and scratch with NaN before computing
//   _set_huge_pages(bool)            advise transparent huge pages on outputs >= 32 MiB (default on)
//   _set_output_cache(bool)          reuse freed outputs >= 32 MiB (default on)

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/fisher_accumulate_cpu.h"

namespace {

constexpr const char* kFwd = "fisher_accumulate_cpu";
constexpr const char* kBwd = "fisher_accumulate_backward_cpu";
constexpr const char* kVec = "fisher_vectors_cpu";

bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A floating input: CPU, dense, contiguous, of x's dtype, with exactly the given shape.
void check_float(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 at::ScalarType dtype, const char* shape_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), " but expected ", dtype);
  TORCH_CHECK(t.sizes().equals(shape), op, ": ", name, " must have shape ", shape_name, " = ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

struct Checked {
  fvvae_fast::cpu::Problem p;
  at::ScalarType dtype;  // the input dtype
};

Checked check_inputs(const char* op, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& inv_var, const at::Tensor& offsets) {
  TORCH_CHECK(x.defined() && z.defined(), op, ": x and z must be defined");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, C), got shape ", x.sizes());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (N, d), got shape ", z.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(supported_float(dtype), op, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t n = x.size(0), c = x.size(1), d = z.size(1);
  TORCH_CHECK(c >= 1 && d >= 1, op, ": need C >= 1 and d >= 1, got x ", x.sizes(), " and z ", z.sizes());
  check_float(op, "x", x, {n, c}, dtype, "(N, C)");
  check_float(op, "z", z, {n, d}, dtype, "(N, d)");
  check_float(op, "weight", weight, {c, d}, dtype, "(C, d)");
  check_float(op, "bias", bias, {c}, dtype, "(C,)");
  check_float(op, "inv_var", inv_var, {c}, dtype, "(C,)");

  TORCH_CHECK(offsets.defined(), op, ": offsets is undefined");
  TORCH_CHECK(offsets.device().is_cpu(), op, ": offsets must be a CPU tensor, got device ", offsets.device());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.layout() == at::kStrided && offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be a 1-D tensor (S+1,) with S >= 0, got shape ", offsets.sizes());
  TORCH_CHECK(offsets.is_contiguous(), op, ": offsets must be contiguous");
  const int64_t s = offsets.size(0) - 1;
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[s] == n, op, ": offsets[-1] must equal N = x.size(0) = ", n, ", got ", o[s]);
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK(o[i + 1] >= o[i], op, ": offsets must be non-decreasing, but offsets[", i + 1, "] = ", o[i + 1],
                " < offsets[", i, "] = ", o[i]);
  }
  return {{n, c, d, s}, dtype};
}

// Inputs in the compute dtype (a copy only for float16 / bfloat16).
at::Tensor in_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())); }

// The forward kernel into a new output of `sizes` (S, C, d+1) or (S, C*(d+1)), in out_dtype.
at::Tensor run_forward(const char* op, const Checked& chk, const at::Tensor& x, const at::Tensor& z,
                       const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& inv_var,
                       const at::Tensor& offsets, std::optional<at::ScalarType> out_dtype, at::IntArrayRef sizes,
                       const std::optional<at::Tensor>& scale, std::optional<double> eps) {
  const auto& p = chk.p;
  const at::ScalarType ct = compute_type(chk.dtype);
  const at::ScalarType ot = out_dtype.value_or(ct);
  TORCH_CHECK(supported_float(ot), op, ": out_dtype must be float32, float64, float16 or bfloat16, got ", ot);
  at::Tensor out = fvvae_fast::cpu::empty_output(sizes, x.options().dtype(ot));
  if (out.numel() == 0) return out;
  const at::Tensor xc = in_compute(x), zc = in_compute(z), wc = in_compute(weight), bc = in_compute(bias),
                   vc = in_compute(inv_var);
  const at::Tensor sc = scale.has_value() ? scale->to(ct).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(ct, "fisher_accumulate_cpu", [&] {
    using acc_t = scalar_t;
    const fvvae_fast::cpu::Normalize<acc_t> normalize{sc.defined() ? sc.const_data_ptr<acc_t>() : nullptr,
                                                      static_cast<acc_t>(eps.value_or(0.0))};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ot, "fisher_accumulate_cpu", [&] {
      fvvae_fast::cpu::forward<acc_t, scalar_t>(p, xc.const_data_ptr<acc_t>(), zc.const_data_ptr<acc_t>(),
                                                wc.const_data_ptr<acc_t>(), bc.const_data_ptr<acc_t>(),
                                                vc.const_data_ptr<acc_t>(), offsets.const_data_ptr<int64_t>(),
                                                out.mutable_data_ptr<scalar_t>(),
                                                eps.has_value() ? &normalize : nullptr);
    });
  });
  return out;
}

at::Tensor fisher_accumulate_cpu(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& inv_var, const at::Tensor& offsets,
                                 std::optional<at::ScalarType> out_dtype) {
  const Checked chk = check_inputs(kFwd, x, z, weight, bias, inv_var, offsets);
  return run_forward(kFwd, chk, x, z, weight, bias, inv_var, offsets, out_dtype, {chk.p.s, chk.p.c, chk.p.d + 1},
                     std::nullopt, std::nullopt);
}

at::Tensor fisher_vectors_cpu(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& inv_var, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& scale, double eps,
                              std::optional<at::ScalarType> out_dtype) {
  const Checked chk = check_inputs(kVec, x, z, weight, bias, inv_var, offsets);
  const int64_t dim = chk.p.c * (chk.p.d + 1);
  if (scale.has_value()) {
    TORCH_CHECK(supported_float(scale->scalar_type()), kVec, ": scale must be a floating tensor, got ",
                scale->scalar_type());
    check_float(kVec, "scale", *scale, {dim}, scale->scalar_type(), "(C*(d+1),)");
  }
  TORCH_CHECK(eps >= 0, kVec, ": eps must be >= 0, got ", eps);
  return run_forward(kVec, chk, x, z, weight, bias, inv_var, offsets, out_dtype, {chk.p.s, dim}, scale, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fisher_accumulate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& inv_var, const at::Tensor& offsets) {
  const Checked chk = check_inputs(kBwd, x, z, weight, bias, inv_var, offsets);
  const auto& p = chk.p;
  const at::ScalarType ct = compute_type(chk.dtype);
  TORCH_CHECK(grad.defined(), kBwd, ": grad is undefined");
  TORCH_CHECK(grad.dim() == 3, kBwd, ": grad must be 3-D (S, C, d+1), got shape ", grad.sizes());
  TORCH_CHECK(supported_float(grad.scalar_type()), kBwd, ": grad must be float32, float64, float16 or bfloat16, got ",
              grad.scalar_type());
  check_float(kBwd, "grad", grad, {p.s, p.c, p.d + 1}, grad.scalar_type(), "(S, C, d+1)");

  const auto opts = x.options().dtype(ct);
  at::Tensor gx = at::empty({p.n, p.c}, opts), gz = at::empty({p.n, p.d}, opts);
  at::Tensor gw = at::empty({p.c, p.d}, opts), gb = at::empty({p.c}, opts), gv = at::empty({p.c}, opts);
  const at::Tensor xc = in_compute(x), zc = in_compute(z), wc = in_compute(weight), bc = in_compute(bias),
                   vc = in_compute(inv_var);
  AT_DISPATCH_FLOATING_TYPES(ct, kBwd, [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kBwd, [&] {
      fvvae_fast::cpu::backward<acc_t, scalar_t>(
          p, grad.const_data_ptr<scalar_t>(), xc.const_data_ptr<acc_t>(), zc.const_data_ptr<acc_t>(),
          wc.const_data_ptr<acc_t>(), bc.const_data_ptr<acc_t>(), vc.const_data_ptr<acc_t>(),
          offsets.const_data_ptr<int64_t>(), gx.mutable_data_ptr<acc_t>(), gz.mutable_data_ptr<acc_t>(),
          gw.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>(), gv.mutable_data_ptr<acc_t>());
    });
  });
  if (chk.dtype != ct) {
    return {gx.to(chk.dtype), gz.to(chk.dtype), gw.to(chk.dtype), gb.to(chk.dtype), gv.to(chk.dtype)};
  }
  return {gx, gz, gw, gb, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) {
  m.impl("fisher_accumulate_cpu", TORCH_FN(fisher_accumulate_cpu));
  m.impl("fisher_accumulate_backward_cpu", TORCH_FN(fisher_accumulate_backward_cpu));
  m.impl("fisher_vectors_cpu", TORCH_FN(fisher_vectors_cpu));
}

// ---- the Python module (no pybind11: only test hooks live here) --------------------

namespace {

PyObject* py_blas_available(PyObject*, PyObject*) { return PyBool_FromLong(fvvae_fast::cpu::blas_available()); }

// "auto" (the BLAS torch links, else at::addmm_), "torch" (at::addmm_) or "naive" (plain loops).
PyObject* py_set_gemm(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_SetString(PyExc_TypeError, "_set_gemm: expected a str: 'auto', 'torch' or 'naive'");
    return nullptr;
  }
  const std::string mode(name);
  if (mode == "auto") {
    fvvae_fast::cpu::set_gemm(fvvae_fast::cpu::Gemm::kAuto);
  } else if (mode == "torch") {
    fvvae_fast::cpu::set_gemm(fvvae_fast::cpu::Gemm::kTorch);
  } else if (mode == "naive") {
    fvvae_fast::cpu::set_gemm(fvvae_fast::cpu::Gemm::kNaive);
  } else {
    PyErr_Format(PyExc_ValueError, "_set_gemm: expected 'auto', 'torch' or 'naive', got '%s'", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_set_poison(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  fvvae_fast::cpu::set_poison(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_set_huge_pages(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  fvvae_fast::cpu::set_huge_pages(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_set_output_cache(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  fvvae_fast::cpu::set_output_cache(on != 0);
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"_blas_available", py_blas_available, METH_NOARGS,
     "True when the kernels call the BLAS that torch links (MKL sgemm_/dgemm_), False when they use at::addmm_."},
    {"_set_gemm", py_set_gemm, METH_O,
     "Test hook: the tile GEMMs: 'auto' (the BLAS torch links, else at::addmm_), 'torch' (at::addmm_ on tile "
     "views) or 'naive' (plain loops, so a sanitizer sees every access)."},
    {"_set_poison", py_set_poison, METH_O,
     "Test hook: fill outputs and scratch buffers with NaN before computing (catches unwritten elements)."},
    {"_set_huge_pages", py_set_huge_pages, METH_O,
     "Advise transparent huge pages on outputs of at least 32 MiB (default True; Linux only)."},
    {"_set_output_cache", py_set_output_cache, METH_O,
     "Keep freed outputs of at least 32 MiB (at most two, 1 GiB in all) for the next output of the same size "
     "(default True; False also frees those kept)."},
    {nullptr, nullptr, 0, nullptr},
};

#define FV_STR_(x) #x
#define FV_STR(x) FV_STR_(x)
#define FV_CAT_(a, b) a##b
#define FV_CAT(a, b) FV_CAT_(a, b)

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    FV_STR(TORCH_EXTENSION_NAME),
    "CPU kernels of fvvae_fast::fisher_accumulate (registered into torch.ops.fvvae_fast on import).",
    -1,
    kMethods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC FV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
