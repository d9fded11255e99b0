"""The scale loop's own contract: what the block leaves in the LLM's history, the latent it sums, the bits it is
given, and the sampler logits it hands to the draw."""

from __future__ import annotations

import pytest
import torch

from tests.test_modeling import make_tiny_model, prompt_ids
from vargpt.generation import (
    DecodingState,
    ImageGenerationConfig,
    NoGuidance,
    OriginalUncond,
    forced_draw,
    forced_scale_loop,
    scale_loop,
)
from vargpt.image_tokenizer import bits_to_latent
from vargpt.visual_decoder import apply_temperature, cfg_mix

RESOLUTION = 16  # tiny: scales 1x1, 2x2, 4x4 = 21 tokens in 24 pad slots, so the filler path runs too


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=7)


def random_bits(model, batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d = model.config.visual_decoder_config.bits
    grids = model.generation_schedule(RESOLUTION)
    return [torch.randint(0, 2, (batch, h * w, d), generator=generator) for h, w in grids]


def started_state(model, batch: int) -> DecodingState:
    """Two prompts (the second left padded) whose last cached token is `<|image_gen_start|>`."""
    ids = prompt_ids().expand(batch, -1).clone()
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0
    state = DecodingState(model, ids, mask, None, None)
    start = torch.full((batch,), model.config.image_gen_start_token_id)
    state.step(state.embed_tokens(start), torch.ones(batch, dtype=torch.bool))
    return state


@pytest.mark.parametrize("continue_text", [True, False])
def test_the_block_joins_the_history_of_the_rows_that_drew_and_only_theirs(model, continue_text):
    state = started_state(model, 2)
    length, next_pos = state.length, state.next_pos_B.clone()
    drew = torch.tensor([True, False])
    settings = ImageGenerationConfig(cfg_scale=1.0, resolution=RESOLUTION)
    with torch.no_grad():
        result = scale_loop(
            model,
            state,
            drew,
            settings,
            NoGuidance(),
            forced_draw(random_bits(model, 2, 0)),
            continue_text=continue_text,
            decode=False,
        )
    num_tokens = sum(bits.shape[1] for bits in result.bits)
    block = result.num_pads if continue_text else num_tokens
    assert (num_tokens, result.num_pads) == (21, 24) and result.images is None
    assert state.length == length + block == state.cache_len == state.hidden_BTH.shape[1]
    assert state.mask_BT[0, length:].eq(1).all() and state.mask_BT[1, length:].eq(0).all()
    assert state.next_pos_B.tolist() == [next_pos[0].item() + block, next_pos[1].item()]


def test_the_latent_is_the_sum_of_the_given_bits_codes(model):
    bits = random_bits(model, 2, seed=1)
    ids = prompt_ids().expand(2, -1)
    settings = ImageGenerationConfig(cfg_scale=3.0, tau=0.7, resolution=RESOLUTION)
    result = forced_scale_loop(model, ids, None, None, None, bits, settings)
    assert all(torch.equal(given, seen) for given, seen in zip(bits, result.bits, strict=True))
    assert torch.equal(result.latent, bits_to_latent(bits, model.generation_schedule(RESOLUTION)))


@pytest.mark.parametrize(("cfg_scale", "tau"), [(1.0, 0.7), (2.5, 0.7), (3.0, 0.5)])
def test_the_sampler_sees_the_shared_temperature_and_cfg_functions_bit_for_bit(model, cfg_scale, tau):
    settings = ImageGenerationConfig(cfg_scale=cfg_scale, tau=tau, resolution=RESOLUTION)
    result = forced_scale_loop(model, prompt_ids(), None, None, None, random_bits(model, 1, seed=2), settings)
    assert (result.uncond_logits is None) == (cfg_scale == 1.0)
    for k, cond in enumerate(result.cond_logits):
        expected = apply_temperature(cond, tau)
        if result.uncond_logits is not None:
            expected = cfg_mix(expected, apply_temperature(result.uncond_logits[k], tau), cfg_scale)
        assert torch.equal(result.sampler_logits[k], expected), k


def test_original_guidance_doubles_the_cache_rows_only_while_the_scales_run(model):
    state = started_state(model, 2)
    rows_seen = []

    def draw(k, logits):
        rows_seen.append(state.cache.layers[0].keys.shape[0])
        return logits.argmax(-1)

    settings = ImageGenerationConfig(cfg_scale=3.0, resolution=RESOLUTION)
    with torch.no_grad():
        scale_loop(model, state, torch.ones(2, dtype=torch.bool), settings, OriginalUncond(), draw, decode=False)
    assert rows_seen == [4, 4, 4] and state.cache.layers[0].keys.shape[0] == 2


def test_given_bits_of_the_wrong_shape_or_count_are_named(model):
    bits = random_bits(model, 1, seed=3)
    settings = ImageGenerationConfig(cfg_scale=1.0, resolution=RESOLUTION)
    with pytest.raises(ValueError, match="the bits of scale 1 must be shaped"):
        forced_scale_loop(model, prompt_ids(), None, None, None, [bits[0], bits[1][:, :3], bits[2]], settings)
    with pytest.raises(ValueError, match="bits were given for 2 scales"):
        forced_scale_loop(model, prompt_ids(), None, None, None, bits[:2], settings)
