"""An FV-VAE training step (Algorithm 1) on the CPU: the whole step in one C++ pass, and its element-wise work
fused for autograd where the step runs under it (data-parallel training, fine-tuning).

Each has its plain-torch form (the reference, and the path on other devices, for float16/bfloat16,
for inputs that need gradients, and without the C++ extension) and a C++ kernel
(``csrc/train_loss.cpp``) that reads and writes each (N, C) array once:

- :func:`dropout_keep`: the dropout keep mask;
- :func:`normalize_dropout`: the model's preprocessing and the encoder's dropped-out input;
- :func:`linear_relu`: a hidden layer, its bias and ReLU applied in one pass after the GEMM;
- :func:`reconstruction_error`: the decoder and the data term of L_rec (Eq. 8), block by block;
- :class:`Adadelta`: ``torch.optim.Adadelta`` whose step is one pass per parameter;
- :func:`loss_backward`: a whole training step's loss and gradients, tile by tile.

The plain-torch forms are where the math is checked; the kernels are tested against them in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dispatch

_lib = torch.library.Library("fvvae_fast", "FRAGMENT")
_lib.define("dropout_keep_cpu(int n, int c, int seed, int threshold) -> Tensor")
_lib.define("normalize_dropout_cpu(Tensor x, Tensor keep, float scale, bool l2, float eps) -> (Tensor, Tensor)")
_lib.define("reconstruction_error_cpu(Tensor z, Tensor weight, Tensor bias, Tensor x, Tensor inv_var) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("bias_relu_cpu_(Tensor(a!) h, Tensor bias) -> Tensor(a!)")
_lib.define("train_step_cpu(Tensor x, Tensor? rows, Tensor? keep, Tensor eps, Tensor? labels, Tensor[] weights, "
            "Tensor[] biases, Tensor w_dec, Tensor b_dec, Tensor? w_cls, Tensor? b_cls, Tensor sigma_z, "
            "Tensor inv_var, float scale, bool l2, float norm_eps, float c_rec, float c_reg, float c_cls) -> Tensor[]")
_lib.define("adadelta_step_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
            "Tensor(c!)[] acc_deltas, float lr, float rho, float eps) -> ()")

KERNEL_DTYPES = (torch.float32, torch.float64)


def _kernel(*tensors: Tensor) -> bool:
    """True when the C++ kernels take these tensors: on the CPU, float32/float64, no gradient needed
    for them, the extension built."""
    return (all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and not t.requires_grad for t in tensors)
            and dispatch.available("cpu", torch.device("cpu")) is None)


def keep_threshold(p: float) -> int:
    """The int16 threshold of dropout rate ``p``: a 16-bit slice s of a random word keeps its element
    when s >= the threshold, P(keep) = 1 - round(65536 p) / 65536 (exactly 0.5 for p = 0.5)."""
    return min(round(p * 65536) - 32768, 32767)


def dropout_keep(n: int, c: int, p: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """The dropout keep mask (n, c) bool of rate ``p``, drawn from ``generator``.

    On the CPU (with the extension) one seed is drawn and the mask is a counter-based hash of it: one
    write of n c bytes, the same mask for a seed whatever the thread count. Elsewhere: 16-bit slices of
    random 64-bit words from ``generator``. Either way P(keep) is as :func:`keep_threshold` says."""
    device = torch.device(device)
    if device.type == "cpu" and dispatch.available("cpu", device) is None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator, dtype=torch.int64))
        return torch.ops.fvvae_fast.dropout_keep_cpu(n, c, seed, keep_threshold(p))
    words = (n * c + 3) // 4
    bits = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return (bits.view(torch.int16)[: n * c] >= keep_threshold(p)).view(n, c)


def normalize_dropout(x: Tensor, keep: Tensor | None, p: float, l2: bool, eps: float) -> tuple[Tensor, Tensor]:
    """(xp, x_in) of descriptors x (N, C) float: xp = x / max(||x_t||, eps) per row when ``l2`` (else x),
    and the encoder's input x_in = xp * keep / (1 - p) (xp when ``keep`` is None)."""
    if keep is not None and _kernel(x):
        return torch.ops.fvvae_fast.normalize_dropout_cpu(x.contiguous(), keep.contiguous(), 1.0 / (1.0 - p), l2, eps)
    xp = x / x.norm(dim=1, keepdim=True).clamp_min(eps) if l2 else x
    return xp, xp if keep is None else xp * keep / (1.0 - p)


class _LinearReLU(torch.autograd.Function):
    """ReLU(x W^T + b) with the C++ kernel's bias and ReLU pass; backward keeps the ReLU mask of h."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        h = torch.ops.fvvae_fast.bias_relu_cpu_(torch.mm(x, weight.t()), bias)
        ctx.save_for_backward(x, weight, h)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, h = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, h, 0)
        g_x = g @ weight if ctx.needs_input_grad[0] else None
        g_w = g.t() @ x if ctx.needs_input_grad[1] else None
        g_b = g.sum(0) if ctx.needs_input_grad[2] else None
        return g_x, g_w, g_b


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ReLU(x W^T + b): x (N, I), weight (O, I), bias (O,) -> (N, O), differentiable in all three."""
    if _kernel(x.detach(), weight.detach()) and x.dim() == 2:
        return _LinearReLU.apply(x, weight, bias)
    return torch.relu(torch.nn.functional.linear(x, weight, bias))


class _ReconstructionError(torch.autograd.Function):
    """sum_t sum_c (ReLU(a_tc) - x_tc)^2 / (2 sigma_c^2) with the decoder a = z W^T + b (the data term of L_rec,
    Eq. 8), and its gradient.

    z (N, d), weight (C, d), bias (C,), x (N, C), log_sigma (C,). Plain torch writes a, then makes three
    passes over (N, C) forward and three backward, where autograd of the formula makes about twelve; the
    C++ kernel computes a block of rows of a and its terms while the block is in cache, and writes only
    the gradient factor m = [a > 0] (a - x) / sigma^2, whose GEMMs with z and W are the backward.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, bias: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
        inv_var = torch.exp(-2.0 * log_sigma)
        ctx.fused = _kernel(z.detach(), weight.detach(), x.detach()) and not ctx.needs_input_grad[3]
        if ctx.fused:
            sq, msum, m = torch.ops.fvvae_fast.reconstruction_error_cpu(
                z.detach().contiguous(), weight.detach().contiguous(), bias.detach().contiguous(), x.contiguous(),
                inv_var.detach().contiguous())
            ctx.save_for_backward(z, weight, m, msum, sq, inv_var)
        else:
            a = torch.nn.functional.linear(z, weight, bias)
            err = a.clamp_min(0).sub_(x)  # mu_x - x
            sq = torch.linalg.vector_norm(err, dim=0).square_()  # (C,) sum_t err^2
            ctx.save_for_backward(z, weight, a, err, sq, inv_var)
        return 0.5 * (sq * inv_var).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.fused:
            z, weight, m, msum, sq, inv_var = ctx.saved_tensors
            g_x, g_b = None, msum * grad  # the scalar grad scales the small GEMM outputs, not m
            g_z = (m @ weight).mul_(grad) if ctx.needs_input_grad[0] else None
            g_w = (m.t() @ z).mul_(grad) if ctx.needs_input_grad[1] else None
        else:
            z, weight, a, err, sq, inv_var = ctx.saved_tensors
            g_err = err * (inv_var * grad)
            g_x = -g_err if ctx.needs_input_grad[3] else None
            g_a = g_err.masked_fill_(a <= 0, 0.0)
            g_b = g_a.sum(0)
            g_z = g_a @ weight if ctx.needs_input_grad[0] else None
            g_w = g_a.t() @ z if ctx.needs_input_grad[1] else None
        g_log_sigma = -grad * sq * inv_var if ctx.needs_input_grad[4] else None
        return g_z, g_w, g_b if ctx.needs_input_grad[2] else None, g_x, g_log_sigma


def reconstruction_error(z: Tensor, weight: Tensor, bias: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
    """sum_t sum_c (ReLU(a_tc) - x_tc)^2 / (2 sigma_c^2) with a = z W^T + b, sigma = exp(log_sigma): a scalar,
    differentiable in z (N, d), weight (C, d), bias (C,), x (N, C) and log_sigma (C,), one floating dtype."""
    return _ReconstructionError.apply(z, weight, bias, x, log_sigma)


class Adadelta(torch.optim.Adadelta):
    """``torch.optim.Adadelta`` (same arguments, state and checkpoints) whose step runs the C++ kernel, one
    pass per parameter, when every parameter with a gradient is a dense float32/float64 CPU tensor and the
    group neither decays weights nor maximises; otherwise torch's own step."""

    def _fusable(self) -> bool:
        groups_ok = all(group["weight_decay"] == 0 and not (group["maximize"] or group["differentiable"]
                                                            or group["capturable"]) for group in self.param_groups)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return groups_ok and _kernel(*(p.detach() for p in params), *(p.grad for p in params)) and all(
            not p.grad.is_sparse and p.is_contiguous() and p.grad.is_contiguous() for p in params)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._fusable():
            return super().step(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if len(state) == 0:  # as torch initialises it
                    state["step"] = torch.zeros((), dtype=torch.get_default_dtype())
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            torch.ops.fvvae_fast.adadelta_step_cpu(params, [p.grad for p in params],
                                                   [s["square_avg"] for s in states],
                                                   [s["acc_delta"] for s in states],
                                                   float(group["lr"]), group["rho"], group["eps"])
            torch._foreach_add_([state["step"] for state in states], 1.0)
        return None


def loss_backward_fused(model: nn.Module, x: Tensor) -> bool:
    """True when :func:`loss_backward` runs the C++ step for ``model`` (an FV-VAE) on descriptors x: CPU,
    float32/float64 parameters of x's dtype, no gradient asked of x, the extension built."""
    return _kernel(x, *(p.detach() for p in model.parameters())) and all(p.dtype == x.dtype
                                                                         for p in model.parameters())


def loss_backward(model: nn.Module, x: Tensor, labels: Tensor | None, noise: tuple[Tensor | None, Tensor],
                  lambdas: tuple[float, float, float], *, rows: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``model.loss(x, labels, lambdas, noise=noise)`` and its ``total.backward()`` (gradients added to the
    parameters' ``.grad``): (total, rec, reg, cls) detached scalars. With ``rows`` (N,) int64 the batch is
    ``x[rows]``, read by the kernel straight from x (the training data) where it runs.

    Where :func:`loss_backward_fused` holds, the C++ kernel runs the forward and backward of the loss tile by
    tile (128 rows at a time through the encoder, the decoder, the classifier and back), so that no
    (N, C) array leaves the cache; the descriptor-free terms (log sigma_x, the KL's sigma_z part, and the
    sampling's path to sigma_z through the kernel's sum_t dL/dz_t eps_t) are differentiated here. Else
    autograd of :meth:`fvvae_fast.FVVAE.loss` (the model module imports this one, not the other way round).
    """
    if not (model.training and loss_backward_fused(model, x)):
        if rows is not None:
            x = x.index_select(0, rows.to(x.device))
        losses = model.loss(x, labels, lambdas, noise=noise)
        losses.total.backward()
        return losses.total.detach(), losses.rec.detach(), losses.reg.detach(), losses.cls.detach()
    keep, eps = noise
    l1, l2, l3 = lambdas
    n = x.shape[0] if rows is None else rows.numel()
    *hidden, last = model.encoder
    layers = [*hidden[::2], last]
    classifier = model.classifier if model._uses_labels(labels, n, l3) else None
    with torch.no_grad():
        log_sigma_x, sigma_z = model.sigma_x_log(), model.log_sigma_z.exp()
        inv_var = torch.exp(-2.0 * log_sigma_x)
        sums, sq, gez, gwd, gbd, gwc, gbc, *layer_grads = torch.ops.fvvae_fast.train_step_cpu(
            x.contiguous(), rows, None if keep is None else keep.contiguous(), eps.to(x.dtype).contiguous(),
            None if classifier is None else labels.contiguous(), [layer.weight for layer in layers],
            [layer.bias for layer in layers], model.decoder.weight, model.decoder.bias,
            None if classifier is None else classifier.weight, None if classifier is None else classifier.bias,
            sigma_z, inv_var, 1.0 / (1.0 - model.dropout), model.norm == "descriptor", model.eps, l1 / n, l2 / n,
            l3 / n)
        sq, gez = sq.to(x.dtype), gez.to(x.dtype)
        # the terms of FVVAE.loss, and the gradients of its descriptor-free parts (log sigma_x, floored as
        # clamp_min passes gradients; the KL's sigma_z part) and of the sampling z = mu + eps sigma_z
        rec = 0.5 * (sq * inv_var).sum() / n + log_sigma_x.sum()
        reg = (0.5 * sums[0] / n).to(x.dtype) + 0.5 * (sigma_z**2).sum() - 0.5 * (1 + 2 * model.log_sigma_z).sum()
        cls = (sums[1] / n).to(x.dtype) if classifier is not None else rec.new_zeros(())
        total = l1 * rec + l2 * reg + l3 * cls
        g_log_sigma_x = (l1 * (1.0 - sq * inv_var / n)).mul_(model.log_sigma_x >= model.log_sigma_x_floor)
        g_log_sigma_z = l2 * (sigma_z**2 - 1.0) + gez * sigma_z
    params = [model.log_sigma_x, model.log_sigma_z, model.decoder.weight, model.decoder.bias]
    grads = [g_log_sigma_x, g_log_sigma_z, gwd, gbd]
    if classifier is not None:
        params += [classifier.weight, classifier.bias]
        grads += [gwc, gbc]
    for layer, gw, gb in zip(layers, layer_grads[0::2], layer_grads[1::2]):
        params += [layer.weight, layer.bias]
        grads += [gw, gb]
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad.add_(g)
    return total, rec, reg, cls
