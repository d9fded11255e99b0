"""The analytic FLOP counter walks the image's `Schedule`: its scales, tokens and pad slots."""

from __future__ import annotations

import pytest

from vargpt import VARGPTConfig
from vargpt.bench.flops import _llm_linear_per_token, generation_flops
from vargpt.schedule import Schedule

TINY = VARGPTConfig.from_preset("tiny")


def test_a_schedule_and_its_grids_count_the_same() -> None:
    schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=8, pad_multiple=TINY.image_gen_pad_multiple)
    for null in (False, True):
        kwargs = {"uncond_mode": "null_prompt", "null_prompt_tokens": 5} if null else {}
        assert generation_flops(TINY, schedule, 12, continue_text=True, **kwargs) == generation_flops(
            TINY, list(schedule), 12, continue_text=True, **kwargs
        )


def test_continuing_text_costs_the_schedules_filler_pads_and_the_end_token() -> None:
    per_token = _llm_linear_per_token(TINY)
    lm_head = 2.0 * TINY.text_config.hidden_size * TINY.text_config.vocab_size
    for multiple in (1, 8, 64):
        schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=8, pad_multiple=multiple)
        plain = generation_flops(TINY, schedule, 12, include_attention=False)
        continued = generation_flops(TINY, schedule, 12, include_attention=False, continue_text=True)
        filler = schedule.num_pad_tokens - schedule.num_tokens
        assert continued["llm"] - plain["llm"] == pytest.approx((filler + 1) * per_token + lm_head, rel=1e-12)
        assert continued["decoder"] == plain["decoder"] and continued["vae"] == plain["vae"]


def test_more_scales_cost_more_and_bad_arguments_are_named() -> None:
    schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=8)
    assert generation_flops(TINY, schedule.prefix(4), 12)["total"] < generation_flops(TINY, schedule, 12)["total"]
    with pytest.raises(ValueError, match="prompt_tokens"):
        generation_flops(TINY, schedule, 0)
    with pytest.raises(ValueError, match="null_prompt_tokens"):
        generation_flops(TINY, schedule, 12, uncond_mode="null_prompt")
