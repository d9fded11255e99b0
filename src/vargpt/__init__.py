"""vargpt: VARGPT-v1.1-style unified models for image understanding, generation and editing.

Importing the package registers the model with transformers' Auto classes (model type
`vargpt_qwen2_vl`), so `AutoModel...from_pretrained(dir)` works without `trust_remote_code`.
"""

from .configuration import VARGPTConfig
from .generation.config import IMAGE_PRESETS, ImageGenerationConfig
from .modeling import VARGPTForConditionalGeneration
from .processing import VARGPTProcessor
from .registration import register_auto_classes
from .teacher_forcing import ScaleScores, encode_image_bits, score_image, score_image_bits

register_auto_classes()

from .pipeline import VARGPTPipeline  # noqa: E402  (needs the registration above)

__version__ = "0.1.0"

__all__ = [
    "IMAGE_PRESETS",
    "ImageGenerationConfig",
    "ScaleScores",
    "VARGPTConfig",
    "VARGPTForConditionalGeneration",
    "VARGPTPipeline",
    "VARGPTProcessor",
    "encode_image_bits",
    "score_image",
    "score_image_bits",
]
