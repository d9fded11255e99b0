"""One decoder block: AdaLN-modulated self-attention, plain cross-attention, AdaLN-modulated FFN."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CosineSelfAttention, CrossAttention, KVPair
from .layers import DropPath, FeedForward, ada_layer_norm


class DecoderBlock(nn.Module):
    """The original `CrossAttnBlock` with a shared AdaLN.

    The six modulation vectors are `ada_gss` (this block's learned offset, [1, 1, 6, C]) plus the shared
    `shared_ada_lin(cond)` output, split in the order gamma1, gamma2, scale1, scale2, shift1, shift2:

        x += drop_path(SA(LN(x) * (1 + scale1) + shift1) * gamma1)
        x += CA(LN_affine(x), context)
        x += drop_path(FFN(LN(x) * (1 + scale2) + shift2) * gamma2)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden: int,
        norm_eps: float,
        drop_path_rate: float,
        cross_attention_bf16: bool = False,
    ) -> None:
        super().__init__()
        self.norm_eps = norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))
        self.sa = CosineSelfAttention(dim, num_heads)
        self.ca = CrossAttention(dim, dim, num_heads, bf16_inputs=cross_attention_bf16)
        self.ffn = FeedForward(dim, ffn_hidden)
        self.ca_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self,
        x_BLC: torch.Tensor,
        shared_gss_B16C: torch.Tensor,
        cos_Lp: torch.Tensor,
        sin_Lp: torch.Tensor,
        context: KVPair | torch.Tensor,
        context_mask_BN: torch.Tensor | None,
        attn_mask_LL: torch.Tensor | None = None,
        past_kv: KVPair | None = None,
    ) -> tuple[torch.Tensor, KVPair, KVPair]:
        """Returns the new hidden states, the self-attention keys/values seen and the context keys/values (both
        for the KV cache).

        `context` is the raw cross-attention context [B, N, C], projected by the cross-attention, or its
        keys/values cached from an earlier scale.
        """
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + shared_gss_B16C).unbind(2)
        sa_out, present_kv = self.sa(
            ada_layer_norm(x_BLC, scale1, shift1, self.norm_eps), cos_Lp, sin_Lp, attn_mask_LL, past_kv
        )
        x_BLC = x_BLC + self.drop_path(sa_out * gamma1)
        ca_out, context_kv = self.ca(self.ca_norm(x_BLC), context, context_mask_BN)
        x_BLC = x_BLC + ca_out
        ffn_out = self.ffn(ada_layer_norm(x_BLC, scale2, shift2, self.norm_eps))
        x_BLC = x_BLC + self.drop_path(ffn_out * gamma2)
        return x_BLC, present_kv, context_kv


class BlockChunk(nn.Module):
    """A group of consecutive blocks; exists only so that state-dict names read `block_chunks.i.module.j`."""

    def __init__(self, blocks: list[DecoderBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)
