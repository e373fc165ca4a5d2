"""Training FV-VAE (Algorithm 1): AdaDelta on Eq. 8, resumable, seeded, logged."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .io import atomic_torch_save, load_torch_file, output_lock
from .model import FVVAE
from .provenance import data_record, mismatch, seal, short, verify
from .ops.training import Adadelta, loss_backward, loss_backward_fused
from .progress import duration, show_progress
from .sets import DescriptorSets
from .threads import limit_torch_threads

CHECKPOINT_VERSION = 2  # 2: the payload's checksum and the record of the training data (1 still loads)
LIVENESS_ROWS = 4096  # descriptors of the current batch on which liveness is logged
INIT_SAMPLE = 16384  # training descriptors that set the data-dependent start
# Below this share of active decoder pre-activations the model is collapsing: its Fisher vectors
# (Eq. 11 masks r_t by the active units) go to zero. Healthy runs stay above 0.2.
LIVENESS_WARN = 0.01
# ... for at least this many iterations: a large lambda3 can dip below it for a few iterations early on
# and recover (sparse generated data, lambda3 = 1000: 0.7% at iteration 10, 59% at 1,000).
LIVENESS_PATIENCE = 50
CHECKPOINT_SECONDS = 60.0  # a checkpoint at least this often (when a checkpoint file is given)
ESTIMATE_AFTER = 10  # iterations timed (after the first, which pays one-time costs) for the time estimate
RESUME_MODES = ("exact", "extend")
# Settings whose change makes another run: resuming with a different value is refused.
RUN_SETTINGS = ("batch_sets", "lr", "rho", "eps", "lambda1", "lambda2", "lambda3", "descriptors_per_set", "data_init",
                "seed")
SEED_RANGE = (-(2**63), 2**63 - 1)  # a torch generator's 64-bit seed (train also seeds one with seed + 1)


class CollapseWarning(UserWarning):
    """The ReLU decoder of a model in training has (almost) no active unit left."""


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's (section 5.2) and the release's loss weight.

    ``descriptors_per_set``: None trains on every descriptor of each sampled set; an int
    samples that many per set (the paper trains on one frame of each video: 50 descriptors).
    AdaDelta's rho and eps follow Caffe's AdaDelta example solver (momentum 0.95, delta 1e-6).
    ``data_init``: a fresh run first starts the decoder and sigma_x at the scale of the data
    (:meth:`FVVAE.init_from_data`, on ``INIT_SAMPLE`` seeded training descriptors); False keeps the
    model's weights as given (fine-tuning a trained model).
    """

    iterations: int = 5000
    batch_sets: int = 128
    lr: float = 1.0
    rho: float = 0.95
    eps: float = 1e-6
    lambda1: float = 1.0
    lambda2: float = 1.0
    lambda3: float = 1000.0
    descriptors_per_set: int | None = None
    data_init: bool = True
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_sets", "checkpoint_every", "log_every", "descriptors_per_set"):
            value = getattr(self, name)
            if value is None and name == "descriptors_per_set":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"TrainConfig: {name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {value}")
        for name, wanted, fits in (("lr", "> 0", lambda v: v > 0), ("rho", "in [0, 1]", lambda v: 0 <= v <= 1),
                                   ("eps", "> 0", lambda v: v > 0), *((f"lambda{k}", ">= 0", lambda v: v >= 0)
                                                                        for k in (1, 2, 3))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not fits(value):
                raise ValueError(f"TrainConfig: {name} must be a finite number {wanted}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or \
                not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"TrainConfig: seed must be an integer from -2**63 to 2**63 - 1, got {self.seed!r}")


@dataclass
class TrainResult:
    """What training produced: the model and the logged loss terms per logged iteration."""

    model: FVVAE
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0

    def __repr__(self) -> str:
        m = self.model
        return (f"TrainResult(model={type(m).__name__}(in_dim={m.in_dim}, latent_dim={m.latent_dim}), "
                f"history={len(self.history)} logged iterations, resumed_from={self.resumed_from})")


def save_checkpoint(path: str | os.PathLike, model: FVVAE, optimizer: torch.optim.Optimizer | None = None,
                    iteration: int = 0, generators: tuple[torch.Generator, ...] = (),
                    config: TrainConfig | None = None, history: list | None = None,
                    extended: list | None = None, data: dict | None = None) -> None:
    """Write a training checkpoint atomically (model config + weights, optimizer, RNG states, progress;
    ``extended``: [from, to] iteration counts of each extension of the run; ``data``: the
    :func:`fvvae_fast.provenance.data_record` of the training data), sealed with its checksum."""
    atomic_torch_save(seal(
        {
            "version": CHECKPOINT_VERSION,
            "model_config": model.config(),
            "model_state": model.state_dict(),
            "optimizer_state": None if optimizer is None else optimizer.state_dict(),
            "iteration": iteration,
            "generator_states": [g.get_state() for g in generators],
            "train_config": None if config is None else dataclasses.asdict(config),
            "history": history or [],
            "extended": extended or [],
            "data": data,
        }),
        path,
    )


def _read_checkpoint(path: str | os.PathLike) -> dict:
    ckpt = load_torch_file(path, "fvvae_fast checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path}: not an fvvae_fast checkpoint of version 1 to {CHECKPOINT_VERSION}")
    if ckpt["version"] > 1 and ckpt.get("checksum") is None:
        raise ValueError(f"{path}: the checkpoint's checksum is missing: the file changed after it was written")
    verify(ckpt, path, "checkpoint")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FVVAE:
    """The FVVAE stored in a checkpoint written by :func:`save_checkpoint` or :func:`train` (eval mode).

    Its ``trained_on`` attribute is the checkpoint's record of the training data
    (:func:`fvvae_fast.provenance.data_record`; None for a checkpoint of an earlier version)."""
    ckpt = _read_checkpoint(path)
    model = FVVAE(**ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    model.trained_on = ckpt.get("data")
    return model.to(map_location).eval()


def _check_data(path: str | os.PathLike, ckpt: dict, data: dict) -> None:
    """Refuse to resume a checkpoint on other data than it was trained on (nothing recorded: not checked)."""
    saved = ckpt.get("data")
    if saved is not None and saved["fingerprint"] != data["fingerprint"]:
        raise mismatch(f"{path} was trained on {_named(saved)} (fingerprint {short(saved['fingerprint'])})",
                       f"the data given are {_named(data)} ({short(data['fingerprint'])}); start again with "
                       f"another checkpoint file, or remove this one")


def _named(record: dict) -> str:
    store = f" of {record['store']}" if record.get("store") else ""
    return f"{record['what']}{store}"


def _check_resume(path: str | os.PathLike, ckpt: dict, config, resume: str,
                  run_settings: tuple[str, ...] = RUN_SETTINGS) -> list[list[int]]:
    """Refuse to resume another run (``run_settings`` of ``config`` differ from the checkpoint's
    ``train_config``); returns the checkpoint's extensions, with this one if it extends."""
    saved = ckpt.get("train_config") or {}
    changed = [f"{k}={saved.get(k)!r} -> {getattr(config, k)!r}" for k in run_settings
               if saved.get(k) != getattr(config, k)]
    if changed:
        raise ValueError(f"{path}: the checkpoint is another run's; changed settings: {', '.join(changed)} "
                         f"(start again with another checkpoint file, or remove this one)")
    extended = [list(e) for e in ckpt.get("extended", [])]
    before = saved.get("iterations")
    if config.iterations == before:
        return extended
    if resume != "extend" or config.iterations < ckpt["iteration"]:
        raise ValueError(f"{path}: the checkpoint's run is for iterations={before} (at {ckpt['iteration']}), "
                         f"not {config.iterations}" + ("; extend it with resume='extend' (--extend)" if
                                                      config.iterations > ckpt["iteration"] else ""))
    return [*extended, [before, config.iterations]]


@contextlib.contextmanager
def _deferred_interrupts():
    """SIGINT and SIGTERM set a flag (the yielded list gets the signal's name) instead of stopping the
    process mid-step; the training loop checks it after each iteration. Main thread only."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda num, _frame: caught.append(signal.Signals(num).name))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def torch_device(name: str | torch.device, where: str) -> torch.device:
    """The torch device ``name``, checked to exist here: ValueError naming ``where`` and the value otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{where}: {name!r} is not a torch device (cpu, cuda, cuda:1, ...): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: {name!r} needs CUDA, which this machine lacks; use 'cpu'")
    return device


def _check_labels(model: FVVAE, data: DescriptorSets, config: TrainConfig) -> bool:
    use = model.classifier is not None and config.lambda3 != 0.0
    if use and data.labels is None:
        raise ValueError("train: data.labels are needed for the classification loss (or set lambda3=0)")
    if use and len(data):
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= model.num_classes:
            raise ValueError(f"train: labels must be in [0, num_classes={model.num_classes}), got "
                             f"{low if low < 0 else high}")
    return use


FINITE_CHECK_ROWS = 65536  # descriptors per block of the up-front NaN/Inf check


def _check_finite_data(data: DescriptorSets) -> None:
    """ValueError naming the first row of NaN or Inf in descriptors held in memory, checked in blocks (data read
    from disk, a memory map or a store's shards, is left to the check of the weights as training logs)."""
    if not isinstance(data.x, torch.Tensor) and type(data.x) is not np.ndarray:
        return
    for lo in range(0, data.x.shape[0], FINITE_CHECK_ROWS):
        block = torch.as_tensor(data.x[lo : lo + FINITE_CHECK_ROWS])
        bad = ~torch.isfinite(block).all(dim=1)
        if bool(bad.any()):
            row = lo + int(bad.nonzero()[0])
            item = int(torch.searchsorted(data.offsets, torch.tensor(row), right=True)) - 1
            raise ValueError(f"train: the descriptors hold NaN or Inf (first in row {row}, of set {item}); "
                             "training on them would turn every weight into NaN")


def _check_weights(model: FVVAE, iteration: int, saved: int | None) -> None:
    """ValueError when a weight is NaN or Inf after ``iteration`` (checked before every log and save, so that
    no checkpoint holds such a model)."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    kept = f"the checkpoint keeps iteration {saved}" if saved is not None else "nothing was saved"
    raise ValueError(f"train: iteration {iteration}: the model's weights became NaN or Inf (NaN or Inf in the "
                      f"descriptors, or a loss that diverged: try a smaller lr); {kept}")


@limit_torch_threads()
def train(
    model: FVVAE,
    data: DescriptorSets,
    config: TrainConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    resume: str = "exact",
) -> TrainResult:
    """Train ``model`` on ``data`` (Algorithm 1) and return it with the loss history.

    Each iteration samples ``batch_sets`` sets (without replacement within the batch), gives
    every descriptor its set's label (Algorithm 1), and minimises
    lambda1 L_rec + lambda2 L_reg + lambda3 L_cls (Eq. 8) with AdaDelta. Dropout, sampling of
    z and of sets come from one generator seeded by ``config.seed``. An iteration that draws only
    empty sets has nothing to learn from: it makes no step and logs no row.

    If ``checkpoint`` names an existing file, training resumes from it (weights, optimizer,
    RNG, iteration, history), so an interrupted run continues exactly as if uninterrupted;
    the file is rewritten atomically every ``checkpoint_every`` iterations, at least every
    ``CHECKPOINT_SECONDS``, at the end, and when SIGINT or SIGTERM arrives (the iteration under way
    finishes, the checkpoint is written, then KeyboardInterrupt is raised). ``resume="exact"``
    resumes only the same run: any setting that differs from the checkpoint's (``iterations``
    included) is refused with a ValueError naming it; ``resume="extend"`` also trains a finished or
    unfinished run on to a larger ``iterations`` (recorded in the checkpoint's ``extended``). While training,
    the checkpoint is locked (``fvvae_fast.io.output_lock``): another process training on the same file is
    refused with an OSError naming this one.
    ``progress`` (None: on a terminal; True, False) shows a progress bar and, after the first
    ``ESTIMATE_AFTER`` + 1 iterations, one line with the run's estimated time. Torch runs with at most
    :func:`fvvae_fast.threads.advised_threads` threads (restored after).
    ``log_dir`` writes TensorBoard scalars (needs the ``tensorboard`` package). Every logged row
    (progress bar, TensorBoard, the checkpoint's history) holds the loss terms and the decoder's
    health (:meth:`FVVAE.liveness` on the current batch); a :class:`~fvvae_fast.train.CollapseWarning` is raised once
    when fewer than ``LIVENESS_WARN`` of the pre-activations have been active for ``LIVENESS_PATIENCE``
    iterations. Descriptors held in memory are checked for NaN and Inf up front (a ValueError names the first
    such row); the weights are checked before every log and checkpoint, and weights that became NaN or Inf
    stop training with a ValueError before they are saved (the last checkpoint stays as it was).

    Inside a torch.distributed process group (``torchrun``; ``fvvae_fast.distributed``) it is
    DistributedDataParallel over sets: every rank draws the same global batch and its noise, and
    computes the loss of its contiguous share of the batch's sets, scaled so that the averaged
    gradient is the whole batch's. The steps, the optimizer state and the checkpoint (written by
    rank 0 only) are those of the single-process run with the same settings, and a checkpoint
    resumes under any world size.
    """
    config = TrainConfig() if config is None else config
    for name, value, kind in (("model", model, FVVAE), ("data", data, DescriptorSets), ("config", config, TrainConfig)):
        if not isinstance(value, kind):
            hint = " (sets go in DescriptorSets(x, offsets, labels))" if name == "data" else ""
            raise TypeError(f"train: {name} must be of type {kind.__name__}, got {type(value).__name__}{hint}")
    if data.dim != model.in_dim:
        raise ValueError(f"train: descriptors have C={data.dim} but the model expects in_dim={model.in_dim}")
    if len(data) == 0:
        raise ValueError("train: data has no sets")
    if data.x.shape[0] == 0:
        raise ValueError(f"train: all {len(data)} sets of data are empty: no descriptor to train on")
    _check_finite_data(data)
    use_labels = _check_labels(model, data, config)
    device = torch_device(config.device, "train: config.device")
    model.to(device).train()
    optimizer = Adadelta(model.parameters(), lr=config.lr, rho=config.rho, eps=config.eps, foreach=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    if resume not in RESUME_MODES:
        raise ValueError(f"train: resume must be one of {RESUME_MODES}, got {resume!r}")
    history: list[dict[str, float]] = []
    extended: list[list[int]] = []
    start = 0
    provenance = data_record(data) if checkpoint is not None else None
    if checkpoint is not None and Path(checkpoint).exists():
        ckpt = _read_checkpoint(checkpoint)
        if ckpt["model_config"] != model.config():
            raise ValueError(f"{checkpoint}: checkpoint is for a model {ckpt['model_config']}, not {model.config()}")
        _check_data(checkpoint, ckpt, provenance)
        extended = _check_resume(checkpoint, ckpt, config, resume)
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        for g, state in zip((generator, noise), ckpt["generator_states"]):
            g.set_state(state)
        start, history = ckpt["iteration"], ckpt["history"]
    elif config.data_init:
        pick = torch.randperm(data.x.shape[0], generator=torch.Generator().manual_seed(config.seed))[:INIT_SAMPLE]
        model.init_from_data(torch.as_tensor(np.asarray(data.x[pick.sort().values.numpy()])).float().to(device))
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    lambdas = (config.lambda1, config.lambda2, config.lambda3)
    batch = min(config.batch_sets, len(data))
    rank, world = distributed.rank_world()
    step = _data_parallel(model, lambdas, world, find_unused=model.classifier is not None and not use_labels)
    # the training data is read by the step's kernel itself when it is a tensor the kernel takes as it is
    read_in_kernel = (world == 1 and isinstance(data.x, torch.Tensor) and data.x.is_contiguous()
                      and loss_backward_fused(model, data.x))

    last_save = time.monotonic()
    saved = start if checkpoint is not None and start else None

    def save(iteration: int) -> None:
        nonlocal last_save, saved
        _check_weights(model, iteration, saved)
        if checkpoint is not None and rank == 0:
            save_checkpoint(checkpoint, model, optimizer, iteration, (generator, noise), config, history, extended,
                            provenance)
            saved = iteration
        last_save = time.monotonic()

    warned, low_since = False, None
    show = show_progress(progress) and rank == 0
    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations,
               disable=not show, desc="train FV-VAE", unit="it")
    with output_lock(checkpoint if rank == 0 else None, "checkpoint"), _deferred_interrupts() as interrupted:
        for it in bar:
            set_ids = torch.randperm(len(data), generator=generator)[:batch]
            rows, offsets, owner = data.sample(set_ids, config.descriptors_per_set, generator)
            labels = data.labels[set_ids][owner] if use_labels else None
            keep, eps = model.draw_noise(len(rows), noise, device)
            optimizer.zero_grad(set_to_none=True)
            if len(rows) == 0:  # only empty sets drawn (valid data): nothing to learn from, no step and no log row
                losses = None
            elif world == 1:  # the whole step in one C++ pass where it runs (ops.training.loss_backward)
                x, picked = (data.x, rows) if read_in_kernel else (data.rows(rows).to(device), None)
                losses = loss_backward(model, x, None if labels is None else labels.to(device), (keep, eps), lambdas,
                                       rows=picked)
            else:
                lo, hi = (int(offsets[len(set_ids) * r // world]) for r in (rank, rank + 1))  # this rank's sets
                part = slice(lo, hi)
                losses = step(data.rows(rows[part]).to(device), None if labels is None else labels[part].to(device),
                              (None if keep is None else keep[part], eps[part]), len(rows))
                losses[0].backward()
            if losses is not None:
                optimizer.step()
            if losses is not None and ((it + 1) % config.log_every == 0 or it + 1 == config.iterations):
                _check_weights(model, it + 1, saved)
                live = model.liveness(data.rows(rows[:LIVENESS_ROWS]).to(device))
                row = {"iteration": it + 1, **_summed(*losses), **live}
                history.append(row)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("iteration", "sigma_x_max")})
                if writer is not None:
                    for k, v in row.items():
                        if k != "iteration":
                            writer.add_scalar(f"{'decoder' if k in live else 'loss'}/{k}", v, it + 1)
                low_since = (low_since or it + 1) if live["active"] < LIVENESS_WARN else None
                if low_since is not None and it + 1 - low_since >= LIVENESS_PATIENCE and not warned and rank == 0:
                    warned = True
                    warnings.warn(f"train: iteration {it + 1}: only {100 * live['active']:.3g}% of the decoder's "
                                  f"pre-activations are active ({100 * live['alive']:.3g}% of units alive): the model is "
                                  f"collapsing and its Fisher vectors will be (nearly) zero", CollapseWarning, stacklevel=2)
            if show and it == start:
                timed_from = time.perf_counter()
            elif show and it == start + ESTIMATE_AFTER and it + 1 < config.iterations:
                each = (time.perf_counter() - timed_from) / ESTIMATE_AFTER
                tqdm.write(f"train: {config.iterations - start:,} iterations take about "
                           f"{duration(each * (config.iterations - start))} here ({1000 * each:.3g} ms each)",
                           file=sys.stderr)
            if ((it + 1) % config.checkpoint_every == 0 or it + 1 == config.iterations or interrupted
                    or time.monotonic() - last_save > CHECKPOINT_SECONDS):
                save(it + 1)
            if interrupted:
                bar.close()
                if writer is not None:
                    writer.close()
                where = f"checkpoint written at iteration {it + 1}" if checkpoint is not None else "no checkpoint file"
                raise KeyboardInterrupt(f"train: interrupted ({interrupted[0]}) at iteration {it + 1}; {where}")
    if writer is not None:
        writer.close()
    distributed.barrier()
    model.eval()
    return TrainResult(model=model, history=history, resumed_from=start)


class _PartLoss(torch.nn.Module):
    """The loss of one rank's part of a global batch: (total, rec, reg, cls).

    Each rank's total is ``world`` times its share of the batch loss (per-descriptor sums over the
    batch's descriptor count, 1/world of the descriptor-free terms): DistributedDataParallel
    averages the gradients over ranks, which gives the gradient of the whole batch's loss.
    """

    def __init__(self, model: FVVAE, lambdas: tuple[float, float, float], world: int) -> None:
        super().__init__()
        self.model, self.lambdas, self.world = model, lambdas, world

    def forward(self, x, labels, noise, num_rows):
        losses = self.model.loss(x, labels, self.lambdas, noise=noise, num_rows=num_rows, share=1.0 / self.world)
        return losses.total * self.world, losses.rec, losses.reg, losses.cls


def _data_parallel(model: FVVAE, lambdas: tuple[float, float, float], world: int, find_unused: bool):
    step = _PartLoss(model, lambdas, world)
    if world == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, find_unused_parameters=find_unused)


def _summed(total: torch.Tensor, rec: torch.Tensor, reg: torch.Tensor, cls: torch.Tensor) -> dict[str, float]:
    """The batch's loss terms: the ranks' parts added up (the same on every rank)."""
    world = distributed.rank_world()[1]
    values = torch.stack([rec, reg, cls, total / world]).detach().double().cpu()
    rec, reg, cls, total = distributed.all_reduce_sum(values).tolist()
    return {"rec": rec, "reg": reg, "cls": cls, "total": total}
