"""Descriptor sources (video, image, precomputed), backbones, dataset readers and the descriptor stage,
on tiny media written by the tests (PyAV videos, PIL images) and small random-weight backbones."""

from __future__ import annotations

import fractions
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from fvvae_fast.pipelines import (  # noqa: E402
    PRESETS,
    BackboneError,
    Dataset,
    DatasetError,
    ImageSource,
    Item,
    PrecomputedSource,
    SourceError,
    VideoSource,
    array_items,
    build_backbone,
    decode_video,
    descriptors_of,
    extract_descriptors,
    read_activitynet,
    read_cub,
    read_folder,
    read_ucf101,
    sample_indices,
    torchvision_preprocess,
)
from fvvae_fast.official import release_preprocess  # noqa: E402
from fvvae_fast.pipelines import sources  # noqa: E402
from fvvae_fast.pipelines.extract import default_workers  # noqa: E402
from fvvae_fast.store import Store  # noqa: E402

from .cases import generator  # noqa: E402

TINY = {"name": "mobilenet_v3_small", "layer": "features.4"}  # 40 channels, 4x4 maps at 64x64


# ------------------------------------------------------------------ media made by the tests


def make_video(path: Path, frames: int = 12, width: int = 64, height: int = 48, seed: int = 0,
               codec: str = "mpeg4") -> Path:
    """A small video whose frame i is a flat grey of level 10 + 20 i plus a moving coloured bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 60, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 10 + 20 * (i % 12), np.uint8)
            img[: height // 4, :] = tint
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_corrupt(path: Path, source: Path | None = None) -> Path:
    """A truncated copy of ``source`` (or garbage bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()[: source.stat().st_size // 3] if source else b"\x00not a video" * 50
    path.write_bytes(data)
    return path


def make_image(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = (20, 20, 20)
    arr[5:15, 10:30] = color  # the "bird" inside its box (x=10, y=5, w=20, h=10)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_backbone():
    return build_backbone(TINY["name"], TINY["layer"], random_weights=True)


# ------------------------------------------------------------------ video decoding and sampling


def test_sample_indices_uniform_over_the_clip():
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(10, 25)[:3] == [0, 0, 1] and len(sample_indices(10, 25)) == 25
    assert sample_indices(1, 3) == [0, 0, 0]
    idx = sample_indices(1000, 25)
    assert idx == sorted(idx) and idx[0] == 20 and idx[-1] == 980
    with pytest.raises(SourceError):
        sample_indices(0, 5)


@pytest.mark.parametrize("ext,codec", [(".mp4", "mpeg4"), (".avi", "mpeg4"), (".mkv", "libx264")])
def test_decode_video_samples_the_right_frames(tmp_path, ext, codec):
    path = make_video(tmp_path / f"v{ext}", frames=12, codec=codec)  # .mkv has no frame count in the header
    frames = decode_video(path, 5)
    assert frames.shape == (5, 3, 48, 64) and frames.dtype == torch.uint8
    levels = frames[:, :, 24:, :].float().mean(dim=(1, 2, 3))
    expected = torch.tensor([10 + 20 * i for i in sample_indices(12, 5)], dtype=torch.float32)
    torch.testing.assert_close(levels, expected, atol=3.0, rtol=0)


def test_decode_corrupt_and_missing(tmp_path):
    good = make_video(tmp_path / "good.mp4")
    for bad in (make_corrupt(tmp_path / "trunc.mp4", good), make_corrupt(tmp_path / "junk.avi")):
        with pytest.raises(Exception):  # noqa: B017 - PyAV's InvalidDataError or our SourceError
            decode_video(bad, 5)
    with pytest.raises(SourceError, match="not found"):
        decode_video(tmp_path / "missing.mp4", 5)


def test_torchvision_preprocess_values():
    frames = torch.full((2, 3, 30, 40), 255, dtype=torch.uint8)
    out = torchvision_preprocess(frames, 20, 16)
    assert out.shape == (2, 3, 16, 16)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_video_source_load_and_descriptors(tmp_path, tiny_backbone):
    path = make_video(tmp_path / "v.mp4")
    source = VideoSource(frames=3, size=64)
    frames = source.load(Item("v", path))
    assert frames.shape == (3, 3, 48, 64) and frames.dtype == torch.uint8  # workers hand over decoded frames
    prepared = source.prepare(frames)
    assert prepared.shape == (3, 3, 64, 64) and prepared.dtype == torch.float32
    desc = descriptors_of(source, tiny_backbone, frames)
    assert desc.shape == (3 * 50, 40)
    np.testing.assert_array_equal(desc, descriptors_of(source, tiny_backbone, prepared))
    release = VideoSource(frames=2, preprocess="release", map_scale=158.0)
    frames = release.load(Item("v", path))
    assert frames.dtype == torch.uint8
    assert torch.equal(release.prepare(frames), release_preprocess(frames))
    assert release.prepare(frames).shape == (2, 3, 224, 224)
    maps = torch.rand(2, 40, 7, 7)
    d = release.descriptors(maps)
    assert d.shape == (2, 50, 40)
    torch.testing.assert_close(d[:, -1].norm(dim=1) <= 158.0, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="preprocess"):
        VideoSource(preprocess="caffe")


# ------------------------------------------------------------------ images


def test_image_source_size_box_and_dense_descriptors(tmp_path, tiny_backbone):
    path = make_image(tmp_path / "bird.png")
    item = Item("bird", path, box=(10.0, 5.0, 20.0, 10.0))
    raw = ImageSource(size=64).load(item)
    assert raw.shape == (1, 3, 30, 40) and raw.dtype == torch.uint8
    whole = ImageSource(size=64).prepare(raw)
    boxed = ImageSource(size=64, use_box=True)
    boxed = boxed.prepare(boxed.load(item))
    assert whole.shape == boxed.shape == (1, 3, 64, 64)
    red = (200 / 255 - 0.485) / 0.229
    assert torch.allclose(boxed[0, 0], torch.full((64, 64), red), atol=1e-5)  # only the box is left
    assert whole[0, 0].min() < 0  # the dark background is still there
    desc = descriptors_of(ImageSource(size=64), tiny_backbone, whole)
    assert desc.shape == (4 * 4, 40)  # every position of the 4 x 4 map
    with pytest.raises(SourceError, match="bounding box"):
        ImageSource(use_box=True).load(Item("x", path))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SourceError, match="cannot read"):
        ImageSource().load(Item("b", tmp_path / "broken.jpg"))


# ------------------------------------------------------------------ backbones


def test_backbone_needs_weights_or_the_explicit_flag():
    with pytest.raises(BackboneError, match="weights file"):
        build_backbone(TINY["name"], TINY["layer"])
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("no_such_net", "x", random_weights=True)
    with pytest.raises(BackboneError, match="needs a layer"):
        build_backbone("resnet18", random_weights=True)
    with pytest.raises(BackboneError, match="unknown layer"):
        build_backbone(TINY["name"], "features.99", random_weights=True)


def test_backbone_weights_file_roundtrip(tmp_path, tiny_backbone):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(TINY["name"], weights=None).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pth")
    bb = build_backbone(TINY["name"], TINY["layer"], weights=tmp_path / "w.pth")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = net.features[:5](x)
        torch.testing.assert_close(bb(x), expected)
    assert bb.config()["weights"]["file"] == "w.pth" and len(bb.config()["weights"]["sha256"]) == 64
    assert bb.output_shape(64, 64) == (40, 4, 4)
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("features.3")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match="lacks"):
        build_backbone(TINY["name"], TINY["layer"], weights=tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="not a readable"):
        build_backbone(TINY["name"], TINY["layer"], weights=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        build_backbone(TINY["name"], TINY["layer"], weights=tmp_path / "none.pth")


def test_random_backbones_are_seeded():
    a = build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=3)
    b = build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("preset,size,shape", [
    ("vgg19-pool5", 224, (512, 7, 7)),
    ("vgg19-conv5_4", 448, (512, 28, 28)),
    ("resnet152-res5c", 224, (2048, 7, 7)),
    ("mobilenet_v2", 224, (1280, 7, 7)),
])
def test_presets_cut_at_the_right_layer(preset, size, shape):
    """Checked on the meta device: the architecture and shapes without computing anything."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    arch, layer = PRESETS[preset]
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
        out = create_feature_extractor(model, {layer: "out"})(torch.empty(1, 3, size, size))["out"]
    assert tuple(out.shape[1:]) == shape
    if preset == "vgg19-conv5_4":
        f = model.features
        assert isinstance(f[34], torch.nn.Conv2d) and isinstance(f[35], torch.nn.ReLU)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in f[:35]) == 16  # conv5_4 is the 16th conv
    if preset == "vgg19-pool5":
        assert isinstance(model.features[36], torch.nn.MaxPool2d) and len(model.features) == 37


def test_hook_fallback_stops_at_the_layer():
    from fvvae_fast.pipelines.backbones import _HookExtractor

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1, 1))
    maps = _HookExtractor(net, "1")(torch.rand(1, 3, 8, 8))  # the Linear after it would fail on this shape
    assert maps.shape == (1, 4, 6, 6) and (maps >= 0).all()


# ------------------------------------------------------------------ dataset readers


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ucf_fixture(tmp_path: Path) -> Path:
    lists = tmp_path / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\r\n2 Archery\r\n")
    write(lists / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
                                     "Archery/v_Archery_g08_c01.avi 2\r\n\r\n")
    write(lists / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nArchery/v_Archery_g01_c01.avi\r\n")
    return lists


def test_read_ucf101(tmp_path):
    ucf_fixture(tmp_path)
    ds = read_ucf101(tmp_path / "UCF-101", split=1)  # lists found beside the video folder
    assert ds.classes == ["ApplyEyeMakeup", "Archery"]
    assert [(it.id.split("/")[1], it.label, it.split) for it in ds.items] == [
        ("v_ApplyEyeMakeup_g08_c01.avi", 0, "train"), ("v_Archery_g08_c01.avi", 1, "train"),
        ("v_ApplyEyeMakeup_g01_c01.avi", 0, "test"), ("v_Archery_g01_c01.avi", 1, "test")]
    assert ds.items[0].path == tmp_path / "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"
    assert len(ds.split("test")) == 2


@pytest.mark.parametrize("file,text,message", [
    ("trainlist01.txt", "ApplyEyeMakeup/a.avi 1\nArchery/b.avi 1\n", r"trainlist01.txt:2: label 1 does not match"),
    ("trainlist01.txt", "Boxing/a.avi 1\n", r"trainlist01.txt:1: video 'Boxing/a.avi' is not under a class"),
    ("testlist01.txt", "Archery/b.avi x y\n", r"testlist01.txt:1: expected"),
    ("classInd.txt", "1 ApplyEyeMakeup\n3 Archery\n", r"classInd.txt:2: class indices"),
    ("trainlist01.txt", "ApplyEyeMakeup/a.avi one\n", r"trainlist01.txt:1: label must be an integer"),
])
def test_read_ucf101_errors_name_file_and_line(tmp_path, file, text, message):
    lists = ucf_fixture(tmp_path)
    write(lists / file, text)
    with pytest.raises(DatasetError, match=message):
        read_ucf101(tmp_path / "UCF-101", lists)


def test_read_ucf101_missing_lists(tmp_path):
    with pytest.raises(DatasetError, match="classInd.txt: file not found"):
        read_ucf101(tmp_path)
    ucf_fixture(tmp_path)
    (tmp_path / "ucfTrainTestlist/testlist01.txt").unlink()
    with pytest.raises(DatasetError, match="testlist01.txt: file not found"):
        read_ucf101(tmp_path / "UCF-101")


def cub_fixture(root: Path) -> Path:
    write(root / "images.txt", "1 001.Albatross/a.jpg\n2 001.Albatross/b.jpg\n3 002.Ani/c.jpg\n")
    write(root / "image_class_labels.txt", "1 1\n2 1\n3 2\n")
    write(root / "train_test_split.txt", "1 1\n2 0\n3 1\n")
    write(root / "bounding_boxes.txt", "1 10.0 5.0 20.0 10.0\n2 0 0 5 5\n3 1.5 2.5 3 4\n")
    write(root / "classes.txt", "1 001.Albatross\n2 002.Ani\n")
    for name in ("001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Ani/c.jpg"):
        make_image(root / "images" / name)
    return root


def test_read_cub(tmp_path):
    ds = read_cub(cub_fixture(tmp_path / "CUB_200_2011"))
    assert ds.classes == ["001.Albatross", "002.Ani"]
    assert [(it.label, it.split, it.box) for it in ds.items] == [
        (0, "train", (10.0, 5.0, 20.0, 10.0)), (0, "test", (0.0, 0.0, 5.0, 5.0)), (1, "train", (1.5, 2.5, 3.0, 4.0))]
    assert ds.items[2].path == tmp_path / "CUB_200_2011/images/002.Ani/c.jpg"


def test_read_cub_errors(tmp_path):
    root = cub_fixture(tmp_path)
    write(root / "train_test_split.txt", "1 1\n2 0\n")
    with pytest.raises(DatasetError, match=r"train_test_split.txt: 1 image ids .* no line"):
        read_cub(root)
    write(root / "train_test_split.txt", "1 1\n2 0\n9 1\n")
    with pytest.raises(DatasetError, match=r"train_test_split.txt:3: image id 9 is not in images.txt"):
        read_cub(root)
    cub_fixture(root)
    write(root / "bounding_boxes.txt", "1 10 5 20 10\n2 0 0 5\n3 1 2 3 4\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt:2: expected 5 fields"):
        read_cub(root)


def test_read_activitynet(tmp_path):
    data = {"version": "VERSION 1.3", "taxonomy": [], "database": {
        "abc": {"subset": "training", "annotations": [{"label": "Surfing", "segment": [0, 5]}]},
        "def": {"subset": "validation", "annotations": [{"label": "Archery", "segment": [1, 2]}]},
        "ghi": {"subset": "testing", "annotations": []},
        "jkl": {"subset": "training", "annotations": [{"label": "Archery", "segment": [1, 2]}]},
    }}
    write(tmp_path / "anet.json", json.dumps(data, indent=1))
    videos = tmp_path / "videos"
    make_video(videos / "v_abc.mp4", frames=3)
    make_video(videos / "def.mkv", frames=3, codec="libx264")
    ds = read_activitynet(tmp_path / "anet.json", videos)
    assert ds.classes == ["Archery", "Surfing"]
    assert [(it.id, it.label, it.split, it.path.name) for it in ds.items] == [
        ("ghi", -1, "testing", "v_ghi.mp4"), ("abc", 1, "training", "v_abc.mp4"),
        ("jkl", 0, "training", "v_jkl.mp4"), ("def", 0, "validation", "def.mkv")]
    write(tmp_path / "bad.json", '{\n "database": {\n  "abc": {"subset": }\n }\n}\n')
    with pytest.raises(DatasetError, match=r"bad.json:3: invalid JSON"):
        read_activitynet(tmp_path / "bad.json", videos)
    write(tmp_path / "nodb.json", '{"version": 1}')
    with pytest.raises(DatasetError, match="no 'database'"):
        read_activitynet(tmp_path / "nodb.json", videos)


def test_read_folder_layouts(tmp_path):
    for sp in ("train", "test"):
        for c in ("cat", "dog"):
            write(tmp_path / "split" / sp / c / "x.npy", "")
    ds = read_folder(tmp_path / "split", (".npy",))
    assert ds.classes == ["cat", "dog"] and ds.splits() == ["test", "train"]
    assert [(it.id, it.label) for it in ds.items][:2] == [("test/cat/x.npy", 0), ("test/dog/x.npy", 1)]
    write(tmp_path / "flat" / "a.npy", "")
    flat = read_folder(tmp_path / "flat", (".npy",))
    assert flat.classes == [] and flat.items[0].label == -1
    write(tmp_path / "mixed" / "cat" / "a.npy", "")
    write(tmp_path / "mixed" / "loose.npy", "")
    with pytest.raises(DatasetError, match="loose.npy: file outside a class folder"):
        read_folder(tmp_path / "mixed", (".npy",))
    with pytest.raises(DatasetError, match="no file"):
        read_folder(tmp_path / "flat", (".avi",))


# ------------------------------------------------------------------ the descriptor stage


def video_dataset(root: Path, n: int = 4) -> Dataset:
    items = []
    for i in range(n):
        path = make_video(root / f"c{i % 2}" / f"v{i}.mp4", frames=6 + 3 * i, seed=i)
        items.append(Item(f"c{i % 2}/v{i}.mp4", path, label=i % 2, split="train" if i < n - 1 else "test"))
    bad = make_corrupt(root / "c0" / "bad.mp4", items[0].path)
    items.insert(2, Item("c0/bad.mp4", bad, label=0, split="train"))
    items.append(Item("c1/missing.mp4", root / "c1" / "missing.mp4", label=1, split="test"))
    return Dataset("tiny", items, ["c0", "c1"])


def test_extract_video_store_skips_bad_items(tmp_path, tiny_backbone):
    ds = video_dataset(tmp_path / "videos")
    source = VideoSource(frames=3, size=64)
    report = extract_descriptors(source, ds, tmp_path / "store", tiny_backbone, shard_items=2, batch_frames=4,
                                 workers=0, progress=False)
    assert report.computed == 6 and report.failed_now == 2 and report.summary.done == 4
    assert [f[0] for f in report.failures] == ["c0/bad.mp4", "c1/missing.mp4"]
    assert "not found" in report.failures[1][1]
    assert any("skipped" in line for line in report.lines())
    store = Store.open(tmp_path / "store")
    sets = store.sets()
    assert len(sets) == 4 and sets.dim == 40
    assert torch.equal(sets.offsets, torch.arange(5) * 150)  # 3 frames x 50 SPP descriptors per video
    # frames batched across videos (4 per batch) give each video's own descriptors
    for k, it in enumerate(it for it in ds.items if it.id not in ("c0/bad.mp4", "c1/missing.mp4")):
        alone = descriptors_of(source, tiny_backbone, source.load(it))
        np.testing.assert_allclose(sets.x[150 * k : 150 * (k + 1)], alone, rtol=1e-5, atol=1e-6)
    again = extract_descriptors(source, ds, tmp_path / "store", tiny_backbone, shard_items=2, batch_frames=4,
                                progress=False)
    assert again.computed == 0 and again.resumed == 6


def test_extract_with_workers_is_byte_identical(tmp_path, tiny_backbone):
    ds = video_dataset(tmp_path / "videos", n=3)
    source = VideoSource(frames=2, size=64)
    for name, workers in (("w0", 0), ("w1", 1)):
        extract_descriptors(source, ds, tmp_path / name, tiny_backbone, shard_items=3, batch_frames=3,
                            workers=workers, progress=False)
    for shard in sorted((tmp_path / "w0/shards").glob("*.npy")):
        assert shard.read_bytes() == (tmp_path / "w1/shards" / shard.name).read_bytes()


def test_extract_images_with_box(tmp_path, tiny_backbone):
    ds = read_cub(cub_fixture(tmp_path / "cub"))
    report = extract_descriptors(ImageSource(size=64, use_box=True), ds, tmp_path / "store", tiny_backbone,
                                 shard_items=2, progress=False)
    assert report.summary.done == 3
    sets = Store.open(tmp_path / "store").sets("train")
    assert len(sets) == 2 and int(sets.offsets[1]) == 16  # 4 x 4 map positions per image


def test_extract_precomputed_arrays_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    offsets = np.array([0, 4, 4, 10])
    items = array_items(x, offsets, labels=[0, 1, 0], splits=["train", "train", "test"])
    extract_descriptors(PrecomputedSource(arrays=(x, offsets)), Dataset("arr", items, ["a", "b"]),
                        tmp_path / "a", progress=False)
    sets = Store.open(tmp_path / "a").sets()
    assert sets.offsets.tolist() == [0, 4, 4, 10] and np.array_equal(np.asarray(sets.x), x)
    folder = tmp_path / "npy"
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        np.save(folder / f"c{i % 2}" / f"s{i}.npy", x[lo:hi])
    np.save(folder / "c1" / "wrong.npy", np.zeros((2, 5), np.float32))
    ds = read_folder(folder, (".npy",))
    report = extract_descriptors(PrecomputedSource(), ds, tmp_path / "f", progress=False)
    assert report.summary.done == 3
    assert report.failures == [("c1/wrong.npy", "descriptors of shape (2, 5), expected (n, 6)")]
    with pytest.raises(ValueError, match="offsets"):
        array_items(x, np.array([0, 11]))


def test_non_finite_descriptors_are_skipped_and_counted(tmp_path):
    x = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    x[5, 2], x[8, 0] = np.nan, np.inf  # both in set 2 (rows 4..9)
    offsets = np.array([0, 2, 4, 10])
    items = array_items(x, offsets, labels=[0, 1, 0], splits=["train"] * 3)
    report = extract_descriptors(PrecomputedSource(arrays=(x, offsets)), Dataset("arr", items, ["a", "b"]),
                                 tmp_path / "a", progress=False)
    assert report.summary.done == 2 and report.summary.failed == 1
    assert [err for _, err in report.failures] == ["non-finite descriptors (NaN or Inf): the item is skipped, "
                                                   "never trained on"]
    sets = Store.open(tmp_path / "a").sets()
    assert len(sets) == 2 and np.isfinite(np.asarray(sets.x)).all()
