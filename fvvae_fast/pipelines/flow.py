"""Optical-flow "images", the second stream of paper Table 4 (FV-VAE-pool5 optical flow).

Dense optical flow from each sampled frame to the next frame of the video, rendered as one
3-channel uint8 image per pair that an ImageNet CNN reads like a frame:

- channel 0: the horizontal displacement dx (pixels, + is rightwards), clipped to [-bound, bound]
  and mapped linearly to 0..255 (0 px -> 127.5, rounded to 128);
- channel 1: the vertical displacement dy (+ is downwards), the same;
- channel 2: the magnitude sqrt(dx^2 + dy^2), clipped to [0, bound] and mapped to 0..255.

The clipping bound of 20 px and the linear map to 0..255 are those of the two-stream networks'
flow images: Simonyan & Zisserman, "Two-stream convolutional networks for action recognition in
videos", NIPS 2014, section 3.1 (flow rescaled linearly to [0, 255] and stored as JPEG), and the
``bound = 20`` of the TSN flow extractor (Wang et al., "Temporal segment networks", ECCV 2016,
tool ``dense_flow``). Stacking x, y and the magnitude into one 3-channel image follows Gkioxari &
Malik, "Finding action tubes", CVPR 2015.

Backends: ``"tvl1"`` (OpenCV's Dual TV-L1, the two-stream papers' method; needs an OpenCV built
with it, e.g. opencv-contrib), ``"farneback"`` (OpenCV's Farneback, in every OpenCV), ``"raft_small"``
and ``"raft_large"`` (torchvision's RAFT, only with a local weights file: nothing is downloaded);
``"auto"`` is TV-L1 when the installed OpenCV has it, Farneback otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_open, load_torch_file
from .datasets import Item
from .sources import DEVICE_DECODERS, SourceError, VideoSource, decode_frames, sample_indices

FLOW_BOUND = 20.0
FLOW_METHODS = ("auto", "tvl1", "farneback", "raft_small", "raft_large")
# OpenCV's documented example settings: pyramid scale 0.5, 3 levels, 15 px window, 3 iterations,
# polynomial neighbourhood 5 with sigma 1.2.
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)
RAFT_MIN_SIDE = 128


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("optical flow with OpenCV needs the package opencv-python-headless "
                          "(pip install 'fvvae_fast[pipelines]')") from None
    return cv2


def _tvl1_factory():
    cv2 = _cv2()
    for owner in (getattr(cv2, "optflow", None), cv2):
        if owner is not None and hasattr(owner, "DualTVL1OpticalFlow_create"):
            return owner.DualTVL1OpticalFlow_create
    return None


def resolve_method(method: str) -> str:
    """The backend ``method`` names (``"auto"``: ``"tvl1"`` when available, else ``"farneback"``)."""
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {FLOW_METHODS}, got {method!r}")
    if method == "auto":
        return "tvl1" if _tvl1_factory() is not None else "farneback"
    if method == "tvl1" and _tvl1_factory() is None:
        raise ValueError("method 'tvl1': the installed OpenCV has no DualTVL1OpticalFlow (it is in "
                         "opencv-contrib-python-headless); use 'farneback' or 'auto'")
    return method


def frame_pairs(frames: Tensor | np.ndarray) -> Tensor:
    """Consecutive frames (T+1, 3, H, W) uint8 -> their T pairs (T, 2, 3, H, W); pairs pass unchanged.

    A single frame, or a (3, H, W) image, is refused: optical flow needs two frames of a video.
    """
    x = frames.cpu() if isinstance(frames, Tensor) else torch.as_tensor(np.asarray(frames))
    if x.dtype != torch.uint8:
        raise TypeError(f"frames: expected uint8 RGB frames, got {x.dtype}")
    if x.dim() == 4 and x.shape[1] == 3:
        if x.shape[0] < 2:
            raise ValueError(f"frames: optical flow needs at least two frames of a video (T+1, 3, H, W), got "
                             f"{x.shape[0]} frame: image data has no motion")
        return torch.stack([x[:-1], x[1:]], dim=1)
    if x.dim() == 5 and x.shape[1:3] == (2, 3):
        return x
    raise ValueError(f"frames: expected video frames (T+1, 3, H, W) or frame pairs (T, 2, 3, H, W) uint8, got "
                     f"shape {tuple(x.shape)}{' (a single image)' if x.dim() == 3 else ''}")


def _grey(frame: Tensor) -> np.ndarray:
    cv2 = _cv2()
    return cv2.cvtColor(np.ascontiguousarray(frame.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2GRAY)


def flow_fields(frames: Tensor | np.ndarray, method: str = "auto", raft_weights: str | os.PathLike | None = None,
                ) -> Tensor:
    """Dense optical flow of frames (T+1, 3, H, W) or pairs (T, 2, 3, H, W) uint8 RGB: (T, 2, H, W) float32,
    (dx, dy) in pixels such that the first frame's pixel (y, x) is at (y + dy, x + dx) in the second.

    method: one of ``FLOW_METHODS``; the RAFT methods need ``raft_weights``, a local state-dict file
    for ``torchvision.models.optical_flow.raft_small`` / ``raft_large``.
    """
    pairs = frame_pairs(frames)
    method = resolve_method(method)
    if method.startswith("raft"):
        return _raft(pairs, method, raft_weights)
    if raft_weights is not None:
        raise ValueError(f"raft_weights: only used by the RAFT methods, not by {method!r}")
    cv2 = _cv2()
    out = torch.empty((len(pairs), 2, *pairs.shape[-2:]), dtype=torch.float32)
    tvl1 = _tvl1_factory()() if method == "tvl1" else None
    for t, (a, b) in enumerate(pairs):
        prev, nxt = _grey(a), _grey(b)
        flow = tvl1.calc(prev, nxt, None) if tvl1 is not None else \
            cv2.calcOpticalFlowFarneback(prev, nxt, None, *FARNEBACK_PARAMS)
        out[t] = torch.from_numpy(flow).permute(2, 0, 1)
    return out


@functools.lru_cache(maxsize=2)
def _raft_model(method: str, weights: str, _size: int, _mtime_ns: int) -> torch.nn.Module:
    """The RAFT model of a weights file, loaded once per file version (size and mtime in the key)."""
    from torchvision.models import optical_flow

    model = getattr(optical_flow, method)()
    model.load_state_dict(load_torch_file(weights, f"{method} state_dict file"))
    return model.eval()


def _raft(pairs: Tensor, method: str, weights: str | os.PathLike | None) -> Tensor:
    import torch.nn.functional as F

    if weights is None or not Path(weights).is_file():
        raise ValueError(f"raft_weights: method {method!r} needs a local weights file (nothing is downloaded), "
                         f"got {weights!r}")
    st = Path(weights).stat()
    model = _raft_model(method, str(Path(weights).resolve()), st.st_size, st.st_mtime_ns)
    h, w = pairs.shape[-2:]
    # RAFT works at 1/8 resolution and its correlation pyramid needs maps of at least 16 x 16.
    pad = (0, max(RAFT_MIN_SIDE, w + -w % 8) - w, 0, max(RAFT_MIN_SIDE, h + -h % 8) - h)
    x = F.pad(pairs.flatten(0, 1).float() / 127.5 - 1.0, pad, mode="replicate")  # RAFT's input range [-1, 1]
    x = x.unflatten(0, (len(pairs), 2))
    with torch.inference_mode():
        flow = model(x[:, 0].contiguous(), x[:, 1].contiguous())[-1]
    return flow[..., :h, :w].float().contiguous()


def render_flow(flow: Tensor, bound: float = FLOW_BOUND) -> Tensor:
    """Flow (T, 2, H, W) float (dx, dy in pixels) -> flow images (T, 3, H, W) uint8: dx, dy clipped to
    [-bound, bound] and the magnitude clipped to [0, bound], each mapped linearly to 0..255 (module docstring)."""
    if flow.dim() != 4 or flow.shape[1] != 2 or not flow.is_floating_point():
        raise ValueError(f"flow: expected (T, 2, H, W) float, got {flow.dtype} {tuple(flow.shape)}")
    if not bound > 0:
        raise ValueError(f"bound: expected > 0 pixels, got {bound}")
    if not torch.isfinite(flow).all():
        raise ValueError("flow: holds NaN or Inf")
    flow = flow.double()
    xy = (flow.clamp(-bound, bound) + bound) * (255.0 / (2 * bound))
    magnitude = flow.norm(dim=1, keepdim=True).clamp(max=bound) * (255.0 / bound)
    return torch.cat([xy, magnitude], dim=1).round().to(torch.uint8)


def flow_images(frames: Tensor | np.ndarray, method: str = "auto", *, bound: float = FLOW_BOUND,
                raft_weights: str | os.PathLike | None = None) -> Tensor:
    """Flow images of frames (T+1, 3, H, W) or pairs (T, 2, 3, H, W) uint8 RGB: (T, 3, H, W) uint8
    (:func:`flow_fields` then :func:`render_flow`)."""
    return render_flow(flow_fields(frames, method, raft_weights), bound)


def pair_indices(total: int, count: int) -> list[tuple[int, int]]:
    """For each of the ``count`` frames :func:`.sources.sample_indices` samples from ``total``, the pair
    (i, i + 1); a sample on the last frame pairs with the frame before it, (total - 2, total - 1)."""
    if total < 2:
        raise SourceError(f"optical flow needs a video of at least two frames, got {total}")
    return [(min(i, total - 2), min(i, total - 2) + 1) for i in sample_indices(total, count)]


def decode_frame_pairs(path: str | os.PathLike, num_frames: int, *, decoder: str = "pyav") -> Tensor:
    """The frame pairs of :func:`pair_indices` of a video: (T, 2, 3, H, W) uint8 RGB, T = ``num_frames``
    (decoded by seeking, :func:`.sources.decode_frames`). Raises :class:`.sources.SourceError` for an
    unreadable file or a video of one frame."""
    frames = decode_frames(path, lambda total: [i for pair in pair_indices(total, num_frames) for i in pair],
                           decoder=decoder)
    return frames.reshape(num_frames, 2, *frames.shape[1:])


def _file_key(path: str | os.PathLike) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class FlowCache:
    """Flow images of videos kept as ``.npy`` files under ``root``, written atomically.

    The key holds the video's (and any RAFT weights file's) resolved path, byte size and modification time, the sampling
    (``num_frames``: the pairs are a function of it and the video), the backend and the bound; a
    cached file that does not load as (T, 3, H, W) uint8 is computed again.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, video: str | os.PathLike, num_frames: int, method: str, bound: float = FLOW_BOUND,
             raft_weights: str | os.PathLike | None = None) -> Path:
        """The cache file of these settings (its name: a digest of the key)."""
        key = {"video": _file_key(video), "num_frames": int(num_frames), "method": resolve_method(method),
               "bound": float(bound), "raft_weights": None if raft_weights is None else _file_key(raft_weights)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"{digest}.npy"

    def flow_images(self, video: str | os.PathLike, num_frames: int, method: str = "auto", *,
                    bound: float = FLOW_BOUND, raft_weights: str | os.PathLike | None = None,
                    decoder: str = "pyav") -> Tensor:
        """:func:`flow_images` of :func:`decode_frame_pairs` (``num_frames``, 3, H, W) uint8, from the cache
        when it holds them."""
        if not Path(video).is_file():
            raise SourceError(f"file not found: {video}")
        path = self.path(video, num_frames, method, bound, raft_weights)
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.dtype == np.uint8 and cached.ndim == 4 and cached.shape[:2] == (num_frames, 3):
                return torch.from_numpy(cached)
        except (OSError, ValueError):
            pass
        images = flow_images(decode_frame_pairs(video, num_frames, decoder=decoder), method, bound=bound,
                             raft_weights=raft_weights)
        with atomic_open(path, "wb") as f:
            np.save(f, images.numpy())
        return images


@dataclass
class FlowSource(VideoSource):
    """The optical-flow stream of a video (Table 4): for each of the ``frames`` sampled frames, the
    flow to the next frame rendered as a 3-channel image (:func:`render_flow`: x, y, magnitude clipped at
    ``flow_bound`` pixels), then the same preprocessing, backbone and pooling as the RGB frames.
    ``flow_method``: ``auto`` (TV-L1 when OpenCV has it, else Farneback), ``tvl1``, ``farneback``,
    ``raft_small`` or ``raft_large`` (with a local ``raft_weights`` file); ``flow_cache``: a folder
    where the flow images are kept and reused."""

    flow_method: str = "auto"
    flow_bound: float = FLOW_BOUND
    raft_weights: str | None = None
    flow_cache: str | None = None
    modality = "flow"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder in DEVICE_DECODERS:
            raise ValueError(f"decoder={self.decoder!r} decodes on the GPU; the flow stream's images are computed on "
                             "the CPU in the decoding workers: use decoder='pyav' or 'torchcodec'")
        resolve_method(self.flow_method)
        if not self.flow_bound > 0:
            raise ValueError(f"flow_bound must be > 0, got {self.flow_bound}")
        if self.flow_method.startswith("raft") and self.raft_weights is None:
            raise ValueError(f"flow_method {self.flow_method!r} needs raft_weights (a local weights file)")

    def config(self) -> dict:
        """The settings that make the descriptors (the cache folder is not one of them)."""
        config = {**super().config(), "modality": self.modality}
        del config["flow_cache"]
        return config

    def load(self, item: Item) -> Tensor:
        if self.flow_cache is not None:
            return FlowCache(self.flow_cache).flow_images(item.path, self.frames, self.flow_method,
                                                          bound=self.flow_bound, raft_weights=self.raft_weights,
                                                          decoder=self.decoder)
        pairs = decode_frame_pairs(item.path, self.frames, decoder=self.decoder)
        return flow_images(pairs, self.flow_method, bound=self.flow_bound, raft_weights=self.raft_weights)
