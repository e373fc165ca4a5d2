"""The ``fvvae`` command line: help, one-line errors, every stage, the whole chain from a TOML
config, and a run killed midway (SIGKILL) that restarts to byte-identical output."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from fvvae_fast.cli import main  # noqa: E402
from fvvae_fast.evaluation import evaluate_vectors  # noqa: E402
from fvvae_fast.store import Store  # noqa: E402

from .test_pipelines import make_corrupt, make_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path("/work/shared/official/caffe_vae_weights_ucf101_split1_vgg19.mat")
if not OFFICIAL.is_file():
    OFFICIAL = REPO.parent / "shared/official/caffe_vae_weights_ucf101_split1_vgg19.mat"
TINY = ["--backbone", "mobilenet_v3_small", "--layer", "features.4", "--random-weights"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """root/{train,test}/{a,b}/*.mp4, 3 + 2 videos per class, plus one truncated file."""
    root = tmp_path_factory.mktemp("videos")
    k = 0
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                make_video(root / split / cls / f"{cls}{i}.mp4", frames=5 + i, seed=k)
                k += 1
    make_corrupt(root / "train" / "a" / "zz_truncated.mp4", root / "train" / "a" / "a0.mp4")
    return root


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def descriptor_args(videos: Path, out: Path, *extra: str) -> list[str]:
    return ["descriptors", "--dataset", "folder", "--root", videos, *TINY, "--frames", "3", "--size", "64",
            "--levels", "4,2,1", "--shard-items", "4", "--workers", "0", "--out", out, "--quiet", *extra]


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["descriptors", "train", "fim", "encode", "evaluate", "run", "demo", "finetune"])
def test_help(command, capsys):
    text = help_text(capsys, command)
    assert text.startswith("usage: fvvae " + command)
    assert "--quiet" in text


@pytest.mark.parametrize("command", [None, "descriptors", "train", "fim", "encode", "evaluate", "run", "demo",
                                     "finetune"])
def test_help_is_plain_text(command, capsys):
    """Help made from docstrings shows no reST: no backquotes (``x``, `x`, :class:`x`), no literal-block "::"."""
    text = help_text(capsys, *[command] * (command is not None))
    assert "`" not in text and not re.search(r"::\s*$", text, flags=re.M), text


def test_help_says_what_evaluate_reports_and_which_backbones(capsys):
    assert all(word in help_text(capsys) for word in ("top-1", "top-3", "mAP"))
    text = " ".join(help_text(capsys, "evaluate").split())
    assert all(word in text for word in ("top-1", "top-3", "mAP")), text
    for command in ("descriptors", "finetune"):
        assert "timm:<name>" in " ".join(help_text(capsys, command).split())


def test_plain_text_of_rest():
    from fvvae_fast.cli import plain_text

    assert plain_text("``out`` of :class:`~.jobs.DescriptorsJob`, :mod:`fvvae_fast.io`, `fvvae train`, "
                      ":func:`the op <fvvae_fast.spp>`. Example::") == (
        "'out' of DescriptorsJob, fvvae_fast.io, 'fvvae train', the op. Example:")


def test_top_level_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("descriptors", "train", "fim", "encode", "evaluate", "run", "demo"):
        assert command in text


def test_version(capsys):
    import fvvae_fast

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fvvae {fvvae_fast.__version__}"


def one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fvvae ") and needle in err, err


def test_a_map_smaller_than_the_pyramid_and_a_vit_at_the_wrong_size_are_one_line_each(tmp_path, videos, capsys):
    """--size 64 makes the tiny backbone's map 4 x 4, under the 6 x 6 grid: refused with the smallest --size
    that fills it (nothing written), or taken with --levels that fit. A ViT built for 224 at --size 64:
    one line naming the size (was a 57-line traceback). A --size over the weights' crop: one notice line."""
    base = ["descriptors", "--dataset", "folder", "--root", videos, "--frames", "2", "--workers", "0", "--quiet",
            "--subset", "test"]
    one_line_error(capsys, run_cli(*base, *TINY, "--size", "64", "--out", tmp_path / "d"),
                   "a 4 x 4 map is smaller than the pyramid's 6 x 6 grid (levels 6,3,2,1): only 42 of its 50 "
                   "descriptors would be distinct; give size (--size) 81 or more, or levels of at most 4")
    assert not (tmp_path / "d").exists()
    one_line_error(capsys, run_cli(*base, "--backbone", "vit_b_16", "--layer", "conv_proj", "--random-weights",
                                   "--size", "64", "--levels", "4,2,1", "--out", tmp_path / "vit"),
                   "vit_b_16 up to conv_proj does not take 64 x 64 input")
    assert run_cli(*base, *TINY, "--size", "96", "--out", tmp_path / "d96") == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "notice" in line] == [
        "notice: --size 96 overrides the crop 224 of the ImageNet default (shorter side 256, crop 224): shorter "
        "side 110, crop 96"]
    source = Store.open(tmp_path / "d96").config["source"]
    assert (source["size"], source["resize"], source["interpolation"], source["std"]) == (
        96, 110, "bilinear", [0.229, 0.224, 0.225])


def test_user_mistakes_are_one_line_errors(tmp_path, videos, capsys):
    one_line_error(capsys, run_cli("descriptors", "--dataset", "folder", "--root", tmp_path / "nope", *TINY,
                                   "--out", tmp_path / "s"), "nope: folder not found")
    one_line_error(capsys, run_cli("descriptors", "--dataset", "folder", "--root", videos, "--out", tmp_path / "s",
                                   "--backbone", "resnet18", "--layer", "layer4"), "needs a weights file")
    one_line_error(capsys, run_cli("descriptors", "--dataset", "ucf101", "--root", videos, *TINY,
                                   "--out", tmp_path / "s"), "classInd.txt: file not found")
    one_line_error(capsys, run_cli("descriptors", "--dataset", "folder", "--root", videos, *TINY,
                                   "--weights", tmp_path / "w.pth", "--out", tmp_path / "s"), "w.pth")
    one_line_error(capsys, run_cli("train", "--descriptors", tmp_path / "none", "--out", tmp_path / "m.pt"),
                   "not a store")
    one_line_error(capsys, run_cli("encode", "--model", tmp_path / "m.pt", "--descriptors", tmp_path / "none",
                                   "--out", tmp_path / "f"), "model file not found")
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")  # was a traceback (UnpicklingError)
    one_line_error(capsys, run_cli("encode", "--model", tmp_path / "damaged.pt", "--descriptors", tmp_path / "none",
                                   "--out", tmp_path / "f"), "damaged.pt: not a readable fvvae_fast checkpoint")
    one_line_error(capsys, run_cli("descriptors", "--dataset", "arrays", "--out", tmp_path / "s"), "--arrays")
    cfg = tmp_path / "bad.toml"
    cfg.write_text('out = "o"\n[descriptors]\ndataset = "folder"\nlatent_dim = 3\n')
    one_line_error(capsys, run_cli("run", cfg), "unknown key 'latent_dim'")
    cfg.write_text('out = "o"\n[descriptors\n')
    one_line_error(capsys, run_cli("run", cfg), "invalid TOML")
    with pytest.raises(SystemExit) as exit_info:  # the argument parser's own check of option values: one line too
        main(["descriptors", "--dataset", "folder", "--out", "x", "--frames", "0"])
    one_line_error(capsys, exit_info.value.code, "argument --frames: must be >= 1, got 0")


def test_each_stage(tmp_path, videos, capsys):
    desc, model, fim, fisher = tmp_path / "desc", tmp_path / "model.pt", tmp_path / "fim.pt", tmp_path / "fisher"
    assert run_cli(*descriptor_args(videos, desc)) == 0
    out = capsys.readouterr().out
    assert "10 done, 1 failed" in out and "train/a/zz_truncated.mp4" in out
    store = Store.open(desc)
    assert store.splits() == ["test", "train"] and store.dim == 40
    assert run_cli("train", "--descriptors", desc, "--out", model, "--latent-dim", "5", "--iterations", "6",
                   "--batch-sets", "4", "--lambda3", "1", "--quiet") == 0
    assert "6 iterations" in capsys.readouterr().out
    assert run_cli("fim", "--model", model, "--descriptors", desc, "--out", fim, "--quiet") == 0
    assert "num_sets=6" in capsys.readouterr().out
    assert run_cli("encode", "--model", model, "--fim", fim, "--descriptors", desc, "--out", fisher, "--quiet") == 0
    assert "10 done, 1 failed" in capsys.readouterr().out
    X, y, ids = Store.open(fisher).vectors()
    assert X.shape == (10, 40 * 6) and np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert run_cli("evaluate", "--fisher", fisher, "--json", tmp_path / "eval.json") == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy:" in out and "6 'train' vectors" in out and (tmp_path / "eval.json").is_file()
    # one protocol: the command line's figures are evaluate_vectors' on the same (normalised) vectors
    (X_train, y_train, _), (X_test, y_test, _) = (Store.open(fisher).vectors(s) for s in ("train", "test"))
    want = evaluate_vectors(X_train, y_train, X_test, y_test, normalize=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert (saved["top1"], saved["top3"], saved["mean_ap"]) == (want.top1, want.top3, want.mean_ap)
    assert f"top-1 accuracy: {100 * want.top1:.2f}%, top-3: {100 * want.top3:.2f}%" in out
    # no stage writes over its own inputs: refused with one line, the inputs untouched
    before = {p: p.read_bytes() for p in (model, fim, desc / "manifest.sqlite")}
    one_line_error(capsys, run_cli("encode", "--model", model, "--descriptors", desc, "--out", desc, "--overwrite"),
                   "is the input --descriptors")
    one_line_error(capsys, run_cli("fim", "--model", model, "--descriptors", desc, "--out", model),
                   "is the input --model")
    one_line_error(capsys, run_cli("train", "--descriptors", desc, "--out", desc), "is the input")
    assert all(p.read_bytes() == b for p, b in before.items())
    # rerunning a finished stage does nothing new
    assert run_cli("encode", "--model", model, "--fim", fim, "--descriptors", desc, "--out", fisher, "--quiet") == 0
    assert "0 sets computed" in capsys.readouterr().out
    # another model on the same output store is refused with one line
    assert run_cli("train", "--descriptors", desc, "--out", tmp_path / "m2.pt", "--latent-dim", "5",
                   "--iterations", "7", "--batch-sets", "4", "--lambda3", "1", "--quiet") == 0
    capsys.readouterr()
    one_line_error(capsys, run_cli("encode", "--model", tmp_path / "m2.pt", "--descriptors", desc, "--out", fisher),
                   "other settings")
    # a shard changed on disk: every reader refuses it with one line; rerunning the writer recomputes it
    for shard in sorted((desc / "shards").glob("shard-*.npy")):
        arr = np.load(shard, mmap_mode="r+")
        arr[0, 0] += 1.0
        arr.flush()
        del arr
    one_line_error(capsys, run_cli("train", "--descriptors", desc, "--out", tmp_path / "m3.pt", "--iterations", "2",
                                   "--quiet"), "checksum mismatch")
    assert run_cli(*descriptor_args(videos, desc)) == 0
    capsys.readouterr()
    assert run_cli("train", "--descriptors", desc, "--out", tmp_path / "m3.pt", "--latent-dim", "5", "--iterations",
                   "2", "--batch-sets", "4", "--lambda3", "1", "--quiet") == 0


def test_compiled_backbone_gives_the_eager_descriptors(tmp_path, videos, capsys):
    """``--compile`` (torch.compile of the backbone) changes the speed, not the store: the descriptors
    equal the eager ones to float32 rounding, and the store's config is the same."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli(*descriptor_args(videos, eager, "--subset", "test")) == 0
    assert run_cli(*descriptor_args(videos, compiled, "--subset", "test", "--compile")) == 0
    a, b = Store.open(eager).sets(), Store.open(compiled).sets()
    np.testing.assert_array_equal(b.offsets.numpy(), a.offsets.numpy())
    np.testing.assert_array_equal(b.labels.numpy(), a.labels.numpy())
    np.testing.assert_allclose(np.asarray(b.x), np.asarray(a.x), rtol=1e-5, atol=1e-5)
    assert Store.open(compiled).config == Store.open(eager).config
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "o.npy", np.array([0, 2, 4]))
    capsys.readouterr()  # inductor's own warnings
    one_line_error(capsys, run_cli("descriptors", "--dataset", "arrays", "--arrays", tmp_path / "x.npy", "--offsets",
                                   tmp_path / "o.npy", "--compile", "--out", tmp_path / "p", "--quiet"),
                   "precomputed descriptors have none")


@pytest.mark.skipif(not OFFICIAL.is_file(), reason="released weights not found")
def test_encode_with_the_released_model(tmp_path, videos, capsys):
    """A 512-channel backbone (ResNet-18 layer4) with the release's map normalisation, encoded by the
    released .mat model: 512 x 257 dimensional Fisher vectors."""
    desc = tmp_path / "desc"
    assert run_cli("descriptors", "--dataset", "folder", "--root", videos, "--backbone", "resnet18", "--layer",
                   "layer4", "--random-weights", "--frames", "2", "--size", "64", "--levels", "2,1", "--map-scale",
                   "158", "--workers", "0", "--out", desc, "--quiet", "--subset", "test") == 0
    assert run_cli("encode", "--model", OFFICIAL, "--descriptors", desc, "--out", tmp_path / "fv", "--quiet") == 0
    X, _, _ = Store.open(tmp_path / "fv").vectors("test")
    assert X.shape == (4, 512 * 257)
    capsys.readouterr()


def test_run_whole_chain_from_toml(tmp_path, videos, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
out = "work"
[descriptors]
dataset = "folder"
root = "{videos}"
backbone = "mobilenet_v3_small"
layer = "features.4"
random_weights = true
frames = 3
size = 64
levels = [3, 1]
shard_items = 4
workers = 0
[train]
latent_dim = 4
hidden_dim = "none"
iterations = 5
batch_sets = 4
lambda3 = 0
[fim]
mode = "diagonal"
[encode]
batch_sets = 3
[evaluate]
C = 10
""")
    assert run_cli("run", cfg, "--quiet") == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "run: descriptors, train, fim, encode, evaluate done" in out
    work = tmp_path / "work"
    assert (work / "model.pt").is_file() and (work / "fim.pt").is_file()
    X, _, _ = Store.open(work / "fisher").vectors("train")
    assert X.shape == (6, 40 * 5)
    assert int(Store.open(work / "descriptors").sets().offsets[1]) == 3 * 10  # levels 3,1: 10 per frame
    before = {p: p.read_bytes() for p in sorted((work / "fisher/shards").glob("*.npy"))}
    assert run_cli("run", cfg, "--quiet") == 0  # everything resumes: only the unreadable video is tried again
    out = capsys.readouterr().out
    assert "4 videos computed" in out and "1 failed now" in out and "0 sets computed" in out
    assert "== fim: done before with these settings and inputs, kept" in out
    assert before == {p: p.read_bytes() for p in sorted((work / "fisher/shards").glob("*.npy"))}
    cfg.write_text(cfg.read_text().replace('mode = "diagonal"', 'enabled = false'))  # no FIM: F = I
    assert run_cli("run", cfg, "--quiet", "--overwrite") == 0  # from scratch
    out = capsys.readouterr().out
    assert "11 videos computed" in out and "11 sets computed" in out and "resumed from 0" in out
    assert "== fim" not in out and "fim, encode" not in out


def _shards_done(manifest: Path) -> tuple[int, int]:
    if not manifest.is_file():
        return 0, -1
    try:
        db = sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=0.1)
        try:
            done = db.execute("SELECT COUNT(*) FROM shards WHERE status = 'done'").fetchone()[0]
            total = db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        finally:
            db.close()
        return done, total
    except sqlite3.Error:
        return 0, -1


def test_killed_run_restarts_to_identical_output(tmp_path):
    root = tmp_path / "videos"
    for i in range(10):
        make_video(root / f"c{i % 2}" / f"v{i:02d}.mp4", frames=16, seed=i)
    make_corrupt(root / "c0" / "v99_bad.mp4")
    args = ["descriptors", "--dataset", "folder", "--root", str(root), *TINY, "--frames", "8", "--size", "64",
            "--levels", "4,2,1", "--shard-items", "1", "--batch-frames", "8", "--workers", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0  # uninterrupted

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fvvae_fast", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done, total = _shards_done(out / "manifest.sqlite")
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read().decode()}"
    proc.stderr.close()
    done, total = _shards_done(out / "manifest.sqlite")
    assert 2 <= done < total, (done, total)

    restart = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    assert f"{done} already done (resumed)" in restart.stdout and "10 done, 1 failed, 0 pending" in restart.stdout
    ref_files = sorted(p.name for p in (tmp_path / "reference/shards").iterdir())
    assert sorted(p.name for p in (out / "shards").iterdir()) == ref_files  # no temp file left behind
    for name in ref_files:
        assert (out / "shards" / name).read_bytes() == (tmp_path / "reference/shards" / name).read_bytes(), name
    ref_items = Store.open(tmp_path / "reference").items()
    assert Store.open(out).items() == ref_items
    assert (out / "manifest.sqlite").read_bytes() == (tmp_path / "reference/manifest.sqlite").read_bytes()


def test_demo_on_a_descriptor_store(tmp_path, videos, capsys):
    """`fvvae demo --descriptors` runs the same comparison on any store with train and test splits."""
    desc = tmp_path / "desc"
    assert run_cli(*descriptor_args(videos, desc)) == 0
    capsys.readouterr()
    assert run_cli("demo", "--descriptors", desc, "--out", tmp_path / "cmp", "--iterations", "3",
                   "--sweep-iterations", "2", "--latent-dim", "3", "--seeds", "0", "--quiet") == 0
    out = capsys.readouterr().out
    assert "6 'train' / 4 'test' sets, C=40" in out
    assert "| FV-VAE | d=3, lambda3=10, FIM kronecker | 160 |" in out and "| GA |" not in out
    assert (tmp_path / "cmp" / "fig4a_dimension.png").is_file()
    assert not (tmp_path / "cmp" / "fig5_spatial_attention.png").exists()  # no images to draw over


def _arrays_store(tmp_path: Path, out: Path) -> int:
    """`fvvae descriptors` of 5 small random sets (arrays dataset), 2 items per shard."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((15, 4), dtype=np.float32))
    np.save(tmp_path / "offsets.npy", np.array([0, 2, 5, 9, 12, 15]))
    return run_cli("descriptors", "--dataset", "arrays", "--arrays", tmp_path / "x.npy", "--offsets",
                   tmp_path / "offsets.npy", "--shard-items", "2", "--out", out, "--quiet")


def test_a_damaged_manifest_is_one_error_line_and_the_rerun_repairs_it(tmp_path, capsys):
    desc = tmp_path / "desc"
    assert _arrays_store(tmp_path, desc) == 0
    db = sqlite3.connect(desc / "manifest.sqlite", isolation_level=None)
    db.execute("UPDATE items SET rows = 1 WHERE idx = 3")
    db.close()
    capsys.readouterr()
    one_line_error(capsys, run_cli("train", "--descriptors", desc, "--out", tmp_path / "m.pt", "--iterations", "1",
                                   "--quiet"), "manifest's record of shard 1 is damaged")
    assert _arrays_store(tmp_path, desc) == 0
    assert "2 items computed" in capsys.readouterr().out
    assert Store.open(desc).sets().offsets.tolist() == [0, 2, 5, 9, 12, 15]


def test_a_full_disk_at_the_manifest_commit_is_one_error_line(tmp_path, monkeypatch, capsys):
    class FullDisk(sqlite3.Connection):
        def commit(self) -> None:
            raise sqlite3.OperationalError("database or disk is full")

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda file, *a, **k: connect(
        file, *a, **k, **({"factory": FullDisk} if str(file).endswith("/manifest.sqlite") else {})))
    one_line_error(capsys, _arrays_store(tmp_path, tmp_path / "desc"), "database or disk is full")
    monkeypatch.undo()
    assert _arrays_store(tmp_path, tmp_path / "desc") == 0  # the rerun, once there is room, completes the store
    assert Store.open(tmp_path / "desc").summary().done == 5


def test_train_warns_in_one_line_and_names_the_extend_flag(tmp_path, capsys, monkeypatch):
    """The collapse warning is one `fvvae train: warning: ...` line (was a raw Python warning line with its
    source line); the refusal to resume a finished run names --extend; a folder as --out is one line."""
    import importlib

    import numpy as np

    training = importlib.import_module("fvvae_fast.train")  # the module (fvvae_fast.train is the function)
    g = np.random.default_rng(3)
    np.save(tmp_path / "x.npy", g.random((40, 6), dtype=np.float32))
    np.save(tmp_path / "offsets.npy", np.arange(0, 41, 4))
    assert run_cli("descriptors", "--dataset", "arrays", "--source", "precomputed", "--arrays", tmp_path / "x.npy",
                   "--offsets", tmp_path / "offsets.npy", "--out", tmp_path / "desc", "--quiet") == 0
    monkeypatch.setattr(training, "LIVENESS_WARN", 2.0)  # every model counts as collapsing
    monkeypatch.setattr(training, "LIVENESS_PATIENCE", 0)
    train = ["train", "--descriptors", tmp_path / "desc", "--lambda3", "0", "--latent-dim", "2", "--quiet"]
    capsys.readouterr()
    assert run_cli(*train, "--iterations", "10", "--out", tmp_path / "m.pt") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fvvae train: warning: train: iteration 10: only "), err
    assert "collapsing" in err[0] and "CollapseWarning" not in err[0]
    one_line_error(capsys, run_cli(*train, "--iterations", "20", "--out", tmp_path / "m.pt"),
                   "run is for iterations=10 (at 10), not 20; extend it with resume='extend' (--extend)")
    (tmp_path / "folder").mkdir()
    one_line_error(capsys, run_cli(*train, "--iterations", "10", "--out", tmp_path / "folder"),
                   "folder: a folder, not a file; expected a fvvae_fast checkpoint")
