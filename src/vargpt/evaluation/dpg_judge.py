"""DPG-Bench's judge through transformers: a VQA model behind `dpg.VQAModel`.

The official scorer (`dpg_bench/compute_dpg_bench.py`, TencentQQGYLab/ELLA) asks mPLUG-large
(`iic/mplug_visual-question-answering_coco_large_en`, a ModelScope pipeline) each question about each crop
and counts an answer only when it is exactly "yes". mPLUG is not in transformers, so this adapter runs the
closest maintained family, a generative VQA model from `AutoModelForVisualQuestionAnswering`: BLIP
(`BlipForQuestionAnswering`, e.g. `Salesforce/blip-vqa-capfilt-large`, also fine-tuned on VQA v2 and answering
in the same short lowercase vocabulary), BLIP-2, or the classifier ViLT. Numbers from it are *not*
comparable with published DPG-Bench scores until the same images have been scored by both judges.

Answers are normalised before the exact-"yes" test: lowercased, punctuation dropped, and reduced to "yes" /
"no" when that is the first word ("Yes.", "yes, it is"), since a generative model may add words the
classifier-like mPLUG head never does. Other answers are kept (normalised) and score 0, as in the official
script.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from PIL import Image

HF_PREFIX = "hf:"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def normalize_answer(text: str) -> str:
    """The answer as "yes" / "no" when that is its first word, else its lowercased words joined by spaces."""
    words = _WORD.findall(text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(words)


class TransformersVQA:
    """Answers a question about an image with a transformers VQA model (generative, or a label classifier).

    `question_template` turns the question into the model's text input: "{question}" for BLIP, whose encoder
    reads the bare question; "Question: {question} Answer:" suits BLIP-2.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        question_template: str = "{question}",
        max_new_tokens: int = 10,
    ) -> None:
        if "{question}" not in question_template:
            raise ValueError(f"question_template must contain '{{question}}', got {question_template!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model.eval()
        self.processor = processor
        self.question_template = question_template
        self.max_new_tokens = max_new_tokens
        self.generative = bool(getattr(model, "can_generate", lambda: False)())
        if not self.generative and not getattr(model.config, "id2label", None):
            raise ValueError(f"{type(model).__name__} neither generates nor has id2label answer labels")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        question_template: str | None = None,
        max_new_tokens: int = 10,
    ) -> TransformersVQA:
        """Load a Hub id or a local folder holding a VQA model and its processor (model.save_pretrained
        plus processor.save_pretrained)."""
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(name_or_path)
            model = AutoModelForVisualQuestionAnswering.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load a visual-question-answering model and processor from {str(name_or_path)!r} "
                f"(AutoModelForVisualQuestionAnswering: BLIP, BLIP-2 or ViLT): {err}"
            ) from err
        if device is not None:
            model = model.to(device)
        if question_template is None:
            is_blip2 = model.config.model_type == "blip-2"
            question_template = "Question: {question} Answer:" if is_blip2 else "{question}"
        return cls(model, processor, question_template=question_template, max_new_tokens=max_new_tokens)

    def _inputs(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        text = self.question_template.format(question=question)
        inputs = self.processor(images=image.convert("RGB"), text=text, return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    @torch.inference_mode()
    def raw_answer(self, image: Image.Image, question: str) -> str:
        """The model's own answer text, before normalisation (greedy decoding, as the official judge)."""
        inputs = self._inputs(image, question)
        if not self.generative:
            label_id = int(self.model(**inputs).logits[0].argmax())
            return str(self.model.config.id2label[label_id])
        output_ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)[0]
        prompt_ids = inputs["input_ids"][0]
        # decoder-only language models (BLIP-2 with OPT) may echo the prompt before the answer
        if output_ids.shape[0] > prompt_ids.shape[0] and torch.equal(
            output_ids[: prompt_ids.shape[0]].cpu(), prompt_ids.cpu()
        ):
            output_ids = output_ids[prompt_ids.shape[0] :]
        return self.processor.batch_decode(output_ids[None], skip_special_tokens=True)[0]

    def __call__(self, image: Image.Image, question: str) -> str:
        return normalize_answer(self.raw_answer(image, question))


def parse_vqa_spec(spec: str) -> tuple[str, str | None]:
    """("shapes", None) or ("hf", ID_OR_DIR) from a `--vqa` value; other names are an error."""
    if spec == "shapes":
        return "shapes", None
    if spec.startswith(HF_PREFIX):
        target = spec[len(HF_PREFIX) :].strip()
        if not target:
            raise ValueError("--vqa hf: needs a Hub id or a local folder after 'hf:', e.g. hf:Salesforce/blip-vqa-base")
        return "hf", target
    raise ValueError(f"unknown VQA model {spec!r}; use 'shapes' or 'hf:<Hub id or local folder>'")
