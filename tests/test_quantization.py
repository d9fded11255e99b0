"""Weight-only int8 / 4-bit loading (bitsandbytes) on the tiny preset.

Tolerances, relative to the largest reference logit: int8 3%, 4-bit 25%. Why those numbers: LLM.int8 rounds
each weight to 1/127 of its row's largest value and the model computes in bf16 (bf16 alone measures 0.6% on
these logits, int8 1.4%); NF4 has 16 levels per block of 64 weights, an order of magnitude coarser (measured
12%). A random tiny model has no margin between its logits, so the argmax is not a fair check at 4 bits.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from vargpt import VARGPTForConditionalGeneration, VARGPTPipeline, VARGPTProcessor
from vargpt.quantization import high_precision_modules

TOLERANCE = {"int8": 0.03, "int4": 0.25}
QUANTIZED_TYPES = {"int8": bnb.nn.Linear8bitLt, "int4": bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def reference(checkpoint):
    return VARGPTForConditionalGeneration.from_pretrained(checkpoint).eval()


def _text_inputs(checkpoint):
    processor = VARGPTProcessor.from_pretrained(checkpoint)
    return processor(text=["a red circle above a blue square", "hello"], return_tensors="pt")


def _image_inputs(model, bits_NLd):
    """A prompt followed by one `<|image_gen_start|>` block, teacher-forcing `bits_NLd`."""
    cfg = model.config
    pads = model.num_image_gen_pad_tokens(model.generation_schedule())
    ids = [5, 17, 29, cfg.image_gen_start_token_id, *[cfg.image_gen_pad_token_id] * pads, cfg.image_gen_end_token_id]
    return {"input_ids": torch.tensor([ids]), "image_gen_labels": bits_NLd}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_full_precision_model(checkpoint, reference, mode):
    model = VARGPTForConditionalGeneration.from_pretrained(checkpoint, quantization=mode).eval()
    text = _text_inputs(checkpoint)
    schedule = reference.generation_schedule()
    shape = (1, sum(h * w for h, w in schedule), reference.config.visual_decoder_config.bits)
    bits = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_text, got_text = reference(**text).logits, model(**text).logits.float()
        image = _image_inputs(reference, bits)
        ref_bits, got_bits = reference(**image).image_logits, model(**image).image_logits.float()
    for ref, got in ((ref_text, got_text), (ref_bits, got_bits)):
        error = (got - ref).abs().max().item() / ref.abs().max().item()
        assert 0 < error <= TOLERANCE[mode]  # > 0: the weights really were quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_only_the_llm_layers_and_decoder_blocks_are_quantized(checkpoint, mode):
    model = VARGPTForConditionalGeneration.from_pretrained(checkpoint, quantization=mode)
    kind = QUANTIZED_TYPES[mode]
    quantized = {name for name, module in model.named_modules() if isinstance(module, kind)}
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    inside = {n for n in linears if n.startswith(("model.layers.", "vargpt_gen.block_chunks."))}
    assert quantized == inside and inside
    kept = high_precision_modules(model)
    assert {"lm_head", "model.embed_tokens", "sos_embedding", "vae_local", "vargpt_gen.head", "visual"} <= set(kept)
    for name in ("lm_head", "vargpt_gen.head", "vargpt_gen.word_embed", "image_gen_projector.mlp.0"):
        assert model.get_submodule(name).weight.dtype == torch.bfloat16
    assert model.vae_local.decoder.conv_in.conv.weight.dtype == torch.bfloat16


def test_quantized_pipeline_chats_and_draws_and_refuses_to_save(checkpoint, tmp_path):
    pipe = VARGPTPipeline.from_pretrained(checkpoint, quantization="int8")
    assert pipe.model.dtype == torch.bfloat16  # quantized models compute in bf16 unless told
    assert isinstance(pipe.chat("what is this?", max_new_tokens=4), str)
    image = pipe.generate("a red circle", seed=0)[0]
    assert image.size == (32, 32)
    with pytest.raises(ValueError, match="quantized model cannot be saved"):
        pipe.model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_mode_is_one_clear_error(checkpoint):
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        VARGPTForConditionalGeneration.from_pretrained(checkpoint, quantization="int3")


def test_the_int8_cast_notice_is_logged_once_not_per_matmul(caplog):
    import logging

    from vargpt.quantization import INT8_CAST_NOTICE, _OnceFilter, log_int8_cast_once

    log_int8_cast_once()
    log_int8_cast_once()
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert sum(isinstance(f, _OnceFilter) for f in bnb_logger.filters) == 1  # installing twice adds one filter
    logger = logging.getLogger("vargpt.tests.once")  # a fresh filter on a fresh logger: nothing seen yet
    logger.addFilter(_OnceFilter(INT8_CAST_NOTICE))
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        logger.warning("another bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert sum(m.startswith(INT8_CAST_NOTICE) for m in messages) == 1
    assert "another bitsandbytes warning" in messages
