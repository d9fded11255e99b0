"""How well a model predicts held-out images, scale by scale, under teacher forcing.

Sampling-based scores (GenEval, the shapes evaluation) move in steps and need many samples; the bit
cross-entropy and bit error rate of every scale, given the true earlier scales, move with every training
step. So they tell early whether a stage is learning what it should, and which scales it gets wrong: coarse
scales carry the layout, fine ones the detail. With `swap`, each row's understanding images or prompt are
rotated to the next row's, which measures how much the prediction depends on them: an editing model whose
loss does not rise when it sees another source image is not reading the source.

Teacher forcing here is exact: no bitwise self-correction noise and no condition dropout, the model in eval
mode, generation targets resized to the resolution without cropping.

Two paths score the same targets. `through="forward"` (the default) is the training forward, one pass with the
block-causal mask, so `image_loss` is the model's own training loss and `positions="sequential"` reproduces the
original's training positions. `through="inference"` runs `generate`'s KV-cached scale loop on the targets' bits
(`vargpt.teacher_forcing.score_image`), with the sampler's classifier-free guidance and temperature: its numbers
are the per-bit negative log-likelihood and error of the distribution the sampler draws from (before top-k /
top-p). At cfg 1 and tau 1 with M-RoPE positions the two paths agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collator import SFTCollator
from ..generation.config import POSITION_MODES, UNCOND_MODES, ImageGenerationConfig
from ..rope_index import FORWARD_POSITIONS
from ..schedule import scale_offsets

SWAPS = ("none", "images", "prompts")
THROUGH = ("forward", "inference")


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
    through: str = "forward",
    cfg_scale: float = 1.0,
    tau: float = 1.0,
    uncond_mode: str = "original",
    progress: bool = False,
) -> dict[str, Any]:
    """Per-scale fit of the rows' generation targets (rows as `load_sft_dataset` gives them). Rows without an
    `<image_gen>` target (understanding rows) are left out and counted in `rows_without_target`.
    `through` picks the path (see the module docstring). `positions` picks the LLM's rotary positions; they
    matter for rows holding understanding images (editing): on the forward "mrope" or "sequential" (default the
    model's `config.forward_positions`), on the inference loop "mrope" (default) or "cache" (the original
    inference's). `cfg_scale`, `tau` and `uncond_mode` are the sampler's and apply to the inference loop only;
    that path scores rows holding exactly one generation target (its prompt is the row up to that target's
    `<|image_gen_start|>`).

    Returns `{"rows", "rows_without_target", "images", "swap", "resolution", "through", "positions",
    "cfg_scale", "tau", "uncond_mode", "image_loss", "cross_entropy", "bit_error", "scales"}`:
    `image_loss` is the model's own image loss (its per-scale token weights; on the inference loop, of the
    sampler's logits) averaged over images; `cross_entropy` (the mean per-bit negative log-likelihood, nats)
    and `bit_error` weigh every token alike; `scales` lists a `ScaleFit` dict per scale, coarsest first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    positions = _checked_path(model, through, positions, cfg_scale, tau, uncond_mode)
    image_config = ImageGenerationConfig(
        cfg_scale=cfg_scale,
        tau=tau,
        resolution=resolution,
        uncond_mode=uncond_mode,
        position_mode=positions if through == "inference" else "mrope",
    )
    null_prompt_ids = None
    if through == "inference" and uncond_mode == "null_prompt" and cfg_scale != 1.0:
        null_prompt_ids = processor.null_prompt_ids()
    scored = [row for row in rows if row.get("gen_images")]
    if not scored:
        raise ValueError(f"none of the {len(rows)} rows has a generation target (<image_gen>): nothing to score")
    skipped = len(rows) - len(scored)
    rows = swapped_rows(scored, swap)
    resolution = resolution or model.config.image_resolution
    schedule = model.generation_schedule(resolution)

    def score(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if through == "inference":
            return _inference_logits(model, batch, image_config, null_prompt_ids)
        out = model(**batch, image_noise=False, positions=positions)
        return out.image_logits.float(), out.image_labels.long()

    ce_NL, error_NL, image_loss_N = _per_token_fit(
        model, processor, rows, schedule, resolution, batch_size, score, progress
    )
    return {
        "rows": len(rows),
        "rows_without_target": skipped,
        "images": int(ce_NL.shape[0]),
        "swap": swap,
        "resolution": resolution,
        "through": through,
        "positions": positions,
        "cfg_scale": cfg_scale,
        "tau": tau,
        "uncond_mode": uncond_mode,
        "image_loss": float(image_loss_N.mean()),
        "cross_entropy": float(ce_NL.mean()),
        "bit_error": float(error_NL.mean()),
        "scales": [asdict(scale) for scale in _scale_fits(ce_NL, error_NL, schedule)],
    }


def _per_token_fit(
    model: Any,
    processor: Any,
    rows: Sequence[Mapping[str, Any]],
    schedule: Any,
    resolution: int,
    batch_size: int,
    score: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]],
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token bit cross-entropy and error `[N, L]` and per-image loss `[N]` of the rows' targets, batch by
    batch in eval mode (the model's mode restored after); `score` gives a batch's logits `[N, L, d, 2]` and bits."""
    from tqdm.auto import tqdm

    from ..visual_decoder.loss import bit_cross_entropy

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
            logits_NLd2, bits_NLd = score(batch)
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
    return torch.cat(per_token_ce), torch.cat(per_token_error), torch.cat(image_losses)


def _scale_fits(ce_NL: torch.Tensor, error_NL: torch.Tensor, schedule: Any) -> list[ScaleFit]:
    """The per-token numbers averaged over each scale's span of tokens, coarsest scale first."""
    starts = scale_offsets(schedule)
    scales = []
    for k, (h, w) in enumerate(schedule):
        span = slice(starts[k], starts[k + 1])
        scales.append(ScaleFit((h, w), float(ce_NL[:, span].mean()), float(error_NL[:, span].mean())))
    return scales


def _checked_path(model: Any, through: str, positions: str | None, cfg_scale: float, tau: float, uncond: str) -> str:
    """The positions the path will use, after refusing settings that path does not have."""
    if through not in THROUGH:
        raise ValueError(f"unknown path through={through!r}; choose one of {THROUGH}")
    if through == "forward":
        if (cfg_scale, tau, uncond) != (1.0, 1.0, "original"):
            raise ValueError(
                "cfg_scale, tau and uncond_mode are the sampler's settings: score with through='inference' to use them"
            )
        positions = positions or model.config.forward_positions
        if positions not in FORWARD_POSITIONS:
            raise ValueError(f"positions on the training forward must be one of {FORWARD_POSITIONS}, got {positions!r}")
        return positions
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {uncond!r}")
    positions = positions or "mrope"
    if positions not in POSITION_MODES:
        raise ValueError(
            f"positions on the inference loop must be one of {POSITION_MODES}, got {positions!r} "
            "('sequential' exists on the training forward only)"
        )
    return positions


def _inference_logits(
    model: Any, batch: Mapping[str, torch.Tensor], image_config: ImageGenerationConfig, null_prompt_ids
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's logits and the targets' bits, `[N, L, d, 2]` and `[N, L, d]`, of a collated batch: every row's
    prompt up to its `<|image_gen_start|>` (with the understanding images in it), left padded, through the
    KV-cached scale loop."""
    from ..teacher_forcing import score_image

    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    config = model.config
    starts = (ids_BT == config.image_gen_start_token_id) & mask_BT.bool()
    counts = starts.sum(dim=1)
    if bool((counts != 1).any()):
        row = int((counts != 1).nonzero()[0])
        raise ValueError(
            f"the inference path scores rows with exactly one generation target; a row in this batch (index {row}) "
            f"has {int(counts[row])}: score such rows with through='forward'"
        )
    grids = batch.get("image_grid_thw")
    merge = config.vision_config.spatial_merge_size
    patches = [] if grids is None else grids.prod(dim=-1).tolist()
    first_patch = [sum(patches[:i]) for i in range(len(patches) + 1)]
    prefixes, kept_images, image = [], [], 0
    for b in range(ids_BT.shape[0]):
        real = ids_BT[b][mask_BT[b].bool()]
        start = int((real == config.image_gen_start_token_id).nonzero()[0])
        prefix = real[:start]
        in_prefix = int((prefix == config.image_token_id).sum())
        in_row = int((real == config.image_token_id).sum())
        covered = 0
        while covered < in_row:
            if covered < in_prefix:
                kept_images.append(image)
            covered += patches[image] // merge**2
            image += 1
        if covered != in_row:
            raise ValueError(f"the understanding images of row {b} do not match its {in_row} <|image_pad|> tokens")
        prefixes.append(prefix)
    width = max(p.shape[0] for p in prefixes)
    pad_id = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    prompt_ids = ids_BT.new_full((len(prefixes), width), pad_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    for b, prefix in enumerate(prefixes):
        prompt_ids[b, width - prefix.shape[0] :] = prefix
        prompt_mask[b, width - prefix.shape[0] :] = 1
    images = {}
    if kept_images:
        rows = torch.cat([torch.arange(first_patch[i], first_patch[i + 1]) for i in kept_images])
        images = {"pixel_values": batch["pixel_values"][rows.to(ids_BT.device)], "image_grid_thw": grids[kept_images]}
    scores = score_image(
        model,
        prompt_ids,
        batch["pixel_gen_values"],
        attention_mask=prompt_mask,
        image_config=image_config,
        null_prompt_ids=null_prompt_ids,
        **images,
    )
    return scores.all_logits(), scores.all_bits()


def format_fit(report: Mapping[str, Any]) -> str:
    """A small table of a `teacher_forced_fit` report, one line per scale."""
    lines = [
        f"{report['rows']} rows, {report['images']} images at {report['resolution']} px, swap={report['swap']}, "
        f"{_path_words(report)}: image loss {report['image_loss']:.4f}, bit error {report['bit_error']:.3f}"
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


def _path_words(report: Mapping[str, Any]) -> str:
    if report.get("through", "forward") == "forward":
        return f"training forward ({report.get('positions')} positions)"
    return f"inference loop (cfg {report['cfg_scale']:g}, tau {report['tau']:g}, {report['positions']} positions" + (
        f", {report['uncond_mode']} unconditional branch)" if report["cfg_scale"] != 1.0 else ")"
    )
