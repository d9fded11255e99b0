"""Decoding: text by next-token prediction (`interleaved`), images by next-scale prediction (`scale_loop`, with
classifier-free guidance as strategies in `guidance`), teacher forcing on the same loop (`forced`), the LLM-side
state both loops drive (`state`), their settings (`config`) and the optional fast path (`static_cache`)."""

from .cancellation import GenerationCancelled, stop_when
from .config import DEFAULT_IMAGE_PRESET, IMAGE_PRESETS, ImageGenerationConfig
from .forced import forced_scale_loop
from .guidance import Guidance, NoGuidance, NullPrompt, OriginalUncond, guidance_for
from .interleaved import GENERATION_MODES, TextSamplingConfig, VARGPTGenerateOutput, generate_interleaved
from .scale_loop import ScaleLoopResult, forced_draw, sampling_draw, scale_loop
from .state import DecodingState
from .static_cache import FastDecoding

__all__ = [
    "DEFAULT_IMAGE_PRESET",
    "GENERATION_MODES",
    "IMAGE_PRESETS",
    "DecodingState",
    "FastDecoding",
    "GenerationCancelled",
    "Guidance",
    "ImageGenerationConfig",
    "NoGuidance",
    "NullPrompt",
    "OriginalUncond",
    "ScaleLoopResult",
    "TextSamplingConfig",
    "VARGPTGenerateOutput",
    "forced_draw",
    "forced_scale_loop",
    "generate_interleaved",
    "guidance_for",
    "sampling_draw",
    "scale_loop",
    "stop_when",
]
