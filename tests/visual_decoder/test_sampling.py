"""Bit sampling: temperature, classifier-free guidance, top-k/top-p filtering, seeded multinomial."""

from __future__ import annotations

import pytest
import torch

from vargpt.visual_decoder import apply_temperature, cfg_mix, filter_top_k_top_p, sample_bits


def _logits_for_p1(p1: torch.Tensor) -> torch.Tensor:
    """[..., 2] logits whose softmax puts probability p1 on bit value 1."""
    return torch.stack((torch.zeros_like(p1), torch.log(p1 / (1 - p1))), dim=-1)


def test_top_p_removes_values_at_or_below_one_minus_top_p() -> None:
    p1 = torch.tensor([0.02, 0.98, 0.5, 0.04, 0.029])
    filtered = filter_top_k_top_p(_logits_for_p1(p1), top_p=0.97)
    removed = torch.isinf(filtered)
    assert removed.tolist() == [[False, True], [True, False], [False, False], [False, False], [False, True]]
    # with a removed value, sampling is deterministic whatever the seed
    logits = _logits_for_p1(torch.tensor([0.01, 0.99])).view(1, 1, 2, 2).expand(4, 50, 2, 2)
    for seed in range(3):
        bits = sample_bits(logits, tau=1.0, top_p=0.97, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(bits[..., 0], torch.zeros(4, 50, dtype=torch.long))
        assert torch.equal(bits[..., 1], torch.ones(4, 50, dtype=torch.long))
    without = sample_bits(logits, tau=1.0, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert without[..., 0].sum() > 0  # p = 0.01 over 200 draws: some ones survive without top-p


def test_top_k_is_a_no_op_on_two_classes_unless_one() -> None:
    logits = torch.randn(10, 2)
    assert torch.equal(filter_top_k_top_p(logits, top_k=900), logits)
    greedy = filter_top_k_top_p(logits, top_k=1)
    assert torch.equal(torch.isinf(greedy).sum(-1), torch.ones(10, dtype=torch.long))


def test_sampling_is_reproducible_with_a_seeded_generator() -> None:
    logits = torch.randn(2, 30, 8, 2)
    first = sample_bits(logits, tau=0.5, top_p=0.97, generator=torch.Generator().manual_seed(42))
    second = sample_bits(logits, tau=0.5, top_p=0.97, generator=torch.Generator().manual_seed(42))
    other = sample_bits(logits, tau=0.5, top_p=0.97, generator=torch.Generator().manual_seed(43))
    assert first.shape == (2, 30, 8) and first.dtype == torch.long
    assert set(first.unique().tolist()) <= {0, 1}
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_sampling_follows_the_probabilities() -> None:
    p1 = torch.tensor([0.2, 0.7])
    logits = _logits_for_p1(p1).view(1, 1, 2, 2).expand(1, 20000, 2, 2)
    bits = sample_bits(logits, tau=1.0, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bits.float().mean(dim=(0, 1)), p1, atol=0.02)
    # tau 0.5 squares the odds: p = 0.2 -> 1/17
    cooled = sample_bits(logits, tau=0.5, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert cooled[..., 0].float().mean().item() == pytest.approx(1 / 17, abs=0.01)


def test_cfg_mix_and_temperature() -> None:
    cond, uncond = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    assert torch.allclose(cfg_mix(cond, uncond, 3.0), 3 * cond - 2 * uncond)
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    mixed_after = cfg_mix(apply_temperature(cond, 0.5), apply_temperature(uncond, 0.5), 3.0)
    assert torch.allclose(apply_temperature(cfg_mix(cond, uncond, 3.0), 0.5), mixed_after, atol=1e-5)
    assert torch.equal(apply_temperature(cond, 0.5), cond * 2.0)
    assert torch.equal(apply_temperature(cond, 0.7), cond / 0.7)  # what the scale loop has always computed
    with pytest.raises(ValueError, match="differ in shape"):
        cfg_mix(cond, uncond[:1], 3.0)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(cond, 0.0)
