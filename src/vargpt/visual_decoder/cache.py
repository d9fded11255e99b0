"""Per-generation state of scale-by-scale decoding."""

from __future__ import annotations

import torch

from .attention import KVPair


class DecoderKVCache:
    """Self-attention keys/values of the scales decoded so far, and the projected cross-attention context.

    Construct it empty, hand it to `InfinityDecoder.forward_scale` for scale 0, 1, 2, ... in order, and
    `reset()` it (or make a new one) for the next image. The batch is whatever the first scale used, so a
    classifier-free-guidance batch (conditional rows, then unconditional rows: 2B) works as is. The
    context keys/values are projected at the first scale and reused: later scales must use the same
    context.
    """

    def __init__(self) -> None:
        self._self_kv: dict[int, KVPair] = {}
        self._context_kv: dict[int, KVPair] = {}
        self.context_mask_BN: torch.Tensor | None = None
        self.num_scales = 0
        self.seq_len = 0
        self.batch_size: int | None = None

    def reset(self) -> None:
        """Forget everything: the cache is as if newly constructed."""
        self._self_kv.clear()
        self._context_kv.clear()
        self.context_mask_BN = None
        self.num_scales = 0
        self.seq_len = 0
        self.batch_size = None

    def self_kv(self, layer: int) -> KVPair | None:
        """Rotated keys and values of all earlier scales for a layer, each [B, H, seq_len, c]; None at first."""
        return self._self_kv.get(layer)

    def set_self_kv(self, layer: int, kv: KVPair) -> None:
        self._self_kv[layer] = kv

    def context_kv(self, layer: int) -> KVPair | None:
        """Projected context keys and values of a layer, each [B, H, N, c]; None before the first scale."""
        return self._context_kv.get(layer)

    def set_context_kv(self, layer: int, kv: KVPair) -> None:
        self._context_kv[layer] = kv

    def check_batch(self, batch_size: int) -> None:
        """Fix the batch size at the first scale; raise ValueError if a later scale uses another one."""
        if self.batch_size is None:
            self.batch_size = batch_size
        elif batch_size != self.batch_size:
            raise ValueError(f"the KV cache holds a batch of {self.batch_size}, got a batch of {batch_size}")

    def advance(self, num_tokens: int) -> None:
        """Record that one more scale of `num_tokens` tokens is now cached."""
        self.num_scales += 1
        self.seq_len += num_tokens
