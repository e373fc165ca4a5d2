"""The stage jobs and the config runner: one declaration per setting (the parser's defaults are the
jobs'), typed checks, own-input refusal from the library, a rerun that redoes only what changed,
the user-error family, and a command line that imports nothing heavy for ``--help``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fvvae_fast.cli import build_parser, main
from fvvae_fast.errors import UserError, is_user_error
from fvvae_fast.evaluation import evaluate_vectors
from fvvae_fast.fim import FisherInformation
from fvvae_fast.pipelines.config import read_config, run_config
from fvvae_fast.pipelines.jobs import JOBS, EncodeJob, EvaluateJob, TrainJob
from fvvae_fast.pipelines.options import JobError

from .cases import generator
from .test_io import full_disk, held_elsewhere  # noqa: F401 (full_disk: a fixture)

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
    with pytest.raises(JobError, match="--out .* is the input --descriptors"):
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
    with pytest.raises(JobError, match=r"\[train\]: latent_dim \(--latent-dim\): expected a number, got the string"):
        run_config(cfg, progress=False, say=lambda _: None)
    assert not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A whole run over generated arrays: work/{descriptors/, model.pt, fim.pt, fisher/} and the arrays."""
    root = tmp_path_factory.mktemp("run")
    run_config(_arrays(root), progress=False, say=lambda _: None)
    return root


def _input_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".toml"}


def _bytes_of(paths: list[Path]) -> dict[Path, bytes]:
    """Every byte of the files and folders ``paths`` (the inputs of a stage)."""
    return {p: p.read_bytes() for top in paths for p in ([top] if top.is_file() else sorted(top.rglob("*")))
            if p.is_file()}


def _one_line_exit_2(argv, capsys) -> str:
    from fvvae_fast.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fvvae {argv[0]}: error:"), err
    return err[0]


def test_no_stage_writes_inside_an_input_store(finished_run, capsys):
    """The three ways of issue 26 to destroy a store with exit 0: a FIM file over a store's manifest or one of its
    shards, an evaluation report over a Fisher store's manifest. Each is one line, exit 2; every input byte stays."""
    work = finished_run / "work"
    desc, fisher = work / "descriptors", work / "fisher"
    before = _input_bytes(finished_run)
    shard = sorted((desc / "shards").glob("*.npy"))[0]
    for out in (desc / "manifest.sqlite", shard):
        line = _one_line_exit_2(["fim", "--model", work / "model.pt", "--descriptors", desc, "--out", out], capsys)
        assert f"--out {out} lies inside the input --descriptors {desc}" in line
    line = _one_line_exit_2(["evaluate", "--fisher", fisher, "--json", fisher / "manifest.sqlite"], capsys)
    assert f"--json {fisher / 'manifest.sqlite'} lies inside the input --fisher {fisher}" in line
    link = finished_run / "link-to-desc"
    link.symlink_to(desc)  # the same through a symbolic link
    _one_line_exit_2(["encode", "--model", work / "model.pt", "--descriptors", desc, "--out", link / "fv"], capsys)
    _one_line_exit_2(["train", "--descriptors", desc, "--out", work / "m2.pt", "--log-dir", desc / "tb"], capsys)
    link.unlink()
    assert _input_bytes(finished_run) == before


def test_a_store_inside_the_dataset_root_is_refused(tmp_path, capsys):
    """`descriptors --dataset folder` of .npy files with --out inside --root: the second run found its own store
    among the inputs. Now refused up front with one line naming both, and the root is unchanged."""
    for cls in ("a", "b"):
        (tmp_path / "root" / "train" / cls).mkdir(parents=True)
        np.save(tmp_path / "root" / "train" / cls / "i.npy", np.ones((3, 4), np.float32))
    before = _input_bytes(tmp_path)
    line = _one_line_exit_2(["descriptors", "--dataset", "folder", "--root", tmp_path / "root", "--source",
                             "precomputed", "--out", tmp_path / "root" / "store", "--quiet"], capsys)
    assert "lies inside the input --root" in line
    _one_line_exit_2(["descriptors", "--dataset", "folder", "--root", tmp_path / "root", "--source", "precomputed",
                      "--out", tmp_path, "--quiet"], capsys)  # a store folder that holds the root
    assert _input_bytes(tmp_path) == before and not (tmp_path / "root" / "store").exists()


def test_the_run_folder_may_not_overlap_the_configs_inputs(tmp_path):
    """The runner checks its folder against the inputs of every stage before it writes its first file."""
    cfg = _arrays(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "x.npy").rename(tmp_path / "work" / "x.npy")
    cfg.write_text(cfg.read_text().replace('arrays = "x.npy"', 'arrays = "work/x.npy"'))
    with pytest.raises(JobError, match=r"the run's folder \(out\) .* holds the input \[descriptors\] arrays"):
        run_config(cfg, progress=False, say=lambda _: None)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["x.npy"]


@pytest.mark.parametrize("section, old, new, expected", [
    ("fim", 'mode = "diagonal"', 'mode = "diagonal"\nenabled = "no"', "'enabled': expected true or false"),
    ("train", "iterations = 4", 'iterations = "4"', r"iterations \(--iterations\): expected a number"),
    ("evaluate", "C = 10", 'C = "10"', r"C \(--C\): expected a number"),
    ("encode", "batch_sets = 5", 'batch_sets = 5\nnormalize = "false"', "expected true or false"),
], ids=["enabled", "iterations", "C", "normalize"])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, section, old, new, expected):
    """A string where a boolean or a number belongs (`enabled = "no"` ran the stage: any non-empty string was
    true) is refused with the section, the key and the expected type, before anything is written."""
    cfg = _arrays(tmp_path)
    cfg.write_text(cfg.read_text().replace(old, new))
    with pytest.raises(JobError, match=rf"\[{section}\]: .*{expected}"):
        run_config(cfg, progress=False, say=lambda _: None)
    assert not (tmp_path / "work").exists()


def _stage_argv(stage: str, root: Path, out: Path) -> list:
    work = root / "work"
    desc, model = work / "descriptors", work / "model.pt"
    return {
        "descriptors": ["descriptors", "--dataset", "arrays", "--arrays", root / "x.npy", "--offsets",
                        root / "offsets.npy", "--labels", root / "labels.npy", "--splits", root / "splits.txt",
                        "--source", "precomputed", "--out", out],
        "train": ["train", "--descriptors", desc, "--out", out, "--iterations", "2", "--batch-sets", "4",
                  "--latent-dim", "3", "--hidden-dim", "none", "--lambda3", "0"],
        "fim": ["fim", "--model", model, "--descriptors", desc, "--out", out],
        "encode": ["encode", "--model", model, "--fim", work / "fim.pt", "--descriptors", desc, "--out", out],
        "evaluate": ["evaluate", "--fisher", work / "fisher", "--json", out],
    }[stage] + (["--quiet"] if stage != "evaluate" else [])


INPUTS = ("x.npy", "work/descriptors", "work/descriptors/shards", "work/descriptors/manifest.sqlite",
          "work/model.pt", "work/fim.pt", "work/fisher")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from(["descriptors", "train", "fim", "encode", "evaluate"]),
       target=st.sampled_from(INPUTS), relation=st.sampled_from(["is", "inside", "deeper", "holds", "link", "apart"]),
       name=st.sampled_from(["out", "manifest.sqlite", "shard-00000.npy", "model.pt"]))
def test_no_stage_changes_an_input_byte_whatever_the_output_path(finished_run, capsys, tmp_path_factory, stage,
                                                                 target, relation, name):
    """Property: for random output paths around the input stores and files (the input itself, inside it, two
    levels down, a folder above it, inside it through a symbolic link, or apart), a stage either runs (apart)
    or refuses with one line and exit 2, and no input byte changes."""
    from fvvae_fast.cli import main

    root = tmp_path_factory.mktemp("layout")
    shutil.copytree(finished_run, root, dirs_exist_ok=True)  # each example writes into a fresh copy
    base = root / target
    apart = tmp_path_factory.mktemp("apart")
    inputs = [Path(p) for p in map(str, _stage_argv(stage, root, apart / "o")) if Path(p).exists()]
    before = _bytes_of(inputs)
    link = root / "link"
    if relation == "link":
        link.symlink_to(base)
    out = {"is": base, "inside": base / name, "deeper": base / "sub" / name, "holds": base.parent,
           "link": link / name, "apart": apart / name}[relation]
    try:
        code = main([str(a) for a in _stage_argv(stage, root, out)])
    finally:
        if relation == "link":
            link.unlink()
    err = capsys.readouterr().err
    real = out.resolve()
    overlaps = any(p == real or p in real.parents or real in p.parents for p in (i.resolve() for i in inputs))
    if overlaps:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    elif relation == "apart":
        assert code == 0, err
    assert _bytes_of(inputs) == before


def test_the_demo_writes_apart_from_a_given_store(finished_run, capsys):
    desc = finished_run / "work" / "descriptors"
    before = _bytes_of([desc])
    line = _one_line_exit_2(["demo", "--descriptors", desc, "--out", desc / "demo"], capsys)
    assert "lies inside the input --descriptors" in line and _bytes_of([desc]) == before


def test_a_full_disk_is_one_line_keeps_the_outputs_and_the_rerun_recovers(tmp_path, full_disk, monkeypatch, capsys):
    run_config(_arrays(tmp_path), progress=False, say=lambda _: None)
    work = tmp_path / "work"
    outputs = {name: (work / name).read_bytes() for name in ("model.pt", "fim.pt", "evaluation.json")}
    train = ["train", "--descriptors", work / "descriptors", "--out", work / "model.pt", "--latent-dim", "3",
             "--hidden-dim", "none", "--iterations", "6", "--batch-sets", "6", "--lambda3", "0", "--extend", "--quiet"]
    fim = ["fim", "--model", work / "model.pt", "--descriptors", work / "descriptors", "--out", work / "fim.pt",
           "--quiet"]
    evaluate = ["evaluate", "--fisher", work / "fisher", "--C", "10", "--json", work / "evaluation.json"]
    full_disk(free=100)
    for argv, out in ((train, "model.pt"), (fim, "fim.pt"), (evaluate, "evaluation.json")):
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err.strip() == f"fvvae {argv[0]}: error: {work / out}: no space left on device " \
                                                  "(the previous file is unchanged; free some space and rerun)"
    assert {name: (work / name).read_bytes() for name in outputs} == outputs and not list(work.glob(".*.tmp"))
    monkeypatch.undo()  # space freed: the same commands complete
    assert main([str(a) for a in train]) == 0 and main([str(a) for a in fim]) == 0
    assert "train: 2 iterations" in capsys.readouterr().out


def test_a_second_writer_of_a_checkpoint_or_a_fim_file_is_refused(tmp_path, capsys):
    run_config(_arrays(tmp_path), progress=False, say=lambda _: None)
    work = tmp_path / "work"
    model, fim = work / "model.pt", work / "fim.pt"
    before = _bytes_of([model, fim])
    train = ["train", "--descriptors", work / "descriptors", "--out", model, "--latent-dim", "4", "--iterations", "3",
             "--overwrite", "--quiet"]
    for argv, out in ((train, model), (["fim", "--model", model, "--descriptors", work / "descriptors", "--out", fim,
                                        "--mode", "kronecker", "--quiet"], fim)):
        with held_elsewhere(out) as pid:
            assert _one_line_exit_2(argv, capsys) == f"fvvae {argv[0]}: error: {out} is being written by another " \
                                                     f"process (pid {pid}); wait for it or choose another --out"
    assert _bytes_of([model, fim]) == before


def test_a_config_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark (was refused as "Invalid statement")."""
    cfg = _arrays(tmp_path)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    assert read_config(bom) == read_config(cfg) and read_config(bom)["out"] == "work"


def _exit_2_line(argv, capsys) -> str:
    """The one error line of a command that exits with 2, whether the parser or the job refuses it."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fvvae {argv[0]}: error: "), (code, err)
    return err[0]


def _bad_arrays(root: Path, out: Path) -> dict[str, Path]:
    """Files in ``out`` that are no descriptor arrays, offsets, labels or split names (made from those in ``root``)."""
    bad = {name.split(".")[0]: out / name for name in ("text.npy", "objects.npy", "header.npy", "short.npy",
                                                        "floats.npy", "labels2d.npy", "binary.txt")}
    bad["text"].write_text("0 5 10\n")
    np.save(bad["objects"], np.array([{"a": 1}] * 25, dtype=object), allow_pickle=True)
    good = (root / "offsets.npy").read_bytes()
    bad["header"].write_bytes(good[:8] + b"\xff\xff" + good[10:])  # a header length beyond the file
    bad["short"].write_bytes((root / "x.npy").read_bytes()[:-40])  # shorter than its header says
    np.save(bad["floats"], np.load(root / "offsets.npy").astype(np.float64) + 0.5)
    np.save(bad["labels2d"], np.zeros((24, 2), dtype=np.int64))
    bad["binary"].write_bytes(bytes(range(256)))
    return bad


def test_bad_settings_and_files_are_one_line(finished_run, tmp_path, capsys):
    """Each was a traceback (sklearn's, AdaDelta's, torch's seed overflow, numpy's loaders, a UTF-8 decode, or an
    empty estimator's RuntimeError)."""
    work = finished_run / "work"
    fisher, desc, model = work / "fisher", work / "descriptors", work / "model.pt"
    train = ["train", "--descriptors", desc, "--out", tmp_path / "m.pt", "--iterations", "2"]
    for argv, needle in [(["evaluate", "--fisher", fisher, "--C", "0"], "argument --C: must be > 0, got 0"),
                         (["evaluate", "--fisher", fisher, "--C", "nan"], "argument --C: expected a finite number"),
                         ([*train, "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
                         ([*train, "--seed", str(2**70)], f"argument --seed: must be <= {2**63 - 1}, got {2**70}")]:
        assert needle in _exit_2_line(argv, capsys)
    bad = _bad_arrays(finished_run, tmp_path)
    arrays = ["descriptors", "--dataset", "arrays", "--source", "precomputed", "--out", tmp_path / "s", "--quiet"]
    x, offsets = ["--arrays", finished_run / "x.npy"], ["--offsets", finished_run / "offsets.npy"]
    for argv, needle in [(["--arrays", bad["text"], *offsets], "text.npy: not a .npy file"),
                         (["--arrays", bad["objects"], *offsets], "objects.npy: not a readable .npy file of (N, C)"),
                         (["--arrays", bad["short"], *offsets], "short.npy: not a readable .npy file of (N, C)"),
                         ([*x, "--offsets", bad["text"]], "text.npy: not a .npy file"),
                         ([*x, "--offsets", bad["objects"]], "objects.npy: not a readable .npy file of (S+1,)"),
                         ([*x, "--offsets", bad["header"]], "header.npy: not a readable .npy file of (S+1,)"),
                         ([*x, "--offsets", bad["floats"]], "floats.npy: expected (S+1,) integer offsets, got an "
                                                            "array of dtype float64"),
                         ([*x, *offsets, "--labels", bad["objects"]], "objects.npy: not a readable .npy file of (S,)"),
                         ([*x, *offsets, "--labels", bad["labels2d"]], "labels2d.npy: expected (S,) labels"),
                         ([*x, *offsets, "--splits", bad["binary"]], "binary.txt: not a text file of split names")]:
        assert needle in _exit_2_line([*arrays, *argv], capsys), argv
    assert not (tmp_path / "s").exists()
    empty = tmp_path / "empty_fim.pt"
    FisherInformation(mode="diagonal").save(empty)
    assert "empty_fim.pt: the FIM file holds no estimate (saved before any update)" in _exit_2_line(
        ["encode", "--model", model, "--descriptors", desc, "--fim", empty, "--out", tmp_path / "f"], capsys)
    for job, kwargs, needle in [(EvaluateJob, {"fisher": [str(fisher)], "C": 0}, "C (--C): must be > 0"),
                                (TrainJob, {"lr": "nan"}, "lr (--lr): expected a finite"),
                                (TrainJob, {"seed": 2**70}, "seed (--seed): must be <=")]:
        with pytest.raises(JobError, match=re.escape(needle)):
            job(**({"descriptors": "d", "out": "m"} if job is TrainJob else {}), **kwargs)
    with pytest.raises(ValueError, match="evaluate_vectors: C must be a finite number > 0, got 0"):
        evaluate_vectors(np.eye(4), [0, 1, 0, 1], np.eye(4), [0, 1, 0, 1], C=0)


def test_encode_warns_when_most_vectors_are_zero(tmp_path, capsys):
    """The encode stage's one warning line names the share of zero vectors, the likely cause and the fix."""
    import torch

    from fvvae_fast.cli import main
    from fvvae_fast.train import load_model, save_checkpoint

    said: list[str] = []
    run_config(_arrays(tmp_path), progress=False, say=said.append)
    assert not [line for line in said if "warning" in line]  # the trained model: no warning
    work = tmp_path / "work"
    model = load_model(work / "model.pt")
    with torch.no_grad():
        model.decoder.bias.fill_(-1e6)  # every decoder unit off: every Fisher vector zero
    save_checkpoint(tmp_path / "off.pt", model)
    capsys.readouterr()
    assert main(["encode", "--model", str(tmp_path / "off.pt"), "--descriptors", str(work / "descriptors"),
                 "--out", str(tmp_path / "fisher"), "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "24 of 24 Fisher vectors (100%) are constant, 24 of them all zero" in warnings[0]
    assert "latent_dim=3" in warnings[0] and "smaller latent_dim" in warnings[0] and "more iterations" in warnings[0]
