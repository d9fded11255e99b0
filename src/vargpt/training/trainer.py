"""SFT and DPO on transformers' `Trainer` (mixed precision, accumulation, checkpoints, logging, launch).

Only the loss is ours: the SFT loss is the model's own (text CE on labelled tokens + 3 x bit CE), and the DPO
loss compares image-token log-probabilities of the policy against a frozen reference, with the same random
bit flips and condition dropout for both (the original draws them independently, which adds noise to the
preference margin).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import parse_flag_from_env
from transformers import Trainer

from ..visual_decoder import bit_log_likelihood


def release_from_accelerate(accelerator, model) -> None:
    """Return a trained model to the state of one loaded from disk.

    accelerate's `prepare` leaves its mixed-precision wrapper on `model.forward` and marks the model prepared,
    so a later Trainer neither wraps it again nor runs it as a fresh model: the next recipe stage (and a DPO
    reference copied from it) ran with the previous stage's wrapper, and a recipe run straight through
    diverged from one resumed from a saved stage.
    """
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if getattr(vars(model).get("forward"), "__func__", None) is type(model).forward:
        del model.forward  # the unwrapped forward is the class's own: drop the instance copy
    vars(model).pop("_is_accelerate_prepared", None)


class VARGPTTrainer(Trainer):
    """`Trainer` that also logs the text and image parts of the loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = defaultdict(list)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            release_from_accelerate(self.accelerator, self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.get("loss")
        if loss is None:
            raise ValueError("the batch has neither labels nor generation targets: nothing to learn from")
        for name, value in outputs.items():
            is_part = (name.endswith("loss") and name != "loss") or name in ("l1", "mse", "commitment")
            if is_part and value is not None:
                self._parts[name].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[name] = sum(values) / len(values)
        self._parts.clear()
        super().log(logs, *args, **kwargs)


def device_arguments(force_cpu: bool = False) -> dict[str, Any]:
    """`TrainingArguments` fields that pick the device: the GPU when there is one, unless asked to stay on
    the CPU (`force_cpu`, or ACCELERATE_USE_CPU, which accelerate's CPU launchers set).

    Distributed CPU processes join over gloo by name: left unset, the backend becomes NCCL whenever CUDA is
    present, and NCCL refuses ranks that share one GPU or none (seen with two processes on a GPU machine).
    """
    use_cpu = force_cpu or not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {"use_cpu": use_cpu, "ddp_backend": "gloo" if use_cpu and distributed else None}


def image_log_probs(
    model, batch: dict, seed: int | None, noise: bool, return_bit_count: bool = False
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Summed log-probability of every generated image's bits, one value per image `[N]`; with
    `return_bit_count`, also the number of bits each image has (to turn the sum into a per-bit mean).

    `seed` fixes bit flips and condition dropout, so two models scored with the same seed see the same
    noise; `noise=False` turns both off.
    """
    generator = None
    if seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
    outputs = model(**batch, image_noise_generator=generator, image_noise=noise)
    if outputs.image_logits is None:
        raise ValueError("a preference batch must hold one generation target per row")
    log_probs_N = bit_log_likelihood(outputs.image_logits.float(), outputs.image_labels)
    if return_bit_count:
        return log_probs_N, outputs.image_labels[0].numel()
    return log_probs_N


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    chosen_nll_weight: float = 0.0,
    bits_per_image: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rafailov et al.'s sigmoid loss on the log-ratio margin; also returns the usual DPO statistics.

    `chosen_nll_weight` > 0 adds that multiple of the chosen images' per-bit negative log-likelihood (Pang et
    al.'s iterative RPO). Plain DPO widens the margin partly by lowering the winners' likelihood: at the end of
    the shapes recipe's third round (losers sampled at tau 1) the winners' log-ratio to that round's reference was
    -25 nats (reward -2.5) and their NLL 0.25 nats/bit (0.20 in round 1); weight 1 held them to -10 nats and
    0.23, weight 10 to -1.3 nats and 0.20.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    margin = beta * (chosen_ratio - rejected_ratio)
    loss = -F.logsigmoid(margin).mean()
    chosen_nll = -policy_chosen.mean() / bits_per_image
    if chosen_nll_weight:
        loss = loss + chosen_nll_weight * chosen_nll
    chosen_ratio, rejected_ratio, margin = chosen_ratio.detach(), rejected_ratio.detach(), margin.detach()
    stats = {
        "rewards/chosen": float(beta * chosen_ratio.mean()),
        "rewards/rejected": float(beta * rejected_ratio.mean()),
        "rewards/accuracy": float((margin > 0).float().mean()),
        "rewards/margin": float(margin.mean()),
        "chosen_nll_per_bit": float(chosen_nll.detach()),
    }
    return loss, stats


class ImageDPOTrainer(VARGPTTrainer):
    """DPO on image tokens. Batches are `{"chosen": batch, "rejected": batch}` sharing their prompts.

    `ref_model` defaults to a frozen copy of the model as it is when training starts (the SFT checkpoint).
    `noise="shared"` draws one seed per step for bit flips and condition dropout, used by policy and
    reference alike; `noise="none"` disables both. `chosen_nll_weight`: see `dpo_loss`.
    """

    def __init__(
        self,
        *args,
        ref_model=None,
        beta: float = 0.1,
        noise: str = "shared",
        chosen_nll_weight: float = 0.0,
        **kwargs,
    ) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            # the batches are nested {"chosen", "rejected"}: the model's signature cannot filter them
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        if noise not in ("shared", "none"):
            raise ValueError(f"noise must be 'shared' or 'none', got {noise!r}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if chosen_nll_weight < 0:
            raise ValueError(f"chosen_nll_weight must not be negative, got {chosen_nll_weight}")
        self.beta = beta
        self.chosen_nll_weight = chosen_nll_weight
        self.noise = noise
        reference = ref_model if ref_model is not None else copy.deepcopy(self.model)
        release_from_accelerate(self.accelerator, reference)
        self.ref_model = reference
        self.ref_model.eval()
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self._step_seed = torch.Generator().manual_seed(self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if set(inputs) != {"chosen", "rejected"}:
            raise ValueError("DPO batches must be {'chosen': ..., 'rejected': ...}")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._step_seed)) if self.noise == "shared" else None
        noise = self.noise == "shared"
        self.ref_model.to(next(model.parameters()).device)
        policy_c, bits_per_image = image_log_probs(model, inputs["chosen"], seed, noise, return_bit_count=True)
        policy_r = image_log_probs(model, inputs["rejected"], seed, noise)
        # the reference runs under the policy's mixed precision, so a policy equal to it has margin exactly 0
        with torch.no_grad(), self.accelerator.autocast():
            ref_c = image_log_probs(self.ref_model, inputs["chosen"], seed, noise)
            ref_r = image_log_probs(self.ref_model, inputs["rejected"], seed, noise)
        loss, stats = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.beta, self.chosen_nll_weight, bits_per_image)
        for name, value in stats.items():
            self._parts[name].append(value)
        return (loss, {"loss": loss}) if return_outputs else loss
