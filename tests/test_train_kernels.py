"""The fused CPU kernels of a training step (fvvae_fast.ops.training, csrc/train_loss.cpp) against their
plain-torch forms in float64 and float32, forward and backward, on awkward shapes (no rows, one row,
block tails, odd widths, all-zero rows), with the outputs poisoned so that an unwritten element shows."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.ops import dispatch, training

from .cases import generator, poisoned_cpu_kernels

pytestmark = pytest.mark.skipif(dispatch.available("cpu", torch.device("cpu")) is not None,
                                reason="the C++ extension is not built")

f64 = torch.float64
# (rows, C, d): no rows, one row, a block tail (kernel blocks of 32 rows), odd widths, the demo's shape
SHAPES = [(0, 5, 3), (1, 7, 2), (33, 13, 5), (70, 1, 1), (2048, 384, 31)]


@pytest.fixture(autouse=True)
def _poisoned():
    with poisoned_cpu_kernels():
        yield


@contextlib.contextmanager
def reference():
    """The training functions take their plain-torch forms inside."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "_kernel", lambda *tensors: False)
        yield


def _tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == f64 else {"rtol": 2e-5, "atol": 2e-6}


def _close_at_scale(got, want, dtype):
    """Sums of many products: the error is relative to the largest entry, not to each (an entry near 0 is a
    cancellation of terms of that size)."""
    tol = _tol(dtype)["rtol"] * 10
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol * scale + 1e-300)


@pytest.mark.parametrize("n,c,d", SHAPES)
@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("l2", [True, False])
def test_normalize_dropout_equals_the_plain_form(n, c, d, dtype, l2):
    g = generator(n * 7 + c)
    x = torch.relu(torch.randn(n, c, generator=g, dtype=dtype))
    if n > 2:
        x[1] = 0  # an all-zero row: its norm is clamped at eps, the row stays 0
    keep = training.dropout_keep(n, c, 0.5, g)
    xp, x_in = training.normalize_dropout(x, keep, 0.5, l2, 1e-12)
    with reference():
        want_xp, want_in = training.normalize_dropout(x.double(), keep, 0.5, l2, 1e-12)
    torch.testing.assert_close(xp, want_xp.to(dtype), **_tol(dtype))
    torch.testing.assert_close(x_in, want_in.to(dtype), **_tol(dtype))
    assert not (xp.isnan().any() or x_in.isnan().any())


@pytest.mark.parametrize("n,c,d", SHAPES)
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_reconstruction_error_and_its_gradients_equal_the_plain_form(n, c, d, dtype):
    g = generator(n * 11 + c)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(c, d, generator=g, dtype=dtype) / d**0.5
    bias = 0.1 * torch.randn(c, generator=g, dtype=dtype)
    x = torch.relu(torch.randn(n, c, generator=g, dtype=dtype))
    log_sigma = 0.3 * torch.randn(c, generator=g, dtype=dtype)
    upstream = float(torch.rand((), generator=g)) + 0.5

    def value_and_grads(*args):
        leaves = [a.clone().requires_grad_(i != 3) for i, a in enumerate(args)]
        out = training.reconstruction_error(*leaves)
        (out * upstream).backward()
        return [out.detach()] + [leaves[i].grad for i in (0, 1, 2, 4)]

    got = value_and_grads(z, weight, bias, x, log_sigma)
    with reference():
        want = value_and_grads(*(t.double() for t in (z, weight, bias, x, log_sigma)))
    for a, b in zip(got, want):
        _close_at_scale(a, b, dtype)
    # the plain form is the formula itself
    a = torch.nn.functional.linear(z.double(), weight.double(), bias.double())
    formula = ((torch.relu(a) - x.double()) ** 2 * (0.5 * torch.exp(-2 * log_sigma.double()))).sum()
    torch.testing.assert_close(want[0], formula, rtol=1e-12, atol=1e-12)


def test_the_plain_reconstruction_error_passes_gradcheck():
    g = generator(5)
    args = [torch.randn(9, 3, generator=g, dtype=f64), torch.randn(6, 3, generator=g, dtype=f64),
            torch.randn(6, generator=g, dtype=f64), torch.rand(9, 6, generator=g, dtype=f64),
            0.3 * torch.randn(6, generator=g, dtype=f64)]
    with reference():
        assert torch.autograd.gradcheck(training.reconstruction_error, [a.requires_grad_() for a in args])


@pytest.mark.parametrize("n,c,d", SHAPES)
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_linear_relu_and_its_gradients_equal_the_plain_form(n, c, d, dtype):
    g = generator(n * 13 + c)
    args = [torch.randn(n, c, generator=g, dtype=dtype), torch.randn(d + 3, c, generator=g, dtype=dtype),
            torch.randn(d + 3, generator=g, dtype=dtype)]
    upstream = torch.randn(n, d + 3, generator=g, dtype=f64)

    def value_and_grads(*tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = training.linear_relu(*leaves)
        (out * upstream.to(out.dtype)).sum().backward()
        return [out.detach()] + [leaf.grad for leaf in leaves]

    got = value_and_grads(*args)
    with reference():
        want = value_and_grads(*(t.double() for t in args))
    for a, b in zip(got, want):
        _close_at_scale(a, b, dtype)


@pytest.mark.parametrize("n,c", [(0, 4), (1, 1), (3, 5), (257, 63), (1000, 384)])
def test_dropout_keep_is_seeded_and_independent_of_the_thread_count(n, c):
    masks = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            masks.append(training.dropout_keep(n, c, 0.5, torch.Generator().manual_seed(3)))
        finally:
            torch.set_num_threads(before)
    assert masks[0].shape == (n, c) and masks[0].dtype == torch.bool
    assert torch.equal(masks[0], masks[1])
    other = training.dropout_keep(n, c, 0.5, torch.Generator().manual_seed(4))
    assert n * c < 64 or not torch.equal(masks[0], other)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    keep = training.dropout_keep(4000, 100, p, generator(8))
    want = 1 - round(p * 65536) / 65536
    assert abs(float(keep.float().mean()) - want) < 0.005
    assert (keep.float().mean(0) - want).abs().max() < 0.05  # every column, not only on average
    # neighbouring elements (slices of one hashed word) are independent
    pairs = (keep[:, 0::4] & keep[:, 1::4]).float().mean()
    assert abs(float(pairs) - want**2) < 0.01


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_adadelta_steps_equal_torch(dtype):
    g = generator(21)
    shapes = [(7, 5), (5,), (1, 1), (3, 4, 2)]
    ours = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    theirs = [p.clone() for p in ours]
    opt_ours = training.Adadelta(ours, lr=0.7, rho=0.9, eps=1e-6)
    opt_torch = torch.optim.Adadelta(theirs, lr=0.7, rho=0.9, eps=1e-6, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g, dtype=dtype)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_torch.step()
    tol = {"rtol": 1e-13, "atol": 1e-13} if dtype == f64 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
    sa, sb = opt_ours.state_dict(), opt_torch.state_dict()
    assert sa["param_groups"][0].keys() == sb["param_groups"][0].keys()
    for k in sb["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys() and float(sa["state"][k]["step"]) == 5
        torch.testing.assert_close(sa["state"][k]["square_avg"], sb["state"][k]["square_avg"], **tol)
        torch.testing.assert_close(sa["state"][k]["acc_delta"], sb["state"][k]["acc_delta"], **tol)
    restored = torch.optim.Adadelta([p.clone() for p in ours], lr=0.7, rho=0.9, eps=1e-6)
    restored.load_state_dict(sa)  # a checkpoint of ours loads into torch's, and back


def test_adadelta_falls_back_to_torch_for_what_the_kernel_does_not_do():
    p = torch.ones(3, requires_grad=True)
    opt = training.Adadelta([p], lr=1.0, weight_decay=0.5)
    p.grad = torch.ones(3)
    assert not opt._fusable()
    ref = torch.ones(3, requires_grad=True)
    ref.grad = torch.ones(3)
    torch_opt = torch.optim.Adadelta([ref], lr=1.0, weight_decay=0.5)
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach())


def test_a_training_step_equals_the_plain_one():
    """FVVAE.loss and its gradients with the kernels equal the plain-torch ones (float64, dropout on, the
    paper's one hidden layer, the classifier), and so does one AdaDelta step."""
    def step():
        model = fv.FVVAE(20, 4, num_classes=3, seed=2).double().train()
        x = torch.relu(torch.randn(45, 20, generator=generator(30), dtype=f64))
        labels = torch.randint(0, 3, (45,), generator=generator(31))
        noise = model.draw_noise(45, generator(32), dtype=f64)
        opt = training.Adadelta(model.parameters())
        losses = model.loss(x, labels, (1.0, 1.0, 10.0), noise=noise)
        losses.total.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return losses.as_floats(), grads, [p.detach().clone() for p in model.parameters()]

    got = step()
    with reference():
        want = step()
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


# (hidden layers, classes, lambda3, dropout, norm, rows): the paper's one hidden layer, the release's none,
# two; no classifier, a classifier with lambda3 = 0; no dropout; rows: one, part of a tile (tiles of 128 rows),
# tiles and a tail
STEPS = [(None, 3, 10.0, 0.5, "descriptor", 200), ((), 3, 10.0, 0.5, "descriptor", 65),
         ((7, 5), 4, 1.0, 0.3, "none", 1), (None, 0, 0.0, 0.5, "descriptor", 130), (9, 3, 0.0, 0.0, "map", 64)]


@pytest.mark.parametrize("hidden,classes,lambda3,dropout,norm,rows", STEPS)
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_the_fused_step_equals_autograd_of_the_loss(hidden, classes, lambda3, dropout, norm, rows, dtype):
    """loss_backward's C++ step: the loss terms and every parameter's gradient equal autograd of FVVAE.loss
    computed in float64."""
    def run(model_dtype, fused):
        model = fv.FVVAE(20, 4, num_classes=classes, hidden_dim=hidden, dropout=dropout, norm=norm, seed=5)
        model = model.double().train()
        with torch.no_grad():  # sigma_x partly under its floor, as training can have it
            model.log_sigma_x.uniform_(-1.0, 0.5, generator=generator(41))
            model.log_sigma_x_floor.fill_(-0.5)
            model.log_sigma_z.uniform_(-0.5, 0.5, generator=generator(42))
        model = model.to(model_dtype)
        x = torch.relu(torch.randn(rows, 20, generator=generator(40), dtype=f64)).to(model_dtype)
        labels = torch.randint(0, max(classes, 1), (rows,), generator=generator(43)) if classes else None
        keep, eps = model.draw_noise(rows, generator(44), dtype=f64)
        eps = eps.to(model_dtype)
        if fused:
            assert training.loss_backward_fused(model, x)
            terms = training.loss_backward(model, x, labels, (keep, eps), (1.0, 0.7, lambda3))
        else:
            with reference():
                terms = training.loss_backward(model, x, labels, (keep, eps), (1.0, 0.7, lambda3))
        return [float(t) for t in terms], {k: p.grad for k, p in model.named_parameters()}

    got_terms, got = run(dtype, True)
    want_terms, want = run(f64, False)
    rtol, atol = (1e-10, 1e-12) if dtype == f64 else (2e-4, 2e-5)
    assert got_terms == pytest.approx(want_terms, rel=rtol, abs=atol)
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want[name].to(dtype), rtol=rtol, atol=atol, msg=name)


def test_the_fused_step_reads_the_batch_rows_from_the_data():
    """loss_backward(..., rows=r) on the training data equals it on data[r] (the kernel gathers the rows)."""
    source = torch.relu(torch.randn(300, 20, generator=generator(50), dtype=f64))
    rows = torch.randint(0, 300, (150,), generator=generator(51))
    results = []
    for x, picked in ((source, rows), (source[rows], None)):
        model = fv.FVVAE(20, 4, num_classes=3, seed=6).double().train()
        labels = torch.randint(0, 3, (150,), generator=generator(52))
        noise = model.draw_noise(150, generator(53), dtype=f64)
        terms = training.loss_backward(model, x, labels, noise, (1.0, 1.0, 5.0), rows=picked)
        results.append((terms, [p.grad for p in model.parameters()]))
    for a, b in zip(results[0][0] + tuple(results[0][1]), results[1][0] + tuple(results[1][1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = fv.FVVAE(20, 4, seed=6).double().train()
    with pytest.raises(RuntimeError, match="rows must index"):
        training.loss_backward(model, source, None, model.draw_noise(2, generator(54), dtype=f64), (1.0, 1.0, 0.0),
                               rows=torch.tensor([0, 300]))
