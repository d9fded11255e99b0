"""Scene-reading pretraining of the ViT: what a pretrained vision encoder brings to the full model.

VARGPT-v1.1 starts from Qwen2-VL, whose ViT has already learned to see; a model trained from scratch on the
shapes world has to learn seeing and language grounding at once from a few thousand question answers, and its
ViT stays close to blind to shape and position. This step gives the tiny model what the full one inherits: the
ViT (blocks and merger, the same weights the LLM reads) is trained so that each merged token says what stands
in its cell of the 3 x 3 grid (nothing or one of the shapes, colour, size) and what the background is, through a
linear head that is thrown away afterwards. The renderer knows each scene exactly, so the labels are exact.

With `position_target`, each token must also say which cell it lies in. The ViT's rotary positions are relative,
so a token can tell where it is only from the edges of the grid, and untaught it hardly does: in the shapes recipe
trained without this target, a linear probe read the cell of 0.17 of held-out source-image tokens from the ViT's
output after the editing stage (chance 0.11; 0.40 from the LLM's states as the decoder receives them). A decoder
that redraws a source scene (editing) cross-attends to those states, and must know which cell each one shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments, set_seed

from ..shapes.scene import GRID_SIZE, Scene, ShapesWorldConfig, all_cells
from .resume import CompleteCheckpointCallback
from .stage_trainer import train_resuming
from .trainer import VARGPTTrainer

IGNORE = -100


class SceneLabels:
    """Class indices of a world's scenes: per cell the occupant (0 = empty, then the shapes), colour and size
    (IGNORE where the cell is empty), and the background."""

    def __init__(self, config: ShapesWorldConfig) -> None:
        self.shapes = ("empty", *config.shapes)
        self.colours = tuple(name for name, _ in config.palette)
        self.sizes = tuple(name for name, _ in config.sizes)
        self.backgrounds = tuple(config.backgrounds)

    def encode(self, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        """`occupant`, `colour`, `size` `[B, cells]` and `background` `[B]`, as long tensors."""
        cells = all_cells()
        occupant = torch.zeros(len(scenes), len(cells), dtype=torch.long)
        colour = torch.full_like(occupant, IGNORE)
        size = torch.full_like(occupant, IGNORE)
        for b, scene in enumerate(scenes):
            for obj in scene.objects:
                c = cells.index(obj.cell)
                occupant[b, c] = self.shapes.index(obj.shape)
                colour[b, c] = self.colours.index(obj.colour)
                size[b, c] = self.sizes.index(obj.size)
        background = torch.tensor([self.backgrounds.index(s.background) for s in scenes], dtype=torch.long)
        return {"occupant": occupant, "colour": colour, "size": size, "background": background}


def cells_aligned(grid_h: int, grid_w: int) -> bool:
    """Whether a grid of merged tokens tiles the scene's cells exactly (each cell a whole block of tokens).

    Where it does not, a token straddling two cells is labelled with the cell its centre lies in while it shows
    part of the next one too, and the labels contradict what the token sees: at 224 px (8 x 8 tokens over 3 x 3
    cells) the shapes recipe's ViT read 0.29 of held-out scenes exactly, at 168 px (6 x 6 tokens) all of them.
    """
    return grid_h % GRID_SIZE == 0 and grid_w % GRID_SIZE == 0


def token_cells(grid_h: int, grid_w: int) -> torch.Tensor:
    """`[grid_h * grid_w]` index of the scene cell each merged token's centre lies in (raster order)."""
    rows = ((torch.arange(grid_h) + 0.5) * GRID_SIZE / grid_h).long()
    cols = ((torch.arange(grid_w) + 0.5) * GRID_SIZE / grid_w).long()
    return (rows[:, None] * GRID_SIZE + cols[None, :]).flatten()


class SceneReadingHead(nn.Module):
    """A linear read-out of every merged token on its own: what stands in the cell the token lies in (occupant,
    colour, size) and the background.

    Per token, not per image: the LLM later finds "the square in the top left" by attending to tokens at that
    place, so each token should say what it shows in directions a linear map can read.
    """

    def __init__(self, width: int, labels: SceneLabels, position_target: bool = False) -> None:
        super().__init__()
        classes = {
            "occupant": len(labels.shapes),
            "colour": len(labels.colours),
            "size": len(labels.sizes),
            "background": len(labels.backgrounds),
        }
        if position_target:
            classes["cell"] = GRID_SIZE * GRID_SIZE
        self.names, self.splits = tuple(classes), tuple(classes.values())
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, sum(self.splits))

    def forward(self, tokens_BTD: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.out(self.norm(tokens_BTD)).split(self.splits, dim=-1), strict=True))


class VisionPretrainingModel(nn.Module):
    """`model.visual` plus a scene-reading head, in `Trainer`'s shape: `forward(**batch) -> {"loss", ...}`.

    All images of a batch must have one size (the recipe's fixed ViT input), so every image has the same grid of
    merged tokens.
    """

    def __init__(self, visual: nn.Module, width: int, labels: SceneLabels, position_target: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.merge = visual.config.spatial_merge_size
        self.head = SceneReadingHead(width, labels, position_target)

    def token_grid(self, image_grid_thw: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of merged tokens of a batch's images (all of one size)."""
        if image_grid_thw.shape[0] > 1 and not (image_grid_thw == image_grid_thw[0]).all():
            raise ValueError(f"vision pretraining needs one image size per batch, got grids {image_grid_thw.tolist()}")
        _, h, w = (int(v) for v in image_grid_thw[0])
        return h // self.merge, w // self.merge

    def read(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-token logits `[B, T, classes]` and the cell of each token `[T]`."""
        cells_T = token_cells(*self.token_grid(image_grid_thw)).to(pixel_values.device)
        features = self.visual(pixel_values, grid_thw=image_grid_thw)
        tokens = getattr(features, "pooler_output", features)
        return self.head(tokens.reshape(image_grid_thw.shape[0], cells_T.shape[0], -1)), cells_T

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        occupant: torch.Tensor,
        colour: torch.Tensor,
        size: torch.Tensor,
        background: torch.Tensor,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        logits, cells_T = self.read(pixel_values, image_grid_thw)
        B, T = logits["background"].shape[:2]
        targets = {
            "occupant": occupant[:, cells_T],
            "colour": colour[:, cells_T],
            "size": size[:, cells_T],
            "background": background[:, None].expand(B, T),
        }
        if "cell" in logits:
            targets["cell"] = cells_T[None, :].expand(B, T)
        losses = {
            name: F.cross_entropy(logits[name].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE)
            for name, target in targets.items()
        }
        loss = sum(losses.values())
        return {"loss": loss, **{f"{k}_loss": v.detach() for k, v in losses.items()}}


@torch.no_grad()
def reading_accuracy(model: VisionPretrainingModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Shares read right on held-out scenes, each cell judged by the mean logits of its tokens: occupant per
    cell, colour and size per occupied cell, background per image, `scene` (every cell and the background right:
    the scene read exactly); with a position target also `cell`, the share of tokens that name their own cell."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits, cells_T = model.read(batch["pixel_values"], batch["image_grid_thw"])
    to_cells_TK = F.one_hot(cells_T, GRID_SIZE * GRID_SIZE).float()
    to_cells_TK = to_cells_TK / to_cells_TK.sum(0, keepdim=True).clamp(min=1)
    predicted = {
        k: torch.einsum("btc,tk->bkc", logits[k].float(), to_cells_TK).argmax(-1)
        for k in ("occupant", "colour", "size")
    }
    occupied = batch["colour"] != IGNORE
    right = {k: predicted[k] == batch[k] for k in ("occupant", "colour", "size")}
    cells_right = right["occupant"] & (~occupied | (right["colour"] & right["size"]))
    background_right = logits["background"].float().mean(1).argmax(-1) == batch["background"]
    shares = {
        "occupant": right["occupant"].float().mean().item(),
        "colour": right["colour"][occupied].float().mean().item(),
        "size": right["size"][occupied].float().mean().item(),
        "background": background_right.float().mean().item(),
        "scene": (cells_right.all(dim=1) & background_right).float().mean().item(),
    }
    if "cell" in logits:
        shares["cell"] = (logits["cell"].argmax(-1) == cells_T[None, :]).float().mean().item()
    return shares


class RenderedScenes(torch.utils.data.Dataset):
    """Scenes and their pictures, kept as small PIL images; the collator turns them into ViT inputs."""

    def __init__(self, scenes: Sequence[Scene], images: Sequence[Any]) -> None:
        if len(scenes) != len(images):
            raise ValueError(f"{len(scenes)} scenes but {len(images)} images")
        self.scenes, self.images = list(scenes), list(images)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"scene": self.scenes[index], "image": self.images[index]}


class SceneReadingCollator:
    """Rows of `RenderedScenes` to `pixel_values`, `image_grid_thw` (the processor's own image path, so the ViT
    sees exactly what it sees in understanding prompts) and the scene labels."""

    def __init__(self, image_processor: Any, labels: SceneLabels) -> None:
        self.image_processor = image_processor
        self.labels = labels

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=[r["image"] for r in rows], return_tensors="pt")
        return {
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
            **self.labels.encode([r["scene"] for r in rows]),
        }


@dataclass(frozen=True)
class SceneReadingRun:
    """What `pretrain_scene_reading` did: its trainer (losses in `state.log_history`), the merged-token grid, and
    the held-out reading shares before and after training."""

    trainer: VARGPTTrainer
    token_grid: tuple[int, int]
    before: dict[str, float]
    after: dict[str, float]


def pretrain_scene_reading(
    visual: nn.Module,
    width: int,
    collator: SceneReadingCollator,
    train: RenderedScenes,
    validation: RenderedScenes,
    args: TrainingArguments,
    *,
    position_target: bool = False,
) -> SceneReadingRun:
    """Train `visual` in place to read `train`'s scenes through a throw-away head, measured on `validation`
    before and after (resuming from the newest complete checkpoint in `args.output_dir`)."""
    validation_batch = collator([validation[i] for i in range(len(validation))])
    # seeded here: the head's initial weights must not depend on what ran before in this process (a step that
    # trained here moves the global random state; the same step loaded from disk does not)
    set_seed(args.seed)
    wrapper = VisionPretrainingModel(visual, width, collator.labels, position_target=position_target)
    grid = wrapper.token_grid(validation_batch["image_grid_thw"])
    wrapper.eval()
    before = reading_accuracy(wrapper, validation_batch)
    wrapper.train()
    trainer = VARGPTTrainer(
        model=wrapper, args=args, train_dataset=train, data_collator=collator, callbacks=[CompleteCheckpointCallback()]
    )
    train_resuming(trainer, args.output_dir)
    wrapper.eval()
    return SceneReadingRun(trainer, grid, before, reading_accuracy(wrapper, validation_batch))
