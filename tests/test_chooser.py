"""The CUDA op's choice among its designs (fvvae_fast/ops/chooser.py, dispatch.forward_impl), tested with
stand-ins: fake designs with injected timings, the public op routed through them on CPU tensors; and the
real design table (fused, split, plain torch) against the float64 reference under the interpreter."""

from __future__ import annotations

import warnings

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.ops import chooser, dispatch, reference
from fvvae_fast.ops.chooser import Chooser, Design

from .cases import CASES, Case, check_forward, make_inputs
from .conftest import DEVICE
from .test_fisher_vectors import check_vectors


class FakeTimer:
    """Seconds per design name; records what it timed."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.timed = seconds, []

    def __call__(self, fn):
        name = fn()  # the stand-in designs return their name
        self.timed.append(name)
        return self.seconds[name]


def _stand_ins(*names, sync_free=("fused", "split", "plain")):
    return tuple(Design(n, lambda *a, _n=n, **kw: _n, sync_free=n in sync_free) for n in names)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(chooser.DESIGN_ENV, raising=False)
    monkeypatch.delenv(chooser.CACHE_ENV, raising=False)


def test_picks_the_fastest_and_times_each_key_once():
    timer = FakeTimer({"fused": 3.0, "split": 1.0, "plain": 2.0})
    ch = Chooser(timer)
    designs = _stand_ins("fused", "split", "plain")
    assert ch.pick(("k", 1), designs, (), {}).name == "split"
    assert ch.pick(("k", 1), designs, (), {}).name == "split"
    assert timer.timed == ["fused", "split", "plain"], "timed once per key"
    timer.seconds["plain"] = 0.5  # fp32: plain torch measured faster, so it is picked
    assert ch.pick(("k", 2), designs, (), {}).name == "plain"
    assert len(timer.timed) == 6


def test_forced_design_is_run_untimed(monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setenv(chooser.DESIGN_ENV, "plain")
    assert Chooser(timer).pick(("k",), _stand_ins("fused", "plain"), (), {}).name == "plain"
    assert timer.timed == []
    monkeypatch.setenv(chooser.DESIGN_ENV, "fastest")
    with pytest.raises(ValueError, match="FVVAE_DESIGN.*'fastest'"):
        Chooser(timer).pick(("k",), _stand_ins("fused", "plain"), (), {})


def _capturing(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)


def test_no_timing_under_capture(monkeypatch):
    """Capture: the cached ranking's best sync-free design, else the default (first), never a timing."""
    timer = FakeTimer({"fused": 3.0, "split": 2.0, "plain": 1.0})
    ch = Chooser(timer)
    designs = _stand_ins("fused", "split", "plain", sync_free=("fused", "split"))
    _capturing(monkeypatch, True)
    assert ch.pick(("k",), designs, (), {}).name == "fused" and timer.timed == []
    _capturing(monkeypatch, False)
    assert ch.pick(("k",), designs, (), {}).name == "plain"
    _capturing(monkeypatch, True)
    assert ch.pick(("k",), designs, (), {}).name == "split", "plain syncs: not run under capture"
    assert len(timer.timed) == 3


def test_no_timing_while_compiling_or_flagging_syncs(monkeypatch):
    _capturing(monkeypatch, False)
    assert chooser.timing_allowed() and chooser.sync_allowed()
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)
    assert not chooser.timing_allowed() and not chooser.sync_allowed()
    _capturing(monkeypatch, False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not chooser.timing_allowed() and chooser.sync_allowed()


def test_a_failing_design_is_never_picked():
    def broken(*a, **kw):
        raise RuntimeError("no grouped mm here")

    timer = FakeTimer({"fused": 2.0})
    designs = (Design("split", broken), *_stand_ins("fused"))
    with pytest.warns(RuntimeWarning, match="'split' failed"):
        assert Chooser(timer).pick(("k",), designs, (), {}).name == "fused"


def test_rankings_persist_in_the_cache_file(monkeypatch, tmp_path):
    path = tmp_path / "sub" / "designs.json"
    monkeypatch.setenv(chooser.CACHE_ENV, str(path))
    designs = _stand_ins("fused", "split")
    Chooser(FakeTimer({"fused": 2.0, "split": 1.0})).pick(("k",), designs, (), {})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    fresh = FakeTimer({})
    assert Chooser(fresh).pick(("k",), designs, (), {}).name == "split" and fresh.timed == [], "read, not timed"
    path.write_text("{not json")  # damaged: ignored, then rewritten whole
    again = FakeTimer({"fused": 1.0, "split": 2.0})
    assert Chooser(again).pick(("k",), designs, (), {}).name == "fused" and again.timed == ["fused", "split"]
    assert Chooser(FakeTimer({})).pick(("k",), designs, (), {}).name == "fused"


@pytest.fixture
def routed(monkeypatch):
    """backend=None treated as CUDA on these CPU tensors, with stand-in designs that compute the reference and
    record which ran; returns (seconds per design, names of the designs run)."""
    ran: list[str] = []

    def design(name, op):
        def run(*args, out_dtype=None):
            ran.append(name)
            return getattr(reference, op)(*args, out_dtype=out_dtype)
        return Design(name, run)

    seconds = {"fused": 2.0, "split": 3.0, "plain": 1.0}

    def fake_timer(fn):
        before = len(ran)
        fn()
        return seconds[ran[before]]

    monkeypatch.setattr(dispatch, "_chooses_design", lambda backend, device: backend in (None, dispatch.AUTO))
    monkeypatch.setattr(dispatch, "_designs", lambda op: tuple(design(n, op) for n in dispatch.DESIGNS))
    monkeypatch.setattr(dispatch, "_device_key", lambda device: "sm_fake")
    monkeypatch.setattr(dispatch, "CHOOSER", Chooser(fake_timer))
    return seconds, ran


def test_public_op_runs_the_chosen_design(routed):
    seconds, ran = routed
    inputs = make_inputs(CASES[1], torch.float32)
    check_forward(fv.fisher_accumulate(*inputs), inputs, torch.float32, "chosen")
    assert ran == ["fused", "split", "plain", "plain"], "timed each design, then ran the fastest"
    fv.fisher_accumulate(*inputs)
    assert ran[-1] == "plain" and len(ran) == 5
    fv.fisher_accumulate(*make_inputs(CASES[1], torch.bfloat16))  # another dtype: another key, timed again
    assert len(ran) == 9
    ran.clear()
    fv.fisher_accumulate(*inputs, backend="cpu" if dispatch.available("cpu", inputs[0].device) is None else "reference")
    assert ran == [], "a named backend is never routed to the chooser"
    seconds["split"] = 0.1
    with torch.no_grad():
        fv.fisher_vectors(*inputs)
    assert ran == ["fused", "split", "plain", "split"]


def test_shape_buckets():
    """Sets and typical set lengths to powers of two; C and d exact."""
    assert dispatch._bucket(4096 * 50, 512, 255, 4096) == (512, 255, 4096, 64)
    assert dispatch._bucket(4000 * 50, 512, 255, 4000) == (512, 255, 4096, 64)
    assert dispatch._bucket(64 * 1250, 512, 255, 64) == (512, 255, 64, 2048)
    assert dispatch._bucket(7, 512, 255, 1) != dispatch._bucket(7, 512, 256, 1)


_TRITON = dispatch.available("triton", DEVICE)


@pytest.mark.skipif(_TRITON is not None, reason=str(_TRITON))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["float32", "bfloat16", "float16", "float64"])
def test_every_real_design_matches_the_reference(dtype):
    """The design table the CUDA op chooses from: each forward and vectors design, awkward sizes."""
    case = Case("designs", 37, 19, (5, 17, 1, 0, 40))
    inputs = make_inputs(case, dtype, DEVICE)
    scale = (0.1 + torch.rand(case.c * (case.d + 1), dtype=torch.float64)).to(DEVICE)
    for design in dispatch._designs("forward"):
        check_forward(design.run(*inputs, out_dtype=None), inputs, dtype, f"design {design.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for design in dispatch._designs("vectors"):
            out = design.run(*inputs, scale, 1e-12, out_dtype=torch.bfloat16)
            check_vectors(out, inputs, dtype, scale, torch.bfloat16, f"vectors design {design.name}")
