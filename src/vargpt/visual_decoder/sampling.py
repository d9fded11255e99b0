"""Drawing bits from the decoder's logits: temperature, classifier-free guidance, top-k, top-p.

The original's order per scale is: temperature for both branches, CFG mix cfg * cond + (1 - cfg) * uncond,
top-k, top-p, then `torch.multinomial` on the softmax of the [N, 2] logits with the decoder's generator.
Temperature and the CFG mix are both linear, so mixing raw logits and then applying the temperature gives the
same values up to float rounding. The scale loop (`vargpt.generation.scale_loop`) applies exactly these two
functions, so what they compute is what the sampler sees.
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """logits / tau. The original multiplies by 1 / tau, which rounds alike for its tau of 0.5 (and any power of
    two) and may differ in the last bit otherwise; dividing is what the scale loop has always computed."""
    if not tau > 0:
        raise ValueError(f"the sampling temperature tau must be positive, got {tau}")
    return logits / tau


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance on logits: cfg * cond + (1 - cfg) * uncond (cfg 1 returns cond)."""
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(
            f"conditional logits {tuple(cond_logits.shape)} and unconditional logits "
            f"{tuple(uncond_logits.shape)} differ in shape"
        )
    return cfg * cond_logits + (1 - cfg) * uncond_logits


def filter_top_k_top_p(logits_NV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set filtered-out classes to -inf (out of place); the last dim holds the classes.

    top_k > 0 keeps the k largest logits (a no-op for k >= the number of classes). top_p > 0 drops, in
    ascending order of probability, every class whose cumulative probability is <= 1 - top_p, always
    keeping the most likely one: with 2 classes and top_p 0.97, a value of probability <= 0.03 goes.
    """
    num_classes = logits_NV.shape[-1]
    if 0 < top_k < num_classes:
        kth_largest = logits_NV.topk(top_k, dim=-1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth_largest, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_NV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_NV = logits_NV.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    return logits_NV


def sample_bits(
    logits_Bld2: torch.Tensor,
    tau: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int = 0,
) -> torch.Tensor:
    """Draw every bit at once: temperature, top-k, top-p, then one multinomial draw per bit.

    `logits_Bld2` are raw logits (already CFG-mixed if guidance is used); pass tau=1.0 when they were
    already divided by tau. Returns long bits in {0, 1}, shape [B, l, d]. The multinomial runs on the
    flattened [B * l * d, 2] probabilities like the original's, so a generator seeded alike draws alike.
    """
    if logits_Bld2.ndim != 4 or logits_Bld2.shape[-1] != 2:
        raise ValueError(f"bit logits must be shaped [B, l, d, 2], got {tuple(logits_Bld2.shape)}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    batch, length, bits, _ = logits_Bld2.shape
    logits_N2 = filter_top_k_top_p(apply_temperature(logits_Bld2, tau).reshape(-1, 2), top_k, top_p)
    bits_N1 = torch.multinomial(logits_N2.softmax(dim=-1), num_samples=1, replacement=True, generator=generator)
    return bits_N1.view(batch, length, bits)
