"""Shared fixtures: the tiny tokenizer configuration of the "tiny" preset."""

import pytest

from vargpt.configuration import PRESETS
from vargpt.image_tokenizer import ImageTokenizerConfig


@pytest.fixture
def tiny_config() -> ImageTokenizerConfig:
    return ImageTokenizerConfig(**PRESETS["tiny"]["image_tokenizer_config"])
