"""Every artefact knows what it was made from (fingerprints, payload checksums) and every consumer checks
it, in the API and on the command line; reruns redo what depends on changed inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.cli import main
from fvvae_fast.pipelines.config import run_config
from fvvae_fast.provenance import UnknownProvenance, model_fingerprint, seal
from fvvae_fast.sets import DescriptorSets
from fvvae_fast.store import Store
from fvvae_fast.train import TrainConfig, load_model, train

from .test_jobs import _arrays


def _sets(seed: int, sets: int = 8, c: int = 6) -> DescriptorSets:
    g = torch.Generator().manual_seed(seed)
    lengths = 3 + torch.randint(0, 4, (sets,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return DescriptorSets(torch.rand(int(offsets[-1]), c, generator=g), offsets, torch.arange(sets) % 2)


def _model(seed: int = 0) -> fv.FVVAE:
    return fv.FVVAE(in_dim=6, latent_dim=3, num_classes=2, seed=seed).eval()


def _flip_byte_of(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes as stored in the torch file ``path``."""
    data = bytearray(path.read_bytes())
    where = bytes(data).find(tensor.numpy().tobytes())
    assert where >= 0
    data[where + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- API


def test_model_fingerprint_follows_the_weights():
    model = _model()
    first = model_fingerprint(model)
    assert model_fingerprint(_model()) == first and model_fingerprint(_model(seed=1)) != first
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.decoder.weight[0, 0] += 1.0  # in place: the cached fingerprint is not reused
    assert model_fingerprint(model) != first
    model.load_state_dict(state)
    assert model_fingerprint(model) == first


def test_fisher_encode_refuses_the_fim_of_another_model(tmp_path):
    data, model, other = _sets(0), _model(0), _model(1)
    fim = fv.FisherInformation().update_descriptors(model, data.x, data.offsets)
    fim.save(tmp_path / "fim.pt")
    for f in (fim, fv.FisherInformation.load(tmp_path / "fim.pt")):
        assert fv.fisher_encode(model, data.x, data.offsets, fim=f).shape == (8, 6 * 4)
        with pytest.raises(ValueError, match=r"fisher_encode: the FIM was estimated for another model \(fingerprint "
                                             rf"{model_fingerprint(model)[:12]}\.\.\.\), this model is "
                                             rf"{model_fingerprint(other)[:12]}"):
            fv.fisher_encode(other, data.x, data.offsets, fim=f)
    with pytest.raises(ValueError, match="another model"):
        fv.FisherVectorHead(other, fim)
    with pytest.raises(ValueError, match="a FIM is of one model"):
        fim.update_descriptors(other, data.x, data.offsets)
    with pytest.raises(ValueError, match="a FIM is of one model"):
        fv.FisherInformation().update_descriptors(other, data.x, data.offsets).merge(fim)
    # a head keeps its FIM while its model trains (F is a constant of the layer)
    head = fv.FisherVectorHead(model.train(), fim)
    with torch.no_grad():
        model.decoder.weight.add_(0.1)
    assert torch.isfinite(head(data.x, data.offsets)).all()


def test_train_refuses_to_resume_a_checkpoint_on_other_data(tmp_path):
    ckpt, config = tmp_path / "model.pt", TrainConfig(iterations=3, batch_sets=4)
    train(_model(), _sets(0), config, checkpoint=ckpt, progress=False)
    assert load_model(ckpt).trained_on["what"] == "descriptors in memory"
    train(_model(), _sets(0), config, checkpoint=ckpt, progress=False)  # the same data: resumed (finished)
    with pytest.raises(ValueError, match=r"model.pt was trained on descriptors in memory \(fingerprint [0-9a-f]{12}"
                                         r"\.\.\.\), the data given are descriptors in memory \([0-9a-f]{12}"):
        train(_model(), _sets(1), config, checkpoint=ckpt, progress=False)


def test_flipped_payload_bytes_are_refused(tmp_path):
    data, model = _sets(0), _model()
    fim = fv.FisherInformation().update_descriptors(model, data.x, data.offsets)
    fim.save(tmp_path / "fim.pt")
    _flip_byte_of(tmp_path / "fim.pt", fim.state_dict()["sumsq"])
    with pytest.raises(ValueError, match=r"fim.pt: the FIM file's contents do not match its checksum"):
        fv.FisherInformation.load(tmp_path / "fim.pt")
    ckpt = tmp_path / "model.pt"
    train(_model(), data, TrainConfig(iterations=2, batch_sets=4), checkpoint=ckpt, progress=False)
    _flip_byte_of(ckpt, load_model(ckpt).decoder.weight.detach())
    with pytest.raises(ValueError, match=r"model.pt: the checkpoint's contents do not match its checksum"):
        load_model(ckpt)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["diagonal", "kronecker"])
def test_a_fim_with_negative_or_non_finite_sums_is_refused(tmp_path, mode, bad):
    data = _sets(0)
    fim = fv.FisherInformation(mode).update_descriptors(_model(), data.x, data.offsets)
    state = fim.state_dict()
    key = "sumsq" if mode == "diagonal" else "b_sum"
    state[key][1] = bad  # element 1, or row 1 of the Kronecker factor B (C, C), its diagonal element included
    torch.save(seal(state), tmp_path / "fim.pt")  # a valid checksum: the sums themselves are refused
    with pytest.raises(ValueError, match=rf"the state's {key} (holds NaN or Inf|is a sum of squares but holds "
                                         r"negative)"):
        fv.FisherInformation.load(tmp_path / "fim.pt")
    with pytest.raises(ValueError, match=f"the state's {key}"):
        fv.FisherInformation(mode).load_state_dict(state)


def test_files_of_the_previous_version_load_with_one_notice(tmp_path):
    data, model = _sets(0), _model()
    fim = fv.FisherInformation().update_descriptors(model, data.x, data.offsets)
    old_fim = {k: v for k, v in fim.state_dict().items() if k != "model_fingerprint"} | {"version": 2}
    torch.save(old_fim, tmp_path / "old_fim.pt")
    ckpt = tmp_path / "model.pt"
    train(_model(), data, TrainConfig(iterations=2, batch_sets=4), checkpoint=ckpt, progress=False)
    old_ckpt = {k: v for k, v in torch.load(ckpt, weights_only=True).items() if k not in ("checksum", "data")}
    torch.save(old_ckpt | {"version": 1}, tmp_path / "old.pt")
    with pytest.warns(UnknownProvenance, match="old_fim.pt: a FIM file of an earlier fvvae_fast version"):
        loaded = fv.FisherInformation.load(tmp_path / "old_fim.pt")
    assert loaded.model_fingerprint is None
    fv.fisher_encode(_model(1), data.x, data.offsets, fim=loaded)  # unknown: not checked
    with pytest.warns(UnknownProvenance, match="old.pt: a checkpoint of an earlier fvvae_fast version"):
        assert load_model(tmp_path / "old.pt").trained_on is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path / "old.pt")  # once per file
    torch.save(torch.load(ckpt, weights_only=True) | {"checksum": None}, tmp_path / "stripped.pt")
    with pytest.raises(ValueError, match="stripped.pt: the checkpoint's checksum is missing"):
        load_model(tmp_path / "stripped.pt")


# ---------------------------------------------------------------------------------------------- command line


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(capsys, argv, *needles) -> str:
    code, _, err = _cli(capsys, *argv)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


def _store(tmp_path: Path, name: str, seed: int) -> Path:
    """A descriptor store of generated arrays (12 sets of C = 6)."""
    rng = np.random.default_rng(seed)
    lengths = 4 + np.arange(12) % 3
    np.save(tmp_path / f"{name}.npy", rng.random((int(lengths.sum()), 6), dtype=np.float32))
    np.save(tmp_path / f"{name}_off.npy", np.concatenate([[0], np.cumsum(lengths)]))
    np.save(tmp_path / f"{name}_lab.npy", np.arange(12) % 2)
    out = tmp_path / name
    assert main([str(a) for a in ("descriptors", "--dataset", "arrays", "--arrays", tmp_path / f"{name}.npy",
                                  "--offsets", tmp_path / f"{name}_off.npy", "--labels", tmp_path / f"{name}_lab.npy",
                                  "--shard-items", "4", "--out", out, "--quiet")]) == 0
    return out


TRAIN = ("--latent-dim", "3", "--iterations", "3", "--batch-sets", "4", "--quiet")


def test_cli_refuses_mismatched_artefacts_with_one_line(tmp_path, capsys):
    a, b = _store(tmp_path, "a", 0), _store(tmp_path, "b", 1)
    m1, m2, fim = tmp_path / "m1.pt", tmp_path / "m2.pt", tmp_path / "fim.pt"
    assert _cli(capsys, "train", "--descriptors", a, "--out", m1, *TRAIN)[0] == 0
    # train resuming a checkpoint on other data of the same C
    _one_line(capsys, ("train", "--descriptors", b, "--out", m1, *TRAIN),
              f"{m1} was trained on precomputed descriptors of {a} (fingerprint", f"the data given are precomputed "
              f"descriptors of {b} (")
    # a FIM of another model
    assert _cli(capsys, "train", "--descriptors", a, "--out", m2, *TRAIN, "--seed", "1")[0] == 0
    assert _cli(capsys, "fim", "--model", m1, "--descriptors", a, "--out", fim, "--quiet")[0] == 0
    _one_line(capsys, ("encode", "--model", m2, "--fim", fim, "--descriptors", a, "--out", tmp_path / "fv"),
              "fvvae encode: error: ", f"{fim} was estimated for another model (fingerprint", f"{m2} is ")
    assert not (tmp_path / "fv").exists()
    # a FIM file with a flipped payload byte, or negative sums
    fim_state = torch.load(fim, weights_only=True)
    _flip_byte_of(fim, fim_state["sumsq"])
    _one_line(capsys, ("encode", "--model", m1, "--fim", fim, "--descriptors", a, "--out", tmp_path / "fv"),
              "fim.pt: the FIM file's contents do not match its checksum")
    fim_state["sumsq"][0] = -1.0
    torch.save(seal({k: v for k, v in fim_state.items() if k != "checksum"}), fim)
    _one_line(capsys, ("encode", "--model", m1, "--fim", fim, "--descriptors", a, "--out", tmp_path / "fv"),
              "sumsq is a sum of squares but holds negative values")
    # a checkpoint of the previous version: one notice line, and it works
    old = {k: v for k, v in torch.load(m1, weights_only=True).items() if k not in ("checksum", "data")}
    torch.save(old | {"version": 1}, tmp_path / "old.pt")
    code, out, err = _cli(capsys, "encode", "--model", tmp_path / "old.pt", "--descriptors", a, "--out",
                          tmp_path / "fv", "--quiet")
    assert code == 0 and err.strip().splitlines() == [
        f"fvvae encode: notice: {tmp_path / 'old.pt'}: a checkpoint of an earlier fvvae_fast version: what it was "
        f"made from is unknown and not checked"], err


def test_cli_refuses_a_model_of_other_descriptors(tmp_path, capsys):
    """A model trained on ResNet-18 layer4 descriptors and a ResNet-34 layer4 store of the same C = 512."""
    pytest.importorskip("av")
    from .test_pipelines import make_video

    for i in range(2):
        make_video(tmp_path / "videos" / "test" / f"c{i}" / "v.mp4", frames=3, seed=i)
    stores = {}
    for arch in ("resnet18", "resnet34"):
        stores[arch] = tmp_path / arch
        assert _cli(capsys, "descriptors", "--dataset", "folder", "--root", tmp_path / "videos", "--backbone", arch,
                    "--layer", "layer4", "--random-weights", "--frames", "1", "--size", "64", "--levels", "1",
                    "--workers", "0", "--out", stores[arch], "--quiet")[0] == 0
    model = tmp_path / "model.pt"
    assert _cli(capsys, "train", "--descriptors", stores["resnet18"], "--out", model, "--split", "all",
                "--lambda3", "0", *TRAIN)[0] == 0
    for stage in ("encode", "fim"):
        _one_line(capsys, (stage, "--model", model, "--descriptors", stores["resnet34"], "--out", tmp_path / stage),
                  f"fvvae {stage}: error: {model} was trained on resnet18/layer4 descriptors (fingerprint",
                  f"{stores['resnet34']} holds resnet34/layer4 descriptors (")
    assert _cli(capsys, "encode", "--model", model, "--descriptors", stores["resnet18"], "--out", tmp_path / "fv",
                "--quiet")[0] == 0


# ---------------------------------------------------------------------------------------------- stale results


def test_descriptors_redo_the_items_whose_input_changed_and_retry_failed_ones(tmp_path, capsys):
    a = _store(tmp_path, "a", 0)
    before = Store.open(a).fingerprint()
    x = np.load(tmp_path / "a.npy")
    x[:4] += 1.0  # set 0 (shard 0) changed in place: same shape, same settings
    np.save(tmp_path / "a.npy", x)
    code, out, _ = _cli(capsys, "descriptors", "--dataset", "arrays", "--arrays", tmp_path / "a.npy", "--offsets",
                        tmp_path / "a_off.npy", "--labels", tmp_path / "a_lab.npy", "--shard-items", "4", "--out", a)
    assert code == 0 and "4 items computed" in out and "8 already done" in out, out
    store = Store.open(a)
    np.testing.assert_array_equal(np.asarray(store.sets().x), x)
    assert store.fingerprint() != before
    # an unreadable file is retried by a rerun, and done once fixed
    folder = tmp_path / "files" / "train" / "c0"
    folder.mkdir(parents=True)
    for i in range(3):
        np.save(folder / f"s{i}.npy", np.full((2, 6), i, np.float32))
    (folder / "s1.npy").write_bytes(b"garbage")
    args = ("descriptors", "--dataset", "folder", "--source", "precomputed", "--root", tmp_path / "files", "--out",
            tmp_path / "f", "--shard-items", "2", "--quiet")
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and "2 done, 1 failed" in out
    np.save(folder / "s1.npy", np.ones((2, 6), np.float32))
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and "2 items computed" in out and "3 done, 0 failed" in out, out


def test_encode_redoes_the_vectors_of_a_rebuilt_store(tmp_path, capsys):
    a = _store(tmp_path, "a", 0)
    model = tmp_path / "m.pt"
    assert _cli(capsys, "train", "--descriptors", a, "--out", model, *TRAIN)[0] == 0
    encode = ("encode", "--model", model, "--descriptors", a, "--out", tmp_path / "fv")
    assert _cli(capsys, *encode, "--quiet")[0] == 0
    x = np.load(tmp_path / "a.npy")
    np.save(tmp_path / "a.npy", x[::-1].copy())  # the store rebuilt from other contents, same settings
    assert _cli(capsys, "descriptors", "--dataset", "arrays", "--arrays", tmp_path / "a.npy", "--offsets",
                tmp_path / "a_off.npy", "--labels", tmp_path / "a_lab.npy", "--shard-items", "4", "--out", a,
                "--quiet")[0] == 0
    code, out, _ = _cli(capsys, *encode)
    assert code == 0 and "12 sets computed" in out and f"{a} changed since" in out, out
    assert _cli(capsys, "encode", "--model", model, "--descriptors", a, "--out", tmp_path / "fresh", "--quiet")[0] == 0
    np.testing.assert_array_equal(Store.open(tmp_path / "fv").vectors()[0], Store.open(tmp_path / "fresh").vectors()[0])


def test_run_redoes_every_stage_after_a_changed_input_and_rewrites_missing_outputs(tmp_path):
    cfg = _arrays(tmp_path)
    said: list[str] = []
    run_config(cfg, progress=False, say=said.append)
    work = tmp_path / "work"
    (work / "evaluation.json").unlink()
    said.clear()
    run_config(cfg, progress=False, say=said.append)
    text = "\n".join(said)
    assert "== fim: done before with these settings and inputs, kept" in text and "== evaluate: checked" in text
    assert json.loads((work / "evaluation.json").read_text())["top1"] >= 0
    x = np.load(tmp_path / "x.npy")
    np.save(tmp_path / "x.npy", x[:, ::-1].copy())  # an input file changed: every stage is redone
    said.clear()
    run_config(cfg, progress=False, say=said.append)
    text = "\n".join(said)
    assert "== descriptors: checked" in text and "24 items computed" in text
    for stage, changed in (("train", ["descriptors"]), ("fim", ["descriptors", "model"]),
                           ("encode", ["descriptors", "fim", "model"])):
        assert f"== {stage}: redone (changed: {', '.join(f'{k} (contents)' for k in changed)})" in text, text
    assert "encode: 24 sets computed" in text and "== evaluate: redone" in text
