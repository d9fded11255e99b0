"""The decoder's parameter layout is the original checkpoint's, and its initialisation is Infinity's."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.reference_keys import load_reference_keys
from vargpt.visual_decoder import InfinityDecoder, VisualDecoderConfig

from .helpers import tiny_config

PREFIX = "vargpt_gen."


@pytest.fixture(scope="module")
def full_size() -> InfinityDecoder:
    with torch.device("meta"):
        return InfinityDecoder(VisualDecoderConfig())


def test_full_size_state_dict_matches_original_keys(full_size: InfinityDecoder) -> None:
    reference = {name[len(PREFIX) :]: tensor for name, tensor in load_reference_keys(PREFIX).items()}
    state = full_size.state_dict()
    assert len(reference) == 694
    assert sorted(state) == sorted(reference)
    for name, expected in reference.items():
        assert tuple(state[name].shape) == expected.shape, name
        assert str(state[name].dtype).removeprefix("torch.") == expected.dtype, name


def test_full_size_buffers_are_the_original_persistent_buffers(full_size: InfinityDecoder) -> None:
    reference = load_reference_keys(PREFIX)
    expected = {name[len(PREFIX) :] for name, tensor in reference.items() if tensor.is_buffer}
    assert {name for name, _ in full_size.named_buffers()} == expected
    assert sum(t.numel() for t in full_size.state_dict().values()) == 2_204_697_152


def test_full_size_structure(full_size: InfinityDecoder) -> None:
    assert len(full_size.block_chunks) == 8
    assert all(len(chunk.module) == 4 for chunk in full_size.block_chunks)
    assert full_size.blocks[0].ffn.fc1.out_features == 8192
    assert full_size.text_proj_for_sos.ca.num_heads == 16
    rates = [block.drop_path.rate for block in full_size.blocks]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(rates))


def test_initialisation_follows_infinity() -> None:
    torch.manual_seed(0)
    decoder = InfinityDecoder(tiny_config(depth=4, num_block_chunks=2))
    block = decoder.blocks[1]
    assert torch.allclose(block.sa.scale_mul_1H11, torch.full_like(block.sa.scale_mul_1H11, math.log(4.0)))
    assert torch.count_nonzero(block.sa.q_bias) == 0 and torch.count_nonzero(block.ca.v_bias) == 0
    assert torch.count_nonzero(block.sa.zero_k_bias) == 0
    # AdaLN gates start tiny but not zero: randn / sqrt(C) * 1e-3
    assert 0 < block.ada_gss.abs().max() < 1e-2
    assert decoder.head.weight.std() < 0.02 * 0.05
    assert torch.count_nonzero(decoder.head.bias) == 0
    # cfg_uncond: truncated normal (std 1.2, cut at +-2) from seed 0, divided by sqrt(context_dim)
    scaled = decoder.cfg_uncond * math.sqrt(32)
    assert scaled.abs().max() <= 2.0
    assert 0.7 < scaled.std() < 1.1
    again = InfinityDecoder(tiny_config(depth=4, num_block_chunks=2))
    assert torch.equal(again.cfg_uncond, decoder.cfg_uncond)


def test_tiny_ffn_keeps_its_ratio() -> None:
    decoder = InfinityDecoder(tiny_config())
    assert decoder.blocks[0].ffn.fc1.out_features == 64


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="block chunks"):
        InfinityDecoder(tiny_config(depth=3, num_block_chunks=2))
    with pytest.raises(ValueError, match="num_heads"):
        InfinityDecoder(tiny_config(num_heads=3))
