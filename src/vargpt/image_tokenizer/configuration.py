"""Typed settings of the BSQ multi-scale image tokenizer (the original's `vae_local`)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ImageTokenizerConfig(PreTrainedConfig):
    """The CNN autoencoder and binary spherical quantiser.

    Defaults reproduce the published VARGPT-v1.1 tokenizer (Infinity `vae_type=32`), which the
    original code hard-codes instead of storing in `config.json`.
    """

    model_type = "vargpt_image_tokenizer"
    base_config_key = "image_tokenizer_config"

    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: list[int] | tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    bits: int = 32

    @property
    def downsample_factor(self) -> int:
        """Spatial stride of the latent grid: one halving per level but the last."""
        return 2 ** (len(self.channel_multipliers) - 1)
