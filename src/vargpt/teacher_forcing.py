"""Teacher forcing on the inference path: score given bits (or an image) through the KV-cached scale loop.

The training forward scores an image in one pass with a block-causal mask; sampling walks the scales one at a
time on LLM and decoder KV caches, with classifier-free guidance and a temperature. The two agree (a test
holds them to it), but only this path answers questions about the sampler itself: how likely is this image
under the distribution `generate` draws from at cfg 3 and tau 0.5, which scale of a sample is improbable, do
two implementations of the loop see the same logits. `score_image_bits` runs exactly `generate`'s image path
(`vargpt.generation.forced_scale_loop`: same prefill, same forced `<|image_gen_start|>`, same per-scale calls)
and feeds the given bits where the sampler would feed its draws.

What the log-likelihood is: at scale k every bit j of token i is drawn from the two-way softmax of the
sampler's logits `z = cfg * cond / tau + (1 - cfg) * uncond / tau` (`cond / tau` at cfg 1), where `cond` and
`uncond` are the head logits of the conditional and unconditional branches given the earlier scales' bits.
`log_likelihood` is the sum over all scales, tokens and bits of `log softmax(z)[bit]`, in nats. top-k and
top-p are not applied: with two values per bit, top-k >= 2 is no filter at all, and top-p would give a bit of
probability below 1 - top_p a log-probability of -inf, so that an image's score would say only whether the
sampler could have drawn it. At cfg 1 and tau 1 it is the model's own likelihood, the negative of the training
forward's summed bit cross-entropy at the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .generation.config import ImageGenerationConfig
from .generation.forced import forced_scale_loop
from .image_tokenizer import encode_to_bits


@dataclass(frozen=True)
class ScaleScores:
    """Per-scale logits and log-likelihoods of B images under the sampler's distribution (coarsest scale first).

    * `schedule`: the (h, w) grid of every scale.
    * `bits[k]` `[B, h*w, d]` long: the scored bits.
    * `logits[k]` `[B, h*w, d, 2]` float32: the sampler's logits (CFG-mixed, divided by tau); see the module
      docstring.
    * `cond_logits[k]`, `uncond_logits[k]`: the two branches' head logits before tau and CFG
      (`uncond_logits` is None at cfg 1, where the sampler runs no unconditional branch).
    * `bit_log_probs[k]` `[B, h*w, d]`: log-probability of each scored bit under `logits[k]`.
    * `log_likelihood_per_scale` `[B, K]` and `log_likelihood` `[B]`: their sums, in nats.
    * `latent` `[B, d, H, W]`: the summed codes of the scored bits (what the VAE would decode).
    """

    schedule: list[tuple[int, int]]
    bits: list[torch.Tensor]
    logits: list[torch.Tensor]
    cond_logits: list[torch.Tensor]
    uncond_logits: list[torch.Tensor] | None
    bit_log_probs: list[torch.Tensor]
    log_likelihood_per_scale: torch.Tensor
    log_likelihood: torch.Tensor
    latent: torch.Tensor
    cfg_scale: float
    tau: float

    @property
    def num_bits(self) -> int:
        """Bits of one image over all scales."""
        return sum(bits.shape[1] * bits.shape[2] for bits in self.bits)

    @property
    def nll_per_bit(self) -> torch.Tensor:
        """`-log_likelihood / num_bits`, `[B]`: the mean per-bit negative log-likelihood in nats."""
        return -self.log_likelihood / self.num_bits

    def all_logits(self) -> torch.Tensor:
        """`logits` of every scale joined along the token axis, `[B, L, d, 2]` (the training forward's layout)."""
        return torch.cat(self.logits, dim=1)

    def all_cond_logits(self) -> torch.Tensor:
        """`cond_logits` joined along the token axis, `[B, L, d, 2]`: the training forward's `image_logits`."""
        return torch.cat(self.cond_logits, dim=1)

    def all_bits(self) -> torch.Tensor:
        """`bits` joined along the token axis, `[B, L, d]`: the training forward's `image_labels`."""
        return torch.cat(self.bits, dim=1)


def _image_settings(image_config: ImageGenerationConfig | None, settings: dict[str, Any]) -> ImageGenerationConfig:
    renamed = {"image_top_k": "top_k", "image_top_p": "top_p"}
    return (image_config or ImageGenerationConfig()).updated(**{renamed.get(k, k): v for k, v in settings.items()})


def split_bits(
    bits: torch.Tensor | Sequence[torch.Tensor], schedule: Sequence[tuple[int, int]], bits_per_token: int
) -> list[torch.Tensor]:
    """Bits as one `[B, h*w, d]` tensor per scale, from that list or from one `[B, L, d]` tensor.

    Checks the count of scales, every shape against the schedule and that the values are 0 or 1, so that a
    wrong resolution or a transposed tensor is named instead of failing deep inside the loop."""
    sizes = [h * w for h, w in schedule]
    if isinstance(bits, torch.Tensor):
        if bits.dim() != 3 or bits.shape[1] != sum(sizes) or bits.shape[2] != bits_per_token:
            raise ValueError(
                f"bits as one tensor must be [B, {sum(sizes)}, {bits_per_token}] for this schedule, "
                f"got {tuple(bits.shape)}"
            )
        per_scale = list(bits.split(sizes, dim=1))
    else:
        per_scale = list(bits)
        if len(per_scale) != len(schedule):
            raise ValueError(f"bits were given for {len(per_scale)} scales, but the schedule has {len(schedule)}")
    batch = per_scale[0].shape[0] if per_scale[0].dim() == 3 else None
    for k, (bits_k, n) in enumerate(zip(per_scale, sizes, strict=True)):
        if not isinstance(bits_k, torch.Tensor):
            raise TypeError(f"the bits of scale {k} must be a tensor, got {type(bits_k).__name__}")
        if bits_k.dim() != 3 or tuple(bits_k.shape[1:]) != (n, bits_per_token) or bits_k.shape[0] != batch:
            raise ValueError(
                f"the bits of scale {k} ({schedule[k][0]}x{schedule[k][1]}) must be [B, {n}, {bits_per_token}] with "
                f"the same B at every scale, got {tuple(bits_k.shape)}"
            )
        if not bool(((bits_k == 0) | (bits_k == 1)).all()):
            raise ValueError(f"the bits of scale {k} hold values other than 0 and 1")
    return per_scale


@torch.no_grad()
def encode_image_bits(
    model: Any, images_B3HW: torch.Tensor, *, resolution: int | None = None, aspect_ratio: float = 1.0
) -> list[torch.Tensor]:
    """The bits per scale (`[B, h*w, d]` each) the model's VAE codes B images into, as training targets them.

    `images_B3HW` are in [-1, 1] at exactly the schedule's pixel size (for a file or PIL image use
    `VARGPTProcessor.preprocess_generation_target(image, resolution, resize_ratio=1.0)`, as `vargpt eval fit`
    does). The coding is the training forward's without bit flips."""
    schedule = model.generation_schedule(resolution, aspect_ratio)
    height, width = schedule.image_size
    if images_B3HW.dim() != 4 or tuple(images_B3HW.shape[1:]) != (3, height, width):
        raise ValueError(
            f"images must be [B, 3, {height}, {width}] in [-1, 1] for this resolution and aspect ratio, got "
            f"{tuple(images_B3HW.shape)}"
        )
    vae = model.vae_local
    features = vae.encode(images_B3HW.to(device=model.device, dtype=vae.encoder.conv_in.conv.weight.dtype))
    bits, _ = encode_to_bits(features.float(), schedule)
    return bits


@torch.no_grad()
def score_image_bits(
    model: Any,
    input_ids: torch.LongTensor,
    bits: torch.Tensor | Sequence[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_config: ImageGenerationConfig | None = None,
    null_prompt_ids: torch.Tensor | None = None,
    **image_settings: Any,
) -> ScaleScores:
    """Score given bits of one image per prompt through `generate`'s KV-cached scale loop.

    `input_ids` (left padded, with `attention_mask`, `pixel_values`, `image_grid_thw` for understanding
    images) are the prompt exactly as `model.generate(..., generation_mode="image")` takes it: without the
    `<|image_gen_start|>`, which the loop appends. `bits`: one `[B, h*w, d]` tensor per scale (what
    `generate` returns in `image_bits`, stacked over rows) or one `[B, L, d]` tensor. Settings come from
    `image_config` or keywords as in `generate` (`cfg_scale`, `tau`, `resolution`, `aspect_ratio`,
    `uncond_mode`, `position_mode`); `top_k`/`top_p` are accepted and not applied (see the module docstring).
    `uncond_mode="null_prompt"` needs `null_prompt_ids`. The model runs in eval mode for the call.
    """
    settings = _image_settings(image_config, image_settings)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty [batch, length] tensor (build them with VARGPTProcessor)")
    start = model.config.image_gen_start_token_id
    if bool((input_ids[:, -1] == start).any()):
        raise ValueError(
            "the prompt already ends in <|image_gen_start|>; pass it as generate takes it, without that token "
            "(the scale loop appends it)"
        )
    schedule = model.generation_schedule(settings.resolution, settings.aspect_ratio)
    per_scale = split_bits(bits, schedule, model.config.visual_decoder_config.bits)
    if per_scale[0].shape[0] != input_ids.shape[0]:
        raise ValueError(f"bits for {per_scale[0].shape[0]} images but {input_ids.shape[0]} prompts")
    device = model.device
    input_ids, attention_mask, pixel_values, image_grid_thw, null_prompt_ids = (
        None if t is None else t.to(device)
        for t in (input_ids, attention_mask, pixel_values, image_grid_thw, null_prompt_ids)
    )
    per_scale = [b.to(device=device, dtype=torch.long) for b in per_scale]
    was_training = model.training
    model.eval()
    try:
        loop = forced_scale_loop(
            model, input_ids, attention_mask, pixel_values, image_grid_thw, per_scale, settings, null_prompt_ids
        )
    finally:
        model.train(was_training)
    bit_log_probs = [
        logits.log_softmax(-1).gather(-1, bits_k.unsqueeze(-1)).squeeze(-1)
        for logits, bits_k in zip(loop.sampler_logits, loop.bits, strict=True)
    ]
    per_scale_ll = torch.stack([lp.sum(dim=(1, 2)) for lp in bit_log_probs], dim=1)
    return ScaleScores(
        schedule=[tuple(g) for g in schedule],
        bits=loop.bits,
        logits=loop.sampler_logits,
        cond_logits=loop.cond_logits,
        uncond_logits=loop.uncond_logits,
        bit_log_probs=bit_log_probs,
        log_likelihood_per_scale=per_scale_ll,
        log_likelihood=per_scale_ll.sum(dim=1),
        latent=loop.latent,
        cfg_scale=settings.cfg_scale,
        tau=settings.tau,
    )


def score_image(
    model: Any,
    input_ids: torch.LongTensor,
    images_B3HW: torch.Tensor,
    *,
    image_config: ImageGenerationConfig | None = None,
    **kwargs: Any,
) -> ScaleScores:
    """`score_image_bits` of the bits the model's VAE codes `images_B3HW` into (see `encode_image_bits`).

    The images are coded at the resolution and aspect ratio of the settings; other keywords go to
    `score_image_bits`."""
    settings_keys = set(ImageGenerationConfig().to_dict()) | {"image_top_k", "image_top_p"}
    settings = _image_settings(image_config, {k: v for k, v in kwargs.items() if k in settings_keys})
    rest = {k: v for k, v in kwargs.items() if k not in settings_keys}
    bits = encode_image_bits(model, images_B3HW, resolution=settings.resolution, aspect_ratio=settings.aspect_ratio)
    return score_image_bits(model, input_ids, bits, image_config=settings, **rest)
