"""Bit cross-entropy with Infinity's per-scale weights, and the summed log-likelihood for DPO."""

from __future__ import annotations

import math

import pytest
import torch

from vargpt.visual_decoder import bit_cross_entropy, bit_log_likelihood, scale_token_weights

SCHEDULE = [(1, 1), (2, 2)]


def _logits_with_margins(margins_BL: torch.Tensor, bits: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits where every bit of a token has class-1 margin m: per-bit loss log(1 + exp(-m)) for bit 1."""
    B, L = margins_BL.shape
    logits = torch.zeros(B, L, bits, 2)
    logits[..., 1] = margins_BL[..., None]
    return logits, torch.ones(B, L, bits, dtype=torch.long)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_scale_weights_match_infinity_formula() -> None:
    weights = scale_token_weights(SCHEDULE)
    # raw weights sqrt(4 / 1) = 2 for the 1x1 token, sqrt(4 / 4) = 1 for each 2x2 token; sum 6
    assert torch.allclose(weights, torch.tensor([2, 1, 1, 1, 1]) / 6.0)
    weights = scale_token_weights([(1, 1), (2, 2), (4, 4)])
    assert weights.shape == (21,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert torch.isclose(weights[0] / weights[-1], torch.tensor(4.0))


def test_hand_computed_losses() -> None:
    margins = torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0]])
    logits, bits = _logits_with_margins(margins)
    coarse, fine = _softplus(-0.0), _softplus(-2.0)
    uniform = bit_cross_entropy(logits, bits, SCHEDULE, weighting="uniform")
    scaled = bit_cross_entropy(logits, bits, SCHEDULE, weighting="scale")
    assert uniform.item() == pytest.approx((coarse + 4 * fine) / 5, rel=1e-6)
    assert scaled.item() == pytest.approx(coarse / 3 + 4 * fine / 6, rel=1e-6)
    assert scaled.item() > uniform.item() + 0.05  # the weighting really changes the result


def test_weightings_agree_when_every_token_has_the_same_loss() -> None:
    logits, bits = _logits_with_margins(torch.full((2, 5), 1.5))
    uniform = bit_cross_entropy(logits, bits, SCHEDULE, weighting="uniform")
    assert torch.isclose(uniform, bit_cross_entropy(logits, bits, SCHEDULE, weighting="scale"))
    assert torch.isclose(uniform, torch.nn.functional.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1)))


def test_per_sample_reduction_and_bit_mean() -> None:
    margins = torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    logits, bits = _logits_with_margins(margins)
    bits[1, :, 0] = 0  # first bit of sample 1 wrong: loss softplus(1), other bits softplus(-1)
    per_sample = bit_cross_entropy(logits, bits, SCHEDULE, weighting="scale", reduction="none")
    assert per_sample.shape == (2,)
    assert per_sample[1].item() == pytest.approx((_softplus(1.0) + 2 * _softplus(-1.0)) / 3, rel=1e-6)
    mean = bit_cross_entropy(logits, bits, SCHEDULE, weighting="scale")
    assert torch.isclose(mean, per_sample.mean())


def test_log_likelihood_sums_over_bits() -> None:
    logits, bits = _logits_with_margins(torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0]]))
    expected = -(3 * _softplus(0.0) + 12 * _softplus(-2.0))
    assert bit_log_likelihood(logits, bits).item() == pytest.approx(expected, rel=1e-6)
    assert torch.isclose(-bit_log_likelihood(logits, bits) / 15, bit_cross_entropy(logits, bits, SCHEDULE, "uniform"))


def test_bad_arguments() -> None:
    logits, bits = _logits_with_margins(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="weighting"):
        bit_cross_entropy(logits, bits, SCHEDULE, weighting="area")
    with pytest.raises(ValueError, match="tokens"):
        bit_cross_entropy(logits, bits, [(1, 1)])
    with pytest.raises(ValueError, match="do not match"):
        bit_log_likelihood(logits, bits[..., :2])
