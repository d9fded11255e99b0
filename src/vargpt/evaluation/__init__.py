"""Evaluation: the exact shapes-world detector and its GenEval, VQA and editing scores."""

from .shapes_detector import Detection, SceneReading, detect, read_scene
from .shapes_scoring import (
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
