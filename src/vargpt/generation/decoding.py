"""Interleaved decoding: text by next-token prediction, images by next-scale prediction.

One batched loop. Each row writes text until it samples `<|image_gen_start|>` (or the caller forces an
image); then the rows that asked for an image run the scale loop together (LLM and decoder KV caches; the
original CFG branch shares the batch, the null-prompt branch has its own LLM cache and call), the image's
tokens enter the LLM cache in the training layout (`<|image_gen_start|>` + pad slots + `<|image_gen_end|>`),
and text continues until EOS. Rows that did not ask for an image take part in the batched calls with their
tokens masked out of their own history. Images come back as tensors; nothing is written anywhere.

`forced_scale_loop` runs the same image path with given bits in place of drawn ones (teacher forcing on the
inference path; `vargpt.teacher_forcing` is its public face), so the logits it returns are the sampler's own.

A caller that may lose interest (a server whose client timed out) wraps the call in `stop_when(check)`: the
loop asks `check()` once per text token and once per scale step and raises `GenerationCancelled` when it says
so, so abandoned work ends within one step instead of running to the end.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from ..image_tokenizer import accumulate_scale, next_scale_input
from ..llm_cache import cache_kwargs
from ..rope_index import mrope_positions
from ..visual_decoder import DecoderKVCache, sample_bits
from .config import ImageGenerationConfig
from .static_cache import FastDecoding, compiled, padded_mask, static_copy

GENERATION_MODES = ("text", "image", "interleaved")


class GenerationCancelled(RuntimeError):
    """Raised inside the decoding loop when the `stop_when` check of the calling context says stop."""


# A context variable rather than a parameter: the check reaches the loop through `VARGPTPipeline` and
# `model.generate` without every layer in between forwarding one more argument, and it stays with the thread (or
# task) that set it, so other threads' generations are unaffected.
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("stop_check", default=None)


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within this block, generation raises `GenerationCancelled` at the first token or scale step for which
    `check()` is true. `check` is called often: keep it a flag read."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def _raise_if_stopped() -> None:
    check = _stop_check.get()
    if check is not None and check():
        raise GenerationCancelled("generation stopped: its caller cancelled it")


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


class _DecodingState:
    """What the loop tracks per row: cache, which cache slots are real, and the next text position.

    With `fast.static_cache` the prefill still runs eagerly on a `DynamicCache`, whose keys/values then move
    into a `StaticCache` of `capacity` slots (grown by copying if an answer outruns it)."""

    def __init__(
        self,
        model,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        fast: FastDecoding | None = None,
        capacity: int = 0,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.fast = fast or FastDecoding()
        self.cache = DynamicCache(config=model.config.text_config)
        B, L = input_ids.shape
        self.batch = B
        self.device = input_ids.device
        embeds = model.model.embed_tokens(input_ids)
        if pixel_values is not None or pixel_values_videos is not None:
            embeds = model.embed_understanding_images(
                embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        positions, deltas = mrope_positions(
            input_ids,
            attention_mask,
            image_grid_thw,
            model.config.image_token_id,
            model.config.vision_config.spatial_merge_size,
            video_grid_thw_N3=video_grid_thw,
            video_token_id=model.config.video_token_id,
        )
        self.mask_BT = attention_mask.to(torch.long)
        out = model.model(
            inputs_embeds=embeds,
            attention_mask=self.mask_BT,
            position_ids=positions,
            **cache_kwargs(self.cache),
            use_cache=True,
        )
        # hidden states are kept as chunks and joined only when an image needs its context, so a long
        # answer does not re-copy its whole history at every token
        self._hidden_chunks: list[torch.Tensor] = [out.last_hidden_state]
        self.dtype = out.last_hidden_state.dtype
        self.logits_BV = model.lm_head(out.last_hidden_state[:, -1]).float()
        self.next_pos_B = (deltas[:, 0] + L).to(self.device)
        self.cache_len = L
        self.capacity = max(capacity, L)
        if self.fast.static_cache:
            self.cache = self._static(torch.arange(B, device=self.device), self.capacity)
        self._llm = compiled(model.model, self.fast, self.device)

    def _static(self, rows: torch.Tensor, capacity: int):
        return static_copy(self.cache, self.model.config.text_config, rows, self.cache_len, capacity)

    def forward_llm(self, embeds_BlH, call_mask_BT, positions_3Bl) -> torch.Tensor:
        """One LLM call on the cache; `call_mask_BT` covers the cached tokens and the new ones.

        On the static path the mask is padded to the cache's capacity, so every decode step has one shape."""
        n_new = embeds_BlH.shape[1]
        if self.fast.static_cache:
            if self.cache_len + n_new > self.capacity:
                self.capacity = max(self.cache_len + n_new, 2 * self.capacity)
                rows = torch.arange(call_mask_BT.shape[0], device=self.device)
                self.cache = self._static(rows, self.capacity)
            call_mask_BT = padded_mask(call_mask_BT, self.capacity)
        out = self._llm(
            inputs_embeds=embeds_BlH,
            attention_mask=call_mask_BT,
            position_ids=positions_3Bl,
            **cache_kwargs(self.cache),
            use_cache=True,
        )
        self.cache_len += n_new
        return out.last_hidden_state

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) cache rows `rows`: the original guidance doubles the batch for the scale loop."""
        if self.fast.static_cache:
            self.cache = self._static(rows, self.capacity)
        else:
            self.cache.batch_select_indices(rows)

    @property
    def length(self) -> int:
        return self.mask_BT.shape[1]

    @property
    def hidden_BTH(self) -> torch.Tensor:
        if len(self._hidden_chunks) > 1:
            self._hidden_chunks = [torch.cat(self._hidden_chunks, dim=1)]
        return self._hidden_chunks[0]

    def repeat_rows(self, B: int) -> None:
        """Turn a one-row state into B identical rows (the same prefix prefilled once, not B times)."""
        if self.batch != 1:
            raise ValueError(f"only a one-row state can be repeated, this one has {self.batch} rows")
        if self.fast.static_cache:
            self.cache = self._static(torch.zeros(B, dtype=torch.long, device=self.device), self.capacity)
        else:
            self.cache.batch_repeat_interleave(B)
        self._hidden_chunks = [self.hidden_BTH.expand(B, -1, -1)]
        self.mask_BT = self.mask_BT.expand(B, -1)
        self.logits_BV = self.logits_BV.expand(B, -1)
        self.next_pos_B = self.next_pos_B.expand(B)
        self.batch = B

    def append_hidden(self, hidden_BlH: torch.Tensor) -> None:
        self._hidden_chunks.append(hidden_BlH)

    def step(self, embeds_BlH, real_B, positions_3Bl=None, see_new=None):
        """Feed l tokens per row. `real_B`: rows for which the tokens are part of their history."""
        B, n_new, _ = embeds_BlH.shape
        if positions_3Bl is None:
            offs = torch.arange(n_new, device=self.device)
            positions_3Bl = (self.next_pos_B.view(B, 1) + offs.view(1, n_new)).unsqueeze(0).expand(3, B, n_new)
        new_mask = torch.ones(B, n_new, dtype=torch.long, device=self.device)
        call_mask = torch.cat([self.mask_BT, new_mask], dim=1)
        hidden = self.forward_llm(embeds_BlH, call_mask, positions_3Bl)
        self.mask_BT = torch.cat([self.mask_BT, real_B.view(B, 1).long().expand(B, n_new)], dim=1)
        self.append_hidden(hidden)
        self.next_pos_B = self.next_pos_B + real_B.long() * n_new
        return hidden


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


def _image_events(
    model,
    state: _DecodingState,
    rows_B: torch.Tensor,
    settings: ImageGenerationConfig,
    generator,
    continue_text: bool = True,
    null_prompt_ids: torch.Tensor | None = None,
    forced_bits: Sequence[torch.Tensor] | None = None,
    decode: bool = True,
) -> ScaleLoopResult:
    """Run the scale loop for rows `rows_B` (their `<|image_gen_start|>` is the last cached token).

    When text continues, the LLM cache afterwards holds the remaining pad slots too (when it does not,
    feeding them would be wasted work). With `uncond_mode="null_prompt"` the unconditional rows are a second
    decoding state over `null_prompt_ids` (+ `<|image_gen_start|>`), stepped scale by scale beside the
    conditional one. `forced_bits` (one `[B, h*w, d]` tensor per scale) replaces every draw by the given
    bits, so the loop scores them (teacher forcing on the inference path) with everything else unchanged;
    `decode=False` skips the VAE.
    """
    cfg = model.config
    B = state.batch
    device = state.device
    schedule = model.generation_schedule(settings.resolution, settings.aspect_ratio)
    num_tokens = sum(h * w for h, w in schedule)
    num_pads = model.num_image_gen_pad_tokens(schedule)
    use_cfg = settings.cfg_scale != 1.0
    proj_in, proj_out, decoder = model.image_gen_projector, model.image_gen_projector_out, model.vargpt_gen
    H = cfg.text_config.hidden_size
    dtype = decoder.word_embed.weight.dtype

    start_index = state.length - 1
    context, context_mask = model.context_for_decoder(
        state.hidden_BTH, state.mask_BT, [(b, start_index) for b in range(B)]
    )
    cond_BD = model.image_condition(B)
    null_state = None
    if use_cfg and settings.uncond_mode == "null_prompt":
        null_state = _null_prompt_state(model, null_prompt_ids, B, device, state.fast, num_tokens)
        null_ctx, null_mask = model.context_for_decoder(
            null_state.hidden_BTH, null_state.mask_BT, [(b, null_state.length - 1) for b in range(B)]
        )
        context, context_mask = _stack_padded(context, null_ctx), _stack_padded(context_mask, null_mask)
        cond_BD = torch.cat([cond_BD, cond_BD])
    elif use_cfg:
        lengths = context_mask.sum(1).clamp(min=1, max=decoder.cfg_uncond.shape[0])
        width = int(lengths.max())
        uncond_ctx = decoder.cfg_uncond[:width].unsqueeze(0).expand(B, -1, -1).to(context.dtype)
        uncond_mask = torch.arange(width, device=device).view(1, -1) < lengths.view(-1, 1)
        pad = max(context.shape[1], width)
        context = torch.cat(
            [
                torch.nn.functional.pad(context, (0, 0, 0, pad - context.shape[1])),
                torch.nn.functional.pad(uncond_ctx, (0, 0, 0, pad - width)),
            ]
        )
        context_mask = torch.cat(
            [
                torch.nn.functional.pad(context_mask, (0, pad - context_mask.shape[1])),
                torch.nn.functional.pad(uncond_mask, (0, pad - width)),
            ]
        )
        cond_BD = torch.cat([cond_BD, model.image_condition(B, unconditional=True)])
        state.select_rows(torch.cat([torch.arange(B), torch.arange(B)]).to(device))
    rows = 2 * B if use_cfg else B

    x_RlH = proj_in(decoder.start_tokens(cond_BD).to(dtype))
    prefix_mask = state.mask_BT  # [B, T] history before the scale tokens
    cache_len0 = state.length
    dec_cache = DecoderKVCache()
    run_block = compiled(_run_block, state.fast, device) if state.fast.compile else None
    latent = None
    bits_per_scale: list[torch.Tensor] = []
    cond_logits: list[torch.Tensor] = []
    uncond_logits: list[torch.Tensor] = []
    sampler_logits: list[torch.Tensor] = []
    fed = 0
    for k, (h, w) in enumerate(schedule):
        _raise_if_stopped()
        n = h * w
        cond_pos = _scale_positions(state, settings.position_mode, cache_len0, fed, n)
        x_RlH = x_RlH.to(state.dtype)
        if null_state is not None:
            hidden_cond = _scale_call(state, x_RlH[:B], prefix_mask, cond_pos, fed + n)
            null_pos = _scale_positions(null_state, settings.position_mode, null_state.length, fed, n)
            hidden_null = _scale_call(null_state, x_RlH[B:], null_state.mask_BT, null_pos, fed + n)
            last_hidden = torch.cat([hidden_cond, hidden_null])
        elif use_cfg:
            # the original unconditional rows see only the current scale (no prompt, no earlier scales)
            ones = torch.ones(B, n, dtype=torch.long, device=device)
            cond_mask = torch.cat([prefix_mask, torch.ones(B, fed, dtype=torch.long, device=device), ones], dim=1)
            uncond_mask = torch.cat([torch.zeros(B, cache_len0 + fed, dtype=torch.long, device=device), ones], dim=1)
            uncond_pos = torch.arange(n, device=device).view(1, n).expand(B, n)
            last_hidden = state.forward_llm(
                x_RlH,
                torch.cat([cond_mask, uncond_mask]),
                torch.cat([cond_pos, uncond_pos]).unsqueeze(0).expand(3, rows, n),
            )
        else:
            last_hidden = _scale_call(state, x_RlH, prefix_mask, cond_pos, fed + n)
        fed += n
        h_RlC = proj_out(last_hidden)
        logits = decoder.forward_scale(
            h_RlC, cond_BD, context, context_mask, schedule, k, dec_cache, run_block=run_block
        ).float()
        cond_logits.append(logits[:B])
        if use_cfg:
            uncond_logits.append(logits[B:])
        logits = logits / settings.tau
        if use_cfg:
            logits = settings.cfg_scale * logits[:B] + (1.0 - settings.cfg_scale) * logits[B:]
        sampler_logits.append(logits)
        if forced_bits is not None:
            bits = _forced_scale_bits(forced_bits, k, logits)
        elif settings.top_k == 1:
            bits = logits.argmax(-1)
        else:
            bits = _sample_rows(logits, settings.top_p, generator)
        bits_per_scale.append(bits)
        if latent is None:
            latent = torch.zeros(B, bits.shape[-1], *schedule[-1], dtype=torch.float32, device=device)
        latent = accumulate_scale(latent, bits, (h, w))
        if k + 1 < len(schedule):
            nxt = next_scale_input(latent, schedule[k + 1])
            x_RlH = proj_in(decoder.embed_inputs(nxt.to(dtype)))
            if use_cfg:
                x_RlH = torch.cat([x_RlH, x_RlH])

    if use_cfg and null_state is None:
        state.select_rows(torch.arange(B, device=device))
    # record the scale tokens as history of the participating rows, then fill the remaining pad slots
    real = rows_B.long().view(B, 1)
    state.mask_BT = torch.cat([state.mask_BT, real.expand(B, num_tokens)], dim=1)
    state.append_hidden(torch.zeros(B, num_tokens, H, dtype=state.dtype, device=device))
    state.next_pos_B = state.next_pos_B + rows_B.long() * num_tokens
    if num_pads > num_tokens and continue_text:
        filler = proj_in(
            torch.zeros(B, num_pads - num_tokens, decoder.word_embed.weight.shape[0], dtype=dtype, device=device)
        )
        state.step(filler.to(state.dtype), rows_B)
    # one image at a time: convolution kernels may sum in another order for another batch size, and an
    # image must not depend on the rest of its batch (one pixel byte differed on some CPUs)
    images = None
    if decode:
        vae_dtype = model.vae_local.decoder.conv_in.conv.weight.dtype
        decoded = []
        for b in range(B):
            _raise_if_stopped()
            decoded.append(model.vae_local.decode(latent[b : b + 1].to(vae_dtype)))
        images = torch.cat(decoded).float()
    return ScaleLoopResult(
        bits=bits_per_scale,
        cond_logits=cond_logits,
        uncond_logits=uncond_logits if use_cfg else None,
        sampler_logits=sampler_logits,
        latent=latent,
        images=images,
        num_pads=num_pads,
    )


def _forced_scale_bits(forced_bits: Sequence[torch.Tensor], k: int, logits_Bld2: torch.Tensor) -> torch.Tensor:
    """The given bits of scale k, checked against the shape the draw would have had (`forced_scale_loop` checks
    the number of scales; `score_image_bits` moves the bits to the device as long)."""
    bits, shape = forced_bits[k], tuple(logits_Bld2.shape[:3])
    if tuple(bits.shape) != shape:
        raise ValueError(f"the bits of scale {k} must be shaped {shape}, got {tuple(bits.shape)}")
    return bits


@torch.no_grad()
def forced_scale_loop(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    bits_per_scale: Sequence[torch.Tensor],
    image_config: ImageGenerationConfig,
    null_prompt_ids: torch.Tensor | None = None,
) -> ScaleLoopResult:
    """`generate(generation_mode="image")`'s path with the given bits in place of drawn ones.

    The same prefill, the same forced `<|image_gen_start|>` step and the same `_image_events` call as
    sampling (eager caches), so the logits are the ones the sampler would have seen had it drawn these bits.
    The VAE is not run (`result.latent` is what it would decode). Inputs are on the model's device;
    `vargpt.teacher_forcing.score_image_bits` is the checked public entry.
    """
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    num_scales = len(model.generation_schedule(image_config.resolution, image_config.aspect_ratio))
    if len(bits_per_scale) != num_scales:
        raise ValueError(
            f"bits were given for {len(bits_per_scale)} scales, but the schedule of this resolution and aspect "
            f"ratio has {num_scales}"
        )
    state = _DecodingState(model, input_ids, attention_mask, pixel_values, image_grid_thw)
    every_row = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    start = torch.full((B,), model.config.image_gen_start_token_id, dtype=torch.long, device=input_ids.device)
    state.step(model.model.embed_tokens(start).unsqueeze(1), every_row)
    return _image_events(
        model,
        state,
        every_row,
        image_config,
        generator=None,
        continue_text=False,
        null_prompt_ids=null_prompt_ids,
        forced_bits=bits_per_scale,
        decode=False,
    )


def _null_prompt_state(
    model,
    null_prompt_ids: torch.Tensor | None,
    B: int,
    device,
    fast: FastDecoding | None = None,
    image_tokens: int = 0,
) -> _DecodingState:
    """The empty conversation followed by `<|image_gen_start|>`, prefilled once and repeated for B rows."""
    if null_prompt_ids is None or null_prompt_ids.dim() != 1 or null_prompt_ids.numel() == 0:
        raise ValueError(
            "uncond_mode='null_prompt' needs null_prompt_ids: the 1-D token ids of the empty conversation "
            "(VARGPTPipeline passes them; see VARGPTProcessor.null_prompt_ids)"
        )
    start = torch.tensor([model.config.image_gen_start_token_id], device=device)
    ids = torch.cat([null_prompt_ids.to(device), start]).view(1, -1)
    state = _DecodingState(model, ids, torch.ones_like(ids), None, None, fast, ids.shape[1] + image_tokens)
    state.repeat_rows(B)
    return state


def _stack_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of `a` then rows of `b`, right-padded with zeros to the wider of the two along dim 1."""
    width = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        spec = (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])
        return torch.nn.functional.pad(t, spec)

    return torch.cat([pad(a), pad(b)])


def _scale_positions(state: _DecodingState, position_mode: str, cache_len0: int, fed: int, n: int) -> torch.Tensor:
    """Rotary positions `[B, n]` of the current scale's tokens, `fed` tokens into the image block."""
    B = state.batch
    offs = torch.arange(fed, fed + n, device=state.device)
    if position_mode == "cache":
        return (cache_len0 + offs).view(1, n).expand(B, n)
    return state.next_pos_B.view(B, 1) + offs.view(1, n)


def _scale_call(state: _DecodingState, x_BlH, prefix_mask_BT, positions_Bl, block_len: int) -> torch.Tensor:
    """One LLM call over a scale's tokens of rows that see their whole history and the block so far."""
    B, n = positions_Bl.shape
    mask = torch.cat(
        [prefix_mask_BT, torch.ones(B, block_len, dtype=prefix_mask_BT.dtype, device=prefix_mask_BT.device)], dim=1
    )
    return state.forward_llm(x_BlH, mask, positions_Bl.unsqueeze(0).expand(3, B, n))


def _run_block(block, *args):
    """A decoder block's forward as a plain function, the unit compiled on the fast path: its inputs are
    tensors only (the scale index and schedule stay outside), so scales differ only in sizes, which torch's
    automatic dynamic shapes cover with a few compiles instead of one per scale."""
    return block(*args)


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
    `fast`: static LLM cache and compiled calls (see `fast_decoding`); None decodes eagerly."""
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"generation_mode must be one of {GENERATION_MODES}, got {generation_mode!r}")
    cfg = model.config
    text_config = text_config or TextSamplingConfig()
    image_config = image_config or ImageGenerationConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [batch, length] tensor")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = cfg.text_config.max_position_embeddings
    if input_ids.shape[1] + text_config.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens plus max_new_tokens={text_config.max_new_tokens} exceeds the "
            f"model's context of {limit} tokens"
        )
    eos = set(text_config.eos_token_ids or _default_eos(cfg))
    B = input_ids.shape[0]
    device = input_ids.device
    capacity = _static_capacity(model, input_ids.shape[1], generation_mode, text_config, image_config)
    state = _DecodingState(
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
    procs = text_config.processors()
    sequences = input_ids.clone()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    images: list[list[torch.Tensor]] = [[] for _ in range(B)]
    image_bits: list[list[list[torch.Tensor]]] = [[] for _ in range(B)]
    image_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    embed = model.model.embed_tokens
    pad_id = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
    forced_done = False
    eos_ids = torch.tensor(sorted(eos), device=device)

    new_tokens = 0
    while new_tokens < text_config.max_new_tokens and not bool(finished.all()):
        _raise_if_stopped()
        if generation_mode == "image" and not forced_done:
            next_B = torch.full((B,), cfg.image_gen_start_token_id, dtype=torch.long, device=device)
            forced_done = True
        else:
            scores = state.logits_BV.clone()
            if generation_mode == "text" or (generation_mode == "image" and forced_done):
                scores[:, cfg.image_gen_start_token_id] = float("-inf")
            for banned in (cfg.image_gen_pad_token_id, cfg.image_gen_end_token_id):
                scores[:, banned] = float("-inf")
            scores = procs(sequences, scores)
            if text_config.do_sample:
                probs = scores.softmax(-1)
                if isinstance(generator, list):
                    next_B = torch.cat(
                        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)]
                    )
                else:
                    next_B = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_B = scores.argmax(-1)
        next_B = torch.where(finished, torch.full_like(next_B, pad_id), next_B)
        active = ~finished
        sequences = torch.cat([sequences, next_B.view(B, 1)], dim=1)
        new_tokens += 1
        if on_token is not None:
            on_token(next_B)
        hidden = state.step(embed(next_B).unsqueeze(1), active)
        state.logits_BV = model.lm_head(hidden[:, -1]).float()
        finished = finished | (active & torch.isin(next_B, eos_ids))

        wants_image = active & (next_B == cfg.image_gen_start_token_id)
        if bool(wants_image.any()):
            more_text = new_tokens < text_config.max_new_tokens
            loop = _image_events(
                model,
                state,
                wants_image,
                image_config,
                generator,
                continue_text=more_text,
                null_prompt_ids=null_prompt_ids,
            )
            bits, num_pads = loop.bits, loop.num_pads
            logits_BLd2 = torch.cat(loop.cond_logits, dim=1)
            if on_image_step is not None:
                on_image_step(len(bits))
            pads = torch.where(
                wants_image.view(B, 1),
                torch.full((B, num_pads), cfg.image_gen_pad_token_id, device=device),
                torch.full((B, num_pads), pad_id, device=device),
            )
            end_B = torch.where(wants_image, cfg.image_gen_end_token_id, pad_id)
            sequences = torch.cat([sequences, pads, end_B.view(B, 1)], dim=1)
            if more_text:
                kept_logits = state.logits_BV
                hidden = state.step(embed(end_B).unsqueeze(1), wants_image)
                state.logits_BV = torch.where(wants_image.view(B, 1), model.lm_head(hidden[:, -1]).float(), kept_logits)
            for b in wants_image.nonzero().flatten().tolist():
                images[b].append(loop.images[b])
                image_bits[b].append([s[b] for s in bits])
                image_logits[b].append(logits_BLd2[b])
    return VARGPTGenerateOutput(sequences=sequences, images=images, image_bits=image_bits, image_logits=image_logits)


def _static_capacity(
    model, prompt_len: int, generation_mode: str, text: TextSamplingConfig, image: ImageGenerationConfig
) -> int:
    """Slots a static LLM cache starts with: prompt, new tokens and, unless text only, one image block.
    A second image in one answer grows the cache (one copy and one recompile), a rare case not worth
    reserving memory for."""
    capacity = prompt_len + text.max_new_tokens
    if generation_mode != "text":
        schedule = model.generation_schedule(image.resolution, image.aspect_ratio)
        capacity += max(model.num_image_gen_pad_tokens(schedule), sum(h * w for h, w in schedule)) + 1
    return capacity


def _sample_rows(logits_Bld2: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """Bits of every row; with one generator per row, a row's draws depend on nothing else in the batch."""
    if isinstance(generator, list):
        if len(generator) != logits_Bld2.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {logits_Bld2.shape[0]}")
        rows = [sample_bits(logits_Bld2[b : b + 1], tau=1.0, top_p=top_p, generator=g) for b, g in enumerate(generator)]
        return torch.cat(rows)
    return sample_bits(logits_Bld2, tau=1.0, top_p=top_p, generator=generator)


def _default_eos(cfg) -> Sequence[int]:
    eos = cfg.text_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return [i for i in ids if i is not None]
