"""The `vargpt` command: one module per group of subcommands, `main` builds the parser."""

from .main import main

__all__ = ["main"]
