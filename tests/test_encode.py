"""fisher_encode: minus the reference for normalize=False, signed sqrt + L2, dense vs offsets, FIM hook."""

from __future__ import annotations

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.ops import reference

from .cases import generator


def _model_and_sets():
    torch.manual_seed(5)
    model = fv.FVVAE(10, 4).double().eval()
    with torch.no_grad():
        model.log_sigma_x.normal_(generator=generator(21))
    x = torch.rand(3, 6, 10, generator=generator(22), dtype=torch.float64)
    return model, x


def test_unnormalized_is_minus_the_reference():
    model, x = _model_and_sets()
    flat = x.reshape(-1, 10)
    offsets = torch.tensor([0, 6, 6, 18])
    fvs = fv.fisher_encode(model, flat, offsets, normalize=False)
    xp = flat / flat.norm(dim=1, keepdim=True)
    z = model.encoder(xp)
    G = reference.forward(xp, z, model.decoder.weight, model.decoder.bias, model.inv_var(), offsets)
    torch.testing.assert_close(fvs, -G.reshape(3, -1))
    assert fvs.shape == (3, 10 * 5) and bool((fvs[1] == 0).all())


def test_normalized_is_signed_sqrt_then_l2():
    model, x = _model_and_sets()
    raw = fv.fisher_encode(model, x, normalize=False)
    out = fv.fisher_encode(model, x)
    expected = raw.sign() * raw.abs().sqrt()
    torch.testing.assert_close(out, expected / expected.norm(dim=1, keepdim=True))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_dense_and_offsets_forms_agree():
    model, x = _model_and_sets()
    offsets = torch.arange(4) * 6
    torch.testing.assert_close(fv.fisher_encode(model, x), fv.fisher_encode(model, x.reshape(-1, 10), offsets))


def test_empty_set_gives_zero_vector():
    model, x = _model_and_sets()
    out = fv.fisher_encode(model, x[0], torch.tensor([0, 0, 6]))
    assert bool((out[0] == 0).all()) and torch.isfinite(out).all()


def test_fim_whiten_is_applied_before_the_sign():
    model, x = _model_and_sets()

    class Scale:
        def whiten(self, G):
            return 2.0 * G.reshape(G.shape[0], -1) + 1.0

    G = fv.fisher_gradients(model, x)
    torch.testing.assert_close(fv.fisher_encode(model, x, fim=Scale(), normalize=False),
                               -(2.0 * G.reshape(3, -1) + 1.0))


@pytest.mark.parametrize("v,kwargs,error,match", [
    (torch.ones(3), {}, ValueError, r"power_l2_normalize: v must be \(S, D\), got shape \(3,\)"),
    (torch.ones(2, 3, dtype=torch.int64), {}, TypeError, "power_l2_normalize: v must be a floating tensor"),
    ([[1.0, 2.0]], {}, TypeError, "power_l2_normalize: v must be a floating tensor, got list"),
    (torch.ones(2, 3), {"eps": -1.0}, ValueError, "power_l2_normalize: eps must be a finite real >= 1.175e-38"),
    (torch.zeros(2, 3), {"eps": 0.0}, ValueError, "power_l2_normalize: eps must be a finite real >= 1.175e-38"),
], ids=["1d", "int", "list", "eps", "eps-0"])
def test_power_l2_normalize_refuses_bad_input(v, kwargs, error, match):
    """One clear error (was an IndexError or torch's cast error)."""
    with pytest.raises(error, match=match):
        fv.power_l2_normalize(v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_power_l2_normalize_keeps_zero_rows_zero_in_every_dtype(dtype, grad):
    """float16 rounds the default eps 1e-12 to 0: the norms are floored in float32 (a zero row was NaN)."""
    v = torch.zeros(3, 4, dtype=dtype)
    v[1] = torch.tensor([3e4, -4e4, 1.0, 0.0])  # a squared norm beyond float16's range
    out = fv.power_l2_normalize(v.requires_grad_(grad))
    want = fv.power_l2_normalize(v.detach().double()).to(dtype)
    assert out.dtype == dtype and torch.equal(out[0], torch.zeros(4, dtype=dtype))
    torch.testing.assert_close(out.detach(), want)


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (7, 70_000), (2, 300_000)], ids=str)
def test_power_l2_normalize_chunked_path_matches_autograd_path(shape):
    from fvvae_fast.encode import power_l2_normalize

    v = torch.randn(shape, dtype=torch.float64)
    if shape[0]:
        v[0] = 0.0  # a zero row stays zero
    want = -v.sign() * v.abs().sqrt()
    want = want / want.norm(dim=1, keepdim=True).clamp_min(1e-12)
    with torch.no_grad():
        fast = power_l2_normalize(v, negate=True)
    slow = power_l2_normalize(v.clone().requires_grad_(), negate=True)
    torch.testing.assert_close(fast, want)
    torch.testing.assert_close(slow.detach(), want)


def test_bad_encoders_are_one_clear_error_each():
    """A non-model, a string as fim, a FIM with zero sets, NumPy input to the head: one TypeError or ValueError
    naming the argument (were AttributeErrors, and a RuntimeError for the empty FIM)."""
    import numpy as np

    model = fv.FVVAE(in_dim=6, latent_dim=2, seed=0).eval()
    x = torch.rand(2, 3, 6, generator=generator(9))
    cases = [
        (lambda: fv.fisher_encode("model.pt", x), TypeError, r"fisher_encode: model must be an FVVAE, got str"),
        (lambda: fv.fisher_encode(model, x, fim="fim.pt"), TypeError,
         r"fisher_encode: fim must be None or have whiten\(G\) .*got str 'fim.pt'"),
        (lambda: fv.fisher_encode(model, x, fim=fv.FisherInformation()), ValueError,
         r"FisherInformation.whiten: no data yet \(num_sets=0"),
        (lambda: fv.FisherVectorHead(model)(x.numpy()), TypeError,
         r"FisherVectorHead: x must be a torch.Tensor \(torch.from_numpy for an array\), got ndarray"),
        (lambda: fv.FisherVectorHead(model)(x.reshape(6, 6), np.array([0, 3, 6])), TypeError,
         r"FisherVectorHead: offsets must be a torch.Tensor .*got ndarray"),
        (lambda: fv.FisherVectorHead(model, fim="diagonal"), TypeError, r"FisherVectorHead: fim must be None or have"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
