"""Multimodal rotary positions (M-RoPE) of Qwen2-VL, computed for our own token layout.

Text tokens take one position shared by the three sections (temporal, height, width); the merged patches
of an understanding image or video take (t, row, column) offsets from the position that follows the preceding
text, t being the temporal patch (a pair of frames) of a video and 0 for an image. Text after a vision block
continues one past the block's largest position, as Qwen2-VL's reference code does. (transformers 5's
`get_rope_index` continues at start + max(h, w) / merge instead, which differs only for a video with more temporal
patches than merged rows and columns, and disagrees there with its own `rope_deltas`.)
Left padding takes position 1 (as Qwen2-VL does) and never influences real tokens because it is masked.
We compute this ourselves (rather than through `Qwen2VLModel.get_rope_index`) because our model holds the
LLM as a bare `Qwen2VLTextModel` under the original checkpoint's `model.*` names.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None,
    image_grid_thw_N3: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    video_grid_thw_N3: torch.Tensor | None = None,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(position_ids_3BL, rope_deltas_B1)`.

    Images and videos are matched to their grids in reading order (row by row), each kind with its own list.

    `rope_deltas` is what turns a plain cache index into the M-RoPE text position of later tokens:
    position = cache_index + delta (negative when images compressed the position range).
    """
    B, L = input_ids_BL.shape
    device = input_ids_BL.device
    if attention_mask_BL is None:
        attention_mask_BL = torch.ones_like(input_ids_BL)
    positions_3BL = torch.ones(3, B, L, dtype=torch.long, device=device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=device)
    grids = {
        image_token_id: (image_grid_thw_N3.tolist() if image_grid_thw_N3 is not None else [], "image"),
    }
    if video_token_id is not None:
        grids[video_token_id] = (video_grid_thw_N3.tolist() if video_grid_thw_N3 is not None else [], "video")
    elif video_grid_thw_N3 is not None:
        raise ValueError("video_grid_thw needs video_token_id")
    used = dict.fromkeys(grids, 0)
    for b in range(B):
        real = attention_mask_BL[b].bool()
        ids = input_ids_BL[b][real].tolist()
        row: list[torch.Tensor] = []
        start = 0
        i = 0
        while i < len(ids):
            if ids[i] in grids:
                token_id = ids[i]
                kind_grids, kind = grids[token_id]
                if used[token_id] >= len(kind_grids):
                    raise ValueError(f"more {kind} placeholder blocks than entries in {kind}_grid_thw")
                t, h, w = kind_grids[used[token_id]]
                used[token_id] += 1
                h, w = h // spatial_merge_size, w // spatial_merge_size
                count = t * h * w
                if ids[i : i + count] != [token_id] * count:
                    raise ValueError(
                        f"an {kind} of grid {t}x{h}x{w} needs {count} consecutive {kind} tokens in row {b}"
                    )
                tt = torch.arange(t, device=device).view(t, 1, 1).expand(t, h, w).reshape(-1)
                hh = torch.arange(h, device=device).view(1, h, 1).expand(t, h, w).reshape(-1)
                ww = torch.arange(w, device=device).view(1, 1, w).expand(t, h, w).reshape(-1)
                row.append(torch.stack([tt, hh, ww]) + start)
                start = int(row[-1].max()) + 1
                i += count
            else:
                j = i
                while j < len(ids) and ids[j] not in grids:
                    j += 1
                span = torch.arange(start, start + (j - i), device=device)
                row.append(span.view(1, -1).expand(3, -1))
                start += j - i
                i = j
        if row:
            positions_3BL[:, b, real] = torch.cat(row, dim=1)
            deltas[b, 0] = start - L
        else:
            deltas[b, 0] = -L
    return positions_3BL, deltas


# Positions `forward` gives the LLM when it is passed no `position_ids`: "mrope" = `mrope_positions` (what
# Qwen2-VL's `get_rope_index` and every `generate` prefill use); "sequential" = the cache index in all three
# sections, what the original's `forward` (inference and training) gets from transformers 4.46.
FORWARD_POSITIONS = ("mrope", "sequential")


def sequential_positions(
    batch_size: int, length: int, device: torch.device, past_length: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(position_ids_3BL, rope_deltas_B1)` of 1-D positions: `past_length + arange(length)` in every
    M-RoPE section and every row, left padding or not, which is what Qwen2-VL's text model computes when it is
    given no position ids. The deltas are zero: later tokens continue at their cache index."""
    positions_L = torch.arange(past_length, past_length + length, device=device)
    positions_3BL = positions_L.view(1, 1, -1).expand(3, batch_size, -1)
    return positions_3BL, torch.zeros(batch_size, 1, dtype=torch.long, device=device)
