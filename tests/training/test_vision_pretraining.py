"""Scene-reading pretraining of the ViT: exact labels, and a tiny ViT learns to read scenes from them."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vargpt.configuration import VARGPTConfig
from vargpt.data.shapes import ShapesWorld
from vargpt.data.shapes_scene import Scene, ShapeInstance
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.training.trainer import VARGPTTrainer
from vargpt.training.vision_pretraining import (
    IGNORE,
    RenderedScenes,
    SceneLabels,
    SceneReadingCollator,
    VisionPretrainingModel,
    reading_accuracy,
)

PIXELS = 112 * 112  # 8 x 8 patches, 16 merged tokens: few enough for seconds, enough to tell the cells apart


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


def test_a_tiny_vit_learns_to_read_held_out_scenes(tmp_path):
    torch.manual_seed(0)
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))
    world = ShapesWorld(1, image_size=32)
    labels = SceneLabels(world.config)
    collator = SceneReadingCollator(Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS), labels)
    held_out = collator(list(_scenes(world, "validation", 128)))
    wrapper = VisionPretrainingModel(model.visual, 16, model.config.vision_config.hidden_size, labels)
    before = reading_accuracy(wrapper, held_out)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=300,
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
    VARGPTTrainer(model=wrapper, args=args, train_dataset=_scenes(world, "train", 4800), data_collator=collator).train()
    after = reading_accuracy(wrapper, held_out)
    # answering "empty" everywhere scores the share of empty cells (about 0.7); colour chance is 1/6
    empty_share = (held_out["occupant"] == 0).float().mean().item()
    assert after["occupant"] > empty_share + 0.15 and after["occupant"] > before["occupant"], (empty_share, after)
    assert after["colour"] > 0.6 and after["background"] > 0.9, (before, after)


def test_the_head_refuses_images_of_another_size():
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))
    world = ShapesWorld(2, image_size=32)
    labels = SceneLabels(world.config)
    collator = SceneReadingCollator(Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS), labels)
    wrapper = VisionPretrainingModel(model.visual, 64, model.config.vision_config.hidden_size, labels)
    with pytest.raises(ValueError, match="64 merged tokens per image"):
        wrapper(**collator(list(_scenes(world, "train", 2))))
