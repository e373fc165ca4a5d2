"""Fixtures: the backends to test (Triton runs on CPU under TRITON_INTERPRET=1 when there is no GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fvvae_fast.ops import dispatch  # noqa: E402

from .cases import SEED  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    return f"fvvae_fast test seed: FVVAE_TEST_SEED={SEED}; device: {DEVICE}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


def _backend_param(name: str, device: torch.device):
    reason = dispatch.available(name, device)
    return pytest.param((name, device), id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


def _backend_params():
    params = [_backend_param("reference", torch.device("cpu")), _backend_param("cpu", torch.device("cpu"))]
    params.append(_backend_param("triton", DEVICE))
    if DEVICE.type == "cuda":
        params.append(pytest.param(("reference", DEVICE), id="reference-cuda"))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> tuple[str, torch.device]:
    """(backend name, device) for every fisher_accumulate implementation that can run here."""
    return request.param
