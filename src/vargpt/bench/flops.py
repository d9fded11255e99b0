"""Analytic FLOP counts of text-to-image generation, from the configuration alone.

Counted: every matrix multiplication the scale loop runs (2 FLOPs per multiply-add), attention score and
value products over the key slots actually computed (masked slots included: SDPA computes them), and the
VAE decoder's convolutions. Not counted: norms, activations, softmax, sampling, interpolation (a few per
cent at most). Per image, with the work of a batch divided by its size. The scale loop's shape, which these
counts follow (see `vargpt.generation.decoding._image_events`):

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

from ..configuration import VARGPTConfig
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
    schedule: Sequence[tuple[int, int]],
    prompt_tokens: int,
    cfg: bool = True,
    include_attention: bool = True,
    continue_text: bool = False,
    uncond_mode: str = "original",
    null_prompt_tokens: int | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """FLOPs per generated image: {"llm", "decoder", "vae", "total"} (see the module docstring).

    `include_attention=False` leaves out the attention products (what torch's FlopCounterMode sees on CPU,
    where it does not count scaled_dot_product_attention). `uncond_mode` is the guidance's unconditional
    branch ("original" or "null_prompt", which needs `null_prompt_tokens`); it matters only with `cfg`.
    `batch_size` shares the null prompt's prefill, which runs once per batch, among the batch's images."""
    att = 1.0 if include_attention else 0.0
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if uncond_mode not in ("original", "null_prompt"):
        raise ValueError(f"uncond_mode must be 'original' or 'null_prompt', got {uncond_mode!r}")
    null = cfg and uncond_mode == "null_prompt"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if null and (null_prompt_tokens is None or null_prompt_tokens < 1):
        raise ValueError("uncond_mode='null_prompt' needs null_prompt_tokens >= 1 (the empty conversation's length)")
    text = config.text_config
    dec = config.visual_decoder_config
    H, C, bits = text.hidden_size, dec.embed_dim, dec.bits
    F = ffn_hidden_size(C, dec.mlp_ratio, dec.ffn_hidden_multiple)
    rows = 2 if cfg else 1
    per_token = _llm_linear_per_token(config)
    lm_head = 2.0 * H * text.vocab_size
    P = prompt_tokens
    num_tokens = sum(h * w for h, w in schedule)
    multiple = config.image_gen_pad_multiple
    num_pads = -(-num_tokens // multiple) * multiple

    # LLM: prefill, start token, scales, pad filler, end token
    llm = P * per_token + att * _causal_attention(config, P) + lm_head
    llm += per_token + att * _llm_attention(config, 1, P + 1) + lm_head
    N = null_prompt_tokens if null else 0
    if null:  # the unconditional state: the empty conversation and its start token, prefilled
        llm += ((N + 1) * per_token + att * _causal_attention(config, N + 1) + lm_head) / batch_size
    fed = 0
    for h, w in schedule:
        n = h * w
        if null:
            llm += 2 * n * per_token + att * (
                _llm_attention(config, n, P + 1 + fed + n) + _llm_attention(config, n, N + 1 + fed + n)
            )
        else:
            llm += rows * (n * per_token + att * _llm_attention(config, n, P + 1 + fed + n))
        fed += n
    filler = num_pads - num_tokens
    if continue_text:
        if filler:
            llm += filler * per_token + att * _llm_attention(config, filler, P + 1 + num_pads)
        llm += per_token + att * _llm_attention(config, 1, P + 2 + num_pads) + lm_head

    # Decoder and the two projectors
    proj_in = 2.0 * (C * C + C * H)
    proj_out = 2.0 * (H * H + H * C)
    block_linear = 2.0 * (3 * C * C + C * C + C * C + C * C + 2 * C * F)
    width = max(P, N)  # the context slots each row's cross-attention computes
    decoder = (P + N) * proj_out  # the context through image_gen_projector_out (null-prompt rows too)
    decoder += rows * dec.depth * 2.0 * width * dec.context_dim * 2 * C  # context keys / values, once
    decoder += proj_in  # the start token
    fed = 0
    for k, (h, w) in enumerate(schedule):
        n = h * w
        fed += n
        decoder += rows * n * (proj_out + dec.depth * block_linear + 2.0 * C * 2 * bits)
        decoder += att * rows * dec.depth * 4.0 * n * C * (fed + width)  # self-attention to all scales so far + context
        if k + 1 < len(schedule):
            h2, w2 = schedule[k + 1]
            decoder += h2 * w2 * (2.0 * bits * C + proj_in)
    vae = vae_decoder_flops(config, tuple(schedule[-1]))
    return {"llm": llm, "decoder": decoder, "vae": vae, "total": llm + decoder + vae}
