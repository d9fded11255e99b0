"""The `vargpt` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_MODEL = "tiny"


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint

    print(inspect_checkpoint(args.model, full_size=args.preset))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    path = run_demo(args.model, args.out, seed=args.seed)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vargpt", description="VARGPT-v1.1-style unified models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="chat, generate and edit on a model; write an HTML report")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or preset (default: %(default)s)")
    p.add_argument("--out", default="vargpt-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", help="parameters per module, dtypes, layout problems, memory estimates")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory")
    p.add_argument("--preset", default=None, help="describe a preset's architecture instead (e.g. vargpt-v1.1)")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vargpt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
