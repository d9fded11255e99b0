"""The BSQ multi-scale image tokenizer: CNN autoencoder, binary spherical quantiser, multi-scale residual bits."""

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
from .vae import BSQVAE, Decoder, Encoder

__all__ = [
    "BSQVAE",
    "BinarySphericalQuantizer",
    "Decoder",
    "Encoder",
    "ImageTokenizerConfig",
    "MultiScaleBSQ",
    "accumulate_scale",
    "bits_to_codes",
    "bits_to_latent",
    "encode_to_bits",
    "next_scale_input",
    "quantize",
    "sample_flip_probs",
    "teacher_forcing",
]
