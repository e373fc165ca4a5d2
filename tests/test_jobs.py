"""The stage jobs and the config runner: one declaration per setting (the parser's defaults are the
jobs'), typed checks, own-input refusal from the library, a rerun that redoes only what changed,
the user-error family, and a command line that imports nothing heavy for ``--help``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fvvae_fast.cli import build_parser
from fvvae_fast.errors import UserError, is_user_error
from fvvae_fast.pipelines.config import run_config
from fvvae_fast.pipelines.jobs import JOBS, EncodeJob, TrainJob
from fvvae_fast.pipelines.options import JobError

from .cases import generator

REQUIRED = {"descriptors": ["--dataset", "folder", "--out", "o"], "train": ["--descriptors", "d", "--out", "m"],
            "fim": ["--model", "m", "--descriptors", "d", "--out", "f"],
            "encode": ["--model", "m", "--descriptors", "d", "--out", "o"], "evaluate": ["--fisher", "f"],
            "finetune": ["--dataset", "folder", "--out", "w"]}


@pytest.mark.parametrize("stage", list(JOBS))
def test_the_parser_defaults_are_the_jobs(stage):
    args = build_parser(stage).parse_args([stage, *REQUIRED[stage]])
    given = {REQUIRED[stage][i].lstrip("-").replace("-", "_") for i in range(0, len(REQUIRED[stage]), 2)}
    for f in dataclasses.fields(JOBS[stage]):
        if f.name not in given:
            assert getattr(args, f.name) == f.default, f.name
    job = JOBS[stage](**{f.name: getattr(args, f.name) for f in dataclasses.fields(JOBS[stage])})
    assert job.settings()["out" if stage != "evaluate" else "fisher"] is not None


def test_job_fields_are_checked_and_converted():
    job = TrainJob(descriptors="d", out="m", iterations="7", hidden_dim="512,256", lr="0.5")
    assert (job.iterations, job.hidden_dim, job.lr) == (7, [512, 256], 0.5)
    for bad, needle in [({"iterations": 0}, "iterations (--iterations): must be >= 1"),
                        ({"latent_dim": "x"}, "latent_dim (--latent-dim): expected an integer"),
                        ({"iterations": True}, "expected an integer"),
                        ({"extend": "yes"}, "extend (--extend): expected true or false"),
                        ({"norm": "l3"}, "norm (--norm): expected one of"),
                        ({"out": None}, "out (--out) is required")]:
        with pytest.raises(JobError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            TrainJob(**{"descriptors": "d", "out": "m", **bad})


def test_a_job_refuses_to_write_over_its_inputs(tmp_path):
    (tmp_path / "desc").mkdir()
    (tmp_path / "desc" / "keep").write_text("x")
    job = EncodeJob(model=str(tmp_path / "m.pt"), descriptors=str(tmp_path / "desc"), out=str(tmp_path / "desc"),
                    overwrite=True)
    with pytest.raises(JobError, match="would overwrite the input --descriptors"):
        job.run(progress=False)
    assert (tmp_path / "desc" / "keep").read_text() == "x"


def test_user_errors_are_told_from_bugs():
    assert is_user_error(JobError("x")) and is_user_error(FileNotFoundError("f")) and issubclass(JobError, UserError)
    with pytest.raises(ValueError) as raised:
        TrainJob(descriptors="d", out="m", lr="fast")  # our check
    assert is_user_error(raised.value)
    with pytest.raises(ValueError) as raised:
        np.zeros(3).reshape(2, 2)  # raised inside numpy: a bug of ours if it reaches the command line
    assert not is_user_error(raised.value)
    assert not is_user_error(KeyError("k"))


def test_help_imports_no_torch():
    code = "import sys; from fvvae_fast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=Path(__file__).parents[1])


def _arrays(tmp_path: Path) -> Path:
    g = generator(71)
    sets, labels = 24, np.arange(24) % 3
    lengths = 5 + (np.arange(sets) * 7) % 6
    x = np.abs(np.random.default_rng(g.initial_seed()).normal(size=(int(lengths.sum()), 6)))
    x[np.arange(len(x)), labels.repeat(lengths)] += 2.0  # a class shows in its own channel
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "splits.txt").write_text("\n".join("train" if i % 4 else "test" for i in range(sets)))
    cfg = tmp_path / "run.toml"
    cfg.write_text("""out = "work"
[descriptors]
dataset = "arrays"
arrays = "x.npy"
offsets = "offsets.npy"
labels = "labels.npy"
splits = "splits.txt"
shard_items = 8
[train]
latent_dim = 3
hidden_dim = "none"
iterations = 4
batch_sets = 6
lambda3 = 0
[fim]
mode = "diagonal"
[encode]
batch_sets = 5
[evaluate]
C = 10
""")
    return cfg


def test_run_redoes_only_the_stages_downstream_of_a_change(tmp_path):
    cfg = _arrays(tmp_path)
    said: list[str] = []
    run_config(cfg, progress=False, say=said.append)
    work = tmp_path / "work"
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {"descriptors", "train", "fim", "encode", "evaluate"} and results["encode"]["computed"] == 24
    assert json.loads((work / "config.json").read_text())["train"]["latent_dim"] == 3
    desc_bytes = {p: p.read_bytes() for p in (work / "descriptors/shards").glob("*.npy")}
    model_bytes = (work / "model.pt").read_bytes()

    said.clear()  # a changed encoding setting: descriptors, train and fim are kept
    cfg.write_text(cfg.read_text().replace("batch_sets = 5", "batch_sets = 5\nnormalize = false"))
    run_config(cfg, progress=False, say=said.append)
    text = "\n".join(said)
    assert "== descriptors: checked" in text and "0 items computed" in text
    assert "== train: checked" in text and "train: 0 iterations" in text
    assert "== fim: done before with these settings and inputs, kept" in text
    assert "== encode: redone (changed: normalize)" in text and "encode: 24 sets computed" in text
    assert "== evaluate: redone" in text
    assert (work / "model.pt").read_bytes() == model_bytes
    assert desc_bytes == {p: p.read_bytes() for p in (work / "descriptors/shards").glob("*.npy")}

    said.clear()  # more iterations alone: the model is trained on, the stages after it are redone
    cfg.write_text(cfg.read_text().replace("iterations = 4", "iterations = 6"))
    run_config(cfg, progress=False, say=said.append)
    text = "\n".join(said)
    assert "== train: redone (changed: iterations)" in text and "train: 2 iterations" in text and "resumed from 4" in text
    assert "== fim: redone" in text and "== encode: redone" in text and "== evaluate: redone" in text
    assert "0 items computed" in text


def test_run_config_refuses_unknown_keys_and_run_set_paths(tmp_path):
    cfg = _arrays(tmp_path)
    text = cfg.read_text()
    cfg.write_text(text.replace("[train]\n", "[train]\nlatent = 3\n"))
    with pytest.raises(JobError, match=r"\[train\]: unknown key 'latent'"):
        run_config(cfg, progress=False, say=lambda _: None)
    cfg.write_text(text.replace("[train]\n", "[train]\nout = \"m.pt\"\n"))
    with pytest.raises(JobError, match="'out' is set by `fvvae run`"):
        run_config(cfg, progress=False, say=lambda _: None)
    cfg.write_text(text.replace("latent_dim = 3", "latent_dim = \"three\""))
    with pytest.raises(JobError, match=r"\[train\]: latent_dim \(--latent-dim\): expected an integer"):
        run_config(cfg, progress=False, say=lambda _: None)
    assert not (tmp_path / "work").exists()
