"""The inference memory estimate behind `vargpt inspect`: each term checked against what the code holds."""

from __future__ import annotations

import pytest
import torch

from vargpt import VARGPTForConditionalGeneration
from vargpt.configuration import VARGPTConfig
from vargpt.memory_plan import GPU_SIZES_GB, format_memory_table, inference_memory, memory_table, weight_bytes


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the loaded model holds (packed weights, their scales and quantization state)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # NF4: absmax and its second-level scales live outside the parameter
            for t in (state.absmax, getattr(state.state2, "absmax", None) if state.nested else None):
                total += 0 if t is None else t.numel() * t.element_size()
        scales = getattr(getattr(module, "weight", None), "SCB", None)
        if scales is not None:  # int8: one scale per row
            total += scales.numel() * scales.element_size()
    return total


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_bf16_weights_are_every_tensor_at_two_bytes():
    config = VARGPTConfig.from_preset("tiny")
    model = VARGPTForConditionalGeneration(config).to(torch.bfloat16)
    assert weight_bytes(config, "bf16") == _held_bytes(model)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_match_what_bitsandbytes_holds(checkpoint, mode):
    model = VARGPTForConditionalGeneration.from_pretrained(checkpoint, quantization=mode)
    estimate, held = weight_bytes(model.config, mode), _held_bytes(model)
    assert abs(estimate - held) <= 0.05 * held, (estimate, held)
    assert estimate < weight_bytes(model.config, "bf16")


def test_full_size_weights_are_the_published_sizes():
    config = VARGPTConfig.from_preset("vargpt-v1.1")
    assert weight_bytes(config, "bf16") / 1e9 == pytest.approx(21.9, abs=0.05)
    assert weight_bytes(config, "int8") < weight_bytes(config, "bf16") * 0.65
    assert weight_bytes(config, "int4") < weight_bytes(config, "int8") * 0.75


def test_caches_scale_with_batch_resolution_and_guidance():
    config = VARGPTConfig.from_preset("vargpt-v1.1")
    one = inference_memory(config, resolution=256, batch_size=1)
    eight = inference_memory(config, resolution=256, batch_size=8)
    assert eight.decoder_kv_cache == 8 * one.decoder_kv_cache
    assert eight.llm_kv_cache == 8 * one.llm_kv_cache
    # 521 scale tokens + 64 prompt tokens, 32 blocks, keys and values of width 2048 in bf16, two guidance rows
    assert one.decoder_kv_cache == 2 * (521 + 64) * 32 * 2 * 2048 * 2
    # 28 layers, 4 KV heads of 128, bf16; prompt + start token + 521 scale tokens, one cached branch
    assert one.llm_kv_cache == (64 + 1 + 521) * 28 * 2 * 4 * 128 * 2
    null = inference_memory(config, resolution=256, batch_size=1, uncond_mode="null_prompt")
    assert null.llm_kv_cache == 2 * one.llm_kv_cache
    assert inference_memory(config, resolution=512).total > one.total


def test_table_covers_every_setting_and_says_what_fits():
    config = VARGPTConfig.from_preset("vargpt-v1.1")
    rows = memory_table(config)
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row["fits"] == [s for s in GPU_SIZES_GB if row["memory"].total <= 0.95 * s * 1e9]
    bf16_256 = next(r for r in rows if (r["weights"], r["resolution"], r["batch"]) == ("bf16", 256, 1))
    assert 24 not in bf16_256["fits"]  # 21.9 GB of weights alone leave a 24 GB card no room
    text = format_memory_table(config)
    assert text.count("\n") == 13 and "int4" in text


def test_cpu_estimate_counts_the_fp32_vae_and_the_int8_unpacking():
    """On a CPU the pipeline keeps the VAE in fp32 and bitsandbytes' int8 matmul unpacks one weight to fp32."""
    config = VARGPTConfig.from_preset("vargpt-v1.1")
    gpu = inference_memory(config, weight_format="int8", resolution=256, device="cuda")
    cpu = inference_memory(config, weight_format="int8", resolution=256, device="cpu")
    vae_values = 110_118_083  # the published VAE's values, buffers included
    assert cpu.weights - gpu.weights == 2 * vae_values
    assert cpu.activations >= gpu.activations + 4 * 18944 * 3584
