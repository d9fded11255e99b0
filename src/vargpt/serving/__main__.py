"""`python -m vargpt.serving [options]`: the same server as `vargpt serve`."""

from __future__ import annotations

import argparse
import sys

from .server import add_serve_arguments, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vargpt.serving", description="OpenAI-compatible vargpt server")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"vargpt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
