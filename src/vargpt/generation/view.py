"""The image side of the model as the scale loop sees it, in one place.

The loop needs the schedule, the decoder's context and condition, the two projectors between the LLM and the
decoder, the decoder's per-scale head, the unconditional rows of the original guidance and the VAE. Reaching
for them here, by what they are for, keeps the loop and the guidance strategies to a handful of calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..image_tokenizer import next_scale_input
from ..schedule import token_count
from ..visual_decoder import DecoderKVCache
from .config import ImageGenerationConfig
from .state import DecodingState

Grid = tuple[int, int]


@dataclass(frozen=True)
class DecoderInputs:
    """What the decoder reads besides the LLM's hidden states, for every row it runs (conditional rows first
    under guidance): cross-attention context `[R, T, C]` with its mask `[R, T]`, and the AdaLN condition `[R, D]`."""

    context_RTC: torch.Tensor
    context_mask_RT: torch.Tensor
    cond_RD: torch.Tensor


@dataclass(frozen=True)
class DecoderView:
    """`VARGPTForConditionalGeneration`'s generation parts, named for the scale loop (a view: it owns nothing)."""

    model: Any

    @property
    def _decoder(self):
        return self.model.vargpt_gen

    @property
    def _dtype(self) -> torch.dtype:
        return self._decoder.word_embed.weight.dtype

    def schedule(self, settings: ImageGenerationConfig) -> Sequence[Grid]:
        """The (h, w) grids of one image at the settings' resolution and aspect ratio, coarsest first."""
        return self.model.generation_schedule(settings.resolution, settings.aspect_ratio)

    def block_sizes(self, schedule: Sequence[Grid]) -> tuple[int, int]:
        """`(scale tokens, <|image_gen_pad|> slots)` of one image block."""
        return token_count(schedule), self.model.num_image_gen_pad_tokens(schedule)

    @property
    def start_token_id(self) -> int:
        return self.model.config.image_gen_start_token_id

    def context(self, state: DecodingState) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context `[B, T, C]` and mask `[B, T]` of the state's rows: their history before their
        `<|image_gen_start|>`, which is the last cached token."""
        start = state.length - 1
        return self.model.context_for_decoder(state.hidden_BTH, state.mask_BT, [(b, start) for b in range(state.batch)])

    def inputs(self, state: DecodingState) -> DecoderInputs:
        """The conditional branch's decoder inputs for the state's rows."""
        context, mask = self.context(state)
        return DecoderInputs(context, mask, self.model.image_condition(state.batch))

    def unconditional_condition(self, batch: int) -> torch.Tensor:
        """The original guidance's AdaLN condition `[B, D]`, from `cfg_uncond[0]`."""
        return self.model.image_condition(batch, unconditional=True)

    @property
    def unconditional_length(self) -> int:
        """Rows of `cfg_uncond`: the longest context the original guidance can stand in for."""
        return self._decoder.cfg_uncond.shape[0]

    def unconditional_context(self, batch: int, width: int) -> torch.Tensor:
        """The first `width` rows of `cfg_uncond` for every row, `[B, width, C]`."""
        return self._decoder.uncond_tokens(batch, width)

    def start_inputs(self, cond_RD: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings of the first scale `[R, 1, H]`, from the condition."""
        return self.model.image_gen_projector(self._decoder.start_tokens(cond_RD).to(self._dtype))

    def next_inputs(self, latent_BdHW: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The LLM's input embeddings of the next scale `[B, h*w, H]`: the summed codes resized to its grid."""
        coarse = next_scale_input(latent_BdHW, grid)
        return self.model.image_gen_projector(self._decoder.embed_inputs(coarse.to(self._dtype)))

    def filler(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Embeddings `[B, length, H]` of the pad slots after the scale tokens: zero decoder inputs projected."""
        width = self._decoder.word_embed.weight.shape[0]
        zeros = torch.zeros(batch, length, width, dtype=self._dtype, device=device)
        return self.model.image_gen_projector(zeros)

    def bit_logits(
        self,
        hidden_RlH: torch.Tensor,
        inputs: DecoderInputs,
        schedule: Sequence[Grid],
        k: int,
        cache: DecoderKVCache,
        run_block: Callable[..., Any] | None,
    ) -> torch.Tensor:
        """The decoder head's logits `[R, h*w, d, 2]` (float32) of scale k, from the LLM's hidden states."""
        h_RlC = self.model.image_gen_projector_out(hidden_RlH)
        logits = self._decoder.forward_scale(
            h_RlC, inputs.cond_RD, inputs.context_RTC, inputs.context_mask_RT, schedule, k, cache, run_block=run_block
        )
        return logits.float()

    def decode(self, latent_1dHW: torch.Tensor) -> torch.Tensor:
        """One image `[1, 3, H', W']` from its summed codes, in the VAE's dtype.

        The codes go in channels-last, the layout in which the original's arrive: a CPU convolution's summation
        order follows the layout, and in this one our pixels equal the original's to the last uint8 digit where
        the plain layout leaves a value on an integer boundary one step off (tests/fidelity)."""
        vae = self.model.vae_local
        latent = latent_1dHW.to(vae.decoder.conv_in.conv.weight.dtype)
        return vae.decode(latent.contiguous(memory_format=torch.channels_last))
