import pytest
import torch
import torch.nn.functional as F

from vargpt.image_tokenizer import BinarySphericalQuantizer, bits_to_codes, quantize


@pytest.mark.parametrize("d", [8, 32])
def test_codes_are_signed_unit_vectors(d):
    bits = torch.randint(0, 2, (5, 7, d))
    codes = bits_to_codes(bits)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(5, 7))
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, d**-0.5))
    assert torch.equal(codes > 0, bits.bool())
    assert bits_to_codes(bits.bool(), dtype=torch.float64).dtype == torch.float64


def test_quantize_takes_the_sign_along_the_channel_dim():
    residual = torch.tensor([[[[0.5]], [[-0.2]], [[0.0]], [[3.0]]]])  # (1, 4, 1, 1)
    bits, codes = quantize(residual, dim=1)
    assert bits.dtype == torch.int64
    assert bits.flatten().tolist() == [1, 0, 0, 1]
    assert torch.equal(codes.flatten(), torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_straight_through_gradient_is_that_of_the_normalised_input():
    residual = torch.randn(2, 8, 3, 3, requires_grad=True)
    weight = torch.randn(2, 8, 3, 3)
    bits, codes = quantize(residual, dim=1)
    assert torch.equal(codes.detach(), bits_to_codes(bits.movedim(1, -1)).movedim(-1, 1))
    (codes * weight).sum().backward()
    expected = torch.autograd.grad((F.normalize(residual, dim=1) * weight).sum(), residual)[0]
    assert residual.grad is not None and residual.grad.abs().sum() > 0
    torch.testing.assert_close(residual.grad, expected)


def test_mask_buffer_matches_the_original_and_packs_bits():
    quantizer = BinarySphericalQuantizer(8)
    assert quantizer.mask.dtype == torch.int64
    assert quantizer.mask.tolist() == [128, 64, 32, 16, 8, 4, 2, 1]
    assert "mask" in quantizer.state_dict()
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert quantizer.bits_to_indices(bits).tolist() == [131, 0]
    assert torch.equal(quantizer.indices_to_bits(quantizer.bits_to_indices(bits)), bits)
    assert BinarySphericalQuantizer(32).mask[0].item() == 2**31


def test_quantizer_rejects_wrong_channel_counts():
    quantizer = BinarySphericalQuantizer(8)
    with pytest.raises(ValueError, match="4 channels"):
        quantizer(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="6 channels"):
        quantizer.bits_to_codes(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="bits must be"):
        BinarySphericalQuantizer(0)
