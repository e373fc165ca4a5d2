"""The jobs that train an FV-VAE on a descriptor store and use it (:mod:`.jobs`): train, fim, encode and
evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import distributed
from ..io import atomic_open, output_lock
from ..model import FVVAE
from ..provenance import check_trained_on
from ..train import SEED_RANGE, TrainConfig
from .job_common import (
    _MODEL,
    TRAIN_SPLITS,
    JobReport,
    _device_option,
    _positive,
    device_of,
    load_any_model,
    load_model_and_fim,
    provenance,
)
from .options import Job, JobError, hidden_layers, integer, number, numbers, option, positive_number

TEST_SPLITS = {"train": "test", "training": "validation"}
FIM_MODES = ("diagonal", "lowrank", "kronecker")


def _store_split(store, split: str | None) -> str | None:
    """None: the store's training split when it has one, else all items; 'all': all items."""
    if split == "all":
        return None
    if split is None:
        return next((s for s in TRAIN_SPLITS if s in store.splits()), None)
    if split not in store.splits():
        raise JobError(f"{store.path}: no split {split!r} (splits: {', '.join(map(repr, store.splits()))}; "
                       f"'all' for every item)")
    return split


@dataclass
class TrainJob(Job):
    """Train FV-VAE (AdaDelta, Algorithm 1) on the sets of a descriptor store. The checkpoint --out is
    rewritten atomically every --checkpoint-every iterations (and on Ctrl-C); rerunning resumes from it."""

    stage: ClassVar[str] = "train"
    descriptors: str = option(help="descriptor store (from `fvvae descriptors`)", required=True, input=True)
    out: str = option(help="checkpoint file (resumed when it exists)", required=True, output=True)
    split: str | None = option(help="train on this split (default: 'train' when the store has it, else all; 'all')")
    overwrite: bool = option(False, "start again instead of resuming from --out")
    extend: bool = option(False, "train the run in --out on to a larger --iterations (recorded in the checkpoint); "
                          "without it, resuming with any changed setting is refused")
    log_dir: str | None = option(help="write TensorBoard scalars (losses, decoder liveness, sigma_x) to this folder",
                                 output=True)
    latent_dim: int = option(_MODEL["latent_dim"].default, "d: the FV has C x (d+1) dimensions", parse=_positive)
    hidden_dim: int | list[int] | None = option(_MODEL["hidden_dim"].default, "encoder hidden layers: default (one "
                                                "of C), none, or sizes such as 512,512", parse=hidden_layers)
    norm: str = option("auto", "descriptor preprocessing; auto: map when the store was made with --map-scale, "
                       "else descriptor", choices=("auto", "descriptor", "map", "none"))
    norm_scale: float | None = option(help="norm='map' scale recorded in the model (default: the store's map scale)",
                                      parse=number)
    dropout: float = option(_MODEL["dropout"].default, "dropout on the encoder input", parse=number)
    num_classes: int | None = option(help="classifier on z (default: the store's classes; 0 = none)",
                                     parse=integer(0))
    iterations: int = option(TrainConfig.iterations, "AdaDelta iterations", parse=_positive)
    batch_sets: int = option(TrainConfig.batch_sets, "sets per mini-batch", parse=_positive)
    descriptors_per_set: int | None = option(help="random descriptors per set and iteration (default all; 50 = one "
                                             "video frame)", parse=_positive)
    lr: float = option(TrainConfig.lr, "AdaDelta learning rate", parse=positive_number)
    lambda3: float = option(TrainConfig.lambda3, "weight of the classification loss (0 = FV-VAE-)", parse=number)
    seed: int = option(TrainConfig.seed, "seed of everything random: initial weights, the data-dependent start, set "
                       "sampling, dropout, z noise", parse=integer(*SEED_RANGE))
    checkpoint_every: int = option(TrainConfig.checkpoint_every, "iterations between checkpoints", parse=_positive)
    device: str = _device_option()

    def run(self, progress: bool = True, say=print) -> JobReport:
        from ..store import Store
        from ..train import train

        self.refuse_outputs_in_inputs()
        store = Store.open(self.descriptors, kind="descriptors")
        split = _store_split(store, self.split)
        data = store.sets(split)
        map_scale = (store.config.get("source") or {}).get("map_scale")
        norm = self.norm if self.norm != "auto" else ("map" if map_scale else "descriptor")
        norm_scale = self.norm_scale if self.norm_scale is not None else float(map_scale or 1.0)
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = len(store.classes) if self.lambda3 != 0 and store.classes else 0
        if num_classes and len(data) and int(data.labels.min()) < 0:
            raise JobError(f"{store.path}: some training items have no label; use --lambda3 0 or --num-classes 0")
        model = FVVAE(in_dim=store.dim, latent_dim=self.latent_dim, num_classes=num_classes,
                      hidden_dim=self.hidden_dim, norm=norm, norm_scale=norm_scale, dropout=self.dropout,
                      seed=self.seed)
        config = TrainConfig(iterations=self.iterations, batch_sets=self.batch_sets, lr=self.lr, lambda3=self.lambda3,
                             descriptors_per_set=self.descriptors_per_set, seed=self.seed,
                             device=device_of(self.device), checkpoint_every=self.checkpoint_every)
        say(f"train: {len(data)} sets ({data.x.shape[0]} descriptors, C={store.dim}) of split "
            f"{split if split is not None else 'all'!r}; model {model.config()}")
        with output_lock(self.out if distributed.is_main() else None, "--out"):  # before --overwrite deletes it
            if self.overwrite and distributed.is_main():
                Path(self.out).unlink(missing_ok=True)
            distributed.barrier()
            t0 = time.perf_counter()
            result = train(model, data, config, checkpoint=self.out, progress=progress, log_dir=self.log_dir,
                           resume="extend" if self.extend else "exact")
        seconds = time.perf_counter() - t0
        done = config.iterations - result.resumed_from
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{k}={last[k]:.4g}" for k in ("rec", "reg", "cls", "total") if k in last)
        lines = [f"train: {done} iterations in {seconds:.1f} s (resumed from {result.resumed_from}); "
                 f"last losses: {losses or 'n/a'}"]
        if "active" in last:
            lines.append(f"decoder: {100 * last['active']:.1f}% of pre-activations active, {100 * last['alive']:.1f}% "
                         f"of units alive, sigma_x in [{last['sigma_x_min']:.3g}, {last['sigma_x_max']:.3g}]")
        lines.append(f"model: {self.out}")
        return JobReport(lines, {"iterations": done, "resumed_from": result.resumed_from, "seconds": seconds, **last})


@dataclass
class FimJob(Job):
    """One pass over the training sets of a descriptor store: a streaming estimate of the Fisher
    information F (Eq. 12; diagonal, diagonal + low rank, or Kronecker) saved for encode."""

    stage: ClassVar[str] = "fim"
    model: str = option(help="checkpoint from `fvvae train`, or a released .mat file", required=True, input=True)
    descriptors: str = option(help="descriptor store", required=True, input=True)
    out: str = option(help="FIM file to write", required=True, output=True)
    split: str | None = option(help="estimate on this split (default: 'train' when present, else all; 'all')")
    mode: str = option("diagonal", "estimate of F", choices=FIM_MODES)
    rank: int | None = option(help="--mode lowrank: rank k", parse=_positive)
    damping: float | None = option(help="floor relative to the mean diagonal (default: the estimator's; 0 = the "
                                   "release's normalize_raw_fv)", parse=number)
    batch_sets: int = option(32, "sets per batch", parse=_positive)
    device: str = _device_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "lowrank" and not self.rank:
            raise JobError("--mode lowrank needs --rank K")
        if self.mode != "lowrank" and self.rank:
            raise JobError(f"--rank is only for --mode lowrank, not {self.mode}")

    def run(self, progress: bool = True, say=print) -> JobReport:
        from ..store import Store
        from .stages import estimate_fim

        self.refuse_outputs_in_inputs()
        model = load_any_model(self.model)
        store = Store.open(self.descriptors, kind="descriptors")
        check_trained_on(model, self.model, store.config, self.descriptors)
        split = _store_split(store, self.split)
        t0 = time.perf_counter()
        with output_lock(self.out if distributed.is_main() else None, "--out"):
            fim = estimate_fim(model, store, mode=self.mode, rank=self.rank, damping=self.damping, split=split,
                               batch_sets=self.batch_sets, device=device_of(self.device), progress=progress)
            if distributed.is_main():
                fim.save(self.out)
        distributed.barrier()
        seconds = time.perf_counter() - t0
        return JobReport([f"fim: {fim!r} from {fim.num_sets} sets of split {split if split is not None else 'all'!r} "
                          f"in {seconds:.1f} s", f"fim: {self.out}"], {"sets": fim.num_sets, "seconds": seconds})


@dataclass
class EncodeJob(Job):
    """One Fisher vector per set: -F^(-1/2) vec(G_X), signed sqrt, L2 (Eq. 13), written shard by shard
    to a store; rerun to resume."""

    stage: ClassVar[str] = "encode"
    model: str = option(help="checkpoint from `fvvae train`, or a released .mat file", required=True, input=True)
    descriptors: str = option(help="descriptor store", required=True, input=True)
    out: str = option(help="Fisher-vector store folder (resumed when it exists)", required=True, output=True)
    fim: str | None = option(help="FIM file from `fvvae fim` (default: none, F = I)", input=True)
    overwrite: bool = option(False, "delete an existing store at --out first")
    normalize: bool = option(True, "signed square root and L2 normalisation")
    batch_sets: int = option(16, "sets per encoding batch", parse=_positive)
    device: str = _device_option()

    def run(self, progress: bool = True, say=print):
        """Write the store; returns the :class:`StageReport`."""
        from ..store import Store
        from .stages import encode_store

        self.refuse_outputs_in_inputs()
        model, fim = load_model_and_fim(self.model, self.fim)
        src = Store.open(self.descriptors, kind="descriptors")
        check_trained_on(model, self.model, src.config, self.descriptors)
        return encode_store(model, src, self.out, fim=fim, normalize=self.normalize, batch_sets=self.batch_sets,
                            device=device_of(self.device), overwrite=self.overwrite, progress=progress,
                            extra_config=provenance(self.model, self.fim))


@dataclass
class EvaluateJob(Job):
    """Train a one-vs-all linear SVM on the vectors of one split and report its top-1 and top-3
    accuracy and mAP on another (paper section 5.2). Several --fisher stores of the same items (RGB and flow streams):
    each stream's SVM and their late fusion (Table 4); test items stored as ten crops are scored by
    the mean over their crops."""

    stage: ClassVar[str] = "evaluate"
    fisher: tuple[str, ...] = option(help="Fisher-vector store(s) (from `fvvae encode`); several: late fusion",
                                     required=True, input=True, many=True)
    fusion_weights: tuple[float, ...] | None = option(help="weights of the streams' SVM scores, comma-separated "
                                                      "(default: 1 each)", parse=numbers)
    train_split: str | None = option(help="split the SVM is trained on (default: train, or ActivityNet's training)")
    test_split: str | None = option(help="split the accuracy is measured on (default: test, or ActivityNet's "
                                    "validation when training on training)")
    C: float = option(100.0, "SVM regularisation constant", parse=positive_number)
    json: str | None = option(help="also write the results to this JSON file", output=True)

    def run(self, progress: bool = True, say=print) -> JobReport:
        import json

        from ..store import Store
        from .stages import evaluate_stores

        self.refuse_outputs_in_inputs()
        if self.fusion_weights is not None and len(self.fusion_weights) != len(self.fisher):
            raise JobError(f"--fusion-weights: one weight per --fisher store ({len(self.fisher)}), got "
                           f"{len(self.fusion_weights)}")
        stores = [Store.open(path, kind="fisher") for path in self.fisher]
        train_split = self.train_split or next((s for s in TRAIN_SPLITS if s in stores[0].splits()), "train")
        test_split = self.test_split or TEST_SPLITS.get(train_split, "test")
        res = evaluate_stores(stores, train_split=train_split, test_split=test_split, C=self.C,
                              weights=None if self.fusion_weights is None else list(self.fusion_weights))
        if self.json:
            with atomic_open(self.json, "w") as f:
                json.dump(res, f, indent=2)
        lines = [f"evaluate: one-vs-all linear SVM (C={self.C:g}) on {res['train']} {train_split!r} vectors, "
                 f"{res['classes']} classes, tested on {res['test']} {test_split!r} items in {res['seconds']:.1f} s"]
        for path, stream in zip(self.fisher, res.get("streams", [])):
            lines.append(f"  {path}: top-1 {100 * stream['top1']:.2f}%, top-3 {100 * stream['top3']:.2f}%, "
                         f"mAP {100 * stream['mean_ap']:.2f}%")
        fused = f" (late fusion, weights {','.join(f'{w:g}' for w in res['weights'])})" if len(self.fisher) > 1 else ""
        lines.append(f"top-1 accuracy{fused}: {100 * res['top1']:.2f}%, top-3: {100 * res['top3']:.2f}%, "
                     f"mAP: {100 * res['mean_ap']:.2f}%")
        return JobReport(lines, res)
