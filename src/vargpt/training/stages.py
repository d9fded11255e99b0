"""Which parts of the model each training stage updates (the report's freeze plans, section 3.2).

A plan names state-dict prefixes to train; everything else is frozen. Plans are data, so a recipe can
select one by name and override it (`StagePlan.with_trainable(...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

GENERATION_HEAD = ("image_gen_projector.", "image_gen_projector_out.", "sos_embedding.")
LLM = ("model.", "lm_head.")
DECODER = ("vargpt_gen.",)
VIT = ("visual.",)


@dataclass(frozen=True)
class StagePlan:
    """A training stage: what trains and the paper's default optimisation settings."""

    name: str
    trainable: tuple[str, ...]
    learning_rate: float
    description: str
    kind: str = "sft"  # "sft" or "dpo"

    def with_trainable(self, *prefixes: str) -> StagePlan:
        return replace(self, trainable=tuple(prefixes))


STAGES: dict[str, StagePlan] = {
    "stage1-projectors": StagePlan(
        "stage1-projectors", GENERATION_HEAD, 1e-3, "pretrain the generation projectors on image generation"
    ),
    "stage2-llm": StagePlan(
        "stage2-llm", LLM, 5e-5, "SFT of the LLM on mixed understanding + generation (ViT, VAE, decoder frozen)"
    ),
    "stage3-decoder": StagePlan(
        "stage3-decoder", DECODER + GENERATION_HEAD, 5e-5, "SFT of the visual decoder and both projectors"
    ),
    "stage3-dpo": StagePlan(
        "stage3-dpo", DECODER + GENERATION_HEAD, 1e-6, "DPO on image-token log-probs (decoder + projectors)", "dpo"
    ),
    "edit": StagePlan("edit", VIT + LLM + DECODER + GENERATION_HEAD, 5e-5, "editing SFT: everything but the VAE"),
}


def apply_stage(model: nn.Module, plan: StagePlan) -> dict[str, int]:
    """Set `requires_grad` per the plan; return trainable and frozen parameter counts.

    The image tokenizer (`vae_local.`) never trains inside the unified model: it has its own trainer.
    """
    if any(p.startswith("vae_local.") for p in plan.trainable):
        raise ValueError("the image tokenizer trains on its own (vargpt.training.vae_training), not inside a stage")
    trainable = frozen = 0
    for name, param in model.named_parameters():
        train = name.startswith(plan.trainable)
        param.requires_grad_(train)
        count = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter is empty here
        if train:
            trainable += count
        else:
            frozen += count
    if trainable == 0:
        raise ValueError(f"stage {plan.name!r} trains nothing: no parameter starts with {plan.trainable}")
    return {"trainable": trainable, "frozen": frozen}


def get_stage(name: str, trainable: tuple[str, ...] | list[str] | None = None) -> StagePlan:
    """The named plan, with its trainable prefixes replaced by `trainable` when given (a recipe's or the
    command line's override)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    plan = STAGES[name]
    return plan.with_trainable(*trainable) if trainable else plan
