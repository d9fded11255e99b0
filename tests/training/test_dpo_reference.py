"""The DPO reference without a second full model: a snapshot of the trainable tensors, or the peft base."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.test_modeling import make_tiny_model
from tests.training.test_trainer import args, dpo_model_and_pairs, stack_pairs
from vargpt import VARGPTConfig
from vargpt.training.stages import apply_stage, get_stage
from vargpt.training.trainer import ImageDPOTrainer, image_log_probs, reference_memory, tensor_bytes

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "chosen_nll_per_bit")


def train_dpo(tmp_path, reference: str, steps: int = 4, lr: float = 1e-3, model=None, pairs=None, **kw):
    if model is None:
        model, pairs = dpo_model_and_pairs(5, 4)
    trainer = ImageDPOTrainer(
        model=model,
        args=args(tmp_path / reference, steps, lr, **kw),
        train_dataset=pairs,
        data_collator=stack_pairs,
        reference=reference,
        chosen_nll_weight=0.5,
    )
    trainer.train()
    history = [{k: h[k] for k in STATS} for h in trainer.state.log_history if "loss" in h]
    return trainer, history


def first_batch(pairs):
    return stack_pairs([pairs[0], pairs[1]])


@pytest.mark.parametrize("steps,bf16", [(4, False), (2, True)])
def test_the_snapshot_reference_trains_exactly_like_the_deep_copy(tmp_path, steps, bf16):
    copied, copy_history = train_dpo(tmp_path, "copy", steps, bf16=bf16)
    snapped, snapshot_history = train_dpo(tmp_path, "snapshot", steps, bf16=bf16)
    assert copied.reference.kind == "copy" and snapped.reference.kind == "snapshot"
    assert len(snapshot_history) == steps
    assert snapshot_history == copy_history
    # the policies moved (margins grow) and ended on the same weights
    assert copy_history[-1]["rewards/margin"] != 0
    for (name, a), b in zip(copied.model.named_parameters(), snapped.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_snapshot_holds_only_the_trainable_tensors(tmp_path):
    model, pairs = dpo_model_and_pairs(6, 2)
    trainer = ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), train_dataset=pairs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainer.reference.nbytes == tensor_bytes(trainable)
    assert trainer.reference.nbytes < tensor_bytes(model.parameters()) / 2
    # the frozen parts are the policy's own: the reference runs the policy module, not a copy
    assert trainer.ref_model is model
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_names and not frozen_names & set(trainer.reference.weights)
    # and its clones own their storage
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not live & {t.untyped_storage().data_ptr() for t in trainer.reference.weights.values()}
    # the default picks the snapshot; the deep copy is the whole model again
    assert ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3)).reference.kind == "snapshot"
    copied = ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="copy")
    assert copied.reference.nbytes == tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def test_after_training_the_reference_still_scores_like_the_initial_model(tmp_path):
    model, pairs = dpo_model_and_pairs(7, 4)
    initial = copy.deepcopy(model).eval()
    trainer, _ = train_dpo(tmp_path, "snapshot", steps=3, lr=3e-3, model=model, pairs=pairs)
    batch = first_batch(pairs)["chosen"]
    with torch.no_grad():
        expected = image_log_probs(initial, batch, seed=11, noise=True)
        reference = trainer.reference.log_probs(model, batch, seed=11, noise=True)
        policy = image_log_probs(model.eval(), batch, seed=11, noise=True)
    # a snapshot that aliased the parameters (a view, or `detach()` without a clone) would have trained along
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)
    # the reference forward left the policy's train/eval flags as it found them
    model.train()
    model.vae_local.eval()
    trainer.reference.log_probs(model, batch, seed=11, noise=True)
    assert model.training and model.vargpt_gen.training and not model.vae_local.training


def test_the_explicit_ref_model_is_used_as_given(tmp_path):
    model, pairs = dpo_model_and_pairs(8, 2)
    other = make_tiny_model(9)
    trainer = ImageDPOTrainer(
        model=model, args=args(tmp_path, 1, 1e-3), train_dataset=pairs, data_collator=stack_pairs, ref_model=other
    )
    assert trainer.reference.kind == "copy" and trainer.ref_model is other
    assert not any(p.requires_grad for p in other.parameters())
    trainer.train()
    # a different reference than the policy: the first step's rewards are not zero
    assert trainer.state.log_history[0]["rewards/chosen"] != 0.0
    with pytest.raises(ValueError, match="not both"):
        ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), ref_model=other, reference="snapshot")


def test_bad_reference_requests_are_named(tmp_path):
    model, _ = dpo_model_and_pairs(8, 2)
    with pytest.raises(ValueError, match="reference must be one of"):
        ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="shared")
    with pytest.raises(ValueError, match="peft model"):
        ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="adapter")
    frozen = make_tiny_model(8).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ImageDPOTrainer(model=frozen, args=args(tmp_path, 1, 1e-3))
    trainer = ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3))
    with pytest.raises(ValueError, match="another model"):
        trainer.reference.log_probs(make_tiny_model(8), {}, seed=None, noise=False)


def test_a_lora_model_references_its_base_with_the_adapters_disabled(tmp_path):
    peft = pytest.importorskip("peft")
    model, pairs = dpo_model_and_pairs(10, 4)
    base = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r"vargpt_gen\.block_chunks\..*\.(proj|fc1|fc2)")
    lora = peft.get_peft_model(model, config)
    assert any(p.requires_grad for p in lora.parameters())
    trainer, history = train_dpo(tmp_path, "auto", steps=4, lr=1e-2, model=lora, pairs=pairs)
    assert trainer.reference.kind == "adapter" and trainer.reference.nbytes == 0
    # a fresh LoRA (B = 0) is the base model: the first step compares equal scores
    first = history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["chosen_nll_per_bit"], rel=1e-5)
    batch = first_batch(pairs)["rejected"]
    with torch.no_grad():
        expected = image_log_probs(base, batch, seed=3, noise=True)
        reference = trainer.reference.log_probs(lora, batch, seed=3, noise=True)
        policy = image_log_probs(lora.eval(), batch, seed=3, noise=True)
    assert torch.allclose(reference, expected, rtol=1e-6, atol=1e-4)
    assert not torch.allclose(policy, expected, rtol=1e-6, atol=1e-4)
    # the adapters are enabled again afterwards
    assert not lora.base_model.model.vargpt_gen.block_chunks[0].module[0].ffn.fc1.disable_adapters


def test_reference_memory_counts_on_the_meta_device_what_a_real_model_holds(tmp_path):
    model = make_tiny_model(0)
    apply_stage(model, get_stage("stage3-dpo"))
    memory = reference_memory(VARGPTConfig.from_preset("tiny"), "stage3-dpo", torch.float32)
    trainer = ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3))
    assert memory.snapshot_bytes == trainer.reference.nbytes
    copied = ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="copy")
    assert memory.copy_bytes == copied.reference.nbytes
    assert memory.parameters == sum(p.numel() for p in model.parameters())
    half = reference_memory(VARGPTConfig.from_preset("tiny"), "stage3-dpo", torch.bfloat16)
    assert half.snapshot_bytes * 2 == memory.snapshot_bytes


class FSDPLikeDPOTrainer(ImageDPOTrainer):
    """Sees its parameters sharded, as under FSDP (a real FSDP launch needs several processes)."""

    def shards_parameters(self) -> bool:
        return True


def test_sharded_training_gets_no_snapshot_and_a_partitioned_model_no_copy(tmp_path):
    model, _ = dpo_model_and_pairs(8, 2)
    with pytest.warns(UserWarning, match="deep copy"):
        trainer = FSDPLikeDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3))
    assert trainer.reference.kind == "copy"
    with pytest.raises(ValueError, match="FSDP or DeepSpeed ZeRO-3"):
        FSDPLikeDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="snapshot")
    # a ZeRO-3 (zero.Init) parameter carries its partition as `ds_tensor`: a deep copy could not run
    model.lm_head.weight.ds_tensor = torch.empty(0)
    with pytest.raises(ValueError, match="partitioned"):
        ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), reference="copy")
