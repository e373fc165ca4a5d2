"""The jobs that read the videos or images of a dataset through a backbone (:mod:`.jobs`): descriptors and
finetune."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .. import distributed
from ..finetune import MODES as FINETUNE_MODES
from ..finetune import FinetuneConfig
from ..io import load_npy, output_lock
from ..official import RELEASE_NORM_SCALE
from ..train import SEED_RANGE
from .backbones import PRECISIONS
from .datasets import ten_crops
from .extract import Encoding, default_workers
from .flow import FLOW_BOUND, FLOW_METHODS
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
from .options import Job, JobError, hidden_layers, integer, integer_in, integers, number, option
from .sources import DECODERS

DATASETS = ("ucf101", "cub", "activitynet", "folder", "arrays")
SOURCES = ("video", "image", "precomputed")
DEFAULT_SOURCE = {"ucf101": "video", "activitynet": "video", "cub": "image", "folder": "video", "arrays": "precomputed"}
DEFAULT_BACKBONE = {"video": "vgg19-pool5", "image": "vgg19-conv5_4"}
IMAGE_SIZE = 448  # the paper's image side (aspect ratio not kept)
MODALITIES = ("rgb", "flow")


@dataclass
class MediaJob(Job):
    """Base of the jobs that read the videos or images of a dataset through a backbone: their options
    and how they make the dataset, the source and the backbone."""

    dataset: str = option(help="layout: ucf101 (--root videos, --annotations ucfTrainTestlist/), cub (--root "
                          "CUB_200_2011/), activitynet (--annotations the v1.3 JSON, --root videos), folder (--root "
                          "with one folder per class, optionally under train/ test/), arrays (--arrays, --offsets)",
                          required=True, choices=DATASETS, group="dataset")
    root: str | None = option(help="dataset folder (videos, images, or per-item .npy files)", input=True,
                              group="dataset")
    annotations: str | None = option(help="UCF101: the folder of classInd.txt and the split lists (default: "
                                     "ROOT/ucfTrainTestlist or beside ROOT); ActivityNet: the JSON file", input=True,
                                     group="dataset")
    split: int = option(1, "UCF101 train/test split", parse=integer(1, 3), group="dataset")
    source: str | None = option(help="what an item is (default: video for ucf101/activitynet/folder, image for cub)",
                                choices=SOURCES, group="source and backbone")
    backbone: str | None = option(help="preset (vgg19-pool5, vgg19-conv5_4, resnet152-res5c, mobilenet_v2), any "
                                  "torchvision model name with --layer, or a timm model as timm:<name> with --layer "
                                  "(needs timm) (default: vgg19-pool5 for video, vgg19-conv5_4 for images)",
                                  group="source and backbone")
    layer: str | None = option(help="the layer whose output is the conv map (a torchvision feature-extraction node or "
                               "submodule name), overrides the preset's", group="source and backbone")
    weights: str | None = option(help="local state_dict file of the backbone, or a torchvision weight name "
                                 "(IMAGENET1K_V1, DEFAULT) whose file is in the torch hub cache; nothing is downloaded",
                                 input=True, group="source and backbone")
    random_weights: bool = option(False, "allow random backbone weights (tests only)", group="source and backbone")
    preprocess: str = option("torchvision", "torchvision: RGB, ImageNet mean/std; release: the released model's "
                             "Caffe input (240x320 resize, 224 crop, BGR minus [104,117,123])",
                             choices=("torchvision", "release"), group="source and backbone")
    map_scale: float | None = option(help="the release's whole-map L2 normalisation times this scale before pooling "
                                     f"({RELEASE_NORM_SCALE:g} for the released model)", parse=number,
                                     group="source and backbone")
    release: bool = option(False, "the released model's pipeline: vgg19-pool5, --preprocess release, --map-scale "
                           f"{RELEASE_NORM_SCALE:g} (give --weights: VGG-19 converted from Caffe)",
                           group="source and backbone")
    frames: int = option(25, "video: frames sampled uniformly over the clip", parse=_positive,
                         group="sampling and pooling")
    size: int | None = option(help="input size: video crop (default: the backbone weights' crop, 224 for most), "
                              "image side (default 448)", parse=_positive, group="sampling and pooling")
    resize: int | None = option(help="video, torchvision preprocessing: shorter side before the crop (default: the "
                                "weights' resize, scaled by --size / their crop)", parse=_positive,
                                group="sampling and pooling")
    levels: tuple[int, ...] = option((6, 3, 2, 1), "video: SPP grid sizes", parse=integers(1),
                                     group="sampling and pooling")
    box: bool = option(False, "images: crop to the bounding box first (CUB '+box')", group="sampling and pooling")
    decoder: str = option("pyav", "video decoder: pyav (seeks to the sampled frames), torchcodec (optional package "
                          "with FFmpeg's libraries; 1.6-1.8x faster on the CPU), torchcodec-cuda (torchcodec on the "
                          "GPU's NVDEC, in the main process: needs --workers 0 or none)", choices=DECODERS,
                          group="source and backbone")
    precision: str = option("fp32", "backbone arithmetic: fp32, bf16 (autocast), fp16 (autocast, CUDA only)",
                            choices=PRECISIONS, group="source and backbone")
    modality: str = option("rgb", "video: rgb frames, or flow: the optical flow from each sampled frame to the next "
                           "as an image (x, y, magnitude; the two-stream networks' input)", choices=MODALITIES,
                           group="source and backbone")
    flow_method: str = option("auto", "--modality flow: auto (TV-L1 when OpenCV has it, else Farneback), tvl1, "
                              "farneback, raft_small, raft_large (with --raft-weights)", choices=FLOW_METHODS,
                              group="source and backbone")
    flow_bound: float = option(FLOW_BOUND, "--modality flow: flow clipped at this many pixels before scaling to "
                               "0-255", parse=number, group="source and backbone")
    raft_weights: str | None = option(help="--modality flow: local weights file of torchvision's RAFT", input=True,
                                      group="source and backbone")
    flow_cache: str | None = option(help="--modality flow: keep the flow images in this folder and reuse them",
                                    output=True, group="source and backbone")
    workers: int | None = option(help="decoding worker processes (default: the available cores - 1; 0: decode in "
                                 "the main process)", parse=integer(0))
    device: str = _device_option()

    def _dataset(self, source_kind: str):
        from . import datasets as ds

        def need(name: str) -> Path:
            if getattr(self, name) is None:
                raise JobError(f"--dataset {self.dataset} needs --{name.replace('_', '-')}")
            return Path(getattr(self, name))

        if self.dataset == "ucf101":
            return ds.read_ucf101(need("root"), self.annotations, split=self.split)
        if self.dataset == "cub":
            return ds.read_cub(need("root"))
        if self.dataset == "activitynet":
            return ds.read_activitynet(need("annotations"), need("root"))
        exts = {"video": ds.VIDEO_EXTENSIONS, "image": ds.IMAGE_EXTENSIONS, "precomputed": (".npy",)}[source_kind]
        return ds.read_folder(need("root"), exts)

    def _pipeline(self, kind: str) -> tuple[str | None, str, float | None]:
        """(backbone name, preprocessing, map scale), --release applied."""
        if not self.release:
            return self.backbone, self.preprocess, self.map_scale
        if kind != "video":
            raise JobError("--release is the released model's video pipeline: use it with --source video")
        return self.backbone or "vgg19-pool5", "release", self.map_scale or RELEASE_NORM_SCALE

    def _frame_source(self, kind: str, preprocess: str, map_scale: float | None, backbone, say):
        """The source, preprocessed as ``backbone``'s weights expect (``say`` gets the notice when --size
        overrides their crop)."""
        from . import FlowSource, ImageSource, VideoSource
        from .sources import frame_settings

        settings, notice = frame_settings(backbone.transform, kind, self.size, self.resize, IMAGE_SIZE)
        if notice is not None and preprocess != "release":
            say(notice)
        if kind != "video":
            if self.modality != "rgb":
                raise JobError(f"--modality {self.modality} needs videos (optical flow between frames), not "
                               f"{kind} items")
            return ImageSource(preprocess=preprocess, map_scale=map_scale, use_box=self.box, **settings)
        video = dict(preprocess=preprocess, map_scale=map_scale, frames=self.frames, levels=self.levels,
                     decoder=self.decoder, **settings)
        if self.modality == "flow":
            return FlowSource(**video, flow_method=self.flow_method, flow_bound=self.flow_bound,
                              raft_weights=self.raft_weights, flow_cache=self.flow_cache)
        return VideoSource(**video)

    def _backbone(self, name: str | None, kind: str, device: str):
        from . import build_backbone

        return build_backbone(name or DEFAULT_BACKBONE[kind], self.layer, weights=self.weights,
                              random_weights=self.random_weights, seed=self.seed, device=device,
                              precision=self.precision)


@dataclass
class DescriptorsJob(MediaJob):
    """Decode the items of a dataset, run a backbone, pool the conv maps into descriptors (video: 25
    frames x 50 SPP descriptors; image: 448x448 -> 28x28 = 784) and write one set per item to a
    sharded store. Rerun to resume after a crash; unreadable items are skipped, logged and counted."""

    stage: ClassVar[str] = "descriptors"
    out: str = option(help="store folder (created, or resumed when it exists)", required=True, output=True, group="output")
    subset: tuple[str, ...] | None = option(help="only the items of these splits (e.g. train test)", many=True,
                                            group="dataset")
    arrays: str | None = option(help="--dataset arrays: (N, C) .npy of descriptors", input=True, group="dataset")
    offsets: str | None = option(help="--dataset arrays: (S+1,) int .npy, set s = rows offsets[s]:offsets[s+1]",
                                 input=True, group="dataset")
    labels: str | None = option(help="--dataset arrays: (S,) int .npy of labels (optional)", input=True,
                                group="dataset")
    splits: str | None = option(help="--dataset arrays: text file, one split name per set (optional)", input=True,
                                group="dataset")
    seed: int = option(0, "seed of the random backbone weights", parse=integer(*SEED_RANGE),
                       group="source and backbone")
    overwrite: bool = option(False, "delete an existing store at --out first", group="output")
    shard_items: int = option(32, "items per shard: the unit of resumption; a shard's descriptors stay in memory "
                              "until written", parse=_positive, group="output")
    batch_frames: int = option(64, "frames per backbone batch", parse=_positive, group="output")
    compile: bool = option(False, "compile the backbone with torch.compile: a one-off compilation per batch shape "
                           "(tens of seconds), then faster batches (GPU nodes)", group="source and backbone")
    dtype: str = option("float32", "stored descriptor type", choices=("float32", "float16"), group="output")
    crops: int = option(1, "1: the centre crop; 10: each test item as ten sets (four corners, centre, their "
                        "mirrors), whose SVM scores `fvvae evaluate` averages (videos)", parse=integer_in((1, 10)),
                        group="sampling and pooling")
    model: str | None = option(help="one pass: write the Fisher vectors of this FV-VAE (a checkpoint of `fvvae train` "
                               "or a released .mat) straight from the frames, no descriptor store", input=True,
                               group="one pass to Fisher vectors")
    fim: str | None = option(help="with --model: the FIM file of `fvvae fim`", input=True,
                             group="one pass to Fisher vectors")
    normalize: bool = option(True, "with --model: signed square root and L2 normalisation",
                             group="one pass to Fisher vectors")

    def _arrays(self):
        import numpy as np

        from .datasets import Dataset
        from .sources import array_items

        if self.arrays is None or self.offsets is None:
            raise JobError("--dataset arrays needs --arrays X.npy (N, C) and --offsets OFFSETS.npy (S+1,)")
        x = load_npy(self.arrays, "(N, C) descriptors", "fiu", mmap=True, error=JobError)
        offsets = load_npy(self.offsets, "(S+1,) integer offsets", "iu", error=JobError)
        if x.ndim != 2:
            raise JobError(f"{self.arrays}: expected an (N, C) array, got shape {x.shape}")
        labels = load_npy(self.labels, "(S,) integer labels", "iu", error=JobError) if self.labels else None
        if labels is not None and labels.ndim != 1:
            raise JobError(f"{self.labels}: expected (S,) labels, got shape {labels.shape}")
        splits = None
        if self.splits:
            try:
                text = Path(self.splits).read_text()
            except UnicodeDecodeError as err:
                raise JobError(f"{self.splits}: not a text file of split names ({err.reason} at byte "
                               f"{err.start})") from None
            if "\0" in text:
                raise JobError(f"{self.splits}: not a text file of split names (it holds NUL bytes)")
            splits = [line.strip() for line in text.splitlines()]
            splits = [s for s in splits if s != ""] if len(splits) != len(offsets) - 1 else splits
        items = array_items(x, offsets, labels, splits)
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None and len(labels) else []
        return Dataset(Path(self.arrays).stem, items, classes), (x, np.asarray(offsets, dtype=np.int64))

    def run(self, progress: bool = True, say=print):
        """Write the store; returns the :class:`StageReport`. ``say`` gets the opening line."""
        from . import PrecomputedSource, extract_descriptors

        self.refuse_outputs_in_inputs()
        kind = self.source or DEFAULT_SOURCE[self.dataset]
        if self.dataset == "arrays" and kind != "precomputed":
            raise JobError("--dataset arrays holds precomputed descriptors: use --source precomputed")
        if self.compile and kind == "precomputed":
            raise JobError("--compile compiles the backbone: precomputed descriptors have none")
        backbone_name, preprocess, map_scale = self._pipeline(kind)
        dataset, arrays = self._arrays() if self.dataset == "arrays" else (self._dataset(kind), None)
        if self.subset:
            dataset = dataset.split(*self.subset)
            if not dataset.items:
                raise JobError(f"no item in subset(s) {', '.join(self.subset)}")
        if self.crops != 1:
            if kind != "video":
                raise JobError(f"--crops {self.crops} is for videos, not {kind} items")
            dataset = ten_crops(dataset, [s for s in dataset.splits() if s not in TRAIN_SPLITS])
        if self.fim is not None and self.model is None:
            raise JobError("--fim is for the one pass to Fisher vectors: give --model too")
        device = device_of(self.device)
        backbone = None
        if kind == "precomputed":
            source = PrecomputedSource(arrays=arrays)
        else:
            backbone = self._backbone(backbone_name, kind, device)
            source = self._frame_source(kind, preprocess, map_scale, backbone, say)
            if self.compile:
                backbone.compile()
        encoding = None if self.model is None else Encoding(*load_model_and_fim(self.model, self.fim),
                                                            normalize=self.normalize,
                                                            provenance=provenance(self.model, self.fim))
        splits = ", ".join(repr(s) for s in dataset.splits())
        say(f"descriptors: {len(dataset.items)} {kind} items of {dataset.name} ({len(dataset.classes)} classes, "
            f"splits: {splits}) -> {'Fisher vectors ' if encoding else ''}{self.out}")
        return extract_descriptors(source, dataset, self.out, backbone, shard_items=self.shard_items,
                                   batch_frames=self.batch_frames, workers=self.workers, device=device,
                                   dtype=self.dtype, overwrite=self.overwrite, progress=progress,
                                   extra_config={"crops": self.crops} if self.crops != 1 else None, encoding=encoding)


@dataclass
class FinetuneJob(MediaJob):
    """Fine-tune a backbone on the frames or images of a dataset's training split (SGD with momentum):
    --mode classifier (softmax on the average-pooled map), fvvae (end to end through the FV-VAE
    losses, Eq. 8, on the pooled descriptors) or head (a linear classifier on the normalised Fisher
    vector). Writes --out, a state_dict for `fvvae descriptors --weights`, and with --model-out the
    FV-VAE (modes fvvae, head). The checkpoint is rewritten as it goes (and on Ctrl-C); rerunning resumes."""

    stage: ClassVar[str] = "finetune"
    out: str = option(help="backbone weights file to write (a torchvision state_dict for --weights)", required=True,
                      output=True, group="output")
    mode: str = option(FinetuneConfig.mode, "classifier: softmax on the global pooled map (Table 3 'fine-tuned'); "
                       "fvvae: end to end with the Eq. 8 losses; head: linear classifier on the Fisher vector",
                       choices=FINETUNE_MODES, group="fine-tuning")
    trainable: str = option(FinetuneConfig.trainable, "backbone layers trained, the rest frozen: all, a count of last "
                            "blocks (2: e.g. features.32,features.34 of VGG-19), or names such as "
                            "features.28,features.30", group="fine-tuning")
    train_split: str | None = option(help="the split trained on (default: train, or ActivityNet's training)",
                                     group="dataset")
    model_out: str | None = option(help="modes fvvae, head: write the FV-VAE checkpoint here (for fim, encode)",
                                   output=True, group="output")
    init_model: str | None = option(help="modes fvvae, head: start from this FV-VAE checkpoint (`fvvae train` on this "
                                    "backbone's descriptors; default: a new one)", input=True, group="fine-tuning")
    checkpoint: str | None = option(help="training checkpoint, resumed when it exists (default: OUT.ckpt)",
                                    output=True, group="output")
    overwrite: bool = option(False, "start again instead of resuming from the checkpoint", group="output")
    extend: bool = option(False, "train the run of the checkpoint on to a larger --iterations", group="output")
    log_dir: str | None = option(help="write TensorBoard scalars (the losses) to this folder",
                                 output=True, group="output")
    checkpoint_every: int = option(FinetuneConfig.checkpoint_every, "steps between checkpoints", parse=_positive,
                                   group="output")
    iterations: int = option(FinetuneConfig.iterations, "SGD steps", parse=_positive, group="fine-tuning")
    batch_items: int = option(FinetuneConfig.batch_items, "videos or images per step", parse=_positive,
                              group="fine-tuning")
    frames_per_item: int = option(FinetuneConfig.frames_per_item, "video: frames per video and step, drawn among "
                                  "the --frames sampled ones (the paper: one)", parse=_positive, group="fine-tuning")
    lr: float = option(FinetuneConfig.lr, "SGD learning rate", parse=number, group="fine-tuning")
    momentum: float = option(FinetuneConfig.momentum, "SGD momentum", parse=number, group="fine-tuning")
    weight_decay: float = option(FinetuneConfig.weight_decay, "weight decay of weights and kernels", parse=number,
                                 group="fine-tuning")
    amp: str = option(FinetuneConfig.amp, "mixed precision on CUDA: auto (bf16 there, off on CPU), off, bf16, fp16",
                      choices=("auto", "off", "bf16", "fp16"), group="fine-tuning")
    lambda3: float = option(FinetuneConfig.lambda3, "mode fvvae: weight of the classification loss", parse=number,
                            group="fine-tuning")
    latent_dim: int = option(FinetuneConfig.latent_dim, "modes fvvae, head: d of a new FV-VAE", parse=_positive,
                             group="fine-tuning")
    hidden_dim: int | list[int] | None = option(_MODEL["hidden_dim"].default, "modes fvvae, head: encoder hidden "
                                                "layers of a new FV-VAE (default, none, or sizes)",
                                                parse=hidden_layers, group="fine-tuning")
    dropout: float = option(FinetuneConfig.dropout, "mode fvvae: dropout on the FV-VAE encoder input", parse=number,
                            group="fine-tuning")
    seed: int = option(FinetuneConfig.seed, "seed of everything random: new layers, items, frames, noise (and "
                       "random backbone weights)", parse=integer(0, SEED_RANGE[1]), group="fine-tuning")

    def run(self, progress: bool = True, say=print) -> JobReport:
        from ..finetune import finetune

        self.refuse_outputs_in_inputs()
        kind = self.source or DEFAULT_SOURCE[self.dataset]
        if kind == "precomputed" or self.dataset == "arrays":
            raise JobError("finetune trains a backbone on videos or images: --source video or image, not "
                           "precomputed descriptors")
        if self.mode == "classifier" and (self.init_model or self.model_out):
            raise JobError("--init-model and --model-out are for --mode fvvae or head (an FV-VAE is trained there)")
        backbone_name, preprocess, map_scale = self._pipeline(kind)
        dataset = self._dataset(kind)
        split = self.train_split or next((s for s in TRAIN_SPLITS if s in dataset.splits()), None)
        if split is None or split not in dataset.splits():
            raise JobError(f"{dataset.name}: no training split {split or ' or '.join(map(repr, TRAIN_SPLITS))} "
                           f"(splits: {', '.join(map(repr, dataset.splits()))}); choose one with --train-split")
        device = device_of(self.device)
        backbone = self._backbone(backbone_name, kind, device)
        source = self._frame_source(kind, preprocess, map_scale, backbone, say)
        init = load_any_model(self.init_model) if self.init_model else None
        config = FinetuneConfig(
            mode=self.mode, trainable=self.trainable, iterations=self.iterations, batch_items=self.batch_items,
            frames_per_item=self.frames_per_item, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, amp=self.amp, lambda3=self.lambda3, latent_dim=self.latent_dim,
            hidden_dim=self.hidden_dim, dropout=self.dropout, seed=self.seed, device=device,
            workers=self.workers if self.workers is not None else default_workers(),
            checkpoint_every=self.checkpoint_every)
        checkpoint = self.checkpoint or f"{self.out}.ckpt"
        train_items = dataset.split(split)
        say(f"finetune: {len(train_items)} {kind} items of {dataset.name} split {split!r} ({len(dataset.classes)} "
            f"classes), {backbone.arch} up to {backbone.layer}, mode {self.mode}, trainable {self.trainable}")
        with output_lock(checkpoint if distributed.is_main() else None, "--checkpoint"):  # before --overwrite
            if self.overwrite and distributed.is_main():
                Path(checkpoint).unlink(missing_ok=True)
            distributed.barrier()
            t0 = time.perf_counter()
            result = finetune(backbone, source, train_items, config, out=self.out, model_out=self.model_out,
                              init_model=init, checkpoint=checkpoint, log_dir=self.log_dir, progress=progress,
                              resume="extend" if self.extend else "exact")
        seconds = time.perf_counter() - t0
        done = config.iterations - result.resumed_from
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "iteration")
        lines = [f"finetune: {done} steps in {seconds:.1f} s (resumed from {result.resumed_from}); last losses: "
                 f"{losses or 'n/a'}", f"backbone weights: {self.out}"]
        if self.model_out:
            lines.append(f"FV-VAE: {self.model_out}")
        return JobReport(lines, {"steps": done, "resumed_from": result.resumed_from, "seconds": seconds, **last})
