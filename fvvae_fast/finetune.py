"""Fine-tuning a backbone on the frames or images of a dataset (paper section 3.3, Tables 3 and 6).

Three modes, all SGD with momentum on the trainable backbone layers and the new layers above them:

- ``classifier``: a softmax classifier on the global (average-pooled) conv map, cross-entropy on
  every frame with its item's label (Table 3 "fine-tuned", Table 6 "w ft").
- ``fvvae``: end to end, the backbone's conv map pooled into descriptors as the source does (SPP
  for video, every position for images), and the Eq. 8 losses of an FV-VAE back-propagated into
  the backbone ("the gradients ... back-propagate to the lower layers", section 3.3).
- ``head``: the normalised Fisher vector of each item (:class:`~fvvae_fast.head.FisherVectorHead`
  over its frames' descriptors) and a linear classifier on it, cross-entropy.

Every step draws its items, frames and noise from generators seeded by (seed, step), so a run
resumed from its checkpoint repeats the steps of the uninterrupted run exactly (bitwise on CPU),
whatever the loader workers prefetched. The backbone stays in eval mode: BatchNorm statistics and
dropout are those of the given weights, and frozen layers come out bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .head import FisherVectorHead
from .io import atomic_torch_save, output_lock
from .model import FVVAE
from .pipelines.backbones import Backbone, _read_state_dict
from .pipelines.datasets import Dataset, Item
from .pipelines.sources import DEVICE_DECODERS, FrameSource, VideoSource
from .provenance import seal
from .train import (
    CHECKPOINT_SECONDS,
    CHECKPOINT_VERSION,
    INIT_SAMPLE,
    RESUME_MODES,
    TrainConfig,
    _check_resume,
    _deferred_interrupts,
    _read_checkpoint,
    save_checkpoint,
)

MODES = ("classifier", "fvvae", "head")
AMP = ("auto", "off", "bf16", "fp16")
# Settings that do not change the steps: everything else of FinetuneConfig makes another run.
OPERATIONAL = ("iterations", "device", "workers", "checkpoint_every", "log_every")
_STREAMS = {"batch": 0, "frames": 1, "noise": 2}  # independent random streams of a step


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (module docstring).

    ``trainable``: "all", a count k of the last blocks (a block is a parameter's name up to its first
    numeric index, ``features.34``, ``layer4.2``, else its module; in forward order), or
    comma-separated layer names (``features.28,features.30``); the rest of the backbone is frozen.
    ``batch_items``: items per step; ``frames_per_item``: frames drawn per video and step among
    the source's ``frames`` uniformly sampled ones (images have one). ``weight_decay`` applies to
    weight matrices and kernels, not to biases, normalisation parameters or sigma. ``amp``: autocast
    on CUDA, "auto" = bf16 there and off on CPU. ``lambda1..3``, ``latent_dim``, ``hidden_dim``,
    ``dropout``: the FV-VAE of modes fvvae and head when none is given (``lambda*``: mode fvvae).
    """

    mode: str = "classifier"
    trainable: str = "all"
    iterations: int = 1000
    batch_items: int = 16
    frames_per_item: int = 1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    amp: str = "auto"
    lambda1: float = TrainConfig.lambda1
    lambda2: float = TrainConfig.lambda2
    lambda3: float = TrainConfig.lambda3
    latent_dim: int = 255
    hidden_dim: int | list[int] | None = None
    dropout: float = 0.5
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FinetuneConfig: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.amp not in AMP:
            raise ValueError(f"FinetuneConfig: amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        for name in ("iterations", "batch_items", "frames_per_item", "latent_dim", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.seed < 0 or self.workers < 0:
            raise ValueError(f"FinetuneConfig: need lr > 0 and momentum, weight_decay, seed, workers >= 0; got "
                             f"{self.lr}, {self.momentum}, {self.weight_decay}, {self.seed}, {self.workers}")
        if not isinstance(self.trainable, str) or not self.trainable.strip():
            raise ValueError(f"FinetuneConfig: trainable must be 'all', a count or layer names, got {self.trainable!r}")


@dataclass
class FinetuneResult:
    """The fine-tuned backbone (eval mode, frozen again), the FV-VAE of modes fvvae and head, the
    new classifier (modes classifier and head), and the logged rows."""

    backbone: Backbone
    model: FVVAE | None
    classifier: nn.Linear | None
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def step_generator(seed: int, step: int, stream: str, *extra: int, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """The generator of one random stream of one step (and item): seeded by (seed, step, stream, extra)."""
    words = np.random.SeedSequence([seed, step, _STREAMS[stream], *extra]).generate_state(1, np.uint64)
    return torch.Generator(device=device).manual_seed(int(words[0]))


def _block(name: str) -> str:
    """``features.4.block.0.0`` -> ``features.4``; ``layer4.2.conv1`` -> ``layer4.2``; ``conv1`` -> ``conv1``."""
    m = re.match(r"(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


@torch.no_grad()
def _forward_modules(backbone: Backbone, input_size: tuple[int, int]) -> list[str]:
    """The extractor's modules that own parameters, in the order one probe forward of a
    (1, 3, *input_size) zero frame runs them (a hooked model's layers after the cut never run)."""
    order: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
             for name, module in backbone.extractor.named_modules()
             if next(module.parameters(recurse=False), None) is not None]
    try:
        p = next(backbone.extractor.parameters())
        backbone(torch.zeros(1, 3, *input_size, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def backbone_blocks(backbone: Backbone, input_size: tuple[int, int]) -> list[str]:
    """The backbone's blocks (:class:`FinetuneConfig` ``trainable``) in forward order."""
    return list(dict.fromkeys(_block(Backbone.torchvision_name(m)) for m in _forward_modules(backbone, input_size)))


def trainable_parameters(backbone: Backbone, trainable: str, input_size: tuple[int, int]) -> list[str]:
    """Names (the extractor's) of the parameters that ``trainable`` selects among those the forward
    pass uses; ValueError naming the layers that are not there."""
    modules = _forward_modules(backbone, input_size)
    names = [f"{m}.{n}" for m in modules for n, _ in backbone.extractor.get_submodule(m).named_parameters(recurse=False)]
    spec = trainable.strip()
    if spec == "all":
        return names
    blocks = backbone_blocks(backbone, input_size)
    if spec.isdigit():
        k = int(spec)
        if not 1 <= k <= len(blocks):
            raise ValueError(f"trainable: {k} last blocks asked, {backbone.arch} up to {backbone.layer} has "
                             f"{len(blocks)} ({', '.join(blocks)})")
        chosen = blocks[-k:]
    else:
        chosen = [s.strip() for s in spec.split(",") if s.strip()]
    own = {n: Backbone.torchvision_name(n) for n in names}
    picked = {c: {n for n in names if own[n] == c or own[n].startswith(c + ".")} for c in chosen}
    missing = [c for c, found in picked.items() if not found]
    if missing:
        raise ValueError(f"trainable: no layer {', '.join(map(repr, missing))} with parameters in {backbone.arch} up "
                         f"to {backbone.layer} (its blocks: {', '.join(blocks)})")
    return [n for n in names if any(n in found for found in picked.values())]


class _TrainItems(torch.utils.data.Dataset):
    """(step, item index) -> (frames (k, 3, H, W) float32 or None, label, error or None); runs in workers.

    Video: ``frames_per_item`` of the source's uniformly sampled frames, drawn by the step's generator."""

    def __init__(self, items: list[Item], source: FrameSource, frames_per_item: int, seed: int) -> None:
        self.items, self.source, self.k, self.seed = items, source, frames_per_item, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        step, i = key
        item = self.items[i]
        try:
            frames = self.source.load(item)
        except Exception as err:  # an unreadable item is left out of its batch and reported
            return None, item.label, f"{item.id}: {type(err).__name__}: {err}"
        if frames.shape[0] > self.k:
            pick = torch.randperm(frames.shape[0], generator=step_generator(self.seed, step, "frames", i))[: self.k]
            frames = frames[pick.sort().values]
        # preprocessed here, on the CPU: images come in any size, the batch needs one
        return self.source.prepare(frames), item.label, None


def _collate(batch):
    ok = [(f, y) for f, y, err in batch if err is None]
    errors = [err for _, _, err in batch if err is not None]
    frames = torch.stack([f for f, _ in ok]) if ok else None
    return frames, torch.tensor([y for _, y in ok], dtype=torch.int64), errors


class _StepKeys:
    """Batch sampler: for each step from ``start``, this rank's share of the step's global batch."""

    def __init__(self, count: int, batch: int, seed: int, start: int, stop: int) -> None:
        self.count, self.batch, self.seed, self.start, self.stop = count, batch, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        rank, world = distributed.rank_world()
        for step in range(self.start, self.stop):
            ids = torch.randperm(self.count, generator=step_generator(self.seed, step, "batch"))[: self.batch]
            lo, hi = len(ids) * rank // world, len(ids) * (rank + 1) // world
            yield [(step, int(i)) for i in ids[lo:hi]]


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class _Net(nn.Module):
    """Backbone + the mode's head; ``forward`` gives (loss to back-propagate, logged terms (T,)).

    The loss of this rank's part of the step's batch is scaled by ``world``: DistributedDataParallel
    averages the ranks' gradients, which gives the gradient of the whole batch's loss (``totals``:
    the batch's frames and items over all ranks)."""

    def __init__(self, mode: str, backbone: Backbone, source: FrameSource, model: FVVAE | None,
                 classifier: nn.Linear | None, lambdas: tuple[float, float, float]) -> None:
        super().__init__()
        self.mode, self.backbone, self.source, self.lambdas = mode, backbone, source, lambdas
        self.classifier = classifier
        self.model = model if mode == "fvvae" else None
        self.head = FisherVectorHead(model) if mode == "head" else None

    def forward(self, frames: Tensor, labels: Tensor, totals: tuple[int, int], noise: torch.Generator | None):
        b, k = frames.shape[:2]
        world = distributed.rank_world()[1]
        maps = self.backbone(frames.flatten(0, 1))
        if self.mode == "classifier":
            logits = self.classifier(maps.mean(dim=(2, 3)))
            cls = F.cross_entropy(logits.float(), labels.repeat_interleave(k), reduction="sum") / totals[0]
            return cls * world, cls.detach()[None]
        with torch.autocast(maps.device.type, enabled=False):
            desc = self.source.descriptors(maps.float())  # (b k, K, C)
            if self.mode == "head":
                vectors = self.head(desc.reshape(b, -1, desc.shape[-1]))  # one set per item
                cls = F.cross_entropy(self.classifier(vectors), labels, reduction="sum") / totals[1]
                return cls * world, cls.detach()[None]
            x = desc.reshape(-1, desc.shape[-1])
            use_labels = self.model.classifier is not None and self.lambdas[2] != 0
            rows = labels.repeat_interleave(k * desc.shape[1]) if use_labels else None
            losses = self.model.loss(x, rows, self.lambdas, noise, num_rows=totals[0] * desc.shape[1],
                                     share=1.0 / world)
            return losses.total * world, torch.stack([losses.rec, losses.reg, losses.cls, losses.total]).detach()


TERMS = {"classifier": ("cls",), "head": ("cls",), "fvvae": ("rec", "reg", "cls", "total")}


def _new_layers(mode: str, config: FinetuneConfig, dim: int, num_classes: int, source: FrameSource,
                init_model: FVVAE | None) -> tuple[FVVAE | None, nn.Linear | None]:
    model = None
    if mode != "classifier":
        if init_model is not None:
            if init_model.in_dim != dim:
                raise ValueError(f"finetune: the initial FV-VAE has in_dim={init_model.in_dim}, the backbone gives "
                                 f"C={dim}")
            if mode == "fvvae" and config.lambda3 != 0 and init_model.num_classes not in (0, num_classes):
                raise ValueError(f"finetune: the initial FV-VAE classifies {init_model.num_classes} classes, the "
                                 f"dataset has {num_classes}")
            model = init_model
        else:
            model = FVVAE(in_dim=dim, latent_dim=config.latent_dim,
                          num_classes=num_classes if mode == "fvvae" and config.lambda3 != 0 else 0,
                          hidden_dim=config.hidden_dim, norm="map" if source.map_scale else "descriptor",
                          norm_scale=source.map_scale or 1.0, dropout=config.dropout, seed=config.seed)
    classifier = None
    if mode != "fvvae":
        width = dim if mode == "classifier" else dim * (model.latent_dim + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            classifier = nn.Linear(width, num_classes)
    return model, classifier


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "off":
        return None
    if device.type != "cuda":
        raise ValueError(f"finetune: amp={amp!r} (mixed precision) is for CUDA devices; use 'off' or 'auto' on "
                         f"{device}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def finetune(
    backbone: Backbone,
    source: FrameSource,
    dataset: Dataset,
    config: FinetuneConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    model_out: str | os.PathLike | None = None,
    init_model: FVVAE | None = None,
    checkpoint: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: str = "exact",
) -> FinetuneResult:
    """Fine-tune ``backbone`` (from :func:`~fvvae_fast.pipelines.build_backbone`; trained in place) on
    every item of ``dataset`` (the training items: labels 0 .. len(classes)-1), loaded by ``source``
    (a :class:`VideoSource` or :class:`ImageSource`) in ``config.workers`` loader processes.

    ``out``: the backbone's weights file, written at the end: a plain state_dict of the torchvision
    model (the input weights file's tensors with the fine-tuned ones replaced) that
    ``build_backbone(..., weights=out)`` and ``fvvae descriptors --weights`` load as they are.
    ``model_out`` (modes fvvae and head): the FV-VAE as a checkpoint that
    :func:`~fvvae_fast.train.load_model` reads. ``init_model``: the FV-VAE to start from (e.g. one
    trained by ``fvvae train`` on this backbone's descriptors); without it a new one starts at the
    scale of the first batch's descriptors (:meth:`FVVAE.init_from_data`).

    ``checkpoint`` is resumed when it exists and rewritten atomically every ``checkpoint_every``
    steps, at least every ``CHECKPOINT_SECONDS``, at the end and on SIGINT/SIGTERM (then
    KeyboardInterrupt) and locked against other processes while training, as :func:`~fvvae_fast.train.train`
    does; a checkpoint of other settings is
    refused (``resume="extend"``: a larger ``iterations`` trains on). Under torchrun the steps are
    DistributedDataParallel over each step's items (a resumed run is exact under the same world
    size). ``log_dir``: TensorBoard scalars.
    """
    config = config or FinetuneConfig()
    if resume not in RESUME_MODES:
        raise ValueError(f"finetune: resume must be one of {RESUME_MODES}, got {resume!r}")
    if not isinstance(backbone, Backbone):
        raise TypeError(f"finetune: backbone must be a Backbone (build_backbone), got {type(backbone).__name__}")
    if not isinstance(source, FrameSource):
        raise TypeError(f"finetune: source must be a VideoSource or ImageSource, got {type(source).__name__}")
    if getattr(source, "decoder", None) in DEVICE_DECODERS:
        raise ValueError(f"finetune: decoder={source.decoder!r} decodes on the GPU; fine-tuning prepares its frames "
                         "on the CPU in the loader workers: use decoder='pyav' or 'torchcodec'")
    items = dataset.items
    if not items:
        raise ValueError(f"finetune: dataset {dataset.name!r} has no item to train on")
    num_classes = len(dataset.classes)
    unlabelled = [it.id for it in items if not 0 <= it.label < num_classes]
    if unlabelled and (config.mode != "fvvae" or config.lambda3 != 0):
        raise ValueError(f"finetune: {len(unlabelled)} training items have no label in 0..{num_classes - 1} "
                         f"(first: {unlabelled[0]}); mode fvvae with lambda3=0 needs none")
    candidates = source.frames if isinstance(source, VideoSource) else 1
    if config.frames_per_item > candidates:
        raise ValueError(f"finetune: frames_per_item={config.frames_per_item} but the {source.kind} source gives "
                         f"{candidates} frame(s) per item")
    rank, world = distributed.rank_world()
    if config.batch_items < world:
        raise ValueError(f"finetune: batch_items={config.batch_items} is smaller than the {world} processes")
    device = torch.device(config.device)
    amp = _amp_dtype(config.amp, device)
    backbone.to(device).eval()
    train_names = set(trainable_parameters(backbone, config.trainable, source.input_size))
    for name, p in backbone.extractor.named_parameters():
        p.requires_grad_(name in train_names)
    dim = backbone.output_shape(*source.input_size)[0]
    model, classifier = _new_layers(config.mode, config, dim, num_classes, source, init_model)
    lambdas = (config.lambda1, config.lambda2, config.lambda3)
    net = _Net(config.mode, backbone, source, model, classifier, lambdas).to(device)
    if model is not None:
        model.train()  # dropout and z noise (fvvae); the head's encoding uses mu_z either way
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1]},  # weights and kernels decay
                                 {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                                lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    run = {"backbone": backbone.config(), "source": source.config(), "dataset": dataset.name, "items": len(items),
           "classes": num_classes, "model_config": None if model is None else model.config()}
    history: list[dict[str, float]] = []
    extended: list[list[int]] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        ckpt = _read_checkpoint(checkpoint)
        if ckpt.get("kind") != "finetune":
            raise ValueError(f"{checkpoint}: not a finetune checkpoint (an `fvvae train` model?)")
        changed = [k for k in run if ckpt["run"].get(k) != run[k]]
        if changed:
            raise ValueError(f"{checkpoint}: the checkpoint is another run's (other {', '.join(changed)}); start "
                             f"again with another checkpoint file, or remove this one")
        settings = tuple(f.name for f in dataclasses.fields(config) if f.name not in OPERATIONAL)
        extended = _check_resume(checkpoint, ckpt, config, resume, settings)
        net.load_state_dict(ckpt["net_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scaler.load_state_dict(ckpt["scaler_state"])
        start, history = ckpt["iteration"], ckpt["history"]
    elif model is not None and init_model is None:
        _init_from_batch(model, backbone, source, items, config, device)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_net = DistributedDataParallel(net, find_unused_parameters=True)
    else:
        step_net = net
    loader = torch.utils.data.DataLoader(
        _TrainItems(items, source, config.frames_per_item, config.seed),
        batch_sampler=_StepKeys(len(items), config.batch_items, config.seed, start, config.iterations),
        collate_fn=_collate, num_workers=config.workers, worker_init_fn=_worker_init if config.workers else None,
        pin_memory=device.type == "cuda", prefetch_factor=2 if config.workers else None)
    writer = None
    if log_dir is not None and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    last_save = time.monotonic()

    def save(step: int) -> None:
        nonlocal last_save
        if checkpoint is not None and rank == 0:
            atomic_torch_save(seal({"version": CHECKPOINT_VERSION, "kind": "finetune", "run": run, "iteration": step,
                                    "train_config": dataclasses.asdict(config), "net_state": net.state_dict(),
                                    "optimizer_state": optimizer.state_dict(), "scaler_state": scaler.state_dict(),
                                    "history": history, "extended": extended}), checkpoint)
        last_save = time.monotonic()

    skipped: list[str] = []
    bar = tqdm(total=config.iterations, initial=start, disable=not progress or rank != 0,
               desc=f"finetune ({config.mode})", unit="step")
    with output_lock(checkpoint if rank == 0 else None, "checkpoint"), _deferred_interrupts() as interrupted:
        for step, (frames, labels, errors) in enumerate(loader, start=start):
            skipped += errors
            counts = torch.tensor([0 if frames is None else frames.shape[0]], dtype=torch.int64)
            items_now = int(distributed.all_reduce_sum(counts)[0])
            if items_now == 0:
                raise ValueError(f"finetune: step {step + 1}: no item of the batch could be read ({errors[0]})")
            if frames is None:  # this rank's items all failed: an empty batch keeps the ranks in step
                frames = torch.zeros(0, config.frames_per_item, 3, *source.input_size)
            noise = step_generator(config.seed, step, "noise", rank, device=device) if config.mode == "fvvae" else None
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                loss, terms = step_net(frames.to(device, non_blocking=True), labels.to(device),
                                       (items_now * frames.shape[1], items_now), noise)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            bar.update(1)
            if (step + 1) % config.log_every == 0 or step + 1 == config.iterations:
                values = distributed.all_reduce_sum(terms.double().cpu()).tolist()
                row = {"iteration": step + 1, **dict(zip(TERMS[config.mode], values))}
                history.append(row)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "iteration"})
                if writer is not None:
                    for k, v in row.items():
                        if k != "iteration":
                            writer.add_scalar(f"finetune/{k}", v, step + 1)
            if ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.iterations or interrupted
                    or time.monotonic() - last_save > CHECKPOINT_SECONDS):
                save(step + 1)
            if interrupted:
                bar.close()
                if writer is not None:
                    writer.close()
                where = f"checkpoint written at step {step + 1}" if checkpoint is not None else "no checkpoint file"
                raise KeyboardInterrupt(f"finetune: interrupted ({interrupted[0]}) at step {step + 1}; {where}")
    bar.close()
    if writer is not None:
        writer.close()
    if skipped and rank == 0:
        import warnings

        warnings.warn(f"finetune: {len(skipped)} item loads failed and were left out of their batches "
                      f"(first: {skipped[0]})", stacklevel=2)
    backbone.eval().requires_grad_(False)
    if model is not None:
        model.eval()
    if rank == 0:
        if out is not None:
            save_backbone(backbone, out)
        if model_out is not None and model is not None:
            save_checkpoint(model_out, model)
    distributed.barrier()
    return FinetuneResult(backbone=backbone, model=model, classifier=classifier, history=history,
                          resumed_from=start)


@torch.no_grad()
def _init_from_batch(model: FVVAE, backbone: Backbone, source: FrameSource, items: list[Item],
                     config: FinetuneConfig, device: torch.device) -> None:
    """A new FV-VAE starts at the scale of the descriptors of step 0's items (train's data init)."""
    data = _TrainItems(items, source, config.frames_per_item, config.seed)
    keys = next(iter(_StepKeys(len(items), config.batch_items, config.seed, 0, 1)))
    frames, _, errors = _collate([data[key] for key in keys])
    if frames is None:
        raise ValueError(f"finetune: no item of the first batch could be read ({errors[0]})")
    desc = source.descriptors(backbone(frames.flatten(0, 1).to(device)).float())
    x = desc.reshape(-1, desc.shape[-1])
    model.to(device).init_from_data(x[torch.randperm(x.shape[0], generator=step_generator(
        config.seed, 0, "noise"))[:INIT_SAMPLE].to(device)])


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> None:
    """Write the backbone's weights atomically as a plain state_dict of its torchvision model: the
    tensors of its weights file (all of them, the layers after its cut included) with the backbone's
    own replaced; for random weights, the backbone's own. ``build_backbone(..., weights=path)`` loads it."""
    state = _read_state_dict(Path(backbone.weights)) if backbone.weights is not None else {}
    state.update({k: v.detach().cpu().clone() for k, v in backbone.torchvision_state_dict().items()})
    atomic_torch_save(state, path)
