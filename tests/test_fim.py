"""FisherInformation (paper Eq. 12-13): diagonal, lowrank (Frequent Directions) and kronecker.

Small D (a few dozen to a few hundred), float64; every dense (D, D) matrix here is built by
the test as the oracle, never by the library.
"""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
import torch

import fvvae_fast.io
from fvvae_fast.encode import fisher_encode
from fvvae_fast.encode import fisher_gradients as _fisher_gradients
from fvvae_fast.fim import DEFAULT_DAMPING, FisherInformation
from fvvae_fast.model import FVVAE
from fvvae_fast.ops.reference import residual
from fvvae_fast.provenance import UnknownProvenance
from fvvae_fast.sets import DescriptorSets
from fvvae_fast.train import TrainConfig, train

from .cases import generator

f64 = torch.float64
MODES = [("diagonal", None), ("lowrank", 6), ("kronecker", None)]
MODE_IDS = ["diagonal", "lowrank", "kronecker"]


def _model(c: int = 6, d: int = 3, salt: int = 0, dead_unit: bool = False) -> FVVAE:
    """A random float64 FV-VAE; ``dead_unit``: decoder unit 0 never fires, so G[:, 0, :] = 0."""
    torch.manual_seed(1000 + salt)
    model = FVVAE(in_dim=c, latent_dim=d, hidden_dim=0).double().eval()
    with torch.no_grad():
        model.log_sigma_x.normal_(0, 0.3)
        model.decoder.bias.uniform_(0.0, 0.5)
        if dead_unit:
            model.decoder.weight[0] = 0
            model.decoder.bias[0] = -1
    return model


def _sets(num_sets: int, c: int, salt: int = 0, max_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw descriptors x (N, C) float64 and offsets (S+1,) with set lengths 0..max_len."""
    g = generator(salt)
    lengths = torch.randint(0, max_len + 1, (num_sets,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.rand(int(offsets[-1]), c, generator=g, dtype=f64), offsets


def _batches(x, offsets, sizes):
    """Split (x, offsets) into consecutive batches of ``sizes`` sets: [(x_b, offsets_b, label)]."""
    out, s0 = [], 0
    for n in sizes:
        lo, hi = int(offsets[s0]), int(offsets[s0 + n])
        out.append((x[lo:hi], offsets[s0 : s0 + n + 1] - lo, None))
        s0 += n
    assert s0 == offsets.numel() - 1
    return out


def _random_g(s: int, c: int, k: int, salt: int, rank: int | None = None) -> torch.Tensor:
    """(s, c, k) float64 rows of a given rank (full when None), uneven scales per coordinate."""
    g = generator(salt)
    dim = c * k
    scales = torch.rand(dim, generator=g, dtype=f64) * 3 + 0.1
    if rank is None:
        rows = torch.randn(s, dim, generator=g, dtype=f64)
    else:
        rows = torch.randn(s, rank, generator=g, dtype=f64) @ torch.randn(rank, dim, generator=g, dtype=f64)
    return (rows * scales).reshape(s, c, k)


def _fed(mode, rank, model, x, offsets, **kw) -> FisherInformation:
    return FisherInformation(mode, rank, **kw).update_descriptors(model, x, offsets)


@torch.no_grad()
def fisher_gradients(model, x, offsets):
    return _fisher_gradients(model, x, offsets)


def _normalize_raw_fv(raw_fv: np.ndarray) -> np.ndarray:
    """NumPy transcription of the release's normalize_raw_fv.m (fv-vae/fv-vae), raw_fv (N, d)."""
    n, d = raw_fv.shape
    eps = 1e-10
    fv = raw_fv / np.tile(np.maximum(np.sqrt(np.sum(raw_fv * raw_fv, 0)), eps), (n, 1))
    fv = np.sign(fv) * np.sqrt(np.abs(fv))
    return fv / np.tile(np.maximum(np.sqrt(np.sum(fv * fv, 1)), eps)[:, None], (1, d))


# ----------------------------------------------------------------------------- diagonal


def test_diagonal_is_the_mean_of_squares():
    G = _random_g(57, 7, 5, salt=1)
    fim = FisherInformation(mode="diagonal").update(G)
    torch.testing.assert_close(fim.diagonal(), G.reshape(57, -1).square().mean(0), rtol=1e-14, atol=0)
    assert fim.diagonal().dtype == f64 and fim.num_sets == 57 and fim.dim == 35 and fim.shape == (7, 5)


def test_diagonal_accumulates_float32_input_in_float64():
    G = _random_g(40, 16, 9, salt=2).float()
    fim = FisherInformation(mode="diagonal").update(G).update(-G.reshape(40, -1))  # (S, D) and any sign
    expect = G.double().reshape(40, -1).square().mean(0)
    torch.testing.assert_close(fim.diagonal(), expect, rtol=1e-14, atol=0)
    w = fim.whiten(G)
    assert w.dtype == torch.float32 and w.shape == (40, 144)
    torch.testing.assert_close(w.double(), fim.whiten(G.double()), rtol=1e-6, atol=1e-6)


def test_diagonal_damping_floors_small_coordinates():
    G = _random_g(30, 4, 5, salt=3)
    G[:, 0, 0] *= 1e-6  # variance 1e-12 of the others: under the default floor
    fim = FisherInformation(mode="diagonal").update(G)
    diag = G.reshape(30, -1).square().mean(0)
    expect = G.reshape(30, -1) / diag.clamp_min(DEFAULT_DAMPING * diag.mean()).sqrt()
    torch.testing.assert_close(fim.whiten(G), expect, rtol=1e-13, atol=0)
    assert (G.reshape(30, -1)[:, 0] != 0).all() and fim.whiten(G)[:, 0].abs().max() < 1e-2


@pytest.mark.parametrize("dead_unit", [False, True], ids=["all-live", "dead-unit"])
def test_diagonal_damping0_reproduces_normalize_raw_fv(dead_unit):
    """FV = -F^(-1/2) vec(G), signed sqrt, L2 (fisher_encode) == -normalize_raw_fv(G) exactly."""
    model = _model(c=6, d=3, dead_unit=dead_unit)
    x, offsets = _sets(80, 6, salt=4)
    G = fisher_gradients(model, x, offsets)
    raw = G.reshape(80, -1).numpy()
    fim = FisherInformation(mode="diagonal", damping=0.0).update(G)
    with torch.no_grad():
        ours = fisher_encode(model, x, offsets, fim=fim, normalize=True)
    np.testing.assert_allclose(ours.numpy(), -_normalize_raw_fv(raw), rtol=1e-12, atol=1e-14)
    if dead_unit:  # an all-zero coordinate maps to 0 in both (the release: 0 / max(0, 1e-10))
        assert (raw[:, :4] == 0).all() and (ours[:, :4] == 0).all()


# ----------------------------------------------------------------------------- lowrank


@pytest.mark.parametrize("data_rank", [5, None], ids=["rank-5-of-96", "full-rank"])
def test_lowrank_whitens_to_identity_when_k_covers_the_data(data_rank):
    s, c, k = 300, 12, 8
    G = _random_g(s, c, k, salt=5, rank=data_rank)
    rank = data_rank or c * k
    rows = G.reshape(s, -1)
    for damping in (1e-9, 1e-3):
        fim = FisherInformation(mode="lowrank", rank=rank, damping=damping)
        for part in G.split(41):
            fim.update(part)
        assert fim.sketch_error <= 1e-9 * fim.diagonal().mean()  # rank < sketch size: exact
        w = fim.whiten(G)
        cov = w.t() @ w / s  # the whitened training set's second moment (D, D), test only
        e = torch.linalg.eigvalsh(cov)
        top, rest = e[-rank:], e[:-rank]
        # F_hat = U L U^T + floor I here, so cov has eigenvalues L_i / (L_i + floor) and zeros.
        lam_min = float(torch.linalg.eigvalsh(rows.t() @ rows / s)[-rank:].min())
        low = 1.0 / (1.0 + damping * float(fim.diagonal().mean()) / lam_min)
        # (rounding: the whitening cancels terms of size sqrt(L / floor), so 1e-7, not 1e-15)
        assert float(top.min()) >= low - 1e-7 and float(top.max()) <= 1 + 1e-7
        assert rest.numel() == 0 or float(rest.abs().max()) < 1e-7
        if damping == 1e-9 and data_rank is None:
            torch.testing.assert_close(cov, torch.eye(c * k, dtype=f64), rtol=0, atol=1e-6)


def test_lowrank_factor_whitens_f_hat_exactly():
    """A F_hat A^T = I with F_hat = U L U^T + diag(max(diag F - diag(U L U^T), floor))."""
    G = _random_g(200, 10, 6, salt=6)
    fim = FisherInformation(mode="lowrank", rank=7).update(G)
    u, lam = fim.low_rank()
    diag = fim.diagonal()
    resid = (diag - u.square() @ lam).clamp_min(DEFAULT_DAMPING * diag.mean())
    f_hat = (u * lam) @ u.t() + torch.diag(resid)
    a = fim.whiten(torch.eye(60, dtype=f64)).t()  # column j = A e_j
    torch.testing.assert_close(a @ f_hat @ a.t(), torch.eye(60, dtype=f64), rtol=0, atol=1e-10)
    torch.testing.assert_close(a.t() @ a, torch.linalg.inv(f_hat), rtol=1e-8, atol=1e-8)
    assert torch.allclose(u.t() @ u, torch.eye(u.shape[1], dtype=f64), atol=1e-10)


def test_lowrank_sketch_bound():
    """0 <= F - B^T B / n <= sketch_error I and sketch_error <= (||A||_F^2 - ||B||_F^2) / (l n)."""
    G = _random_g(400, 10, 8, salt=7)
    rows = G.reshape(400, -1)
    fim = FisherInformation(mode="lowrank", rank=4).update(G)
    sk = fim._stats.fd.sketch.double()
    gap = torch.linalg.eigvalsh(rows.t() @ rows / 400 - sk.t() @ sk / 400)
    scale = float(fim.diagonal().sum())
    assert float(gap.min()) >= -1e-12 * scale and float(gap.max()) <= fim.sketch_error * (1 + 1e-9)
    assert fim.sketch_error <= (rows.square().sum() - sk.square().sum()) / (8 * 400) * (1 + 1e-9)
    torch.testing.assert_close(fim.diagonal(), rows.square().mean(0), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- kronecker


def _dense_kronecker(model, x, offsets, damping):
    """The oracle, dense: K = T_bar B (x) A (B = E[r r^T], A = E[z~ z~^T] over descriptors), its spectrum
    floored at damping x mean diag, and the mean term u = sqrt(c) vec(E[r z~^T]), c = mean T (T - 1)."""
    with torch.no_grad():
        z = model.encode(x)
        r = residual(model.preprocess(x), z, model.decoder.weight, model.decoder.bias, model.inv_var())
    zt = torch.cat([z, torch.ones(len(z), 1, dtype=f64)], 1)
    b, a = r.t() @ r / len(r), zt.t() @ zt / len(r)
    s = offsets.numel() - 1
    dense = (len(r) / s) * torch.kron(b, a)  # (D, D) in row-major vec order
    e, v = torch.linalg.eigh(dense)
    floor = damping * dense.diagonal().mean()
    lengths = offsets.diff().double()
    u = (lengths * (lengths - 1)).mean().sqrt() * (r.t() @ zt / len(r)).reshape(-1)
    return (v * e.clamp_min(floor)) @ v.t(), u, bool((e < floor).any())


@pytest.mark.parametrize("damping", [0.0, 1e-8, 0.3])
def test_kronecker_whitening_is_exact_for_its_estimate(damping):
    """whiten = A with A^T A = F_hat^(-1) and A F_hat A^T = I, F_hat = K_damped + u u^T (dense oracle)."""
    c, d = 6, 3
    model = _model(c, d, salt=8)
    x, offsets = _sets(70, c, salt=8)
    fim = _fed("kronecker", None, model, x, offsets, damping=damping)
    k, u, floored = _dense_kronecker(model, x, offsets, damping)
    f_hat = k + torch.outer(u, u)
    undamped = _dense_kronecker(model, x, offsets, 0.0)[0] + torch.outer(u, u)
    torch.testing.assert_close(fim.diagonal(), undamped.diagonal(), rtol=1e-10, atol=0)
    dim = c * (d + 1)
    a = fim.whiten(torch.eye(dim, dtype=f64)).t()  # column j = A e_j
    torch.testing.assert_close(a @ f_hat @ a.t(), torch.eye(dim, dtype=f64), rtol=0, atol=1e-8)
    torch.testing.assert_close(a.t() @ a, torch.linalg.inv(f_hat), rtol=1e-7, atol=1e-7)
    G = fisher_gradients(model, x, offsets)
    torch.testing.assert_close(fim.whiten(G), G.reshape(70, -1) @ a.t(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fim.whiten(G), fim.whiten(G.reshape(70, -1)), rtol=0, atol=0)
    # 1e-8 leaves every eigenvalue above the floor (two-GEMM form), 0.3 floors some (rotated form).
    assert floored == (damping == 0.3)


def test_kronecker_mean_term_brings_the_estimate_closer_to_dense_f():
    """On sets of independent non-negative descriptors under a trained model, T_bar B (x) A + c u u^T
    is nearer the dense E[vec G vec G^T] than T_bar B (x) A alone. The margin depends on the draw (the
    with/without error ratio ran 0.42-0.93 over 48 seeds), so only the order is asserted."""
    c, d, t = 8, 3, 20
    g = generator(31)
    x = torch.relu(torch.randn(400 * t, c, generator=g, dtype=f64) + 0.3)
    offsets = torch.arange(401) * t
    torch.manual_seed(31)
    model = FVVAE(in_dim=c, latent_dim=d, dropout=0.0)
    train(model, DescriptorSets(x, offsets), TrainConfig(iterations=150, batch_sets=64, lambda3=0.0), progress=False)
    model = model.double()
    G = fisher_gradients(model, x, offsets).reshape(400, -1)
    dense = G.t() @ G / 400
    k, u, _ = _dense_kronecker(model, x, offsets, 0.0)
    fim = _fed("kronecker", None, model, x, offsets, damping=0.0)
    with_mean = (k + torch.outer(u, u) - dense).norm() / dense.norm()
    without = (k - dense).norm() / dense.norm()
    assert float(with_mean) < float(without)
    torch.testing.assert_close(fim.diagonal(), (k + torch.outer(u, u)).diagonal(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_whiten_is_differentiable_in_g(mode, rank):
    model = _model(salt=13)
    fim = _fed(mode, rank, model, *_sets(30, 6, salt=13))
    G = fisher_gradients(model, *_sets(4, 6, salt=14)).requires_grad_()
    assert torch.autograd.gradcheck(fim.whiten, (G,))


def test_kronecker_update_with_g_alone_says_what_it_needs():
    with pytest.raises(ValueError, match="update_descriptors"):
        FisherInformation(mode="kronecker").update(torch.randn(3, 4, 5))


# ----------------------------------------------------------------------------- streaming, merge


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_one_pass_equals_several_batches(mode, rank):
    model = _model(salt=9)
    x, offsets = _sets(90, 6, salt=9)
    one = FisherInformation(mode, rank).estimate(model, [(x, offsets, None)], progress=False)
    many = FisherInformation(mode, rank).estimate(model, _batches(x, offsets, [1, 30, 7, 52]), progress=False)
    G = fisher_gradients(model, x, offsets)
    assert one.num_sets == many.num_sets == 90
    # G of a batch may differ from G of the whole in the last bit (encoder GEMM blocking); the
    # lowrank whitening amplifies that by up to sqrt(L_max / floor), hence its looser tolerance.
    tol = {"rtol": 1e-8, "atol": 1e-9} if mode == "lowrank" else {"rtol": 1e-11, "atol": 1e-12}
    torch.testing.assert_close(many.whiten(G), one.whiten(G), **tol)
    if mode != "kronecker":
        direct = FisherInformation(mode, rank).update(G)
        torch.testing.assert_close(direct.whiten(G), one.whiten(G), **tol)


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_merge_equals_one_estimator_over_the_union(mode, rank):
    model = _model(salt=10)
    x, offsets = _sets(120, 6, salt=10)
    parts = _batches(x, offsets, [50, 1, 69])
    union = FisherInformation(mode, rank).estimate(model, parts, progress=False)
    merged = FisherInformation(mode, rank)  # empty: merging into it copies
    for px, po, _ in parts:
        merged.merge(_fed(mode, rank, model, px, po))
    merged.merge(FisherInformation(mode, rank))  # merging an empty one is a no-op
    assert merged.num_sets == union.num_sets == 120
    G = fisher_gradients(model, x, offsets)
    if mode == "kronecker":
        for m, u in zip(merged.kronecker_factors(), union.kronecker_factors()):
            torch.testing.assert_close(m, u, rtol=1e-13, atol=1e-15)
        return
    torch.testing.assert_close(merged.diagonal(), union.diagonal(), rtol=1e-13, atol=0)
    if mode == "diagonal":
        torch.testing.assert_close(merged.whiten(G), union.whiten(G), rtol=1e-13, atol=0)
        return
    # lowrank: both sketches obey the Frequent Directions bound over the union's rows.
    rows = G.reshape(120, -1)
    F = rows.t() @ rows / 120
    for est in (merged, union):
        sk = est._stats.fd.sketch.double()
        gap = torch.linalg.eigvalsh(F - sk.t() @ sk / 120)
        assert float(gap.min()) >= -1e-12 * float(F.trace())
        assert float(gap.max()) <= est.sketch_error * (1 + 1e-9) + 1e-12 * float(F.trace())
        assert est.sketch_error <= (rows.square().sum() - sk.square().sum()) / (est.sketch_rows * 120) + 1e-12


def test_merge_rejects_a_different_estimator():
    a = FisherInformation("lowrank", rank=3).update(torch.randn(5, 40))
    with pytest.raises(ValueError, match="rank=4"):
        a.merge(FisherInformation("lowrank", rank=4).update(torch.randn(5, 40)))
    with pytest.raises(ValueError, match="D=30"):
        a.merge(FisherInformation("lowrank", rank=3).update(torch.randn(5, 30)))
    with pytest.raises(ValueError, match="mode='diagonal'"):
        a.merge(FisherInformation("diagonal").update(torch.randn(5, 40)))
    with pytest.raises(TypeError, match="FisherInformation"):
        a.merge(torch.randn(5, 40))


# ----------------------------------------------------------------------------- save / load


# The file format (fim/estimator.py state_dict; each mode's keys in fim/diagonal.py, lowrank.py, kronecker.py).
FILE_HEADER = ["format", "version", "mode", "rank", "sketch", "damping", "dim", "shape", "num_sets", "num_descriptors",
               "model_fingerprint"]
FILE_STATISTICS = {"diagonal": ["sumsq"], "lowrank": ["sumsq", "sketch_rows", "sketch_shrunk"],
                   "kronecker": ["b_sum", "a_sum", "m_sum", "pairs"]}


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_save_load_round_trip(tmp_path, mode, rank):
    model = _model(salt=11)
    x, offsets = _sets(40, 6, salt=11)
    fim = _fed(mode, rank, model, x, offsets, damping=0.02)
    path = tmp_path / "fim.pt"
    fim.save(path)
    assert os.listdir(tmp_path) == ["fim.pt"]  # no temp file left behind
    G = fisher_gradients(model, x, offsets)
    for loaded in (FisherInformation.load(path), FisherInformation(mode, rank).load(path)):
        assert (loaded.mode, loaded.rank, loaded.damping, loaded.num_sets) == (mode, rank or 0, 0.02, 40)
        torch.testing.assert_close(loaded.whiten(G), fim.whiten(G), rtol=0, atol=0)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "fvvae_fast.FisherInformation" and state["version"] == 3
    assert list(state) == [*FILE_HEADER, *FILE_STATISTICS[mode], "checksum"]  # the format, in its order
    c, j = 6, 4
    assert (state["mode"], state["rank"], state["sketch"], state["dim"], state["shape"]) == (
        mode, rank or 0, 2 * rank if rank else 0, c * j, [c, j])
    assert state["num_sets"] == 40 and state["num_descriptors"] == (int(offsets[-1]) if mode == "kronecker" else 0)
    shapes = {"sumsq": (c * j,), "b_sum": (c, c), "a_sum": (j, j), "m_sum": (c, j)}
    for key, shape in shapes.items():
        if key in state:
            assert state[key].shape == shape and state[key].dtype == f64 and state[key].device.type == "cpu"
    if mode == "lowrank":
        assert state["sketch_rows"].shape[1] == c * j and state["sketch_rows"].shape[0] < 2 * state["sketch"]
        assert isinstance(state["sketch_shrunk"], float)
    if mode == "kronecker":
        assert state["pairs"] == float((offsets.diff() * (offsets.diff() - 1)).sum())


def test_an_empty_estimator_saves_its_header_only(tmp_path):
    FisherInformation("lowrank", rank=2, dim=12).save(tmp_path / "fim.pt")
    assert list(torch.load(tmp_path / "fim.pt", weights_only=True)) == [*FILE_HEADER, "checksum"]
    loaded = FisherInformation.load(tmp_path / "fim.pt")
    assert (loaded.num_sets, loaded.dim, loaded.nbytes, loaded.sketch_rows) == (0, 12, 0, 4)


def test_a_version_1_kronecker_file_loads_without_the_mean_term(tmp_path):
    model = _model(salt=12)
    x, offsets = _sets(30, 6, salt=12)
    fim = _fed("kronecker", None, model, x, offsets)
    state = {k: v for k, v in fim.state_dict().items() if k not in ("m_sum", "pairs")}
    torch.save({**state, "version": 1}, tmp_path / "v1.pt")
    with pytest.warns(UnknownProvenance, match="v1.pt: a FIM file of an earlier fvvae_fast version"):
        old = FisherInformation.load(tmp_path / "v1.pt")
    m, c = old.mean_term()
    assert c == 0 and torch.equal(m, torch.zeros(6, 4, dtype=f64))
    for got, want in zip(old.kronecker_factors(), fim.kronecker_factors()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_refuses_another_d_mode_or_version(tmp_path):
    path = tmp_path / "fim.pt"
    FisherInformation("diagonal").update(torch.randn(4, 24)).save(path)
    with pytest.raises(ValueError, match="D=24"):
        FisherInformation("diagonal").update(torch.randn(4, 30)).load(path)
    with pytest.raises(ValueError, match="D=24"):
        FisherInformation.load(path, dim=30)
    with pytest.raises(ValueError, match="mode='diagonal'"):
        FisherInformation("lowrank", rank=2).load(path)
    with pytest.raises(ValueError, match="mode='diagonal'"):
        FisherInformation.load(path, mode="kronecker")
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="version 99"):
        FisherInformation.load(tmp_path / "new.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fvvae_fast.FisherInformation file"):
        FisherInformation.load(tmp_path / "other.pt")
    (tmp_path / "damaged.pt").write_bytes(path.read_bytes()[:-64])  # was torch's RuntimeError
    with pytest.raises(ValueError, match="damaged.pt: not a readable fvvae_fast.FisherInformation file"):
        FisherInformation.load(tmp_path / "damaged.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "fim.pt"
    fim = FisherInformation("diagonal").update(torch.randn(4, 24, dtype=f64))
    fim.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fvvae_fast.io.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        fim.update(torch.randn(4, 24, dtype=f64)).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["fim.pt"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "G,match",
    [
        (torch.randn(0, 4, 6), "empty"),
        (torch.randn(3, 5, 6), "D=30"),
        (torch.randn(3, 24, 1, 1), r"\(S, 4, 6\) or \(S, 24\)"),
        (torch.randn(24), r"\(S, 4, 6\) or \(S, 24\)"),
        (torch.randn(3, 6, 4), r"\(C, d\+1\)=\(6, 4\)"),
        (torch.full((2, 24), float("nan")), "NaN or Inf"),
    ],
    ids=["empty", "wrong-D", "rank-4", "rank-1", "wrong-C", "nan"],
)
def test_bad_updates_are_rejected_and_change_nothing(G, match):
    fim = FisherInformation("lowrank", rank=3).update(torch.randn(5, 4, 6, dtype=f64))
    before = fim.diagonal().clone()
    with pytest.raises(ValueError, match=match):
        fim.update(G)
    assert fim.num_sets == 5 and torch.equal(fim.diagonal(), before)


def test_bad_types_and_configurations_are_rejected():
    with pytest.raises(TypeError, match="floating"):
        FisherInformation().update(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        FisherInformation().update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="mode must be one of"):
        FisherInformation(mode="dense")
    with pytest.raises(ValueError, match="needs rank=k >= 1"):
        FisherInformation(mode="lowrank")
    with pytest.raises(ValueError, match="rank=5 needs mode='lowrank'"):
        FisherInformation(mode="diagonal", rank=5)
    with pytest.raises(TypeError, match="rank must be an int"):
        FisherInformation(mode="lowrank", rank=2.5)
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        FisherInformation(damping=-1.0)
    with pytest.raises(ValueError, match="rank=30 exceeds D=24"):
        FisherInformation("lowrank", rank=30).update(torch.randn(3, 24))
    with pytest.raises(ValueError, match="D=24"):
        FisherInformation(dim=20).update(torch.randn(3, 24))
    with pytest.raises(RuntimeError, match="no data yet"):
        FisherInformation().whiten(torch.randn(3, 24))
    with pytest.raises(ValueError, match="D=20"):
        FisherInformation().update(torch.randn(3, 24)).whiten(torch.randn(3, 20))
    with pytest.raises(ValueError, match="no set"):
        FisherInformation().update_descriptors(_model(), torch.rand(0, 6, dtype=f64), torch.zeros(1, dtype=torch.int64))


# ----------------------------------------------------------------------------- scale


@pytest.mark.parametrize("mode,rank", [("diagonal", None), ("lowrank", 2)], ids=["diagonal", "lowrank"])
def test_full_size_d_never_forms_a_d_by_d_matrix(mode, rank):
    """D = 131,072 (C = 512, d = 255): a (D, D) float tensor would take 64 GiB; the whole run stays under 256 MiB."""
    G = torch.randn(6, 512, 256, generator=generator(12))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fim = FisherInformation(mode, rank).update(G[:3]).merge(FisherInformation(mode, rank).update(G[3:]))
    w = fim.whiten(G)
    assert w.shape == (6, 131072) and w.dtype == torch.float32 and bool(torch.isfinite(w).all())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_a_fim_fed_under_inference_mode_is_updated_merged_saved_and_loaded_later(tmp_path, mode, rank):
    """Statistics first made under ``torch.inference_mode()`` (what ``FVVAEEncoder.fit`` does) are plain
    tensors: a later update, merge, load into it and save in normal mode work and give what the same
    steps give in normal mode."""
    model = _model(salt=14)
    x, offsets = _sets(60, 6, salt=14)
    (x0, o0, _), (x1, o1, _) = _batches(x, offsets, [25, 35])
    with torch.inference_mode():
        fim = _fed(mode, rank, model, x0, o0)
        other = _fed(mode, rank, model, x1, o1)
        loaded_into = _fed(mode, rank, model, x1, o1)
    fim.update_descriptors(model, x1, o1)
    merged = _fed(mode, rank, model, x0, o0).merge(other)
    fim.save(tmp_path / "fim.pt")
    loaded_into.load(tmp_path / "fim.pt")
    loaded_into.update_descriptors(model, x0, o0)
    assert (fim.num_sets, merged.num_sets, loaded_into.num_sets) == (60, 60, 85)
    G = fisher_gradients(model, x, offsets)
    updated = _fed(mode, rank, model, x0, o0).update_descriptors(model, x1, o1)
    expected = [(fim, updated), (FisherInformation.load(tmp_path / "fim.pt"), updated),
                (merged, _fed(mode, rank, model, x0, o0).merge(_fed(mode, rank, model, x1, o1))),
                (loaded_into, FisherInformation.load(tmp_path / "fim.pt").update_descriptors(model, x0, o0))]
    for est, reference in expected:
        torch.testing.assert_close(est.whiten(G), reference.whiten(G), rtol=1e-13, atol=1e-15)


def test_a_fim_with_zero_sets_is_one_clear_value_error(tmp_path):
    """A FIM file made from no data loads (its header), and whitening with it names the empty estimate (a
    ValueError, one line on the command line; still a RuntimeError for callers that caught that)."""
    FisherInformation().save(tmp_path / "empty.pt")
    empty = FisherInformation.load(tmp_path / "empty.pt")
    for call in (lambda: empty.whiten(torch.randn(3, 24)), lambda: empty.diagonal()):
        with pytest.raises(ValueError, match=r"no data yet \(num_sets=0: the estimate holds no training set"):
            call()
