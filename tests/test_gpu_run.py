"""bench/gpu_run.py, the device run: its dry run (tiny shapes on the CPU under TRITON_INTERPRET=1) goes
through every section, and its guards record a failure or a spent budget and go on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_goes_through_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]
    errors = [r for r in rows if any(k.endswith("error") for k in r)]
    assert not errors, errors
    sections = {r["section"] for r in rows}
    assert sections == {"env", "ceilings", "forward", "wave", "chooser", "backward", "product", "ncu", "done"}
    wave, = (r for r in rows if r["section"] == "wave")  # the interpreter's config: 16-row steps, 32-wide C tiles
    assert (wave["kernel"], wave["busy_programs"], wave["steps_per_program"]) == ("_fwd_tma_kernel", 4, 3), wave
    forward = {(r["what"], r["shape"], r["dtype"]): r for r in rows if r["section"] == "forward"}
    assert {w for w, _, _ in forward} == {"fused", "split", "split-triton", "plain-torch", "naive-autograd"}
    assert len(forward) == 5 * 2 * 2
    for (what, _, dtype), r in forward.items():  # naive autograd runs bf16 end to end: a few % off
        assert r["max_rel_err"] < (0.1 if what == "naive-autograd" else 1e-2 if dtype == "bf16" else 1e-5), (what, r)
    product = {r["what"]: r for r in rows if r["section"] == "product"}
    assert {"fisher_vectors", "train", "FisherVectorHead", "finetune", "nccl one-rank group"} <= set(product)
    assert product["nccl one-rank group"]["skipped"] and "skipped" not in product["train"]
    md = (tmp_path / "gpu_run.md").read_text().splitlines()
    assert md[0].startswith("| section |") and len(md) == 2 + len(rows)


def test_guards_record_a_failure_and_a_spent_budget(tmp_path):
    gpu_run = _module()
    run = gpu_run.Run(tmp_path, budget_s=60.0, dry=True)
    with run.guarded("s", "broken") as ok:
        if ok:
            raise RuntimeError("boom")
    with run.guarded("s", "cuda", cuda_only=True) as ok:
        assert ok is None
    run.budget_s = 0.0
    with run.guarded("s", "late") as ok:
        assert ok is None
    rows = [json.loads(line) for line in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]
    assert rows[0]["error"] == "RuntimeError: boom" and "boom" in rows[0]["traceback"]
    assert rows[1]["skipped"] == gpu_run.CUDA_ONLY and rows[2]["skipped"] == "time budget spent"


def test_refuses_to_run_without_cuda_unless_dry(tmp_path, capsys, monkeypatch):
    gpu_run = _module()
    monkeypatch.setattr(gpu_run.torch.cuda, "is_available", lambda: False)
    assert gpu_run.main(["--out", str(tmp_path)]) == 2
    assert "gpu_run: error: no CUDA device" in capsys.readouterr().err

