"""The `vargpt` command: one module per group of subcommands, shared flags in `options`, `main` builds the parser.

Modules: `inference` (chat, generate, edit, serve), `evaluate` (eval ..., bench), `training` (train, finetune,
dpo-pairs), `data`, `demo`, `inspect`; `options` holds the argument groups they share (model loading, device,
image settings), each flag spelled one way.
"""

from .main import main

__all__ = ["main"]
