"""The LLM side of decoding: one KV cache over a batch of rows, which cache slots are real, the next positions.

Both loops drive it: the text loop feeds one token per row per step, the scale loop feeds a scale's tokens per
call with its own masks and positions, and afterwards records the image block as history of the rows that drew.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..llm_cache import cache_kwargs
from .static_cache import FastDecoding, compiled, padded_mask, static_copy


class DecodingState:
    """What the loops track per row: cache, which cache slots are real, and the next text position.

    With `fast.static_cache` the prefill still runs eagerly on a `DynamicCache`, whose keys/values then move
    into a `StaticCache` of `capacity` slots (grown by copying if an answer outruns it)."""

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        fast: FastDecoding | None = None,
        capacity: int = 0,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.fast = fast or FastDecoding()
        self.cache = DynamicCache(config=model.config.text_config)
        self.batch, length = input_ids.shape
        self.device = input_ids.device
        self.mask_BT = attention_mask.to(torch.long)
        last_hidden_BLH, deltas = self._prefill(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        # hidden states are kept as chunks and joined only when an image needs its context, so a long
        # answer does not re-copy its whole history at every token
        self._hidden_chunks: list[torch.Tensor] = [last_hidden_BLH]
        self.dtype = last_hidden_BLH.dtype
        self.logits_BV = model.lm_head(last_hidden_BLH[:, -1]).float()
        self.next_pos_B = (deltas[:, 0] + length).to(self.device)
        self.cache_len = length
        self.capacity = max(capacity, length)
        if self.fast.static_cache:
            self.cache = self._static(torch.arange(self.batch, device=self.device), self.capacity)
        self._llm = compiled(model.model, self.fast, self.device)

    def _prefill(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """The prompt through the LLM (eagerly, on the dynamic cache): `(last_hidden_BLH, rope_deltas_B1)`."""
        model = self.model
        embeds = model.model.embed_tokens(input_ids)
        if pixel_values is not None or pixel_values_videos is not None:
            embeds = model.embed_understanding_images(
                embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        positions, deltas = model.forward_position_ids(
            input_ids,
            attention_mask_BL=attention_mask,
            image_grid_thw_N3=image_grid_thw,
            positions="mrope",
            video_grid_thw_N3=video_grid_thw,
        )
        out = model.model(
            inputs_embeds=embeds,
            attention_mask=self.mask_BT,
            position_ids=positions,
            **cache_kwargs(self.cache),
            use_cache=True,
        )
        return out.last_hidden_state, deltas

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

    def step(self, embeds_BlH, real_B, positions_3Bl=None):
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

    def embed_tokens(self, ids_B: torch.Tensor) -> torch.Tensor:
        """One token per row as LLM input embeddings `[B, 1, H]`."""
        return self.model.model.embed_tokens(ids_B).unsqueeze(1)

    def feed_tokens(self, ids_B: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
        """One text token per row; returns the next token's logits `[B, V]` (float32) of every row."""
        hidden = self.step(self.embed_tokens(ids_B), real_B)
        return self.model.lm_head(hidden[:, -1]).float()

    # -- the scale loop's calls --------------------------------------------------------------------------
    def scale_positions(self, position_mode: str, fed: int, n: int) -> torch.Tensor:
        """Rotary positions `[B, n]` of a scale's tokens, `fed` tokens into the image block: the rows' next text
        positions ("mrope") or the raw cache index ("cache"). The block is not in `mask_BT` while it runs."""
        B = self.batch
        offs = torch.arange(fed, fed + n, device=self.device)
        if position_mode == "cache":
            return (self.length + offs).view(1, n).expand(B, n)
        return self.next_pos_B.view(B, 1) + offs.view(1, n)

    def scale_call(self, x_BlH: torch.Tensor, fed: int, position_mode: str) -> torch.Tensor:
        """One LLM call over a scale's tokens, for rows that see their whole history and the block so far."""
        B, n = x_BlH.shape[:2]
        prefix_mask = self.mask_BT
        mask = torch.cat([prefix_mask, torch.ones(B, fed + n, dtype=prefix_mask.dtype, device=self.device)], dim=1)
        positions_Bn = self.scale_positions(position_mode, fed, n)
        return self.forward_llm(x_BlH, mask, positions_Bn.unsqueeze(0).expand(3, B, n))

    def record_image_block(self, rows_B: torch.Tensor, num_tokens: int) -> None:
        """The scale tokens (already in the cache) become history of the rows that drew (`rows_B`) and are
        masked out of the others'; their hidden states are never read as context, so zeros stand in."""
        B = self.batch
        real = rows_B.long().view(B, 1)
        width = self._hidden_chunks[-1].shape[-1]
        self.mask_BT = torch.cat([self.mask_BT, real.expand(B, num_tokens)], dim=1)
        self.append_hidden(torch.zeros(B, num_tokens, width, dtype=self.dtype, device=self.device))
        self.next_pos_B = self.next_pos_B + rows_B.long() * num_tokens
