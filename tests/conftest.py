"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest

from vargpt import VARGPTPipeline


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A `tiny` preset saved in the original layout (fp32, one file): what loading options are tested on."""
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    VARGPTPipeline.from_pretrained("tiny", seed=5).save_pretrained(folder)
    return folder
