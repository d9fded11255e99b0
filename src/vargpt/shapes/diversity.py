"""Distinct samples: where a prompt leaves freedom (place, size, background), do its samples differ?

A model trained on one picture per prompt draws the same image for every seed; the share of distinct images
among a prompt's samples, with the accuracy of those samples, says whether it varies what the prompt leaves
open while still following it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from .detector import read_scene
from .scoring import evaluate_generated_image


def _scene_key(image: Image.Image) -> tuple:
    reading = read_scene(image)
    return (reading.background, tuple(sorted(d.key() for d in reading.detections)))


def distinct_samples(
    pipe,
    rows: Sequence[dict[str, Any]],
    *,
    samples_per_prompt: int,
    prompts: int,
    batch_size: int,
    seed: int,
    to_world: Callable[[Image.Image], Image.Image],
) -> dict[str, float]:
    """Sample the first `prompts` distinct prompts of the generation `rows` `samples_per_prompt` times each.

    `distinct_images`: mean share of byte-distinct images among a prompt's samples (1/n when all are equal);
    `distinct_scenes`: the same for the scenes the detector reads (a different layout, size or background);
    `distinct_correct_scenes`: distinct scenes among the samples that follow the prompt, over n;
    `accuracy`: the share of all samples that follow their prompt (GenEval rules).
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to compare samples, got {samples_per_prompt}")
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        text = row["messages"][0]["content"]
        if text not in chosen and len(chosen) < prompts:
            chosen[text] = row["meta"]["geneval"]
    texts = list(chosen)
    if not texts:
        raise ValueError("no generation rows to sample")
    per_batch = max(1, batch_size // samples_per_prompt)
    shares = {"distinct_images": 0.0, "distinct_scenes": 0.0, "distinct_correct_scenes": 0.0}
    n_correct = 0
    for start in range(0, len(texts), per_batch):
        batch = texts[start : start + per_batch]
        seeds = [seed + 1000 * (start + i) for i in range(len(batch))]
        images = [to_world(i) for i in pipe.generate(batch, num_images=samples_per_prompt, seed=seeds)]
        for i, text in enumerate(batch):
            drawn = images[i * samples_per_prompt : (i + 1) * samples_per_prompt]
            correct = [evaluate_generated_image(image, chosen[text])[0] for image in drawn]
            n_correct += sum(correct)
            shares["distinct_images"] += len({image.tobytes() for image in drawn}) / samples_per_prompt
            shares["distinct_scenes"] += len({_scene_key(image) for image in drawn}) / samples_per_prompt
            right = {_scene_key(image) for image, ok in zip(drawn, correct, strict=True) if ok}
            shares["distinct_correct_scenes"] += len(right) / samples_per_prompt
    n = len(texts)
    return {
        "samples_per_prompt": samples_per_prompt,
        "prompts": n,
        **{key: value / n for key, value in shares.items()},
        "accuracy": n_correct / (n * samples_per_prompt),
    }
