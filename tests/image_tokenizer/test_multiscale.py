import pytest
import torch
import torch.nn.functional as F

from vargpt.image_tokenizer import (
    accumulate_scale,
    bits_to_codes,
    bits_to_latent,
    encode_to_bits,
    next_scale_input,
    sample_flip_probs,
    teacher_forcing,
)
from vargpt.schedule import scale_schedule, token_count

SCHEDULE = scale_schedule(32, stride=4)  # (1,1) ... (8,8), 121 tokens
D = 8


def _latent(seed: int = 0, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, 8, 8, generator=generator)


def _scale_loop_inputs(bits_per_scale, schedule):
    """The inference loop: one scale at a time from F = 0."""
    F_BdHW = torch.zeros(bits_per_scale[0].shape[0], D, *schedule[-1])
    inputs = []
    for k, (bits, grid) in enumerate(zip(bits_per_scale, schedule, strict=True)):
        F_BdHW = accumulate_scale(F_BdHW, bits, grid)
        if k + 1 < len(schedule):
            inputs.append(next_scale_input(F_BdHW, schedule[k + 1]))
    return torch.cat(inputs, dim=1), F_BdHW


def _split(x_BLd, schedule):
    return list(torch.split(x_BLd, [h * w for h, w in schedule], dim=1))


def test_encode_to_bits_shapes_and_first_scale_is_the_sign_of_the_mean():
    f = _latent()
    bits, F_BdHW = encode_to_bits(f, SCHEDULE)
    assert [tuple(b.shape) for b in bits] == [(2, h * w, D) for h, w in SCHEDULE]
    assert all(b.dtype == torch.int64 and set(b.unique().tolist()) <= {0, 1} for b in bits)
    assert torch.equal(bits[0][:, 0], (f.mean(dim=(2, 3)) > 0).long())
    assert F_BdHW.shape == f.shape


def test_bits_are_row_major():
    f = torch.randn(1, D, 2, 3)
    bits, _ = encode_to_bits(f, [(2, 3)])
    for i in range(2):
        for j in range(3):
            assert torch.equal(bits[0][0, i * 3 + j], (f[0, :, i, j] > 0).long())


def test_every_scale_adds_unit_norm_codes():
    bits, _ = encode_to_bits(_latent(), SCHEDULE)
    for b in bits:
        torch.testing.assert_close(bits_to_codes(b).norm(dim=-1), torch.ones(b.shape[:2]))


def test_bits_to_latent_reproduces_the_accumulated_latent():
    bits, F_BdHW = encode_to_bits(_latent(), SCHEDULE)
    assert torch.equal(bits_to_latent(bits, SCHEDULE), F_BdHW)


def test_teacher_forcing_without_flips_matches_encoding_and_the_inference_loop():
    f = _latent()
    labels, inputs = teacher_forcing(f, SCHEDULE)
    bits, F_BdHW = encode_to_bits(f, SCHEDULE)
    L = token_count(SCHEDULE)
    assert labels.shape == (2, L, D) and labels.dtype == torch.int64
    assert inputs.shape == (2, L - 1, D)
    assert torch.equal(labels, torch.cat(bits, dim=1))
    loop_inputs, loop_F = _scale_loop_inputs(_split(labels, SCHEDULE), SCHEDULE)
    assert torch.equal(loop_inputs, inputs)
    assert torch.equal(loop_F, F_BdHW)
    # The input of scale 2 is the first code (1x1) resized to 2x2, i.e. repeated.
    assert torch.equal(inputs[:, :4], bits_to_codes(labels[:, :1]).expand(-1, 4, -1))


def test_zero_flip_probability_changes_nothing():
    f = _latent()
    clean = teacher_forcing(f, SCHEDULE)
    flipped = teacher_forcing(f, SCHEDULE, flip_probs=[0.0] * len(SCHEDULE), generator=torch.Generator().manual_seed(1))
    assert torch.equal(clean[0], flipped[0]) and torch.equal(clean[1], flipped[1])


def test_flips_feed_corrupted_codes_and_labels_correct_them():
    f = _latent()
    probs = [0.3, 0.2, 0.1, 0.25, 0.3]
    labels, inputs = teacher_forcing(f, SCHEDULE, flip_probs=probs, generator=torch.Generator().manual_seed(7))
    clean_labels, clean_inputs = teacher_forcing(f, SCHEDULE)
    assert torch.equal(labels[:, :1], clean_labels[:, :1])  # the first scale sees F = 0
    assert not torch.equal(labels, clean_labels) and not torch.equal(inputs, clean_inputs)

    # Replay: the same generator gives the same masks; labels are the clean bits of the residual
    # against the F built from the flipped bits.
    generator = torch.Generator().manual_seed(7)
    F_BdHW = torch.zeros_like(f)
    expected_inputs = []
    for k, (grid, label) in enumerate(zip(SCHEDULE, _split(labels, SCHEDULE), strict=True)):
        residual = f - F_BdHW
        if grid != (8, 8):
            residual = F.adaptive_avg_pool2d(residual, grid)
        assert torch.equal(label, (residual > 0).long().flatten(2).transpose(1, 2))
        mask = (torch.rand(label.shape, generator=generator) < probs[k]).long()
        F_BdHW = accumulate_scale(F_BdHW, label ^ mask, grid)
        if k + 1 < len(SCHEDULE):
            expected_inputs.append(next_scale_input(F_BdHW, SCHEDULE[k + 1]))
    assert torch.equal(inputs, torch.cat(expected_inputs, dim=1))


def test_flip_probability_one_negates_the_codes():
    f = _latent()
    labels, inputs = teacher_forcing(f, SCHEDULE, flip_probs=[1.0, 0, 0, 0, 0])
    assert torch.equal(inputs[:, :4], -bits_to_codes(labels[:, :1]).expand(-1, 4, -1))


def test_flips_are_reproducible_with_a_generator():
    f = _latent()
    probs = [0.3] * len(SCHEDULE)
    a = teacher_forcing(f, SCHEDULE, probs, torch.Generator().manual_seed(3))
    b = teacher_forcing(f, SCHEDULE, probs, torch.Generator().manual_seed(3))
    c = teacher_forcing(f, SCHEDULE, probs, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_teacher_forcing_carries_no_gradient_and_handles_one_scale():
    f = _latent().requires_grad_()
    labels, inputs = teacher_forcing(f, SCHEDULE)
    assert not inputs.requires_grad
    labels, inputs = teacher_forcing(f[..., :1, :1], [(1, 1)])
    assert labels.shape == (2, 1, D) and inputs.shape == (2, 0, D)


def test_encode_to_bits_passes_a_straight_through_gradient():
    f = _latent().requires_grad_()
    _, F_BdHW = encode_to_bits(f, SCHEDULE)
    (F_BdHW * torch.randn_like(F_BdHW)).sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_sample_flip_probs_draws_from_the_grid_per_scale():
    generator = torch.Generator().manual_seed(0)
    probs = sample_flip_probs(2000, generator=generator)
    assert len(probs) == 2000
    steps = {round(p / 0.01) for p in probs}
    assert steps == set(range(31))  # every value 0, 0.01, ..., 0.30 occurs, nothing else
    assert all(abs(p - round(p / 0.01) * 0.01) < 1e-12 for p in probs)
    assert sample_flip_probs(13, generator=torch.Generator().manual_seed(5)) == sample_flip_probs(
        13, generator=torch.Generator().manual_seed(5)
    )
    assert set(sample_flip_probs(50, max_prob=0.0)) == {0.0}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_to_bits(torch.randn(1, D, 4, 4), SCHEDULE), "last grid"),
        (lambda: encode_to_bits(torch.randn(D, 8, 8), SCHEDULE), "must be \\(B, d, H, W\\)"),
        (lambda: teacher_forcing(torch.randn(1, D, 8, 8), SCHEDULE, flip_probs=[0.1]), "5 scales"),
        (lambda: teacher_forcing(torch.randn(1, D, 8, 8), SCHEDULE, flip_probs=[1.5] * 5), "\\[0, 1\\]"),
        (lambda: accumulate_scale(torch.zeros(1, D, 8, 8), torch.zeros(1, 4, D), (1, 1)), "must be \\(B, 1, 8\\)"),
        (lambda: bits_to_latent([torch.zeros(1, 1, D)], SCHEDULE), "1 scales"),
        (lambda: sample_flip_probs(3, max_prob=2.0), "max_prob"),
        (lambda: encode_to_bits(torch.randn(1, D, 8, 8), []), "empty"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
