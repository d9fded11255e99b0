"""Freeze plans of the training stages."""

from __future__ import annotations

import pytest

from vargpt import VARGPTConfig, VARGPTForConditionalGeneration
from vargpt.training.stages import STAGES, apply_stage, get_stage


@pytest.fixture(scope="module")
def model():
    return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))


def trainable_modules(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("stage1-projectors", {"image_gen_projector", "image_gen_projector_out", "sos_embedding"}),
        ("stage2-llm", {"model", "lm_head"}),
        ("stage3-decoder", {"vargpt_gen", "image_gen_projector", "image_gen_projector_out", "sos_embedding"}),
        ("stage3-dpo", {"vargpt_gen", "image_gen_projector", "image_gen_projector_out", "sos_embedding"}),
        (
            "edit",
            {
                "visual",
                "model",
                "lm_head",
                "vargpt_gen",
                "image_gen_projector",
                "image_gen_projector_out",
                "sos_embedding",
            },
        ),
    ],
)
def test_each_stage_trains_exactly_its_modules(model, stage, expected):
    counts = apply_stage(model, get_stage(stage))
    assert trainable_modules(model) == expected
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    assert "vae_local" not in trainable_modules(model)


def test_overrides_and_errors(model):
    plan = STAGES["stage2-llm"].with_trainable("lm_head.")
    apply_stage(model, plan)
    assert trainable_modules(model) == {"lm_head"}
    with pytest.raises(ValueError, match="trains nothing"):
        apply_stage(model, plan.with_trainable("nothing."))
    with pytest.raises(ValueError, match="image tokenizer"):
        apply_stage(model, plan.with_trainable("vae_local."))
    with pytest.raises(ValueError, match="unknown stage"):
        get_stage("stage9")
