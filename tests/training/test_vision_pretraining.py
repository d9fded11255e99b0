"""Scene-reading pretraining of the ViT: exact labels, and a tiny ViT learns to read scenes from them."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vargpt.configuration import VARGPTConfig
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.shapes.scene import Scene, ShapeInstance
from vargpt.shapes.world import ShapesWorld
from vargpt.training.trainer import VARGPTTrainer
from vargpt.training.vision_pretraining import (
    IGNORE,
    RenderedScenes,
    SceneLabels,
    SceneReadingCollator,
    VisionPretrainingModel,
    cells_aligned,
    reading_accuracy,
    token_cells,
)

PIXELS = 168 * 168  # 12 x 12 patches, 6 x 6 merged tokens (2 per cell a side): enough to tell the cells apart


def test_labels_name_each_cells_occupant_colour_size_and_the_background():
    world = ShapesWorld(0)
    labels = SceneLabels(world.config)
    scene = Scene(
        (ShapeInstance((0, 2), "triangle", "blue", "large"), ShapeInstance((2, 0), "circle", "red", "small")),
        background="stripes",
    )
    encoded = labels.encode([scene])
    occupant = encoded["occupant"][0].tolist()
    assert occupant[2] == labels.shapes.index("triangle") and occupant[6] == labels.shapes.index("circle")
    assert [c for i, c in enumerate(occupant) if i not in (2, 6)] == [0] * 7  # 0 = empty
    assert encoded["colour"][0, 2] == labels.colours.index("blue") and encoded["size"][0, 6] == labels.sizes.index(
        "small"
    )
    assert (encoded["colour"][0, [0, 1, 3, 4, 5, 7, 8]] == IGNORE).all()  # empty cells have no colour to learn
    assert encoded["background"].tolist() == [labels.backgrounds.index("stripes")]


def _scenes(world: ShapesWorld, split: str, count: int) -> RenderedScenes:
    scenes = [world.sample_scene(split) for _ in range(count)]
    return RenderedScenes(scenes, [world.render(s) for s in scenes])


def _pretrain(tmp_path, *, held_out: int, steps: int, scenes: int, position_target: bool = False):
    """A fresh tiny model's ViT pretrained on scene reading: (wrapper, held-out batch, reading before, after)."""
    torch.manual_seed(0)
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))
    world = ShapesWorld(1, image_size=32)
    labels = SceneLabels(world.config)
    collator = SceneReadingCollator(Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS), labels)
    held_out_batch = collator(list(_scenes(world, "validation", held_out)))
    wrapper = VisionPretrainingModel(
        model.visual, model.config.vision_config.hidden_size, labels, position_target=position_target
    )
    before = reading_accuracy(wrapper, held_out_batch)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    train = _scenes(world, "train", scenes)
    VARGPTTrainer(model=wrapper, args=args, train_dataset=train, data_collator=collator).train()
    return wrapper, held_out_batch, before, reading_accuracy(wrapper, held_out_batch)


def test_a_tiny_vit_learns_to_read_held_out_scenes(tmp_path):
    _, held_out, before, after = _pretrain(tmp_path, held_out=128, steps=300, scenes=4800)
    # answering "empty" everywhere scores the share of empty cells (about 0.7); colour chance is 1/6
    empty_share = (held_out["occupant"] == 0).float().mean().item()
    assert after["occupant"] > empty_share + 0.15 and after["occupant"] > before["occupant"], (empty_share, after)
    assert after["colour"] > 0.6 and after["background"] > 0.9, (before, after)
    assert "cell" not in after  # no position target, no cell read-out


def test_with_a_position_target_the_vits_tokens_learn_which_cell_they_lie_in(tmp_path):
    wrapper, held_out, before, after = _pretrain(tmp_path, held_out=64, steps=400, scenes=6400, position_target=True)
    assert "cell_loss" in wrapper(**held_out)
    # rotary positions are relative: a token can only learn where it is, from the grid's edges, and slowly (here
    # 0.25 after 400 steps, from chance 1/9 on 2,304 held-out tokens; the shapes recipe's ViT reaches 1.0 in 600)
    assert before["cell"] < 0.15 and after["cell"] > 0.18, (before["cell"], after["cell"])


def test_each_token_is_labelled_with_the_cell_its_centre_lies_in():
    assert token_cells(3, 3).tolist() == list(range(9))
    cells = token_cells(8, 8).reshape(8, 8)
    # token centres at (i + 0.5) / 8 of the side: rows 0-2 fall in the top cell, 3-4 in the middle, 5-7 below
    assert cells[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6] and cells[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_token_grids_tile_the_cells_only_in_multiples_of_three():
    assert cells_aligned(3, 3) and cells_aligned(6, 6) and cells_aligned(6, 9)
    assert not cells_aligned(8, 8) and not cells_aligned(2, 2) and not cells_aligned(6, 8)
    # where they tile, every cell gets the same number of tokens
    assert torch.bincount(token_cells(6, 6)).tolist() == [4] * 9


def test_a_batch_of_mixed_image_sizes_is_refused():
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))
    world = ShapesWorld(2, image_size=32)
    labels = SceneLabels(world.config)
    wrapper = VisionPretrainingModel(model.visual, model.config.vision_config.hidden_size, labels)
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=224 * 224)
    rows = list(_scenes(world, "train", 2))
    rows[1]["image"] = rows[1]["image"].resize((128, 128))
    with pytest.raises(ValueError, match="one image size per batch"):
        wrapper(**SceneReadingCollator(processor, labels)(rows))
