"""The Infinity-2B visual decoder of VARGPT-v1.1: next-scale prediction of binary-quantised latents."""

from ..schedule import block_causal_mask, scale_token_ids
from .cache import DecoderKVCache
from .configuration import VisualDecoderConfig
from .decoder import InfinityDecoder
from .layers import DropPath
from .loss import bit_cross_entropy, bit_log_likelihood, scale_token_weights
from .rope import reference_grid, schedule_positions
from .sampling import apply_temperature, cfg_mix, filter_top_k_top_p, sample_bits

__all__ = [
    "DecoderKVCache",
    "DropPath",
    "InfinityDecoder",
    "VisualDecoderConfig",
    "apply_temperature",
    "bit_cross_entropy",
    "bit_log_likelihood",
    "block_causal_mask",
    "cfg_mix",
    "filter_top_k_top_p",
    "reference_grid",
    "sample_bits",
    "scale_token_ids",
    "scale_token_weights",
    "schedule_positions",
]
