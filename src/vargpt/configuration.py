"""One typed configuration for the whole unified model.

`VARGPTConfig` extends transformers' `Qwen2VLConfig` (so the original flat `config.json` with
`model_type: vargpt_qwen2_vl` parses as is) with the three image-generation tokens, the visual decoder,
the image tokenizer and the training-loss settings. The original stores none of the decoder or tokenizer
settings and hard-codes them; our sub-configs default to exactly those values, so an original
`config.json` yields the original model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.utils import CONFIG_NAME

from .config_validation import (
    CONFIG_ERRORS,
    ConfigFileError,
    check_config_values,
    check_parameter_count,
    config_source,
    one_line,
    read_config_json,
)
from .image_tokenizer.configuration import ImageTokenizerConfig
from .rope_index import FORWARD_POSITIONS
from .visual_decoder.configuration import VisualDecoderConfig

IMAGE_GEN_START = "<|image_gen_start|>"
IMAGE_GEN_END = "<|image_gen_end|>"
IMAGE_GEN_PAD = "<|image_gen_pad|>"

# The original's `config.json` as `prepare_vargpt_v1_1` writes it (flat Qwen2-VL 4.4x layout).
_FULL_SIZE: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_window_layers": 28,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "mlp_ratio": 4,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

# The LLM part of it: what `VARGPTConfig` fills in for flat settings a config leaves out.
_PUBLISHED_LLM: dict[str, Any] = {
    k: v for k, v in _FULL_SIZE.items() if k not in ("vision_config", "tie_word_embeddings")
}


def _small_vision(embed_dim: int, hidden_size: int) -> dict[str, Any]:
    """A two-block ViT for the small presets (Qwen2-VL's patch, merge and temporal sizes)."""
    return {
        "depth": 2,
        "embed_dim": embed_dim,
        "hidden_size": hidden_size,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _small_decoder(
    depth: int, width: int, num_heads: int, mlp_ratio: float, bits: int, cfg_uncond_length: int, rope_max_grid: int
) -> dict[str, Any]:
    """A visual decoder for the small presets: one block chunk, no drop path, context as wide as the decoder."""
    return {
        "depth": depth,
        "embed_dim": width,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "drop_path_rate": 0.0,
        "bits": bits,
        "context_dim": width,
        "num_block_chunks": 1,
        "cfg_uncond_length": cfg_uncond_length,
        "rope_max_grid": rope_max_grid,
    }


def _small_image_tokenizer(base_channels: int, norm_groups: int, bits: int) -> dict[str, Any]:
    """A three-level image tokenizer (stride 4) with one residual block per level, for the small presets."""
    return {
        "base_channels": base_channels,
        "channel_multipliers": [1, 2, 2],
        "num_res_blocks": 1,
        "norm_groups": norm_groups,
        "bits": bits,
    }


# A model small enough for unit tests on two CPU cores. Its vocabulary keeps the real special-token
# ids' *order* but lives in a small id range (see `vargpt.tokenization` for the tiny tokenizer).
_TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_window_layers": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    # head_dim 16 -> 8 rotary frequency pairs split as t/h/w
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
    "bos_token_id": 500,
    "eos_token_id": 502,
    "pad_token_id": 500,
    "vision_start_token_id": 503,
    "vision_end_token_id": 504,
    "image_token_id": 505,
    "video_token_id": 506,
    "special_tokens": {
        "image_gen_start": IMAGE_GEN_START,
        "image_gen_start_token_id": 507,
        "image_gen_end": IMAGE_GEN_END,
        "image_gen_end_token_id": 508,
        "image_gen_pad": IMAGE_GEN_PAD,
        "image_gen_pad_token_id": 509,
    },
    "vision_config": _small_vision(embed_dim=32, hidden_size=64),
    "visual_decoder_config": _small_decoder(
        depth=2, width=32, num_heads=2, mlp_ratio=2.0, bits=8, cfg_uncond_length=64, rope_max_grid=8
    ),
    "image_tokenizer_config": _small_image_tokenizer(base_channels=8, norm_groups=4, bits=8),
    "image_resolution": 32,
    "image_gen_pad_multiple": 8,
}


def _tiny_ids_with_llm(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, positions: int, mrope: list[int]
) -> dict[str, Any]:
    """The tiny preset's vocabulary, token ids and LLM settings with another LLM size (every layer full attention);
    the caller gives the towers."""
    towers = ("vision_config", "visual_decoder_config", "image_tokenizer_config")
    return {
        **{key: value for key, value in _TINY.items() if key not in towers},
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_window_layers": layers,
        "max_position_embeddings": positions,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
    }


# The shapes-world model: the same architecture, small enough to train on two CPU cores (issue: recipe
# `shapes-tiny`). Same tiny byte tokenizer ids as "tiny".
_SHAPES_TINY: dict[str, Any] = {
    # head_dim 32 -> 16 rotary frequency pairs split as t/h/w
    **_tiny_ids_with_llm(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, positions=1024, mrope=[4, 6, 6]),
    "vision_config": _small_vision(embed_dim=64, hidden_size=128),
    "visual_decoder_config": _small_decoder(
        depth=4, width=128, num_heads=4, mlp_ratio=4.0, bits=8, cfg_uncond_length=256, rope_max_grid=8
    ),
    "image_tokenizer_config": _small_image_tokenizer(base_channels=32, norm_groups=8, bits=8),
    "image_resolution": 32,
    "image_gen_pad_multiple": 8,
}

# About 100M parameters, for benchmarks that measure matrix work rather than Python overhead.
_BENCH_100M: dict[str, Any] = {
    # head_dim 64 -> 32 rotary frequency pairs split as t/h/w
    **_tiny_ids_with_llm(
        hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, positions=4096, mrope=[8, 12, 12]
    ),
    "vision_config": _small_vision(embed_dim=128, hidden_size=768),
    "visual_decoder_config": _small_decoder(
        depth=4, width=512, num_heads=8, mlp_ratio=4.0, bits=16, cfg_uncond_length=256, rope_max_grid=16
    ),
    "image_tokenizer_config": _small_image_tokenizer(base_channels=64, norm_groups=16, bits=16),
    "image_resolution": 32,
    "image_gen_pad_multiple": 64,
}
# The keyword `get_config_dict` passes to `from_dict`: the config.json the settings were read from.
_SOURCE_KWARG = "_vargpt_config_source"

PRESETS: dict[str, dict[str, Any]] = {
    "vargpt-v1.1": _FULL_SIZE,
    "tiny": _TINY,
    "shapes-tiny": _SHAPES_TINY,
    "bench-100m": _BENCH_100M,
}


@strict
class VARGPTConfig(Qwen2VLConfig):
    """Configuration of `VARGPTForConditionalGeneration`.

    Beyond Qwen2-VL it carries:
      * the image-generation special tokens (read from the original's `special_tokens` dict);
      * `visual_decoder_config` and `image_tokenizer_config` (original hard-coded values by default);
      * `image_resolution`: the default generation resolution in pixels (512 for the published model);
      * loss settings: `image_loss_weight` (3.0 as in the report), `image_loss_scale_weighting`
        ("scale": Infinity's per-scale weights that really take effect; "uniform": the original's plain
        mean over all bits), bitwise self-correction strength and condition dropout;
      * `forward_positions`: the rotary positions `forward` (training, teacher-forced scoring, log-likelihoods)
        uses when given no `position_ids`. "mrope" (default) = Qwen2-VL's M-RoPE, what every `generate` prefill
        uses, so training and scoring see the positions inference sees. "sequential" = 1-D cache positions,
        what the original's `forward` used: the published checkpoint was trained with them (its `generate`
        uses M-RoPE), so "sequential" reproduces its training and its plain forward. Text-only rows get the
        same positions either way. A config.json without the field (the published one, or this project's
        older ones, trained with M-RoPE) gives "mrope".
    """

    model_type = "vargpt_qwen2_vl"
    sub_configs_defaults: ClassVar = {
        "vision_config": Qwen2VLVisionConfig,
        "text_config": Qwen2VLTextConfig,
        "visual_decoder_config": VisualDecoderConfig,
        "image_tokenizer_config": ImageTokenizerConfig,
    }

    visual_decoder_config: dict | VisualDecoderConfig | None = None
    image_tokenizer_config: dict | ImageTokenizerConfig | None = None
    special_tokens: dict | None = None
    image_gen_start_token_id: int = 151657
    image_gen_end_token_id: int = 151658
    image_gen_pad_token_id: int = 151659
    image_resolution: int = 512
    image_gen_pad_multiple: int = 128
    image_loss_weight: float = 3.0
    image_loss_scale_weighting: str = "scale"
    bit_flip_max_prob: float = 0.3
    bit_flip_prob_step: float = 0.01
    forward_positions: str = "mrope"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            # Flat LLM settings left out take the published model's values, not Qwen2-VL's class defaults (the
            # 72B LLM, 8192 wide, which no vision_config default matches): `VARGPTConfig()` is VARGPT-v1.1.
            rope_given = "rope_scaling" in kwargs or "rope_parameters" in kwargs  # v4 and v5 names of one setting
            for key, value in _PUBLISHED_LLM.items():
                if not (key == "rope_scaling" and rope_given):
                    kwargs.setdefault(key, copy.deepcopy(value))
        super().__post_init__(**kwargs)
        tokens = self.special_tokens or {}
        for name in ("image_gen_start", "image_gen_end", "image_gen_pad"):
            key = f"{name}_token_id"
            if key in tokens:
                setattr(self, key, int(tokens[key]))
        self.special_tokens = {
            "image_gen_start": IMAGE_GEN_START,
            "image_gen_start_token_id": self.image_gen_start_token_id,
            "image_gen_end": IMAGE_GEN_END,
            "image_gen_end_token_id": self.image_gen_end_token_id,
            "image_gen_pad": IMAGE_GEN_PAD,
            "image_gen_pad_token_id": self.image_gen_pad_token_id,
        }
        self.validate_vargpt()

    def validate_vargpt(self) -> None:
        """Reject settings that cannot describe a working model, naming the field."""
        if self.image_loss_scale_weighting not in ("scale", "uniform"):
            raise ValueError(
                f"image_loss_scale_weighting must be 'scale' or 'uniform', got {self.image_loss_scale_weighting!r}"
            )
        if self.forward_positions not in FORWARD_POSITIONS:
            raise ValueError(f"forward_positions must be one of {FORWARD_POSITIONS}, got {self.forward_positions!r}")
        if self.image_tokenizer_config.bits != self.visual_decoder_config.bits:
            raise ValueError(
                "image_tokenizer_config.bits and visual_decoder_config.bits must match, got "
                f"{self.image_tokenizer_config.bits} and {self.visual_decoder_config.bits}"
            )
        vocab = self.text_config.vocab_size
        for key in ("image_gen_start_token_id", "image_gen_end_token_id", "image_gen_pad_token_id"):
            if not 0 <= getattr(self, key) < vocab:
                raise ValueError(f"{key}={getattr(self, key)} lies outside the vocabulary of size {vocab}")
        if self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size ({self.vision_config.hidden_size}) must equal the LLM hidden size "
                f"({self.text_config.hidden_size}): the ViT merger writes into the LLM's embedding space"
            )
        if self.image_resolution % self.image_tokenizer_config.downsample_factor:
            raise ValueError(
                f"image_resolution {self.image_resolution} is not a multiple of the tokenizer stride "
                f"{self.image_tokenizer_config.downsample_factor}"
            )
        check_parameter_count(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> VARGPTConfig:
        """transformers' loader, on the folder `vargpt.hub.resolve_checkpoint` finds (a local folder, a shipped
        model name or a Hub repo id). A folder without config.json fails in one line naming it: transformers
        would build the default configuration from nothing and fail later on an unrelated check."""
        from .hub import pop_hub_arguments, resolve_checkpoint  # hub reads this module's PRESETS

        if Path(str(pretrained_model_name_or_path)).is_file():  # a config.json given by its own path
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = resolve_checkpoint(
            pretrained_model_name_or_path,
            **pop_hub_arguments(kwargs),
            require=None if kwargs.get("subfolder") else CONFIG_NAME,
        )
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VARGPTConfig:
        """Build a named configuration: "vargpt-v1.1" (the published 7B+2B model), "tiny" (tests) or
        "shapes-tiny" (the model the shapes-world recipe trains)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = copy.deepcopy(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    # -- a bad config.json fails in one line naming the file and the field (see `config_validation`) ------------
    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """transformers' reader, but a syntax error or a non-object names the file and the position."""
        return cls._decode_special_floats(read_config_json(json_file))

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' `get_config_dict`, handing the config.json's path on to `from_dict` for its errors."""
        source = config_source(pretrained_model_name_or_path, kwargs.get("subfolder"))
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return config_dict, {**kwargs, _SOURCE_KWARG: source}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> VARGPTConfig:
        """transformers' `from_dict` after `check_config_values`; every error becomes one `ConfigFileError` line
        naming where the settings came from."""
        source = kwargs.pop(_SOURCE_KWARG, "the configuration")
        try:
            check_config_values(config_dict)
            return super().from_dict(config_dict, **kwargs)
        except CONFIG_ERRORS as error:
            raise ConfigFileError(f"{source}: {one_line(error)}") from error
