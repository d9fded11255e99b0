"""Stopping a generation from outside (`stop_when`): a server's abandoned request ends within one step."""

from __future__ import annotations

import pytest

from vargpt.generation import GenerationCancelled, stop_when
from vargpt.pipeline import VARGPTPipeline


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained("tiny", seed=0)


class _StopAfter:
    """A check that turns true on its `calls`-th call and counts every call."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.seen = 0

    def __call__(self) -> bool:
        self.seen += 1
        return self.seen >= self.calls


def test_an_image_stops_at_the_next_scale_step(pipe):
    schedule = pipe.model.generation_schedule(32)
    check = _StopAfter(3)  # the forced start token, then scale 1, then stop before scale 2
    with pytest.raises(GenerationCancelled), stop_when(check):
        pipe.generate("a red circle", seed=0, resolution=32)
    assert check.seen == 3 < len(schedule)


def test_text_stops_at_the_next_token(pipe):
    check = _StopAfter(4)
    with pytest.raises(GenerationCancelled), stop_when(check):
        pipe.chat("hello", max_new_tokens=50)
    assert check.seen == 4


def test_a_check_that_never_fires_changes_nothing_and_is_gone_after_its_block(pipe):
    with stop_when(lambda: False):
        inside = pipe.generate("a red circle", seed=3)[0]
    check = _StopAfter(1)
    with stop_when(check):
        pass
    outside = pipe.generate("a red circle", seed=3)[0]
    assert inside.tobytes() == outside.tobytes() and check.seen == 0
