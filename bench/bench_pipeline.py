"""End-to-end videos per second: the descriptor stage (decode 25 frames, backbone, SPP, store)
and the encoding stage (FV-VAE Fisher vectors of each video's 1250 descriptors, store)
measured separately, and the encoding share of the total; the backbone alone on the same
frames; decoding time per video against clip length; host bytes per video handed over by the
decoding workers.

    python -m pytest bench/bench_pipeline.py --benchmark-only -s

Inputs (generated, nothing downloads): ``FVVAE_BENCH_VIDEOS`` videos (default 4) of 320 x 240,
50 frames (UCF101-like), through a random-weight ``FVVAE_BENCH_BACKBONE`` (default
``resnet18`` ``layer4``: C = 512 like VGG-19 pool5; set ``vgg19-pool5`` for the paper's) at
``FVVAE_BENCH_SIZE`` (default 192, the smallest whose ResNet-18 map fills the 6 x 6 grid of the pyramid; 224 is
the paper's) input in ``FVVAE_BENCH_PRECISION``
(fp32, bf16, fp16), compiled with ``torch.compile`` when ``FVVAE_BENCH_COMPILE=1`` (the warm-up
call pays the compilation); FV-VAE with d = 255. Each timed round runs a stage from scratch into a
fresh store (store creation and atomic shard writes included). Decoding: one clip per length
in ``FVVAE_BENCH_CLIP_SECONDS`` (default 10 and 120 s) at 25 frames/s, 320 x 240 MPEG-4 with
the encoder's default keyframe interval (12 frames, as in UCF101); the target is the 2-minute
clip within 1.5x the 10-s one. Warm-up first; median and p20/p80 in the summary.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from common import machine_line, record, run_benchmark

av = pytest.importorskip("av")

from fvvae_fast.model import FVVAE  # noqa: E402
from fvvae_fast.pipelines import (  # noqa: E402
    Dataset,
    Item,
    VideoSource,
    build_backbone,
    decode_video,
    encode_store,
    extract_descriptors,
)
from fvvae_fast.pipelines.extract import default_workers  # noqa: E402
from fvvae_fast.pipelines.sources import DECODERS, check_decoder  # noqa: E402
from fvvae_fast.store import Store  # noqa: E402

VIDEOS = int(os.environ.get("FVVAE_BENCH_VIDEOS", "4"))
BACKBONE = os.environ.get("FVVAE_BENCH_BACKBONE", "resnet18")
LAYER = os.environ.get("FVVAE_BENCH_LAYER", "layer4" if BACKBONE == "resnet18" else "") or None
SIZE = int(os.environ.get("FVVAE_BENCH_SIZE", "192"))
PRECISION = os.environ.get("FVVAE_BENCH_PRECISION", "fp32")
COMPILE = os.environ.get("FVVAE_BENCH_COMPILE", "0") == "1"
CLIP_SECONDS = [int(t) for t in os.environ.get("FVVAE_BENCH_CLIP_SECONDS", "10,120").split(",")]
FRAMES, LATENT, RATE, BATCH_FRAMES = 25, 255, 25, 64
WORKERS = min(default_workers(), VIDEOS)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = f"{VIDEOS} videos x {FRAMES} frames, {BACKBONE} @ {SIZE}px {PRECISION}{' compiled' * COMPILE}"
MEDIANS: dict[str, float] = {}


def _make_video(path: Path, seed: int, frames: int = 50, width: int = 320, height: int = 240) -> None:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="fvvae-bench-") as tmp:
        root = Path(tmp)
        items = []
        for i in range(VIDEOS):
            path = root / "videos" / f"v{i}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            _make_video(path, seed=i)
            items.append(Item(path.name, path, label=i % 2))
        yield root, Dataset("bench", items, ["a", "b"])


@pytest.fixture(scope="module")
def backbone():
    net = build_backbone(BACKBONE, LAYER, random_weights=True, device=DEVICE, precision=PRECISION)
    if COMPILE:
        net.compile()
    return net


def _source() -> VideoSource:
    return VideoSource(frames=FRAMES, size=SIZE, resize=round(SIZE * 256 / 224))


def _backbone_flops(backbone) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone(torch.zeros(1, 3, SIZE, SIZE, device=DEVICE))
    return counter.get_total_flops() * FRAMES * VIDEOS


def test_descriptor_stage(benchmark, workdir, backbone):
    root, dataset = workdir
    source = _source()

    def run():
        return extract_descriptors(source, dataset, root / "desc", backbone, batch_frames=BATCH_FRAMES,
                                   workers=WORKERS, device=DEVICE, overwrite=True, progress=False)

    run_benchmark(benchmark, run, DEVICE, rounds=3, warmup=1)
    record(benchmark, op="pipeline", method="descriptors", shape=SHAPE, dtype=torch.float32,
           flops=_backbone_flops(backbone), nbytes=VIDEOS * FRAMES * 50 * backbone.output_shape(SIZE, SIZE)[0] * 4)
    _keep_median(benchmark, "descriptors")
    host = source.load(dataset.items[0]).nbytes
    benchmark.extra_info["host_bytes_per_video"] = host
    print(f"\nhost bytes per video from the decoding workers: {host / 1e6:.2f} MB (uint8 frames; "
          f"{FRAMES * 3 * SIZE * SIZE * 4 / 1e6:.2f} MB as preprocessed float32)")
    _print_backbone_share()


def test_backbone_only(benchmark, workdir, backbone):
    """The backbone and pooling alone on the same preprocessed frames, already on the device, in the
    descriptor stage's batches: the ceiling of the descriptor stage's videos/s."""
    _, dataset = workdir
    source = _source()
    frames = torch.cat([source.prepare(source.load(it).to(DEVICE)) for it in dataset.items])

    def run():
        with torch.inference_mode():
            return [source.descriptors(backbone(frames[i : i + BATCH_FRAMES]))
                    for i in range(0, len(frames), BATCH_FRAMES)]

    run_benchmark(benchmark, run, DEVICE, rounds=5, warmup=1)
    record(benchmark, op="pipeline", method="backbone-only", shape=SHAPE, dtype=torch.float32,
           flops=_backbone_flops(backbone), nbytes=frames.numel() * frames.element_size())
    _keep_median(benchmark, "backbone")
    _print_backbone_share()


@pytest.fixture(scope="module")
def clips():
    with tempfile.TemporaryDirectory(prefix="fvvae-bench-clips-") as tmp:
        paths = {}
        for seconds in CLIP_SECONDS:
            paths[seconds] = Path(tmp) / f"clip-{seconds}s.avi"
            _make_video(paths[seconds], seed=seconds, frames=seconds * RATE)
        yield paths


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("seconds", CLIP_SECONDS)
def test_decode_per_video(benchmark, clips, seconds, decoder):
    """25 frames sampled from one clip (the worker's whole job per video), by clip length and decoder
    (torchcodec when installed with FFmpeg's libraries: ``make test``'s LD_LIBRARY_PATH)."""
    try:
        check_decoder(decoder)
    except ImportError as err:
        pytest.skip(str(err))
    run_benchmark(benchmark, lambda: decode_video(clips[seconds], FRAMES, decoder=decoder), torch.device("cpu"),
                  rounds=10, warmup=2)
    record(benchmark, op="decode", method=f"{decoder}-seek",
           shape=f"{seconds}-s clip, 320x240 MPEG-4, {FRAMES} frames", dtype=torch.uint8, flops=0,
           nbytes=clips[seconds].stat().st_size)
    _keep_median(benchmark, f"decode-{decoder}-{seconds}", videos=1)
    short, long = f"decode-{decoder}-{min(CLIP_SECONDS)}", f"decode-{decoder}-{max(CLIP_SECONDS)}"
    if short in MEDIANS and long in MEDIANS and short != long:
        print(f"\n{decoder} decode per video: {max(CLIP_SECONDS)}-s clip {1e3 * MEDIANS[long]:.1f} ms, "
              f"{min(CLIP_SECONDS)}-s clip {1e3 * MEDIANS[short]:.1f} ms: "
              f"ratio {MEDIANS[long] / MEDIANS[short]:.2f} (target <= 1.5)")


def test_encoding_stage(benchmark, workdir, backbone):
    root, dataset = workdir
    if not (root / "desc" / "manifest.sqlite").is_file():
        extract_descriptors(_source(), dataset, root / "desc", backbone, workers=WORKERS, device=DEVICE,
                            progress=False)
    src = Store.open(root / "desc")
    c = src.dim
    torch.manual_seed(0)
    model = FVVAE(in_dim=c, latent_dim=LATENT).to(DEVICE).eval()

    def run():
        return encode_store(model, src, root / "fisher", device=DEVICE, overwrite=True, progress=False)

    run_benchmark(benchmark, run, DEVICE, rounds=5, warmup=1)
    n = src.summary().rows
    flops = 2 * n * c * c + 2 * n * c * LATENT + 2 * n * c * LATENT + 2 * n * c * (LATENT + 1)  # encoder, decoder, G
    record(benchmark, op="pipeline", method="encode", shape=SHAPE, dtype=torch.float32, flops=flops,
           nbytes=4 * n * c + 4 * VIDEOS * c * (LATENT + 1))
    _keep_median(benchmark, "encode")
    _print_share()


def _print_share() -> None:
    """videos/s of each stage and the encoding share of descriptors + encoding (needs both stages)."""
    if set(MEDIANS) != {"descriptors", "encode"}:
        return
    d, e = MEDIANS["descriptors"], MEDIANS["encode"]
    print(f"\n{machine_line()}\n{SHAPE}, {WORKERS} decode workers, device {DEVICE}\n"
          f"descriptor stage: {VIDEOS / d:.2f} videos/s; encoding stage: {VIDEOS / e:.2f} videos/s; "
          f"end to end: {VIDEOS / (d + e):.2f} videos/s; encoding share: {100 * e / (d + e):.1f}%")



def _keep_median(benchmark, key: str, videos: int = VIDEOS) -> None:
    """Keep the median (and videos/s) for the printed comparisons; nothing when timing is disabled."""
    if not benchmark.disabled:
        MEDIANS[key] = benchmark.stats.stats.median
        benchmark.extra_info["videos_per_s"] = videos / MEDIANS[key]


def _print_backbone_share() -> None:
    """videos/s of the descriptor stage against the backbone alone on the same frames (needs both)."""
    if not {"descriptors", "backbone"} <= set(MEDIANS):
        return
    d, b = MEDIANS["descriptors"], MEDIANS["backbone"]
    print(f"\n{SHAPE}, {WORKERS} decode workers, device {DEVICE}: descriptor stage {VIDEOS / d:.2f} videos/s, "
          f"backbone alone {VIDEOS / b:.2f} videos/s ({100 * b / d:.0f}% of the stage's time)")
