"""The descriptor stage: items -> decode -> preprocess -> backbone -> pooling -> a resumable store.

Decoding runs in DataLoader worker processes, which hand uint8 frames to the main process (a GPU
decoder, ``torchcodec-cuda``, runs in the main process and its frames are on the device already);
there each item's frames go to the backbone's device (through reusable pinned host buffers
on CUDA), are resized, cropped and normalised there (:meth:`FrameSource.prepare`), and the
frames of several items are batched together through the backbone (``batch_frames`` frames
at a time). Descriptors stay on the device until their shard is done; a background thread
copies them to the host and writes the shard (atomically) while the next shard runs.
Batches never straddle a shard, and a shard's batches depend only on its items, so a
restarted run recomputes an unfinished shard exactly as the first run would have (same
batches, same bytes, given the same device, threads and ``batch_frames``; on CUDA cuDNN's
autotuned convolution algorithms may differ between runs, which changes float rounding
only). An item whose file cannot be read is skipped with its reason and the run goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..provenance import check_trained_on
from ..store import ShardResult, Store, item_records
from ..threads import cpu_quota
from .backbones import Backbone
from .datasets import Dataset, Item, crop_parent
from .inputs import Signer, record, stale_shards
from .sharded import ShardedStage, StageReport
from .sources import DEVICE_DECODERS, FrameSource, PrecomputedSource, VideoSource

log = logging.getLogger("fvvae_fast")


def _reason(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Loads(torch.utils.data.Dataset):
    """(shard, idxs, item) -> (shard, idxs, loaded tensor or None, error text or None); runs in workers.
    ``idxs``: the store rows that share the item's frames (the ten crops of one video: decoded once)."""

    def __init__(self, work: list[tuple[int, list[int], Item]], source) -> None:
        self.work, self.source = work, source

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, k: int):
        shard, idxs, item = self.work[k]
        try:
            return shard, idxs, self.source.load(item), None
        except Exception as err:  # a bad item must never stop the run: it is recorded and skipped
            return shard, idxs, None, _reason(err)


def _loads_of(work: list[tuple[int, int, Item]]) -> list[tuple[int, list[int], Item]]:
    """``work`` (shard, store row, item) grouped into loads: consecutive crops of one file in one shard
    share a load (an item's crop is applied after loading, by :meth:`FrameSource.prepare`)."""
    loads: list[tuple[int, list[int], Item]] = []
    for shard, idx, item in work:
        last = loads[-1] if loads else None
        if (last is not None and item.crop is not None and last[2].crop is not None and last[0] == shard
                and crop_parent(last[2].id) == crop_parent(item.id)):
            last[1].append(idx)
        else:
            loads.append((shard, [idx], item))
    return loads


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers: one thread each, the backbone keeps the cores


def default_workers() -> int:
    """Decoding workers by default: the CPUs this process may use (:func:`fvvae_fast.threads.cpu_quota`: affinity
    and cgroup quota), shared by the ranks torchrun started on this machine, less one for the main process."""
    return max(0, cpu_quota() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


class _Staging:
    """Host-to-device copies of items' frames: on CUDA through two reusable pinned buffers taken
    in turn (a buffer is refilled once its previous copy has finished) and non-blocking copies;
    elsewhere the tensor itself."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[Tensor | None] = [None, None]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def __call__(self, frames: Tensor) -> Tensor:
        if self.device.type != "cuda" or frames.device.type == "cuda":  # (decoded on the GPU already)
            return frames.to(self.device)
        k, self.turn = self.turn, 1 - self.turn
        if self.copied[k] is not None:
            self.copied[k].synchronize()
        buf = self.buffers[k]
        if buf is None or buf.dtype != frames.dtype or buf.numel() < frames.numel():
            buf = self.buffers[k] = torch.empty(frames.numel(), dtype=frames.dtype, pin_memory=True)
        host = buf[: frames.numel()].view(frames.shape)
        host.copy_(frames)
        out = host.to(self.device, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record()
        return out


@dataclass
class Encoding:
    """Fisher vectors written in place of the descriptors: one pass from frames to a Fisher-vector
    store (:func:`fvvae_fast.fisher_encode` of each item's descriptors with ``model``, ``fim``,
    ``normalize``), the descriptors never written."""

    model: torch.nn.Module
    fim: object | None = None
    normalize: bool = True
    provenance: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.model.in_dim * (self.model.latent_dim + 1)

    def config(self) -> dict:
        return {"normalize": self.normalize, **self.provenance}

    def __call__(self, x: Tensor, offsets: Tensor) -> Tensor:
        from ..encode import fisher_encode

        device = next(self.model.parameters()).device
        return fisher_encode(self.model, x.to(device), offsets.to(device), fim=self.fim, normalize=self.normalize)


class _ShardRun:
    """Collects the items of one shard, runs the backbone in batches of ``batch_frames`` frames;
    the descriptors (or, with an :class:`Encoding`, the Fisher vectors made from them when the shard
    closes) stay on the device until :meth:`results` (on the writer thread)."""

    def __init__(self, shard: int, source, backbone: Backbone | None, dim: int, batch_frames: int,
                 staging: _Staging, encoding: Encoding | None = None) -> None:
        self.shard, self.source, self.backbone, self.dim = shard, source, backbone, dim
        self.batch_frames, self.staging, self.encoding = batch_frames, staging, encoding
        self.order: list[int] = []
        self.errors: dict[int, str] = {}
        self.chunks: dict[int, list[Tensor]] = {}
        self.queue: list[tuple[int, Tensor]] = []
        self.queued = 0

    @torch.inference_mode()
    def add(self, idx: int, data: Tensor | None, error: str | None, crop: int | None = None) -> None:
        self.order.append(idx)
        if error is not None:
            self.errors[idx] = error
            return
        if self.backbone is None:  # precomputed descriptors
            if data.dim() != 2 or data.shape[1] != self.dim:
                self.errors[idx] = f"descriptors of shape {tuple(data.shape)}, expected (n, {self.dim})"
            else:
                self.chunks[idx] = [data]
            return
        frames = self.source.prepare(self.staging(data), crop)
        self.chunks[idx] = []
        self.queue.append((idx, frames))
        self.queued += frames.shape[0]
        while self.queued >= self.batch_frames:
            self._run(self.batch_frames)

    @torch.inference_mode()
    def _run(self, count: int) -> None:
        pieces, owners, taken = [], [], 0
        while taken < count:
            idx, frames = self.queue[0]
            n = min(frames.shape[0], count - taken)
            pieces.append(frames[:n])
            owners.append((idx, n))
            taken += n
            if n == frames.shape[0]:
                self.queue.pop(0)
            else:
                self.queue[0] = (idx, frames[n:])
        self.queued -= taken
        desc = self.source.descriptors(self.backbone(torch.cat(pieces))).float()  # (count, K, C), on the device
        start = 0
        for idx, n in owners:
            self.chunks[idx].append(desc[start : start + n].reshape(-1, desc.shape[-1]))
            start += n

    @torch.inference_mode()
    def close(self) -> None:
        """Run the frames still queued, and the encoding (main thread)."""
        if self.queued:
            self._run(self.queued)
        if self.encoding is None:
            return
        finite = []
        for idx in self.order:
            if idx in self.errors:
                continue
            part = torch.cat(self.chunks[idx])
            if bool(torch.isfinite(part).all()):
                finite.append((idx, part))
            else:
                self.errors[idx] = "non-finite descriptors (NaN or Inf): the item is skipped, never encoded"
        if finite:
            lengths = torch.tensor([len(part) for _, part in finite], device=finite[0][1].device)
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            vectors = self.encoding(torch.cat([part for _, part in finite]), offsets).float()
            for (idx, _), v in zip(finite, vectors):
                self.chunks[idx] = [v[None]]

    @torch.inference_mode()
    def results(self) -> list[ShardResult]:
        out = []
        for idx in self.order:
            array = None if idx in self.errors else torch.cat(self.chunks[idx]).cpu()
            if array is not None and not bool(torch.isfinite(array).all()):
                self.errors[idx] = "non-finite descriptors (NaN or Inf): the item is skipped, never trained on"
            if idx in self.errors:
                out.append(ShardResult(idx, error=self.errors[idx]))
            else:
                out.append(ShardResult(idx, array=array.numpy()))
        return out


class _ShardWriter:
    """Writes finished shards on a background thread, at most ``depth`` waiting: the descriptors'
    copy to the host and the store's atomic write leave the main loop. The thread's error is
    raised in the main thread at the next :meth:`submit` or at :meth:`close`."""

    def __init__(self, store: Store, on_shard: Callable[[int], None] | None, signatures: dict[int, dict],
                 depth: int = 2) -> None:
        self.store, self.on_shard, self.signatures = store, on_shard, signatures
        self.queue: queue.Queue[_ShardRun | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="fvvae-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (run := self.queue.get()) is not None:
            if self.error is not None:  # keep draining so that the main thread never blocks on a full queue
                continue
            try:
                record(self.store, run.shard, self.signatures[run.shard])
                self.store.write_shard(run.shard, run.results())
                if self.on_shard is not None:
                    self.on_shard(run.shard)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, run: _ShardRun) -> None:
        self._raise()
        run.close()
        self.queue.put(run)

    def close(self) -> None:
        """Wait until every submitted shard is written; raise the thread's error if any."""
        self.queue.put(None)
        self.thread.join()
        self._raise()


def extract_descriptors(
    source: FrameSource | PrecomputedSource,
    dataset: Dataset,
    out: str | os.PathLike,
    backbone: Backbone | None = None,
    *,
    shard_items: int = 32,
    batch_frames: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    extra_config: dict | None = None,
    on_shard: Callable[[int], None] | None = None,
    encoding: Encoding | None = None,
) -> StageReport:
    """Compute the descriptor sets of ``dataset`` into the store ``out`` (created or resumed).

    Args:
        source: a :class:`VideoSource`, :class:`ImageSource` or :class:`PrecomputedSource`.
        dataset: the items (ids, files, labels, splits) and class names.
        backbone: the CNN for video/image sources (:func:`build_backbone`); None for precomputed.
        shard_items: items per store shard (the unit of resumption).
        batch_frames: frames per backbone forward pass (frames of several items together).
        workers: DataLoader worker processes decoding ahead of the backbone (0: in the main process;
            None: :func:`default_workers`, the available cores less one).
        device: where frames are preprocessed and the backbone runs (on CUDA cuDNN autotuning is
            turned on).
        dtype: the stored descriptors' dtype (``float32`` or ``float16``).
        on_shard: called with each shard number once it is written, from the writer thread (tests,
            progress hooks).
        encoding: write each item's Fisher vector (one row of C (d+1)) instead of its descriptors:
            a Fisher-vector store, as :func:`encode_store` would make from the descriptor store.

    Returns a :class:`StageReport`. Items that fail to load are stored as failed with their reason. A rerun
    computes again the shards holding failed items or items whose input changed (:mod:`.inputs`).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if isinstance(source, PrecomputedSource):
        if backbone is not None:
            raise ValueError("extract_descriptors: precomputed descriptors take no backbone")
        dim, unit = source.dim(dataset.items), "item"
    else:
        if backbone is None:
            raise ValueError(f"extract_descriptors: the {source.kind} source needs a backbone")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: autotuned convolutions pay off
        backbone = backbone.to(device).eval()
        dim = backbone.output_shape(*source.input_size)[0]
        if isinstance(source, VideoSource):
            source.check_maps(backbone)
        unit = source.kind
    on_device = getattr(source, "decoder", None) in DEVICE_DECODERS
    if on_device and workers:
        raise ValueError(f"extract_descriptors: decoder={source.decoder!r} decodes on the GPU in the main process "
                         f"(CUDA cannot run in worker processes): need workers=0, got {workers}")
    workers = 0 if on_device else default_workers() if workers is None else workers
    if batch_frames < 1 or workers < 0:
        raise ValueError(f"extract_descriptors: need batch_frames >= 1 and workers >= 0, got {batch_frames}, {workers}")
    config = {"stage": "descriptors", "dataset": dataset.name, "source": source.config(),
              "backbone": None if backbone is None else backbone.config(), **(extra_config or {})}
    kind, in_dim = "descriptors", dim
    if encoding is not None:
        if encoding.model.in_dim != dim:
            raise ValueError(f"extract_descriptors: the descriptors have C={dim}, the model expects "
                             f"in_dim={encoding.model.in_dim}")
        check_trained_on(encoding.model, "the model", config, f"{out} (this run)")
        encoding.model.to(device).eval()
        kind, dim, dtype = "fisher", encoding.dim, "float32"
        config = {**config, "stage": "descriptors+encode", **encoding.config()}
    by_id = {it.id: it for it in dataset.items}
    signer = Signer(source)
    with ShardedStage("descriptors", out, t0=t0, unit=unit, kind=kind, dim=dim, items=item_records(dataset.items),
                      classes=dataset.classes, dtype=dtype, shard_items=shard_items, config=config,
                      overwrite=overwrite, redo=lambda store: stale_shards(store, signer, by_id)) as stage:
        store = stage.store
        work = [(shard, idx, by_id[item_id]) for shard in stage.pending
                for idx, item_id, _, _ in store.items_of_shard(shard)]
        signatures: dict[int, dict] = {}
        for shard, _, item in work:  # before the inputs are read: a file changed meanwhile is redone next time
            signatures.setdefault(shard, {})[item.id] = signer(item)
        loader = torch.utils.data.DataLoader(
            _Loads(_loads_of(work), source), batch_size=None, shuffle=False, num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None, persistent_workers=False,
        )
        from tqdm.auto import tqdm

        failed_now = 0
        run: _ShardRun | None = None
        staging = _Staging(device)
        writer = _ShardWriter(store, on_shard, signatures)
        items = {idx: item for _, idx, item in work}
        try:
            with tqdm(total=len(work), desc="descriptors", unit=unit,
                      disable=not progress or not distributed.is_main(), dynamic_ncols=True) as bar:
                for shard, idxs, data, error in loader:
                    if run is not None and run.shard != shard:
                        writer.submit(run)
                        run = None
                    if run is None:
                        run = _ShardRun(shard, source, backbone, in_dim, batch_frames, staging, encoding)
                    for idx in idxs:
                        if error is not None:
                            failed_now += 1
                            msg = f"skipped {items[idx].id}: {error}"
                            if progress:
                                bar.write(msg)
                                log.info(msg)
                            else:
                                log.warning(msg)
                        run.add(idx, data, error, items[idx].crop)
                        bar.update(1)
                    bar.set_postfix(failed=failed_now, refresh=False)
                if run is not None:
                    writer.submit(run)
        finally:
            writer.close()
        return stage.report(computed=len(work), failed_now=failed_now)


def descriptors_of(source: FrameSource, backbone: Backbone, frames: Tensor) -> np.ndarray:
    """Descriptors of one item's frames (no store): ``frames`` (T, 3, H, W) uint8 as
    :meth:`FrameSource.load` gives them (preprocessed here, on the backbone's device) or
    float already preprocessed -> (T * K, C) float32."""
    with torch.inference_mode():
        p = next(backbone.parameters(), None)
        frames = frames.to(p.device if p is not None else "cpu")
        if not frames.is_floating_point():
            frames = source.prepare(frames)
        if isinstance(source, VideoSource):
            source.check_maps(backbone)
        maps = backbone(frames)
        return source.descriptors(maps).float().cpu().reshape(-1, maps.shape[1]).numpy()
