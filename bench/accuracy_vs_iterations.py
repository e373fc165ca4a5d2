"""Held-out accuracy of FV-VAE against training iterations on the built-in data: picks the demo's budget.

The curve is measured on a validation split inside the demo's training images (per class: the first
100 of the demo's 150 training images fit, the other 50 validate; the demo's test images are never
seen), for several seeds, with the demo's settings (CompareConfig: latent size, lambda3, sampled
descriptors per set) and the diagonal (the paper's) and Kronecker FIM. One training run per seed,
resumed from its checkpoint up to each budget. Writes ``accuracy_vs_iterations.json`` and
``accuracy_vs_iterations.png`` (mean and standard deviation over seeds) into ``--out``.

    python bench/accuracy_vs_iterations.py --out bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import fvvae_fast as fv
from fvvae_fast.evaluation.builtin import builtin_data
from fvvae_fast.evaluation.compare import CompareConfig
from fvvae_fast.evaluation.protocol import evaluate_vectors

FIT_PER_CLASS, VAL_PER_CLASS = 100, 50  # inside the demo's 150 training images per class


def _vectors(model, sets, fim, batch):
    with torch.inference_mode():
        return torch.cat([fv.fisher_encode(model, x, off, fim=fim, normalize=False) for x, off, _ in sets.batches(batch)])


def curve(seeds, budgets, modes, dataset, progress):
    cfg = CompareConfig()
    rows = []
    for seed in seeds:
        data = builtin_data(FIT_PER_CLASS, VAL_PER_CLASS, seed=seed, dataset=dataset, progress=progress)
        model = fv.FVVAE(data.train.dim, cfg.latent_dim, num_classes=len(data.classes), seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            for budget in budgets:
                train_cfg = fv.TrainConfig(iterations=budget, batch_sets=cfg.batch_sets, lambda3=cfg.lambda3,
                                           descriptors_per_set=cfg.descriptors_per_set, seed=seed,
                                           checkpoint_every=budget)
                fv.train(model, data.train, train_cfg, checkpoint=Path(tmp) / "ckpt.pt", progress=progress,
                         resume="extend")
                for mode in modes:
                    fim = fv.FisherInformation(mode)
                    with torch.inference_mode():
                        for x, off, _ in data.train.batches(cfg.encode_batch_sets):
                            fim.update_descriptors(model, x, off)
                    s = evaluate_vectors(_vectors(model, data.train, fim, cfg.encode_batch_sets), data.train.labels,
                                         _vectors(model, data.test, fim, cfg.encode_batch_sets), data.test.labels,
                                         C=cfg.svm_C)
                    rows.append({"seed": seed, "iterations": budget, "fim": mode, "top1": s.top1, "mean_ap": s.mean_ap})
                    print(json.dumps(rows[-1]), flush=True)
    return rows, cfg


def plot(rows, cfg, dataset, path):
    from fvvae_fast.viz import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode in dict.fromkeys(r["fim"] for r in rows):
        budgets = sorted({r["iterations"] for r in rows if r["fim"] == mode})
        acc = np.array([[100 * r["top1"] for r in rows if r["fim"] == mode and r["iterations"] == b] for b in budgets])
        ax.errorbar(budgets, acc.mean(1), yerr=acc.std(1), marker="o", capsize=3, label=f"FIM {mode}")
    ax.axvline(cfg.iterations, color="grey", ls=":", label=f"demo default ({cfg.iterations})")
    ax.set_xscale("log")
    ax.set_xlabel("training iterations (128 sets a batch)")
    ax.set_ylabel("validation top-1 (%)")
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"{dataset}: FV-VAE d={cfg.latent_dim}, lambda3={cfg.lambda3:g}, {cfg.descriptors_per_set} desc./set;\n"
                 f"mean +- std over seeds {seeds}; {FIT_PER_CLASS} fit / {VAL_PER_CLASS} validation images per class",
                 fontsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", default="100,300,600,1000,2000,5000")
    p.add_argument("--fim", default="diagonal,kronecker")
    p.add_argument("--dataset", default="animal-mnist")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = sorted(int(b) for b in args.iterations.split(","))
    rows, cfg = curve(seeds, budgets, args.fim.split(","), args.dataset, progress=False)
    out = Path(args.out)
    (out / "accuracy_vs_iterations.json").write_text(json.dumps({"dataset": args.dataset, "rows": rows}, indent=1))
    print(plot(rows, cfg, args.dataset, out / "accuracy_vs_iterations.png"))


if __name__ == "__main__":
    main()
