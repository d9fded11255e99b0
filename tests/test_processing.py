"""VARGPTProcessor: chat template, placeholder expansion, padding, errors, generation targets, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from vargpt.processing import (
    VARGPTProcessor,
    postprocess_generated,
    preprocess_generation_target,
    shrink_to_max_pixels,
)
from vargpt.schedule import Schedule
from vargpt.tokenization import build_qwen2_tokenizer, build_tiny_tokenizer

PAD, IMAGE_PAD, VISION_START, VISION_END = 500, 505, 503, 504
GEN_START, GEN_END, GEN_PAD = 507, 508, 509
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processor() -> VARGPTProcessor:
    return VARGPTProcessor.from_tokenizer(build_tiny_tokenizer())


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- chat template ---------------------------------------------------------------------------------------------


def test_chat_template_matches_qwen2_vl_format(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    ]
    assert processor.apply_chat_template(conversation) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_chat_template_generation_targets_and_sharegpt_placeholders(processor):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Draw a cat."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here: "}, {"type": "image_gen"}]},
    ]
    sharegpt = [
        {"role": "user", "content": "Draw a cat."},
        {"role": "assistant", "content": "Here: <image_gen>"},
    ]
    expected = (
        SYSTEM + "<|im_start|>user\nDraw a cat.<|im_end|>\n"
        "<|im_start|>assistant\nHere: <|image_gen_start|><|image_gen_end|><|im_end|>\n"
    )
    assert processor.apply_chat_template(parts) == expected
    assert processor.apply_chat_template(sharegpt) == expected
    edit = [{"role": "user", "content": "Make <image> blue"}]
    assert processor.apply_chat_template(edit, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\nMake <|vision_start|><|image_pad|><|vision_end|> blue<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_tokenize_loads_images_from_messages(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _noise(56, 56)}, {"type": "text", "text": "Edit"}]},
        {"role": "assistant", "content": [{"type": "image_gen"}]},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, processor_kwargs={"image_gen_num_tokens": 5}
    )
    ids = out["input_ids"][0]
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((ids == IMAGE_PAD).sum()) == 4
    assert int((ids == GEN_PAD).sum()) == 5


# -- __call__ ----------------------------------------------------------------------------------------------------


def test_batch_is_left_padded_and_image_expanded(processor):
    image = _noise(100, 60)
    long_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it in detail."}]}],
        add_generation_prompt=True,
    )
    short_prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    out = processor([long_prompt, short_prompt], images=[image])

    grid_t, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    num_image_tokens = grid_t * grid_h * grid_w // 4
    assert (grid_t, grid_h, grid_w) == (1, 4, 8)  # 100x60 -> smart resize 112x56 -> 8x4 patches of 14
    assert out["pixel_values"].shape == (grid_t * grid_h * grid_w, 3 * 2 * 14 * 14)

    ids, mask, types = out["input_ids"], out["attention_mask"], out["mm_token_type_ids"]
    assert ids.shape == mask.shape == types.shape and ids.shape[0] == 2
    assert int((ids[0] == IMAGE_PAD).sum()) == num_image_tokens
    assert torch.equal(types, (ids == IMAGE_PAD).long())
    image_positions = (ids[0] == IMAGE_PAD).nonzero().flatten()
    assert ids[0, image_positions[0] - 1] == VISION_START and ids[0, image_positions[-1] + 1] == VISION_END
    assert image_positions[-1] - image_positions[0] + 1 == num_image_tokens  # one contiguous run

    short_len = len(processor.tokenizer(short_prompt)["input_ids"])
    assert mask[0].all()
    assert mask[1].tolist() == [0] * (ids.shape[1] - short_len) + [1] * short_len  # left padding
    assert (ids[1, : ids.shape[1] - short_len] == PAD).all()
    assert processor.decode(ids[1, -short_len:]) == short_prompt

    right = processor([long_prompt, short_prompt], images=[image], padding_side="right")
    assert right["attention_mask"][1].tolist() == [1] * short_len + [0] * (ids.shape[1] - short_len)


def test_images_accepted_as_path_bytes_and_pil(processor, tmp_path):
    image = _noise(84, 84, seed=3)
    path = tmp_path / "in.png"
    image.save(path)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>x"
    outputs = [processor(prompt, images=source) for source in (image, path, str(path), path.read_bytes())]
    for out in outputs[1:]:
        assert torch.equal(out["pixel_values"], outputs[0]["pixel_values"])
        assert torch.equal(out["input_ids"], outputs[0]["input_ids"])


def test_image_gen_pair_expansion(processor):
    prompt = "<|im_start|>assistant\n<|image_gen_start|><|image_gen_end|><|im_end|>"
    expanded = processor(prompt, image_gen_num_tokens=7)["input_ids"][0].tolist()
    start = expanded.index(GEN_START)
    assert expanded[start : start + 9] == [GEN_START] + [GEN_PAD] * 7 + [GEN_END]
    assert expanded.count(GEN_PAD) == 7
    untouched = processor(prompt)["input_ids"][0].tolist()
    assert untouched[start : start + 2] == [GEN_START, GEN_END] and GEN_PAD not in untouched
    trigger = processor("draw<|image_gen_start|>", image_gen_num_tokens=7)["input_ids"][0].tolist()
    assert trigger[-1] == GEN_START and GEN_PAD not in trigger  # a lone start token is a generation trigger
    out = processor(prompt, image_gen_num_tokens=7)
    assert out["mm_token_type_ids"].sum() == 0  # generation pads are not ViT image tokens


def test_image_gen_pad_slots_from_a_schedule(processor):
    prompt = "<|im_start|>assistant\n<|image_gen_start|><|image_gen_end|><|im_end|>"
    schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=8, pad_multiple=16)
    assert schedule.num_tokens == 121 and schedule.num_pad_tokens == 128
    expanded = processor(prompt, image_gen_num_tokens=schedule)["input_ids"][0].tolist()
    assert expanded.count(GEN_PAD) == 128


def test_editing_caps_understanding_image_pixels(processor):
    image = _noise(1024, 768)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>make it blue"
    default = processor(prompt, images=image)["image_grid_thw"][0].prod().item() * 14 * 14
    edited = processor(prompt, images=image, editing=True)["image_grid_thw"][0].prod().item() * 14 * 14
    assert default == 1036 * 756  # Qwen2-VL smart resize to multiples of 28; its 28*28*1280 cap does not bind
    assert edited == 588 * 420 <= processor.edit_max_pixels == 512 * 512  # scaled down under the editing cap
    explicit = processor(prompt, images=image, max_pixels=56 * 56 * 4)["image_grid_thw"][0].prod().item()
    assert explicit * 14 * 14 <= 56 * 56 * 4


def test_errors_name_the_problem(processor):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        processor("")
    with pytest.raises(ValueError, match="prompt 1 is empty or whitespace only"):
        processor(["fine", "  \n\t "])
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match=r"prompt 0 is 11 tokens long .* longer than max_length=10"):
        processor("hello world", max_length=10)
    assert processor("hello world", max_length=11)["input_ids"].shape == (1, 11)
    image = _noise(56, 56)
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\)"):
        processor("<|image_pad|>", images=[image, image])
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image\(s\)"):
        processor("no placeholder", images=image)
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 0 image\(s\)"):
        processor(["<|image_pad|>", "<|image_pad|>"])
    with pytest.raises(ValueError, match="videos"):
        processor("<|video_pad|>")
    with pytest.raises(ValueError, match="image_gen_num_tokens must be a positive integer"):
        processor("x", image_gen_num_tokens=0)
    with pytest.raises(ValueError, match="different lengths"):
        processor(["a", "abc"], padding=False)


# -- generation targets ----------------------------------------------------------------------------------------


def test_generation_target_centre_crop_is_exact_when_no_resize_is_needed():
    # 576x288 already has its short side at round(1.125 * 256) = 288: only the centre crop applies.
    image = _noise(576, 288, seed=1)
    x_3HW = preprocess_generation_target(image, 256)
    assert x_3HW.shape == (3, 256, 256) and x_3HW.dtype == torch.float32
    source = np.asarray(image)[16:272, 160:416].transpose(2, 0, 1)
    assert torch.equal(x_3HW, torch.from_numpy(source.astype(np.float32)) / 255 * 2 - 1)


def test_generation_target_range_resize_and_shapes():
    black_white = np.zeros((300, 500, 3), dtype=np.uint8)
    black_white[:, 250:] = 255
    x_3HW = preprocess_generation_target(Image.fromarray(black_white), 64)
    assert x_3HW.shape == (3, 64, 64)
    assert x_3HW.min() >= -1 and x_3HW.max() <= 1
    assert x_3HW[:, :, 0].eq(-1).all() and x_3HW[:, :, -1].eq(1).all()  # left black, right white
    assert preprocess_generation_target(_noise(640, 480), (256, 512)).shape == (3, 256, 512)
    assert preprocess_generation_target(_noise(40, 30), 512).shape == (3, 512, 512)  # upscaled small input
    with pytest.raises(ValueError, match="resolution"):
        preprocess_generation_target(_noise(64, 64), 0)


def test_generation_target_random_crop_uses_generator():
    image = _noise(400, 288, seed=2)  # short side 288 = 1.125 * 256: no resize, crops come straight from it
    source = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).astype(np.float32)) / 255 * 2 - 1
    crops = [
        preprocess_generation_target(image, 256, random_crop=True, generator=torch.Generator().manual_seed(seed))
        for seed in range(6)
    ]
    again = preprocess_generation_target(image, 256, random_crop=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops[0], again)
    offsets = set()
    for crop in crops:
        matches = [
            (top, left)
            for top in range(288 - 256 + 1)
            for left in range(400 - 256 + 1)
            if torch.equal(source[:, top : top + 256, left : left + 256], crop)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_original_pre_shrink_option():
    image = _noise(1000, 500)
    assert shrink_to_max_pixels(image, 512 * 512).size == (724, 362)  # sqrt(262144 / 500000) = 0.7241
    small = _noise(100, 100)
    assert shrink_to_max_pixels(small, 512 * 512) is small
    plain = preprocess_generation_target(image, 256)
    shrunk = preprocess_generation_target(image, 256, pre_shrink_max_pixels=512 * 512)
    assert shrunk.shape == plain.shape == (3, 256, 256) and not torch.equal(shrunk, plain)
    expected = preprocess_generation_target(shrink_to_max_pixels(image, 512 * 512), 256)
    assert torch.equal(shrunk, expected)


def test_postprocess_truncates_like_the_original():
    # (x + 1) / 2 * 255 = 127.9 and 0.6: truncation gives 127 and 0 where rounding would give 128 and 1.
    values = torch.tensor([-1.0, 1.0, 127.9 / 127.5 - 1, 0.6 / 127.5 - 1, 2.0, -3.0])
    images_B3HW = values.view(1, 1, 1, 6).expand(1, 3, 1, 6).contiguous()
    (image,) = postprocess_generated(images_B3HW)
    assert image.mode == "RGB" and image.size == (6, 1)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 255, 127, 0, 255, 0]  # out-of-range clamps, no wrap
    two = postprocess_generated(torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16))
    assert len(two) == 2 and two[1].size == (5, 4) and np.asarray(two[1]).max() == 127
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        postprocess_generated(torch.zeros(3, 4, 4))


# -- persistence and the real tokenizer ------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    original = VARGPTProcessor.from_tokenizer(build_tiny_tokenizer(), padding_side="right", edit_max_pixels=100_000)
    original.save_pretrained(tmp_path)
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = VARGPTProcessor.from_pretrained(tmp_path)
    assert loaded.padding_side == "right" and loaded.edit_max_pixels == 100_000
    assert loaded.chat_template == original.chat_template
    assert loaded.image_processor.size == original.image_processor.size
    prompts = ["<|vision_start|><|image_pad|><|vision_end|>What?", "x"]
    image = _noise(90, 70)
    expected, actual = original(prompts, images=image), loaded(prompts, images=image)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", b'{"version": "1.0",\n oops}'),
        ("tokenizer_config.json", b"{'single': 'quotes'}"),
        ("processor_config.json", b"[1, 2"),
        ("tokenizer.json", b'{"added_tokens": "\xff"}'),
        ("chat_template.jinja", b"{{ '\xff' }}"),
    ],
    ids=["tokenizer-syntax", "tokenizer_config-quotes", "processor_config-truncated", "not-utf8", "template-bytes"],
)
def test_a_corrupt_file_of_a_saved_processor_is_named(tmp_path, name, content):
    VARGPTProcessor.from_tokenizer(build_tiny_tokenizer()).save_pretrained(tmp_path)
    assert (tmp_path / name).is_file()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{tmp_path / name} (is not valid JSON|is not UTF-8)") as raised:
        VARGPTProcessor.from_pretrained(tmp_path)
    assert "\n" not in str(raised.value)


def test_real_qwen2_tokenizer_ids_in_processor_output():
    processor = VARGPTProcessor.from_tokenizer(build_qwen2_tokenizer())
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello world"}]},
        {"role": "assistant", "content": [{"type": "image_gen"}]},
    ]
    text = processor.apply_chat_template(messages)
    out = processor(text, images=_noise(56, 56), image_gen_num_tokens=3)
    ids = out["input_ids"][0].tolist()
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    start = ids.index(151652)  # <|vision_start|>
    assert ids[start : start + 8] == [151652, 151655, 151655, 151655, 151655, 151653, 9707, 1879]
    gen = ids.index(151657)
    assert ids[gen : gen + 5] == [151657, 151659, 151659, 151659, 151658]
    assert out["mm_token_type_ids"][0].tolist() == [int(i == 151655) for i in ids]


def test_a_torchvision_image_processor_becomes_the_pil_one_with_the_same_settings():
    # where torchvision is installed, loading a saved processor hands over the torchvision backend, which
    # resizes to other pixel values; a stand-in of another class with the same settings plays that part here
    pil = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)

    class OtherBackend:
        def to_dict(self):
            return {**pil.to_dict(), "image_processor_type": "Qwen2VLImageProcessor"}

    processor = VARGPTProcessor(image_processor=OtherBackend(), tokenizer=build_tiny_tokenizer())
    assert type(processor.image_processor) is Qwen2VLImageProcessorPil
    reference = VARGPTProcessor(image_processor=pil, tokenizer=build_tiny_tokenizer())
    image = _noise(90, 70)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What?"
    assert torch.equal(processor(prompt, images=image)["pixel_values"], reference(prompt, images=image)["pixel_values"])
