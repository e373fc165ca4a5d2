"""FisherInformation at D = 131,072 (C = 512, d = 255): update and whitening throughput next to
the encoding (fisher_gradients) of the same sets, for k in {0, 32, 128} and kronecker.

    python -m pytest bench/bench_fim.py --benchmark-only [--benchmark-json out.json]
    python bench/bench_fim.py --quality      # whitened-covariance report on generated data (small D)

Rows carry ``sets_per_s`` and the estimator's ``state_mib`` (and ``peak_mib`` on CUDA) in
``extra_info``. Updates are timed in steady state: the sketch is filled during warm-up and
each timed call covers at least two Frequent Directions shrinks, so the median includes
their amortised cost. The "encode" row is the FIM pass's baseline: diagonal / lowrank add
``update`` to it; kronecker's ``update_descriptors`` replaces it (it runs the encoder itself).
"""

from __future__ import annotations

import argparse
import math
import time

import pytest
import torch
from common import default_device, record, run_benchmark

from fvvae_fast.encode import fisher_encode, fisher_gradients, power_l2_normalize
from fvvae_fast.fim import FisherInformation
from fvvae_fast.model import FVVAE

DEVICE = default_device()
C, LATENT, T, VIDEO_T = 512, 255, 50, 1250  # D = C (d+1) = 131,072; 50 descriptors a frame, 1250 a video
DIM = C * (LATENT + 1)
SETS = 256 if DEVICE.type == "cuda" else 64  # sets per timed call (updates repeat it, see _reps)
WHITEN_SETS = 64
MODES = {"k0-diagonal": ("diagonal", None), "k32-lowrank": ("lowrank", 32), "k128-lowrank": ("lowrank", 128),
         "kronecker": ("kronecker", None)}


def _model() -> FVVAE:
    torch.manual_seed(0)
    return FVVAE(in_dim=C, latent_dim=LATENT).to(DEVICE).eval()


def _sets(num_sets: int, seed: int = 0, length: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(num_sets * length, C, generator=g)).to(DEVICE)
    return x, (torch.arange(num_sets + 1, dtype=torch.int64) * length).to(DEVICE)


@torch.no_grad()
def _gradients(model: FVVAE, num_sets: int, seed: int = 0) -> torch.Tensor:
    return fisher_gradients(model, *_sets(num_sets, seed))


def _reps(fim: FisherInformation) -> int:
    """Updates per timed call so that each call covers >= 2 sketch shrinks (one every l + 1 rows)."""
    return max(1, math.ceil(2 * (fim.sketch_rows + 1) / SETS)) if fim.mode == "lowrank" else 1


def _record(benchmark, method: str, sets: int, flops: int, nbytes: int, fim: FisherInformation | None = None):
    record(benchmark, op="fim", method=method, shape=f"D{DIM}-{sets}sets", dtype=torch.float32, flops=flops,
           nbytes=nbytes)
    info = {"sets": sets, "sets_per_s": sets / benchmark.stats.stats.median}
    if fim is not None:
        info["state_mib"] = fim.nbytes / 2**20
    if DEVICE.type == "cuda":
        info["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("length", [T, VIDEO_T], ids=lambda t: f"T{t}")
def test_encode_baseline(benchmark, length):
    """fisher_gradients (preprocess + encoder + fused accumulation) of SETS sets of ``length`` descriptors.

    The updates below do not depend on the set length: next to a video's 1250 descriptors they
    cost 25 times less, relatively, than next to a frame's 50."""
    model, (x, offsets) = _model(), _sets(SETS, length=length)
    run_benchmark(benchmark, torch.no_grad()(lambda: fisher_gradients(model, x, offsets)), DEVICE, rounds=5, warmup=1)
    n = SETS * length
    flops = 2 * n * (C * C + C * LATENT) + 2 * n * C * LATENT + 2 * n * C * (LATENT + 1)
    _record(benchmark, f"encode-T{length}", SETS, flops, 4 * (n * C + SETS * DIM))


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_encode_normalized(benchmark, path):
    """What the encode stage computes, ``fisher_encode(..., fim=diagonal)`` of SETS frames: the fused path
    (whitening, sign, signed sqrt and L2 in the kernel's epilogue; outside autograd) against the same
    steps composed (G, ``whiten``, ``power_l2_normalize``)."""
    model, (x, offsets) = _model(), _sets(SETS)
    fim = _estimated("k0-diagonal", model, SETS)
    if path == "fused":
        fn = torch.inference_mode()(lambda: fisher_encode(model, x, offsets, fim=fim))
    else:
        fn = torch.inference_mode()(lambda: power_l2_normalize(fisher_encode(model, x, offsets, fim=fim,
                                                                              normalize=False)))
    run_benchmark(benchmark, fn, DEVICE, rounds=10, warmup=2)
    n = SETS * T
    flops = 2 * n * (C * C + C * LATENT) + 2 * n * C * LATENT + 2 * n * C * (LATENT + 1)
    _record(benchmark, f"encode-normalized-{path}", SETS, flops, 4 * (n * C + SETS * DIM))


@pytest.mark.parametrize("name", list(MODES))
def test_update(benchmark, name):
    mode, rank = MODES[name]
    fim = FisherInformation(mode, rank)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "kronecker":
        model, (x, offsets) = _model(), _sets(SETS)
        reps, fn = 1, torch.no_grad()(lambda: fim.update_descriptors(model, x, offsets))
        n = SETS * T
        flops = 2 * n * (C * C + 2 * C * LATENT) + 2 * n * (C * C + (LATENT + 1) ** 2)  # encoder + r r^T, z z^T
    else:
        G = _gradients(_model(), SETS)
        reps = _reps(fim)

        def fn():
            for _ in range(reps):
                fim.update(G)

        fn()  # fill the sketch before timing
        # square-and-sum; lowrank, per row amortised over a shrink every l + 1 rows, times 2 flops:
        # the new rows' Gram against the buffer, (l + 1) 2l D, and the rows kept, l (2l) D
        per_set = 2 * DIM + (8 * fim.sketch_rows * DIM if mode == "lowrank" else 0)
        flops = SETS * reps * per_set
    slow = mode == "lowrank" and rank >= 128
    run_benchmark(benchmark, fn, DEVICE, rounds=3 if slow else 5, warmup=1)
    _record(benchmark, f"update-{name}", SETS * reps, flops, 4 * SETS * reps * DIM, fim)


def _estimated(name: str, model: FVVAE, sets: int) -> FisherInformation:
    """The estimator of MODES[name] after one pass: Kronecker over SETS sets of descriptors, the others
    over at least ``sets`` gradients and enough to fill the sketch past a shrink."""
    mode, rank = MODES[name]
    fim = FisherInformation(mode, rank)
    if mode == "kronecker":
        return fim.update_descriptors(model, *_sets(SETS))
    return fim.update(_gradients(model, max(sets, 2 * fim.sketch_rows + 1)))


@pytest.mark.parametrize("name", list(MODES))
def test_whiten(benchmark, name):
    mode, rank = MODES[name]
    model = _model()
    fim = _estimated(name, model, SETS)
    if mode == "kronecker":
        flops = 2 * WHITEN_SETS * (C * C * (LATENT + 1) + C * (LATENT + 1) ** 2)
    else:
        flops = WHITEN_SETS * DIM * (1 + 4 * rank if rank else 1)
    G = _gradients(model, WHITEN_SETS, seed=1)
    fim.whiten(G[:1])  # builds the whitening factors (not timed: once per estimate)
    run_benchmark(benchmark, lambda: fim.whiten(G), DEVICE, rounds=5, warmup=1)
    _record(benchmark, f"whiten-{name}", WHITEN_SETS, flops, 4 * 2 * WHITEN_SETS * DIM, fim)


@pytest.mark.parametrize("name", ["k32-lowrank", "k128-lowrank", "kronecker"])
def test_build_whitening(benchmark, name):
    """One-off cost of the whitening factors after the pass (top-k of the sketch, eigenproblems)."""
    model = _model()
    fim = _estimated(name, model, 1)
    G = _gradients(model, 1, seed=1)

    def build():
        fim.damping = fim.damping  # invalidates the cached factors
        fim.whiten(G)

    run_benchmark(benchmark, build, DEVICE, rounds=1, warmup=0)
    _record(benchmark, f"build-{name}", 1, 0, 0, fim)


# ----------------------------------------------------------------------------- quality report


@torch.no_grad()
def quality_report(c: int = 32, latent: int = 15, train_sets: int = 2000, test_sets: int = 1000,
                   iterations: int = 300, damping: float | None = None) -> None:
    """Print how close each mode's whitened training (and held-out) set comes to identity covariance.

    Generated conv-like sets (:func:`fvvae_fast.synthetic.make_sets`), a briefly trained FV-VAE,
    D = c (latent + 1). Columns: relative Frobenius distance ||M - I||_F / sqrt(D) of the
    whitened second moment M = W^T W / n, the mean |diag(M) - 1|, and M's eigenvalue range.
    """
    from fvvae_fast.synthetic import make_sets
    from fvvae_fast.train import TrainConfig, train

    data = make_sets(train_sets + test_sets, set_size=T, dim=c, seed=0)
    torch.manual_seed(0)  # the model's initialisation
    with torch.enable_grad():
        model = train(FVVAE(in_dim=c, latent_dim=latent, num_classes=0), data,
                      TrainConfig(iterations=iterations, batch_sets=64, lambda3=0.0), progress=False).model.eval()
    x, offsets = torch.as_tensor(data.x).float(), data.offsets
    n_train = int(offsets[train_sets])
    tr = (x[:n_train], offsets[: train_sets + 1])
    te = (x[n_train:], offsets[train_sets:] - n_train)
    G_tr, G_te = fisher_gradients(model, *tr).double(), fisher_gradients(model, *te).double()
    dim = G_tr[0].numel()
    eye = torch.eye(dim, dtype=torch.float64)
    print(f"generated data: C={c}, d={latent}, D={dim}, {train_sets} train / {test_sets} held-out sets of {T}")
    print("| mode | damping | train ||M-I||_F/sqrt(D) | train mean|diag-1| | train eig range | "
          "held-out ||M-I||_F/sqrt(D) | update ms/1k sets | whiten ms/1k sets | state KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    kw = {} if damping is None else {"damping": damping}
    for name, mode, rank in [("identity", None, None), ("diagonal", "diagonal", None), ("lowrank k=32", "lowrank", 32),
                             ("lowrank k=128", "lowrank", 128), ("lowrank k=D", "lowrank", dim),
                             ("kronecker", "kronecker", None)]:
        fim = None if mode is None else FisherInformation(mode, rank, **kw)
        t0 = time.perf_counter()
        if fim is not None and mode == "kronecker":
            fim.update_descriptors(model.double(), tr[0].double(), tr[1])
            model.float()
        elif fim is not None:
            fim.update(G_tr)
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        w_tr = G_tr.reshape(train_sets, -1) if fim is None else fim.whiten(G_tr)
        t_whiten = time.perf_counter() - t0
        w_te = G_te.reshape(test_sets, -1) if fim is None else fim.whiten(G_te)
        m_tr, m_te = w_tr.t() @ w_tr / train_sets, w_te.t() @ w_te / test_sets
        e = torch.linalg.eigvalsh(m_tr)
        dist = lambda m: float((m - eye).norm() / math.sqrt(dim))  # noqa: E731
        print(f"| {name} | {'-' if fim is None else format(fim.damping, 'g')} | {dist(m_tr):.3g} | "
              f"{float((m_tr.diagonal() - 1).abs().mean()):.3g} | {float(e.min()):.3g}..{float(e.max()):.3g} | "
              f"{dist(m_te):.3g} | {1e6 * t_update / train_sets:.2f} | {1e6 * t_whiten / train_sets:.2f} | "
              f"{0 if fim is None else fim.nbytes / 1024:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true", help="print the whitened-covariance report")
    parser.add_argument("--damping", type=float, default=None, help="damping for the report (default: the library's)")
    args = parser.parse_args()
    if args.quality:
        quality_report(damping=args.damping)
    else:
        parser.print_help()
