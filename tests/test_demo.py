"""The built-in demo runs end to end on a tiny configuration; the fallback is announced once."""

from __future__ import annotations

import warnings

import torch

from fvvae_fast.demo import DemoConfig, run_demo
from fvvae_fast.ops import dispatch


def test_demo_smoke(capsys):
    figures = run_demo(DemoConfig(train_sets=30, test_sets=15, set_size=8, dim=16, latent_dim=3,
                                  num_classes=3, iterations=5), progress=False)
    out = capsys.readouterr().out
    assert figures["fv_dim"] == 16 * 4
    assert "encode: 45 sets" in out and "top-1" in out
    assert 0.0 <= figures["accuracy"] <= 1.0


def test_reference_fallback_is_announced_once(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda name, device: "not built (test)")
    dispatch._say_fallback_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.resolve(None, torch.device("cpu")) == "reference"
    assert len([w for w in caught if "using the reference implementation" in str(w.message)]) == 1
