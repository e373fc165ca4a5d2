"""The ``fvvae`` command line (also ``python -m fvvae_fast``).

Stages, each resumable (rerun the same command after a crash) and each ending with a summary:

    fvvae descriptors  videos/images/arrays -> a descriptor store   (backbone, SPP, sharded, resumable)
    fvvae train        descriptor store -> FV-VAE checkpoint         (resumes from the checkpoint)
    fvvae fim          model + descriptor store -> Fisher information estimate
    fvvae encode       model (+ FIM) + descriptor store -> Fisher-vector store
    fvvae evaluate     Fisher-vector store(s) -> linear SVM (C = 100): top-1, top-3, mAP; several: late fusion
    fvvae run CONFIG   all of the above from one TOML (or YAML) file; a rerun redoes what changed
    fvvae finetune     a backbone fine-tuned on a dataset (classifier, end to end, FV head) -> --weights
    fvvae demo         the paper's comparison (Table 2, Fig. 4-6) on built-in real data

Under ``torchrun --nproc-per-node N -m fvvae_fast <stage> ...`` the stages descriptors, train, fim,
encode, finetune and run spread their work over the N processes (:mod:`fvvae_fast.distributed`).

User mistakes (a missing file, a bad option value, a store written with other settings)
print one ``fvvae <command>: error: ...`` line and exit with status 2; set FVVAE_DEBUG=1
for the traceback.

This module only parses arguments and reports errors: the stages are the jobs of
:mod:`fvvae_fast.pipelines.jobs` (whose fields are the options below) and the runner of
:mod:`fvvae_fast.pipelines.config`. Only the chosen command's modules are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DISTRIBUTED_COMMANDS = ("descriptors", "train", "fim", "encode", "run", "finetune")  # run unchanged under torchrun
COMMANDS = {
    "descriptors": "videos, images or arrays -> a resumable store of descriptor sets",
    "train": "train FV-VAE on a descriptor store",
    "fim": "estimate the Fisher information F (Eq. 12)",
    "encode": "descriptor store -> Fisher-vector store",
    "evaluate": "linear SVM (C=100) on a Fisher-vector store: top-1, top-3 and mAP",
    "run": "the whole chain from one TOML/YAML config",
    "demo": "the paper's comparison on built-in real data (or any descriptor store)",
    "finetune": "fine-tune a backbone on a dataset's frames or images (classifier, end to end, FV head)",
}


def _say(*lines: str) -> None:
    from . import distributed

    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        for line in lines:
            print(line, flush=True)


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")  # :class:`~.jobs.Job`, :func:`t <x>`


def plain_text(text: str) -> str:
    """reST of the docstrings the help is made of -> plain text: ``x`` and `x` -> 'x', :role:`~a.B` -> B,
    a closing "::" -> ":"."""
    text = _ROLE.sub(lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    text = re.sub(r"``(.+?)``", r"'\1'", text, flags=re.S)
    text = re.sub(r"`([^`]+)`", r"'\1'", text)
    return re.sub(r"::$", ":", text, flags=re.M)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal, unless --quiet."""
    from .progress import show_progress

    return not args.quiet and show_progress(None)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps one-paragraph descriptions, keeps texts with line breaks as written (examples),
    appends a default only when there is one to tell; plain text (:func:`plain_text`)."""

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n\n" in text.strip() or text.startswith("example"):
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


class _Parser(argparse.ArgumentParser):
    """Reports a mistake in the arguments as one line (``fvvae <command>: error: ...``, exit 2), like
    every other user error; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argument_type(parse):
    def convert(value: str):
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _add_job_options(p: argparse.ArgumentParser, job: type) -> None:
    """One option per field of the job, its default the field's (the one place it is written)."""
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for f in dataclasses.fields(job):
        meta = f.metadata
        group = meta.get("group")
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"help": meta.get("help"), "default": f.default}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            if meta.get("many"):
                kwargs["nargs"] = "+"
            elif meta.get("parse") is not None:
                kwargs["type"] = _argument_type(meta["parse"])
            if meta.get("choices") is not None:
                kwargs["choices"] = meta["choices"]
            kwargs["required"] = bool(meta.get("required"))
            if f.name == "C":
                kwargs["metavar"] = "C"
        groups[group].add_argument(flag, **kwargs)


def _job_command(args: argparse.Namespace) -> int:
    from .pipelines.jobs import JOBS

    cls = JOBS[args.command]
    job = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    report = job.run(progress=_progress(args), say=_say)
    _say(*report.lines())
    return 0


def _run_command(args: argparse.Namespace) -> int:
    from .pipelines.config import run_config

    run_config(args.config, out=args.out, overwrite=args.overwrite, progress=_progress(args), say=_say)
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    from .evaluation.compare import CompareConfig
    from .pipelines.options import refuse_overlap

    if args.descriptors is not None and not Path(args.descriptors).is_dir():
        raise FileNotFoundError(f"{args.descriptors}: descriptor store not found (make one with `fvvae descriptors`)")
    if args.descriptors is not None:
        refuse_overlap(args.out, "--out", [("--descriptors", args.descriptors)])
    compare = dataclasses.replace(CompareConfig(), iterations=args.iterations, sweep_iterations=args.sweep_iterations,
                                  lambda3=args.lambda3, latent_dim=args.latent_dim, seeds=args.seeds)
    config = DemoConfig(dataset=args.dataset, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                        compare=compare)
    run_demo(config, args.out, descriptors=args.descriptors, train_split=args.train_split,
             test_split=args.test_split, progress=_progress(args))
    return 0


def _add_run_options(r: argparse.ArgumentParser) -> None:
    from .pipelines import config

    r.description = config.__doc__
    r.epilog = ('example:\n  out = "runs/ucf101-1"\n  [descriptors]\n  dataset = "ucf101"\n  root = "UCF101"\n'
                '  weights = "vgg19.pth"\n  [train]\n  iterations = 5000\n  [fim]\n  mode = "diagonal"\n'
                '  [encode]\n  [evaluate]\n')
    r.add_argument("config", help="TOML (or YAML, with PyYAML) config file")
    r.add_argument("--out", help="the run's folder (overrides the config's `out`)")
    r.add_argument("--overwrite", action="store_true", help="recompute everything from scratch")
    r.set_defaults(func=_run_command)


def _add_demo_options(demo: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig
    from .evaluation.builtin import DATASETS
    from .evaluation.compare import CompareConfig
    from .pipelines.options import integer, integers

    positive, seeds = _argument_type(integer(1)), _argument_type(integers(None))
    demo.description = (
        "Animal-MNIST (10 classes of real silhouettes) through ImageNet MobileNetV2 from pinned packages: "
        "FV-VAE (every FIM mode, lambda3 and latent sweeps) against GA, AVE, Concatenation, FV (GMM), VLAD and BP "
        "with one linear SVM (C=100); prints the Table-2-style comparison, writes it to OUT/table.md and "
        "OUT/results.json, and draws Fig. 4(a-c), 5 and 6 as PNG files in OUT. --descriptors runs the same "
        "comparison on a store from `fvvae descriptors` (UCF101, CUB, a folder per class, another backbone). "
        "Rerun to resume.")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--descriptors", help="a descriptor store with train and test splits instead of the built-in data")
    demo.add_argument("--train-split", default="train", help="--descriptors: the split the models and SVMs learn on")
    demo.add_argument("--test-split", default="test", help="--descriptors: the split the figures are measured on")
    demo.add_argument("--train-per-class", type=positive, default=DemoConfig.train_per_class,
                      help="built-in data: training images per class")
    demo.add_argument("--test-per-class", type=positive, default=DemoConfig.test_per_class,
                      help="built-in data: test images per class")
    demo.add_argument("--iterations", type=positive, default=CompareConfig.iterations,
                      help="FV-VAE training iterations of the table's models")
    demo.add_argument("--sweep-iterations", type=positive, default=CompareConfig.sweep_iterations,
                      help="FV-VAE training iterations of the figures' sweeps (Fig. 4)")
    demo.add_argument("--latent-dim", type=positive, default=CompareConfig.latent_dim,
                      help="FV-VAE latent size d of the table's rows")
    demo.add_argument("--lambda3", type=float, default=CompareConfig.lambda3, help="classification loss weight")
    demo.add_argument("--seeds", type=seeds, default=CompareConfig.seeds,
                      help="comma-separated seeds (each: the split, the models, the baselines); the table gives "
                           "mean ± std over them")
    demo.add_argument("--dataset", choices=tuple(DATASETS), default=DemoConfig.dataset, help="the built-in image set")
    demo.set_defaults(func=_demo_command)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the options of ``command`` only (None: of every command; '': of none), so that a
    command imports only its own modules and ``fvvae --help`` imports none."""
    parser = _Parser(prog="fvvae", description="FV-VAE Fisher vectors (Qiu et al., CVPR 2017).",
                                     epilog=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"fvvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        p = sub.add_parser(name, help=summary, formatter_class=_Formatter)
        if command not in (None, name):
            continue
        if name == "run":
            _add_run_options(p)
        elif name == "demo":
            _add_demo_options(p)
        else:
            from .pipelines.jobs import JOBS

            p.description = " ".join(JOBS[name].__doc__.split())
            _add_job_options(p, JOBS[name])
            p.set_defaults(func=_job_command)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """The package's own warnings print as one ``fvvae <command>: warning: ...`` line (``notice:`` for a category
    marked ``one_line``: a file of an earlier version); others as Python prints them."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not category.__module__.startswith(f"{__package__}."):
                return default(message, category, filename, lineno, file, line)
            kind = "notice" if getattr(category, "one_line", False) else "warning"
            print(f"fvvae {command}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    from .errors import is_user_error

    try:
        if args.command in DISTRIBUTED_COMMANDS:
            from . import distributed

            distributed.init_from_env()
        from .threads import limit_torch_threads

        # torch threads: the CPU quota (and share) this process runs under
        with limit_torch_threads(), _warnings_as_lines(args.command):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"fvvae {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not is_user_error(err) or os.environ.get("FVVAE_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fvvae {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
