"""The shapes world: a procedurally drawn world with an exact description of every picture.

Its scenes, language and rendering make training data (`dataset`, `splits`); its detector reads a generated
picture back, so generation, understanding and editing are scored exactly (`scoring`, `evaluate`), and it
judges GenEval and DPG-Bench for shapes models (`judges`). Nothing outside this package and the recipes depends
on it: the benchmarks in `vargpt.evaluation` import it only when a command names the "shapes" judge.
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
