"""The built-in end-to-end run on generated descriptors: train FV-VAE, encode, classify.

Until the evaluation pipeline lands this is what ``make demo`` runs: it shows the whole job
(descriptors in, classifier accuracy out), the shapes, and where the time goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .encode import fisher_encode
from .model import FVVAE
from .ops import dispatch
from .synthetic import make_sets
from .train import TrainConfig, train


@dataclass
class DemoConfig:
    train_sets: int = 400
    test_sets: int = 200
    set_size: int = 50
    dim: int = 128
    latent_dim: int = 31
    num_classes: int = 5
    iterations: int = 300
    seed: int = 0


def _linear_svm_accuracy(train_x, train_y, test_x, test_y) -> float | None:
    try:
        from sklearn.svm import LinearSVC
    except ImportError:
        return None
    clf = LinearSVC(C=100.0, max_iter=5000).fit(train_x.numpy(), train_y.numpy())  # one-vs-all, C = 100
    return float((clf.predict(test_x.numpy()) == test_y.numpy()).mean())


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run the demo and print a summary; returns the figures it printed."""
    cfg = config or DemoConfig()
    torch.manual_seed(cfg.seed)
    data = make_sets(cfg.train_sets + cfg.test_sets, cfg.set_size, cfg.dim, cfg.num_classes, seed=cfg.seed)
    split = int(data.offsets[cfg.train_sets])
    train_data = type(data)(data.x[:split], data.offsets[: cfg.train_sets + 1], data.labels[: cfg.train_sets])
    test_x, test_off = data.x[split:], data.offsets[cfg.train_sets:] - split
    test_y = data.labels[cfg.train_sets:]
    print(f"data: {cfg.train_sets} train / {cfg.test_sets} test sets of {cfg.set_size} descriptors, "
          f"C={cfg.dim}, {cfg.num_classes} classes (generated)")
    model = FVVAE(in_dim=cfg.dim, latent_dim=cfg.latent_dim, num_classes=cfg.num_classes)
    t0 = time.perf_counter()
    train(model, train_data, TrainConfig(iterations=cfg.iterations, seed=cfg.seed, lambda3=10.0), progress=progress)
    t_train = time.perf_counter() - t0
    backend = dispatch.resolve(None, torch.device("cpu"))
    with torch.inference_mode():
        t0 = time.perf_counter()
        fv_train = fisher_encode(model, train_data.x, train_data.offsets)
        fv_test = fisher_encode(model, test_x, test_off)
        t_encode = time.perf_counter() - t0
    n_sets = cfg.train_sets + cfg.test_sets
    print(f"train: {cfg.iterations} iterations in {t_train:.1f} s")
    print(f"encode: {n_sets} sets -> FV {tuple(fv_train.shape[1:])} per set ({fv_train.dtype}) in {t_encode:.2f} s "
          f"({n_sets / t_encode:.0f} sets/s, backend={backend!r})")
    acc = _linear_svm_accuracy(fv_train, train_data.labels, fv_test, test_y)
    if acc is not None:
        print(f"linear SVM (C=100) on FV-VAE vectors: top-1 = {100 * acc:.1f}% (chance {100 / cfg.num_classes:.0f}%)")
    return {"train_s": t_train, "encode_s": t_encode, "fv_dim": fv_train.shape[1], "accuracy": acc, "backend": backend}
