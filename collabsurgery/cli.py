"""The ``collabsurgery`` command line: splits | wrap | export | train | demo | bench.

A user mistake prints one line, ``collabsurgery: error: ...``, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        return (3, int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer image size, got '{text}'")


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {} if args.num_classes is None else {"num_classes": args.num_classes}


def cmd_splits(args: argparse.Namespace) -> None:
    """Print the clean split points of a model, one per line."""
    from .graphs import splits

    print("\n".join(splits(args.model, input_size=args.input_size, **_model_kwargs(args))))


def cmd_wrap(args: argparse.Namespace) -> None:
    """Build a training graph, print what it costs, optionally save it."""
    from .graphfile import save_graph
    from .graphs import wrap
    from .summary import describe

    net = wrap(args.model, split=args.split, heads=args.heads, pattern=args.pattern,
               branches=args.branches, rescale=args.rescale, input_size=args.input_size,
               **_model_kwargs(args))
    print(describe(net))
    if args.save:
        print(f"saved training graph to {save_graph(net, args.save)}")


def cmd_export(args: argparse.Namespace) -> None:
    """Export one head of a training graph file or a training run as a plain backbone."""
    from .runs import export_from_source

    path, head = export_from_source(Path(args.source), args.head, Path(args.output))
    print(f"exported head {head} to {path}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from .graphs import PATTERNS, RESCALE_MODES

    parser = _Parser(prog="collabsurgery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help="timm name (resnet50) or torchvision.<name>")
        p.add_argument("--input-size", type=_input_size, default=None, metavar="N",
                       help="square input size for tracing and costs (default: the model's)")
        p.add_argument("--num-classes", type=int, default=None, metavar="N")
        return p

    p = model_command("splits", "list the clean split points of a model")
    p.set_defaults(func=cmd_splits)

    p = model_command("wrap", "build a training graph and print what it costs")
    p.add_argument("--split", default="", help="comma-separated split points, in order")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--pattern", choices=PATTERNS, default="tree")
    p.add_argument("--branches", type=_int_list, default=None, help="fan-out per split, e.g. 2,2")
    p.add_argument("--rescale", choices=RESCALE_MODES, default="backprop")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="also write the training graph (weights + arguments) to FILE")
    p.set_defaults(func=cmd_wrap)

    p = sub.add_parser("export", help="export one head as a plain backbone (safetensors)")
    p.add_argument("source", help="a training run directory or a training graph file")
    p.add_argument("--head", default="best", help="head index, or 'best' (best on hold-out)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``collabsurgery`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"collabsurgery: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
