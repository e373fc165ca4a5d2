"""The ``fvvae`` command line (also ``python -m fvvae_fast``)."""

from __future__ import annotations

import argparse
import sys

from .demo import DemoConfig, run_demo


def _demo(args: argparse.Namespace) -> int:
    run_demo(DemoConfig(iterations=args.iterations, seed=args.seed), progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvvae", description="FV-VAE Fisher vectors (Qiu et al., CVPR 2017).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="end-to-end run on generated descriptors: train, encode, classify")
    demo.add_argument("--iterations", type=int, default=DemoConfig.iterations, help="training iterations")
    demo.add_argument("--seed", type=int, default=0, help="random seed for data, training and sampling")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fvvae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
