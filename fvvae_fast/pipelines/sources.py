"""Descriptor sources: what one item (a video, an image, a precomputed array) becomes.

A source's :meth:`load` runs in DataLoader workers and returns either decoded frames
(T, 3, H, W) uint8 RGB (video: T sampled frames; image: T = 1) or, for precomputed
descriptors, the set itself (n, C). A frame source's :meth:`prepare` then resizes, crops and
normalises them for the backbone in the main process, on the backbone's device, and
:meth:`descriptors` turns the backbone's maps of a batch of frames into descriptors: spatial
pyramid pooling (video) or every position of the map (image), after the release's whole-map
normalisation when ``map_scale`` is set.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..model import normalize_map
from ..official import RELEASE_CROP, RELEASE_RESIZE, release_preprocess
from ..ops.validate import check_offsets
from ..spp import PAPER_LEVELS, check_pyramid, dense_descriptors, spp
from .datasets import Item

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
PREPROCESS = ("torchvision", "release")
DECODERS = ("pyav", "torchcodec", "torchcodec-cuda")
# decoders that return frames on the GPU: they run in the main process (CUDA is not for worker processes)
DEVICE_DECODERS = ("torchcodec-cuda",)


class SourceError(UserError, ValueError):
    """An item that cannot be read (corrupt, truncated, missing): the item is skipped and logged."""


class DecoderUnavailable(UserError, ImportError):
    """The chosen video decoder's package or libraries are missing."""


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``total`` frames: the centre of each of
    ``count`` equal segments, floor((k + 1/2) total / count). Repeats when total < count."""
    if total < 1:
        raise SourceError("the video has no frame")
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]


def check_decoder(decoder: str) -> None:
    """Raise ValueError for an unknown ``decoder`` name, :class:`DecoderUnavailable` (an ImportError) when
    its library is missing."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder.startswith("torchcodec"):
        _torchcodec_decoder()
    if decoder in DEVICE_DECODERS and not torch.cuda.is_available():
        raise DecoderUnavailable(f"decoder={decoder!r} decodes on the GPU (NVDEC) and needs CUDA, which this "
                                 "machine lacks; use decoder='torchcodec' or 'pyav'")


def _torchcodec_decoder():
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as err:  # not installed, or an old one whose import loads FFmpeg
        raise DecoderUnavailable(f"decoder='torchcodec' needs the torchcodec package and FFmpeg's shared libraries "
                          f"({type(err).__name__}: {err}); use decoder='pyav'") from None
    # torchcodec imports without FFmpeg and fails on the first video: say so once, here
    if getattr(torchcodec, "ffmpeg_major_version", 0) is None:
        raise DecoderUnavailable("decoder='torchcodec' needs FFmpeg's shared libraries (libavutil, libavcodec, ... of "
                          "FFmpeg 4 to 9, on the loader's path), which torchcodec could not load; use decoder='pyav'")
    return VideoDecoder


def _rgb(frames: list[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _video_stream(container):
    if not container.streams.video:
        raise SourceError("no video stream")
    stream = container.streams.video[0]
    # threaded decoding with as many threads as torch has here: one in a DataLoader worker, where
    # the workers are the parallelism (frame threads would also decode ahead of each sought frame)
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = torch.get_num_threads()
    return stream


def _packet_index(container, stream) -> tuple[int, list[int] | None, list[tuple[int, int]]]:
    """(frame count, sorted presentation timestamps or None, sorted (pts, dts) of the keyframes)
    from the stream's packets: demuxed, nothing decoded. None when the packets carry no
    usable (present, distinct) timestamps."""
    stamps: list[int | None] = []
    keys: list[tuple[int, int]] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final empty packet
            continue
        t = packet.pts if packet.pts is not None else packet.dts
        stamps.append(t)
        if packet.is_keyframe and t is not None:
            keys.append((t, packet.dts if packet.dts is not None else t))
    if None in stamps or len(set(stamps)) != len(stamps):
        return len(stamps), None, []
    return len(stamps), sorted(stamps), sorted(keys)


class _Unindexed(Exception):
    """The decoder's frames do not match the packet index: decode in order instead."""


def _seek_decode(container, stream, pts: list[int], keys: list[tuple[int, int]],
                 targets: list[int]) -> dict[int, np.ndarray]:
    """Frames at the presentation timestamps ``targets`` (sorted): seek to the keyframe at or
    before a target unless decoding on from the current frame is no longer, then decode forward."""
    out: dict[int, np.ndarray] = {}
    frames = None
    last: int | None = None
    for t in targets:
        k = bisect.bisect_right(keys, (t, math.inf))
        if k == 0:  # no keyframe before the target
            raise _Unindexed
        key, key_dts = keys[k - 1]
        if frames is None or last is None or key > last:
            # demuxers index keyframes by decoding time (<= pts): seeking back to the key's dts lands on it
            container.seek(key_dts, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            last = frame.pts
            if last is None:
                raise _Unindexed
            if last >= t:
                break
        if last != t:
            raise _Unindexed
        out[t] = frame.to_ndarray(format="rgb24")
    return out


def _decode_in_order(path: Path, count: int, idx: list[int]) -> list[np.ndarray]:
    import av

    wanted, out = set(idx), {}
    with av.open(os.fspath(path)) as container:
        stream = _video_stream(container)
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                out[k] = frame.to_ndarray(format="rgb24")
            if k >= max(wanted):
                break
    if len(out) != len(wanted):
        raise SourceError(f"only {len(out)} of the {len(wanted)} sampled frames decode ({count} packets)")
    return [out[i] for i in idx]


def _decode_pyav(path: Path, pick: Callable[[int], list[int]]) -> Tensor:
    import av

    with av.open(os.fspath(path)) as container:
        stream = _video_stream(container)
        count, pts, keys = _packet_index(container, stream)
        idx = pick(count)
        if pts is not None:
            try:
                got = _seek_decode(container, stream, pts, keys, sorted({pts[i] for i in idx}))
                return _rgb([got[pts[i]] for i in idx])
            except _Unindexed:
                pass
    return _rgb(_decode_in_order(path, count, idx))


def _decode_torchcodec(path: Path, pick: Callable[[int], list[int]], device: torch.device | None = None) -> Tensor:
    """torchcodec's frames when they are the packet index's (PyAV's) frames, else PyAV's decode.

    torchcodec trusts the container's keyframe flags: an MPEG-4 AVI with B-frames that flags P-frames
    as keys gets frames 2-3 positions late from its exact seek, or an error on the last one. The
    presentation times it returns show this, so they are checked against the packets (demuxed, not
    decoded) and such a file is decoded by PyAV instead. ``device``: a CUDA device decodes there (NVDEC)
    and the frames stay on it (PyAV's, when it takes over, are on the CPU)."""
    import av

    try:
        decoder = _torchcodec_decoder()(os.fspath(path), seek_mode="exact", dimension_order="NCHW", device=device)
        idx = pick(len(decoder))
        batch = decoder.get_frames_at(indices=idx)
    except RuntimeError:
        return _decode_pyav(path, pick)
    with av.open(os.fspath(path)) as container:
        stream = _video_stream(container)
        count, pts, _ = _packet_index(container, stream)
        expected = None if pts is None or count != len(decoder) else [float(pts[i] * stream.time_base) for i in idx]
    if expected is None or any(abs(a - b) > 1e-6 for a, b in zip(batch.pts_seconds.tolist(), expected)):
        return _decode_pyav(path, pick)
    return batch.data.contiguous()


def decode_frames(path: str | os.PathLike, pick: Callable[[int], list[int]], *, decoder: str = "pyav") -> Tensor:
    """The frames ``pick(frame count)`` of a video, in that order (repeats allowed): (T, 3, H, W) uint8 RGB,
    decoded as :func:`decode_video` describes."""
    check_decoder(decoder)
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"file not found: {path}")
    if decoder == "pyav":
        return _decode_pyav(path, pick)
    device = torch.device("cuda", torch.cuda.current_device()) if decoder in DEVICE_DECODERS else None
    return _decode_torchcodec(path, pick, device)


def decode_video(path: str | os.PathLike, num_frames: int, *, decoder: str = "pyav") -> Tensor:
    """Decode ``num_frames`` frames sampled uniformly over the whole video (:func:`sample_indices`):
    (T, 3, H, W) uint8 RGB.

    The frames are counted and placed in presentation order from the video stream's packets
    (demuxed, not decoded), so a container's missing or wrong frame count, variable frame
    rate or a longer audio stream change nothing. ``decoder="pyav"`` then seeks to the
    keyframe at or before each sampled frame (or decodes on when that is no longer) and
    decodes forward to it: the frames decoded grow with the number of samples and the
    keyframe interval, not with the clip (only the demuxing pass, which reads packets
    without decoding them, does). A stream whose packets carry no timestamps, or whose
    decoded frames do not match them, is decoded once in order instead. ``"torchcodec"``
    (optional package, with FFmpeg's shared libraries) does the same with torchcodec's exact seek
    mode, its presentation times checked against the packets (PyAV decodes a file where they
    differ). Exact and deterministic. ``"torchcodec-cuda"``: torchcodec on the current CUDA device's
    video decoder (NVDEC), the frames returned on that device (the GPU's colour conversion may differ
    from FFmpeg's by a few grey levels). Raises :class:`SourceError` or the decoder's errors for an
    unreadable file.
    """
    if num_frames < 1:
        raise ValueError(f"decode_video: num_frames must be >= 1, got {num_frames}")
    return decode_frames(path, lambda total: sample_indices(total, num_frames), decoder=decoder)


@dataclass(frozen=True)
class Transform:
    """A backbone's evaluation preprocessing, as torchvision's ``weights.transforms()`` or timm's data
    config describe it: shorter side to ``resize``, centre crop ``crop``, /255, ``mean``/``std`` per RGB
    channel; ``origin`` says where it was read (for messages)."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    origin: str = "the ImageNet default"

    def __post_init__(self) -> None:
        check_normalisation(self.interpolation, self.mean, self.std)


def check_normalisation(interpolation: str, mean: Sequence[float], std: Sequence[float]) -> None:
    """ValueError unless ``interpolation`` is one of INTERPOLATIONS and mean, std are 3 finite numbers, std > 0."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
            positive = ", > 0" if name == "std" else ""
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel){positive}, got {values!r}")


def frame_settings(transform: Transform, kind: str, size: int | None, resize: int | None,
                   image_size: int) -> tuple[dict, str | None]:
    """The preprocessing keywords of a :class:`VideoSource` (``kind="video"``) or :class:`ImageSource` made
    from a backbone's ``transform``, and a notice when ``size`` overrides its crop (else None).

    Video: crop ``size`` (default the transform's), shorter side ``resize`` (default the transform's,
    scaled by size / crop when ``size`` overrides the crop). Image: the whole image to ``size`` x ``size``
    (default ``image_size``). Both take the transform's interpolation, mean and std."""
    common = {"interpolation": transform.interpolation, "mean": tuple(transform.mean), "std": tuple(transform.std)}
    if kind != "video":
        return {**common, "size": size or image_size}, None
    crop = size or transform.crop
    resize = resize or (transform.resize if crop == transform.crop else round(crop * transform.resize / transform.crop))
    notice = None
    if crop != transform.crop:
        notice = (f"notice: --size {crop} overrides the crop {transform.crop} of {transform.origin} (shorter side "
                  f"{transform.resize}, crop {transform.crop}): shorter side {resize}, crop {crop}")
    return {**common, "size": crop, "resize": resize}, notice


def torchvision_preprocess(frames: Tensor, resize: int | Sequence[int] | None, crop: int | None, *,
                           interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """torchvision's ImageNet evaluation transform (``weights.transforms()``) on uint8 RGB
    (T, 3, H, W) -> float32 (T, 3, h, w), on the frames' device: antialiased ``interpolation``
    (bilinear or bicubic) resize (an int: the shorter side; (h, w): exactly) clamped and rounded to
    whole grey levels, torchvision's centre crop, /255, ``mean``/``std`` (ImageNet's by default)."""
    from torchvision.transforms.v2 import functional as TF

    x = frames.to(torch.float32)
    if resize is not None:
        size = [resize] if isinstance(resize, int) else list(resize)
        # in float then clamped (bicubic overshoots) and rounded, as torchvision's transforms resize uint8
        # tensors (its uint8 CPU kernel rounds differently, by up to one grey level)
        mode = TF.InterpolationMode(interpolation)
        x = TF.resize(x, size, interpolation=mode, antialias=True).clamp_(0, 255).round_()
    if crop is not None:
        x = TF.center_crop(x, [crop, crop])
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


@dataclass
class FrameSource:
    """Shared settings of the video and image sources.

    preprocess: ``"torchvision"`` (RGB, the backbone's ``interpolation``, ``mean`` and ``std``: ImageNet's
        by default; :func:`frame_settings` reads them from the backbone's :class:`Transform`) or
        ``"release"`` (BGR, 0-255 minus the Caffe mean; for VGG-19 converted from Caffe).
    map_scale: None, or the release's whole-map L2 normalisation x scale (158) before pooling
        (for a model with ``norm="map"``).
    """

    preprocess: str = "torchvision"
    map_scale: float | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    kind = "frames"

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if self.map_scale is not None and not self.map_scale > 0:
            raise ValueError(f"map_scale must be > 0, got {self.map_scale}")
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        check_normalisation(self.interpolation, self.mean, self.std)

    def config(self) -> dict:
        return {"source": self.kind, **asdict(self)}

    def prepare(self, frames: Tensor, crop: int | None = None) -> Tensor:
        """uint8 RGB frames (T, 3, H, W) from :meth:`load` -> the backbone's float32 input
        (T, 3, h, w), on the frames' device. ``crop``: None for the single centre crop, k for crop k
        of :func:`.crops.ten_crop` (video)."""
        raise NotImplementedError

    def _torchvision(self, frames: Tensor, resize: int | tuple[int, int] | None, crop: int | None) -> Tensor:
        return torchvision_preprocess(frames, resize, crop, interpolation=self.interpolation, mean=self.mean,
                                      std=self.std)

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

    torchvision preprocessing: shorter side to ``resize`` (256), centre crop ``size`` (224), the
    ``interpolation``, ``mean`` and ``std`` of :class:`FrameSource` (the backbone's: :func:`frame_settings`).
    Release preprocessing: resize to exactly 240 x 320, centre crop 224 (``size``/``resize`` unused).
    ``decoder``: ``"pyav"``, ``"torchcodec"`` or ``"torchcodec-cuda"`` (optional package; the last decodes on
    the GPU, in the main process), see :func:`decode_video`.
    """

    frames: int = 25
    size: int = 224
    resize: int = 256
    levels: tuple[int, ...] = PAPER_LEVELS
    decoder: str = "pyav"

    kind = "video"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.levels = tuple(int(n) for n in self.levels)
        if self.frames < 1 or self.size < 1 or self.resize < self.size:
            raise ValueError(f"video source: need frames >= 1 and resize >= size >= 1, got frames={self.frames}, "
                             f"size={self.size}, resize={self.resize}")
        check_decoder(self.decoder)

    @property
    def input_size(self) -> tuple[int, int]:
        return (RELEASE_CROP, RELEASE_CROP) if self.preprocess == "release" else (self.size, self.size)

    def load(self, item: Item) -> Tensor:
        return decode_video(item.path, self.frames, decoder=self.decoder)

    def prepare(self, frames: Tensor, crop: int | None = None) -> Tensor:
        release = self.preprocess == "release"
        side = RELEASE_CROP if release else self.size
        if crop is None:
            return release_preprocess(frames, RELEASE_RESIZE, side) if release else \
                self._torchvision(frames, self.resize, side)
        from .crops import ten_crop

        whole = release_preprocess(frames, RELEASE_RESIZE, None) if release else \
            self._torchvision(frames, self.resize, None)
        return ten_crop(whole, side)[crop]

    def pool(self, maps: Tensor) -> Tensor:
        return spp(maps, self.levels)

    def check_maps(self, backbone) -> None:
        """:class:`~fvvae_fast.spp.PyramidError` when ``backbone``'s map of this source's frames is smaller
        than the pyramid (``levels``), naming the smallest input size whose map fills it."""
        height, width = self.input_size
        _, map_h, map_w = backbone.output_shape(height, width)
        if min(map_h, map_w) >= max(self.levels):
            return
        smallest = None if self.preprocess == "release" else smallest_input(backbone, max(self.levels), height)
        larger = "another backbone or layer" if smallest is None else f"size (--size) {smallest} or more"
        check_pyramid(map_h, map_w, self.levels, f"{backbone.arch} up to {backbone.layer} at {height} x {width} input",
                      larger)


def smallest_input(backbone, side: int, start: int, limit: int = 4096) -> int | None:
    """The smallest square input size > ``start`` whose map (``backbone.output_shape``) has both sides >= ``side``
    (map sides grow with the input: doubling, then bisection); None beyond ``limit`` or when a size is refused."""
    from .backbones import BackboneError

    def fits(size: int) -> bool:
        return min(backbone.output_shape(size, size)[1:]) >= side

    low, high = start, 2 * start
    try:
        while not fits(high):
            low, high = high, 2 * high
            if high > limit:
                return None
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
    except BackboneError:
        return None
    return high


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
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)

    def prepare(self, frames: Tensor, crop: int | None = None) -> Tensor:
        if crop is not None:
            raise ValueError("crop: ten crops are for videos; an image is resized to the input size whole")
        if self.preprocess == "release":
            return release_preprocess(frames, (self.size, self.size), None)
        return self._torchvision(frames, (self.size, self.size), None)

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
