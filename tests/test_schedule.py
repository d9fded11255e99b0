import pytest
import torch

from vargpt.schedule import (
    SUPPORTED_ASPECT_RATIOS,
    Schedule,
    block_causal_mask,
    nearest_aspect_ratio,
    rope_reference_grid,
    scale_schedule,
    schedule_image_size,
    token_count,
)

SIDES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
SQUARE = [(side, side) for side in SIDES]


@pytest.mark.parametrize(
    ("resolution", "steps", "tokens"), [(256, 7, 521), (512, 10, 2521), (768, 12, None), (1024, 13, 10521)]
)
def test_square_schedules_are_prefixes_with_published_token_counts(resolution, steps, tokens):
    schedule = scale_schedule(resolution)
    assert schedule == SQUARE[:steps]
    assert schedule[-1] == (resolution // 16, resolution // 16)
    if tokens is not None:
        assert token_count(schedule) == tokens


def test_supported_aspect_ratios_are_the_templates_and_their_inverses():
    tall = (1.0, 1.25, 1.333, 1.5, 1.75, 2.0, 2.5, 3.0)
    assert set(SUPPORTED_ASPECT_RATIOS) == set(tall) | {0.8, 0.75, 0.666, 0.571, 0.5, 0.4, 0.333}
    assert len(SUPPORTED_ASPECT_RATIOS) == 15


@pytest.mark.parametrize("ratio", SUPPORTED_ASPECT_RATIOS)
@pytest.mark.parametrize(("resolution", "steps"), [(256, 7), (512, 10), (768, 12), (1024, 13)])
def test_aspect_templates_have_square_lengths_and_end_at_their_ratio(ratio, resolution, steps):
    schedule = scale_schedule(resolution, aspect_ratio=ratio)
    assert len(schedule) == steps
    assert schedule[0] == (1, 1)
    h, w = schedule[-1]
    assert abs(h / w - ratio) < 0.01
    assert schedule == scale_schedule(1024, aspect_ratio=ratio)[:steps]


def test_known_template_entries_and_inverses():
    assert scale_schedule(1024, aspect_ratio=3.0)[-1] == (111, 37)
    assert scale_schedule(256, aspect_ratio=1.25)[2:4] == [(3, 3), (5, 4)]
    assert scale_schedule(512, aspect_ratio=0.5) == [(w, h) for h, w in scale_schedule(512, aspect_ratio=2.0)]
    assert scale_schedule(512, aspect_ratio=0.5)[-1] == (23, 46)
    # A ratio given exactly (4/3) selects the template stored as 1.333.
    assert scale_schedule(512, aspect_ratio=4 / 3) == scale_schedule(512, aspect_ratio=1.333)
    assert scale_schedule(512, aspect_ratio=2 / 3)[-1] == (26, 39)


def test_other_strides_use_the_prefix_ending_at_resolution_over_stride():
    assert scale_schedule(32, stride=4) == SQUARE[:5]
    assert token_count(scale_schedule(32, stride=4)) == 121
    assert scale_schedule(32, stride=4, aspect_ratio=2.0) == [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5)]
    assert scale_schedule(128) == SQUARE[:5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 300}, "multiple of stride"),
        ({"resolution": 160}, "unsupported resolution 160"),
        ({"resolution": 2048}, "supported: \\[16, 32, 64"),
        ({"resolution": 0}, "positive"),
        ({"resolution": 32, "stride": 4, "aspect_ratio": 1.1}, "unsupported aspect ratio"),
    ],
)
def test_unsupported_combinations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scale_schedule(**kwargs)


def test_nearest_aspect_ratio_snaps_image_ratios():
    assert nearest_aspect_ratio(1.0) == 1.0
    assert nearest_aspect_ratio(1.9) == 2.0
    assert nearest_aspect_ratio(0.35) == 0.333
    assert nearest_aspect_ratio(10.0) == 3.0
    with pytest.raises(ValueError, match="positive"):
        nearest_aspect_ratio(0.0)


def test_rope_reference_grid_is_the_last_1024px_grid_of_the_template():
    assert rope_reference_grid() == (64, 64)
    assert rope_reference_grid(2.0) == (90, 45)
    assert rope_reference_grid(0.5) == (45, 90)
    assert rope_reference_grid(1.0, max_grid=8) == (8, 8)
    assert rope_reference_grid(2.0, max_grid=8) == (10, 5)
    with pytest.raises(ValueError, match="RoPE reference grid 10"):
        rope_reference_grid(1.0, max_grid=10)


def test_schedule_image_size():
    assert schedule_image_size(scale_schedule(512)) == (512, 512)
    assert schedule_image_size(scale_schedule(512, aspect_ratio=2.0)) == (736, 368)
    assert schedule_image_size(scale_schedule(32, stride=4), stride=4) == (32, 32)
    with pytest.raises(ValueError, match="empty"):
        schedule_image_size([])


def test_schedule_object_derives_counts_offsets_pads_and_size_from_its_grids():
    schedule = Schedule.for_resolution(32, stride=4, rope_max_grid=8, pad_multiple=16)
    assert list(schedule) == scale_schedule(32, stride=4) and len(schedule) == schedule.num_scales == 5
    assert schedule == scale_schedule(32, stride=4) and schedule != scale_schedule(64, stride=4)
    assert schedule == Schedule.for_resolution(32, stride=4, rope_max_grid=8, pad_multiple=16) != schedule.prefix(4)
    assert schedule.num_tokens == token_count(schedule) == 121
    assert schedule.num_pad_tokens == 128  # 121 rounded up to a multiple of 16
    assert schedule.offsets == (0, 1, 5, 21, 57, 121)
    assert schedule.image_size == (32, 32) and schedule.rope_reference == (8, 8)
    assert schedule.prefix(2).grids == ((1, 1), (2, 2)) and schedule.prefix(2).stride == 4
    assert torch.equal(schedule.attention_mask(), block_causal_mask(list(schedule)))
    with pytest.raises(ValueError, match="empty"):
        Schedule(())
    with pytest.raises(ValueError, match="prefix"):
        schedule.prefix(6)


def test_the_published_models_512px_schedule_counts():
    """VARGPT-v1.1 at 512 px: 10 scales, 2,521 tokens in 2,560 `<|image_gen_pad|>` slots (multiple 128)."""
    schedule = Schedule.for_resolution(512, pad_multiple=128)
    assert schedule.num_scales == 10 and schedule.last_grid == (32, 32)
    assert schedule.num_tokens == sum(schedule.scale_token_counts) == schedule.offsets[-1] == 2521
    assert schedule.num_pad_tokens == 2560
    assert schedule.rope_reference == (64, 64) and schedule.image_size == (512, 512)
    tall = Schedule.for_resolution(512, aspect_ratio=2.0)
    assert tall.rope_reference == (90, 45) and tall.image_size == (736, 368)
    assert len(tall.scale_ids()) == tall.num_tokens
