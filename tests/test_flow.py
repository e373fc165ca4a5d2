"""Optical-flow images: known translations of a random texture, the rendering's clipping and scale,
frame-pair sampling and decoding, the cache, and refusals of image data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cv2")
av = pytest.importorskip("av")

from fvvae_fast.pipelines import flow as flow_mod  # noqa: E402
from fvvae_fast.pipelines.flow import (  # noqa: E402
    FLOW_BOUND,
    FlowCache,
    decode_frame_pairs,
    flow_fields,
    flow_images,
    frame_pairs,
    pair_indices,
    render_flow,
    resolve_method,
)
from fvvae_fast.pipelines.sources import SourceError, sample_indices  # noqa: E402

from .cases import generator  # noqa: E402
from .test_pipelines import make_video  # noqa: E402

OPENCV_METHODS = ["farneback", pytest.param("tvl1", marks=pytest.mark.skipif(
    flow_mod._tvl1_factory() is None, reason="this OpenCV has no TV-L1"))]


def texture(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A smooth random RGB texture (3, h, w) uint8 that wraps around (so a roll is a pure translation)."""
    noise = torch.rand(1, 3, h, w, generator=g, dtype=torch.float64)
    k = torch.exp(-torch.arange(-6, 7, dtype=torch.float64) ** 2 / 8)
    k = (k / k.sum()).expand(3, 1, -1)
    x = F.conv2d(F.pad(noise, (6, 6, 0, 0), mode="circular"), k[..., None, :], groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 6, 6), mode="circular"), k[..., :, None], groups=3)[0]
    return ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)


def expected_pixel(v: float, lo: float, hi: float) -> float:
    return (min(max(v, lo), hi) - lo) / (hi - lo) * 255


@pytest.mark.parametrize("method", OPENCV_METHODS)
@pytest.mark.parametrize("salt", range(4))
def test_translation_points_the_right_way(method, salt):
    g = generator(100 + salt)
    h, w = (int(v) for v in torch.randint(70, 110, (2,), generator=g))
    # |d| <= 4 px: Farneback with OpenCV's example settings loses diagonal shifts of 6 px (4 of 150 draws)
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
    a = texture(g, h, w)
    b = torch.roll(a, (dy, dx), (-2, -1))  # content moves by dx rightwards, dy downwards
    flow = flow_fields(torch.stack([a, b]), method)
    assert flow.shape == (1, 2, h, w) and flow.dtype == torch.float32
    inner = (slice(None), slice(16, -16), slice(16, -16))  # away from the wrapped border
    assert flow[0][inner][0].median().item() == pytest.approx(dx, abs=0.1)
    assert flow[0][inner][1].median().item() == pytest.approx(dy, abs=0.1)
    img = flow_images(torch.stack([a, b]), method)[0][inner].double()
    want = (expected_pixel(dx, -FLOW_BOUND, FLOW_BOUND), expected_pixel(dy, -FLOW_BOUND, FLOW_BOUND),
            expected_pixel(float(np.hypot(dx, dy)), 0, FLOW_BOUND))
    for channel, value in zip(img, want):
        assert abs(channel.median().item() - value) <= 1.5


def test_render_flow_clips_and_scales():
    g = generator(7)
    t, h, w = 3, 5, 7
    flow = (torch.rand(t, 2, h, w, generator=g, dtype=torch.float64) - 0.5) * 4 * FLOW_BOUND
    flow[0, :, 0, 0] = torch.tensor([0.0, 0.0])
    flow[0, :, 0, 1] = torch.tensor([FLOW_BOUND, -FLOW_BOUND])
    flow[0, :, 0, 2] = torch.tensor([3.0, 4.0])
    img = render_flow(flow.float())
    assert img.shape == (t, 3, h, w) and img.dtype == torch.uint8
    f = flow.numpy()
    want = np.stack([np.clip(f[:, 0], -FLOW_BOUND, FLOW_BOUND), np.clip(f[:, 1], -FLOW_BOUND, FLOW_BOUND)], 1)
    want = (want + FLOW_BOUND) / (2 * FLOW_BOUND) * 255
    mag = np.minimum(np.hypot(f[:, 0], f[:, 1]), FLOW_BOUND) / FLOW_BOUND * 255
    want = np.concatenate([want, mag[:, None]], 1)
    assert np.abs(img.numpy().astype(np.float64) - want).max() <= 0.5 + 1e-4
    assert img[0, :, 0, 1].tolist() == [255, 0, 255]
    assert img[0, 2, 0, 0] == 0 and img[0, 2, 0, 2] == round(5 / FLOW_BOUND * 255)
    with pytest.raises(ValueError, match="bound"):
        render_flow(flow.float(), bound=0)
    with pytest.raises(ValueError, match="NaN"):
        render_flow(torch.full((1, 2, 2, 2), float("nan")))


def test_image_data_is_refused():
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least two frames.*image data"):
        flow_images(img[None], "farneback")
    with pytest.raises(ValueError, match="single image"):
        flow_images(img, "farneback")
    with pytest.raises(TypeError, match="uint8"):
        flow_images(torch.zeros(2, 3, 16, 16), "farneback")
    with pytest.raises(ValueError, match="method must be one of"):
        flow_images(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "lucas-kanade")


def test_frame_pairs_of_consecutive_frames_and_pairs():
    g = generator(11)
    frames = torch.randint(0, 256, (5, 3, 4, 6), generator=g, dtype=torch.uint8)
    pairs = frame_pairs(frames)
    assert pairs.shape == (4, 2, 3, 4, 6)
    for t in range(4):
        assert torch.equal(pairs[t, 0], frames[t]) and torch.equal(pairs[t, 1], frames[t + 1])
    assert frame_pairs(pairs) is pairs
    assert torch.equal(frame_pairs(frames.numpy()), pairs)


def test_pair_indices():
    g = generator(12)
    for _ in range(20):
        total, count = (int(v) for v in torch.randint(2, 60, (2,), generator=g))
        pairs = pair_indices(total, count)
        assert len(pairs) == count
        for (a, b), i in zip(pairs, sample_indices(total, count)):
            assert b == a + 1 and 0 <= a and b < total and a == min(i, total - 2)
    assert pair_indices(2, 3) == [(0, 1)] * 3
    with pytest.raises(SourceError, match="two frames"):
        pair_indices(1, 4)


def _all_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_decode_frame_pairs(tmp_path):
    video = make_video(tmp_path / "v.mp4", frames=11)
    every = _all_frames(video)
    pairs = decode_frame_pairs(video, 4)
    assert pairs.shape == (4, 2, 3, 48, 64) and pairs.dtype == torch.uint8
    for t, (a, b) in enumerate(pair_indices(len(every), 4)):
        assert np.array_equal(pairs[t, 0].permute(1, 2, 0).numpy(), every[a])
        assert np.array_equal(pairs[t, 1].permute(1, 2, 0).numpy(), every[b])
    with pytest.raises(SourceError, match="two frames"):
        decode_frame_pairs(make_video(tmp_path / "one.mp4", frames=1), 2)
    with pytest.raises(SourceError, match="not found"):
        decode_frame_pairs(tmp_path / "missing.mp4", 2)


def test_flow_cache(tmp_path, monkeypatch):
    video = make_video(tmp_path / "v.mp4", frames=9)
    cache = FlowCache(tmp_path / "cache")
    first = cache.flow_images(video, 3, "farneback")
    assert first.shape == (3, 3, 48, 64) and first.dtype == torch.uint8
    assert torch.equal(first, flow_images(decode_frame_pairs(video, 3), "farneback"))
    path = cache.path(video, 3, "farneback")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

    def no_compute(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(flow_mod, "flow_images", no_compute)
    assert torch.equal(cache.flow_images(video, 3, "farneback"), first)
    assert cache.path(video, 4, "farneback") != path
    assert cache.path(video, 3, "farneback", bound=10.0) != path
    st = os.stat(video)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.path(video, 3, "farneback") != path
    monkeypatch.undo()
    path.write_bytes(b"not an array")
    assert torch.equal(FlowCache(tmp_path / "cache").flow_images(video, 3, "farneback"), first)


def test_resolve_method():
    want = "tvl1" if flow_mod._tvl1_factory() is not None else "farneback"
    assert resolve_method("auto") == want
    if want == "farneback":
        with pytest.raises(ValueError, match="DualTVL1"):
            resolve_method("tvl1")


def test_raft_needs_a_local_weights_file(tmp_path):
    from torchvision.models.optical_flow import raft_small

    g = generator(13)
    frames = torch.randint(0, 256, (3, 3, 20, 27), generator=g, dtype=torch.uint8)
    with pytest.raises(ValueError, match="raft_weights.*local weights file"):
        flow_fields(frames, "raft_small")
    with pytest.raises(ValueError, match="raft_weights.*local weights file"):
        flow_fields(frames, "raft_small", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="raft_weights: only used"):
        flow_fields(frames, "farneback", tmp_path / "missing.pth")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small().state_dict(), weights)  # random weights: the shapes and the plumbing only
    flow = flow_fields(frames, "raft_small", weights)
    assert flow.shape == (2, 2, 20, 27) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
