"""Stopping a generation from outside: a caller that may lose interest (a server whose client timed out) wraps the
call in `stop_when(check)`; the loops ask `check()` once per text token, once per scale step and once per decoded
image, and raise `GenerationCancelled` when it says so, so abandoned work ends within one step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator


class GenerationCancelled(RuntimeError):
    """Raised inside the decoding loop when the `stop_when` check of the calling context says stop."""


# A context variable rather than a parameter: the check reaches the loop through `VARGPTPipeline` and
# `model.generate` without every layer in between forwarding one more argument, and it stays with the thread (or
# task) that set it, so other threads' generations are unaffected.
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("stop_check", default=None)


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within this block, generation raises `GenerationCancelled` at the first token or scale step for which
    `check()` is true. `check` is called often: keep it a flag read."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def raise_if_stopped() -> None:
    """The loops' one question to their caller: go on or not."""
    check = _stop_check.get()
    if check is not None and check():
        raise GenerationCancelled("generation stopped: its caller cancelled it")
