"""The protocol on a small split, the comparison (every row, resume), attention, the built-in data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fvvae_fast.attention import descriptor_attention
from fvvae_fast.encode import fisher_encode
from fvvae_fast.evaluation import CompareConfig, evaluate_vectors, run_comparison
from fvvae_fast.evaluation.compare import EvalData, format_table, spread_notes
from fvvae_fast.fim import FisherInformation
from fvvae_fast.model import FVVAE
from fvvae_fast.synthetic import make_sets

from .cases import SEED


def test_protocol_scores_separable_and_random_labels():
    g = np.random.default_rng(SEED)
    centres = g.normal(size=(4, 30)) * 3
    y_tr, y_te = np.repeat(np.arange(4), 20), np.repeat(np.arange(4), 10)
    x_tr = centres[y_tr] + g.normal(size=(80, 30))
    x_te = centres[y_te] + g.normal(size=(40, 30))
    s = evaluate_vectors(x_tr, y_tr, x_te, y_te)
    assert s.top1 == 1.0 and s.top3 == 1.0 and s.mean_ap == pytest.approx(1.0) and s.svm_converged
    noise = evaluate_vectors(g.normal(size=(80, 30)), y_tr, g.normal(size=(40, 30)), y_te)
    assert noise.top1 < 0.6 and noise.top1 <= noise.top3


def test_protocol_rejects_bad_input():
    x, y = np.ones((4, 3)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="one D"):
        evaluate_vectors(x, y, np.ones((2, 5)), y[:2])
    with pytest.raises(ValueError, match=r"evaluate_vectors: .* got \(4,\) and \(4, 3\)"):
        evaluate_vectors(np.ones(4), y, x, y)  # named before the normalisation sees it
    with pytest.raises(ValueError, match="need >= 2"):
        evaluate_vectors(x, np.zeros(4), x, y)


def _data(train_sets=60, test_sets=30, dim=12, with_global=True):
    sets = make_sets(train_sets + test_sets, set_size=6, dim=dim, num_classes=3, seed=SEED % 1000)
    cut = int(sets.offsets[train_sets])
    tr = type(sets)(sets.x[:cut], sets.offsets[: train_sets + 1], sets.labels[:train_sets])
    te = type(sets)(sets.x[cut:], sets.offsets[train_sets:] - cut, sets.labels[train_sets:])
    glob = [torch.randn(len(s), 7) for s in (tr, te)] if with_global else [None, None]
    return EvalData(tr, te, *glob, name="generated")


TINY = CompareConfig(latent_dim=3, iterations=5, sweep_iterations=4, batch_sets=16, rank=2, latent_sweep=(1, 3), gmm_sweep=(1, 2), vlad_sweep=(2, 3), lambda3_sweep=(0.0, 10.0),
                     compress_latents=(1,), fit_descriptors=200, seeds=(0,))


def test_comparison_has_every_row_and_resumes(tmp_path):
    data = _data()
    result = run_comparison(data, TINY, tmp_path, progress=False)
    table = {(r["method"], r["param"].split(",")[-1].strip()) for r in result.rows if r["group"] == "table"}
    names = {m for m, _ in table}
    assert {"GA", "AVE", "Concatenation", "FV (GMM)", "VLAD", "BP", "FV-VAE-", "FV-VAE"} <= names
    assert {p for m, p in table if m == "FV-VAE"} == {"FIM none", "FIM diagonal", "FIM lowrank k=2", "FIM kronecker"}
    dims = {r["method"]: r["dim"] for r in result.rows if r["group"] == "table"}
    c = data.train.dim
    assert dims["BP"] == c * c and dims["GA"] == 7
    assert dims["FV (GMM)"] == dims["VLAD"] == dims["FV-VAE"] == c * (3 + 1)  # sized for d = 3 by themselves
    assert {r["group"] for r in result.rows} == {"table", "fig4a", "fig4b", "fig4c"}
    assert all(0.0 <= r["top1"] <= r["top3"] <= 1.0 for r in result.rows)
    assert "| BP |" in format_table(result.summary)
    saved = json.loads((tmp_path / "results-seed0.json").read_text())
    assert len(saved["rows"]) == len(result.rows)
    # a rerun with the same data and settings recomputes nothing: a poisoned row survives
    saved["rows"][0]["top1"] = -1.0
    (tmp_path / "results-seed0.json").write_text(json.dumps(saved))
    again = run_comparison(data, TINY, tmp_path, progress=False)
    assert again.rows[0]["top1"] == -1.0
    # other settings: everything is recomputed
    other = run_comparison(data, CompareConfig(**{**TINY.__dict__, "iterations": 6}), tmp_path, progress=False)
    assert other.rows[0]["top1"] >= 0.0


@pytest.mark.parametrize("latent,gmm,vlad", [(31, 16, 32), (3, 2, 4), (4, 3, 5), (1, 1, 2), (254, 128, 255)])
def test_baselines_are_sized_for_the_fvvae_dimension_at_any_latent_dim(latent, gmm, vlad):
    """FV (GMM) 2 K C and VLAD K C nearest FV-VAE's C (d+1) (d + 1 odd: K rounded up), unless set; the
    mixture-weight terms count when asked for."""
    cfg = CompareConfig(latent_dim=latent)
    assert cfg.baseline_sizes(384) == (gmm, vlad)
    assert cfg.dimensions(384) == (f"dimensions at C=384: FV-VAE d={latent}: C (d+1) = {384 * (latent + 1):,}; "
                                   f"FV (GMM) K={gmm}: {2 * gmm * 384:,}; VLAD K={vlad}: K C = {vlad * 384:,}")
    assert CompareConfig(latent_dim=latent, gmm_components=5, vlad_centres=7).baseline_sizes(384) == (5, 7)
    assert CompareConfig(latent_dim=31, gmm_weights=True).baseline_sizes(2) == (13, 32)  # 2 K C + K = 65 ~ 64


def test_seeds_give_mean_and_spread_of_the_table_rows(tmp_path):
    """Each seed runs the table (the sweeps only for the first); the summary is mean and sample std over seeds."""
    seen = []

    def data_for(seed):
        seen.append(seed)
        return _data()

    cfg = CompareConfig(**{**TINY.__dict__, "seeds": (3, 4, 5)})
    result = run_comparison(data_for, cfg, tmp_path, progress=False)
    assert seen == [3, 4, 5]
    assert {r["seed"] for r in result.rows if r["group"] == "fig4a"} == {3}
    bp = [r["top1"] for r in result.rows if r["method"] == "BP"]
    row = next(e for e in result.summary if e["method"] == "BP")
    assert row["n"] == 3 and row["top1_mean"] == pytest.approx(np.mean(bp))
    assert row["top1_std"] == pytest.approx(np.std(bp, ddof=1))
    ours = [r for r in result.rows if r["method"] == "FV-VAE" and r["param"].endswith("FIM none")]
    assert sorted(r["seed"] for r in ours) == [3, 4, 5]
    assert " ± " in format_table(result.summary)
    notes = spread_notes(result.summary)
    assert any("vs FV (GMM)" in n and ("within" in n or "exceeds" in n) for n in notes)


def test_comparison_without_global_features_or_equal_lengths(tmp_path):
    data = _data(with_global=False)
    off = data.train.offsets.clone()
    off[1] -= 1  # unequal set lengths: no Concatenation row
    data.train = type(data.train)(data.train.x, off, data.train.labels)
    rows = run_comparison(data, TINY, tmp_path, progress=False).rows
    names = {r["method"] for r in rows}
    assert "GA" not in names and "Concatenation" not in names and "BP" in names


@pytest.mark.parametrize("mode", ["none", "diagonal", "kronecker"])
def test_attention_sums_to_the_fisher_vector(mode):
    torch.manual_seed(SEED % 1000)
    model = FVVAE(in_dim=6, latent_dim=3).double().eval()
    x = torch.rand(9, 6, dtype=torch.float64)
    fim = None
    if mode != "none":
        fim = FisherInformation(mode).update_descriptors(model, torch.rand(40, 6, dtype=torch.float64),
                                                         torch.tensor([0, 10, 25, 40]))
    att = descriptor_attention(model, x, fim, chunk=4)
    fv = fisher_encode(model, x, torch.tensor([0, 9]), fim=fim, normalize=False)[0]
    # each descriptor's own term of the (linear) FV, computed one descriptor at a time
    terms = torch.stack([fisher_encode(model, x[t:t + 1], torch.tensor([0, 1]), fim=fim, normalize=False)[0]
                         for t in range(9)])
    torch.testing.assert_close(terms.sum(0), fv)
    torch.testing.assert_close(att.double(), terms.abs().sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which,labels,error,match", [
    ("train_y", np.array([0, 1, 0.5, 1]), ValueError, r"evaluate_vectors: train_y must be integers, got 0.5 at 2"),
    ("test_y", torch.tensor([0.0, 1.5]), ValueError, r"evaluate_vectors: test_y must be integers, got 1.5 at 1"),
    ("train_y", np.array([True, False, True, False]), TypeError, r"train_y must be integers, got bool values"),
], ids=["train 0.5", "test 1.5", "bool"])
def test_fractional_labels_are_refused_not_truncated(which, labels, error, match):
    """A label 0.5 was truncated into class 0."""
    g = torch.Generator().manual_seed(1)
    y = {"train_y": np.array([0, 1, 0, 1]), "test_y": np.array([0, 1]), which: labels}
    with pytest.raises(error, match=match):
        evaluate_vectors(torch.rand(4, 6, generator=g), y["train_y"], torch.rand(2, 6, generator=g), y["test_y"])
