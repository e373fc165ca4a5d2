"""FV-VAE against every baseline on one set of descriptors (Table 2, Fig. 4), resumable.

Every representation goes through the same protocol (:func:`.protocol.evaluate_vectors`). Rows:

- ``table``: GA, AVE, Concatenation, FV (GMM), VLAD, BP, FV-VAE- (lambda3 = 0) and FV-VAE with
  each FIM mode (none, diagonal, diagonal + low rank, Kronecker).
- ``fig4a``: accuracy against dimension: FV-VAE (latent size), FV (components), VLAD (centres).
- ``fig4b``: accuracy against lambda3 (0 is FV-VAE-).
- ``fig4c``: compression of the FV-VAE vector by PCA and Random Maclaurin, against a smaller latent.

The ``table`` rows run for every seed of ``CompareConfig.seeds`` (a seed fixes the data split where
the data come from a seeded split, the initial weights, the sampling, the GMM and k-means starts),
the figures' sweeps for the first seed; :func:`summarize` gives each row's mean and standard
deviation over seeds and :func:`spread_notes` says which differences exceed their spread.

Each finished row is written at once (atomically) to ``results-seed<S>.json`` in the output
folder, stamped with a fingerprint of the data and the settings; a rerun with the same data and
settings skips the rows it has (models are retrained only for the rows still missing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..baselines import VLAD, GMMFisherVector, PCACompression, RandomMaclaurin, average_pool, bilinear_pool, concatenate
from ..encode import fisher_encode, power_l2_normalize
from ..fim import FisherInformation
from ..io import atomic_open
from ..model import FVVAE
from ..sets import DescriptorSets
from ..train import TrainConfig, train
from .protocol import evaluate_vectors

RESULTS_VERSION = 2
FIM_MODES = ("none", "diagonal", "lowrank", "kronecker")


@dataclass(frozen=True)
class CompareConfig:
    """What the comparison runs. Defaults fit the built-in data (C = 384) in a few minutes on 2 cores.

    FV (GMM) and VLAD are sized for FV-VAE's dimension C (d+1) at any ``latent_dim`` unless
    ``gmm_components`` / ``vlad_centres`` are set (:meth:`baseline_sizes`): at C = 384 and d = 31, FV 2 K C =
    12,288 at K = 16 and VLAD K C = 12,288 at K = 32; BP is C^2 = 147,456. ``gmm_weights``: FV (GMM) with its
    mixture-weight terms (K more dimensions; off as in the paper's FV). Training samples
    ``descriptors_per_set`` descriptors of each set per iteration (the paper trains on one frame of each
    video); None takes them all.
    """

    latent_dim: int = 31
    lambda3: float = 10.0
    # The table's training budget: within 0.5 point of 5,000 iterations on held-out built-in data
    # (bench/accuracy_vs_iterations.py); the figures' sweeps train for a cheaper budget, stated in them.
    iterations: int = 3000
    sweep_iterations: int = 500
    batch_sets: int = 128
    descriptors_per_set: int | None = 16
    fim_modes: tuple[str, ...] = FIM_MODES
    sweep_fim: str = "diagonal"  # the FIM of the figures' FV-VAE rows
    # Low-rank FIM: the top directions of the set-level F are, on labelled data of few classes, the
    # class-mean directions, and whitening them removes what the classifier needs (validation top-1 on
    # the built-in data, d = 31: k = 4 95.6%, 8 95.0%, 32 82.0%, 128 76.4%; diagonal 95.8%).
    rank: int = 4
    gmm_components: int | None = None  # None: sized for FV-VAE's dimension (baseline_sizes)
    vlad_centres: int | None = None
    gmm_weights: bool = False
    latent_sweep: tuple[int, ...] = (3, 7, 15, 31)
    gmm_sweep: tuple[int, ...] = (2, 4, 8, 16)
    vlad_sweep: tuple[int, ...] = (4, 8, 16, 32)
    lambda3_sweep: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0, 1000.0)
    compress_latents: tuple[int, ...] = (1, 2)  # PCA needs dimensions below the number of training sets
    fit_descriptors: int = 20000  # training descriptors sampled to fit the GMM and k-means
    encode_batch_sets: int = 256
    svm_C: float = 100.0
    seeds: tuple[int, ...] = (0, 1, 2)
    sweeps: bool = True  # the figures' rows (first seed)

    def __post_init__(self) -> None:
        for mode in (*self.fim_modes, self.sweep_fim):
            if mode not in FIM_MODES:
                raise ValueError(f"CompareConfig: FIM modes must be among {FIM_MODES}, got {mode!r}")
        if self.latent_dim < 1 or self.iterations < 1 or self.sweep_iterations < 1:
            raise ValueError("CompareConfig: latent_dim, iterations and sweep_iterations must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig: seeds must be distinct and at least one, got {self.seeds}")

    def baseline_sizes(self, c: int) -> tuple[int, int]:
        """(K of FV (GMM), K of VLAD) for descriptors of C = c: the ones set, else the sizes whose dimension
        (2 K C, plus K with ``gmm_weights``; K C) is nearest FV-VAE's C (d+1), rounding half up."""
        target = c * (self.latent_dim + 1)
        gmm = self.gmm_components or max(1, int(target / (2 * c + self.gmm_weights) + 0.5))
        return gmm, self.vlad_centres or self.latent_dim + 1

    def dimensions(self, c: int) -> str:
        """One line: the table's FV-VAE, FV (GMM) and VLAD sizes and dimensions at C = c."""
        gmm, vlad = self.baseline_sizes(c)
        fv = 2 * gmm * c + (gmm if self.gmm_weights else 0)
        weights = " with weight terms" if self.gmm_weights else ""
        return (f"dimensions at C={c}: FV-VAE d={self.latent_dim}: C (d+1) = {c * (self.latent_dim + 1):,}; "
                f"FV (GMM) K={gmm}{weights}: {fv:,}; VLAD K={vlad}: K C = {vlad * c:,}")


@dataclass
class EvalData:
    """Train and test descriptor sets (with labels), optional GA features (S, G) of each."""

    train: DescriptorSets
    test: DescriptorSets
    train_global: Tensor | None = None
    test_global: Tensor | None = None
    name: str = "data"

    def __post_init__(self) -> None:
        for split, sets in (("train", self.train), ("test", self.test)):
            if sets.labels is None:
                raise ValueError(f"EvalData: the {split} sets need labels")
        if self.train.dim != self.test.dim:
            raise ValueError(f"EvalData: train has C={self.train.dim}, test C={self.test.dim}")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for sets in (self.train, self.test):
            h.update(np.ascontiguousarray(np.asarray(sets.x[:: max(1, sets.x.shape[0] // 4096)], np.float32)))
            h.update(sets.offsets.numpy().tobytes())
            h.update(sets.labels.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class Comparison:
    """The rows of every seed (dicts: seed, group, method, param, dim, top1, top3, mean_ap, encode_s),
    their :func:`summarize`, and the first seed's main model and FIM."""

    rows: list[dict]
    summary: list[dict]
    model: FVVAE
    fim: FisherInformation | None
    out: Path


def _encode_sets(encode: Callable[[Tensor, Tensor], Tensor], sets: DescriptorSets, batch: int) -> Tensor:
    return torch.cat([encode(x, off) for x, off, _ in sets.batches(batch)])


class _Runner:
    def __init__(self, data: EvalData, cfg: CompareConfig, seed: int, out: Path, progress: bool) -> None:
        self.data, self.cfg, self.seed, self.out, self.progress = data, cfg, seed, out, progress
        self.path = out / f"results-seed{seed}.json"
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "seeds"}
        self.stamp = {"version": RESULTS_VERSION, "data": data.fingerprint(), "seed": seed,
                      "config": json.loads(json.dumps(settings))}
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("stamp") == self.stamp:
                self.rows = {r["key"]: r for r in saved["rows"]}
        self.models: dict[tuple[int, float, int], FVVAE] = {}
        self.fims: dict[tuple[int, float, str, int], FisherInformation | None] = {}
        g = torch.Generator().manual_seed(seed)
        x = data.train.x
        pick = torch.randperm(x.shape[0], generator=g)[: cfg.fit_descriptors].sort().values.numpy()
        self.fit_sample = np.asarray(x[pick], dtype=np.float32)

    def _save(self) -> None:
        with atomic_open(self.path, "w") as f:
            json.dump({"stamp": self.stamp, "rows": list(self.rows.values())}, f, indent=1)

    def row(self, group: str, method: str, param: str, encoders: Callable[[], tuple[Tensor, Tensor, float]],
            normalized: bool = False) -> dict:
        """Evaluate one representation; ``normalized``: its vectors had signed sqrt + L2 already."""
        key = f"{group}|{method}|{param}"
        if key not in self.rows:
            train_v, test_v, encode_s = encoders()
            scores = evaluate_vectors(train_v, self.data.train.labels, test_v, self.data.test.labels, C=self.cfg.svm_C,
                                      normalize=not normalized)
            self.rows[key] = {"key": key, "seed": self.seed, "group": group, "method": method, "param": param,
                              "dim": int(train_v.shape[1]), "encode_s": encode_s, **scores.as_dict()}
            self._save()
        return self.rows[key]

    # ---------------------------------------------------------------- encoders

    def timed(self, encode: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            tr = _encode_sets(encode, self.data.train, self.cfg.encode_batch_sets)
            te = _encode_sets(encode, self.data.test, self.cfg.encode_batch_sets)
        return tr, te, time.perf_counter() - t0

    def model(self, latent: int, lambda3: float, iterations: int) -> FVVAE:
        key = (latent, float(lambda3), iterations)
        if key not in self.models:
            num_classes = int(self.data.train.labels.max()) + 1 if lambda3 else 0
            model = FVVAE(in_dim=self.data.train.dim, latent_dim=latent, num_classes=num_classes, seed=self.seed)
            cfg = TrainConfig(iterations=iterations, batch_sets=self.cfg.batch_sets, lambda3=lambda3,
                              descriptors_per_set=self.cfg.descriptors_per_set, seed=self.seed,
                              checkpoint_every=iterations)
            train(model, self.data.train, cfg, progress=self.progress)
            self.models[key] = model.eval()
        return self.models[key]

    def fim(self, latent: int, lambda3: float, mode: str, iterations: int) -> FisherInformation | None:
        key = (latent, float(lambda3), mode, iterations)
        if key not in self.fims:
            fim = None
            if mode != "none":
                model = self.model(latent, lambda3, iterations)
                fim = FisherInformation(mode, rank=self.cfg.rank if mode == "lowrank" else None)
                with torch.inference_mode():
                    for x, off, _ in self.data.train.batches(self.cfg.encode_batch_sets):
                        fim.update_descriptors(model, x, off)
            self.fims[key] = fim
        return self.fims[key]

    def fvvae(self, latent: int, lambda3: float, mode: str, sweep: bool = False) -> tuple[Tensor, Tensor, float]:
        """FV-VAE vectors of a model trained for the table's budget (or the sweeps' with ``sweep``)."""
        iterations = self.cfg.sweep_iterations if sweep else self.cfg.iterations
        model, fim = self.model(latent, lambda3, iterations), self.fim(latent, lambda3, mode, iterations)
        return self.timed(lambda x, off: fisher_encode(model, x, off, fim=fim, normalize=False))

    def global_features(self) -> tuple[Tensor, Tensor, float]:
        return self.data.train_global, self.data.test_global, 0.0


def _jobs(r: _Runner, sweeps: bool) -> list[tuple[str, str, str, Callable]]:
    """(group, method, param, encoders) of the table and, with ``sweeps``, of the figures."""
    cfg, data, sample, seed = r.cfg, r.data, r.fit_sample, r.seed
    d, l3 = cfg.latent_dim, cfg.lambda3
    gmm_k, vlad_k = cfg.baseline_sizes(data.train.dim)
    jobs: list[tuple[str, str, str, Callable]] = []
    if data.train_global is not None and data.test_global is not None:
        jobs.append(("table", "GA", "", r.global_features))
    jobs.append(("table", "AVE", "", lambda: r.timed(average_pool)))
    lengths = torch.cat([data.train.offsets.diff(), data.test.offsets.diff()])
    if lengths.numel() and bool((lengths == lengths[0]).all()):
        jobs.append(("table", "Concatenation", "", lambda: r.timed(concatenate)))
    jobs += [
        ("table", "FV (GMM)", f"K={gmm_k}",
         lambda: r.timed(GMMFisherVector(gmm_k, weights=cfg.gmm_weights, seed=seed).fit([sample]).encode)),
        ("table", "VLAD", f"K={vlad_k}", lambda: r.timed(VLAD(vlad_k, seed=seed).fit([sample]).encode)),
        ("table", "BP", "", lambda: r.timed(bilinear_pool)),
        ("table", "FV-VAE-", f"d={d}, lambda3=0, FIM {cfg.sweep_fim}", lambda: r.fvvae(d, 0.0, cfg.sweep_fim)),
    ]
    for mode in cfg.fim_modes:
        rank = f" k={cfg.rank}" if mode == "lowrank" else ""
        jobs.append(("table", "FV-VAE", f"d={d}, lambda3={l3:g}, FIM {mode}{rank}",
                     lambda mode=mode: r.fvvae(d, l3, mode)))
    if not sweeps:
        return jobs
    for latent in cfg.latent_sweep:
        jobs.append(("fig4a", "FV-VAE", f"d={latent}", lambda latent=latent: r.fvvae(latent, l3, cfg.sweep_fim, True)))
    for k in cfg.gmm_sweep:
        jobs.append(("fig4a", "FV (GMM)", f"K={k}",
                     lambda k=k: r.timed(GMMFisherVector(k, weights=cfg.gmm_weights, seed=seed).fit([sample]).encode)))
    for k in cfg.vlad_sweep:
        jobs.append(("fig4a", "VLAD", f"K={k}", lambda k=k: r.timed(VLAD(k, seed=seed).fit([sample]).encode)))
    for lam in cfg.lambda3_sweep:
        jobs.append(("fig4b", "FV-VAE", f"lambda3={lam:g}", lambda lam=lam: r.fvvae(d, lam, cfg.sweep_fim, True)))
    c = data.train.dim
    for latent in cfg.compress_latents:
        dim = c * (latent + 1)
        jobs.append(("fig4c", "latent", f"{dim}", lambda latent=latent: r.fvvae(latent, l3, cfg.sweep_fim, True)))
        jobs.append(("fig4c", "PCA", f"{dim}", lambda dim=dim: _compressed(r, "pca", dim)))
        jobs.append(("fig4c", "RM", f"{dim}", lambda dim=dim: _compressed(r, "rm", dim)))
    return jobs


def run_comparison(data: EvalData | Callable[[int], EvalData], cfg: CompareConfig | None = None,
                   out: str | Path = "demo_out", progress: bool = True) -> Comparison:
    """Evaluate every method of the module docstring for every seed; rows saved to ``out/results-seed<S>.json``.

    ``data``: the descriptors, or a function of the seed that gives them (a seeded split).
    """
    cfg = cfg or CompareConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_for = data if callable(data) else (lambda _seed: data)
    rows, first = [], None
    for i, seed in enumerate(cfg.seeds):
        r = _Runner(data_for(seed), cfg, seed, out, progress)
        first = first or r
        jobs = _jobs(r, sweeps=cfg.sweeps and i == 0)
        with tqdm(jobs, desc=f"methods (seed {seed})", unit="method", disable=not progress) as bar:
            for group, method, param, enc in bar:
                bar.set_postfix_str(f"{method} {param}".strip()[:40])
                # PCA and Random Maclaurin compress the normalised FV-VAE vector: it is not normalised again.
                rows.append(r.row(group, method, param, enc, normalized=method in ("PCA", "RM")))
    d, l3 = cfg.latent_dim, cfg.lambda3
    return Comparison(rows, summarize(rows), first.model(d, l3, cfg.iterations),
                      first.fim(d, l3, cfg.sweep_fim, cfg.iterations), out)


METRICS = ("top1", "top3", "mean_ap", "encode_s")


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (group, method, param) over the seeds: dim, n (seeds), and ``<metric>_mean`` and
    ``<metric>_std`` (sample standard deviation; 0 for one seed) of top1, top3, mean_ap, encode_s."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["group"], row["method"], row["param"]), []).append(row)
    out = []
    for (group, method, param), runs in groups.items():
        entry = {"group": group, "method": method, "param": param, "dim": runs[0]["dim"], "n": len(runs),
                 "seeds": [r["seed"] for r in runs], "svm_converged": all(r["svm_converged"] for r in runs)}
        for m in METRICS:
            values = np.array([r[m] for r in runs], dtype=np.float64)
            entry[f"{m}_mean"] = float(values.mean())
            entry[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _compressed(r: _Runner, how: str, dim: int) -> tuple[Tensor, Tensor, float]:
    """FV-VAE's full vector (the table's d and lambda3, the sweeps' budget) compressed to ``dim`` by PCA or
    Random Maclaurin."""
    tr, te, encode_s = r.fvvae(r.cfg.latent_dim, r.cfg.lambda3, r.cfg.sweep_fim, True)
    tr, te = power_l2_normalize(tr), power_l2_normalize(te)
    t0 = time.perf_counter()
    if how == "pca":
        pca = PCACompression(min(dim, *tr.shape), seed=r.seed).fit(tr)
        tr, te = pca.transform(tr), pca.transform(te)
    else:
        rm = RandomMaclaurin(dim, in_dim=tr.shape[1], seed=r.seed)
        tr, te = rm.transform(tr), rm.transform(te)
    return tr, te, encode_s + time.perf_counter() - t0


def _pm(entry: dict, metric: str, percent: bool = True) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, std = scale * entry[f"{metric}_mean"], scale * entry[f"{metric}_std"]
    return f"{mean:.2f}{unit}" if entry["n"] == 1 else f"{mean:.2f} ± {std:.2f}{unit}"


def format_table(summary: list[dict]) -> str:
    """The Table-2-style comparison (group ``table`` of :func:`summarize`) as Markdown: mean ± std over seeds."""
    seeds = max((e["n"] for e in summary if e["group"] == "table"), default=0)
    lines = ["| method | settings | dim | top-1 | top-3 | mAP | encode s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for e in summary:
        if e["group"] == "table":
            mark = "" if e["svm_converged"] else " *"
            lines.append(f"| {e['method']} | {e['param']} | {e['dim']:,} | {_pm(e, 'top1')}{mark} | {_pm(e, 'top3')} | "
                         f"{_pm(e, 'mean_ap')} | {e['encode_s_mean']:.2f} |")
    if seeds > 1:
        lines.append(f"\nmean ± sample standard deviation over {seeds} seeds")
    if not all(e["svm_converged"] for e in summary if e["group"] == "table"):
        lines.append("\n\\* liblinear stopped at its iteration limit before converging")
    return "\n".join(lines)


BASELINES = ("GA", "AVE", "Concatenation", "FV (GMM)", "VLAD", "BP")


def spread_notes(summary: list[dict]) -> list[str]:
    """How FV-VAE's table rows (with the paper's FIM, and the best) compare with each baseline's top-1:
    the difference of the means and whether it exceeds twice its standard error over seeds."""
    table = [e for e in summary if e["group"] == "table"]
    ours = [e for e in table if e["method"] == "FV-VAE"]
    if not ours:
        return []
    picked = {id(e): e for e in (next((e for e in ours if "FIM diagonal" in e["param"]), ours[0]),
                                 max(ours, key=lambda e: e["top1_mean"]))}
    lines = []
    for e in picked.values():
        for b in (b for b in table if b["method"] in BASELINES):
            diff = 100 * (e["top1_mean"] - b["top1_mean"])
            se = 100 * float(np.sqrt(e["top1_std"] ** 2 / e["n"] + b["top1_std"] ** 2 / b["n"]))
            verdict = ("one seed: no spread" if min(e["n"], b["n"]) < 2 else
                       "exceeds the spread" if abs(diff) > 2 * se else "within the spread")
            lines.append(f"FV-VAE ({e['param']}) vs {b['method']}: {diff:+.2f} points top-1 "
                         f"(2 standard errors {2 * se:.2f}: {verdict})")
    return lines
