"""FV-VAE training throughput: one iteration of Algorithm 1 (sample sets, dropout and z noise,
the Eq. 8 losses, backward, AdaDelta) as ``fvvae_fast.train`` runs it, against the naive recipe
(the plain loss formula under autograd, a Python loop over sets, a per-parameter AdaDelta) and
against the step's own GEMMs alone (forward, weight and input gradients of its four linear
layers: what any implementation must compute) and the square GEMM ceiling, in one run.

    python -m pytest bench/bench_train.py --benchmark-only

FLOPs are the step's GEMM FLOPs, 2 n (2 C^2 + 6 C d + 3 d K) for n descriptors, so the
"% GEMM ceiling" column is the share of the machine's GEMM rate that training reaches.

Contention: torch runs one OpenMP thread per core, and threads that share a core with another busy
process spin. With one other busy process on a 2-core machine, training ran 6x slower with torch's
default 2 threads than with 1, and about 40x slower under heavier load (figures reported by a user, not
measured by this benchmark). Time on an otherwise idle machine; on a shared one set OMP_NUM_THREADS to
your share (``train`` and the command line keep torch within the CPU quota: :mod:`fvvae_fast.threads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from common import default_device, record, run_benchmark

import fvvae_fast as fv

DEVICE = default_device()
ITERATIONS = 10  # per timed call: the per-call set-up (optimizer, generators) is amortised
INIT_ROWS = 16384


@dataclass(frozen=True)
class TrainShape:
    """A training batch: ``batch`` sets, ``per_set`` descriptors of each, C, d, K classes."""

    name: str
    c: int
    d: int
    batch: int
    per_set: int
    classes: int

    @property
    def rows(self) -> int:
        return self.batch * self.per_set

    def layers(self) -> list[tuple[int, int, bool]]:
        """(in, out, needs input gradient) of the encoder (2 layers), decoder and classifier."""
        c, d = self.c, self.d
        return [(c, c, False), (c, d, True), (d, c, True), (d, self.classes, True)]

    def flops(self) -> int:
        return sum(2 * self.rows * i * o * (3 if grad_in else 2) for i, o, grad_in in self.layers())

    def data(self) -> fv.DescriptorSets:
        g = torch.Generator().manual_seed(0)
        sets, t = 2000, 2 * self.per_set
        x = torch.relu(torch.randn(sets * t, self.c, generator=g) - 0.5)  # sparse, non-negative
        return fv.DescriptorSets(x, torch.arange(sets + 1) * t, torch.randint(0, self.classes, (sets,), generator=g))


SHAPES = [TrainShape("C384-d31-128x16", 384, 31, 128, 16, 10), TrainShape("C512-d255-128x50", 512, 255, 128, 50, 101)]


def _config(shape: TrainShape) -> fv.TrainConfig:
    return fv.TrainConfig(iterations=ITERATIONS, batch_sets=shape.batch, lambda3=1000.0,
                          descriptors_per_set=shape.per_set, data_init=False, device=DEVICE.type)


def naive_steps(model: fv.FVVAE, data: fv.DescriptorSets, cfg: fv.TrainConfig) -> None:
    """The afternoon recipe: the Eq. 8 formula under autograd, a Python loop over the sampled sets."""
    opt = torch.optim.Adadelta(model.parameters(), lr=cfg.lr, rho=cfg.rho, eps=cfg.eps, foreach=False)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.iterations):
        ids = torch.randperm(len(data), generator=g)[: cfg.batch_sets]
        rows, owners = [], []
        for i, s in enumerate(ids.tolist()):
            lo, hi = int(data.offsets[s]), int(data.offsets[s + 1])
            rows.append(lo + torch.randperm(hi - lo, generator=g)[: cfg.descriptors_per_set])
            owners.append(torch.full((len(rows[-1]),), i))
        x = data.x[torch.cat(rows)].to(DEVICE)
        labels = data.labels[ids][torch.cat(owners)].to(DEVICE)
        xp = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        keep = torch.rand(xp.shape, generator=g).to(DEVICE) >= model.dropout
        mu_z = model.encoder(xp * keep / (1 - model.dropout))
        sigma_z = model.log_sigma_z.exp()
        z = mu_z + torch.randn(mu_z.shape, generator=g).to(DEVICE) * sigma_z
        rec = ((xp - F.relu(model.decoder(z))) ** 2 / (2 * torch.exp(2 * model.log_sigma_x))).sum(1).mean() \
            + model.log_sigma_x.sum()
        reg = 0.5 * (mu_z**2).sum(1).mean() + 0.5 * (sigma_z**2).sum() - 0.5 * (1 + 2 * model.log_sigma_z).sum()
        cls = F.cross_entropy(model.classifier(z), labels)
        loss = rec + reg + cfg.lambda3 * cls
        opt.zero_grad()
        loss.backward()
        opt.step()


def gemms_only(shape: TrainShape):
    """The step's GEMMs alone on the same shapes: forward, weight gradient, input gradient."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for i, o, grad_in in shape.layers():
        a = torch.randn(shape.rows, i, generator=g).to(DEVICE)
        w = torch.randn(o, i, generator=g).to(DEVICE)
        dy = torch.randn(shape.rows, o, generator=g).to(DEVICE)
        mats.append((a, w, dy, grad_in))

    def run():
        for _ in range(ITERATIONS):
            for a, w, dy, grad_in in mats:
                torch.mm(a, w.t())
                torch.mm(dy.t(), a)
                if grad_in:
                    torch.mm(dy, w)

    return run


@pytest.mark.parametrize("method", ["naive-autograd", "fvvae-train", "gemms-only"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_train_step(benchmark, method, shape):
    data = shape.data()
    model = fv.FVVAE(shape.c, shape.d, num_classes=shape.classes, seed=0).to(DEVICE).train()
    model.init_from_data(data.x[:INIT_ROWS].to(DEVICE))  # a live decoder, as training sees it (timed calls keep it)
    cfg = _config(shape)
    if method == "fvvae-train":
        fn = lambda: fv.train(model, data, cfg, progress=False)  # noqa: E731
    elif method == "naive-autograd":
        fn = lambda: naive_steps(model, data, cfg)  # noqa: E731
    else:
        fn = gemms_only(shape)
    run_benchmark(benchmark, fn, DEVICE, rounds=7, warmup=1)
    per_step = [t / ITERATIONS for t in benchmark.stats.stats.data]
    record(benchmark, op="train step", method=method, shape=shape.name, dtype=torch.float32, flops=shape.flops(),
           nbytes=4 * shape.rows * shape.c, seconds=per_step)
    benchmark.extra_info["descriptors_per_s"] = shape.rows / sorted(per_step)[len(per_step) // 2]
