"""The public pipeline API on the tiny preset: chat, generate, edit, and their errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vargpt import VARGPTPipeline
from vargpt.cli.demo import demo_scene
from vargpt.image_io import ImageInputError


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained("tiny", seed=0)


def test_generate_returns_images_per_prompt_and_is_reproducible(pipe):
    images = pipe.generate(["a red circle", "two blue squares"], num_images=2, seed=5)
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    again = pipe.generate(["a red circle", "two blue squares"], num_images=2, seed=5)
    assert [i.tobytes() for i in images] == [i.tobytes() for i in again]


def test_generate_settings_and_presets(pipe):
    a = pipe.generate("a red circle", seed=1, preset="paper")[0]
    b = pipe.generate("a red circle", seed=1, preset="paper", cfg_scale=1.0, top_p=1.0)[0]
    assert a.size == b.size == (32, 32)
    with pytest.raises(ValueError, match="unknown image preset"):
        pipe.generate("a red circle", preset="fast")
    with pytest.raises(ValueError, match="num_images"):
        pipe.generate("a red circle", num_images=0)


def test_chat_answers_with_text(pipe):
    answer = pipe.chat("What colour is the shape?", images=[demo_scene()], max_new_tokens=6)
    assert isinstance(answer, str)


def test_edit_returns_one_image(pipe):
    edited = pipe.edit(demo_scene(), "make the circle blue", seed=0)
    assert isinstance(edited, Image.Image) and edited.size == (32, 32)


def test_bad_inputs_are_clear_errors(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "no-such-model" is a valid Hub id: look in the cache only
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("   ")
    with pytest.raises(ValueError, match="empty"):
        pipe.chat("")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageInputError):
        pipe.chat("what is this?", images=[str(broken)])
    with pytest.raises(FileNotFoundError, match="preset"):
        VARGPTPipeline.from_pretrained("no-such-model")


def test_a_preset_refuses_keywords_it_would_ignore():
    """A preset builds its model: a keyword meant for checkpoint loading, or a typo, must not pass in silence."""
    with pytest.raises(TypeError, match="low_cpu_mem_usage, typo_kwarg"):
        VARGPTPipeline.from_pretrained("tiny", typo_kwarg=1, low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="revision"):
        VARGPTPipeline.from_pretrained("tiny", revision="main")


def test_a_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json") as caught:
        VARGPTPipeline.from_pretrained(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_pipeline_round_trips_through_a_checkpoint_directory(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt")
    loaded = VARGPTPipeline.from_pretrained(tmp_path / "ckpt")
    a = pipe.generate("a red circle", seed=2)[0]
    b = loaded.generate("a red circle", seed=2)[0]
    assert a.tobytes() == b.tobytes()


def test_aspect_ratio_templates_shape_the_image(pipe):
    tall = pipe.generate("a tall red bar", seed=0, aspect_ratio=2.0)[0]
    wide = pipe.generate("a wide red bar", seed=0, aspect_ratio=0.5)[0]
    assert tall.height == 2 * tall.width and wide.width == 2 * wide.height
    with pytest.raises(ValueError, match="aspect"):
        pipe.generate("a red bar", aspect_ratio=1.9)


def test_auto_processor_and_device_map_loading(pipe, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vargpt import VARGPTProcessor

    pipe.save_pretrained(tmp_path)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), VARGPTProcessor)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="cpu", low_cpu_mem_usage=True)
    assert next(model.parameters()).device.type == "cpu"


def test_bf16_inference_runs_end_to_end():
    import torch

    bf16 = VARGPTPipeline.from_pretrained("tiny", dtype=torch.bfloat16)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    image = bf16.generate("a red circle", seed=0, cfg_scale=3.0)[0]
    assert image.size == (32, 32)
    assert isinstance(bf16.chat("hello", images=[demo_scene()], max_new_tokens=3), str)


def test_an_image_does_not_depend_on_the_rest_of_its_batch(pipe):
    alone = pipe.generate("two blue squares", num_images=2, seed=11)
    batched = pipe.generate(["a red circle", "two blue squares"], num_images=2, seed=11)
    assert [i.tobytes() for i in batched[2:]] == [i.tobytes() for i in alone]
    second = pipe.generate("two blue squares", seed=12)[0]
    assert second.tobytes() == alone[1].tobytes()


def test_a_checkpoint_ships_its_own_image_settings(pipe, tmp_path):
    from vargpt.generation.config import IMAGE_GENERATION_CONFIG_NAME

    pipe.image_config = pipe.image_config.updated(cfg_scale=1.0, top_p=0.9)
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.image_config = pipe.image_config.updated(cfg_scale=3.0, top_p=0.97)
    loaded = VARGPTPipeline.from_pretrained(tmp_path)
    assert (loaded.image_config.cfg_scale, loaded.image_config.top_p) == (1.0, 0.9)
    assert VARGPTPipeline.from_pretrained(tmp_path, image_preset="paper").image_config.cfg_scale == 1.5
    (tmp_path / IMAGE_GENERATION_CONFIG_NAME).write_text('{"cfg": 2}')
    with pytest.raises(ValueError, match="unknown image generation settings"):
        VARGPTPipeline.from_pretrained(tmp_path)
    (tmp_path / IMAGE_GENERATION_CONFIG_NAME).write_text('{"cfg_scale": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        VARGPTPipeline.from_pretrained(tmp_path)


def test_one_seed_per_prompt_makes_images_independent_of_batching(pipe):
    together = pipe.generate(["a red circle", "two blue squares"], num_images=2, seed=[10, 20])
    assert [i.tobytes() for i in together[2:]] == [i.tobytes() for i in pipe.generate("two blue squares", 2, seed=20)]
    assert together[0].tobytes() == pipe.generate("a red circle", seed=10)[0].tobytes()
    with pytest.raises(ValueError, match="one per prompt"):
        pipe.generate(["a", "b"], seed=[1])


def test_null_prompt_guidance_runs_both_branches_alike(pipe):
    # with the empty conversation as the prompt, both branches read the same tokens: guidance at any scale
    # must then draw exactly the unguided image, which fails if the branches differ in positions, masks,
    # caches or decoder context
    null = pipe.processor.null_prompt_ids()
    ids = null.view(1, -1)
    common = {"generation_mode": "image", "max_new_tokens": 1, "null_prompt_ids": null, "uncond_mode": "null_prompt"}
    guided = pipe.model.generate(ids, seed=2, cfg_scale=4.0, **common)
    plain = pipe.model.generate(ids, seed=2, cfg_scale=1.0, **common)
    assert torch.equal(torch.cat(guided.image_bits[0][0]), torch.cat(plain.image_bits[0][0]))
    # with a real prompt the unconditional branch does change the draw (random weights give bit logits of
    # ~1e-3 that differ by ~1e-4 between prompts, hence the large scale)
    prompt = pipe._encode([[{"role": "user", "content": "a red circle"}]], [[]])["input_ids"]
    guided = pipe.model.generate(prompt, seed=2, cfg_scale=300.0, **common)
    plain = pipe.model.generate(prompt, seed=2, cfg_scale=1.0, **common)
    assert not torch.equal(torch.cat(guided.image_bits[0][0]), torch.cat(plain.image_bits[0][0]))
    with pytest.raises(ValueError, match="null_prompt_ids"):
        pipe.model.generate(prompt, generation_mode="image", max_new_tokens=1, uncond_mode="null_prompt")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="batch-independent bits are a CPU guarantee; GPU kernels vary with batch size"
)
def test_null_prompt_guidance_through_the_pipeline(pipe):
    alone = pipe.generate("two blue squares", seed=7, uncond_mode="null_prompt")
    batched = pipe.generate(["a red circle", "two blue squares"], seed=7, uncond_mode="null_prompt")
    assert batched[1].tobytes() == alone[0].tobytes()
    original = pipe.generate("two blue squares", seed=7)
    assert original[0].tobytes() != alone[0].tobytes()
    assert pipe.edit(demo_scene(), "make it green", seed=0, uncond_mode="null_prompt").size == (32, 32)
    assert isinstance(pipe.chat("hello", max_new_tokens=3, uncond_mode="null_prompt"), str)


def test_a_16_bit_model_on_the_cpu_decodes_with_an_fp32_vae(tmp_path):
    """bf16 convolutions are very slow on CPUs without 16-bit matrix units: the VAE alone is kept in fp32."""
    VARGPTPipeline.from_pretrained("tiny").save_pretrained(tmp_path)
    pipe = VARGPTPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert pipe.model.vae_local.decoder.conv_in.conv.weight.dtype == torch.float32
    assert pipe.model.vargpt_gen.head.weight.dtype == torch.bfloat16
    assert pipe.generate("a red circle", seed=0)[0].size == (32, 32)
