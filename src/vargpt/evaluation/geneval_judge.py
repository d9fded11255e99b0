"""GenEval's own judge (Mask2Former instances + CLIP colours) behind the `Detector` protocol.

The official scorer (djghosh13/geneval, `evaluation/evaluate_images.py`) runs mmdet's Mask2Former Swin-S COCO
instance model and open_clip's ViT-L-14 (OpenAI weights). This module runs the same model families through
transformers, so a user needs no mmcv build:

* Objects: `Mask2FormerForUniversalSegmentation` + its image processor's `post_process_instance_segmentation`
  (class score x mean mask probability, as mmdet's instance head). Boxes come from the binary masks with
  mmdet's `mask2bbox` convention (x0, y0, x1 + 1, y1 + 1). Class indices are named with GenEval's
  `object_names.txt` when the model has COCO's 80 classes (the official script names mmdet's indices the same
  way), otherwise with the model's `id2label`.
* What the official `--options` defaults then do (confidence > 0.3, > 0.9 for counting, 16 per class, no NMS)
  is `geneval.DetectionFilter`; this detector drops only what that filter can never keep (score <= 0.3, or
  beyond the 16 most confident of a class), so the two compose without changing a result.
* Colours: every kept object's mask is pasted onto a #999 grey canvas and the canvas is cropped to its box
  (the official `ImageCrops` with its defaults), then CLIP zero-shot over GenEval's ten colours with its three
  prompts per colour, averaged as clip_benchmark's `zero_shot_classifier` does (normalised text embeddings,
  mean, normalised again; logits = 100 x cosine). The official colours only the objects an include clause
  reads; each crop is classified on its own, so colouring every kept object gives the same answers.

Deviations (transformers, not the official code):

* Weights: the Hub's `facebook/mask2former-swin-*-coco-instance` are converted from Mask2Former's own
  (Detectron2) release; the official judge loads mmdet's separately trained Swin-S checkpoint. Same
  architecture, task and classes, not the same weights, so scores come close to, not equal to, official ones.
  CLIP is the same OpenAI ViT-L/14 checkpoint (`openai/clip-vit-large-patch14`), with equivalent
  preprocessing (224 bicubic resize, centre crop, OpenAI mean / std) and text read at the end token.
* Resize: the processor's saved settings feed the model, not mmdet's test pipeline; `MMDET_TEST_SIZE` (pass
  it through `processor_kwargs`) is mmdet's keep-ratio 1333 x 800.
* Masks: `post_process_instance_segmentation` resamples the mask logits through a fixed 384 x 384 grid before
  the image size (mmdet resizes them straight to it), so masks and boxes can move by a pixel or two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from PIL import Image

from .geneval import OFFICIAL_FILTER, ObjectDetection

GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# `{colour}` and `{object}` are filled per class; the third prompt ignores the class, as the official one does.
GENEVAL_COLOUR_PROMPTS = (
    "a photo of a {colour} {object}",
    "a photo of a {colour}-colored {object}",
    "a photo of a {colour} object",
)
CROP_BACKGROUND = "#999"  # the official `bgcolor` default
CLIP_LOGIT_SCALE = 100.0  # clip_benchmark's fixed scale; argmax does not depend on it, probabilities do
DEFAULT_DETECTOR_MODEL = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
COCO_CLASS_COUNT = 80
# mmdet's Mask2Former test pipeline: keep-ratio resize into 1333 x 800 (also transformers' class default)
MMDET_TEST_SIZE = {"shortest_edge": 800, "longest_edge": 1333}


def geneval_object_names() -> list[str]:
    """GenEval's names of the 80 COCO classes, in COCO's index order (packaged `object_names.txt`)."""
    path = resources.files("vargpt.evaluation").joinpath("prompt_sets", "geneval", "object_names.txt")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- masks and crops


def mask_box(mask_HW: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a binary mask, x1 / y1 one past the last pixel (mmdet's `mask2bbox`); zeros when
    the mask is empty."""
    mask_HW = np.asarray(mask_HW, dtype=bool)
    if mask_HW.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), got shape {mask_HW.shape}")
    xs = np.flatnonzero(mask_HW.any(axis=0))
    ys = np.flatnonzero(mask_HW.any(axis=1))
    if len(xs) == 0 or len(ys) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def colour_crop(
    image: Image.Image,
    mask_HW: np.ndarray | None,
    box: Sequence[float],
    background: str = CROP_BACKGROUND,
) -> Image.Image:
    """The official colour crop: the object's pixels over a flat `background`, cut to its box. Without a mask
    the plain image is cropped."""
    image = image.convert("RGB")
    if mask_HW is not None:
        mask_HW = np.asarray(mask_HW, dtype=bool)
        if mask_HW.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask_HW.shape} does not match the image ({image.height}, {image.width})")
        canvas = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, canvas, Image.fromarray(mask_HW.astype(np.uint8) * 255, mode="L"))
    return image.crop(tuple(box[:4]))


# ---------------------------------------------------------------- colour classifier


class CLIPColourClassifier:
    """Zero-shot colour of object crops with a transformers `CLIPModel`, GenEval's colours and prompts."""

    def __init__(
        self,
        model,
        processor,
        colours: Sequence[str] = GENEVAL_COLOURS,
        prompts: Sequence[str] = GENEVAL_COLOUR_PROMPTS,
        batch_size: int = 16,
    ) -> None:
        if not colours or not prompts:
            raise ValueError("the colour classifier needs at least one colour and one prompt")
        self.model = model.eval()
        self.processor = processor
        self.colours = tuple(colours)
        self.prompts = tuple(prompts)
        self.batch_size = batch_size
        self._weights: dict[str, torch.Tensor] = {}  # per object name: (dim, n_colours), built once

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_weights(self, object_name: str) -> torch.Tensor:
        """(dim, n_colours): per colour, the normalised mean of its prompts' normalised text embeddings."""
        if object_name not in self._weights:
            columns = []
            for colour in self.colours:
                texts = [p.format(colour=colour, object=object_name) for p in self.prompts]
                tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                embed_PD = self.model.get_text_features(**tokens).pooler_output.float()
                embed_PD = embed_PD / embed_PD.norm(dim=-1, keepdim=True)
                mean_D = embed_PD.mean(dim=0)
                columns.append(mean_D / mean_D.norm())
            self._weights[object_name] = torch.stack(columns, dim=1)
        return self._weights[object_name]

    @torch.no_grad()
    def logits(self, crops: Sequence[Image.Image], object_name: str) -> torch.Tensor:
        """(n_crops, n_colours) scaled cosine similarities."""
        weights_DC = self.text_weights(object_name)
        rows = []
        for start in range(0, len(crops), self.batch_size):
            batch = [c.convert("RGB") for c in crops[start : start + self.batch_size]]
            pixels = self.processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
            embed_BD = self.model.get_image_features(pixel_values=pixels).pooler_output.float()
            embed_BD = embed_BD / embed_BD.norm(dim=-1, keepdim=True)
            rows.append(CLIP_LOGIT_SCALE * embed_BD @ weights_DC)
        if not rows:
            return torch.zeros(0, len(self.colours))
        return torch.cat(rows).cpu()

    def __call__(self, crops: Sequence[Image.Image], object_name: str) -> list[str]:
        """The colour name of each crop."""
        return [self.colours[i] for i in self.logits(crops, object_name).argmax(dim=1).tolist()]


# ---------------------------------------------------------------- detector


def _model_source(spec: str | os.PathLike) -> str:
    """A local folder, or a Hub id (`org/name`); a path that names no folder is an error, not a Hub lookup."""
    text = str(spec)
    if os.path.isdir(text):
        return text
    if not text or text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise FileNotFoundError(f"no model folder {text!r} (give a folder or a Hub id like org/name)")
    return text


@dataclass(frozen=True)
class InstanceMask:
    """One Mask2Former instance: class name, confidence, box (x0, y0, x1, y1) and its binary mask (H, W)."""

    label: str
    score: float
    bbox: tuple[float, float, float, float]
    mask_HW: np.ndarray


def select_instances(instances: Sequence[InstanceMask], min_score: float, max_per_class: int) -> list[InstanceMask]:
    """Most confident first, score above `min_score`, at most `max_per_class` per class: a superset of what
    `DetectionFilter` keeps at thresholds >= `min_score` and caps >= `max_per_class`, so colouring only these
    changes no result."""
    found: list[InstanceMask] = []
    per_class: dict[str, int] = {}
    for inst in sorted(instances, key=lambda i: -i.score):
        if inst.score <= min_score or per_class.get(inst.label, 0) >= max_per_class:
            continue
        per_class[inst.label] = per_class.get(inst.label, 0) + 1
        found.append(inst)
    return found


class Mask2FormerCLIPDetector:
    """GenEval's judge: Mask2Former COCO instances, coloured by CLIP on the official masked crops.

    `min_score` and `max_per_class` default to the official filter's loosest settings, so pairing this detector
    with `geneval.OFFICIAL_FILTER` reproduces the official selection; `class_names` overrides the index naming
    described in the module docstring.
    """

    def __init__(
        self,
        segmenter,
        image_processor,
        colour_classifier: CLIPColourClassifier,
        *,
        class_names: Sequence[str] | None = None,
        min_score: float = OFFICIAL_FILTER.threshold,
        max_per_class: int = OFFICIAL_FILTER.max_objects,
    ) -> None:
        self.segmenter = segmenter.eval()
        self.image_processor = image_processor
        self.colour_classifier = colour_classifier
        num_labels = len(segmenter.config.id2label)
        model_names = [segmenter.config.id2label[i] for i in range(num_labels)]
        if class_names is None:
            class_names = geneval_object_names() if num_labels == COCO_CLASS_COUNT else model_names
            misplaced = [(i, n) for i, n in enumerate(model_names) if n in class_names and class_names[i] != n]
            if misplaced:
                raise ValueError(
                    f"the segmenter's classes are not in COCO's order (e.g. index {misplaced[0][0]} is "
                    f"{misplaced[0][1]!r}); pass class_names"
                )
        if len(class_names) != num_labels:
            raise ValueError(f"{len(class_names)} class names for a segmenter with {num_labels} classes")
        if max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
        self.class_names = list(class_names)
        self.min_score = min_score
        self.max_per_class = max_per_class

    @classmethod
    def from_pretrained(
        cls,
        detector_model: str | os.PathLike = DEFAULT_DETECTOR_MODEL,
        clip_model: str | os.PathLike = DEFAULT_CLIP_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        processor_kwargs: dict | None = None,
        **kwargs,
    ) -> Mask2FormerCLIPDetector:
        """Both models from Hub ids or local folders (each with its processor files). `processor_kwargs`
        override the Mask2Former processor's saved settings, e.g. `{"size": MMDET_TEST_SIZE}` for mmdet's test
        scale; other keyword arguments go to the constructor."""
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        detector_model, clip_model = _model_source(detector_model), _model_source(clip_model)
        try:
            segmenter = Mask2FormerForUniversalSegmentation.from_pretrained(detector_model, dtype=dtype).to(device)
            image_processor = AutoImageProcessor.from_pretrained(detector_model, **(processor_kwargs or {}))
            clip = CLIPModel.from_pretrained(clip_model, dtype=dtype).to(device)
            clip_processor = CLIPProcessor.from_pretrained(clip_model)
        except OSError as err:  # missing Hub repo, no network, incomplete folder
            raise ValueError(f"could not load the GenEval judge ({detector_model}, {clip_model}): {err}") from err
        return cls(segmenter, image_processor, CLIPColourClassifier(clip, clip_processor), **kwargs)

    @torch.no_grad()
    def segment(self, image: Image.Image) -> list[InstanceMask]:
        """Instances scoring above `min_score`, most confident first, at most `max_per_class` per class."""
        image = image.convert("RGB")
        param = next(self.segmenter.parameters())
        inputs = self.image_processor(images=[image], return_tensors="pt")
        inputs = {
            k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()
        }
        outputs = self.segmenter(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
        result = self.image_processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, target_sizes=[(image.height, image.width)], return_binary_maps=True
        )[0]
        segments = result["segments_info"]
        masks_NHW = result["segmentation"].cpu().numpy() > 0.5 if segments else np.zeros((0, *image.size[::-1]))
        instances = [
            InstanceMask(self.class_names[info["label_id"]], float(info["score"]), mask_box(mask_HW), mask_HW)
            for info, mask_HW in zip(segments, masks_NHW, strict=True)
        ]
        return select_instances(instances, self.min_score, self.max_per_class)

    def __call__(self, image: Image.Image) -> list[ObjectDetection]:
        image = image.convert("RGB")
        instances = self.segment(image)
        colours: dict[int, str] = {}
        for label in dict.fromkeys(inst.label for inst in instances):
            members = [j for j, inst in enumerate(instances) if inst.label == label]
            crops = [colour_crop(image, instances[j].mask_HW, instances[j].bbox) for j in members]
            colours.update(zip(members, self.colour_classifier(crops, label), strict=True))
        return [ObjectDetection(inst.label, colours[j], inst.bbox, inst.score) for j, inst in enumerate(instances)]
