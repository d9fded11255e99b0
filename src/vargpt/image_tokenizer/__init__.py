"""The BSQ multi-scale image tokenizer: CNN autoencoder, binary spherical quantiser, scale schedules."""

from .bsq import BinarySphericalQuantizer, bits_to_codes, quantize
from .configuration import ImageTokenizerConfig
from .multiscale import (
    MultiScaleBSQ,
    accumulate_scale,
    bits_to_latent,
    encode_to_bits,
    next_scale_input,
    sample_flip_probs,
    teacher_forcing,
)
from .schedules import (
    SUPPORTED_ASPECT_RATIOS,
    Grid,
    nearest_aspect_ratio,
    rope_reference_grid,
    scale_schedule,
    schedule_image_size,
    schedule_token_count,
)
from .vae import BSQVAE, Decoder, Encoder

__all__ = [
    "BSQVAE",
    "SUPPORTED_ASPECT_RATIOS",
    "BinarySphericalQuantizer",
    "Decoder",
    "Encoder",
    "Grid",
    "ImageTokenizerConfig",
    "MultiScaleBSQ",
    "accumulate_scale",
    "bits_to_codes",
    "bits_to_latent",
    "encode_to_bits",
    "nearest_aspect_ratio",
    "next_scale_input",
    "quantize",
    "rope_reference_grid",
    "sample_flip_probs",
    "scale_schedule",
    "schedule_image_size",
    "schedule_token_count",
    "teacher_forcing",
]
