"""The stage-trainer builder that `vargpt finetune` and the recipe runner share."""

from __future__ import annotations

import pytest
import torch

from vargpt.configuration import VARGPTConfig
from vargpt.data.collator import PreferenceCollator, SFTCollator
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.pipeline import preset_processor
from vargpt.training.resume import CompleteCheckpointCallback
from vargpt.training.stage_trainer import (
    StageSetup,
    build_stage_trainer,
    collator_settings,
    stage_training_arguments,
)
from vargpt.training.stages import apply_stage, get_stage
from vargpt.training.trainer import ImageDPOTrainer, VARGPTTrainer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")), preset_processor("tiny")


def _args(tmp_path, **extra):
    return stage_training_arguments(
        tmp_path, steps=3, batch_size=2, learning_rate=1e-3, seed=5, bf16=False, force_cpu=True, **extra
    )


def test_training_arguments_carry_the_shared_conventions_and_the_callers_extras(tmp_path):
    args = _args(tmp_path, warmup_ratio=0.25, save_steps=7, report_to=[])
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (3, 2, 1e-3)
    assert args.lr_scheduler_type == "cosine" and args.weight_decay == 0.0 and args.save_total_limit == 2
    assert args.seed == args.data_seed == 5 and args.remove_unused_columns is False
    assert args.warmup_steps == 0.25 and args.save_steps == 7 and args.use_cpu


def test_an_sft_plan_gets_the_sft_trainer_and_collator_with_the_stage_settings(tiny, tmp_path):
    model, processor = tiny
    apply_stage(model, get_stage("stage3-decoder"))
    setup = StageSetup(kind="sft", resolution=16, resize_ratio=1.0, prompt_dropout=0.25)
    trainer = build_stage_trainer(model, processor, [{"messages": []}], _args(tmp_path), setup)
    assert type(trainer) is VARGPTTrainer
    collator = trainer.data_collator
    assert isinstance(collator, SFTCollator) and collator.prompt_dropout == 0.25
    assert collator.num_image_gen_pad_tokens == collator_settings(model, 16)["num_image_gen_pad_tokens"]
    assert any(isinstance(c, CompleteCheckpointCallback) for c in trainer.callback_handler.callbacks)


def test_a_dpo_plan_gets_the_dpo_trainer_with_its_beta_and_nll_weight(tiny, tmp_path):
    model, processor = tiny
    plan = get_stage("stage3-dpo")
    apply_stage(model, plan)
    setup = StageSetup(kind=plan.kind, resolution=16, dpo_beta=0.3, dpo_chosen_nll_weight=0.5)
    trainer = build_stage_trainer(model, processor, [{"chosen": {}}], _args(tmp_path), setup)
    assert isinstance(trainer, ImageDPOTrainer) and isinstance(trainer.data_collator, PreferenceCollator)
    assert trainer.beta == 0.3 and trainer.chosen_nll_weight == 0.5


def test_a_trainable_override_replaces_the_plans_prefixes_and_a_bad_kind_is_refused():
    assert get_stage("stage3-decoder", ["sos_embedding."]).trainable == ("sos_embedding.",)
    assert get_stage("stage3-decoder", None) == get_stage("stage3-decoder")
    with pytest.raises(ValueError, match="'sft' or 'dpo'"):
        StageSetup(kind="rlhf", resolution=16)
