"""2D RoPE: Infinity's "normalized by hw, mode 2" positions and the rotation layout."""

from __future__ import annotations

import pytest
import torch

from vargpt.schedule import SUPPORTED_ASPECT_RATIOS, Schedule
from vargpt.visual_decoder.rope import (
    apply_rope,
    reference_grid,
    rope_cos_sin,
    scale_positions,
    schedule_positions,
    schedule_reference,
)


def test_positions_are_rounded_onto_the_reference_grid() -> None:
    positions = schedule_positions([(1, 1), (2, 2), (6, 6)], max_grid=8)
    assert positions.shape == (1 + 4 + 36, 2)
    assert positions[0].tolist() == [0, 0]
    assert positions[1:5].tolist() == [[0, 0], [0, 4], [4, 0], [4, 4]]
    # 6 -> 8: i * 8 / 6 = 0, 1.33, 2.67, 4, 5.33, 6.67 -> 0, 1, 3, 4, 5, 7
    sixes = positions[5:].view(6, 6, 2)
    assert sixes[:, 0, 0].tolist() == [0, 1, 3, 4, 5, 7]
    assert sixes[0, :, 1].tolist() == [0, 1, 3, 4, 5, 7]
    assert torch.equal(sixes[2, :, 0], torch.full((6,), 3))  # rows carry y, columns x


def test_full_model_positions_use_the_64_grid() -> None:
    positions = scale_positions((24, 24), (64, 64))
    assert positions[:, 0].unique().tolist() == [round(i * 64 / 24) for i in range(24)]
    assert positions.max() == 61


def test_exact_halves_round_to_even_like_torch_round() -> None:
    # 2 -> 7: positions 0 and 3.5 -> 4; 2 -> 5: 0 and 2.5 -> 2
    assert scale_positions((2, 2), (7, 5)).tolist() == [[0, 0], [0, 2], [4, 0], [4, 2]]


def test_reference_grid_square_and_templates() -> None:
    assert reference_grid([(1, 1), (2, 2), (4, 4)], 64) == (64, 64)
    assert reference_grid([(1, 1), (2, 2), (4, 4)], 8) == (8, 8)
    # h/w = 2 template prefix (256 px) -> the template's 1024 px grid
    assert reference_grid([(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11)], 64) == (90, 45)
    assert reference_grid([(1, 1), (2, 2), (2, 4)], 64) == (45, 90)
    with pytest.raises(ValueError, match="not a prefix"):
        reference_grid([(1, 1), (3, 2), (5, 3)], 64)


def test_rotation_layout_first_half_rows_second_half_columns() -> None:
    head_dim = 8
    cos, sin = rope_cos_sin(torch.tensor([[3, 5]]), head_dim, theta=10000.0)
    expected = torch.tensor([3.0, 3.0 / 100.0, 5.0, 5.0 / 100.0])  # planes: y f0, y f1, x f0, x f1
    assert torch.allclose(cos[0], expected.cos()) and torch.allclose(sin[0], expected.sin())
    x = torch.arange(1.0, 9.0).view(1, 1, 1, head_dim)
    rotated = apply_rope(x, cos, sin)
    # plane 0 is channels (0, 1): (x0 cos - x1 sin, x0 sin + x1 cos)
    assert torch.allclose(rotated[..., 0], 1 * cos[0, 0] - 2 * sin[0, 0])
    assert torch.allclose(rotated[..., 1], 1 * sin[0, 0] + 2 * cos[0, 0])
    assert torch.allclose(rotated.norm(), x.norm())


def test_scores_depend_only_on_relative_position() -> None:
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pos_q: list[int], pos_k: list[int]) -> torch.Tensor:
        cos_q, sin_q = rope_cos_sin(torch.tensor([pos_q]), 16, 10000.0)
        cos_k, sin_k = rope_cos_sin(torch.tensor([pos_k]), 16, 10000.0)
        return (apply_rope(q, cos_q, sin_q) * apply_rope(k, cos_k, sin_k)).sum()

    assert torch.allclose(score([2, 7], [1, 3]), score([5, 9], [4, 5]), atol=1e-5)
    assert not torch.allclose(score([2, 7], [1, 3]), score([2, 7], [3, 1]), atol=1e-3)


def test_head_dim_must_split_into_y_and_x_pairs() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_cos_sin(torch.zeros(1, 2, dtype=torch.long), 6, 10000.0)


@pytest.mark.parametrize("ratio", SUPPORTED_ASPECT_RATIOS)
@pytest.mark.parametrize(("resolution", "max_grid"), [(512, 64), (1024, 64), (32, 8)])
def test_a_schedule_carries_the_reference_the_template_lookup_finds(ratio, resolution, max_grid) -> None:
    stride = 16 if max_grid == 64 else 4
    schedule = Schedule.for_resolution(resolution, stride=stride, aspect_ratio=ratio, rope_max_grid=max_grid)
    assert schedule_reference(schedule, max_grid) == schedule.rope_reference
    assert schedule.rope_reference == reference_grid(list(schedule), max_grid)
    assert torch.equal(schedule_positions(schedule, max_grid), schedule_positions(list(schedule), max_grid))


def test_a_schedule_reference_wins_over_the_lookup() -> None:
    schedule = Schedule(((1, 1), (2, 2)), rope_reference=(4, 4))
    assert schedule_reference(schedule, max_grid=8) == (4, 4)
    assert schedule_reference(list(schedule), max_grid=8) == (8, 8)
