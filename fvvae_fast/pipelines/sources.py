"""Descriptor sources: what one item (a video, an image, a precomputed array) becomes.

A source's :meth:`load` runs in DataLoader workers and returns either preprocessed frames
(T, 3, H, W) float32 for the backbone (video: T sampled frames; image: T = 1) or, for
precomputed descriptors, the set itself (n, C). :meth:`descriptors` turns the backbone's
maps of a batch of frames into descriptors: spatial pyramid pooling (video) or every
position of the map (image), after the release's whole-map normalisation when
``map_scale`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..model import normalize_map
from ..official import RELEASE_CROP, RELEASE_RESIZE, center_crop, release_preprocess
from ..ops.validate import check_offsets
from ..spp import PAPER_LEVELS, dense_descriptors, spp, spp_size
from .datasets import Item

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = ("torchvision", "release")


class SourceError(ValueError):
    """An item that cannot be read (corrupt, truncated, missing): the item is skipped and logged."""


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames: the centre of each of
    ``count`` equal segments, floor((k + 1/2) total / count). Repeats when total < count."""
    if total < 1:
        raise SourceError("the video has no frame")
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]


def _decode_selected(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    import av

    frames: dict[int, np.ndarray] = {}
    count = 0
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise SourceError("no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if count in wanted:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
    return frames, count


def decode_video(path: str | os.PathLike, num_frames: int) -> Tensor:
    """Decode ``num_frames`` frames sampled uniformly over the whole video (:func:`sample_indices`):
    (T, 3, H, W) uint8 RGB.

    The frame count comes from the container; when decoding finds another count (missing
    or wrong metadata, a truncated file) the video is decoded again with the true count, so
    the samples always span the frames that actually decode. Decoding is sequential (no
    seeking), exact and deterministic. Raises :class:`SourceError` or PyAV's errors for an
    unreadable file.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"file not found: {path}")
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise SourceError("no video stream")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        if total <= 0 and stream.average_rate:  # no frame count in the container: estimate from the duration
            if stream.duration and stream.time_base:
                total = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
            elif container.duration:
                total = int(round(container.duration / 1e6 * float(stream.average_rate)))
    total = max(total, 1)
    idx = sample_indices(total, num_frames)
    frames, count = _decode_selected(path, set(idx))
    if count == 0:
        raise SourceError("no frame could be decoded")
    if count != total:
        idx = sample_indices(count, num_frames)
        frames, count2 = _decode_selected(path, set(idx))
        if count2 != count or any(i not in frames for i in idx):
            raise SourceError(f"decoding is not repeatable ({count} then {count2} frames)")
    return torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).contiguous()


def torchvision_preprocess(frames: Tensor, resize: int | Sequence[int] | None, crop: int | None) -> Tensor:
    """torchvision's ImageNet evaluation transform on uint8 RGB (T, 3, H, W) -> float32 (T, 3, h, w):
    resize (an int: the shorter side; (h, w): exactly), centre crop, /255, ImageNet mean/std."""
    from torchvision.transforms.v2 import functional as TF

    if resize is not None:
        size = [resize] if isinstance(resize, int) else list(resize)
        frames = TF.resize(frames, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if crop is not None:
        frames = center_crop(frames, crop)
    x = frames.to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class FrameSource:
    """Shared settings of the video and image sources.

    preprocess: ``"torchvision"`` (RGB, ImageNet mean/std; for torchvision weights) or
        ``"release"`` (BGR, 0-255 minus the Caffe mean; for VGG-19 converted from Caffe).
    map_scale: None, or the release's whole-map L2 normalisation x scale (158) before pooling
        (for a model with ``norm="map"``).
    """

    preprocess: str = "torchvision"
    map_scale: float | None = None

    kind = "frames"

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if self.map_scale is not None and not self.map_scale > 0:
            raise ValueError(f"map_scale must be > 0, got {self.map_scale}")

    def config(self) -> dict:
        return {"source": self.kind, **asdict(self)}

    def pool(self, maps: Tensor) -> Tensor:
        raise NotImplementedError

    def descriptors(self, maps: Tensor) -> Tensor:
        """maps (B, C, h, w) of B frames -> (B, K, C) descriptors."""
        if self.map_scale is not None:
            maps = normalize_map(maps, self.map_scale)
        return self.pool(maps)


@dataclass
class VideoSource(FrameSource):
    """A video: ``frames`` (25) frames sampled uniformly over the whole clip, each through the
    backbone, spatial pyramid max pooling (``levels``, 6x6 3x3 2x2 1x1 = 50 descriptors per
    frame) of its map: one set of frames x 50 descriptors per video (paper section 4, 5.2).

    torchvision preprocessing: shorter side to ``resize`` (256), centre crop ``size`` (224).
    Release preprocessing: resize to exactly 240 x 320, centre crop 224 (``size``/``resize`` unused).
    """

    frames: int = 25
    size: int = 224
    resize: int = 256
    levels: tuple[int, ...] = PAPER_LEVELS

    kind = "video"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.levels = tuple(int(n) for n in self.levels)
        if self.frames < 1 or self.size < 1 or self.resize < self.size:
            raise ValueError(f"video source: need frames >= 1 and resize >= size >= 1, got frames={self.frames}, "
                             f"size={self.size}, resize={self.resize}")

    @property
    def input_size(self) -> tuple[int, int]:
        return (RELEASE_CROP, RELEASE_CROP) if self.preprocess == "release" else (self.size, self.size)

    def descriptors_per_frame(self, map_hw: tuple[int, int] | None = None) -> int:
        return spp_size(self.levels)

    def load(self, item: Item) -> Tensor:
        frames = decode_video(item.path, self.frames)
        if self.preprocess == "release":
            return release_preprocess(frames, RELEASE_RESIZE, RELEASE_CROP)
        return torchvision_preprocess(frames, self.resize, self.size)

    def pool(self, maps: Tensor) -> Tensor:
        return spp(maps, self.levels)


@dataclass
class ImageSource(FrameSource):
    """An image resized to ``size`` x ``size`` (448; aspect ratio not kept, as in the paper) and
    every position of the backbone's map as a descriptor (VGG-19 conv5_4+ReLU: 28 x 28 = 784
    of 512). ``use_box``: crop to the item's bounding box first (CUB "+box")."""

    size: int = 448
    use_box: bool = False

    kind = "image"

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    def descriptors_per_frame(self, map_hw: tuple[int, int]) -> int:
        return map_hw[0] * map_hw[1]

    def load(self, item: Item) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        if not Path(item.path).is_file():
            raise SourceError(f"file not found: {item.path}")
        try:
            with Image.open(item.path) as im:
                im = im.convert("RGB")
                if self.use_box:
                    if item.box is None:
                        raise SourceError("no bounding box for this image (use_box needs bounding_boxes.txt)")
                    x, y, w, h = item.box
                    im = im.crop((round(x), round(y), round(x + w), round(y + h)))
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            raise SourceError(f"cannot read image: {err}") from None
        frames = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)
        if self.preprocess == "release":
            return release_preprocess(frames, (self.size, self.size), None)
        return torchvision_preprocess(frames, (self.size, self.size), None)

    def pool(self, maps: Tensor) -> Tensor:
        return dense_descriptors(maps)


@dataclass
class PrecomputedSource:
    """Descriptors already computed: each item's file is a ``.npy`` array (n, C) (one set), or
    with ``arrays`` = (x (N, C), offsets (S+1,)) item i is rows offsets[i]:offsets[i+1] of x."""

    arrays: tuple[np.ndarray, np.ndarray] | None = None

    kind = "precomputed"

    def config(self) -> dict:
        return {"source": self.kind}

    def load(self, item: Item) -> Tensor:
        if self.arrays is not None:
            x, offsets = self.arrays
            i = int(item.id.rsplit("-", 1)[-1])  # ids set-000000, ... from array_items
            return torch.from_numpy(np.array(x[offsets[i] : offsets[i + 1]], dtype=np.float32))
        path = Path(item.path)
        if not path.is_file():
            raise SourceError(f"file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SourceError(f"cannot read {path.name}: {err}") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise SourceError(f"{path.name}: expected an (n, C) float array, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def dim(self, items: Sequence[Item]) -> int:
        """C, from the arrays or the first readable item file (header only)."""
        if self.arrays is not None:
            return int(self.arrays[0].shape[1])
        for it in items:
            try:
                arr = np.load(it.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):
                continue
            if arr.ndim == 2:
                return int(arr.shape[1])
        raise ValueError("precomputed source: no readable (n, C) .npy item to take C from")


def array_items(x: np.ndarray, offsets: np.ndarray, labels: Sequence[int] | None = None,
                splits: Sequence[str] | None = None) -> list[Item]:
    """Items for :class:`PrecomputedSource` with ``arrays=(x, offsets)``: ids ``set-000000``, ..."""
    offsets = np.asarray(offsets, dtype=np.int64)
    check_offsets(torch.from_numpy(offsets), x.shape[0], "array_items")
    s = len(offsets) - 1
    if labels is not None and len(labels) != s:
        raise ValueError(f"labels must have S={s} entries, got {len(labels)}")
    if splits is not None and len(splits) != s:
        raise ValueError(f"splits must have S={s} entries, got {len(splits)}")
    return [Item(id=f"set-{i:06d}", path=Path(f"set-{i:06d}"), label=int(labels[i]) if labels is not None else -1,
                 split=splits[i] if splits is not None else "") for i in range(s)]
