import pytest
import torch

from tests.reference_keys import load_reference_keys
from vargpt.image_tokenizer import BSQVAE, ImageTokenizerConfig, encode_to_bits
from vargpt.schedule import scale_schedule


def test_full_size_state_dict_matches_the_original_vae_local():
    reference = {name.removeprefix("vae_local."): ref for name, ref in load_reference_keys("vae_local.").items()}
    with torch.device("meta"):
        vae = BSQVAE(ImageTokenizerConfig())
    state = vae.state_dict()
    assert len(reference) == 269
    assert set(state) == set(reference)
    buffers = {name for name, _ in vae.named_buffers()}
    for name, tensor in state.items():
        ref = reference[name]
        assert tuple(tensor.shape) == ref.shape, name
        assert str(tensor.dtype).removeprefix("torch.") == ref.dtype, name
        assert (name in buffers) == ref.is_buffer, name
    assert sum(t.numel() for t in state.values()) == 110_118_083
    assert vae.stride == 16


def test_tiny_vae_encodes_and_decodes_with_the_right_shapes(tiny_config):
    torch.manual_seed(0)
    vae = BSQVAE(tiny_config).eval()
    assert vae.stride == 4
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(images)
        assert latent.shape == (2, 8, 8, 12) and latent.dtype == torch.float32
        assert vae.decode(latent).shape == (2, 3, 32, 48)


def test_decode_clamps_to_unit_range(tiny_config):
    torch.manual_seed(0)
    vae = BSQVAE(tiny_config).eval()
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(100)
        latent = torch.randn(1, 8, 4, 4)
        raw = vae.decoder(latent)
        images = vae.decode(latent)
    assert raw.abs().max() > 1
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, raw.clamp(-1, 1))


def test_tiny_state_dict_uses_the_original_layout(tiny_config):
    state = BSQVAE(tiny_config).state_dict()
    assert state["encoder.down.1.block.0.nin_shortcut.conv.weight"].shape == (16, 8, 1, 1)
    assert "encoder.down.2.downsample.conv.conv.weight" not in state
    assert "encoder.down.1.downsample.conv.conv.weight" in state
    assert "decoder.up.0.upsample.conv.conv.weight" not in state
    assert "decoder.up.2.upsample.conv.conv.weight" in state
    assert "decoder.up.0.block.1.norm1.norm.weight" in state  # one more block than the encoder
    assert state["quantizer.lfq.mask"].tolist() == [128, 64, 32, 16, 8, 4, 2, 1]


def test_bad_inputs_raise(tiny_config):
    vae = BSQVAE(tiny_config)
    with pytest.raises(ValueError, match="images must be"):
        vae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the stride 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    odd = ImageTokenizerConfig(base_channels=6, channel_multipliers=[1, 2], num_res_blocks=1, norm_groups=4, bits=8)
    with pytest.raises(ValueError, match="groups"):
        BSQVAE(odd)


def test_straight_through_gradient_reaches_the_encoder(tiny_config):
    torch.manual_seed(0)
    vae = BSQVAE(tiny_config)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    bits, latent = vae.quantizer(vae.encode(images), scale_schedule(32, stride=4))
    assert len(bits) == 5
    vae.decode(latent).pow(2).mean().backward()
    grad = vae.encoder.conv_in.conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(latent.detach(), encode_to_bits(vae.encode(images).detach(), scale_schedule(32, stride=4))[1])
