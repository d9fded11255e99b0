"""SFT, DPO and tokenizer training run on transformers' Trainer and learn."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from tests.test_modeling import generation_sample, make_tiny_model
from vargpt.image_tokenizer import BSQVAE
from vargpt.schedule import token_count
from vargpt.training.stages import apply_stage, get_stage
from vargpt.training.trainer import ImageDPOTrainer, VARGPTTrainer, device_arguments, dpo_loss, image_log_probs
from vargpt.training.vae_training import TokenizerTrainingModel, reconstruction_psnr


def targets(n: int, seed: int) -> torch.Tensor:
    """Flat-coloured squares on white: easy, distinct images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.ones(n, 3, 32, 32)
    for i in range(n):
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        y, x = torch.randint(0, 16, (2,), generator=g).tolist()
        images[i, :, y : y + 16, x : x + 16] = colour
    return images


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def sft_items(model, n=4):
    ids, labels = generation_sample(model)
    return [{"input_ids": ids[0], "labels": labels[0], "pixel_gen_values": t} for t in targets(n, 0)]


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def stack_pairs(batch):
    return {side: stack([r[side] for r in batch]) for side in ("chosen", "rejected")}


def dpo_model_and_pairs(seed: int, n: int):
    """A tiny model set up for DPO and `n` preference pairs on one prompt (distinct squares as winners/losers)."""
    model = make_tiny_model(seed).train()
    apply_stage(model, get_stage("stage3-dpo"))
    ids, _ = generation_sample(model)
    rows = [
        {
            "chosen": {"input_ids": ids[0], "pixel_gen_values": g},
            "rejected": {"input_ids": ids[0], "pixel_gen_values": b},
        }
        for g, b in zip(targets(n, 2), targets(n, 3), strict=True)
    ]
    return model, ListDataset(rows)


def args(tmp_path, steps, lr, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def test_sft_trainer_lowers_the_loss_and_logs_both_parts(tmp_path):
    model = make_tiny_model(3).train()
    apply_stage(model, get_stage("stage3-decoder"))
    data = ListDataset(sft_items(model))
    trainer = VARGPTTrainer(model=model, args=args(tmp_path, 30, 3e-3), train_dataset=data, data_collator=stack)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert "image_loss" in history[0] and "text_loss" in history[0]
    # 30 steps take the total to about 0.90 of its start (0.896 here, 0.902 with a GPU machine's 16 threads); a
    # model that does not learn (lr 0) ends at 0.998 of its start, so 0.95 separates the two
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first * 0.95
    assert sum(h["image_loss"] for h in history[-3:]) < sum(h["image_loss"] for h in history[:3])


def test_dpo_loss_is_log2_when_policy_equals_reference_and_shared_noise_is_exact():
    model = make_tiny_model(4).train()
    ids, _ = generation_sample(model)
    chosen = {"input_ids": ids, "pixel_gen_values": targets(1, 1)}
    a = image_log_probs(model, chosen, seed=7, noise=True)
    b = image_log_probs(model, chosen, seed=7, noise=True)
    c = image_log_probs(model, chosen, seed=8, noise=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    loss, stats = dpo_loss(a, a, a, a, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and stats["rewards/margin"] == 0


def test_dpo_trainer_prefers_the_chosen_images(tmp_path):
    model, pairs = dpo_model_and_pairs(5, 4)
    trainer = ImageDPOTrainer(
        model=model, args=args(tmp_path, 15, 1e-3), train_dataset=pairs, data_collator=stack_pairs, beta=0.1
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/margin"] > 0


def test_dpo_loss_adds_the_winners_per_bit_nll_when_weighted():
    model = make_tiny_model(4).train()
    ids, _ = generation_sample(model)
    chosen = {"input_ids": ids, "pixel_gen_values": targets(1, 1)}
    a, bits = image_log_probs(model, chosen, seed=7, noise=True, return_bit_count=True)
    assert torch.equal(a, image_log_probs(model, chosen, seed=7, noise=True))
    # one bit per latent channel for every token of every scale of the 32 px schedule
    schedule = model.generation_schedule(32)
    assert bits == token_count(schedule) * model.config.visual_decoder_config.bits
    plain, _ = dpo_loss(a, a, a, a, beta=0.1)
    weighted, stats = dpo_loss(a, a, a, a, beta=0.1, chosen_nll_weight=0.5, bits_per_image=bits)
    nll_per_bit = float(-a.mean()) / bits
    assert stats["chosen_nll_per_bit"] == pytest.approx(nll_per_bit)
    assert float(weighted) == pytest.approx(float(plain) + 0.5 * nll_per_bit, rel=1e-6)


def test_dpo_with_the_nll_term_keeps_the_winners_likelier_than_plain_dpo(tmp_path):
    finals = {}
    for weight in (0.0, 1.0):
        model, pairs = dpo_model_and_pairs(5, 4)
        trainer = ImageDPOTrainer(
            model=model,
            args=args(tmp_path / str(weight), 15, 1e-3),
            train_dataset=pairs,
            data_collator=stack_pairs,
            chosen_nll_weight=weight,
        )
        trainer.train()
        finals[weight] = [h for h in trainer.state.log_history if "loss" in h][-3:]
    chosen = {w: sum(h["rewards/chosen"] for h in last) / 3 for w, last in finals.items()}
    # both lower the winners against the reference here (-2.34 plain, -1.85 with the term); the term lowers them less
    assert chosen[1.0] > chosen[0.0]
    with pytest.raises(ValueError, match="chosen_nll_weight"):
        ImageDPOTrainer(model=model, args=args(tmp_path, 1, 1e-3), chosen_nll_weight=-1.0)


def test_dpo_reference_runs_in_the_policys_precision_and_training_releases_the_model(tmp_path):
    model, pairs = dpo_model_and_pairs(6, 2)
    trainer = ImageDPOTrainer(
        model=model, args=args(tmp_path, 1, 1e-3, bf16=True), train_dataset=pairs, data_collator=stack_pairs
    )
    trainer.train()
    first = trainer.state.log_history[0]
    # at the first step policy and reference are the same weights under the same bf16 autocast: equal scores
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    # afterwards the model is a plain module again (no autocast wrapper, not marked prepared), like one loaded
    # from disk, so the next stage's Trainer prepares it afresh
    assert "forward" not in vars(model) and not getattr(model, "_is_accelerate_prepared", False)
    again = ImageDPOTrainer(
        model=model, args=args(tmp_path, 1, 1e-3, bf16=True), train_dataset=pairs, data_collator=stack_pairs
    )
    again.train()
    assert again.state.log_history[0]["rewards/chosen"] == 0.0


def test_tokenizer_training_improves_reconstruction(tmp_path):
    torch.manual_seed(0)
    from vargpt import VARGPTConfig

    vae = BSQVAE(VARGPTConfig.from_preset("tiny").image_tokenizer_config)
    images = targets(8, 4)
    before = reconstruction_psnr(vae, images)
    data = ListDataset([{"pixel_values": x} for x in images])
    trainer = VARGPTTrainer(
        model=TokenizerTrainingModel(vae), args=args(tmp_path, 60, 3e-3), train_dataset=data, data_collator=stack
    )
    trainer.train()
    after = reconstruction_psnr(vae, images)
    assert after > before + 3.0


def test_device_arguments_keep_cpu_process_groups_on_gloo(monkeypatch):
    # two CPU processes on a GPU machine got NCCL (which refuses them) when the backend was left to accelerate
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_arguments(force_cpu=True) == {"use_cpu": True, "ddp_backend": "gloo"}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert device_arguments() == {"use_cpu": True, "ddp_backend": "gloo"}
    monkeypatch.delenv("WORLD_SIZE")
    # one process: no process group to name (naming one makes the Trainer look for it)
    assert device_arguments(force_cpu=True) == {"use_cpu": True, "ddp_backend": None}


def test_finetune_trains_with_the_positions_asked_for_and_saves_them(tmp_path, monkeypatch):
    """`--positions sequential` (the published checkpoint's training positions) reaches every training forward
    and is written to the saved config.json, so later scoring of that model uses it too."""
    import json

    from vargpt.modeling import VARGPTForConditionalGeneration
    from vargpt.shapes.dataset import write_sharegpt_dataset
    from vargpt.training.finetune import FinetuneArgs, run_finetune

    modes = []
    original = VARGPTForConditionalGeneration.forward_position_ids

    def recording(self, ids, mask, grid, positions=None, **video):
        modes.append(positions or self.config.forward_positions)
        return original(self, ids, mask, grid, positions, **video)

    monkeypatch.setattr(VARGPTForConditionalGeneration, "forward_position_ids", recording)
    data = write_sharegpt_dataset(tmp_path / "data", "validation", 0, 0, 2, seed=3)
    out = tmp_path / "ft"
    run_finetune(
        FinetuneArgs(
            model="tiny",
            data=[str(data)],
            out=str(out),
            stage="edit",
            steps=1,
            batch_size=2,
            positions="sequential",
            save_steps=10,
            quiet=True,
        )
    )
    assert modes and set(modes) == {"sequential"}
    assert json.loads((out / "final" / "config.json").read_text())["forward_positions"] == "sequential"
