"""Next-scale prediction of one image block: the scale loop.

The rows that asked for an image have `<|image_gen_start|>` as their last cached token. Per scale k, coarsest
first: the LLM reads the scale's input embeddings on its KV cache (the guidance strategy makes that call for
both branches), the visual decoder turns the hidden states into bit logits on its own KV cache, the sampler's
logits are `cfg_mix(apply_temperature(...))` of the two branches, bits are drawn (or, teacher-forced, given),
and their codes are summed into the latent whose resized copy is the next scale's input. Afterwards the block
enters the LLM's history in the training layout (scale tokens, then the remaining `<|image_gen_pad|>` slots)
and the VAE decodes the latent, one image at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..image_tokenizer import accumulate_scale
from ..visual_decoder import DecoderKVCache, apply_temperature, cfg_mix, sample_bits
from .cancellation import raise_if_stopped
from .config import ImageGenerationConfig
from .guidance import Guidance
from .state import DecodingState
from .static_cache import compiled
from .view import DecoderView

# (scale index, sampler logits [B, h*w, d, 2]) -> bits [B, h*w, d]
DrawBits = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ScaleLoopResult:
    """What one run of the scale loop saw, per scale k (coarsest first), for the B rows that drew an image.

    * `bits[k]` `[B, h*w, d]` long: the bits drawn (or, teacher-forced, the bits given) at scale k.
    * `cond_logits[k]` `[B, h*w, d, 2]` float32: the conditional branch's head logits, before tau and CFG
      (what the training forward computes at the same positions).
    * `uncond_logits[k]`: the unconditional branch's, or None without guidance (cfg_scale 1).
    * `sampler_logits[k]`: `cfg * cond / tau + (1 - cfg) * uncond / tau` (`cond / tau` without guidance): the
      logits the sampler's top-k / top-p filter and multinomial draw act on.
    * `latent` `[B, d, H, W]`: the summed codes of all scales, what the VAE decodes.
    * `images` `[B, 3, H', W']` in [-1, 1], or None when the loop was asked not to decode.
    * `num_pads`: `<|image_gen_pad|>` slots of the image block.
    """

    bits: list[torch.Tensor]
    cond_logits: list[torch.Tensor]
    uncond_logits: list[torch.Tensor] | None
    sampler_logits: list[torch.Tensor]
    latent: torch.Tensor
    images: torch.Tensor | None
    num_pads: int


def scale_loop(
    model,
    state: DecodingState,
    rows_B: torch.Tensor,
    settings: ImageGenerationConfig,
    guidance: Guidance,
    draw: DrawBits,
    *,
    continue_text: bool = True,
    decode: bool = True,
) -> ScaleLoopResult:
    """Draw one image for every row of `state`; `rows_B` (bool) marks the rows that asked for it, whose history
    the block joins. When text continues, the LLM cache afterwards holds the remaining pad slots too (when it
    does not, feeding them would be wasted work). `decode=False` skips the VAE."""
    view = DecoderView(model)
    schedule = view.schedule(settings)
    B, guided = state.batch, guidance.guided
    inputs = guidance.begin(view, state, view.inputs(state), schedule)
    x_RlH = view.start_inputs(inputs.cond_RD)
    dec_cache = DecoderKVCache()
    run_block = compiled(_run_block, state.fast, state.device) if state.fast.compile else None
    bits_per_scale, cond_logits, uncond_logits, sampler_logits = [], [], [], []
    latent = None
    fed = 0
    for k, grid in enumerate(schedule):
        raise_if_stopped()
        hidden_RlH = guidance.llm_call(state, x_RlH.to(state.dtype), fed, settings.position_mode)
        fed += hidden_RlH.shape[1]
        logits = view.bit_logits(hidden_RlH, inputs, schedule, k, dec_cache, run_block)
        cond_logits.append(logits[:B])
        if guided:
            uncond_logits.append(logits[B:])
        scaled = apply_temperature(logits, settings.tau)
        sampler_logits.append(cfg_mix(scaled[:B], scaled[B:], settings.cfg_scale) if guided else scaled)
        bits = draw(k, sampler_logits[-1])
        bits_per_scale.append(bits)
        if latent is None:
            latent = torch.zeros(B, bits.shape[-1], *schedule[-1], dtype=torch.float32, device=state.device)
        latent = accumulate_scale(latent, bits, grid)
        if k + 1 < len(schedule):
            x_RlH = view.next_inputs(latent, schedule[k + 1])
            x_RlH = torch.cat([x_RlH, x_RlH]) if guided else x_RlH
    guidance.end(state)
    num_tokens, num_pads = view.block_sizes(schedule)
    _record_block(view, state, rows_B, num_tokens, num_pads, continue_text)
    return ScaleLoopResult(
        bits=bits_per_scale,
        cond_logits=cond_logits,
        uncond_logits=uncond_logits if guided else None,
        sampler_logits=sampler_logits,
        latent=latent,
        images=_decode(view, latent) if decode else None,
        num_pads=num_pads,
    )


def _record_block(
    view: DecoderView, state: DecodingState, rows_B: torch.Tensor, num_tokens: int, num_pads: int, more: bool
) -> None:
    """The block as history of the rows that drew; then, if text follows, the remaining pad slots."""
    state.record_image_block(rows_B, num_tokens)
    if num_pads > num_tokens and more:
        filler = view.filler(state.batch, num_pads - num_tokens, state.device)
        state.step(filler.to(state.dtype), rows_B)


def _decode(view: DecoderView, latent_BdHW: torch.Tensor) -> torch.Tensor:
    """The VAE's images `[B, 3, H', W']` (float32), one at a time: convolution kernels may sum in another order
    for another batch size, and an image must not depend on the rest of its batch (one pixel byte differed on
    some CPUs)."""
    decoded = []
    for b in range(latent_BdHW.shape[0]):
        raise_if_stopped()
        decoded.append(view.decode(latent_BdHW[b : b + 1]))
    return torch.cat(decoded).float()


def _run_block(block, *args):
    """A decoder block's forward as a plain function, the unit compiled on the fast path: its inputs are
    tensors only (the scale index and schedule stay outside), so scales differ only in sizes, which torch's
    automatic dynamic shapes cover with a few compiles instead of one per scale."""
    return block(*args)


def sampling_draw(settings: ImageGenerationConfig, generator) -> DrawBits:
    """The sampler's draw: greedy for top-k 1, else top-p filtered multinomial draws (the logits already carry
    tau and CFG). With one generator per row, a row's draws depend on nothing else in the batch."""
    if settings.top_k == 1:
        return lambda k, logits_Bld2: logits_Bld2.argmax(-1)
    return lambda k, logits_Bld2: _sample_rows(logits_Bld2, settings.top_p, generator)


def _sample_rows(logits_Bld2: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    if isinstance(generator, list):
        if len(generator) != logits_Bld2.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {logits_Bld2.shape[0]}")
        rows = [sample_bits(logits_Bld2[b : b + 1], tau=1.0, top_p=top_p, generator=g) for b, g in enumerate(generator)]
        return torch.cat(rows)
    return sample_bits(logits_Bld2, tau=1.0, top_p=top_p, generator=generator)


def forced_draw(forced_bits: Sequence[torch.Tensor]) -> DrawBits:
    """Teacher forcing: the given bits of scale k (one `[B, h*w, d]` tensor per scale) in place of a draw, checked
    against the shape the draw would have had."""

    def draw(k: int, logits_Bld2: torch.Tensor) -> torch.Tensor:
        bits, shape = forced_bits[k], tuple(logits_Bld2.shape[:3])
        if tuple(bits.shape) != shape:
            raise ValueError(f"the bits of scale {k} must be shaped {shape}, got {tuple(bits.shape)}")
        return bits

    return draw
