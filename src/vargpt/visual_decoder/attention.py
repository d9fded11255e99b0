"""Attention layers of the decoder: cosine self-attention with 2D RoPE, cross-attention, attentive pooling.

Parameter names follow the original checkpoint: `mat_qkv` / `mat_q` / `mat_kv` weights, separate
`q_bias` / `v_bias` parameters and a persistent all-zero `zero_k_bias` buffer (keys carry no bias). The
buffer is stored for the layout only: the key bias is built as zeros on the fly, so a block offloaded by
accelerate (whose hook restores parameters, not buffers) still computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import linear_with_bias
from .rope import apply_rope

KVPair = tuple[torch.Tensor, torch.Tensor]


class CosineSelfAttention(nn.Module):
    """Multi-head self-attention on L2-normalised q and k (softmax scale 1).

    q is multiplied by a learned per-head temperature exp(min(s, ln 100)), s initialised to ln 4; 2D RoPE
    is applied to the normalised q and k. With `past_kv` (cached keys/values of earlier scales, already
    rotated) the new keys/values are appended and every query sees all of them.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.max_scale_mul = math.log(100.0)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x_BLC: torch.Tensor,
        cos_Lp: torch.Tensor,
        sin_Lp: torch.Tensor,
        attn_mask_LL: torch.Tensor | None = None,
        past_kv: KVPair | None = None,
    ) -> tuple[torch.Tensor, KVPair]:
        """Returns the output [B, L, C] and all keys/values seen (past + new), each [B, H, L_all, c]."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = linear_with_bias(self.mat_qkv, x_BLC, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q_BHLc = F.normalize(q_BHLc, dim=-1, eps=1e-12) * scale_mul
        k_BHLc = F.normalize(k_BHLc, dim=-1, eps=1e-12)
        q_BHLc = apply_rope(q_BHLc, cos_Lp, sin_Lp)
        k_BHLc = apply_rope(k_BHLc, cos_Lp, sin_Lp)
        if past_kv is not None:
            k_BHLc = torch.cat((past_kv[0], k_BHLc), dim=2)
            v_BHLc = torch.cat((past_kv[1], v_BHLc), dim=2)
        out = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_mask_LL, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C)), (k_BHLc, v_BHLc)


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens (or one learned query) to a context, scale 1/sqrt(head_dim).

    `pooled=True` makes the query a learned parameter `mat_q` [1, H, c] (the original's attentive pooling
    for `text_proj_for_sos`); otherwise `mat_q` is a Linear on the tokens.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, pooled: bool = False, bf16_inputs: bool = False) -> None:
        super().__init__()
        self.bf16_inputs = bf16_inputs
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.pooled = pooled
        if pooled:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def project_context(self, context_BNC: torch.Tensor) -> KVPair:
        """Keys and values of a context, each [B, H, N, c] (cacheable across scales)."""
        B, N, _ = context_BNC.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = linear_with_bias(self.mat_kv, context_BNC, bias).view(B, N, 2, self.num_heads, self.head_dim)
        k_BHNc, v_BHNc = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k_BHNc, v_BHNc

    def forward(
        self, x_BLC: torch.Tensor | None, context: KVPair | torch.Tensor, context_mask_BN: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVPair]:
        """Attend to a context; returns the output and the context's keys/values (to cache across scales).

        `context` is the raw context [B, N, kv_dim], projected here, or keys/values projected earlier;
        `context_mask_BN` is True at real context tokens. Projecting inside `forward` keeps every use of this
        layer's weights inside its call, which accelerate's offloading hooks need.
        """
        kv = self.project_context(context) if isinstance(context, torch.Tensor) else context
        k_BHNc, v_BHNc = kv
        B = k_BHNc.shape[0]
        if self.pooled:
            q_BHLc = self.mat_q.to(k_BHNc.dtype).unsqueeze(2).expand(B, -1, -1, -1)
        else:
            if x_BLC is None:
                raise ValueError("a non-pooling cross-attention needs query tokens")
            q_BHLc = self.mat_q(x_BLC).view(B, x_BLC.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        mask = None if context_mask_BN is None else context_mask_BN[:, None, None, :]
        if self.bf16_inputs and q_BHLc.dtype == torch.float32:
            out = _attention_in_bf16(q_BHLc, k_BHNc, v_BHNc, mask)
        else:
            out = F.scaled_dot_product_attention(q_BHLc, k_BHNc, v_BHNc, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, q_BHLc.shape[2], self.dim)), kv


def _attention_in_bf16(
    q_BHLc: torch.Tensor, k_BHNc: torch.Tensor, v_BHNc: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """What the published code's flash-attn call computes from fp32 inputs: q, k and v rounded to bf16, the
    attention accumulated in fp32, the output rounded to bf16; returned in fp32 for the output projection."""
    q, k, v = (t.to(torch.bfloat16).float() for t in (q_BHLc, k_BHNc, v_BHNc))
    if mask is not None and bool(mask.all()):
        mask = None  # unpadded contexts take the mask-free kernel, as the published per-sequence call does
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(torch.bfloat16).float()


def attentive_pool_heads(context_dim: int, embed_dim: int) -> int:
    """Heads of the condition pooling: the original uses head dim 128 (64 above width 4096) on the context.

    At least one head, so that tiny models narrower than 128 still pool.
    """
    head_dim = 64 if embed_dim > 4096 else 128
    return max(1, context_dim // head_dim)


class TextAttentivePool(nn.Module):
    """Pools a [B, L, context_dim] sequence into one [B, embed_dim] vector with a learned query."""

    def __init__(self, context_dim: int, embed_dim: int, bf16_inputs: bool = False) -> None:
        super().__init__()
        heads = attentive_pool_heads(context_dim, embed_dim)
        self.ca = CrossAttention(embed_dim, context_dim, heads, pooled=True, bf16_inputs=bf16_inputs)

    def forward(self, x_BLC: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        return self.ca(None, x_BLC, mask_BL)[0].squeeze(1)
