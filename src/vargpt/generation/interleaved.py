"""Interleaved decoding: text by next-token prediction, images by next-scale prediction.

One batched loop. Each row writes text until it samples `<|image_gen_start|>` (or the caller forces an
image); then the rows that asked for an image run the scale loop together (`vargpt.generation.scale_loop`,
with the guidance strategy the image settings ask for), the image's tokens enter the LLM cache in the training
layout (`<|image_gen_start|>` + pad slots + `<|image_gen_end|>`), and text continues until EOS. Rows that did
not ask for an image take part in the batched calls with their tokens masked out of their own history. Images
come back as tensors; nothing is written anywhere.

A caller that may lose interest wraps the call in `stop_when(check)` (see `vargpt.generation.cancellation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from ..schedule import token_count
from .cancellation import raise_if_stopped
from .config import ImageGenerationConfig
from .guidance import Guidance, guidance_for
from .scale_loop import DrawBits, ScaleLoopResult, sampling_draw, scale_loop
from .state import DecodingState
from .static_cache import FastDecoding

__all__ = [
    "GENERATION_MODES",
    "TextSamplingConfig",
    "VARGPTGenerateOutput",
    "generate_interleaved",
]

GENERATION_MODES = ("text", "image", "interleaved")


@dataclass
class VARGPTGenerateOutput(ModelOutput):
    """`sequences`: prompt and answer ids (left padding kept), image blocks included as
    start / pad / end tokens. `images[b]`: the images of row b in order, each `[3, H, W]` in [-1, 1].
    `image_bits[b]`: per image, the sampled bits of every scale (`[h*w, bits]` each).
    `image_logits[b]`: per image, the conditional bit logits of all scales `[L, bits, 2]` before tau and CFG."""

    sequences: torch.LongTensor | None = None
    images: list[list[torch.Tensor]] | None = None
    image_bits: list[list[list[torch.Tensor]]] | None = None
    image_logits: list[list[torch.Tensor]] | None = None


@dataclass
class TextSamplingConfig:
    """Settings of the text part (transformers' meanings)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass(frozen=True)
class _Tokens:
    """The ids the text loop writes or bans: the image block's three, the text pad of finished rows, EOS."""

    image_start: int
    image_pad: int
    image_end: int
    pad: int
    eos_K: torch.Tensor

    @classmethod
    def of(cls, config, eos_token_ids: Sequence[int], device: torch.device) -> _Tokens:
        pad = config.text_config.pad_token_id
        eos = set(eos_token_ids or _default_eos(config))
        return cls(
            image_start=config.image_gen_start_token_id,
            image_pad=config.image_gen_pad_token_id,
            image_end=config.image_gen_end_token_id,
            pad=pad if pad is not None else 0,
            eos_K=torch.tensor(sorted(eos), device=device),
        )


@dataclass
class _Answer:
    """What the loop has written so far, per row: token ids (prompt included), whether the row is done, and
    its images with their bits and conditional logits."""

    sequences: torch.Tensor
    finished: torch.Tensor
    new_tokens: int = 0
    images: list[list[torch.Tensor]] = field(default_factory=list)
    image_bits: list[list[list[torch.Tensor]]] = field(default_factory=list)
    image_logits: list[list[torch.Tensor]] = field(default_factory=list)

    @classmethod
    def start(cls, input_ids: torch.Tensor) -> _Answer:
        B = input_ids.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        rows = range(B)
        return cls(input_ids.clone(), finished, 0, [[] for _ in rows], [[] for _ in rows], [[] for _ in rows])

    def append_token(self, next_B: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row (the pad for finished rows): `(tokens written, rows still writing)`."""
        next_B = torch.where(self.finished, torch.full_like(next_B, pad), next_B)
        active_B = ~self.finished
        self.sequences = torch.cat([self.sequences, next_B.view(-1, 1)], dim=1)
        self.new_tokens += 1
        return next_B, active_B

    def append_image(self, wants_B: torch.Tensor, loop: ScaleLoopResult, tokens: _Tokens) -> torch.Tensor:
        """Write the image block's pad slots and end token (text pads for the other rows) and keep the image of
        every row that drew one; returns the end token written per row."""
        B, device = wants_B.shape[0], wants_B.device
        pads = torch.where(
            wants_B.view(B, 1),
            torch.full((B, loop.num_pads), tokens.image_pad, device=device),
            torch.full((B, loop.num_pads), tokens.pad, device=device),
        )
        end_B = torch.where(wants_B, tokens.image_end, tokens.pad)
        self.sequences = torch.cat([self.sequences, pads, end_B.view(B, 1)], dim=1)
        logits_BLd2 = torch.cat(loop.cond_logits, dim=1)
        for b in wants_B.nonzero().flatten().tolist():
            self.images[b].append(loop.images[b])
            self.image_bits[b].append([s[b] for s in loop.bits])
            self.image_logits[b].append(logits_BLd2[b])
        return end_B

    def output(self) -> VARGPTGenerateOutput:
        return VARGPTGenerateOutput(
            sequences=self.sequences, images=self.images, image_bits=self.image_bits, image_logits=self.image_logits
        )


@torch.no_grad()
def generate_interleaved(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    *,
    generation_mode: str = "interleaved",
    text_config: TextSamplingConfig | None = None,
    image_config: ImageGenerationConfig | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    on_image_step: Callable[[int], None] | None = None,
    null_prompt_ids: torch.Tensor | None = None,
    fast: FastDecoding | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> VARGPTGenerateOutput:
    """Decode a batch of prompts (left padded). See the module docstring for the semantics.

    `pixel_values_videos` / `video_grid_thw`: understanding videos (`VARGPTProcessor(videos=...)`), read by the
    prefill like images.
    `null_prompt_ids`: token ids of the empty conversation, needed by `uncond_mode="null_prompt"` guidance.
    `fast`: static LLM cache and compiled calls (see `static_cache`); None decodes eagerly.
    `on_image_step`: called with the number of scales after each image block."""
    text_config = text_config or TextSamplingConfig()
    image_config = image_config or ImageGenerationConfig()
    _check_request(model, input_ids, generation_mode, text_config)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    capacity = _static_capacity(model, input_ids.shape[1], generation_mode, text_config, image_config)
    state = DecodingState(
        model,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        fast,
        capacity,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
    )
    tokens = _Tokens.of(model.config, text_config.eos_token_ids, input_ids.device)
    image = _ImageStep(model, image_config, guidance_for(image_config, null_prompt_ids), generator, on_image_step)
    procs = text_config.processors()
    answer = _Answer.start(input_ids)
    while answer.new_tokens < text_config.max_new_tokens and not bool(answer.finished.all()):
        raise_if_stopped()
        if generation_mode == "image" and answer.new_tokens == 0:
            next_B = torch.full(answer.finished.shape, tokens.image_start, dtype=torch.long, device=input_ids.device)
        else:
            ban_start = generation_mode != "interleaved"
            scores = _banned(state.logits_BV, tokens, ban_start)
            next_B = _pick(procs(answer.sequences, scores), text_config.do_sample, generator)
        next_B, active_B = answer.append_token(next_B, tokens.pad)
        if on_token is not None:
            on_token(next_B)
        state.logits_BV = state.feed_tokens(next_B, active_B)
        answer.finished = answer.finished | (active_B & torch.isin(next_B, tokens.eos_K))
        wants_B = active_B & (next_B == tokens.image_start)
        if bool(wants_B.any()):
            image(state, answer, wants_B, tokens, more_text=answer.new_tokens < text_config.max_new_tokens)
    return answer.output()


@dataclass
class _ImageStep:
    """One image block inside the text loop: the scale loop for the rows that asked, the block's tokens in the
    answer and, when text follows, `<|image_gen_end|>` fed to those rows."""

    model: Any
    settings: ImageGenerationConfig
    guidance: Guidance
    generator: torch.Generator | list[torch.Generator] | None
    on_image_step: Callable[[int], None] | None
    draw: DrawBits = field(init=False)

    def __post_init__(self) -> None:
        self.draw = sampling_draw(self.settings, self.generator)

    def __call__(
        self, state: DecodingState, answer: _Answer, wants_B: torch.Tensor, tokens: _Tokens, more_text: bool
    ) -> None:
        loop = scale_loop(self.model, state, wants_B, self.settings, self.guidance, self.draw, continue_text=more_text)
        if self.on_image_step is not None:
            self.on_image_step(len(loop.bits))
        end_B = answer.append_image(wants_B, loop, tokens)
        if more_text:
            kept_BV = state.logits_BV
            logits_BV = state.feed_tokens(end_B, wants_B)
            state.logits_BV = torch.where(wants_B.view(-1, 1), logits_BV, kept_BV)


def _check_request(model, input_ids: torch.Tensor, generation_mode: str, text: TextSamplingConfig) -> None:
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"generation_mode must be one of {GENERATION_MODES}, got {generation_mode!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [batch, length] tensor")
    limit = model.config.text_config.max_position_embeddings
    if input_ids.shape[1] + text.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens={text.max_new_tokens} exceeds the "
            f"model's context of {limit} tokens"
        )


def _banned(logits_BV: torch.Tensor, tokens: _Tokens, ban_start: bool) -> torch.Tensor:
    """A copy of the logits with the image block's inner tokens banned (and its start, where the mode says
    the model may not draw on its own)."""
    scores = logits_BV.clone()
    if ban_start:
        scores[:, tokens.image_start] = float("-inf")
    for banned in (tokens.image_pad, tokens.image_end):
        scores[:, banned] = float("-inf")
    return scores


def _pick(scores_BV: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    """Greedy, or one multinomial draw per row (from the row's own generator when given a list)."""
    if not do_sample:
        return scores_BV.argmax(-1)
    probs = scores_BV.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _static_capacity(
    model, prompt_len: int, generation_mode: str, text: TextSamplingConfig, image: ImageGenerationConfig
) -> int:
    """Slots a static LLM cache starts with: prompt, new tokens and, unless text only, one image block.
    A second image in one answer grows the cache (one copy and one recompile), a rare case not worth
    reserving memory for."""
    capacity = prompt_len + text.max_new_tokens
    if generation_mode != "text":
        schedule = model.generation_schedule(image.resolution, image.aspect_ratio)
        capacity += max(model.num_image_gen_pad_tokens(schedule), token_count(schedule)) + 1
    return capacity


def _default_eos(cfg) -> Sequence[int]:
    eos = cfg.text_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return [i for i in ids if i is not None]
