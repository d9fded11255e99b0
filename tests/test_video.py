"""Video understanding through Qwen2-VL's video path: processor, M-RoPE positions, model and pipeline (tiny preset)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt import VARGPTConfig, VARGPTForConditionalGeneration
from vargpt.image_io import ImageInputError, load_video_frames
from vargpt.processing import VARGPTProcessor
from vargpt.rope_index import mrope_positions
from vargpt.tokenization import build_tiny_tokenizer

FRAME_PX = 56  # 56 x 56 frames: a 4 x 4 patch grid, 2 x 2 merged tokens per temporal patch


def frames(count: int, seed: int = 0, size: tuple[int, int] = (FRAME_PX, FRAME_PX)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def processor() -> VARGPTProcessor:
    # frames keep their size; images get the same bounds so that both paths resize alike
    return VARGPTProcessor.from_tokenizer(
        build_tiny_tokenizer(), video_min_pixels=FRAME_PX * FRAME_PX, video_max_pixels=FRAME_PX * FRAME_PX
    )


@pytest.fixture(scope="module")
def tiny_model() -> VARGPTForConditionalGeneration:
    torch.manual_seed(0)
    return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).eval()


def prompt(processor: VARGPTProcessor, kinds: list[str], question: str = "What happens?") -> str:
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def image_pixels(processor: VARGPTProcessor, frame: Image.Image) -> torch.Tensor:
    size = {"shortest_edge": processor.video_min_pixels, "longest_edge": processor.video_max_pixels}
    return processor.image_processor([frame], return_tensors="pt", size=size)["pixel_values"]


# -- processor ---------------------------------------------------------------------------------------------------


def test_two_equal_frames_are_the_image_of_that_frame(processor):
    """The image processor repeats an image over the temporal pair, so a 2-frame still video is that image."""
    (frame,) = frames(1)
    out = processor(text=prompt(processor, ["video"]), videos=[[frame, frame]])
    assert out["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(out["pixel_values_videos"], image_pixels(processor, frame))


def test_frames_are_paired_along_time_in_qwen2vl_patch_layout(processor):
    a, b, c, d = frames(4, seed=1)
    out = processor(text=prompt(processor, ["video"]), videos=[[a, b, c, d]])
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    # patch vector = (channel, frame in pair, row, column); patches ordered (t, merged blocks, in-block position)
    patches = out["pixel_values_videos"].view(2, 16, 3, 2, 14, 14)
    for t, pair in enumerate([(a, b), (c, d)]):
        for slot, frame in enumerate(pair):
            single = image_pixels(processor, frame).view(16, 3, 2, 14, 14)[:, :, 0]
            assert torch.equal(patches[t, :, :, slot], single)


def test_odd_frame_count_repeats_the_last_frame_and_arrays_equal_frame_lists(processor):
    a, b, c = frames(3, seed=2)
    text = prompt(processor, ["video"])
    odd = processor(text=text, videos=[[a, b, c]])
    padded = processor(text=text, videos=[[a, b, c, c]])
    array = processor(text=text, videos=np.stack([np.asarray(f) for f in (a, b, c)]))
    assert odd["video_grid_thw"].tolist() == [[2, 4, 4]]
    for other in (padded, array):
        assert torch.equal(odd["pixel_values_videos"], other["pixel_values_videos"])
        assert torch.equal(odd["input_ids"], other["input_ids"])


def test_video_placeholder_expands_to_merged_patch_count(processor):
    image, *clip = frames(5, seed=3)
    out = processor(text=prompt(processor, ["image", "video"]), images=[image], videos=[clip])
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    video_slots = ids == processor.video_token_id
    assert int(video_slots.sum()) == 2 * 4 * 4 // 4
    assert torch.equal(types[video_slots], torch.full((8,), 2))
    assert torch.equal(types[ids == processor.image_token_id], torch.ones(4, dtype=types.dtype))
    assert int((types == 0).sum()) == len(ids) - 12


def test_bad_video_inputs_are_named(processor):
    text = prompt(processor, ["video"])
    with pytest.raises(ValueError, match="1 <\\|video_pad\\|> placeholder\\(s\\) but 0 video"):
        processor(text=text)
    with pytest.raises(ImageInputError, match="one size"):
        processor(text=text, videos=[frames(1) + frames(1, size=(28, 56))])
    with pytest.raises(ImageInputError, match="uint8"):
        load_video_frames(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ImageInputError, match="at least one frame"):
        load_video_frames([])


# -- positions ---------------------------------------------------------------------------------------------------


def transformers_rope_index(config, ids, types, image_grid, video_grid, mask):
    """transformers' own `Qwen2VLModel.get_rope_index` (its methods read only the config)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    owner = SimpleNamespace(config=config, get_vision_position_ids=partial(Qwen2VLModel.get_vision_position_ids, None))
    return Qwen2VLModel.get_rope_index(
        owner, ids, types, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask
    )


def test_video_positions_are_transformers_get_rope_index(processor):
    config = VARGPTConfig.from_preset("tiny")
    image, *clip = frames(5, seed=4)
    texts = [prompt(processor, ["video", "image"]), prompt(processor, ["image", "video"], "Describe it in detail.")]
    out = processor(text=texts, images=[image, image], videos=[clip, clip[:2]])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert int((mask == 0).sum()) > 0  # left padding is part of the check
    ours, deltas = mrope_positions(
        ids, mask, out["image_grid_thw"], config.image_token_id, 2, out["video_grid_thw"], config.video_token_id
    )
    reference, reference_deltas = transformers_rope_index(
        config, ids, out["mm_token_type_ids"], out["image_grid_thw"], out["video_grid_thw"], mask
    )
    real = mask.bool()
    assert torch.equal(ours[:, real], reference[:, real])
    # both give the next text position: ours counts from the padded length, transformers' from the real one
    assert torch.equal(deltas.view(-1) + ids.shape[1], reference_deltas.view(-1) + mask.sum(1))
    # row 0's video: two temporal patches of 2 x 2 merged tokens; t steps once per temporal patch
    first = int((ids[0] == config.video_token_id).nonzero()[0])
    block = ours[:, 0, first : first + 8] - ours[0, 0, first]
    assert block[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert block[1].tolist() == [0, 0, 1, 1] * 2
    assert block[2].tolist() == [0, 1, 0, 1] * 2


# -- model -------------------------------------------------------------------------------------------------------


def video_inputs(processor, clip):
    return processor(text=prompt(processor, ["video"]), videos=[clip])


@torch.no_grad()
def test_video_forward_equals_transformers_qwen2vl(tiny_model, processor):
    """Our LLM + ViT with video inputs = transformers' `Qwen2VLModel` holding the same weights."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    reference = Qwen2VLModel(tiny_model.config).eval()
    reference.visual.load_state_dict(tiny_model.visual.state_dict())
    reference.language_model.load_state_dict(tiny_model.model.state_dict())
    inputs = video_inputs(processor, frames(4, seed=5))
    ours = tiny_model(**inputs).hidden_states
    theirs = reference(**inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_changed_frame_changes_the_logits_after_the_video(tiny_model, processor):
    clip = frames(4, seed=6)
    before = video_inputs(processor, clip)
    after = video_inputs(processor, [*clip[:3], frames(1, seed=7)[0]])
    first = int((before["input_ids"][0] == processor.video_token_id).nonzero()[0])
    logits_before, logits_after = tiny_model(**before).logits, tiny_model(**after).logits
    assert torch.equal(logits_before[:, :first], logits_after[:, :first])
    assert (logits_before[:, -1] - logits_after[:, -1]).abs().max() > 1e-4


@torch.no_grad()
def test_a_still_two_frame_video_reads_as_that_image(tiny_model, processor):
    """Same patches, same ViT, same (t=0, row, column) positions: only the placeholder token differs, and it is
    overwritten by the features, so every logit agrees."""
    (frame,) = frames(1, seed=8)
    video = video_inputs(processor, [frame, frame])
    image = processor(text=prompt(processor, ["image"]), images=[frame], max_pixels=processor.video_max_pixels)
    assert torch.equal(video["video_grid_thw"], image["image_grid_thw"])
    torch.testing.assert_close(tiny_model(**video).logits, tiny_model(**image).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_generate_reads_the_video_and_keeps_its_prompt_ids(tiny_model, processor):
    image, *clip = frames(5, seed=9)
    inputs = processor(text=prompt(processor, ["video", "image"]), images=[image], videos=[clip])
    sequences = tiny_model.generate(**inputs, max_new_tokens=3)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"])
    first = tiny_model(**inputs, positions="mrope").logits[0, -1].argmax()
    assert int(sequences[0, prompt_length]) == int(first)
    other = dict(
        inputs,
        pixel_values_videos=processor(text=prompt(processor, ["video"]), videos=[frames(4, seed=10)])[
            "pixel_values_videos"
        ],
    )
    assert not torch.equal(tiny_model(**other).logits[0, -1], tiny_model(**inputs).logits[0, -1])
    with pytest.raises(ValueError, match="together"):
        tiny_model.generate(input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"])


# -- pipeline ----------------------------------------------------------------------------------------------------


def test_pipeline_chat_answers_about_a_video():
    from vargpt import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", seed=1)
    clip = np.stack([np.asarray(frame) for frame in frames(4, seed=11)])
    answer = pipe.chat("What happens?", videos=[clip], max_new_tokens=4)
    assert isinstance(answer, str)
    assert answer == pipe.chat("What happens?", videos=[list(Image.fromarray(f) for f in clip)], max_new_tokens=4)
    with pytest.raises(ValueError, match="list of videos"):
        pipe.chat("What happens?", videos=clip)


def test_text_after_a_long_video_continues_past_its_last_temporal_position(processor):
    """Qwen2-VL's reference rule: text resumes one past the block's largest position. With more temporal patches
    (4) than merged rows/columns (2), that is the t range; transformers 5's `get_rope_index` resumes at
    start + 2 there (and disagrees with its own deltas), so this case is checked against the rule itself."""
    config = VARGPTConfig.from_preset("tiny")
    out = processor(text=prompt(processor, ["video"]), videos=[frames(8, seed=12)])
    ids = out["input_ids"]
    positions, deltas = mrope_positions(
        ids, None, None, config.image_token_id, 2, out["video_grid_thw"], config.video_token_id
    )
    slots = (ids[0] == config.video_token_id).nonzero().view(-1)
    start = int(positions[0, 0, slots[0]])
    assert positions[0, 0, slots].tolist() == [start + t for t in range(4) for _ in range(4)]
    after = int(slots[-1]) + 1
    assert positions[:, 0, after].tolist() == [start + 4] * 3
    assert int(deltas[0, 0]) + ids.shape[1] == int(positions[0, 0, -1]) + 1


def test_video_pixel_bounds_survive_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VARGPTProcessor.from_pretrained(tmp_path)
    assert (loaded.video_min_pixels, loaded.video_max_pixels) == (FRAME_PX * FRAME_PX, FRAME_PX * FRAME_PX)
    with pytest.raises(ValueError, match=r"video_min_pixels .* exceeds video_max_pixels"):
        VARGPTProcessor.from_tokenizer(build_tiny_tokenizer(), video_min_pixels=100, video_max_pixels=10)
