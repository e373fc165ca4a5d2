"""CNN backbones that turn preprocessed frames into conv maps, from torchvision architectures.

Nothing downloads: weights come from a local ``state_dict`` file given by the user
(``torch.save(model.state_dict(), path)`` of the torchvision model, or a checkpoint dict
with a ``"state_dict"`` / ``"model"`` entry; a ``module.`` prefix is stripped), or by a torchvision
weight name (``IMAGENET1K_V1``, ``VGG19_Weights.IMAGENET1K_V1``, ``DEFAULT``) whose file is in the torch hub
cache (``torch.hub.get_dir()/checkpoints``, where ``weights=...`` downloads put it). Random
weights are used only with ``random_weights=True`` (tests, benchmarks), seeded so that two
runs build the same network.

Presets (name -> torchvision architecture, layer):

    vgg19-pool5       vgg19         features.36   pool5, (512, 7, 7) at 224   (video, the paper and release)
    vgg19-conv5_4     vgg19         features.35   conv5_4 + ReLU, (512, 28, 28) at 448   (images)
    resnet152-res5c   resnet152     layer4        res5c (after its ReLU), (2048, 7, 7) at 224
    mobilenet_v2      mobilenet_v2  features      (1280, 7, 7) at 224

Speed: the input and weights are kept in ``channels_last`` memory format, and ``precision``
(``"fp32"``, ``"bf16"``, ``"fp16"``: CUDA only) runs the forward pass under autocast in that
type; the maps come back in float32 either way.

Preprocessing (:attr:`Backbone.transform`, a :class:`.sources.Transform`): torchvision weights, named or a
local file that is one of torchvision's (recognised by its file name or the SHA-256 prefix in it), use
that weights' ``transforms()`` (resize, crop, interpolation, mean, std: ResNet-50 ``IMAGENET1K_V2``
resizes to 232, Inception v3 crops 299, ViT SWAG takes 384 bicubic); a timm model uses
``timm.data.resolve_data_config`` of the model; any other file and random weights use the ImageNet
default (256, 224, bilinear, ImageNet mean and std).

Any other torchvision model name, or a timm model as ``timm:<name>`` when timm is installed, works
with an explicit ``layer``: a node name of
:func:`torchvision.models.feature_extraction.get_graph_node_names` (the graph is cut there, so
nothing after the layer runs), or, for models FX cannot trace, a submodule name captured
by a forward hook that stops the forward pass at that module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..io import file_sha256, load_torch_file
from .sources import Transform

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

PRESETS: dict[str, tuple[str, str]] = {
    "vgg19-pool5": ("vgg19", "features.36"),
    "vgg19-conv5_4": ("vgg19", "features.35"),
    "resnet152-res5c": ("resnet152", "layer4"),
    "mobilenet_v2": ("mobilenet_v2", "features"),
}


class BackboneError(UserError, ValueError):
    """A backbone that cannot be built as asked (unknown model or layer, bad weights file)."""


def resolve_weights(arch: str, weights: str | os.PathLike) -> Path:
    """The local file of ``weights``: a path, or a torchvision weight name of ``arch`` found in the torch hub
    cache (nothing is downloaded)."""
    path = Path(weights)
    if path.is_file() or os.sep in str(weights):
        return path
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        entry = enum[str(weights).rsplit(".", 1)[-1]] if str(weights) != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        return path  # not a weight name: reported as a missing file
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    if not cached.is_file():
        raise FileNotFoundError(f"weights {weights} of {arch}: {cached.name} is not in the torch hub cache "
                                f"({cached.parent}); nothing is downloaded: put the file there or give its path")
    return cached


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    state = load_torch_file(path, "state_dict file (saved with torch.save)", error=BackboneError)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path}: expected a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


class _Stop(Exception):
    def __init__(self, output: Tensor) -> None:
        self.output = output


class _HookExtractor(nn.Module):
    """Runs ``model`` until submodule ``layer`` has produced its output, then stops."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise BackboneError(f"unknown layer {layer!r}; submodules include: {', '.join(names)}, ...") from None

        def hook(_module, _inputs, output):
            raise _Stop(output)

        module.register_forward_hook(hook)

    def forward(self, x: Tensor) -> Tensor:
        try:
            self.model(x)
        except _Stop as stop:
            return stop.output
        raise BackboneError(f"layer {self.layer!r} did not run in the forward pass")


class _GraphExtractor(nn.Module):
    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)["out"]


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device, got {device.type}; use 'bf16' or 'fp32'")


class Backbone(nn.Module):
    """A frozen CNN truncated at one layer: frames (B, 3, H, W) float -> maps (B, C, h, w) float32.

    Build with :func:`build_backbone`. ``config()`` names the architecture, layer, the
    weights (file name and SHA-256, or the random seed) and the precision so a store records
    what made it. ``transform``: the preprocessing its weights expect (module docstring).
    """

    def __init__(self, extractor: nn.Module, arch: str, layer: str, weights: str | None, digest: str | None,
                 seed: int | None, precision: str = "fp32", transform: Transform | None = None) -> None:
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.arch, self.layer, self.weights, self.digest, self.seed = arch, layer, weights, digest, seed
        self.precision = precision
        self.transform = transform or Transform()
        self._channels: dict[tuple[int, int], tuple[int, int, int]] = {}

    def forward(self, frames: Tensor) -> Tensor:
        frames = frames.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            maps = self.extractor(frames)
        else:
            _check_precision(self.precision, frames.device)
            with torch.autocast(frames.device.type, dtype=dtype):
                maps = self.extractor(frames)
        if not isinstance(maps, Tensor) or maps.dim() != 4:
            raise BackboneError(f"{self.arch}.{self.layer} gives {type(maps).__name__} "
                                f"{tuple(getattr(maps, 'shape', ()))}, not a (B, C, h, w) conv map")
        return maps.float()

    @torch.inference_mode()
    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the maps for (height, width) input frames (one probe forward, cached)."""
        key = (height, width)
        if key not in self._channels:
            p = next(self.extractor.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            try:
                # forward, not __call__: a probe must not compile a graph for batch 1 (nn.Module.compile)
                self._channels[key] = tuple(self.forward(torch.zeros(1, 3, height, width, device=device)).shape[1:])
            except (BackboneError, torch.OutOfMemoryError):
                raise
            except (AssertionError, RuntimeError, ValueError) as err:  # e.g. a ViT built for one input size
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise BackboneError(f"{self.arch} up to {self.layer} does not take {height} x {width} input "
                                    f"({reason}); choose the input size it was built for with size (--size), "
                                    f"{self.transform.crop} for {self.transform.origin}") from None
        return self._channels[key]

    @staticmethod
    def torchvision_name(name: str) -> str:
        """A parameter, buffer or module name of ``extractor`` as the torchvision model names it (the
        extractor holds the model under one attribute: ``graph.features.4.0.weight`` -> ``features.4.0.weight``)."""
        return name.split(".", 1)[1] if "." in name else ""

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        """The extractor's weights under the torchvision model's names (a state_dict that
        :func:`build_backbone` loads with ``weights=``)."""
        return {self.torchvision_name(k): v for k, v in self.extractor.state_dict().items()}

    def config(self) -> dict:
        return {"arch": self.arch, "layer": self.layer,
                "weights": None if self.weights is None else {"file": Path(self.weights).name, "sha256": self.digest},
                "random_seed": self.seed, "precision": self.precision}


TIMM_PREFIX = "timm:"


def _known(arch: str) -> bool:
    if arch.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise BackboneError(f"backbone {arch!r} needs the timm package (pip install timm)") from None
        return timm.is_model(arch.removeprefix(TIMM_PREFIX))
    import torchvision

    return arch in torchvision.models.list_models()


def _architecture(arch: str) -> nn.Module:
    """The untrained network of a torchvision model name, or of a timm one after ``timm:``."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(arch.removeprefix(TIMM_PREFIX), pretrained=False)
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


def _torchvision_entry(arch: str, path: Path, digest: str):
    """The torchvision weights enum entry of ``arch`` whose file ``path`` is: the same file name, or the
    SHA-256 prefix of the entry's file name (torch hub's ``name-<sha256 prefix>.pth``); None if none."""
    import torchvision

    try:
        entries = list(torchvision.models.get_model_weights(arch))
    except (KeyError, ValueError):
        return None
    for entry in entries:
        name = os.path.basename(entry.url)
        prefix = Path(name).stem.rsplit("-", 1)[-1]
        if name == path.name or (len(prefix) >= 8 and digest.startswith(prefix)):
            return entry
    return None


def torchvision_transform(entry) -> Transform:
    """The :class:`Transform` of a torchvision weights enum entry (``ResNet50_Weights.IMAGENET1K_V2``): its
    ``transforms()``'s resize size, crop size, interpolation, mean and std."""
    t = entry.transforms()
    try:
        return Transform(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), interpolation=t.interpolation.value,
                         mean=tuple(t.mean), std=tuple(t.std), origin=str(entry))
    except (AttributeError, ValueError) as err:
        raise BackboneError(f"{entry}: its transforms() is not an image classification preprocessing ({err})") from None


def timm_transform(model: nn.Module, name: str) -> Transform:
    """The :class:`Transform` of a timm model from ``timm.data.resolve_data_config``: shorter side
    floor(crop / crop_pct), centre crop, its interpolation, mean and std."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    _, height, width = cfg["input_size"]
    if height != width or cfg.get("crop_mode", "center") != "center":
        raise BackboneError(f"timm model {name}: input {height} x {width} with crop mode {cfg.get('crop_mode')!r}; "
                            f"only square centre crops are supported")
    try:
        return Transform(resize=math.floor(height / cfg["crop_pct"]), crop=height, interpolation=cfg["interpolation"],
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), origin=f"timm {name}")
    except ValueError as err:
        raise BackboneError(f"timm model {name}: {err}") from None


def _transform(arch: str, model: nn.Module, path: Path | None, digest: str | None) -> Transform:
    if arch.startswith(TIMM_PREFIX):
        return timm_transform(model, arch.removeprefix(TIMM_PREFIX))
    entry = None if path is None else _torchvision_entry(arch, path, digest)
    return Transform() if entry is None else torchvision_transform(entry)


def _extractor(model: nn.Module, layer: str) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        nodes = get_graph_node_names(model)[1]
    except Exception:  # not FX-traceable: hook a submodule instead
        return _HookExtractor(model, layer)
    if layer not in nodes:
        try:
            model.get_submodule(layer)
        except AttributeError:
            shown = ", ".join(nodes[-12:])
            raise BackboneError(f"unknown layer {layer!r} (last nodes of the model: {shown})") from None
        return _HookExtractor(model, layer)
    return _GraphExtractor(create_feature_extractor(model, return_nodes={layer: "out"}))


def build_backbone(
    name: str,
    layer: str | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Backbone:
    """A frozen backbone from a preset or any torchvision model name (module docstring).

    Args:
        name: a preset (``vgg19-pool5``, ``vgg19-conv5_4``, ``resnet152-res5c``, ``mobilenet_v2``),
            a torchvision model name (``torchvision.models.list_models()``) or ``timm:<name>`` (with timm
            installed; weights from a local file only), then ``layer`` is needed.
        layer: the layer whose output is the conv map (overrides the preset's).
        weights: a local state_dict file of the torchvision architecture (keys after the layer,
            such as the classifier, are ignored; every key up to the layer must be there), or a
            torchvision weight name whose file is in the torch hub cache (:func:`resolve_weights`).
        random_weights: allow random weights (seeded by ``seed``) when no file is given; for tests.
        device: where the backbone runs.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only): autocast type of the forward
            pass (the maps, and so the descriptors, are float32 either way).
    """
    _check_precision(precision, torch.device(device))

    arch, preset_layer = PRESETS.get(name, (name, None))
    layer = layer or preset_layer
    if not _known(arch):
        raise BackboneError(f"unknown backbone {name!r}: use a preset ({', '.join(PRESETS)}), a torchvision "
                            f"model name or timm:<timm model name> with --layer")
    if layer is None:
        raise BackboneError(f"backbone {name!r} needs a layer name (e.g. layer4 for a ResNet)")
    if weights is None and not random_weights:
        raise BackboneError(f"backbone {name!r} needs a weights file (a local state_dict); nothing is downloaded. "
                            f"Random weights only with the explicit random-weights option")
    if weights is not None:
        path = resolve_weights(arch, weights)
        state = _read_state_dict(path)
        with torch.device("meta"):
            model = _architecture(arch)
        extractor = _extractor(model, layer).to_empty(device="cpu")
        wanted = extractor.state_dict()
        prefix = "graph." if isinstance(extractor, _GraphExtractor) else "model."
        missing = [k for k in wanted if k.removeprefix(prefix) not in state]
        if missing:
            raise BackboneError(f"{path}: the state_dict lacks {len(missing)} tensors of {arch} up to {layer} "
                                f"(first: {missing[0].removeprefix(prefix)}); is it a torchvision {arch}?")
        # the cut graph keeps only the layers up to ``layer``; a hooked model keeps them all
        sub = {k: state[k.removeprefix(prefix)] for k in wanted}
        for k, v in sub.items():
            if v.shape != wanted[k].shape:
                raise BackboneError(f"{path}: tensor {k.removeprefix(prefix)} has shape {tuple(v.shape)}, "
                                    f"{arch} needs {tuple(wanted[k].shape)}")
        extractor.load_state_dict(sub, strict=True)
        digest = file_sha256(path)
        backbone = Backbone(extractor, arch, layer, os.fspath(path), digest, None, precision,
                            _transform(arch, model, path, digest))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _architecture(arch)
        backbone = Backbone(_extractor(model, layer), arch, layer, None, None, seed, precision,
                            _transform(arch, model, None, None))
    return backbone.to(device)
