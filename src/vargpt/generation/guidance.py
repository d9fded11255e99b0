"""Classifier-free guidance as strategies: how the scale loop's unconditional branch is formed.

The scale loop runs the conditional rows and, under guidance, B unconditional rows after them; it mixes the two
branches' logits with `cfg_mix`. What differs between the kinds of guidance is everything before the mix: the
unconditional rows' decoder context and condition, the LLM cache they attend to and the LLM call of a scale.
Each strategy owns exactly those, for one image at a time (`begin`, one `llm_call` per scale, `end`):

* `NoGuidance` (cfg 1): the conditional rows alone.
* `OriginalUncond`: the published branch. Context `cfg_uncond[:N]` (N the conditional context's length),
  condition from `cfg_uncond[0]`, and an LLM pass over only the current scale's tokens (no prompt, no earlier
  scales) on the conditional cache with its rows doubled.
* `NullPrompt`: the same conversation with an empty user turn, run exactly like the conditional branch on its
  own LLM cache (what a model trained with prompt dropout has learnt to draw without a prompt). The caller
  prepares the empty conversation's ids, as a diffusers pipeline prepares a negative prompt
  (`VARGPTPipeline.null_prompt_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .config import ImageGenerationConfig
from .state import DecodingState
from .view import DecoderInputs, DecoderView, Grid


class Guidance(Protocol):
    """One way to form the unconditional branch. `guided`: whether there is one (the decoder then runs 2B rows,
    conditional first, and the loop mixes their logits)."""

    guided: bool

    def begin(
        self, view: DecoderView, state: DecodingState, inputs: DecoderInputs, schedule: Sequence[Grid]
    ) -> DecoderInputs:
        """Before the first scale: the decoder inputs of every row the loop runs, given the conditional ones."""
        ...

    def llm_call(self, state: DecodingState, x_RlH: torch.Tensor, fed: int, position_mode: str) -> torch.Tensor:
        """The LLM's hidden states `[R, l, H]` of one scale's tokens, `fed` tokens into the image block."""
        ...

    def end(self, state: DecodingState) -> None:
        """After the last scale: leave `state` with its B conditional rows."""
        ...


class NoGuidance:
    """cfg 1: no unconditional branch."""

    guided = False

    def begin(
        self, view: DecoderView, state: DecodingState, inputs: DecoderInputs, schedule: Sequence[Grid]
    ) -> DecoderInputs:
        return inputs

    def llm_call(self, state: DecodingState, x_RlH: torch.Tensor, fed: int, position_mode: str) -> torch.Tensor:
        return state.scale_call(x_RlH, fed, position_mode)

    def end(self, state: DecodingState) -> None:
        pass


class OriginalUncond:
    """The published unconditional branch; never trained (training swaps only the condition embedding)."""

    guided = True

    def begin(
        self, view: DecoderView, state: DecodingState, inputs: DecoderInputs, schedule: Sequence[Grid]
    ) -> DecoderInputs:
        B = state.batch
        lengths_B = inputs.context_mask_RT.sum(1).clamp(min=1, max=view.unconditional_length)
        width = int(lengths_B.max())
        context = view.unconditional_context(B, width).to(inputs.context_RTC.dtype)
        mask = torch.arange(width, device=state.device).view(1, -1) < lengths_B.view(-1, 1)
        state.select_rows(torch.cat([torch.arange(B), torch.arange(B)]).to(state.device))
        return DecoderInputs(
            stack_padded(inputs.context_RTC, context),
            stack_padded(inputs.context_mask_RT, mask),
            torch.cat([inputs.cond_RD, view.unconditional_condition(B)]),
        )

    def llm_call(self, state: DecodingState, x_RlH: torch.Tensor, fed: int, position_mode: str) -> torch.Tensor:
        """One call over 2B rows: the conditional ones see their history and the block so far, the
        unconditional ones only the current scale, at positions 0..n-1."""
        B, n, device = state.batch, x_RlH.shape[1], state.device
        ones = torch.ones(B, n, dtype=torch.long, device=device)
        cond_mask = torch.cat([state.mask_BT, torch.ones(B, fed, dtype=torch.long, device=device), ones], dim=1)
        uncond_mask = torch.cat([torch.zeros(B, state.length + fed, dtype=torch.long, device=device), ones], dim=1)
        cond_pos = state.scale_positions(position_mode, fed, n)
        uncond_pos = torch.arange(n, device=device).view(1, n).expand(B, n)
        positions_3Rn = torch.cat([cond_pos, uncond_pos]).unsqueeze(0).expand(3, 2 * B, n)
        return state.forward_llm(x_RlH, torch.cat([cond_mask, uncond_mask]), positions_3Rn)

    def end(self, state: DecodingState) -> None:
        state.select_rows(torch.arange(state.batch, device=state.device))


class NullPrompt:
    """The unconditional rows are the empty conversation (+ `<|image_gen_start|>`), prefilled once per image and
    stepped scale by scale beside the conditional rows. `null_prompt_ids`: its 1-D token ids
    (`VARGPTProcessor.null_prompt_ids()`); checked when an image is drawn, so a text-only answer needs none."""

    guided = True

    def __init__(self, null_prompt_ids: torch.Tensor | None) -> None:
        self.null_prompt_ids = null_prompt_ids
        self._null: DecodingState | None = None

    def begin(
        self, view: DecoderView, state: DecodingState, inputs: DecoderInputs, schedule: Sequence[Grid]
    ) -> DecoderInputs:
        self._null = self._prefill(view, state, view.block_sizes(schedule)[0])
        context, mask = view.context(self._null)
        return DecoderInputs(
            stack_padded(inputs.context_RTC, context),
            stack_padded(inputs.context_mask_RT, mask),
            torch.cat([inputs.cond_RD, inputs.cond_RD]),
        )

    def _prefill(self, view: DecoderView, state: DecodingState, image_tokens: int) -> DecodingState:
        ids = self.null_prompt_ids
        if ids is None or ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(
                "uncond_mode='null_prompt' needs null_prompt_ids: the 1-D token ids of the empty conversation "
                "(VARGPTPipeline passes them; see VARGPTProcessor.null_prompt_ids)"
            )
        start = torch.tensor([view.start_token_id], device=state.device)
        ids = torch.cat([ids.to(state.device), start]).view(1, -1)
        null = DecodingState(view.model, ids, torch.ones_like(ids), None, None, state.fast, ids.shape[1] + image_tokens)
        null.repeat_rows(state.batch)
        return null

    def llm_call(self, state: DecodingState, x_RlH: torch.Tensor, fed: int, position_mode: str) -> torch.Tensor:
        if self._null is None:
            raise RuntimeError("NullPrompt.llm_call before begin")
        B = state.batch
        hidden_cond = state.scale_call(x_RlH[:B], fed, position_mode)
        hidden_null = self._null.scale_call(x_RlH[B:], fed, position_mode)
        return torch.cat([hidden_cond, hidden_null])

    def end(self, state: DecodingState) -> None:
        self._null = None


def guidance_for(settings: ImageGenerationConfig, null_prompt_ids: torch.Tensor | None = None) -> Guidance:
    """The strategy `settings` ask for (`cfg_scale`, `uncond_mode`)."""
    if settings.cfg_scale == 1.0:
        return NoGuidance()
    if settings.uncond_mode == "null_prompt":
        return NullPrompt(null_prompt_ids)
    return OriginalUncond()


def stack_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of `a` then rows of `b`, right-padded with zeros (False) to the wider of the two along dim 1."""
    width = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        spec = (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])
        return torch.nn.functional.pad(t, spec)

    return torch.cat([pad(a), pad(b)])
