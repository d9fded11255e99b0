"""Scene-reading pretraining of the ViT: what a pretrained vision encoder brings to the full model.

VARGPT-v1.1 starts from Qwen2-VL, whose ViT has already learned to see; a model trained from scratch on the
shapes world has to learn seeing and language grounding at once from a few thousand question answers, and its
ViT stays close to blind to shape and position. This step gives the tiny model what the full one inherits: the
ViT (blocks and merger, the same weights the LLM reads) is trained to read every cell of rendered scenes, with a
small head that is thrown away afterwards. The renderer knows each scene exactly, so the labels are exact:
for each of the 3 x 3 cells what stands there (nothing or one of the shapes), its colour and size, and the
background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes_scene import GRID_SIZE, Scene, ShapesWorldConfig, all_cells

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


class SceneReadingHead(nn.Module):
    """Reads per-cell classes from the ViT's merged tokens of one image.

    The tokens of a fixed-size image sit at fixed places, so a linear map from all of them to every cell's
    logits is enough and leaves the work of seeing to the ViT.
    """

    def __init__(self, tokens_per_image: int, width: int, labels: SceneLabels) -> None:
        super().__init__()
        self.cells = GRID_SIZE * GRID_SIZE
        self.splits = (len(labels.shapes), len(labels.colours), len(labels.sizes))
        self.n_backgrounds = len(labels.backgrounds)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(tokens_per_image * width, self.cells * sum(self.splits) + self.n_backgrounds)

    def forward(self, tokens_BTD: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(self.norm(tokens_BTD).flatten(1))
        per_cell = logits[:, : -self.n_backgrounds].reshape(logits.shape[0], self.cells, sum(self.splits))
        occupant, colour, size = per_cell.split(self.splits, dim=-1)
        return {"occupant": occupant, "colour": colour, "size": size, "background": logits[:, -self.n_backgrounds :]}


class VisionPretrainingModel(nn.Module):
    """`model.visual` plus a scene-reading head, in `Trainer`'s shape: `forward(**batch) -> {"loss", ...}`."""

    def __init__(self, visual: nn.Module, tokens_per_image: int, width: int, labels: SceneLabels) -> None:
        super().__init__()
        self.visual = visual
        self.tokens_per_image = tokens_per_image
        self.head = SceneReadingHead(tokens_per_image, width, labels)

    def read(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.visual(pixel_values, grid_thw=image_grid_thw)
        tokens = getattr(features, "pooler_output", features)
        n_images = image_grid_thw.shape[0]
        if tokens.shape[0] != n_images * self.tokens_per_image:
            raise ValueError(
                f"vision pretraining needs {self.tokens_per_image} merged tokens per image (one image size), got "
                f"{tokens.shape[0]} for {n_images} images"
            )
        return self.head(tokens.reshape(n_images, self.tokens_per_image, -1))

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
        logits = self.read(pixel_values, image_grid_thw)
        losses = {
            "occupant": F.cross_entropy(logits["occupant"].flatten(0, 1).float(), occupant.flatten()),
            "colour": F.cross_entropy(logits["colour"].flatten(0, 1).float(), colour.flatten(), ignore_index=IGNORE),
            "size": F.cross_entropy(logits["size"].flatten(0, 1).float(), size.flatten(), ignore_index=IGNORE),
            "background": F.cross_entropy(logits["background"].float(), background),
        }
        loss = sum(losses.values())
        return {"loss": loss, **{f"{k}_loss": v.detach() for k, v in losses.items()}}


@torch.no_grad()
def reading_accuracy(model: VisionPretrainingModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Shares read right on held-out scenes: occupant per cell, colour and size per occupied cell, background,
    and `scene` (every cell and the background right: the scene read exactly)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model.read(batch["pixel_values"], batch["image_grid_thw"])
    predicted = {k: v.argmax(-1) for k, v in logits.items()}
    occupied = batch["colour"] != IGNORE
    right = {k: predicted[k] == batch[k] for k in ("occupant", "colour", "size")}
    cells_right = right["occupant"] & (~occupied | (right["colour"] & right["size"]))
    background_right = predicted["background"] == batch["background"]
    return {
        "occupant": right["occupant"].float().mean().item(),
        "colour": right["colour"][occupied].float().mean().item(),
        "size": right["size"][occupied].float().mean().item(),
        "background": background_right.float().mean().item(),
        "scene": (cells_right.all(dim=1) & background_right).float().mean().item(),
    }


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
