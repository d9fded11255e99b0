"""The `vargpt` command: `build_parser` gathers each module's sub-commands, `main` runs one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .data import register_data_commands
from .demo import register_demo_command
from .evaluate import register_bench_command, register_eval_group
from .inference import register_commands
from .inspect import register_inspect_command
from .training import register_training_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vargpt", description="VARGPT-v1.1-style unified models")
    sub = parser.add_subparsers(dest="command", required=True)
    register_demo_command(sub)
    register_training_commands(sub)
    register_eval_group(sub)
    register_bench_command(sub)
    register_commands(sub)
    register_data_commands(sub)
    register_inspect_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        # a quiet command also hides transformers' own bars (loading and writing weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vargpt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
