"""The paper's recipe on the command line: the optical-flow stream, 10-crop testing, late fusion of
two streams, and the one pass from frames to Fisher vectors (equal to descriptors + encode)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from fvvae_fast.evaluation.fusion import evaluate_fusion  # noqa: E402
from fvvae_fast.store import Store  # noqa: E402

from .test_cli import descriptor_args, one_line_error, run_cli, videos  # noqa: E402, F401


def _model(tmp_path, desc, name="model.pt"):
    assert run_cli("train", "--descriptors", desc, "--out", tmp_path / name, "--latent-dim", "3", "--hidden-dim",
                   "none", "--iterations", "4", "--batch-sets", "4", "--lambda3", "0", "--quiet") == 0
    return tmp_path / name


def test_one_pass_equals_descriptors_then_encode(tmp_path, videos, capsys):
    desc = tmp_path / "desc"
    assert run_cli(*descriptor_args(videos, desc)) == 0
    model = _model(tmp_path, desc)
    assert run_cli("fim", "--model", model, "--descriptors", desc, "--out", tmp_path / "fim.pt", "--quiet") == 0
    assert run_cli("encode", "--model", model, "--fim", tmp_path / "fim.pt", "--descriptors", desc,
                   "--out", tmp_path / "two", "--quiet") == 0
    assert run_cli(*descriptor_args(videos, tmp_path / "one", "--model", model, "--fim", tmp_path / "fim.pt")) == 0
    out = capsys.readouterr().out
    assert "-> Fisher vectors" in out and "10 done, 1 failed" in out
    one, two = Store.open(tmp_path / "one", kind="fisher"), Store.open(tmp_path / "two", kind="fisher")
    (x1, y1, ids1), (x2, y2, ids2) = one.vectors(), two.vectors()
    assert ids1 == ids2 and np.array_equal(y1, y2) and [i for i, _ in one.failures()] == [i for i, _ in two.failures()]
    np.testing.assert_allclose(x1, x2, rtol=1e-5, atol=1e-6)
    assert run_cli("evaluate", "--fisher", tmp_path / "one") == 0  # the one-pass store evaluates as it is
    one_line_error(capsys, run_cli(*descriptor_args(videos, tmp_path / "x", "--fim", tmp_path / "fim.pt")),
                   "give --model too")


def test_flow_stream_ten_crops_and_late_fusion(tmp_path, videos, capsys, monkeypatch):
    rgb, flow = tmp_path / "rgb", tmp_path / "flow"
    assert run_cli(*descriptor_args(videos, rgb, "--crops", "10")) == 0
    assert run_cli(*descriptor_args(videos, flow, "--crops", "10", "--modality", "flow", "--flow-method", "farneback",
                                    "--flow-cache", tmp_path / "cache")) == 0
    capsys.readouterr()
    store = Store.open(flow)
    assert store.config["source"]["modality"] == "flow" and store.config["crops"] == 10
    test_ids = [r["item_id"] for r in store.items(split="test")]
    assert len(test_ids) == 40 and test_ids[0].endswith("#crop0")  # 4 test videos x 10 crops
    assert len(store.items(split="train")) == 7  # training items keep their one centre crop
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 10  # one cache file per readable video
    assert not np.array_equal(Store.open(rgb).sets("test").x[:], store.sets("test").x[:])
    fishers = []
    for name, desc in (("rgb", rgb), ("flow", flow)):
        model = _model(tmp_path, desc, f"{name}.pt")
        assert run_cli("encode", "--model", model, "--descriptors", desc, "--out", tmp_path / f"fv-{name}",
                       "--quiet") == 0
        fishers.append(tmp_path / f"fv-{name}")
    capsys.readouterr()
    with monkeypatch.context() as m:  # fusion and crop scoring read the stores block by block, never whole
        m.setattr(Store, "vectors", lambda *a, **k: pytest.fail("evaluate loaded a store's vectors into memory"))
        assert run_cli("evaluate", "--fisher", *fishers, "--fusion-weights", "1,1.5", "--json",
                       tmp_path / "r.json") == 0
    out = capsys.readouterr().out
    assert "tested on 4 'test' items" in out and "late fusion, weights 1,1.5" in out
    res = json.loads((tmp_path / "r.json").read_text())
    # the command line's figures are evaluate_fusion's on the stores' vectors, crops averaged per item
    streams = [(Store.open(f).vectors("train")[0], Store.open(f).vectors("test")[0]) for f in fishers]
    y_train, (y_test, ids) = Store.open(fishers[0]).vectors("train")[1], Store.open(fishers[0]).vectors("test")[1:]
    items = np.unique([i.rsplit("#crop", 1)[0] for i in ids], return_inverse=True)[1]
    want = evaluate_fusion(streams, y_train, y_test, [1, 1.5], test_items=items, normalize=False)
    assert res["top1"] == want.fused.top1 and [s["top1"] for s in res["streams"]] == [s.top1 for s in want.streams]


def test_recipe_mistakes_are_one_line_errors(tmp_path, videos, capsys):
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (40, 30), (10, 200, 30)).save(images / cls / "x.png")
    image_args = ["descriptors", "--dataset", "folder", "--root", images, "--source", "image", "--backbone",
                  "mobilenet_v3_small", "--layer", "features.4", "--random-weights", "--size", "64", "--out",
                  tmp_path / "s", "--workers", "0", "--quiet"]
    one_line_error(capsys, run_cli(*image_args, "--modality", "flow"), "--modality flow needs videos")
    one_line_error(capsys, run_cli(*image_args, "--crops", "10"), "--crops 10 is for videos")
    with pytest.raises(SystemExit) as exit_info:  # the argument parser's check, one line too
        run_cli(*descriptor_args(videos, tmp_path / "c", "--crops", "3"))
    one_line_error(capsys, exit_info.value.code, "argument --crops: expected one of 1, 10")
    one_line_error(capsys, run_cli(*descriptor_args(videos, tmp_path / "c", "--modality", "flow", "--flow-method",
                                                    "raft_small")), "needs raft_weights")
    one_line_error(capsys, run_cli(*descriptor_args(videos, tmp_path / "c", "--crops", "10", "--resize", "32")),
                   "resize >= size")  # crops larger than the resized frame
    assert not (tmp_path / "s").exists()
    # fusion of stores of different items
    import shutil

    fewer = tmp_path / "fewer"
    shutil.copytree(videos, fewer)
    (fewer / "train" / "b" / "b2.mp4").unlink()
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*descriptor_args(videos, a)) == 0
    assert run_cli(*descriptor_args(fewer, b)) == 0
    for desc in (a, b):
        model = _model(tmp_path, desc, f"{desc.name}.pt")
        assert run_cli("encode", "--model", model, "--descriptors", desc, "--out", tmp_path / f"fv-{desc.name}",
                       "--quiet") == 0
    capsys.readouterr()
    one_line_error(capsys, run_cli("evaluate", "--fisher", tmp_path / "fv-a", tmp_path / "fv-b"),
                   "the same items in every stream")
    one_line_error(capsys, run_cli("evaluate", "--fisher", tmp_path / "fv-a", "--fusion-weights", "1,2"),
                   "one weight per --fisher store")


def test_ten_crops_decode_each_video_once(tmp_path, videos, monkeypatch):
    from fvvae_fast.pipelines.datasets import crop_parent
    from fvvae_fast.pipelines.sources import VideoSource

    loaded, load = [], VideoSource.load
    monkeypatch.setattr(VideoSource, "load", lambda self, item: loaded.append(item.path) or load(self, item))
    assert run_cli(*descriptor_args(videos, tmp_path / "rgb", "--crops", "10", "--shard-items", "64")) == 0
    store = Store.open(tmp_path / "rgb")
    assert len(store.items(split="test")) == 40
    assert len(loaded) == len(set(loaded)) == len({crop_parent(r["item_id"]) for r in store.items()})
