"""The image tokenizer's training step, as the recipe runner calls it."""

from __future__ import annotations

import torch

from vargpt.configuration import VARGPTConfig
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.training.stage_trainer import stage_training_arguments
from vargpt.training.vae_training import train_vae


def test_train_vae_updates_the_vae_in_place_logs_its_loss_and_resumes_finished(tmp_path):
    torch.manual_seed(0)
    vae = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).vae_local
    before = {k: t.clone() for k, t in vae.state_dict().items()}
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    args = stage_training_arguments(
        tmp_path, steps=2, batch_size=4, learning_rate=1e-3, seed=0, bf16=False, force_cpu=True, save_steps=2,
        report_to=[], disable_tqdm=True,
    )  # fmt: skip
    trainer = train_vae(vae, images, args)
    assert not vae.training and trainer.state.global_step == 2
    assert trainer.state.log_history[-1]["train_loss"] > 0
    assert any(not torch.equal(before[k], t) for k, t in vae.state_dict().items())
    trained = {k: t.clone() for k, t in vae.state_dict().items()}
    again = train_vae(vae, images, args)  # resumes from the complete checkpoint-2: nothing left to train
    assert again.state.global_step == 2
    assert all(torch.equal(trained[k], t) for k, t in vae.state_dict().items())
