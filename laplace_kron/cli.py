"""The ``laplace-kron`` command line (also ``python -m laplace_kron``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__
from .constants import LINKS, PREDICTIVE_METHODS

__all__ = ["build_parser", "main"]


def _variants(value: str) -> list[str]:
    from .demo import VARIANTS

    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or [value]}; choose from {', '.join(VARIANTS)}"
        )
    return names


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """Say "unknown command" (not argparse's "invalid choice") for a mistyped subcommand."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message and "argument command" in message:
            bad = message.split("invalid choice: ", 1)[1].split(" ", 1)[0]
            message = f"unknown command {bad}; available commands: demo (see laplace-kron --help)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laplace-kron``."""
    from .demo import DEFAULT_VARIANTS, VARIANTS

    parser = _Parser(
        prog="laplace-kron",
        description="Scalable Kronecker-factored Laplace approximations (KFAC / EKFAC) for "
        "PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"laplace-kron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    demo = sub.add_parser(
        "demo",
        help="train a CNN on scikit-learn digits, fit Laplace, print a calibration/OOD table",
        description=(
            "Train a small CNN on scikit-learn's 8x8 digits (MAP), fit KFAC / EKFAC / last-layer "
            "Laplace approximations, tune the prior precision by marginal likelihood and compare "
            "MAP, Laplace and temperature scaling: test accuracy, NLL, ECE, Brier, OOD AUROC "
            "(digits vs sample-image patches and vs noise) and accuracy/ECE under rotation. "
            "Prints one table and saves results.json, results.md and PNG figures. No downloads."
        ),
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the split, initialisation and OOD sets (default: 0)",
    )
    demo.add_argument(
        "--out",
        default="demo_output",
        help="output folder for the JSON, markdown table and figures (default: demo_output)",
    )
    demo.add_argument(
        "--variants",
        type=_variants,
        default=",".join(DEFAULT_VARIANTS),
        help=(
            f"comma-separated Laplace variants out of {', '.join(VARIANTS)} "
            "(ll- = last layer only; default: %(default)s); MAP and temperature scaling always run"
        ),
    )
    demo.add_argument(
        "--quick", action="store_true", help="smoke-test mode: 4 epochs, fewer angles (< 30 s)"
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="MAP training epochs (default 30, quick 4)",
    )
    demo.add_argument(
        "--method",
        choices=PREDICTIVE_METHODS,
        default="glm",
        help="predictive: linearized closed form (glm), linearized MC samples (glm_mc) or "
        "network samples (nn); default: glm",
    )
    demo.add_argument(
        "--link",
        choices=LINKS,
        default="centered_probit",
        help="link of the glm predictive: probit of the sum-zero projected logits "
        "(centered_probit, default), logits sampled from their Gaussian (mc), probit, or "
        "Laplace bridge (bridge: unnormalised, bridge_norm: normalised)",
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=200,
        help="samples of the mc link and of the sampling predictives (default: 200)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; the tensors are tiny and one thread is fastest on a "
        "busy machine)",
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    """``laplace-kron demo``: run the demo with the parsed options."""
    from .demo import run_demo

    # options whose command-line name is the keyword of run_demo
    same = ("seed", "out", "variants", "quick", "epochs", "method", "link", "threads")
    run_demo(
        **{name: getattr(args, name) for name in same},
        n_samples=args.samples,
        progress=not args.no_progress,
    )
    return 0


# subcommand -> handler; argparse accepts only the subcommands build_parser registers
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``laplace-kron`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nlaplace-kron: error: missing command (try: laplace-kron demo)", file=sys.stderr)
        return 2
    return _COMMANDS[args.command](args)
