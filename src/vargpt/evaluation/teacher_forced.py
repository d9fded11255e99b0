"""How well a model predicts held-out images, scale by scale, under teacher forcing.

Sampling-based scores (GenEval, the shapes evaluation) move in steps and need many samples; the bit
cross-entropy and bit error rate of every scale, given the true earlier scales, move with every training
step. So they tell early whether a stage is learning what it should, and which scales it gets wrong: coarse
scales carry the layout, fine ones the detail. With `swap`, each row's understanding images or prompt are
rotated to the next row's, which measures how much the prediction depends on them: an editing model whose
loss does not rise when it sees another source image is not reading the source.

Teacher forcing here is exact: no bitwise self-correction noise and no condition dropout, the model in eval
mode, generation targets resized to the resolution without cropping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collator import SFTCollator

SWAPS = ("none", "images", "prompts")


@dataclass(frozen=True)
class ScaleFit:
    """One scale's fit: mean per-bit cross-entropy (nats) and the share of bits whose likelier value is wrong."""

    grid: tuple[int, int]
    cross_entropy: float
    bit_error: float


def swapped_rows(rows: Sequence[Mapping[str, Any]], swap: str) -> list[dict[str, Any]]:
    """Rows whose understanding images (`swap="images"`) or user turns (`"prompts"`) come from the next row,
    cyclically; generation targets stay. Rows must agree in how many understanding images they hold, so that
    the swapped ones still match their placeholders."""
    if swap not in SWAPS:
        raise ValueError(f"unknown swap {swap!r}; choose one of {SWAPS}")
    rows = [dict(row) for row in rows]
    if swap == "none":
        return rows
    if len(rows) < 2:
        raise ValueError(f"swap={swap!r} needs at least two rows to rotate")
    counts = {len(row["images"]) for row in rows}
    if len(counts) != 1:
        raise ValueError(f"swap={swap!r} needs rows with the same number of understanding images, got {sorted(counts)}")
    if swap == "images" and counts == {0}:
        raise ValueError("swap='images' needs rows with understanding images (<image>); these rows have none")
    shifted = rows[1:] + rows[:1]
    if swap == "images":
        return [{**row, "images": other["images"]} for row, other in zip(rows, shifted, strict=True)]
    return [_with_user_turns_of(row, other) for row, other in zip(rows, shifted, strict=True)]


def _with_user_turns_of(row: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    mine = [m for m in row["messages"] if m["role"] == "user"]
    theirs = [m for m in other["messages"] if m["role"] == "user"]
    if len(mine) != len(theirs):
        raise ValueError("swap='prompts' needs rows with the same number of user turns")
    replacement = iter(theirs)
    messages = [dict(next(replacement)) if m["role"] == "user" else dict(m) for m in row["messages"]]
    return {**row, "messages": messages}


@torch.no_grad()
def teacher_forced_fit(
    model: Any,
    processor: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    resolution: int | None = None,
    batch_size: int = 16,
    swap: str = "none",
    positions: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-scale fit of the rows' generation targets (rows as `load_sft_dataset` gives them). Rows without an
    `<image_gen>` target (understanding rows) are left out and counted in `rows_without_target`.
    `positions` ("mrope" / "sequential", default the model's `config.forward_positions`) picks the LLM's
    rotary positions; they matter for rows holding understanding images (editing).

    Returns `{"rows", "rows_without_target", "images", "swap", "resolution", "image_loss", "cross_entropy",
    "bit_error", "scales"}`:
    `image_loss` is the model's own image loss (its per-scale token weights) averaged over images;
    `cross_entropy` and `bit_error` weigh every token alike; `scales` lists a `ScaleFit` dict per scale,
    coarsest first.
    """
    from tqdm.auto import tqdm

    from ..visual_decoder.loss import bit_cross_entropy

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scored = [row for row in rows if row.get("gen_images")]
    if not scored:
        raise ValueError(f"none of the {len(rows)} rows has a generation target (<image_gen>): nothing to score")
    skipped = len(rows) - len(scored)
    rows = swapped_rows(scored, swap)
    resolution = resolution or model.config.image_resolution
    schedule = model.generation_schedule(resolution)
    collate = SFTCollator(
        processor,
        image_gen_resolution=resolution,
        num_image_gen_pad_tokens=model.num_image_gen_pad_tokens(schedule),
        max_length=model.config.text_config.max_position_embeddings,
        resize_ratio=1.0,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_token_ce, per_token_error, image_losses = [], [], []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="teacher-forced fit", disable=not progress):
            batch = collate(rows[start : start + batch_size])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch, image_noise=False, positions=positions)
            logits_NLd2, bits_NLd = out.image_logits.float(), out.image_labels.long()
            per_bit = F.cross_entropy(logits_NLd2.reshape(-1, 2), bits_NLd.reshape(-1), reduction="none")
            per_token_ce.append(per_bit.view(bits_NLd.shape).mean(-1).cpu())
            per_token_error.append((logits_NLd2.argmax(-1) != bits_NLd).float().mean(-1).cpu())
            image_losses.append(
                bit_cross_entropy(
                    logits_NLd2, bits_NLd, schedule, weighting=model.config.image_loss_scale_weighting, reduction="none"
                ).cpu()
            )
    finally:
        model.train(was_training)
    ce_NL, error_NL = torch.cat(per_token_ce), torch.cat(per_token_error)
    scales, offset = [], 0
    for h, w in schedule:
        span = slice(offset, offset + h * w)
        scales.append(ScaleFit((h, w), float(ce_NL[:, span].mean()), float(error_NL[:, span].mean())))
        offset += h * w
    return {
        "rows": len(rows),
        "rows_without_target": skipped,
        "images": int(ce_NL.shape[0]),
        "swap": swap,
        "resolution": resolution,
        "image_loss": float(torch.cat(image_losses).mean()),
        "cross_entropy": float(ce_NL.mean()),
        "bit_error": float(error_NL.mean()),
        "scales": [asdict(scale) for scale in scales],
    }


def format_fit(report: Mapping[str, Any]) -> str:
    """A small table of a `teacher_forced_fit` report, one line per scale."""
    lines = [
        f"{report['rows']} rows, {report['images']} images at {report['resolution']} px, swap={report['swap']}: "
        f"image loss {report['image_loss']:.4f}, bit error {report['bit_error']:.3f}"
        + (
            f" ({report['rows_without_target']} rows without a target left out)"
            if report["rows_without_target"]
            else ""
        ),
        "scale     bit CE   bit error",
    ]
    for scale in report["scales"]:
        h, w = scale["grid"]
        lines.append(f"{f'{h}x{w}':<9} {scale['cross_entropy']:.4f}   {scale['bit_error']:.3f}")
    return "\n".join(lines)
