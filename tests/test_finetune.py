"""Backbone fine-tuning (fvvae_fast.finetune, `fvvae finetune`) on tiny images and videos written by the
tests, through a random-weights mobilenet_v3_small cut after its second block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fvvae_fast.cli import main
from fvvae_fast.finetune import FinetuneConfig, backbone_blocks, finetune, trainable_parameters
from fvvae_fast.pipelines import ImageSource, VideoSource, build_backbone, read_folder
from fvvae_fast.pipelines.jobs import FinetuneJob
from fvvae_fast.pipelines.options import JobError
from fvvae_fast.train import load_model

from .cases import SEED, generator
from .test_io import held_elsewhere

# features.4's random maps are ~1e-4 (too small to learn from in a few steps); features.1's are ~0.04
TINY = {"name": "mobilenet_v3_small", "layer": "features.1"}
CLI_TINY = ["--backbone", TINY["name"], "--layer", TINY["layer"], "--random-weights"]
IMAGE = ImageSource(size=32)


def _images(root: Path, salt: int, per_class: int = 4) -> Path:
    """root/{train,test}/{a,b}/*.png: noise with a red (a) or blue (b) square at a random place."""
    from PIL import Image

    g = generator(salt)
    for split in ("train", "test"):
        for cls, colour in (("a", (220, 40, 40)), ("b", (40, 40, 220))):
            for i in range(per_class):
                arr = torch.randint(0, 60, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
                y, x = (int(v) for v in torch.randint(0, 12, (2,), generator=g))
                arr[y : y + 12, x : x + 12] = colour
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("images"), salt=1)


def _backbone():
    return build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=SEED % 1000)


def _config(**kw) -> FinetuneConfig:
    base = {"iterations": 12, "batch_items": 8, "lr": 0.1, "latent_dim": 4, "lambda3": 1.0, "log_every": 3,
            "seed": SEED % 1000}
    return FinetuneConfig(**{**base, **kw})


def _weights(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.torchvision_state_dict().items()}


@pytest.mark.parametrize("mode,lr,term", [("classifier", 0.1, "cls"), ("head", 0.1, "cls"), ("fvvae", 1e-3, "total")])
def test_each_mode_lowers_its_loss_and_trains_only_the_chosen_layers(images, tmp_path, mode, lr, term):
    """Full, noise-free batches: the classifier's and the FV-VAE's losses go downhill. The head's does not have to:
    its signed square root has an unbounded slope at 0, so a step of the backbone can raise the loss at any
    learning rate (measured: it rose on 6 seeds in 40 at lr 0.02 with momentum 0.9, on 3 in 40 at lr 0.1 without
    momentum, and went up and down at lr 0.01); there the loss must move and the chosen layers train."""
    train = read_folder(images).split("train")
    backbone = _backbone()
    before = _weights(backbone)
    result = finetune(backbone, IMAGE, train, _config(mode=mode, lr=lr, trainable="features.1"),
                      out=tmp_path / "w.pt", model_out=tmp_path / "m.pt", progress=False)
    losses = [row[term] for row in result.history]
    assert all(np.isfinite(v) for row in result.history for v in row.values())
    if mode == "head":
        assert len(set(losses)) == len(losses), losses
    else:
        assert min(losses[1:]) < losses[0], losses  # the steps go downhill (momentum may overshoot)
    after = _weights(result.backbone)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("features.1.") for k in moved), moved
    for k in before:
        if k.startswith("features.0."):
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    assert not any(p.requires_grad for p in result.backbone.parameters())
    # the weights file loads as it is and gives the fine-tuned maps
    loaded = build_backbone(TINY["name"], TINY["layer"], weights=tmp_path / "w.pt")
    x = IMAGE.prepare(IMAGE.load(train.items[0]))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.backbone(x))
    if mode == "classifier":
        assert result.model is None and not (tmp_path / "m.pt").exists()
    else:
        model = load_model(tmp_path / "m.pt")
        for k, v in result.model.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_trainable_selection_by_count_and_names():
    backbone = _backbone()
    blocks = backbone_blocks(backbone, (32, 32))
    assert blocks == ["features.0", "features.1"]
    names = {backbone.torchvision_name(n) for n in trainable_parameters(backbone, "1", (32, 32))}
    assert names and all(n.startswith("features.1.") for n in names)
    both = trainable_parameters(backbone, "features.0,features.1.block.0", (32, 32))
    assert {backbone.torchvision_name(n).split(".")[1] for n in both} == {"0", "1"}
    used = {n for n, _ in backbone.extractor.named_parameters()
            if backbone.torchvision_name(n).split(".")[:2] in (["features", "0"], ["features", "1"])}
    assert set(trainable_parameters(backbone, "all", (32, 32))) == used  # not the layers after the cut
    with pytest.raises(ValueError, match="no layer 'features.28'.*its blocks: features.0, features.1"):
        trainable_parameters(backbone, "features.1,features.28", (32, 32))
    with pytest.raises(ValueError, match="3 last blocks asked.*has 2"):
        trainable_parameters(backbone, "3", (32, 32))


@pytest.mark.parametrize("mode", ["classifier", "fvvae"])
def test_resume_after_k_steps_equals_the_uninterrupted_run(images, tmp_path, mode):
    train = read_folder(images).split("train")
    cfg = {"mode": mode, "lr": 0.05 if mode == "classifier" else 1e-3, "batch_items": 3, "trainable": "all",
           "log_every": 1}
    whole = finetune(_backbone(), IMAGE, train, _config(iterations=7, **cfg), checkpoint=tmp_path / "a.ckpt",
                     out=tmp_path / "a.pt", progress=False)
    finetune(_backbone(), IMAGE, train, _config(iterations=4, **cfg), checkpoint=tmp_path / "b.ckpt", progress=False)
    resumed = finetune(_backbone(), IMAGE, train, _config(iterations=7, workers=1, **cfg),
                       checkpoint=tmp_path / "b.ckpt", out=tmp_path / "b.pt", progress=False, resume="extend")
    assert resumed.resumed_from == 4 and resumed.history == whole.history
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if mode == "fvvae":
        for k, v in whole.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="changed settings: lr="):
        finetune(_backbone(), IMAGE, train, _config(iterations=7, **{**cfg, "lr": 0.5}),
                 checkpoint=tmp_path / "a.ckpt", progress=False)
    with pytest.raises(ValueError, match="another run's \\(other backbone\\)"):
        finetune(build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=SEED % 1000 + 1), IMAGE,
                 train, _config(iterations=7, **cfg), checkpoint=tmp_path / "a.ckpt", progress=False)


def test_videos_draw_frames_per_item_and_pool_by_spp(tmp_path):
    from .test_pipelines import make_video

    for cls in ("a", "b"):
        for i in range(2):
            make_video(tmp_path / "v" / "train" / cls / f"{cls}{i}.mp4", frames=6, seed=i + (cls == "b") * 2)
    train = read_folder(tmp_path / "v").split("train")
    source = VideoSource(frames=3, size=32, resize=36, levels=(2, 1))
    result = finetune(_backbone(), source, train, _config(mode="fvvae", lr=1e-3, iterations=3, batch_items=2,
                                                          frames_per_item=2, log_every=1), progress=False)
    assert len(result.history) == 3 and all(np.isfinite(row["total"]) for row in result.history)
    with pytest.raises(ValueError, match="frames_per_item=4 but the video source gives 3"):
        finetune(_backbone(), source, train, _config(frames_per_item=4), progress=False)


def test_bad_settings_are_refused(images, tmp_path):
    train = read_folder(images).split("train")
    with pytest.raises(ValueError, match="mode must be one of classifier, fvvae, head"):
        FinetuneConfig(mode="svm")
    with pytest.raises(ValueError, match="amp='bf16' \\(mixed precision\\) is for CUDA"):
        finetune(_backbone(), IMAGE, train, _config(amp="bf16", device="cpu"), progress=False)
    with pytest.raises(ValueError, match="no layer 'features.9'"):
        finetune(_backbone(), IMAGE, train, _config(trainable="features.9"), progress=False)
    with pytest.raises(ValueError, match="has no item"):
        finetune(_backbone(), IMAGE, train.split("nope"), _config(), progress=False)
    with pytest.raises(JobError, match="mode \\(--mode\\): expected one of"):
        FinetuneJob(dataset="folder", root=str(images), out="w.pt", mode="svm")
    flat = tmp_path / "flat"
    (flat / "a").mkdir(parents=True)
    (flat / "a" / "0.png").write_bytes((images / "train" / "a" / "0.png").read_bytes())  # no split folders
    job = FinetuneJob(dataset="folder", root=str(flat), source="image", out=str(tmp_path / "w.pt"),
                      random_weights=True, backbone=TINY["name"], layer=TINY["layer"])
    with pytest.raises(JobError, match="no training split 'train' or 'training'.*--train-split"):
        job.run(progress=False)


def test_the_command_writes_weights_that_descriptors_reads(images, tmp_path, capsys):
    out, model = tmp_path / "w.pt", tmp_path / "m.pt"
    args = ["finetune", "--dataset", "folder", "--root", images, "--source", "image", "--size", "32", *CLI_TINY,
            "--mode", "head", "--trainable", "1", "--iterations", "3", "--batch-items", "4", "--latent-dim", "3",
            "--workers", "0", "--out", out, "--model-out", model, "--quiet"]
    assert main([str(a) for a in args]) == 0
    assert "finetune: 3 steps" in capsys.readouterr().out
    assert out.is_file() and model.is_file() and (tmp_path / "w.pt.ckpt").is_file()
    assert main([str(a) for a in args]) == 0  # rerun: finished, nothing to do
    assert "finetune: 0 steps in" in capsys.readouterr().out
    assert main([str(a) for a in [*args, "--lr", "0.5"]]) == 2
    assert "changed settings: lr=" in capsys.readouterr().err
    desc = ["descriptors", "--dataset", "folder", "--root", images, "--source", "image", "--size", "32",
            "--backbone", TINY["name"], "--layer", TINY["layer"], "--weights", out, "--workers", "0",
            "--out", tmp_path / "desc", "--quiet"]
    assert main([str(a) for a in desc]) == 0
    assert main([str(a) for a in ["finetune", "--dataset", "folder", "--root", images, *CLI_TINY, "--out",
                                  tmp_path / "x.pt", "--mode", "classifier", "--model-out", model]]) == 2
    assert "--init-model and --model-out are for --mode fvvae or head" in capsys.readouterr().err


def test_a_checkpoint_another_process_writes_is_refused(images, tmp_path, capsys):
    ckpt = tmp_path / "w.pt.ckpt"
    args = ["finetune", "--dataset", "folder", "--root", images, "--source", "image", "--size", "32", *CLI_TINY,
            "--iterations", "2", "--batch-items", "4", "--workers", "0", "--out", tmp_path / "w.pt", "--overwrite",
            "--quiet"]
    with held_elsewhere(ckpt) as pid:
        with pytest.raises(OSError, match=rf"w.pt.ckpt is being written by another process \(pid {pid}\); wait "
                                          "for it or choose another checkpoint"):
            finetune(_backbone(), IMAGE, read_folder(images).split("train"), _config(iterations=2),
                     checkpoint=ckpt, progress=False)
        assert main([str(a) for a in args]) == 2
        assert capsys.readouterr().err.strip() == f"fvvae finetune: error: {ckpt} is being written by another " \
                                                  f"process (pid {pid}); wait for it or choose another --checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
