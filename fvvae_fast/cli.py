"""The ``fvvae`` command line (also ``python -m fvvae_fast``).

Stages, each resumable (rerun the same command after a crash) and each ending with a summary:

    fvvae descriptors  videos/images/arrays -> a descriptor store   (backbone, SPP, sharded, resumable)
    fvvae train        descriptor store -> FV-VAE checkpoint         (resumes from the checkpoint)
    fvvae fim          model + descriptor store -> Fisher information estimate
    fvvae encode       model (+ FIM) + descriptor store -> Fisher-vector store
    fvvae evaluate     Fisher-vector store -> top-1 of a linear SVM (C = 100)
    fvvae run CONFIG   all of the above from one TOML (or YAML) file
    fvvae demo         the paper's comparison (Table 2, Fig. 4-6) on built-in real data

Under ``torchrun --nproc-per-node N -m fvvae_fast <stage> ...`` the stages descriptors, train, fim,
encode and run spread their work over the N processes (:mod:`fvvae_fast.distributed`).

User mistakes (a missing file, a bad option value, a store written with other settings)
print one ``fvvae <command>: error: ...`` line and exit with status 2; set FVVAE_DEBUG=1
for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__, distributed
from .io import file_sha256
from .demo import DemoConfig, run_demo
from .evaluation.builtin import DATASETS as BUILTIN_DATASETS
from .evaluation.compare import CompareConfig

EXIT_USAGE = 2
DISTRIBUTED_COMMANDS = ("descriptors", "train", "fim", "encode", "run")  # run unchanged under torchrun
EXIT_INTERRUPTED = 130
DATASETS = ("ucf101", "cub", "activitynet", "folder", "arrays")
DEFAULT_SOURCE = {"ucf101": "video", "activitynet": "video", "cub": "image", "folder": "video", "arrays": "precomputed"}
DEFAULT_BACKBONE = {"video": "vgg19-pool5", "image": "vgg19-conv5_4"}


class UsageError(ValueError):
    """A mistake in the command line or config file."""


def _not_an_input(args: argparse.Namespace, *inputs: str) -> None:
    """Refuse an --out that is (or holds) one of the stage's inputs: no command overwrites what it reads."""
    out = Path(args.out).resolve()
    for name in inputs:
        value = getattr(args, name, None)
        if value is None:
            continue
        path = Path(value).resolve()
        if out == path or out in path.parents:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--out {args.out} would overwrite the input {flag} {value}: write to another path")


def _say(args: argparse.Namespace, *lines: str) -> None:
    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        for line in lines:
            print(line, flush=True)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated grid sizes such as 6,3,2,1, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"grid sizes must be >= 1, got {text!r}")
    return levels


def _hidden(text: str):
    text = str(text).strip().lower()
    if text in ("none", "0", ""):
        return 0
    if text == "default":
        return None
    try:
        dims = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'default', 'none' or sizes such as 512 or 512,512, got {text!r}") from None
    return dims[0] if len(dims) == 1 else dims


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))  # CompareConfig checks they are distinct
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# ------------------------------------------------------------------------------ descriptors


def _read_dataset(args: argparse.Namespace, source_kind: str):
    from .pipelines import datasets as ds

    def need(name: str) -> Path:
        value = getattr(args, name)
        if value is None:
            raise UsageError(f"--dataset {args.dataset} needs --{name.replace('_', '-')}")
        return Path(value)

    if args.dataset == "ucf101":
        return ds.read_ucf101(need("root"), args.annotations, split=args.split)
    if args.dataset == "cub":
        return ds.read_cub(need("root"))
    if args.dataset == "activitynet":
        return ds.read_activitynet(need("annotations"), need("root"))
    if args.dataset == "folder":
        exts = {"video": ds.VIDEO_EXTENSIONS, "image": ds.IMAGE_EXTENSIONS, "precomputed": (".npy",)}[source_kind]
        return ds.read_folder(need("root"), exts)
    raise UsageError(f"unknown dataset {args.dataset!r}")


def _array_dataset(args: argparse.Namespace):
    import numpy as np

    from .pipelines.datasets import Dataset
    from .pipelines.sources import array_items

    if args.arrays is None or args.offsets is None:
        raise UsageError("--dataset arrays needs --arrays X.npy (N, C) and --offsets OFFSETS.npy (S+1,)")
    x = np.load(args.arrays, mmap_mode="r")
    offsets = np.load(args.offsets)
    if x.ndim != 2:
        raise UsageError(f"{args.arrays}: expected an (N, C) array, got shape {x.shape}")
    labels = np.load(args.labels) if args.labels else None
    splits = None
    if args.splits:
        splits = [line.strip() for line in Path(args.splits).read_text().splitlines()]
        splits = [s for s in splits if s != ""] if len(splits) != len(offsets) - 1 else splits
    items = array_items(x, offsets, labels, splits)
    classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None and len(labels) else []
    return Dataset(Path(args.arrays).stem, items, classes), (x, np.asarray(offsets, dtype=np.int64))


def cmd_descriptors(args: argparse.Namespace) -> int:
    from .pipelines import ImageSource, PrecomputedSource, VideoSource, build_backbone, extract_descriptors

    _not_an_input(args, "root", "annotations", "weights", "arrays", "offsets", "labels", "splits")
    source_kind = args.source or DEFAULT_SOURCE[args.dataset]
    if args.dataset == "arrays" and source_kind != "precomputed":
        raise UsageError("--dataset arrays holds precomputed descriptors: use --source precomputed")
    if args.release:
        if source_kind != "video":
            raise UsageError("--release is the released model's video pipeline: use it with --source video")
        args.backbone = args.backbone or "vgg19-pool5"
        args.preprocess = "release"
        args.map_scale = args.map_scale or 158.0
    arrays = None
    if args.dataset == "arrays":
        dataset, arrays = _array_dataset(args)
    else:
        dataset = _read_dataset(args, source_kind)
    if args.subset:
        dataset = dataset.split(*args.subset)
        if not dataset.items:
            raise UsageError(f"no item in subset(s) {', '.join(args.subset)}")
    backbone = None
    if source_kind == "precomputed":
        source = PrecomputedSource(arrays=arrays)
    else:
        if source_kind == "video":
            source = VideoSource(preprocess=args.preprocess, map_scale=args.map_scale, frames=args.frames,
                                 size=args.size or 224, resize=args.resize or round((args.size or 224) * 256 / 224),
                                 levels=args.levels)
        else:
            source = ImageSource(preprocess=args.preprocess, map_scale=args.map_scale, size=args.size or 448,
                                 use_box=args.box)
        backbone = build_backbone(args.backbone or DEFAULT_BACKBONE[source_kind], args.layer, weights=args.weights,
                                  random_weights=args.random_weights, seed=args.seed, device=_device(args.device))
    splits = ", ".join(repr(s) for s in dataset.splits())
    _say(args, f"descriptors: {len(dataset.items)} {source_kind} items of {dataset.name} "
               f"({len(dataset.classes)} classes, splits: {splits}) -> {args.out}")
    report = extract_descriptors(source, dataset, args.out, backbone, shard_items=args.shard_items,
                                 batch_frames=args.batch_frames, workers=args.workers, device=_device(args.device),
                                 dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    _say(args, *report.lines())
    return 0


# ------------------------------------------------------------------------------ train


TRAIN_SPLITS = ("train", "training")  # UCF101/CUB/folders, ActivityNet
TEST_SPLITS = {"train": "test", "training": "validation"}


def _auto_split(store, split: str | None) -> str | None:
    """None (the option's default): the store's training split when it has one, else all items."""
    if split == "all":
        return None
    if split is None:
        return next((s for s in TRAIN_SPLITS if s in store.splits()), None)
    if split not in store.splits():
        raise UsageError(f"{store.path}: no split {split!r} (splits: {', '.join(map(repr, store.splits()))}; "
                         f"'all' for every item)")
    return split


def cmd_train(args: argparse.Namespace) -> int:
    from .model import FVVAE
    from .store import Store
    from .train import TrainConfig, train

    _not_an_input(args, "descriptors")
    store = Store.open(args.descriptors, kind="descriptors")
    split = _auto_split(store, args.split)
    data = store.sets(split)
    map_scale = (store.config.get("source") or {}).get("map_scale")
    norm = args.norm if args.norm != "auto" else ("map" if map_scale else "descriptor")
    norm_scale = args.norm_scale if args.norm_scale is not None else float(map_scale or 1.0)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = len(store.classes) if args.lambda3 != 0 and store.classes else 0
    model = FVVAE(in_dim=store.dim, latent_dim=args.latent_dim, num_classes=num_classes, hidden_dim=args.hidden_dim,
                  norm=norm, norm_scale=norm_scale, dropout=args.dropout, seed=args.seed)
    if num_classes and len(data) and int(data.labels.min()) < 0:
        raise UsageError(f"{store.path}: some training items have no label; use --lambda3 0 or --num-classes 0")
    config = TrainConfig(iterations=args.iterations, batch_sets=args.batch_sets, lr=args.lr, lambda3=args.lambda3,
                         descriptors_per_set=args.descriptors_per_set, seed=args.seed, device=_device(args.device),
                         checkpoint_every=args.checkpoint_every)
    _say(args, f"train: {len(data)} sets ({data.x.shape[0]} descriptors, C={store.dim}) of split "
               f"{split if split is not None else 'all'!r}; model {model.config()}")
    if args.overwrite and distributed.is_main():
        Path(args.out).unlink(missing_ok=True)
    distributed.barrier()
    t0 = time.perf_counter()
    result = train(model, data, config, checkpoint=args.out, progress=not args.quiet, log_dir=args.log_dir,
                   resume="extend" if args.extend else "exact")
    seconds = time.perf_counter() - t0
    done = config.iterations - result.resumed_from
    last = result.history[-1] if result.history else {}
    losses = ", ".join(f"{k}={last[k]:.4g}" for k in ("rec", "reg", "cls", "total") if k in last)
    health = (f"decoder: {100 * last['active']:.1f}% of pre-activations active, {100 * last['alive']:.1f}% of units "
              f"alive, sigma_x in [{last['sigma_x_min']:.3g}, {last['sigma_x_max']:.3g}]" if "active" in last else "")
    _say(args, f"train: {done} iterations in {seconds:.1f} s (resumed from {result.resumed_from}); "
               f"last losses: {losses or 'n/a'}", *([health] if health else []), f"model: {args.out}")
    return 0


# ------------------------------------------------------------------------------ fim / encode / evaluate


def _load_any_model(path: str | os.PathLike):
    from .official import load_official
    from .train import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.suffix.lower() == ".mat":
        return load_official(path)
    return load_model(path)


def cmd_fim(args: argparse.Namespace) -> int:
    from .pipelines import estimate_fim
    from .store import Store

    _not_an_input(args, "model", "descriptors")
    model = _load_any_model(args.model)
    store = Store.open(args.descriptors, kind="descriptors")
    split = _auto_split(store, args.split)
    if args.mode == "lowrank" and not args.rank:
        raise UsageError("--mode lowrank needs --rank K")
    if args.mode != "lowrank" and args.rank:
        raise UsageError(f"--rank is only for --mode lowrank, not {args.mode}")
    t0 = time.perf_counter()
    fim = estimate_fim(model, store, mode=args.mode, rank=args.rank, damping=args.damping, split=split,
                       batch_sets=args.batch_sets, device=_device(args.device), progress=not args.quiet)
    if distributed.is_main():
        fim.save(args.out)
    distributed.barrier()
    _say(args, f"fim: {fim!r} from {fim.num_sets} sets of split {split if split is not None else 'all'!r} "
               f"in {time.perf_counter() - t0:.1f} s", f"fim: {args.out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipelines import encode_store
    from .store import Store

    _not_an_input(args, "model", "fim", "descriptors")
    model = _load_any_model(args.model)
    fim = None
    extra = {"model_sha256": file_sha256(args.model)}
    if args.fim:
        from .fim import FisherInformation

        if not Path(args.fim).is_file():
            raise FileNotFoundError(f"{args.fim}: FIM file not found")
        fim = FisherInformation.load(args.fim)
        extra["fim_sha256"] = file_sha256(args.fim)
    src = Store.open(args.descriptors, kind="descriptors")
    report = encode_store(model, src, args.out, fim=fim, normalize=args.normalize, batch_sets=args.batch_sets,
                          device=_device(args.device), overwrite=args.overwrite, progress=not args.quiet,
                          extra_config=extra)
    _say(args, *report.lines())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipelines import evaluate_store
    from .store import Store

    store = Store.open(args.fisher, kind="fisher")
    train_split = args.train_split or next((s for s in TRAIN_SPLITS if s in store.splits()), "train")
    test_split = args.test_split or TEST_SPLITS.get(train_split, "test")
    res = evaluate_store(store, train_split=train_split, test_split=test_split, C=args.C)
    _say(args, f"evaluate: one-vs-all linear SVM (C={args.C:g}) on {res['train']} {train_split!r} vectors, "
               f"{res['classes']} classes, tested on {res['test']} {test_split!r} vectors "
               f"in {res['seconds']:.1f} s",
         f"top-1 accuracy: {100 * res['top1']:.2f}%, top-3: {100 * res['top3']:.2f}%, mAP: {100 * res['mean_ap']:.2f}%")
    if args.json:
        from .io import atomic_open

        with atomic_open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    if args.descriptors is not None and not Path(args.descriptors).is_dir():
        raise FileNotFoundError(f"{args.descriptors}: descriptor store not found (make one with `fvvae descriptors`)")
    compare = dataclasses.replace(CompareConfig(), iterations=args.iterations, sweep_iterations=args.sweep_iterations,
                                  lambda3=args.lambda3, latent_dim=args.latent_dim, seeds=args.seeds)
    config = DemoConfig(dataset=args.dataset, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                        compare=compare)
    run_demo(config, args.out, descriptors=args.descriptors, train_split=args.train_split,
             test_split=args.test_split, progress=not args.quiet)
    return 0


# ------------------------------------------------------------------------------ run


STAGES = ("descriptors", "train", "fim", "encode", "evaluate")
# options that `run` fills in itself (the files between stages, in the run's folder)
RUN_PATHS = {
    "descriptors": {"out": "descriptors"},
    "train": {"descriptors": "descriptors", "out": "model.pt"},
    "fim": {"descriptors": "descriptors", "model": "model.pt", "out": "fim.pt"},
    "encode": {"descriptors": "descriptors", "model": "model.pt", "fim": "fim.pt", "out": "fisher"},
    "evaluate": {"fisher": "fisher"},
}
PATH_OPTIONS = {"root", "annotations", "weights", "arrays", "offsets", "labels", "splits", "model", "json"}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_bytes()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"{path}: invalid YAML: {err}") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise UsageError(f"{path}: TOML configs need Python 3.11+ or the tomli package") from None
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: invalid TOML: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a table of stage sections")
    return data


def _section_argv(stage: str, section: dict, parser: argparse.ArgumentParser, where: str, base: Path) -> list[str]:
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in section.items():
        dest = key.replace("-", "_")
        if dest in RUN_PATHS.get(stage, {}):
            raise UsageError(f"{where}: {key!r} is set by `fvvae run` (the files go in the run's `out` folder)")
        action = actions.get(dest)
        if action is None or dest in ("help", "quiet", "overwrite"):
            known = ", ".join(sorted(d for d in actions if d not in ("help", "quiet", "overwrite")))
            raise UsageError(f"{where}: unknown key {key!r} (known: {known})")
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key!r} must be true or false, got {value!r}")
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key!r} must be true or false, got {value!r}")
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            if action.nargs in ("+", "*"):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, ",".join(map(str, value))]
        else:
            if dest in PATH_OPTIONS and not Path(str(value)).is_absolute():
                value = base / str(value)
            argv += [flag, str(value)]
    return argv


def cmd_run(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    cfg = _read_config(config_path)
    base = config_path.resolve().parent
    unknown = set(cfg) - set(STAGES) - {"out"}
    if unknown:
        raise UsageError(f"{config_path}: unknown section(s) {', '.join(sorted(unknown))} "
                         f"(sections: out, {', '.join(STAGES)})")
    out = Path(args.out or cfg.get("out") or "")
    if not str(out) or str(out) == ".":
        raise UsageError(f"{config_path}: set `out = \"folder\"` (top level) or --out")
    if not out.is_absolute() and not args.out:
        out = base / out
    if "descriptors" not in cfg:
        raise UsageError(f"{config_path}: needs a [descriptors] section (the dataset and the backbone)")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    use_fim = isinstance(cfg.get("fim"), dict) and cfg["fim"].get("enabled", True)
    stages = [s for s in STAGES if s != "fim" or use_fim]
    t0 = time.perf_counter()
    for stage in stages:
        section = cfg.get(stage) or {}
        if not isinstance(section, dict):
            raise UsageError(f"{config_path}: [{stage}] must be a table")
        section = {k: v for k, v in section.items() if k != "enabled"}
        argv = [stage, *_section_argv(stage, section, subparsers[stage], f"{config_path} [{stage}]", base)]
        for dest, name in RUN_PATHS[stage].items():
            if dest == "fim" and not use_fim:
                continue
            argv += [f"--{dest.replace('_', '-')}", str(out / name)]
        if args.quiet:
            argv.append("--quiet")
        if args.overwrite and stage in ("descriptors", "train", "encode"):
            argv.append("--overwrite")
        stamp = None
        if stage == "fim":  # one pass, not resumable: kept when made by the same settings from the same model
            stamp = json.dumps({"argv": argv, "model_sha256": file_sha256(out / "model.pt")}, sort_keys=True)
            stamp_file = out / "fim.stamp.json"
            if (not args.overwrite and (out / "fim.pt").is_file() and stamp_file.is_file()
                    and stamp_file.read_text() == stamp):
                _say(args, f"== fim: {out / 'fim.pt'} exists for this model and settings, kept")
                continue
        _say(args, f"== {stage}: fvvae {' '.join(argv)}")
        sub_args = parser.parse_args(argv)
        sub_args.command = stage
        code = sub_args.func(sub_args)
        if code:
            return code
        if stamp is not None:
            from .io import atomic_open

            with atomic_open(out / "fim.stamp.json", "w") as f:
                f.write(stamp)
    _say(args, f"run: {', '.join(stages)} done in {time.perf_counter() - t0:.1f} s; outputs in {out}")
    return 0


# ------------------------------------------------------------------------------ parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps one-paragraph descriptions, keeps texts with line breaks as written (examples),
    appends a default only when there is one to tell."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "%(default)" in text or "default:" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            default = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else "%(default)s"
            return f"{text} (default: {default})"
        return text


def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto",
                       help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvvae", description="FV-VAE Fisher vectors (Qiu et al., CVPR 2017).",
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"fvvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # descriptors ----------------------------------------------------------------------
    d = sub.add_parser(
        "descriptors", formatter_class=_Formatter,
        help="videos, images or arrays -> a resumable store of descriptor sets",
        description="Decode the items of a dataset, run a backbone, pool the conv maps into descriptors "
                    "(video: 25 frames x 50 SPP descriptors; image: 448x448 -> 28x28 = 784) and write one "
                    "set per item to a sharded store. Rerun the same command to resume after a crash; "
                    "unreadable items are skipped, logged and counted.")
    g = d.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, required=True,
                   help="layout: ucf101 (--root videos, --annotations ucfTrainTestlist/), cub (--root CUB_200_2011/), "
                        "activitynet (--annotations the v1.3 JSON, --root videos), folder (--root with one folder "
                        "per class, optionally under train/ test/), arrays (--arrays, --offsets)")
    g.add_argument("--root", help="dataset folder (videos, images, or per-item .npy files)")
    g.add_argument("--annotations", help="UCF101: the folder of classInd.txt and the split lists "
                                         "(default: ROOT/ucfTrainTestlist or beside ROOT); ActivityNet: the JSON file")
    g.add_argument("--split", type=int, choices=(1, 2, 3), default=1, help="UCF101 train/test split")
    g.add_argument("--subset", nargs="+", metavar="SPLIT", help="only the items of these splits (e.g. train test)")
    g.add_argument("--arrays", help="--dataset arrays: (N, C) .npy of descriptors")
    g.add_argument("--offsets", help="--dataset arrays: (S+1,) int .npy, set s = rows offsets[s]:offsets[s+1]")
    g.add_argument("--labels", help="--dataset arrays: (S,) int .npy of labels (optional)")
    g.add_argument("--splits", help="--dataset arrays: text file, one split name per set (optional)")
    g = d.add_argument_group("source and backbone")
    g.add_argument("--source", choices=("video", "image", "precomputed"),
                   help="what an item is (default: video for ucf101/activitynet/folder, image for cub)")
    g.add_argument("--backbone", help="preset (vgg19-pool5, vgg19-conv5_4, resnet152-res5c, mobilenet_v2) or any "
                                      "torchvision model name with --layer (default: vgg19-pool5 for video, "
                                      "vgg19-conv5_4 for images)")
    g.add_argument("--layer", help="the layer whose output is the conv map (a torchvision feature-extraction node "
                                   "or submodule name), overrides the preset's")
    g.add_argument("--weights", help="local state_dict file of the backbone (nothing is downloaded)")
    g.add_argument("--random-weights", action="store_true", help="allow random backbone weights (tests only)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random backbone weights")
    g.add_argument("--preprocess", choices=("torchvision", "release"), default="torchvision",
                   help="torchvision: RGB, ImageNet mean/std; release: the released model's Caffe input "
                        "(240x320 resize, 224 crop, BGR minus [104,117,123])")
    g.add_argument("--map-scale", type=float, help="the release's whole-map L2 normalisation times this scale "
                                                   "before pooling (158 for the released model)")
    g.add_argument("--release", action="store_true",
                   help="the released model's pipeline: vgg19-pool5, --preprocess release, --map-scale 158 "
                        "(give --weights: VGG-19 converted from Caffe)")
    g = d.add_argument_group("sampling and pooling")
    g.add_argument("--frames", type=_positive_int, default=25, help="video: frames sampled uniformly over the clip")
    g.add_argument("--size", type=_positive_int, help="input size: video crop (default 224), image side (default 448)")
    g.add_argument("--resize", type=_positive_int, help="video, torchvision preprocessing: shorter side before "
                                                        "the crop (default size * 256 / 224)")
    g.add_argument("--levels", type=_levels, default=(6, 3, 2, 1), help="video: SPP grid sizes")
    g.add_argument("--box", action="store_true", help="images: crop to the bounding box first (CUB '+box')")
    g = d.add_argument_group("output and performance")
    g.add_argument("--out", required=True, help="store folder (created, or resumed when it exists)")
    g.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    g.add_argument("--shard-items", type=_positive_int, default=32,
                   help="items per shard: the unit of resumption; a shard's descriptors stay in memory until written")
    g.add_argument("--batch-frames", type=_positive_int, default=64, help="frames per backbone batch")
    g.add_argument("--workers", type=_nonneg_int, default=_default_workers(),
                   help="decoding worker processes (0: decode in the main process)")
    g.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored descriptor type")
    _common(d)
    d.set_defaults(func=cmd_descriptors)

    # train ------------------------------------------------------------------------------
    t = sub.add_parser("train", formatter_class=_Formatter, help="train FV-VAE on a descriptor store",
                       description="Train FV-VAE (AdaDelta, Algorithm 1) on the sets of a descriptor store. "
                                   "The checkpoint --out is rewritten atomically every --checkpoint-every "
                                   "iterations; rerunning the command resumes from it.")
    t.add_argument("--descriptors", required=True, help="descriptor store (from `fvvae descriptors`)")
    t.add_argument("--split", help="train on this split (default: 'train' when the store has it, else all; 'all')")
    t.add_argument("--out", required=True, help="checkpoint file (resumed when it exists)")
    t.add_argument("--overwrite", action="store_true", help="start again instead of resuming from --out")
    t.add_argument("--extend", action="store_true",
                   help="train the run in --out on to a larger --iterations (recorded in the checkpoint); without "
                        "it, resuming with any changed setting is refused")
    t.add_argument("--log-dir", help="write TensorBoard scalars (losses, decoder liveness, sigma_x) to this folder")
    t.add_argument("--latent-dim", type=_positive_int, default=255, help="d: the FV has C x (d+1) dimensions")
    t.add_argument("--hidden-dim", type=_hidden, default=None,
                   help="encoder hidden layers: default (one of C), none, or sizes such as 512,512")
    t.add_argument("--norm", choices=("auto", "descriptor", "map", "none"), default="auto",
                   help="descriptor preprocessing; auto: map when the store was made with --map-scale, else descriptor")
    t.add_argument("--norm-scale", type=float,
                   help="norm='map' scale recorded in the model (default: the store's map scale)")
    t.add_argument("--dropout", type=float, default=0.5, help="dropout on the encoder input")
    t.add_argument("--num-classes", type=_nonneg_int, help="classifier on z (default: the store's classes; 0 = none)")
    t.add_argument("--iterations", type=_positive_int, default=5000, help="AdaDelta iterations")
    t.add_argument("--batch-sets", type=_positive_int, default=128, help="sets per mini-batch")
    t.add_argument("--descriptors-per-set", type=_positive_int,
                   help="random descriptors per set and iteration (default all; 50 = one video frame)")
    t.add_argument("--lr", type=float, default=1.0, help="AdaDelta learning rate")
    t.add_argument("--lambda3", type=float, default=1000.0, help="weight of the classification loss (0 = FV-VAE-)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of everything random: initial weights, the data-dependent start, set sampling, "
                        "dropout, z noise")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500, help="iterations between checkpoints")
    _common(t)
    t.set_defaults(func=cmd_train)

    # fim ------------------------------------------------------------------------------
    f = sub.add_parser("fim", formatter_class=_Formatter, help="estimate the Fisher information F (Eq. 12)",
                       description="One pass over the training sets of a descriptor store: a streaming "
                                   "estimate of F (diagonal, diagonal + low rank, or Kronecker) saved for encode.")
    f.add_argument("--model", required=True, help="checkpoint from `fvvae train`, or a released .mat file")
    f.add_argument("--descriptors", required=True, help="descriptor store")
    f.add_argument("--split", help="estimate on this split (default: 'train' when present, else all; 'all')")
    f.add_argument("--out", required=True, help="FIM file to write")
    f.add_argument("--mode", choices=("diagonal", "lowrank", "kronecker"), default="diagonal", help="estimate of F")
    f.add_argument("--rank", type=_positive_int, help="--mode lowrank: rank k")
    f.add_argument("--damping", type=float, help="floor relative to the mean diagonal (default: the estimator's; "
                                                 "0 = the release's normalize_raw_fv)")
    f.add_argument("--batch-sets", type=_positive_int, default=32, help="sets per batch")
    _common(f)
    f.set_defaults(func=cmd_fim)

    # encode ----------------------------------------------------------------------------
    e = sub.add_parser("encode", formatter_class=_Formatter, help="descriptor store -> Fisher-vector store",
                       description="One Fisher vector per set: -F^(-1/2) vec(G_X), signed sqrt, L2 (Eq. 13). "
                                   "Written shard by shard to a store; rerun to resume.")
    e.add_argument("--model", required=True, help="checkpoint from `fvvae train`, or a released .mat file")
    e.add_argument("--fim", help="FIM file from `fvvae fim` (default: none, F = I)")
    e.add_argument("--descriptors", required=True, help="descriptor store")
    e.add_argument("--out", required=True, help="Fisher-vector store folder (resumed when it exists)")
    e.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="signed square root and L2 normalisation")
    e.add_argument("--batch-sets", type=_positive_int, default=16, help="sets per encoding batch")
    _common(e)
    e.set_defaults(func=cmd_encode)

    # evaluate --------------------------------------------------------------------------
    v = sub.add_parser("evaluate", formatter_class=_Formatter, help="linear SVM (C=100) top-1 on a Fisher-vector store",
                       description="Train a one-vs-all linear SVM on the vectors of one split and report the "
                                   "top-1 accuracy on another (paper section 5.2).")
    v.add_argument("--fisher", required=True, help="Fisher-vector store (from `fvvae encode`)")
    v.add_argument("--train-split", help="split the SVM is trained on (default: train, or ActivityNet's training)")
    v.add_argument("--test-split", help="split the accuracy is measured on (default: test, or ActivityNet's "
                                        "validation when training on training)")
    v.add_argument("--C", type=float, default=100.0, help="SVM regularisation constant")
    v.add_argument("--json", help="also write the results to this JSON file")
    _common(v, device=False)
    v.set_defaults(func=cmd_evaluate)

    # run -------------------------------------------------------------------------------
    r = sub.add_parser(
        "run", formatter_class=_Formatter, help="the whole chain from one TOML/YAML config",
        description="Run descriptors -> train -> fim -> encode -> evaluate from one config file. Top-level "
                    "`out` is the run's folder; sections [descriptors], [train], [fim] (optional; "
                    "enabled = false skips it), [encode], [evaluate] take the options of the subcommands "
                    "(without the dashes, e.g. latent_dim = 255); the files between stages are set by run. "
                    "Relative paths are relative to the config file. Every stage resumes, so rerunning "
                    "the command after a crash continues where it stopped.",
        epilog='example:\n  out = "runs/ucf101-1"\n  [descriptors]\n  dataset = "ucf101"\n  root = "UCF101"\n'
               '  weights = "vgg19.pth"\n  [train]\n  iterations = 5000\n  [fim]\n  mode = "diagonal"\n'
               '  [encode]\n  [evaluate]\n')
    r.add_argument("config", help="TOML (or YAML, with PyYAML) config file")
    r.add_argument("--out", help="the run's folder (overrides the config's `out`)")
    r.add_argument("--overwrite", action="store_true", help="recompute everything from scratch")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    # demo ------------------------------------------------------------------------------
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, help="the paper's comparison on built-in real data (or any descriptor store)",
        description="Animal-MNIST (10 classes of real silhouettes) through ImageNet MobileNetV2 from pinned packages: "
                    "FV-VAE (every FIM mode, lambda3 and latent sweeps) against GA, AVE, Concatenation, FV (GMM), "
                    "VLAD and BP with one linear SVM (C=100); prints the Table-2-style comparison, writes it to "
                    "OUT/table.md and OUT/results.json, and draws Fig. 4(a-c), 5 and 6 as PNG files in OUT. "
                    "--descriptors runs the same comparison on a store from `fvvae descriptors` (UCF101, CUB, a "
                    "folder per class, another backbone). Rerun to resume.")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--descriptors", help="a descriptor store with train and test splits instead of the built-in data")
    demo.add_argument("--train-split", default="train", help="--descriptors: the split the models and SVMs learn on")
    demo.add_argument("--test-split", default="test", help="--descriptors: the split the figures are measured on")
    demo.add_argument("--train-per-class", type=_positive_int, default=DemoConfig.train_per_class,
                      help="built-in data: training images per class")
    demo.add_argument("--test-per-class", type=_positive_int, default=DemoConfig.test_per_class,
                      help="built-in data: test images per class")
    demo.add_argument("--iterations", type=_positive_int, default=CompareConfig.iterations,
                      help="FV-VAE training iterations of the table's models")
    demo.add_argument("--sweep-iterations", type=_positive_int, default=CompareConfig.sweep_iterations,
                      help="FV-VAE training iterations of the figures' sweeps (Fig. 4)")
    demo.add_argument("--latent-dim", type=_positive_int, default=CompareConfig.latent_dim,
                      help="FV-VAE latent size d of the table's rows")
    demo.add_argument("--lambda3", type=float, default=CompareConfig.lambda3, help="classification loss weight")
    demo.add_argument("--seeds", type=_seeds, default=CompareConfig.seeds,
                      help="comma-separated seeds (each: the split, the models, the baselines); the table gives "
                           "mean ± std over them")
    demo.add_argument("--dataset", choices=tuple(BUILTIN_DATASETS), default=DemoConfig.dataset, help="the built-in image set")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            distributed.init_from_env()
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fvvae {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError) as err:
        if os.environ.get("FVVAE_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fvvae {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
