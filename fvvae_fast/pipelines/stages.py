"""The stages after the descriptors: FIM estimation, encoding into a Fisher-vector store, a
the evaluation protocol of :mod:`fvvae_fast.evaluation.protocol`. Each reads a store written by
:func:`extract_descriptors` (memory-mapped) and works set batch by set batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..encode import degenerate_message, degenerate_rows, fisher_encode
from ..model import FVVAE
from ..store import MANIFEST, ShardResult, Store, StoreError, item_records
from ..threads import limit_torch_threads
from .sharded import ShardedStage, StageReport


def _check_dim(model: FVVAE, store: Store) -> None:
    if store.dim != model.in_dim:
        raise ValueError(f"{store.path}: descriptors have C={store.dim}, the model expects in_dim={model.in_dim}")


def set_batches(store: Store, split: str | None, batch_sets: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(x (n, C) float32, offsets (k+1,) int64, labels (k,)) batches of ``batch_sets`` sets, in item order."""
    return store.sets(split).batches(batch_sets)


def estimate_fim(
    model: FVVAE,
    store: Store,
    *,
    mode: str = "diagonal",
    rank: int | None = None,
    damping: float | None = None,
    split: str | None = "train",
    batch_sets: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """A :class:`fvvae_fast.fim.FisherInformation` estimated in one pass over the sets of ``split``."""
    from ..fim import FisherInformation

    _check_dim(model, store)
    kwargs = {} if damping is None else {"damping": damping}
    fim = FisherInformation(mode=mode, rank=rank, **kwargs)
    n = len(store.items(status="done", split=split))
    if n == 0:
        splits = ", ".join(map(repr, store.splits()))
        raise ValueError(f"{store.path}: no done item in split {split!r} (splits: {splits})")
    model = model.to(device).eval()
    me, world = distributed.rank_world()
    batches = _Batches(store, split, batch_sets, n, me, world)
    with torch.inference_mode():
        if len(batches):
            fim.estimate(model, batches, progress=progress and me == 0)
        fim.all_reduce()  # under torchrun: every rank's share merged; alone: nothing to do
    return fim


class _Batches:
    """A re-iterable, sized loader over the store's set batches (read lazily from the memory maps);
    batch i belongs to rank i mod world."""

    def __init__(self, store: Store, split: str | None, batch_sets: int, n: int, rank: int = 0, world: int = 1) -> None:
        self.store, self.split, self.batch_sets, self.n = store, split, batch_sets, n
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(range(self.rank, -(-self.n // self.batch_sets), self.world))

    def __iter__(self):
        for i, (x, offsets, _) in enumerate(set_batches(self.store, self.split, self.batch_sets)):
            if i % self.world == self.rank:
                yield x, offsets


@limit_torch_threads()
def encode_store(
    model: FVVAE,
    src: Store,
    out: str | os.PathLike,
    *,
    fim=None,
    normalize: bool = True,
    batch_sets: int = 16,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    extra_config: dict | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> StageReport:
    """Fisher vectors of every set of the descriptor store ``src`` into the store ``out``.

    ``out`` has the same items, shards and order as ``src``, one row of D = C (d+1) per item
    (:func:`fvvae_fast.fisher_encode`, with ``fim`` and ``normalize``); items that failed in
    ``src`` are failed here too. Resumable shard by shard like the descriptor stage; the store records the
    fingerprint of ``src``, and a rerun after ``src`` was rebuilt (same settings, other contents) redoes it all.
    """
    t0 = time.perf_counter()
    if src.kind != "descriptors":
        raise StoreError(f"{src.path}: holds {src.kind}, expected descriptors")
    _check_dim(model, src)
    if src.summary().pending:
        raise StoreError(f"{src.path}: the descriptor store is incomplete ({src.summary().line()}); finish it first")
    device = torch.device(device)
    model = model.to(device).eval()
    records = item_records(_Row(r) for r in src.items())
    dim = model.in_dim * (model.latent_dim + 1)
    config = {"stage": "encode", "descriptors": src.config, "normalize": normalize, **(extra_config or {}),
              "descriptors_fingerprint": src.fingerprint()}
    rebuilt = _rebuilt_input(out, config, "descriptors_fingerprint")
    with ShardedStage("encode", out, t0=t0, unit="set", kind="fisher", dim=dim, items=records, classes=src.classes,
                      dtype="float32", shard_items=src.shard_items, config=config,
                      overwrite=overwrite or rebuilt) as stage:
        store, pending = stage.store, stage.pending
        rows = src.items()
        by_shard: dict[int, list[dict]] = {}
        for r in rows:
            by_shard.setdefault(r["idx"] // src.shard_items, []).append(r)
        total = sum(len(by_shard[k]) for k in pending)
        degenerate = torch.zeros(2, dtype=torch.float64)  # all-zero, constant vectors computed here
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="encode", unit="set", disable=not progress or not distributed.is_main(),
                  dynamic_ncols=True) as bar:
            for shard in pending:
                results = _encode_shard(model, src, by_shard[shard], fim, normalize, batch_sets, device)
                arrays = [r.array for r in results if r.array is not None]
                if arrays:
                    degenerate += torch.tensor(degenerate_rows(torch.from_numpy(np.concatenate(arrays))))
                store.write_shard(shard, results)
                bar.update(len(results))
                if on_shard is not None:
                    on_shard(shard)
        zero, constant = (int(v) for v in distributed.all_reduce_sum(degenerate))
        computed = distributed.total(total)
        message = degenerate_message(zero, constant, computed, model.latent_dim)
        notes = [f"{src.path} changed since {out} was written: every vector redone"] if rebuilt else []
        return stage.report(computed=total, notes=notes + ([] if message is None else [f"warning: {message}"]))


def _rebuilt_input(out: str | os.PathLike, config: dict, key: str) -> bool:
    """Whether ``out`` is a store written with this ``config`` except for ``config[key]``, the fingerprint of an
    input rebuilt since: the store is stale and is redone (checked by the process that creates it)."""
    if not distributed.is_main() or not (Path(out) / MANIFEST).is_file():
        return False
    with Store.open(out) as old:
        before = old.config
    now = json.loads(json.dumps(config))
    return before.get(key) != now[key] and {**before, key: None} == {**now, key: None}


class _Row:
    def __init__(self, r: dict) -> None:
        self.item_id, self.label, self.split = r["item_id"], r["label"], r["split"]


def _encode_shard(model: FVVAE, src: Store, rows: list[dict], fim, normalize: bool, batch_sets: int,
                  device: torch.device) -> list[ShardResult]:
    results: dict[int, ShardResult] = {}
    done = [r for r in rows if r["status"] == "done"]
    for r in rows:
        if r["status"] != "done":
            results[r["idx"]] = ShardResult(r["idx"], error=f"no descriptors ({r['error']})")
    if done:
        data = src.shard_array(done[0]["shard"])
        with torch.inference_mode():
            for lo in range(0, len(done), batch_sets):
                part = done[lo : lo + batch_sets]
                a, b = part[0]["row"], part[-1]["row"] + part[-1]["rows"]
                x = torch.from_numpy(np.array(data[a:b], dtype=np.float32)).to(device)
                offsets = torch.tensor([r["row"] - a for r in part] + [b - a], dtype=torch.int64, device=device)
                fv = fisher_encode(model, x, offsets, fim=fim, normalize=normalize).float().cpu().numpy()
                for r, v in zip(part, fv):
                    results[r["idx"]] = ShardResult(r["idx"], array=v[None])
    return [results[r["idx"]] for r in rows]


def _check_fisher(store: Store) -> None:
    if store.kind != "fisher":
        raise StoreError(f"{store.path}: holds {store.kind}; evaluate needs the Fisher vectors of `fvvae encode`")


def _split_labels(store: Store, name: str) -> np.ndarray:
    """The labels (n,) int64 of the done items of split ``name``: there must be some, all labelled."""
    rows = store.items(status="done", split=name)
    if not rows:
        splits = ", ".join(map(repr, store.splits()))
        raise ValueError(f"{store.path}: no vector in split {name!r} (splits: {splits})")
    y = np.array([r["label"] for r in rows], dtype=np.int64)
    if (y < 0).any():
        raise ValueError(f"{store.path}: split {name!r} has unlabelled items")
    return y


def _split_vectors(store: Store, name: str):
    """The vectors of split ``name`` (row-sliceable, one per item, read lazily) and their labels (n,) int64."""
    x, y = store.array(name), _split_labels(store, name)
    if len(x) != len(y):
        raise StoreError(f"{store.path}: holds sets of several rows per item ({store.kind}), not one vector per item")
    return x, y


def evaluate_store(store: Store, *, train_split: str = "train", test_split: str = "test", C: float = 100.0) -> dict:
    """The evaluation protocol (:func:`fvvae_fast.evaluation.evaluate_vectors`: one-vs-all linear SVM,
    C = 100, top-1, top-3, mAP) trained on the Fisher vectors of ``train_split`` and tested on
    ``test_split`` of a Fisher-vector store, read from the memory maps block by block
    (:mod:`fvvae_fast.evaluation.streaming`: the memory does not grow with D). Vectors stored without
    signed sqrt + L2 get it here, so each is normalised exactly once."""
    from ..evaluation.streaming import evaluate_blocks

    _check_fisher(store)
    (X_train, y_train), (X_test, y_test) = (_split_vectors(store, name) for name in (train_split, test_split))
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"{store.path}: split {train_split!r} has fewer than 2 classes")
    scores = evaluate_blocks(X_train, y_train, X_test, y_test, C=C, normalize=not store.config.get("normalize", True))
    return {**scores.as_dict(), "seconds": scores.svm_seconds, "train": len(y_train), "test": len(y_test),
            "classes": int(len(np.unique(y_train)))}


def evaluate_stores(stores: list[Store], *, train_split: str = "train", test_split: str = "test", C: float = 100.0,
                    weights: list[float] | None = None) -> dict:
    """The protocol on several Fisher-vector stores of the same items (streams: RGB, flow, ...) and
    their late fusion (:func:`fvvae_fast.evaluation.fusion.fuse_decisions`, weighted sum of the SVMs'
    decision values); a test item stored as ten crops (``fvvae descriptors --crops 10``) is scored by
    the mean over its crops. Each stream's SVM reads its store block by block, as :func:`evaluate_store`
    does, so the memory does not grow with D."""
    from ..evaluation.fusion import fuse_decisions, fusion_weights
    from ..evaluation.streaming import block_decisions
    from .datasets import crop_parent

    crops = any(s.config.get("crops", 1) != 1 or s.config.get("descriptors", {}).get("crops", 1) != 1 for s in stores)
    if len(stores) == 1 and not crops and weights is None:
        return evaluate_store(stores[0], train_split=train_split, test_split=test_split, C=C)
    weights = fusion_weights(weights, len(stores))
    for s in stores:
        _check_fisher(s)
    ids = [[[r["item_id"] for r in s.items(status="done", split=name)] for name in (train_split, test_split)]
           for s in stores]
    splits = [[_split_vectors(s, name) for name in (train_split, test_split)] for s in stores]
    labels = [(train[1], test[1]) for train, test in splits]
    for s, i, y in zip(stores[1:], ids[1:], labels[1:]):
        if i != ids[0] or not all(np.array_equal(a, b) for a, b in zip(y, labels[0])):
            raise StoreError(f"{s.path} and {stores[0].path}: the stores hold other items or labels in splits "
                             f"{train_split!r}/{test_split!r}: fusion needs the same items in every stream")
    y_train, y_test = labels[0]
    decisions = [block_decisions(train[0], y_train, test[0], C=C, normalize=not s.config.get("normalize", True))
                 for s, (train, test) in zip(stores, splits)]
    parents = [crop_parent(i) for i in ids[0][1]]
    items = np.unique(parents, return_inverse=True)[1] if crops else None
    res = fuse_decisions(decisions, y_test, weights, items)
    fused = res.fused
    return {**fused.as_dict(), "seconds": fused.svm_seconds, "train": len(y_train),
            "test": len(set(parents)), "classes": int(len(np.unique(y_train))),
            "streams": [s.as_dict() for s in res.streams], "weights": list(res.weights)}
