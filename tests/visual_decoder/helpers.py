"""Shared builders for the visual decoder tests: a tiny decoder with random (not near-zero) weights."""

from __future__ import annotations

import torch

from vargpt import VARGPTConfig
from vargpt.visual_decoder import InfinityDecoder, VisualDecoderConfig

SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]


def tiny_config(**overrides: object) -> VisualDecoderConfig:
    """The project's "tiny" preset decoder, with overrides."""
    values = VARGPTConfig.from_preset("tiny").visual_decoder_config.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    values.update(overrides)
    return VisualDecoderConfig(**values)


def randomised_decoder(seed: int = 0, std: float = 0.3, **overrides: object) -> InfinityDecoder:
    """A tiny decoder whose every parameter is redrawn, so that the near-zero AdaLN gates of the real
    initialisation cannot hide a wrong self-attention path."""
    torch.manual_seed(seed)
    decoder = InfinityDecoder(tiny_config(**overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in decoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        for block in decoder.blocks:  # sharper attention than exp(~0): masking mistakes show more
            block.sa.scale_mul_1H11.add_(2.0)
    return decoder.eval()
