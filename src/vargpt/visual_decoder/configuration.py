"""Typed settings of the Infinity-style visual decoder (the original's `vargpt_gen`)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class VisualDecoderConfig(PreTrainedConfig):
    """Next-scale bit predictor.

    Defaults reproduce Infinity-2B as wired into VARGPT-v1.1 (the original hard-codes `infinity_2b`).
    The initialisation fields reproduce Infinity's training defaults (`tini`, `aln`/`alng`, `hd0`); they
    matter only for models trained from scratch, since the published decoder is loaded from its weights.
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
    # FFN width = embed_dim * mlp_ratio rounded to the nearest multiple of this (8192 for Infinity-2B);
    # widths below one multiple stay unrounded so that tiny test models keep their ratio.
    ffn_hidden_multiple: int = 256
    # Std of the truncated-normal init of every Linear and Embedding weight (Infinity's `tini`).
    init_std: float = 0.02
    # Multiplier of the AdaLN weights at init: `ada_gss` and the head's ada_lin (Infinity's `aln`, `alng`).
    ada_init_scale: float = 1e-3
    # Multiplier of the output head's weight at init (Infinity's `hd0`).
    head_init_scale: float = 0.02
    # Round the cross-attention's queries, keys, values and output to bf16 when the decoder computes in fp32,
    # as the published code does (its flash-attn kernel takes only 16-bit inputs). Off by default: an fp32
    # run is meant to be exact, and with bf16 weights (the usual GPU setting) both paths are the same. On,
    # a user gets the published code's fp32 numbers and sampled bits.
    cross_attention_bf16: bool = False
