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


# -- video files (PyAV) ------------------------------------------------------------------------------------------

from tests.clips import MP4, encode_clip, moving_square, write_clip  # noqa: E402
from vargpt.video_io import VideoSampling, load_video, probe_video  # noqa: E402

# frames kept at their own 56 x 56 size: no resize, so decoded pixels can be compared with those written
KEEP_SIZE = VideoSampling(min_pixels=FRAME_PX * FRAME_PX, max_pixels=FRAME_PX * FRAME_PX)


def test_qwen2vl_frame_sampling_rules():
    """qwen-vl-utils' smart_nframes: 2 fps, at least 4, an even count, never more frames than the video has."""
    sampling = VideoSampling()
    assert sampling.frame_count(300, 30.0) == 20  # 10 s at 2 fps
    assert sampling.frame_count(25, 10.0) == 4  # 2.5 s -> 5 -> at least 4 -> even
    assert sampling.frame_count(5, 1.0) == 4  # 10 frames wanted, only 5 there -> even
    assert sampling.frame_count(100_000, 30.0) == 768  # max_frames
    assert sampling.frame_count(31, 10.0) == 6  # 6.2 -> 6
    assert sampling.frame_indices(25, 10.0) == [0, 8, 16, 24]
    assert VideoSampling(num_frames=7).frame_indices(9, 1.0) == [0, 1, 2, 3, 5, 6, 7, 8]  # 7 rounds to 8
    assert VideoSampling(num_frames=6).frame_indices(11, 1.0) == [0, 2, 4, 6, 8, 10]
    # the per-frame budget: total_pixels shared by the frames, never below 1.05 x min_pixels
    assert sampling.frame_max_pixels(4) == 768 * 28 * 28
    assert sampling.frame_max_pixels(768) == int(128 * 28 * 28 * 1.05)
    assert sampling.frame_size(640, 360, 4) == (644, 364)  # within the bounds: rounded onto the 28-pixel grid
    assert sampling.frame_size(56, 56, 4) == (336, 336)  # below min_pixels: enlarged
    with pytest.raises(ImageInputError, match="at least 2 frames"):
        sampling.frame_count(1, 10.0)
    with pytest.raises(ValueError, match=r"min_frames \(10\) exceeds max_frames \(8\)"):
        VideoSampling(min_frames=10, max_frames=8)


def test_a_lossless_clip_decodes_to_the_frames_written_at_the_sampled_times(tmp_path):
    written = moving_square(25)  # 2.5 s at 10 fps: frames 0, 8, 16, 24 sampled
    path = write_clip(tmp_path / "clip.mkv", written)
    info = probe_video(path)
    assert (info.container, info.codec, info.width, info.height, info.frames, info.fps) == (
        "matroska",
        "ffv1",
        56,
        56,
        25,
        10.0,
    )
    frames = load_video(path, KEEP_SIZE)
    assert [f.size for f in frames] == [(56, 56)] * 4
    for frame, index in zip(frames, [0, 8, 16, 24], strict=True):
        assert np.array_equal(np.asarray(frame), written[index])  # FFV1 on RGB: bit-exact
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(frames, load_video(path.read_bytes(), KEEP_SIZE), strict=True)
    )


def test_an_mp4_clip_decodes_within_h264_tolerance_and_is_resized_onto_the_grid():
    written = moving_square(8)
    data = encode_clip(written, rate=4, kind=MP4)  # 2 s at 4 fps: 4 frames
    frames = load_video(data, KEEP_SIZE)
    for frame, index in zip(frames, [0, 2, 5, 7], strict=True):
        # lossy H.264 with 4:2:0 chroma blurs the square's edges: measured mean error 1.0-1.1 levels, median 0,
        # largest 23 (libx264 of PyAV 18.1); the bounds leave room for other encoder builds
        error = np.abs(np.asarray(frame, dtype=np.int16) - written[index])
        assert error.mean() < 3 and np.median(error) <= 1
    default = load_video(data)  # Qwen2-VL's defaults: at least 128 x 28 x 28 pixels per frame
    assert default[0].size == (336, 336) and len(default) == 4


def test_bad_video_files_are_named(tmp_path):
    clip = encode_clip(moving_square(4))
    with pytest.raises(ImageInputError, match="not a video in an accepted format"):
        load_video(b"<html>not a video</html>")
    with pytest.raises(ImageInputError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ImageInputError, match="is empty"):
        load_video(b"")
    with pytest.raises(ImageInputError, match=r"cannot be opened|corrupt|truncated|no frames"):
        load_video(clip[:200])
    with pytest.raises(ImageInputError, match="over the limit of 1000 pixels"):
        probe_video(clip, max_pixels=1000)
    with pytest.raises(ImageInputError, match="too long: over 3 frames"):
        probe_video(clip, max_source_frames=3)
    with pytest.raises(ImageInputError, match="at least 2 frames"):
        load_video(encode_clip(moving_square(1)))
    with pytest.raises(ImageInputError, match=r"accepted format \(gif\)"):
        load_video(clip, formats=["gif"])
    gif = tmp_path / "clip.png"
    Image.fromarray(moving_square(1)[0]).save(gif)
    with pytest.raises(ImageInputError, match="not a video"):
        load_video(gif)


def test_pipeline_answers_about_a_decoded_clip(tmp_path):
    from vargpt import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", seed=1)
    path = write_clip(tmp_path / "clip.mkv", moving_square(25))
    frames = load_video(path, KEEP_SIZE)
    answer = pipe.chat("What moves?", videos=[frames], max_new_tokens=4)
    assert isinstance(answer, str)
    assert answer == pipe.chat("What moves?", videos=[moving_square(25)[[0, 8, 16, 24]]], max_new_tokens=4)


def test_pipeline_takes_a_video_file_path_and_decodes_it_with_the_default_sampling(tmp_path):
    from vargpt import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", seed=1)
    path = write_clip(tmp_path / "clip.mkv", moving_square(25))
    by_path = pipe.chat("What moves?", videos=[path], max_new_tokens=4)
    assert by_path == pipe.chat("What moves?", videos=[load_video(path)], max_new_tokens=4)
    with pytest.raises(ImageInputError):
        pipe.chat("What moves?", videos=[tmp_path / "missing.mp4"], max_new_tokens=4)
