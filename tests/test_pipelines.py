"""Descriptor sources (video, image, precomputed), backbones, dataset readers and the descriptor stage,
on tiny media written by the tests (PyAV videos, PIL images) and small random-weight backbones."""

from __future__ import annotations

import fractions
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from fvvae_fast import threads  # noqa: E402
from fvvae_fast.errors import is_user_error  # noqa: E402
from fvvae_fast.official import release_preprocess  # noqa: E402
from fvvae_fast.pipelines import (  # noqa: E402
    PRESETS,
    BackboneError,
    Dataset,
    DatasetError,
    FlowSource,
    ImageSource,
    Item,
    PrecomputedSource,
    SourceError,
    VideoSource,
    array_items,
    build_backbone,
    decode_video,
    default_workers,
    descriptors_of,
    extract_descriptors,
    frame_settings,
    read_activitynet,
    read_cub,
    read_folder,
    read_ucf101,
    sample_indices,
    sources,  # noqa: E402
    torchvision_preprocess,
)
from fvvae_fast.pipelines.backbones import timm_transform, torchvision_transform  # noqa: E402
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


def make_clip(path: Path, codec: str, frames: int, *, gop: int | None = None, b_frames: int | None = None,
              vfr: bool = False, audio: bool = False, size=(48, 32)) -> Path:
    """A clip whose every frame differs (grey level and bar length follow the frame index).
    ``gop``: keyframe interval; ``vfr``: irregular frame times (1 ms clock); ``audio``: an
    audio stream twice as long as the video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    steps = np.random.default_rng(frames).integers(15, 90, frames)  # ms between frames when vfr
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"x264-params": "scenecut=0"}  # keyframes every ``gop`` frames, no more
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        if vfr:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        sound = container.add_stream("aac", rate=8000) if audio else None
        for i in range(frames):
            img = np.full((h, w, 3), (7 * i) % 256, np.uint8)
            img[: h // 4, : i % w] = 255 - (3 * i) % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = int(steps[:i].sum()), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            for start in range(0, 2 * frames * 8000 // 25, 1024):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = 8000, start
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def sequential_decode(path: Path) -> list[np.ndarray]:
    """Every frame, in order, by a plain single-threaded PyAV decode: the reference."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def at(frames: list[np.ndarray], idx: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)


CLIPS = {  # name: (file, codec, frames, make_clip options)
    "h264-long-gop": ("v.mp4", "libx264", 600, {"gop": 250}),
    "mpeg4-avi": ("v.avi", "mpeg4", 150, {}),  # UCF101's format
    "mpeg4-avi-b-frames": ("v.avi", "mpeg4", 90, {"b_frames": 2}),
    "vfr-mkv": ("v.mkv", "libx264", 120, {"vfr": True}),  # no frame count in the header either
    "audio-longer-mp4": ("v.mp4", "libx264", 80, {"audio": True}),
}


@pytest.mark.parametrize("clip", list(CLIPS))
def test_decode_video_equals_a_sequential_decode(tmp_path, monkeypatch, clip):
    """Seeking decodes exactly the frames a full decode in order has at the sampled indices."""
    name, codec, frames, options = CLIPS[clip]
    path = make_clip(tmp_path / name, codec, frames, **options)
    ref = sequential_decode(path)
    assert len(ref) == frames

    def no_fallback(*args):
        raise AssertionError("decoded in order: the seek path gave up")

    monkeypatch.setattr(sources, "_decode_in_order", no_fallback)
    for count in (1, 7, 25, frames + 3):
        got = decode_video(path, count)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert torch.equal(got, at(ref, sample_indices(frames, count))), count


def test_decode_video_truncated_file_samples_what_decodes(tmp_path):
    path = make_clip(tmp_path / "v.mkv", "libx264", 200)
    cut = make_corrupt(tmp_path / "cut.mkv", path)
    ref = sequential_decode(cut)
    assert 0 < len(ref) < 200
    assert torch.equal(decode_video(cut, 9), at(ref, sample_indices(len(ref), 9)))


def test_decode_video_without_timestamps_decodes_once_in_order(tmp_path, monkeypatch):
    path = make_clip(tmp_path / "v.avi", "mpeg4", 60)
    index = sources._packet_index
    monkeypatch.setattr(sources, "_packet_index", lambda c, s: (index(c, s)[0], None, []))
    assert torch.equal(decode_video(path, 11), at(sequential_decode(path), sample_indices(60, 11)))


def test_seeking_decodes_only_near_the_samples(tmp_path):
    """A 600-frame clip with a keyframe every 12 frames: 5 samples decode at most 5 x 12 frames."""
    path = make_clip(tmp_path / "v.avi", "mpeg4", 600, gop=12)

    class Counting:
        def __init__(self, container):
            self.container, self.decoded = container, 0

        def seek(self, *args, **kwargs):
            return self.container.seek(*args, **kwargs)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                self.decoded += 1
                yield frame

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count, pts, keys = sources._packet_index(container, stream)
        assert count == 600 and len(keys) >= 600 // 12
        counting = Counting(container)
        targets = [pts[i] for i in sample_indices(count, 5)]
        got = sources._seek_decode(counting, stream, pts, keys, targets)
    assert sorted(got) == targets and counting.decoded <= 5 * 12


def _torchcodec_missing() -> str | None:
    try:
        sources.check_decoder("torchcodec")
    except ImportError as err:
        return str(err)
    return None


# `make test` installs torchcodec and links PyAV's FFmpeg for it (tests/pyav_ffmpeg.py)
@pytest.mark.skipif(_torchcodec_missing() is not None, reason="torchcodec or FFmpeg's libraries are not installed")
@pytest.mark.parametrize("clip", list(CLIPS))
def test_torchcodec_decoder_equals_pyav_and_a_sequential_decode(tmp_path, monkeypatch, clip):
    """torchcodec's own frames, except on the AVI whose container flags P-frames as keys: there its exact
    seek lands 2-3 frames late, which the presentation times show, and PyAV decodes the file instead."""
    name, codec, frames, options = CLIPS[clip]
    path = make_clip(tmp_path / name, codec, frames, **options)
    ref = sequential_decode(path)
    pyav = decode_video(path, 25)
    handed_over = []
    monkeypatch.setattr(sources, "_decode_pyav", lambda *a: handed_over.append(a) or pyav)
    got = decode_video(path, 25, decoder="torchcodec")
    assert torch.equal(got, pyav) and torch.equal(got, at(ref, sample_indices(frames, 25)))
    assert len(handed_over) == (clip == "mpeg4-avi-b-frames")


def test_torchcodec_missing_is_one_clear_error(tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # what an import without the package meets
    with pytest.raises(ImportError, match="torchcodec"):
        VideoSource(decoder="torchcodec")
    with pytest.raises(ImportError, match="torchcodec") as err:
        decode_video(path, 3, decoder="torchcodec")
    assert is_user_error(err.value)  # the command line's one error line, no traceback


def _gpu_decoder_on_the_cpu(monkeypatch) -> list:
    """Stand in for a CUDA machine: torchcodec-cuda passes its device to torchcodec, which decodes on
    the CPU here. Returns the devices the decoder was asked for."""
    asked = []
    real = sources._torchcodec_decoder()

    def decoder(path, *, device=None, **kwargs):
        asked.append(device)
        return real(path, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(sources, "_torchcodec_decoder", lambda: decoder)
    return asked


@pytest.mark.skipif(_torchcodec_missing() is not None, reason="torchcodec or FFmpeg's libraries are not installed")
def test_gpu_decoder_asks_torchcodec_for_the_current_cuda_device(tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4", frames=10)
    cpu = decode_video(path, 4, decoder="torchcodec")
    asked = _gpu_decoder_on_the_cpu(monkeypatch)
    assert torch.equal(decode_video(path, 4, decoder="torchcodec-cuda"), cpu)
    assert asked == [torch.device("cuda", 0)]


@pytest.mark.skipif(_torchcodec_missing() is not None, reason="torchcodec or FFmpeg's libraries are not installed")
def test_gpu_decoder_runs_the_stage_in_the_main_process(tmp_path, monkeypatch, tiny_backbone):
    """With a GPU decoder the stage decodes in the main process (workers=0 by default; a worker count is
    refused) and writes the descriptors the CPU decoder gives."""
    ds = video_dataset(tmp_path / "videos", n=3)
    kwargs = {"shard_items": 3, "batch_frames": 3, "progress": False}
    extract_descriptors(VideoSource(frames=2, size=96, decoder="torchcodec"), ds, tmp_path / "cpu", tiny_backbone,
                        workers=0, **kwargs)
    asked = _gpu_decoder_on_the_cpu(monkeypatch)
    source = VideoSource(frames=2, size=96, decoder="torchcodec-cuda")
    with pytest.raises(ValueError, match="need workers=0, got 2"):
        extract_descriptors(source, ds, tmp_path / "refused", tiny_backbone, workers=2, **kwargs)
    extract_descriptors(source, ds, tmp_path / "gpu", tiny_backbone, **kwargs)
    assert len(asked) == 4  # every file that exists: the three videos and the corrupt one, which then fails
    for shard in sorted((tmp_path / "cpu/shards").glob("*.npy")):
        assert shard.read_bytes() == (tmp_path / "gpu/shards" / shard.name).read_bytes()


def test_gpu_decoder_needs_cuda_and_is_refused_where_frames_stay_on_the_cpu(tmp_path, monkeypatch, tiny_backbone):
    from fvvae_fast.finetune import finetune

    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match="needs CUDA") as err:
            VideoSource(decoder="torchcodec-cuda")
        assert is_user_error(err.value)
    if _torchcodec_missing() is None:
        _gpu_decoder_on_the_cpu(monkeypatch)
        with pytest.raises(ValueError, match="flow stream's images are computed on the CPU"):
            FlowSource(decoder="torchcodec-cuda")
        with pytest.raises(ValueError, match="fine-tuning prepares its frames on the CPU"):
            finetune(tiny_backbone, VideoSource(decoder="torchcodec-cuda"), video_dataset(tmp_path, n=2))


@pytest.mark.skipif(not torch.cuda.is_available() or _torchcodec_missing() is not None,
                    reason="needs CUDA and torchcodec")
@pytest.mark.parametrize("clip", list(CLIPS))
def test_nvdec_frames_match_the_cpu_decode(tmp_path, clip):
    """On a GPU: NVDEC's frames are the CPU decode's frames, on the device, up to its colour conversion."""
    name, codec, frames, options = CLIPS[clip]
    path = make_clip(tmp_path / name, codec, frames, **options)
    cpu = decode_video(path, 25, decoder="torchcodec")
    gpu = decode_video(path, 25, decoder="torchcodec-cuda")
    assert gpu.shape == cpu.shape and gpu.dtype == torch.uint8
    diff = (gpu.cpu().float() - cpu.float()).abs()
    assert float(diff.mean()) <= 3.0, f"mean |difference| {float(diff.mean()):.2f} grey levels"


def test_decoder_and_frame_count_are_checked(tmp_path):
    path = make_video(tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="decoder must be one of"):
        VideoSource(decoder="opencv")
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode_video(path, 3, decoder="opencv")
    with pytest.raises(ValueError, match="num_frames"):
        decode_video(path, 0)


@pytest.mark.parametrize("hw", [(240, 320), (240, 468), (468, 240), (257, 301), (256, 256)])
def test_torchvision_mode_equals_the_weights_transforms(hw):
    """VideoSource's torchvision preprocessing is ``VGG19_Weights.IMAGENET1K_V1.transforms()``
    (shorter side 256 with antialias, torchvision's centre crop 224, ImageNet mean/std) on the
    same uint8 frames; (240, 468) and (468, 240) put the crop at a half-pixel offset."""
    from torchvision.models import VGG19_Weights

    frames = torch.randint(0, 256, (3, 3, *hw), generator=generator(sum(hw)), dtype=torch.uint8)
    expected = VGG19_Weights.IMAGENET1K_V1.transforms()(frames)
    torch.testing.assert_close(VideoSource().prepare(frames), expected, rtol=0, atol=1e-6)


def drawn_frames(height: int, width: int, count: int = 2) -> torch.Tensor:
    """``count`` RGB pictures drawn with PIL (a colour gradient, filled shapes, thin lines: sharp edges and
    smooth areas) as uint8 frames (count, 3, height, width)."""
    from PIL import Image, ImageDraw

    out = []
    for k in range(count):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y + 17 * k) / 9)], axis=-1)
        im = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(im)
        draw.ellipse((width // 5, height // 6 + k, 3 * width // 5, 2 * height // 3), fill=(250, 20 * k, 30))
        draw.rectangle((width // 2, height // 2, width - 9, height - 5 - k), fill=(10, 240, 60 * k))
        for i in range(0, width, 11):
            draw.line((i, 0, width - i, height - 1), fill=(255, 255, 255), width=1 + k)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


# (architecture, weights): transforms that differ in resize, crop and interpolation
TORCHVISION_TRANSFORMS = [("resnet50", "IMAGENET1K_V2"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
                          ("inception_v3", "IMAGENET1K_V1"), ("efficientnet_b0", "IMAGENET1K_V1")]


@pytest.mark.parametrize("arch,weights", TORCHVISION_TRANSFORMS, ids=[a for a, _ in TORCHVISION_TRANSFORMS])
@pytest.mark.parametrize("hw", [(240, 320), (403, 299)])
def test_each_torchvision_backbone_gets_its_weights_transforms(arch, weights, hw):
    """The video source made from the weights' Transform preprocesses real pictures as that weights'
    ``transforms()`` does (ResNet-50 V2: 232 then 224; ViT SWAG: 384 bicubic; Inception v3: 342 then 299;
    EfficientNet-B0: 256 bicubic), to float32 rounding; the image source takes their interpolation and
    normalisation at its own size."""
    import torchvision
    from torchvision import transforms as T

    entry = torchvision.models.get_model_weights(arch)[weights]
    transform = torchvision_transform(entry)
    expected = entry.transforms()(drawn_frames(*hw))
    settings, notice = frame_settings(transform, "video", None, None, 448)
    assert notice is None and transform.origin == str(entry)
    torch.testing.assert_close(VideoSource(**settings).prepare(drawn_frames(*hw)), expected, rtol=0, atol=1e-6)
    settings, _ = frame_settings(transform, "image", None, None, 448)
    image = ImageSource(**settings).prepare(drawn_frames(*hw))
    t = entry.transforms()
    square = T.Compose([T.Resize((448, 448), interpolation=t.interpolation), T.ConvertImageDtype(torch.float32),
                        T.Normalize(t.mean, t.std)])
    torch.testing.assert_close(image, square(drawn_frames(*hw)), rtol=0, atol=1e-6)


TIMM_MODELS = ["resnet18", "vit_tiny_patch16_224", "convnext_atto"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_each_timm_backbone_gets_its_data_config(name):
    """A timm model's Transform is its ``resolve_data_config``: the video source equals timm's own
    evaluation transform (``create_transform``, applied to uint8 tensors: its to-tensor step becomes the
    same /255 conversion) on real pictures, to float32 rounding."""
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    model = timm.create_model(name, pretrained=False)
    transform = timm_transform(model, name)
    steps = create_transform(**resolve_data_config(model=model)).transforms
    timm_own = T.Compose([T.ConvertImageDtype(torch.float32) if type(s).__name__ == "MaybeToTensor" else s
                          for s in steps])
    frames = drawn_frames(250, 330)
    settings, _ = frame_settings(transform, "video", None, None, 448)
    torch.testing.assert_close(VideoSource(**settings).prepare(frames), timm_own(frames), rtol=0, atol=1e-6)


def test_build_backbone_reads_the_preprocessing_of_its_weights(tmp_path):
    """A local file of torchvision's MobileNet V2 IMAGENET1K_V2 (by its file name) gets that weights'
    preprocessing (232 before the 224 crop), the same file under another name and random weights the
    ImageNet default (256); a timm model its data config. --size overrides the crop with one notice."""
    import torchvision

    entry = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / Path(entry.url).name)
    os.link(tmp_path / Path(entry.url).name, tmp_path / "mine.pth")
    assert build_backbone("mobilenet_v2", weights=tmp_path / Path(entry.url).name).transform == \
        torchvision_transform(entry)
    for other in (build_backbone("mobilenet_v2", weights=tmp_path / "mine.pth"),
                  build_backbone("mobilenet_v2", random_weights=True)):
        assert (other.transform.resize, other.transform.crop, other.transform.origin) == (256, 224,
                                                                                          "the ImageNet default")
    settings, notice = frame_settings(torchvision_transform(entry), "video", 112, None, 448)
    assert (settings["size"], settings["resize"]) == (112, 116)
    assert notice.startswith("notice: --size 112 overrides the crop 224 of MobileNet_V2_Weights.IMAGENET1K_V2")
    assert "\n" not in notice
    assert frame_settings(torchvision_transform(entry), "video", 112, 130, 448)[0]["resize"] == 130
    pytest.importorskip("timm")
    timm_bb = build_backbone("timm:resnet10t", "layer2", random_weights=True)
    assert timm_bb.transform.origin == "timm resnet10t" and timm_bb.transform.interpolation == "bicubic"


def test_frame_sources_check_their_normalisation():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        VideoSource(interpolation="nearest")
    with pytest.raises(ValueError, match="std must be 3 finite numbers"):
        ImageSource(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        VideoSource(mean=(0.5, 0.5))


def test_torchvision_preprocess_values():
    frames = torch.full((2, 3, 30, 40), 255, dtype=torch.uint8)
    out = torchvision_preprocess(frames, 20, 16)
    assert out.shape == (2, 3, 16, 16)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_video_source_load_and_descriptors(tmp_path, tiny_backbone):
    path = make_video(tmp_path / "v.mp4")
    source = VideoSource(frames=3, size=96)
    frames = source.load(Item("v", path))
    assert frames.shape == (3, 3, 48, 64) and frames.dtype == torch.uint8  # workers hand over decoded frames
    prepared = source.prepare(frames)
    assert prepared.shape == (3, 3, 96, 96) and prepared.dtype == torch.float32
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


def test_backbone_weights_by_torchvision_name_from_the_hub_cache(tmp_path):
    """weights="IMAGENET1K_V1" (or the enum's full name, or DEFAULT) loads the file torchvision's own
    download would have left in the torch hub cache; absent, one clear error and nothing downloaded."""
    import torchvision

    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        entry = torchvision.models.get_model_weights(TINY["name"]).IMAGENET1K_V1
        with pytest.raises(FileNotFoundError, match="not in the torch hub cache"):
            build_backbone(TINY["name"], TINY["layer"], weights="IMAGENET1K_V1")
        torch.manual_seed(1)
        net = torchvision.models.get_model(TINY["name"], weights=None).eval()
        cached = tmp_path / "hub" / "checkpoints" / Path(entry.url).name
        cached.parent.mkdir(parents=True)
        torch.save(net.state_dict(), cached)
        x = torch.rand(2, 3, 64, 64)
        for name in ("IMAGENET1K_V1", f"{type(entry).__name__}.IMAGENET1K_V1", "DEFAULT"):
            bb = build_backbone(TINY["name"], TINY["layer"], weights=name)
            with torch.inference_mode():
                torch.testing.assert_close(bb(x), net.features[:5](x))
        with pytest.raises(FileNotFoundError):
            build_backbone(TINY["name"], TINY["layer"], weights="NO_SUCH_WEIGHTS")
    finally:
        torch.hub.set_dir(hub)


def test_timm_backbone_by_name_from_a_local_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    net = timm.create_model("resnet10t", pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / "r.pth")
    bb = build_backbone("timm:resnet10t", "layer2", weights=tmp_path / "r.pth")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        want = net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x))))))
        torch.testing.assert_close(bb(x), want)
    assert bb.output_shape(64, 64) == tuple(want.shape[1:])
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("timm:no_such_model", "layer2", random_weights=True)


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


# bf16 keeps 8 significant bits (unit roundoff u = 2^-8); through the tiny network's 4 blocks the
# descriptors' relative (Frobenius) error measured 0.008-0.012 over seeds: allowed 8 u = 0.031
BF16_RELATIVE_ERROR = 8 * 2.0**-8


def test_bf16_descriptors_are_close_to_fp32():
    seed = int(torch.randint(0, 1000, (1,), generator=generator(7)))
    fp32 = build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=seed)
    bf16 = build_backbone(TINY["name"], TINY["layer"], random_weights=True, seed=seed, precision="bf16")
    frames = torch.randint(0, 256, (5, 3, 70, 90), generator=generator(8), dtype=torch.uint8)
    source = VideoSource(frames=5, size=96)
    a, b = descriptors_of(source, fp32, frames), descriptors_of(source, bf16, frames)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (5 * 50, 40)
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert 1e-5 < rel < BF16_RELATIVE_ERROR  # bf16 did run (fp32 rounding alone is ~1e-7), and is close
    assert bf16.config()["precision"] == "bf16" and fp32.config()["precision"] == "fp32"


def test_precision_is_checked_and_weights_are_channels_last(tiny_backbone):
    with pytest.raises(ValueError, match="precision must be one of"):
        build_backbone(TINY["name"], TINY["layer"], random_weights=True, precision="fp8")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        build_backbone(TINY["name"], TINY["layer"], random_weights=True, precision="fp16")
    convs = [p for p in tiny_backbone.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


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
    source = VideoSource(frames=3, size=96)
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
    assert again.computed == 4 and again.resumed == 2  # the shards of the two unreadable items are tried again


def test_extract_with_workers_is_byte_identical(tmp_path, tiny_backbone):
    ds = video_dataset(tmp_path / "videos", n=3)
    source = VideoSource(frames=2, size=96)
    for name, workers in (("w0", 0), ("w1", 1)):
        extract_descriptors(source, ds, tmp_path / name, tiny_backbone, shard_items=3, batch_frames=3,
                            workers=workers, progress=False)
    for shard in sorted((tmp_path / "w0/shards").glob("*.npy")):
        assert shard.read_bytes() == (tmp_path / "w1/shards" / shard.name).read_bytes()


def test_writer_errors_reach_the_caller_and_the_run_resumes(tmp_path, tiny_backbone):
    """An error on the shard writer thread stops the run in the caller; the shards written before
    it are kept, and the rerun completes to the bytes of an uninterrupted run."""
    ds = video_dataset(tmp_path / "videos", n=4)  # 6 items: 3 shards of 2
    source = VideoSource(frames=2, size=96)

    def fail(shard: int) -> None:
        if shard == 1:
            raise RuntimeError("disk full")

    kwargs = {"shard_items": 2, "batch_frames": 3, "workers": 0, "progress": False}
    with pytest.raises(RuntimeError, match="disk full"):
        extract_descriptors(source, ds, tmp_path / "s", tiny_backbone, on_shard=fail, **kwargs)
    again = extract_descriptors(source, ds, tmp_path / "s", tiny_backbone, **kwargs)
    assert again.resumed == 2 and again.computed == 4  # shards 0 and 1 were written; 1 holds an unreadable item
    extract_descriptors(source, ds, tmp_path / "clean", tiny_backbone, **kwargs)
    clean = sorted((tmp_path / "clean/shards").iterdir())
    assert [f.name for f in clean] == sorted(f.name for f in (tmp_path / "s/shards").iterdir())
    for f in clean:
        assert (tmp_path / "s/shards" / f.name).read_bytes() == f.read_bytes()


def test_default_workers_leave_a_core_to_the_main_process(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path)  # no CPU quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_workers() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its cores
    assert default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 0


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
