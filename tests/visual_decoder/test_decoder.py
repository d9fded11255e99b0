"""Forward passes: the block-causal training path equals scale-by-scale KV-cached inference."""

from __future__ import annotations

import pytest
import torch

from vargpt.schedule import Schedule
from vargpt.visual_decoder import DecoderKVCache, InfinityDecoder, block_causal_mask

from .helpers import SCHEDULE, randomised_decoder

C = 32
L = sum(h * w for h, w in SCHEDULE)


def _inputs(batch: int, context_len: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, L, C, generator=generator)
    cond = torch.randn(batch, C, generator=generator)
    context = torch.randn(batch, context_len, C, generator=generator)
    return h, cond, context


def _scale_by_scale(
    decoder: InfinityDecoder, h, cond, context, mask, cache: DecoderKVCache, schedule=SCHEDULE
) -> torch.Tensor:
    logits, start = [], 0
    for index, (gh, gw) in enumerate(schedule):
        piece = h[:, start : start + gh * gw]
        logits.append(decoder.forward_scale(piece, cond, context, mask, schedule, index, cache))
        start += gh * gw
    return torch.cat(logits, dim=1)


@torch.no_grad()
def test_cached_inference_equals_block_causal_forward() -> None:
    decoder = randomised_decoder()
    h, cond, context = _inputs(batch=1, context_len=5)
    full = decoder(h, cond, context, None, SCHEDULE)
    assert full.shape == (1, L, 8, 2)
    cache = DecoderKVCache()
    cached = _scale_by_scale(decoder, h, cond, context, None, cache)
    assert (cached - full).abs().max() < 1e-4
    assert cache.num_scales == len(SCHEDULE) and cache.seq_len == L
    assert full.abs().max() > 1.0  # the random weights make the logits far from trivial


@torch.no_grad()
def test_cached_inference_equals_forward_with_context_mask_and_batch() -> None:
    decoder = randomised_decoder(seed=3)
    h, cond, context = _inputs(batch=3, context_len=6, seed=4)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])
    full = decoder(h, cond, context, mask, SCHEDULE)
    cached = _scale_by_scale(decoder, h, cond, context, mask, DecoderKVCache())
    assert (cached - full).abs().max() < 1e-4
    # masked context tokens are ignored: changing them leaves the outputs unchanged ...
    altered = context.clone()
    altered[1, 3:] += 5.0
    assert (decoder(h, cond, altered, mask, SCHEDULE) - full).abs().max() < 1e-5
    # ... while real ones matter
    altered[1, 0] += 5.0
    assert (decoder(h, cond, altered, mask, SCHEDULE)[1] - full[1]).abs().max() > 1e-3


@torch.no_grad()
def test_a_scale_does_not_see_later_scales() -> None:
    decoder = randomised_decoder(seed=5)
    h, cond, context = _inputs(batch=2, context_len=4, seed=6)
    full = decoder(h, cond, context, None, SCHEDULE)
    changed = h.clone()
    changed[:, 5 + 16 :] += torch.randn_like(changed[:, 5 + 16 :])  # scales 3 and 4
    other = decoder(changed, cond, context, None, SCHEDULE)
    assert torch.allclose(other[:, : 5 + 16], full[:, : 5 + 16], atol=1e-6)
    assert (other[:, 5 + 16 :] - full[:, 5 + 16 :]).abs().max() > 1e-3
    changed = h.clone()
    # one token of scale 2 changes every token of scale 2 (no mask inside a scale)
    changed[:, 6] += torch.randn_like(changed[:, 6])
    other = decoder(changed, cond, context, None, SCHEDULE)
    assert ((other[:, 5 : 5 + 16] - full[:, 5 : 5 + 16]).abs().amax(dim=(2, 3)) > 1e-5).all()


@torch.no_grad()
def test_cfg_batch_rows_are_independent() -> None:
    decoder = randomised_decoder(seed=7)
    h, cond, context = _inputs(batch=2, context_len=4, seed=8)
    both = _scale_by_scale(decoder, h, cond, context, None, DecoderKVCache())
    alone = _scale_by_scale(decoder, h[:1], cond[:1], context[:1], None, DecoderKVCache())
    assert (both[:1] - alone).abs().max() < 1e-5


def test_block_causal_mask() -> None:
    mask = block_causal_mask([(1, 1), (2, 2), (1, 2)], "cpu")
    scale = torch.tensor([0, 1, 1, 1, 1, 2, 2])
    assert mask.dtype == torch.bool and mask.shape == (7, 7)
    assert torch.equal(mask, scale[:, None] >= scale[None, :])
    assert mask[1, 4] and mask[4, 1] and not mask[0, 1] and mask[6, 0]
    assert torch.equal(InfinityDecoder.block_causal_mask([(1, 1), (2, 2), (1, 2)], "cpu"), mask)


@torch.no_grad()
def test_condition_is_attentive_pooling_of_the_normalised_embedding() -> None:
    decoder = randomised_decoder(seed=9)
    embedding = torch.randn(2, 1, C)
    cond = decoder.condition(embedding)
    # with one context token, attention weights are 1: the output is proj(value)
    normed = embedding * torch.rsqrt(embedding.pow(2).mean(-1, keepdim=True) + 1e-6) * decoder.text_norm.weight
    pool = decoder.text_proj_for_sos.ca
    value = normed @ pool.mat_kv.weight[C:].T + pool.v_bias
    assert torch.allclose(cond, pool.proj(value).squeeze(1), atol=1e-5)
    assert torch.allclose(decoder.start_tokens(cond), cond[:, None] + decoder.pos_start)
    dropped = decoder.condition(embedding, drop_B=torch.tensor([True, False]))
    assert torch.allclose(dropped[1], cond[1])
    assert torch.allclose(dropped[0], decoder.condition(decoder.uncond_tokens(1, 1))[0])


@torch.no_grad()
def test_adaln_chunk_order_gamma_first() -> None:
    """With gamma1 = gamma2 = 0 a block reduces to x + CA(ca_norm(x))."""
    decoder = randomised_decoder(seed=10)
    block = decoder.blocks[0]
    cond = torch.randn(1, C)
    shared = decoder.shared_ada_lin(cond).view(1, 1, 6, C)
    block.ada_gss[:, :, :2] = -shared[:, :, :2]
    x = torch.randn(1, 5, C)
    context = torch.randn(1, 3, C)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    kv = block.ca.project_context(context)
    out, _, _ = block(x, shared, cos, sin, kv, None)
    assert torch.allclose(out, x + block.ca(block.ca_norm(x), kv)[0], atol=1e-5)
    from_raw_context, _, projected = block(x, shared, cos, sin, context, None)
    assert torch.equal(from_raw_context, out)
    assert all(torch.equal(a, b) for a, b in zip(projected, kv, strict=True))


@torch.no_grad()
def test_cosine_attention_scale_is_clamped_at_100() -> None:
    decoder = randomised_decoder(seed=11)
    h, cond, context = _inputs(batch=1, context_len=3)
    for block in decoder.blocks:
        block.sa.scale_mul_1H11.fill_(torch.log(torch.tensor(100.0)).item())
    at_limit = decoder(h, cond, context, None, SCHEDULE)
    for block in decoder.blocks:
        block.sa.scale_mul_1H11.fill_(50.0)
    assert torch.allclose(decoder(h, cond, context, None, SCHEDULE), at_limit, atol=1e-5)


def test_drop_path_only_in_training() -> None:
    decoder = randomised_decoder(seed=12, drop_path_rate=0.5)
    h, cond, context = _inputs(batch=4, context_len=3)
    with torch.no_grad():
        first = decoder(h, cond, context, None, SCHEDULE)
        assert torch.equal(first, decoder(h, cond, context, None, SCHEDULE))
        decoder.train()
        torch.manual_seed(0)
        trained = decoder(h, cond, context, None, SCHEDULE)
    assert not torch.allclose(trained, first)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    decoder = randomised_decoder(seed=13).train()
    h, cond, context = _inputs(batch=1, context_len=3)
    decoder(h, cond, context, None, SCHEDULE).square().mean().backward()
    plain = decoder.blocks[0].sa.mat_qkv.weight.grad.clone()
    decoder.zero_grad()
    decoder.gradient_checkpointing = True
    decoder(h, cond, context, None, SCHEDULE).square().mean().backward()
    assert torch.allclose(decoder.blocks[0].sa.mat_qkv.weight.grad, plain, atol=1e-6)


@torch.no_grad()
def test_bad_inputs_raise_value_errors() -> None:
    decoder = randomised_decoder()
    h, cond, context = _inputs(batch=1, context_len=3)
    with pytest.raises(ValueError, match="decoder input"):
        decoder(h[:, :-1], cond, context, None, SCHEDULE)
    with pytest.raises(ValueError, match="context mask"):
        decoder(h, cond, context, torch.ones(1, 3), SCHEDULE)
    with pytest.raises(ValueError, match="at least one real context token"):
        decoder(h, cond, context, torch.zeros(1, 3, dtype=torch.bool), SCHEDULE)
    with pytest.raises(ValueError, match="at most 15"):
        decoder(h, cond, context, None, [(1, 1)] * 16)
    cache = DecoderKVCache()
    with pytest.raises(ValueError, match="next one is 0"):
        decoder.forward_scale(h[:, 1:5], cond, context, None, SCHEDULE, 1, cache)
    decoder.forward_scale(h[:, :1], cond, context, None, SCHEDULE, 0, cache)
    with pytest.raises(ValueError, match="batch of 1"):
        decoder.forward_scale(
            h[:, 1:5].expand(2, -1, -1), cond.expand(2, -1), context.expand(2, -1, -1), None, SCHEDULE, 1, cache
        )
    cache.reset()
    assert cache.num_scales == 0 and cache.self_kv(0) is None and cache.context_kv(0) is None
    with pytest.raises(ValueError, match="cfg_uncond has 64 rows"):
        decoder.uncond_tokens(1, 65)


@torch.no_grad()
def test_a_schedule_object_gives_the_logits_of_its_list_of_grids() -> None:
    decoder = randomised_decoder()
    schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=decoder.config.rope_max_grid)
    assert list(schedule) == SCHEDULE
    h, cond, context = _inputs(batch=2, context_len=3)
    assert torch.equal(decoder(h, cond, context, None, schedule), decoder(h, cond, context, None, SCHEDULE))
    by_object = _scale_by_scale(decoder, h, cond, context, None, DecoderKVCache(), schedule)
    assert torch.equal(by_object, _scale_by_scale(decoder, h, cond, context, None, DecoderKVCache()))
