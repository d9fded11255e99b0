"""Analytic FLOP counts of text-to-image generation, from the configuration alone.

Counted: every matrix multiplication the scale loop runs (2 FLOPs per multiply-add), attention score and
value products over the key slots actually computed (masked slots included: SDPA computes them), and the
VAE decoder's convolutions. Not counted: norms, activations, softmax, sampling, interpolation (a few per
cent at most). Per image, with the work of a batch divided by its size. The scale loop's shape, which these
counts follow (see `vargpt.generation.scale_loop.scale_loop`):

* LLM: prompt prefill (P tokens), the `<|image_gen_start|>` step, then per scale k its n_k tokens for
  2 rows with CFG (conditional + unconditional in one batch, keys over the whole cache); the remaining pad
  slots and `<|image_gen_end|>` only when text follows the image (`continue_text`; plain text-to-image skips
  them); `lm_head` on the last position of each text step only.
* Decoder: per scale the `image_gen_projector_out` (LLM -> decoder width) and the blocks over the n_k
  tokens of both CFG rows (self-attention to every scale so far, cross-attention to the P context tokens),
  the head; the context keys/values once per block; the next scale's `word_embed` + `image_gen_projector`
  on the conditional rows only (they are copied for the unconditional ones).
* VAE decoder: its convolutions at the final latent grid.

With null-prompt guidance (`uncond_mode="null_prompt"`) the unconditional rows are a second decoding state:
the empty conversation (N tokens) and `<|image_gen_start|>` prefilled once per batch, then per scale their own LLM call
with keys over their own cache, and a cross-attention context of N tokens (both rows' contexts padded to
the longer one, whose masked slots SDPA still computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..configuration import VARGPTConfig
from ..schedule import Schedule
from ..visual_decoder.layers import ffn_hidden_size


def _llm_linear_per_token(config: VARGPTConfig) -> float:
    text = config.text_config
    H, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or H // text.num_attention_heads
    q_width = text.num_attention_heads * head_dim
    kv_width = text.num_key_value_heads * head_dim
    per_layer = H * q_width + 2 * H * kv_width + q_width * H + 3 * H * inter
    return 2.0 * per_layer * text.num_hidden_layers


def _llm_attention(config: VARGPTConfig, queries: int, keys: int) -> float:
    """QK^T and AV products of `queries` tokens against `keys` key slots, all layers."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 4.0 * queries * keys * text.num_attention_heads * head_dim * text.num_hidden_layers


def _causal_attention(config: VARGPTConfig, length: int) -> float:
    """A prefill of `length` tokens computes the full length x length score matrix (SDPA with a mask)."""
    return _llm_attention(config, length, length)


def vae_decoder_flops(config: VARGPTConfig, latent_hw: tuple[int, int]) -> float:
    """Convolution FLOPs of decoding one latent grid to pixels."""
    tok = config.image_tokenizer_config
    mults = list(tok.channel_multipliers)
    h, w = latent_hw

    def conv(c_in: int, c_out: int, k: int, hh: int, ww: int) -> float:
        return 2.0 * c_in * c_out * k * k * hh * ww

    def resblock(c_in: int, c_out: int, hh: int, ww: int) -> float:
        shortcut = conv(c_in, c_out, 1, hh, ww) if c_in != c_out else 0.0
        return conv(c_in, c_out, 3, hh, ww) + conv(c_out, c_out, 3, hh, ww) + shortcut

    channels = tok.base_channels * mults[-1]
    total = conv(tok.bits, channels, 3, h, w) + 2 * resblock(channels, channels, h, w)
    for level in reversed(range(len(mults))):
        out = tok.base_channels * mults[level]
        for _ in range(tok.num_res_blocks + 1):
            total += resblock(channels, out, h, w)
            channels = out
        if level > 0:
            h, w = 2 * h, 2 * w
            total += conv(channels, channels, 3, h, w)
    return total + conv(channels, tok.in_channels, 3, h, w)


def generation_flops(
    config: VARGPTConfig,
    schedule: Sequence[tuple[int, int]] | Schedule,
    prompt_tokens: int,
    cfg: bool = True,
    include_attention: bool = True,
    continue_text: bool = False,
    uncond_mode: str = "original",
    null_prompt_tokens: int | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """FLOPs per generated image: {"llm", "decoder", "vae", "total"} (see the module docstring).

    `schedule` is the image's `Schedule` (`model.generation_schedule(...)`); a plain list of grids takes the
    config's pad multiple. `include_attention=False` leaves out the attention products (what torch's
    FlopCounterMode sees on CPU, where it does not count scaled_dot_product_attention). `uncond_mode` is the
    guidance's unconditional branch ("original" or "null_prompt", which needs `null_prompt_tokens`); it matters
    only with `cfg`. `batch_size` shares the null prompt's prefill, which runs once per batch, among the batch's
    images."""
    _check_flop_arguments(prompt_tokens, uncond_mode, batch_size, cfg, null_prompt_tokens)
    if not isinstance(schedule, Schedule):
        schedule = Schedule(tuple(schedule), pad_multiple=config.image_gen_pad_multiple)
    null = cfg and uncond_mode == "null_prompt"
    loop = _LoopShape(
        prompt=prompt_tokens,
        null_prompt=null_prompt_tokens if null else 0,
        rows=2 if cfg else 1,
        attention=1.0 if include_attention else 0.0,
    )
    llm = _llm_flops(config, schedule, loop, continue_text, batch_size)
    decoder = _decoder_flops(config, schedule, loop)
    vae = vae_decoder_flops(config, schedule.last_grid)
    return {"llm": llm, "decoder": decoder, "vae": vae, "total": llm + decoder + vae}


def _check_flop_arguments(
    prompt_tokens: int, uncond_mode: str, batch_size: int, cfg: bool, null_prompt_tokens: int | None
) -> None:
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if uncond_mode not in ("original", "null_prompt"):
        raise ValueError(f"uncond_mode must be 'original' or 'null_prompt', got {uncond_mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cfg and uncond_mode == "null_prompt" and (null_prompt_tokens is None or null_prompt_tokens < 1):
        raise ValueError("uncond_mode='null_prompt' needs null_prompt_tokens >= 1 (the empty conversation's length)")


@dataclass(frozen=True)
class _LoopShape:
    """What the scale loop's shape depends on besides the schedule: the prompt's tokens P, the null prompt's N
    (0 without null-prompt guidance), the rows per image (2 with CFG) and whether attention products count."""

    prompt: int
    null_prompt: int
    rows: int
    attention: float

    @property
    def null(self) -> bool:
        return self.null_prompt > 0


def _llm_flops(
    config: VARGPTConfig, schedule: Schedule, loop: _LoopShape, continue_text: bool, batch_size: int
) -> float:
    """The LLM's share: prefill, start token, the scales, and (when text follows) pad filler and end token."""
    per_token = _llm_linear_per_token(config)
    lm_head = 2.0 * config.text_config.hidden_size * config.text_config.vocab_size
    P, N, att = loop.prompt, loop.null_prompt, loop.attention
    llm = P * per_token + att * _causal_attention(config, P) + lm_head
    llm += per_token + att * _llm_attention(config, 1, P + 1) + lm_head
    if loop.null:  # the unconditional state: the empty conversation and its start token, prefilled
        llm += ((N + 1) * per_token + att * _causal_attention(config, N + 1) + lm_head) / batch_size
    for fed, n in zip(schedule.offsets[:-1], schedule.scale_token_counts, strict=True):
        if loop.null:
            llm += 2 * n * per_token + att * (
                _llm_attention(config, n, P + 1 + fed + n) + _llm_attention(config, n, N + 1 + fed + n)
            )
        else:
            llm += loop.rows * (n * per_token + att * _llm_attention(config, n, P + 1 + fed + n))
    num_pads = schedule.num_pad_tokens
    filler = num_pads - schedule.num_tokens
    if continue_text:
        if filler:
            llm += filler * per_token + att * _llm_attention(config, filler, P + 1 + num_pads)
        llm += per_token + att * _llm_attention(config, 1, P + 2 + num_pads) + lm_head
    return llm


def _decoder_flops(config: VARGPTConfig, schedule: Schedule, loop: _LoopShape) -> float:
    """The visual decoder's and the two projectors' share."""
    dec = config.visual_decoder_config
    H, C, bits = config.text_config.hidden_size, dec.embed_dim, dec.bits
    F = ffn_hidden_size(C, dec.mlp_ratio, dec.ffn_hidden_multiple)
    rows = loop.rows
    proj_in = 2.0 * (C * C + C * H)
    proj_out = 2.0 * (H * H + H * C)
    block_linear = 2.0 * (3 * C * C + C * C + C * C + C * C + 2 * C * F)
    width = max(loop.prompt, loop.null_prompt)  # the context slots each row's cross-attention computes
    decoder = (loop.prompt + loop.null_prompt) * proj_out  # the context through image_gen_projector_out
    decoder += rows * dec.depth * 2.0 * width * dec.context_dim * 2 * C  # context keys / values, once
    decoder += proj_in  # the start token
    counts = schedule.scale_token_counts
    for k, (n, fed) in enumerate(zip(counts, schedule.offsets[1:], strict=True)):
        decoder += rows * n * (proj_out + dec.depth * block_linear + 2.0 * C * 2 * bits)
        # self-attention to all scales so far + context
        decoder += loop.attention * rows * dec.depth * 4.0 * n * C * (fed + width)
        if k + 1 < len(counts):
            decoder += counts[k + 1] * (2.0 * bits * C + proj_in)
    return decoder
