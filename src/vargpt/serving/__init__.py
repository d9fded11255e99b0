"""OpenAI-compatible HTTP serving of a `VARGPTPipeline` (needs the `serve` extra: fastapi, uvicorn, python-multipart).

`create_app(pipe, ServerConfig(...))` builds the FastAPI app; `vargpt serve` / `python -m vargpt.serving` run it.
Importing this package does not import FastAPI, so the rest of vargpt works without the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
