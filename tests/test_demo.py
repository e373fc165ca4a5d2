"""The built-in demo on a tiny subset of the real data; the fallback is announced once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fvvae_fast.ops import dispatch


def test_builtin_data_files():
    from fvvae_fast.evaluation.builtin import clip_path, load_animal_mnist, load_mnist_digits, mobilenet_v2

    images, labels = load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype.name == "uint8"
    assert sorted(set(labels.tolist())) == list(range(10))
    digits, digit_labels = load_mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype.name == "uint8" and digits.max() == 255
    assert np.bincount(digit_labels).tolist() == [500] * 10
    assert clip_path("bikes.mp4").stat().st_size > 100_000
    model = mobilenet_v2()
    assert model.features[10].conv[0][0].out_channels == 384


def test_demo_smoke_on_a_tiny_subset(tmp_path, capsys):
    from fvvae_fast.cli import main

    code = main(["demo", "--out", str(tmp_path), "--train-per-class", "4", "--test-per-class", "2",
                 "--iterations", "3", "--sweep-iterations", "2", "--latent-dim", "3", "--seeds", "0,1", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    for method in ("| GA |", "| AVE |", "| Concatenation |", "| FV (GMM) |", "| VLAD |", "| BP |", "| FV-VAE- |",
                   "FIM kronecker"):
        assert method in out
    for name in ("fig4a_dimension", "fig4b_lambda3", "fig4c_compression", "fig5_spatial_attention",
                 "fig6_temporal_attention"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "table.md").is_file() and (tmp_path / "results.json").is_file()
    assert "data: Animal-MNIST (animal-mnist 0.4), 40 train / 20 test images" in out
    # --latent-dim 3: every baseline at FV-VAE's 384 x 4 dimensions, and the line says so
    assert ("dimensions at C=384: FV-VAE d=3: C (d+1) = 1,536; FV (GMM) K=2: 1,536; VLAD K=4: K C = 1,536"
            in out.splitlines())
    assert "| FV (GMM) | K=2 | 1,536 |" in out and "| VLAD | K=4 | 1,536 |" in out
    assert " ± " in out and "vs FV (GMM)" in out  # two seeds: mean ± std and the spread notes


def test_demo_refuses_a_missing_store(tmp_path, capsys):
    from fvvae_fast.cli import main

    assert main(["demo", "--out", str(tmp_path), "--descriptors", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "descriptor store not found" in capsys.readouterr().err


def test_reference_fallback_is_announced_once(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda name, device: "not built (test)")
    dispatch._say_fallback_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.resolve(None, torch.device("cpu")) == "reference"
    assert len([w for w in caught if "using the reference implementation" in str(w.message)]) == 1


def test_demo_takes_either_builtin_data_set():
    from fvvae_fast.cli import build_parser
    from fvvae_fast.evaluation.builtin import DATASETS

    assert set(DATASETS) == {"animal-mnist", "mnist-digits"}
    for name in DATASETS:
        assert build_parser().parse_args(["demo", "--dataset", name]).dataset == name
    assert build_parser().parse_args(["descriptors", "--dataset", "folder", "--out", "x"]).dataset == "folder"


def small_builtin_data():
    """A stand-in for the built-in data: two sets of three 4-d descriptors."""
    from fvvae_fast import DescriptorSets
    from fvvae_fast.evaluation.builtin import BuiltinData

    sets = DescriptorSets(torch.rand(6, 4), torch.tensor([0, 3, 6]), torch.tensor([0, 1]))
    return BuiltinData(sets, sets, torch.rand(2, 5), torch.rand(2, 5), np.zeros((2, 28, 28), np.uint8), (1, 3))


def test_a_damaged_descriptor_cache_is_computed_again(tmp_path, monkeypatch):
    """The demo's cached descriptors are read back checked: a damaged file is recomputed, not a traceback."""
    from fvvae_fast import demo
    from fvvae_fast.evaluation import builtin

    calls = []
    made = small_builtin_data()
    monkeypatch.setattr(builtin, "builtin_data", lambda *a, **k: calls.append(1) or made)
    cfg = demo.DemoConfig()
    (tmp_path / "builtin_descriptors-seed0.pt").write_bytes(b"damaged")
    assert demo._builtin(cfg, tmp_path, False, 0) is made
    assert torch.equal(demo._builtin(cfg, tmp_path, False, 0).train.x, made.train.x)  # the rewritten cache, read
    assert calls == [1]


def test_the_descriptor_cache_is_a_weights_only_file(tmp_path, monkeypatch):
    """The cache holds only tensors, strings and numbers (it used to pickle BuiltinData, read with
    weights_only=False): it reads back equal, and a crafted cache is computed again without running its code."""
    from fvvae_fast import demo
    from fvvae_fast.evaluation import builtin

    from .test_untrusted_files import Payload

    made = small_builtin_data()
    monkeypatch.setattr(builtin, "builtin_data", lambda *a, **k: made)
    demo._builtin(demo.DemoConfig(), tmp_path, False, 0)
    monkeypatch.setattr(builtin, "builtin_data", lambda *a, **k: pytest.fail("the cache was not read"))
    back = demo._builtin(demo.DemoConfig(), tmp_path, False, 0)
    for split in ("train", "test"):
        for name in ("x", "offsets", "labels"):
            assert torch.equal(getattr(getattr(back, split), name), getattr(getattr(made, split), name))
    assert torch.equal(back.train_global, made.train_global) and torch.equal(back.test_global, made.test_global)
    assert (back.test_images == made.test_images).all() and back.map_hw == made.map_hw
    assert back.classes == made.classes and back.name == made.name

    marker = tmp_path / "payload-ran"
    torch.save({"key": None, "data": Payload(marker)}, tmp_path / "builtin_descriptors-seed0.pt")
    monkeypatch.setattr(builtin, "builtin_data", lambda *a, **k: made)
    assert demo._builtin(demo.DemoConfig(), tmp_path, False, 0) is made
    assert not marker.exists()
