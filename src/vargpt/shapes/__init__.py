"""The shapes world: a procedurally drawn world with an exact description of every picture.

Its scenes, language and rendering make training data (`dataset`, `splits`); its detector reads a generated
picture back, so generation, understanding and editing are scored exactly (`scoring`, `evaluate`). Nothing
outside this package and the recipes depends on it.
"""

from .detector import Detection, SceneReading, detect, read_scene
from .scoring import (
    edit_check,
    edit_correct,
    evaluate_generated_image,
    evaluate_geneval,
    geneval_summary,
    normalize_answer,
    vqa_accuracy,
)

__all__ = [
    "Detection",
    "SceneReading",
    "detect",
    "edit_check",
    "edit_correct",
    "evaluate_generated_image",
    "evaluate_geneval",
    "geneval_summary",
    "normalize_answer",
    "read_scene",
    "vqa_accuracy",
]
