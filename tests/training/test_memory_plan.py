"""The training memory plan behind `vargpt inspect --train`: each term checked against the built model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vargpt import VARGPTForConditionalGeneration
from vargpt.cli.main import main
from vargpt.configuration import VARGPTConfig
from vargpt.data.collator import SFTCollator
from vargpt.data.formats import load_sft_dataset
from vargpt.pipeline import preset_processor
from vargpt.shapes.dataset import write_sharegpt_dataset
from vargpt.training.memory_plan import (
    TrainingSetup,
    activation_bytes,
    format_training_memory,
    resolve_plan,
    sequence_lengths,
    training_memory,
)
from vargpt.training.stages import STAGES, apply_stage


@pytest.fixture(scope="module")
def config():
    return VARGPTConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tiny_model(config):
    torch.manual_seed(0)
    return VARGPTForConditionalGeneration(config)


def _trained_values(model: nn.Module, stage: str) -> int:
    apply_stage(model, STAGES[stage])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("stage", ["stage1-projectors", "stage2-llm", "stage3-decoder", "edit"])
def test_fp32_weights_gradients_and_adamw_state_are_the_models_bytes(config, tiny_model, stage):
    trained = _trained_values(tiny_model, stage)
    held = sum(t.numel() * t.element_size() for t in [*tiny_model.parameters(), *tiny_model.buffers()])
    m = training_memory(config, TrainingSetup(stage=stage, resolution=32, precision="fp32", device="cpu"))
    assert m.counts.trained == trained
    assert m.weights == held
    assert m.gradients == 4 * trained
    assert m.optimizer == 8 * trained  # exp_avg and exp_avg_sq


def test_mixed_precision_keeps_bf16_weights_and_fp32_master_plus_moments(config, tiny_model):
    trained = _trained_values(tiny_model, "stage3-decoder")
    bf16 = tiny_model.to(torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in [*bf16.parameters(), *bf16.buffers()])
    tiny_model.float()
    m = training_memory(config, TrainingSetup(stage="stage3-decoder", resolution=32))
    assert m.weights == held
    assert m.gradients == 2 * trained
    assert m.optimizer == 12 * trained


def test_zero2_shards_gradients_and_optimizer_zero3_and_fsdp_shard_weights_too(config):
    one = training_memory(config, TrainingSetup(resolution=32, gpus=4, zero="none"))
    two = training_memory(config, TrainingSetup(resolution=32, gpus=4, zero="2"))
    three = training_memory(config, TrainingSetup(resolution=32, gpus=4, zero="3"))
    fsdp = training_memory(config, TrainingSetup(resolution=32, gpus=4, zero="fsdp"))
    assert two.weights == one.weights
    assert two.gradients == -(-one.gradients // 4) and two.optimizer == -(-one.optimizer // 4)
    for sharded in (three, fsdp):
        assert sharded.weights == -(-one.weights // 4)
        assert (sharded.gradients, sharded.optimizer) == (two.gradients, two.optimizer)
        assert sharded.gathered > 0  # the units gathered for compute
    assert one.activations == two.activations == three.activations  # data parallelism splits no sample
    assert three.total < two.total < one.total


def test_gradient_checkpointing_lowers_activations():
    full = VARGPTConfig.from_preset("vargpt-v1.1")
    for stage in ("stage2-llm", "stage3-decoder"):
        plain = training_memory(full, TrainingSetup(stage=stage, gpus=8, zero="3"))
        ckpt = training_memory(full, TrainingSetup(stage=stage, gpus=8, zero="3", gradient_checkpointing=True))
        assert ckpt.activations < plain.activations / 2
        assert ckpt.weights == plain.weights and ckpt.optimizer == plain.optimizer


def test_lora_trains_adapters_of_the_stages_linear_layers(config, tiny_model):
    rank = 4
    plan = STAGES["stage3-decoder"]
    adapters = sum(
        rank * (m.in_features + m.out_features)
        for name, m in tiny_model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(tuple(p.rstrip(".") for p in plan.trainable))
    )
    full = training_memory(config, TrainingSetup(resolution=32))
    lora = training_memory(config, TrainingSetup(resolution=32, lora_rank=rank))
    assert lora.counts.trained == adapters
    assert lora.gradients == 2 * adapters and lora.optimizer == 12 * adapters
    assert lora.gradients < full.gradients and lora.optimizer < full.optimizer
    qlora = training_memory(config, TrainingSetup(resolution=32, lora_rank=rank, quantize="int4"))
    assert qlora.weights < lora.weights


def test_dpo_doubles_saved_activations_and_keeps_a_reference_of_the_trained_parameters(config):
    sft = TrainingSetup(stage="stage3-decoder", resolution=32, batch=2)
    dpo = TrainingSetup(stage="stage3-dpo", resolution=32, batch=2)
    saved_sft, transient_sft = activation_bytes(config, sft, resolve_plan(sft))
    saved_dpo, transient_dpo = activation_bytes(config, dpo, resolve_plan(dpo))
    assert saved_dpo == 2 * saved_sft and transient_dpo == transient_sft
    m = training_memory(config, dpo)
    assert m.reference == 2 * m.counts.trained
    assert training_memory(config, sft).reference == 0


def _saved_by_autograd(model: nn.Module, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward, weights and buffers excluded."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("stage", ["stage2-llm", "stage3-decoder"])
def test_saved_activations_match_what_autograd_saves(config, tiny_model, stage, tmp_path):
    rows = write_sharegpt_dataset(tmp_path, "train", 0, 2, 0, image_size=32)
    dataset, _ = load_sft_dataset([str(rows)])
    pads = sequence_lengths(config, 32, 1)["pads"]
    collator = SFTCollator(preset_processor("tiny"), image_gen_resolution=32, num_image_gen_pad_tokens=pads)
    batch = collator([dataset[0], dataset[1]])
    apply_stage(tiny_model, STAGES[stage])
    tiny_model.train()
    measured = _saved_by_autograd(tiny_model, batch)
    prompt = batch["input_ids"].shape[1] - pads - 2
    setup = TrainingSetup(stage=stage, resolution=32, batch=2, precision="fp32", prompt_tokens=prompt)
    planned, _ = activation_bytes(config, setup, resolve_plan(setup))
    assert abs(planned - measured) <= 0.1 * measured, (planned, measured)


@pytest.mark.parametrize("stage", ["stage2-llm", "stage3-decoder"])
def test_text_head_term_is_what_the_text_loss_saves(config, tiny_model, stage, tmp_path):
    """The head's saved rows follow the labelled answer, not the image slots: the bytes autograd saves for the
    text loss (with labels against without) are the plan's head term for the batch's labelled tokens."""
    rows = write_sharegpt_dataset(tmp_path, "train", 0, 2, 0, image_size=32)
    dataset, _ = load_sft_dataset([str(rows)])
    pads = sequence_lengths(config, 32, 1)["pads"]
    collator = SFTCollator(preset_processor("tiny"), image_gen_resolution=32, num_image_gen_pad_tokens=pads)
    batch = collator([dataset[0], dataset[1]])
    apply_stage(tiny_model, STAGES[stage])
    tiny_model.train()
    with_text = _saved_by_autograd(tiny_model, {**batch, "image_noise": False})
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    without = _saved_by_autograd(tiny_model, {**unlabelled, "image_noise": False, "return_logits": False})
    ids, labels = batch["input_ids"], batch["labels"]
    read = int(((labels[:, 1:] != -100) & (ids[:, 1:] != config.image_gen_pad_token_id)).sum())
    assert read == 4  # two per generation sample: the planned default
    prompt = ids.shape[1] - pads - 2

    def planned(answer_tokens: int, resolution: int = 32) -> int:
        setup = TrainingSetup(
            stage=stage,
            resolution=resolution,
            batch=2,
            precision="fp32",
            prompt_tokens=prompt,
            answer_tokens=answer_tokens,
        )
        return activation_bytes(config, setup, resolve_plan(setup))[0]

    head = planned(2) - planned(0)
    assert head >= 2 * 2 * 4 * config.text_config.vocab_size  # at least the fp32 log-softmax of the read rows
    assert abs((with_text - without) - head) <= 0.05 * head, (with_text - without, head)
    # four times the slots: the same rows, and one more mask byte per slot
    more_slots = sequence_lengths(config, 64, prompt)["pads"] - pads
    assert planned(2, resolution=64) - planned(0, resolution=64) == head + 2 * more_slots


def test_table_names_every_part_and_the_gpus_it_fits():
    full = VARGPTConfig.from_preset("vargpt-v1.1")
    text = format_training_memory(full, TrainingSetup(stage="stage3-dpo", gpus=8, zero="3"))
    for part in ("weights", "gradients", "optimizer", "activations", "DPO reference", "total", "fits"):
        assert part in text


def test_cli_prints_the_training_table(capsys):
    code = main(["inspect", "--preset", "tiny", "--train", "stage3-decoder", "--resolution", "32", "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "training memory per rank: stage3-decoder" in out and "total (peak)" in out and "fits:" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "int4"], "needs --lora"),
        (["--gpus", "0"], "--gpus"),
        (["--resolution", "100"], "resolution"),
    ],
)
def test_cli_names_bad_settings(capsys, extra, message):
    code = main(["inspect", "--preset", "tiny", "--train", "stage3-decoder", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
