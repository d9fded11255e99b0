"""Bit-wise objectives of the decoder: weighted 2-class cross-entropy and summed log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..schedule import as_grids, scale_token_ids, token_count

WEIGHTINGS = ("scale", "uniform")
REDUCTIONS = ("mean", "none")


def scale_token_weights(
    schedule: Sequence[Sequence[int]], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Infinity's per-token loss weights, shape [L], summing to 1.

    A token of scale k weighs sqrt(A_last / A_k) before normalisation (A = h * w), so each coarse token
    counts more than a fine one (`reweight_loss_by_scale`).
    """
    grids = as_grids(schedule)
    last_area = float(grids[-1][0] * grids[-1][1])
    per_scale = torch.tensor([(last_area / (h * w)) ** 0.5 for h, w in grids], dtype=torch.float64)
    weights = per_scale[scale_token_ids(grids)]
    return (weights / weights.sum()).to(device=device, dtype=dtype)


def _check_bits(logits_BLd2: torch.Tensor, bits_BLd: torch.Tensor) -> None:
    if logits_BLd2.ndim != 4 or logits_BLd2.shape[-1] != 2:
        raise ValueError(f"bit logits must be shaped [B, L, d, 2], got {tuple(logits_BLd2.shape)}")
    if bits_BLd.shape != logits_BLd2.shape[:-1]:
        raise ValueError(f"bits {tuple(bits_BLd.shape)} do not match logits {tuple(logits_BLd2.shape)}")


def bit_cross_entropy(
    logits_BLd2: torch.Tensor,
    bits_BLd: torch.Tensor,
    schedule: Sequence[Sequence[int]],
    weighting: str = "scale",
    reduction: str = "mean",
) -> torch.Tensor:
    """2-class cross-entropy per bit, averaged over the d bits of a token, then weighted over tokens.

    weighting "scale": tokens weighted by `scale_token_weights` (Infinity's intent, which VARGPT's code
    loses because its loss is already a scalar mean when the weights are applied); "uniform": every token
    alike, i.e. the plain mean over all tokens and bits (the original's effective behaviour).
    reduction "mean": a scalar, the mean over the batch; "none": one loss per sample, shape [B].
    """
    _check_bits(logits_BLd2, bits_BLd)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    B, L, d, _ = logits_BLd2.shape
    grids = as_grids(schedule)
    if token_count(grids) != L:
        raise ValueError(f"the schedule has {token_count(grids)} tokens but the logits have {L}")
    per_bit = F.cross_entropy(logits_BLd2.float().reshape(-1, 2), bits_BLd.reshape(-1).long(), reduction="none")
    per_token_BL = per_bit.view(B, L, d).mean(-1)
    if weighting == "scale":
        per_sample_B = (per_token_BL * scale_token_weights(grids, per_token_BL.device)).sum(-1)
    else:
        per_sample_B = per_token_BL.mean(-1)
    return per_sample_B.mean() if reduction == "mean" else per_sample_B


def bit_log_likelihood(logits_BLd2: torch.Tensor, bits_BLd: torch.Tensor) -> torch.Tensor:
    """log p(bits) summed over every token and bit, one value per sample, shape [B] (fp32; for DPO)."""
    _check_bits(logits_BLd2, bits_BLd)
    log_probs = logits_BLd2.float().log_softmax(-1)
    chosen_BLd = log_probs.gather(-1, bits_BLd.long().unsqueeze(-1)).squeeze(-1)
    return chosen_BLd.flatten(1).sum(-1)
