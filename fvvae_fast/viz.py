"""Pictures of the evaluation (matplotlib, Agg, PNG written atomically): Fig. 4(a-c), 5 and 6."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _titled(ax, title: str, settings: str) -> None:
    """The figure's title, with the settings it was measured under on a second line."""
    ax.set_title(f"{title}\n{settings}" if settings else title, fontsize=9)


def plot_dimension(rows: Sequence[dict], path: str | os.PathLike, settings: str = "") -> Path:
    """Fig. 4(a): top-1 against dimension (log 2), one line per method of the ``fig4a`` rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["group"] == "fig4a"):
        pts = sorted((r["dim"], 100 * r["top1"]) for r in rows if r["group"] == "fig4a" and r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="dimension", ylabel="top-1 accuracy (%)")
    _titled(ax, "(a) accuracy vs dimension", settings)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lambda3(rows: Sequence[dict], path: str | os.PathLike, settings: str = "") -> Path:
    """Fig. 4(b): top-1 against lambda3 (symlog: lambda3 = 0 is FV-VAE-)."""
    plt = _pyplot()
    pts = sorted((float(r["param"].split("=")[1]), 100 * r["top1"]) for r in rows if r["group"] == "fig4b")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*pts), marker="o", color="C3")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(xlabel="lambda3 (0 = FV-VAE-)", ylabel="top-1 accuracy (%)")
    _titled(ax, "(b) accuracy vs lambda3", settings)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_compression(rows: Sequence[dict], path: str | os.PathLike, settings: str = "") -> Path:
    """Fig. 4(c): top-1 of PCA, Random Maclaurin and a smaller latent at each target dimension."""
    plt = _pyplot()
    sub = [r for r in rows if r["group"] == "fig4c"]
    dims = sorted({int(r["param"]) for r in sub})
    methods = list(dict.fromkeys(r["method"] for r in sub))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        acc = {int(r["param"]): 100 * r["top1"] for r in sub if r["method"] == method}
        ax.bar(np.arange(len(dims)) + i * width, [acc.get(dm, np.nan) for dm in dims], width, label=method)
    ax.set_xticks(np.arange(len(dims)) + width * (len(methods) - 1) / 2, [str(dm) for dm in dims])
    ax.set(xlabel="dimension", ylabel="top-1 accuracy (%)")
    _titled(ax, "(c) compression of FV-VAE", settings)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_spatial_attention(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], titles: Sequence[str],
                           path: str | os.PathLike) -> Path:
    """Fig. 5: each image (h, w) grey or (h, w, 3) RGB with its attention map (a, b) stretched over it."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i, (img, att, title) in enumerate(zip(images, maps, titles)):
        h, w = img.shape[:2]
        extent = (0, w, h, 0)
        for row in (0, 1):
            axes[row, i].imshow(img, cmap="gray" if img.ndim == 2 else None, extent=extent)
            axes[row, i].axis("off")
        axes[1, i].imshow(att, cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
        axes[0, i].set_title(title, fontsize=8)
    fig.suptitle("spatial attention: sum of |FV| per descriptor", fontsize=9)
    return _save(fig, path)


def plot_temporal_attention(frames: Sequence[np.ndarray], per_frame: np.ndarray, maps: Sequence[np.ndarray],
                            title: str, path: str | os.PathLike, shown: int = 5) -> Path:
    """Fig. 6: attention per frame as a curve over a clip, with ``shown`` frames and their maps below."""
    plt = _pyplot()
    fig = plt.figure(figsize=(1.8 * shown, 4.2))
    grid = fig.add_gridspec(2, shown, height_ratios=(1.1, 1), hspace=0.45)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(np.arange(len(per_frame)), per_frame, marker="o", color="C0")
    ax.set(xlabel="sampled frame", ylabel="sum of |FV|", title=title)
    ax.grid(alpha=0.3)
    picks = np.linspace(0, len(frames) - 1, shown).round().astype(int)
    for j, k in enumerate(picks):
        a = fig.add_subplot(grid[1, j])
        h, w = frames[k].shape[:2]
        a.imshow(frames[k], extent=(0, w, h, 0))
        a.imshow(maps[k], cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
        a.set_title(f"frame {k}", fontsize=8)
        a.axis("off")
        ax.axvline(k, color="grey", lw=0.5)
    return _save(fig, path)
