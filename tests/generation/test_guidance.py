"""Classifier-free guidance as strategies: which one the settings pick, and what each unconditional branch is."""

from __future__ import annotations

import pytest
import torch

from tests.test_modeling import make_tiny_model, prompt_ids
from vargpt.generation import ImageGenerationConfig, NoGuidance, NullPrompt, OriginalUncond, guidance_for
from vargpt.generation.guidance import stack_padded
from vargpt.teacher_forcing import score_image_bits

RESOLUTION = 16
TOLERANCE = 1e-5  # one prefill of prompt + start versus a prefill then a step: float summation order (measured 1.5e-7)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=11)


def test_the_settings_pick_the_strategy():
    null_ids = torch.tensor([1, 2, 3])
    assert isinstance(guidance_for(ImageGenerationConfig(cfg_scale=1.0, uncond_mode="null_prompt")), NoGuidance)
    assert isinstance(guidance_for(ImageGenerationConfig(cfg_scale=3.0)), OriginalUncond)
    picked = guidance_for(ImageGenerationConfig(cfg_scale=1.5, uncond_mode="null_prompt"), null_ids)
    assert isinstance(picked, NullPrompt) and picked.null_prompt_ids is null_ids
    assert [g.guided for g in (NoGuidance(), OriginalUncond(), picked)] == [False, True, True]


def test_a_null_prompt_that_is_the_prompt_itself_guides_towards_nothing(model):
    """The null-prompt branch runs exactly like the conditional one: given the same conversation it computes the
    same logits, so any cfg leaves the sampler at cond / tau (up to (4 + 3) / 0.5 times their difference)."""
    ids = prompt_ids()
    bits = [
        torch.randint(
            0, 2, (1, h * w, model.config.visual_decoder_config.bits), generator=torch.Generator().manual_seed(k)
        )
        for k, (h, w) in enumerate(model.generation_schedule(RESOLUTION))
    ]
    scores = score_image_bits(
        model,
        ids,
        bits,
        cfg_scale=4.0,
        tau=0.5,
        resolution=RESOLUTION,
        uncond_mode="null_prompt",
        null_prompt_ids=ids[0],
    )
    for k, (cond, uncond) in enumerate(zip(scores.cond_logits, scores.uncond_logits, strict=True)):
        torch.testing.assert_close(uncond, cond, rtol=0, atol=TOLERANCE, msg=f"scale {k}")
        torch.testing.assert_close(scores.logits[k], cond / 0.5, rtol=0, atol=14 * TOLERANCE, msg=f"scale {k}")


def test_null_prompt_ids_are_needed_only_when_an_image_is_drawn(model):
    ids = prompt_ids()
    text = model.generate(ids, max_new_tokens=2, cfg_scale=3.0, uncond_mode="null_prompt")
    assert text.shape == (1, ids.shape[1] + 2)
    with pytest.raises(ValueError, match="null_prompt_ids"):
        model.generate(ids, generation_mode="image", max_new_tokens=1, resolution=RESOLUTION, uncond_mode="null_prompt")
    with pytest.raises(ValueError, match="null_prompt_ids"):
        model.generate(
            ids,
            generation_mode="image",
            max_new_tokens=1,
            resolution=RESOLUTION,
            uncond_mode="null_prompt",
            null_prompt_ids=torch.tensor([[1, 2]]),
        )


def test_contexts_of_the_two_branches_stack_right_padded():
    a, b = torch.ones(2, 3, 4), torch.full((2, 5, 4), 2.0)
    stacked = stack_padded(a, b)
    assert stacked.shape == (4, 5, 4) and stacked[:2, 3:].eq(0).all() and stacked[2:].eq(2).all()
    mask = stack_padded(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool))
    assert mask.sum(1).tolist() == [5, 5, 1, 1]
