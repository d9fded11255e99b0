"""transformers' gradient-checkpointing switch reaches the LLM's layers, the ViT's blocks and the visual decoder's
blocks, and recomputing activations leaves every gradient as it was.

Both passes run the same float operations in the same order (the recomputation replays the block's forward
exactly; dropout, drop path, bit flips and condition dropout are all off), so the gradients are compared for
exact equality: any difference would be a changed computation, not rounding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import pytest
import torch

from tests.test_modeling import generation_sample, image_prompt, make_tiny_model
from tests.training.test_trainer import targets
from vargpt.training.lora import LoraSettings, apply_lora


def batches(model) -> list[dict]:
    """One understanding batch (ViT + text loss) and one generation batch (decoder + bit loss), noise off."""
    ids, mask, pixels, grid = image_prompt(model)
    understanding = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "labels": ids.masked_fill(ids == model.config.image_token_id, -100),
    }
    gen_ids, gen_labels = generation_sample(model)
    generation = {"input_ids": gen_ids.expand(2, -1), "labels": gen_labels.expand(2, -1)}
    generation["pixel_gen_values"] = targets(2, 1)
    generation["image_noise"] = False
    return [understanding, generation]


def gradients(model, data: list[dict]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for batch in data:
        model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def watched(model) -> dict[str, torch.nn.Module]:
    """A module inside each checkpointed block kind: called again during backward when its block recomputes.

    (The LLM's and ViT's layers checkpoint their raw `forward`, so hooks on the layers themselves do not see the
    replay; their children are called as modules inside it.)"""
    return {
        "llm": model.model.layers[0].self_attn,
        "vit": model.visual.blocks[0].attn,
        "decoder": model.vargpt_gen.blocks[0].sa,
    }


def count_calls(model, data: list[dict]) -> Counter:
    calls: Counter = Counter()
    handles = [
        module.register_forward_hook(lambda *_, key=key: calls.update([key]))
        for key, module in watched(getattr(model, "get_base_model", lambda: model)()).items()
    ]
    try:
        gradients(model, data)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def enable(model, api: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is the deprecated alias
        getattr(model, api)()


@pytest.mark.parametrize("api", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_the_transformers_switch_makes_every_block_kind_recompute(api):
    model = make_tiny_model(21).train()
    data = batches(model)
    assert count_calls(model, data) == {"llm": 2, "vit": 1, "decoder": 1}  # llm: one call per batch
    enable(model, api)
    assert model.is_activation_checkpointing and model.vargpt_gen.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    # each watched module now runs twice per batch: the forward, then the replay during backward
    assert count_calls(model, data) == {"llm": 4, "vit": 2, "decoder": 2}
    model.eval()  # no recomputation outside training
    assert count_calls(model, data) == {"llm": 2, "vit": 1, "decoder": 1}
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    assert not model.vargpt_gen.gradient_checkpointing
    assert count_calls(model, data) == {"llm": 2, "vit": 1, "decoder": 1}


def test_the_decoder_uses_the_checkpoint_function_transformers_configured():
    """Keyword arguments given to the switch (here a `context_fn`, which `torch.utils.checkpoint` calls once
    per checkpointed call) reach the decoder's blocks as they reach the LLM's and the ViT's layers."""
    model = make_tiny_model(24).train()
    data = batches(model)
    entered = []

    def context_fn():
        entered.append(1)
        return contextlib.nullcontext(), contextlib.nullcontext()

    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )
    gradients(model, data)
    blocks = 2 * len(model.model.layers) + len(model.visual.blocks) + len(model.vargpt_gen.blocks)
    assert len(entered) == blocks


def test_checkpointed_gradients_equal_the_plain_ones_for_every_parameter():
    model = make_tiny_model(22).train()
    data = batches(model)
    plain = gradients(model, data)
    enable(model, "gradient_checkpointing_enable")
    checkpointed = gradients(model, data)
    assert plain.keys() == checkpointed.keys()
    # every part that the two batches reach has gradients: ViT, LLM, decoder blocks, projectors
    for prefix in ("visual.blocks.", "model.layers.", "vargpt_gen.block_chunks.", "image_gen_projector."):
        assert any(n.startswith(prefix) for n in plain), prefix
    differing = [n for n in plain if not torch.equal(plain[n], checkpointed[n])]
    assert differing == []


def test_checkpointed_lora_gradients_equal_the_plain_ones():
    model = make_tiny_model(23).train()
    data = batches(model)
    lora = apply_lora(model, LoraSettings(rank=2, alpha=4, dropout=0.0))
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero as well
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    plain = gradients(lora, data)
    enable(lora, "gradient_checkpointing_enable")
    assert model.vargpt_gen.gradient_checkpointing and model.model.layers[0].gradient_checkpointing
    assert count_calls(lora, data) == {"llm": 4, "vit": 2, "decoder": 2}
    checkpointed = gradients(lora, data)
    assert plain.keys() == checkpointed.keys() and all(".lora_" in n for n in plain)
    assert len(plain) == 2 * 7 * (2 + 2)  # A and B of 7 targets in each of 2 LLM layers and 2 decoder blocks
    assert [n for n in plain if not torch.equal(plain[n], checkpointed[n])] == []
