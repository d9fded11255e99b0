"""Shared builders for the visual decoder tests: a tiny decoder with random (not near-zero) weights."""

from __future__ import annotations

import torch

from vargpt.visual_decoder import InfinityDecoder, VisualDecoderConfig

SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]


def tiny_config(**overrides: object) -> VisualDecoderConfig:
    """The values of the project's "tiny" preset."""
    values: dict[str, object] = {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.0,
        "bits": 8,
        "context_dim": 32,
        "num_block_chunks": 1,
        "cfg_uncond_length": 64,
        "rope_max_grid": 8,
    }
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
