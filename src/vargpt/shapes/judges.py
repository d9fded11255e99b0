"""The shapes world as a judge for the generic benchmarks: a GenEval `Detector` and a DPG-Bench `VQAModel`.

Both read pictures with the exact detector (`read_scene`), so a shapes model's GenEval and DPG-Bench scores
need no learned judge. `vargpt eval geneval-score --detector shapes` and `vargpt eval dpg-score --vqa shapes`
name them; the benchmark code in `vargpt.evaluation` knows them only by those names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from ..evaluation.geneval import ObjectDetection
from ..evaluation.geneval_rules import relative_position
from .detector import Detection, SceneReading, read_scene
from .scene import SUPPORTED_SHAPES, ShapesWorldConfig

_NUMBERS = {
    w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
}
_RELATIONS = ("left of", "right of", "above", "below")
_BACKGROUND_WORDS = {"white": "white", "grey": "grey", "gray": "grey", "striped": "stripes", "stripes": "stripes"}
Mention = tuple[str | None, str]  # (colour or None, shape) named in a question


class ShapesDetector:
    """The exact shapes-world detector (`read_scene`) as a GenEval `Detector`: classes are shape names.

    Images smaller than `min_size` (the detector reads 24 px and more) are enlarged with nearest-neighbour
    sampling first; relations and counts do not depend on the scale.
    """

    def __init__(self, world_config: ShapesWorldConfig | None = None, min_size: int = 48) -> None:
        self.world_config = world_config
        self.min_size = min_size

    def read(self, image: Image.Image) -> SceneReading:
        """The full reading (shapes-world detections and background) of an image."""
        if image.width != image.height:
            raise ValueError(f"the shapes detector reads square images, got {image.width}x{image.height}")
        if image.width < self.min_size:
            image = image.resize((self.min_size, self.min_size), Image.NEAREST)
        return read_scene(image.convert("RGB"), self.world_config)

    def __call__(self, image: Image.Image) -> list[ObjectDetection]:
        reading = self.read(image)
        scale = image.width / max(image.width, self.min_size)  # boxes back in the input's pixels
        return [
            ObjectDetection(d.shape, d.colour, tuple(float(v) * scale for v in d.bbox), d.score)
            for d in reading.detections
        ]


class ShapesVQA:
    """Answers simple shapes-world yes/no questions from the exact detector, for tests and shapes models.

    Understood: "Is there a (colour) shape?", "Are there N (colour) shapes?" (exact count), "Is the
    (colour) shape left of / right of / above / below the (colour) shape?" (GenEval's relation rule) and
    "Is the background white / grey / striped?". Anything else is answered "no".
    """

    def __init__(self, world_config: ShapesWorldConfig | None = None) -> None:
        self.detector = ShapesDetector(world_config)
        self.colours = set((world_config or ShapesWorldConfig()).colours)

    def _mentions(self, words: Sequence[str]) -> list[Mention]:
        mentions, colour = [], None
        for word in words:
            shape = word[:-1] if word.endswith("s") and word[:-1] in SUPPORTED_SHAPES else word
            if word in self.colours:
                colour = word
            elif shape in SUPPORTED_SHAPES:
                mentions.append((colour, shape))
                colour = None
        return mentions

    @staticmethod
    def _matching(detections: Sequence[Detection], mention: Mention) -> list[Detection]:
        colour, shape = mention
        return [d for d in detections if d.shape == shape and colour in (None, d.colour)]

    def __call__(self, image: Image.Image, question: str) -> str:
        text = " ".join(re.findall(r"[a-z0-9]+", question.lower()))
        words = text.split()
        reading = self.detector.read(image)
        if "background" in words:
            wanted = next((_BACKGROUND_WORDS[w] for w in words if w in _BACKGROUND_WORDS), None)
            return _yes_no(wanted is not None and reading.background == wanted)
        mentions = self._mentions(words)
        relation = next((r for r in _RELATIONS if f" {r} " in f" {text} "), None)
        if relation is not None and len(mentions) >= 2:
            size = max(self.detector.min_size, image.width)
            return _yes_no(self._related(reading.detections, mentions[0], relation, mentions[1], size))
        number = next(
            (_NUMBERS.get(w, int(w) if w.isdigit() else None) for w in words if w in _NUMBERS or w.isdigit()), None
        )
        if number is not None and len(mentions) == 1:
            return _yes_no(len(self._matching(reading.detections, mentions[0])) == number)
        return _yes_no(bool(mentions) and all(self._matching(reading.detections, m) for m in mentions))

    def _related(
        self, detections: Sequence[Detection], subject: Mention, relation: str, anchor: Mention, size: int
    ) -> bool:
        """Whether some object the subject names stands in `relation` to some other object the anchor names."""
        subjects = self._matching(detections, subject)
        anchors = self._matching(detections, anchor)
        return any(relation in relative_position(a, b, size) for a in subjects for b in anchors if a is not b)


def _yes_no(answer: bool) -> str:
    return "yes" if answer else "no"
