"""Typed settings of the Infinity-style visual decoder (the original's `vargpt_gen`)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class VisualDecoderConfig(PreTrainedConfig):
    """Next-scale bit predictor.

    Defaults reproduce Infinity-2B as wired into VARGPT-v1.1 (the original hard-codes `infinity_2b`).
    """

    model_type = "vargpt_visual_decoder"
    base_config_key = "visual_decoder_config"

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    bits: int = 32
    context_dim: int = 2048
    num_block_chunks: int = 8
    num_scale_levels: int = 15
    cfg_uncond_length: int = 512
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Grid of the 1024 px schedule's last scale: 2D RoPE positions are normalised to it.
    rope_max_grid: int = 64
    cond_drop_rate: float = 0.1
