"""No file the package reads can run code: a pickle payload planted in every kind of torch or pickle file that a
function or a command reads is refused (one error naming the file), and the payload never runs (the demo's
descriptor cache: tests/test_demo.py)."""

from __future__ import annotations

import ast
import gzip
import io
import os
from pathlib import Path

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.io import load_array_pickle, load_torch_file

PACKAGE = Path(fv.__file__).resolve().parent


class Payload:
    """Unpickling this creates ``marker``: the proof that a reader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def plant(tmp_path):
    """plant(path, wrap) writes a torch file holding the payload inside ``wrap(payload)``; yields the marker."""
    marker = tmp_path / "payload-ran"

    def _plant(path: Path, wrap=lambda p: p) -> Path:
        torch.save(wrap(Payload(marker)), path)
        return path

    _plant.marker = marker
    return _plant


def test_the_payload_runs_under_a_plain_unpickler(tmp_path, plant):
    """The probe itself works: torch.load without weights_only runs it (so the tests below can fail)."""
    torch.load(plant(tmp_path / "p.pt"), weights_only=False)
    assert plant.marker.exists()


def _checkpoint_around(payload):
    """A checkpoint in every other respect, the payload in its model config."""
    model = fv.FVVAE(8, 3)
    return {"version": 1, "model_config": {**model.config(), "extra": payload}, "model_state": model.state_dict(),
            "optimizer_state": None, "iteration": 0, "generator_states": [], "train_config": None, "history": [],
            "extended": []}


def _data() -> fv.DescriptorSets:
    g = torch.Generator().manual_seed(0)
    return fv.DescriptorSets(torch.rand(40, 8, generator=g), torch.arange(0, 41, 10))


def _read_checkpoint_by_load_model(path):
    fv.load_model(path)


def _read_checkpoint_by_resuming(path):
    fv.train(fv.FVVAE(8, 3), _data(), fv.TrainConfig(iterations=2, batch_sets=2, lambda3=0.0), checkpoint=path,
             progress=False)


def _read_fim(path):
    fv.FisherInformation.load(path)


def _read_backbone_weights(path):
    from fvvae_fast.pipelines.backbones import _read_state_dict

    _read_state_dict(path)


def _read_raft_weights(path):
    from fvvae_fast.pipelines.flow import _raft_model

    _raft_model("raft_small", str(path), 0, 0)


READERS = {
    "load_model": (_read_checkpoint_by_load_model, "checkpoint"),
    "train resume": (_read_checkpoint_by_resuming, "checkpoint"),
    "FisherInformation.load": (_read_fim, "FisherInformation"),
    "backbone state_dict": (_read_backbone_weights, "state_dict"),
    "RAFT state_dict": (_read_raft_weights, "state_dict"),
}


@pytest.mark.parametrize("wrap", [lambda p: p, _checkpoint_around], ids=["bare", "inside a checkpoint"])
@pytest.mark.parametrize("reader", READERS)
def test_no_reader_runs_a_planted_payload(reader, wrap, tmp_path, plant):
    read, what = READERS[reader]
    path = plant(tmp_path / "crafted.pt", wrap)
    with pytest.raises(Exception, match=rf"crafted\.pt: not a readable .*{what}") as err:
        read(path)
    assert isinstance(err.value, ValueError)  # BackboneError is a ValueError too
    assert not plant.marker.exists()


def test_load_torch_file_is_weights_only(tmp_path, plant):
    with pytest.raises(ValueError, match="not a readable thing .*Unpickl"):
        load_torch_file(plant(tmp_path / "p.pt"), "thing")
    assert not plant.marker.exists()


def test_pickled_arrays_are_read_without_other_globals(tmp_path, plant):
    """The built-in Animal-MNIST files are pickled NumPy arrays: read with an unpickler that resolves nothing else."""
    import pickle

    import numpy as np

    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (load_array_pickle(io.BytesIO(pickle.dumps(arr)), "a") == arr).all()
    crafted = gzip.compress(pickle.dumps(Payload(plant.marker)))
    with pytest.raises(ValueError, match="crafted: not a pickled NumPy array .*builtins.exec"):
        load_array_pickle(gzip.GzipFile(fileobj=io.BytesIO(crafted)), "crafted")
    assert not plant.marker.exists()


def test_the_command_line_refuses_a_crafted_model_and_fim(tmp_path, plant, capsys):
    """--model and --fim of `fvvae encode` and `fvvae fim`: one error line, exit 2, nothing ran."""
    from fvvae_fast.cli import main

    crafted = plant(tmp_path / "crafted.pt", _checkpoint_around)
    good = tmp_path / "good.pt"
    fv.save_checkpoint(good, fv.FVVAE(8, 3))
    runs = [["encode", "--model", crafted, "--descriptors", tmp_path / "none", "--out", tmp_path / "f"],
            ["fim", "--model", crafted, "--descriptors", tmp_path / "none", "--out", tmp_path / "fim.pt"],
            ["encode", "--model", good, "--fim", plant(tmp_path / "crafted-fim.pt"), "--descriptors",
             tmp_path / "none", "--out", tmp_path / "f"]]
    for argv in runs:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and "crafted" in err[0], err
    assert not plant.marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_and_pickle_read_goes_through_the_checked_readers():
    """Static: outside io.py no module calls torch.load or pickle.load(s), and no np.load allows pickles."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "io.py" and path.parent == PACKAGE:
            continue
        for node, name in _calls(ast.parse(path.read_text(), str(path))):
            pickles = any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                          for k in node.keywords)
            if name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler") or (
                    name.endswith("np.load") and pickles):
                found.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}: {name}")
    assert found == []
