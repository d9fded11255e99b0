"""The Infinity-2B transformer as VARGPT-v1.1 uses it (the original's `vargpt_gen`).

The LLM side hands the decoder one hidden vector per image token (already projected to the decoder
width C); the decoder adds the scale embedding, runs its blocks with self-attention over the scales so
far, cross-attention to the prompt context and AdaLN conditioning, and predicts each token's d bits.
Module and parameter names reproduce the original state dict (694 tensors for the full-size model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..schedule import Schedule, as_grids, block_causal_mask, scale_token_ids, token_count
from .attention import CosineSelfAttention, CrossAttention, TextAttentivePool
from .block import BlockChunk, DecoderBlock
from .cache import DecoderKVCache
from .configuration import VisualDecoderConfig
from .layers import AdaLNBeforeHead, RMSNorm, ffn_hidden_size
from .rope import rope_cos_sin, scale_positions, schedule_positions, schedule_reference

# Infinity draws the unconditional embedding table from this seed (truncated normal, std 1.2, / sqrt(dim)).
_CFG_UNCOND_SEED = 0
_CFG_UNCOND_STD = 1.2


def _check_config(config: VisualDecoderConfig) -> None:
    if config.embed_dim % config.num_heads:
        raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
    if (config.embed_dim // config.num_heads) % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {config.embed_dim // config.num_heads}")
    if config.num_block_chunks <= 0 or config.depth % config.num_block_chunks:
        raise ValueError(f"depth {config.depth} is not divisible into {config.num_block_chunks} block chunks")


class InfinityDecoder(nn.Module):
    """Next-scale bit predictor with the original's parameter layout.

    Training: `forward` over all scales at once with the block-causal mask. Inference: `forward_scale`
    one scale at a time with a `DecoderKVCache`; both give the same logits.
    """

    block_causal_mask = staticmethod(block_causal_mask)

    def __init__(self, config: VisualDecoderConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        C, ctx = config.embed_dim, config.context_dim
        # transformers' `gradient_checkpointing_enable` (on the whole model) finds this flag, sets it and replaces
        # `_gradient_checkpointing_func` with its own `checkpoint` partial (so its kwargs and offloading apply here)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func: Callable[..., Any] = partial(checkpoint, use_reentrant=False)

        self.cfg_uncond = nn.Parameter(torch.zeros(config.cfg_uncond_length, ctx))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(ctx, config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(ctx, C, bf16_inputs=config.cross_attention_bf16)
        # Infinity's text-to-context MLP: VARGPT never calls it, but the checkpoint holds its weights.
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ctx, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(config.num_scale_levels, C)
        self.word_embed = nn.Linear(config.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.head_nm = AdaLNBeforeHead(C, C, config.norm_eps)
        self.head = nn.Linear(C, 2 * config.bits)

        hidden = ffn_hidden_size(C, config.mlp_ratio, config.ffn_hidden_multiple)
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        blocks = [
            DecoderBlock(C, config.num_heads, hidden, config.norm_eps, rate, config.cross_attention_bf16)
            for rate in rates
        ]
        per_chunk = config.depth // config.num_block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk(blocks[start : start + per_chunk]) for start in range(0, config.depth, per_chunk)
        )
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    # initialisation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Infinity's from-scratch initialisation (`init_weights` + `special_init` + module defaults)."""
        config, C = self.config, self.config.embed_dim
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=config.init_std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=config.init_std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, CosineSelfAttention):
                module.scale_mul_1H11.fill_(math.log(4.0))
                module.q_bias.zero_()
                module.v_bias.zero_()
            elif isinstance(module, CrossAttention):
                module.v_bias.zero_()
                if module.pooled:
                    nn.init.trunc_normal_(module.mat_q, std=math.sqrt(1 / module.dim / 3))

        generator = torch.Generator().manual_seed(_CFG_UNCOND_SEED)
        uncond = torch.empty(self.cfg_uncond.shape, device="cpu")
        nn.init.trunc_normal_(uncond, std=_CFG_UNCOND_STD, generator=generator)
        self.cfg_uncond.copy_(uncond / config.context_dim**0.5)
        nn.init.trunc_normal_(self.pos_start, std=math.sqrt(1 / C / 3))

        self.head_nm.ada_lin[-1].weight.mul_(config.ada_init_scale)
        self.head.weight.mul_(config.head_init_scale)
        proj_scale = 1 / math.sqrt(2 * config.depth)
        for block in self.blocks:
            block.ada_gss.normal_().div_(C**0.5).mul_(config.ada_init_scale)
            block.sa.proj.weight.mul_(proj_scale)
            block.ca.proj.weight.mul_(proj_scale)
            block.ffn.fc2.weight.mul_(proj_scale)

    @property
    def blocks(self) -> list[DecoderBlock]:
        """All blocks in order, across chunks."""
        return [block for chunk in self.block_chunks for block in chunk.module]

    # ----------------------------------------------------------------------------------------------
    # inputs and condition

    def uncond_tokens(self, batch_size: int, length: int) -> torch.Tensor:
        """The first `length` rows of `cfg_uncond`, [batch_size, length, context_dim].

        The unconditional stand-in for the condition embedding (length 1) and, in the original CFG
        branch, for the cross-attention context (length = prompt tokens, used raw, unprojected).
        """
        if not 0 < length <= self.config.cfg_uncond_length:
            raise ValueError(
                f"need {length} unconditional tokens but cfg_uncond has {self.config.cfg_uncond_length} rows"
            )
        return self.cfg_uncond[:length].unsqueeze(0).expand(batch_size, -1, -1)

    def condition(
        self,
        embedding_BLC: torch.Tensor,
        mask_BL: torch.Tensor | None = None,
        drop_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AdaLN condition cond_BD = text_proj_for_sos(text_norm(embedding)), attentive pooling over L.

        VARGPT passes the `sos_embedding` row of `<|image_gen_start|>` ([B, 1, context_dim]). `drop_B`
        (bool [B]) replaces a sample's embedding by `cfg_uncond[:L]` first: condition dropout, drawn by
        the caller so that two forwards can share it.
        """
        if embedding_BLC.ndim != 3 or embedding_BLC.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"condition embedding must be [B, L, {self.config.context_dim}], got {tuple(embedding_BLC.shape)}"
            )
        B, L, _ = embedding_BLC.shape
        if drop_B is not None:
            if drop_B.shape != (B,):
                raise ValueError(f"drop_B must be shaped [{B}], got {tuple(drop_B.shape)}")
            uncond = self.uncond_tokens(B, L).to(embedding_BLC.dtype)
            embedding_BLC = torch.where(drop_B.bool()[:, None, None], uncond, embedding_BLC)
        return self.text_proj_for_sos(self.text_norm(embedding_BLC), mask_BL)

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The first-scale input (SOS) cond + pos_start, [B, 1, C]."""
        return cond_BD.unsqueeze(1) + self.pos_start

    def embed_inputs(self, x_BLd: torch.Tensor) -> torch.Tensor:
        """Next-scale inputs (bits-dimensional codes) to decoder width: `word_embed`, [B, L, C]."""
        if x_BLd.shape[-1] != self.config.bits:
            raise ValueError(f"next-scale inputs must end in {self.config.bits} channels, got {tuple(x_BLd.shape)}")
        return self.word_embed(x_BLd)

    # ----------------------------------------------------------------------------------------------
    # forward passes

    def forward(
        self,
        h_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        context_BNC: torch.Tensor,
        context_mask_BN: torch.Tensor | None,
        schedule: Sequence[Sequence[int]] | Schedule,
    ) -> torch.Tensor:
        """Training path over all scales at once (block-causal self-attention); logits [B, L, d, 2].

        A `Schedule` brings its own 2D RoPE reference grid; a plain list of grids gets the template's."""
        grids = as_grids(schedule, self.config.num_scale_levels)
        self._check_inputs(h_BLC, cond_BD, context_BNC, context_mask_BN, token_count(grids))
        device = h_BLC.device
        x_BLC = h_BLC + self.lvl_embed(scale_token_ids(grids, device)).to(h_BLC.dtype)
        positions = schedule_positions(schedule, self.config.rope_max_grid, device)  # `as_grids` checked it
        cos_Lp, sin_Lp = rope_cos_sin(positions, self.head_dim, self.config.rope_theta, h_BLC.dtype)
        attn_mask_LL = block_causal_mask(grids, device)
        shared_gss = self._shared_gss(cond_BD)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            args = (x_BLC, shared_gss, cos_Lp, sin_Lp, context_BNC, context_mask_BN, attn_mask_LL)
            if recompute:
                x_BLC, _, _ = self._gradient_checkpointing_func(block, *args)
            else:
                x_BLC, _, _ = block(*args)
        return self._logits(x_BLC, cond_BD)

    def forward_scale(
        self,
        h_BlC: torch.Tensor,
        cond_BD: torch.Tensor,
        context_BNC: torch.Tensor,
        context_mask_BN: torch.Tensor | None,
        schedule: Sequence[Sequence[int]] | Schedule,
        scale_index: int,
        cache: DecoderKVCache,
        *,
        run_block: Callable[..., Any] | None = None,
    ) -> torch.Tensor:
        """Inference for one scale; logits [B, l, d, 2].

        `run_block(block, *inputs)` runs one block (default: calls it); generation's fast path passes a
        `torch.compile`d one, so what is compiled takes tensors only and not the scale bookkeeping here.

        Appends this scale's self-attention keys/values to `cache` (which must hold exactly the scales
        before `scale_index`); its tokens attend to every cached token and to each other, unmasked. The
        context keys/values are projected at scale 0 and reused from the cache afterwards.
        """
        grids = as_grids(schedule, self.config.num_scale_levels)
        if not 0 <= scale_index < len(grids):
            raise ValueError(f"scale_index {scale_index} is outside the {len(grids)}-scale schedule")
        if scale_index != cache.num_scales:
            raise ValueError(
                f"the KV cache holds {cache.num_scales} scales, so the next one is {cache.num_scales}, "
                f"not {scale_index} (reset the cache to start a new image)"
            )
        grid = grids[scale_index]
        self._check_inputs(h_BlC, cond_BD, context_BNC, context_mask_BN, grid[0] * grid[1])
        cache.check_batch(h_BlC.shape[0])
        device = h_BlC.device
        x_BlC = h_BlC + self.lvl_embed.weight[scale_index].to(h_BlC.dtype)
        positions = scale_positions(grid, schedule_reference(schedule, self.config.rope_max_grid), device)
        cos_lp, sin_lp = rope_cos_sin(positions, self.head_dim, self.config.rope_theta, h_BlC.dtype)
        shared_gss = self._shared_gss(cond_BD)
        if scale_index == 0:
            cache.context_mask_BN = context_mask_BN
        for layer, block in enumerate(self.blocks):
            cached_kv = cache.context_kv(layer)
            context = context_BNC if cached_kv is None else cached_kv
            args = (x_BlC, shared_gss, cos_lp, sin_lp, context, cache.context_mask_BN, None, cache.self_kv(layer))
            x_BlC, present_kv, context_kv = block(*args) if run_block is None else run_block(block, *args)
            cache.set_self_kv(layer, present_kv)
            if cached_kv is None:
                cache.set_context_kv(layer, context_kv)
        cache.advance(grid[0] * grid[1])
        return self._logits(x_BlC, cond_BD)

    # ----------------------------------------------------------------------------------------------
    # helpers

    @property
    def head_dim(self) -> int:
        return self.config.embed_dim // self.config.num_heads

    def _shared_gss(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Shared AdaLN output, [B, 1, 6, C] (gamma1, gamma2, scale1, scale2, shift1, shift2)."""
        return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)

    def _logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.head_nm(x_BLC, cond_BD))
        return logits.view(*x_BLC.shape[:2], self.config.bits, 2)

    def _check_inputs(
        self,
        h_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        context_BNC: torch.Tensor,
        context_mask_BN: torch.Tensor | None,
        num_tokens: int,
    ) -> None:
        C = self.config.embed_dim
        if h_BLC.ndim != 3 or h_BLC.shape[1:] != (num_tokens, C):
            raise ValueError(
                f"decoder input must be [B, {num_tokens}, {C}] for this schedule, got {tuple(h_BLC.shape)}"
            )
        B = h_BLC.shape[0]
        if cond_BD.shape != (B, C):
            raise ValueError(f"cond_BD must be [{B}, {C}], got {tuple(cond_BD.shape)}")
        if context_BNC.ndim != 3 or context_BNC.shape[0] != B or context_BNC.shape[2] != C:
            raise ValueError(f"context must be [{B}, N, {C}], got {tuple(context_BNC.shape)}")
        if context_mask_BN is not None:
            if context_mask_BN.dtype != torch.bool or context_mask_BN.shape != context_BNC.shape[:2]:
                raise ValueError(
                    f"context mask must be bool {tuple(context_BNC.shape[:2])}, got "
                    f"{context_mask_BN.dtype} {tuple(context_mask_BN.shape)}"
                )
            if not bool(context_mask_BN.any(dim=1).all()):
                raise ValueError("every sample needs at least one real context token (context mask row all False)")
