"""Registration with transformers' Auto classes (idempotent)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration import VARGPTConfig
from .image_tokenizer.configuration import ImageTokenizerConfig
from .visual_decoder.configuration import VisualDecoderConfig


def register_auto_classes() -> None:
    from .modeling import VARGPTForConditionalGeneration
    from .processing import VARGPTProcessor

    for config_class in (VARGPTConfig, ImageTokenizerConfig, VisualDecoderConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto.register(VARGPTConfig, VARGPTForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VARGPTConfig, VARGPTProcessor, exist_ok=True)
