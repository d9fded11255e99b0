"""SFT and DPO on transformers' `Trainer` (mixed precision, accumulation, checkpoints, logging, launch).

Only the loss is ours: the SFT loss is the model's own (text CE on labelled tokens + 3 x bit CE), and the DPO
loss compares image-token log-probabilities of the policy against a frozen reference, with the same random
bit flips and condition dropout for both (the original draws them independently, which adds noise to the
preference margin). The reference is not a second model: it is the policy run with a snapshot of the tensors the
stage trains, or a peft model's base with its adapters disabled (`ImageDPOTrainer`, `reference_memory`).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import parse_flag_from_env
from torch import nn
from torch.func import functional_call
from transformers import Trainer

from ..modeling import VARGPTForConditionalGeneration
from ..visual_decoder import bit_log_likelihood
from .stages import apply_stage, get_stage


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


def noise_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The generator that fixes one step's bit flips and condition dropout (None: the global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def bit_log_probs(outputs, return_bit_count: bool = False) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Per-image summed bit log-probability `[N]` of a forward's generation outputs (and bits per image)."""
    if outputs.image_logits is None:
        raise ValueError("a preference batch must hold one generation target per row")
    log_probs_N = bit_log_likelihood(outputs.image_logits.float(), outputs.image_labels)
    if return_bit_count:
        return log_probs_N, outputs.image_labels[0].numel()
    return log_probs_N


def image_log_probs(
    model, batch: dict, seed: int | None, noise: bool, return_bit_count: bool = False
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Summed log-probability of every generated image's bits, one value per image `[N]`; with
    `return_bit_count`, also the number of bits each image has (to turn the sum into a per-bit mean).

    `seed` fixes bit flips and condition dropout, so two models scored with the same seed see the same
    noise; `noise=False` turns both off.
    """
    generator = noise_generator(seed, next(model.parameters()).device)
    outputs = model(**batch, image_noise_generator=generator, image_noise=noise)
    return bit_log_probs(outputs, return_bit_count)


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


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode, then give every submodule back its own flag (a frozen part may be kept in eval
    on purpose while the rest trains, so a blanket `train()` afterwards would be wrong)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CopyReference:
    """A reference that is a whole model of its own: an explicit `ref_model`, or a deep copy of the policy.

    Costs every parameter and buffer of the model again; kept for comparison and for references that are not
    the policy's starting point (another checkpoint).
    """

    kind = "copy"

    def __init__(self, model: nn.Module, accelerator) -> None:
        release_from_accelerate(accelerator, model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers())

    def log_probs(self, policy: nn.Module, batch: dict, seed: int | None, noise: bool) -> torch.Tensor:
        self.model.to(next(policy.parameters()).device)
        return image_log_probs(self.model, batch, seed, noise)


class SnapshotReference:
    """The policy as it was when the trainer was built, holding only what the stage trains.

    A clone of every trainable tensor (`requires_grad` at build time) is kept; the reference forward is the
    policy's own modules run through `torch.func.functional_call` with the clones in place of the trainable
    parameters, in eval mode. Frozen parameters and buffers are the policy's own (the model has no running
    statistics, so its buffers never change). The policy's tensors are never written, so this is safe between
    the policy's forward and its backward, and an exception cannot leave the policy holding reference weights.

    Where it works: plain and accelerate-mixed-precision training (the reference runs under the same autocast);
    DDP and DeepSpeed ZeRO-1/2, whose parameters are whole on every rank (the forward goes to the unwrapped
    module, so no gradient-sync hook fires); a model whose parameters the engine recasts after the snapshot
    (DeepSpeed bf16) gets the clones recast to match on first use. Where it does not: FSDP and ZeRO-3 shard the
    parameters and gather them inside their own hooks, which would write the gathered policy weights over the
    substitutes, so `ImageDPOTrainer` refuses it there rather than compare the policy with itself. There the
    choices are a peft model (`AdapterReference`: adapters are switched off by a flag, whatever holds the
    weights), a deep copy under FSDP when every rank loaded the whole model (the full cost per rank), or a
    `ref_model` the caller prepared for the engine. A deep copy of a ZeRO-3 (zero.Init) model is refused: it holds
    empty partitions without the engine's gather hooks (its forward failed when tried).
    """

    kind = "snapshot"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if not self.weights:
            raise ValueError("the model has no trainable parameter: nothing to take a DPO reference of")

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.weights.values())

    def _weights_like(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, clone in self.weights.items():
            p = live.get(name)
            if p is None:
                raise ValueError(f"the model no longer has the parameter {name!r} the DPO reference was taken of")
            if clone.dtype != p.dtype or clone.device != p.device:
                self.weights[name] = clone.to(device=p.device, dtype=p.dtype)
        return self.weights

    def log_probs(self, policy: nn.Module, batch: dict, seed: int | None, noise: bool) -> torch.Tensor:
        if policy is not self.model:
            raise ValueError("the DPO reference was taken of another model than the one being trained")
        weights = self._weights_like(dict(policy.named_parameters()))
        generator = noise_generator(seed, next(policy.parameters()).device)
        kwargs = {**batch, "image_noise_generator": generator, "image_noise": noise}
        with eval_mode(policy):
            outputs = functional_call(policy, weights, args=(), kwargs=kwargs, tie_weights=True, strict=False)
        return bit_log_probs(outputs)


class AdapterReference:
    """The base model under a peft model's adapters: `disable_adapter()` during the reference forward.

    Holds nothing. It is the policy's starting point only while the adapters start as the identity (a fresh
    LoRA: B = 0); for adapters loaded already trained, pass `reference="snapshot"` (which clones just them).
    """

    kind = "adapter"
    nbytes = 0

    def __init__(self, model: nn.Module) -> None:
        if not callable(getattr(model, "disable_adapter", None)):
            raise ValueError("reference='adapter' needs a peft model (one with disable_adapter())")
        self.model = model

    def log_probs(self, policy: nn.Module, batch: dict, seed: int | None, noise: bool) -> torch.Tensor:
        if policy is not self.model:
            raise ValueError("the DPO reference was taken of another model than the one being trained")
        with policy.disable_adapter(), eval_mode(policy):
            return image_log_probs(policy, batch, seed, noise)


REFERENCE_KINDS = ("auto", "snapshot", "adapter", "copy")


class ImageDPOTrainer(VARGPTTrainer):
    """DPO on image tokens. Batches are `{"chosen": batch, "rejected": batch}` sharing their prompts.

    The reference is the model as it is when the trainer is built (the SFT checkpoint); `reference` picks how it
    is held. "auto" (default): "adapter" for a peft model, else "snapshot" ("copy" under FSDP / ZeRO-3, which
    a snapshot cannot serve: see `SnapshotReference`). "snapshot": clones of the trainable
    tensors only, frozen parts shared (`SnapshotReference`; 2.55 B of 10.95 B parameters for stage3-dpo at full
    size). "adapter": the peft base with adapters disabled, nothing held. "copy": a deep copy of the whole model
    (the old behaviour, for comparison). An explicit `ref_model` is used as given.
    `noise="shared"` draws one seed per step for bit flips and condition dropout, used by policy and
    reference alike; `noise="none"` disables both. `chosen_nll_weight`: see `dpo_loss`.
    """

    def __init__(
        self,
        *args,
        ref_model=None,
        reference: str = "auto",
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
        self.reference = self._build_reference(ref_model, reference)
        self._step_seed = torch.Generator().manual_seed(self.args.seed)

    def _build_reference(self, ref_model, reference: str) -> CopyReference | SnapshotReference | AdapterReference:
        if reference not in REFERENCE_KINDS:
            raise ValueError(f"reference must be one of {REFERENCE_KINDS}, got {reference!r}")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "the model has no trainable parameter (requires_grad): apply a stage "
                "(vargpt.training.stages.apply_stage) before building the DPO trainer"
            )
        if ref_model is not None:
            if reference != "auto":
                raise ValueError(f"give ref_model or reference={reference!r}, not both")
            return CopyReference(ref_model, self.accelerator)
        sharded = self.shards_parameters()
        if reference == "auto":
            if callable(getattr(self.model, "disable_adapter", None)):
                reference = "adapter"
            elif sharded:
                warnings.warn(
                    "FSDP / ZeRO-3 shard the parameters, which a snapshot reference cannot stand in for: the DPO "
                    "reference is a deep copy of the whole model (reference='copy')",
                    stacklevel=3,
                )
                reference = "copy"
            else:
                reference = "snapshot"
        if reference == "copy":
            if any(p.is_meta or hasattr(p, "ds_tensor") for p in self.model.parameters()):
                # seen under ZeRO-3: the copy of a zero.Init model keeps empty partitions and no gather hooks
                raise ValueError(
                    "a deep-copy DPO reference needs the whole model in this process, but its parameters are "
                    "partitioned (DeepSpeed ZeRO-3) or on the meta device (FSDP loading on rank 0 only): train a "
                    "peft (LoRA) model, whose reference is its base with the adapters disabled, or pass a ref_model"
                )
            return CopyReference(copy.deepcopy(self.model), self.accelerator)
        if sharded and reference == "snapshot":
            raise ValueError(
                "reference='snapshot' cannot run under FSDP or DeepSpeed ZeRO-3 (their sharded parameters are "
                "gathered by their own hooks); pass a ref_model prepared for the engine, or reference='copy'"
            )
        return AdapterReference(self.model) if reference == "adapter" else SnapshotReference(self.model)

    def shards_parameters(self) -> bool:
        """Whether the engine shards the parameters across processes (FSDP, DeepSpeed ZeRO-3)."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return self.is_fsdp_enabled or zero3

    @property
    def ref_model(self) -> nn.Module:
        """The module the reference forward runs: the copy, or the policy itself (snapshot / adapter)."""
        return self.reference.model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if set(inputs) != {"chosen", "rejected"}:
            raise ValueError("DPO batches must be {'chosen': ..., 'rejected': ...}")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._step_seed)) if self.noise == "shared" else None
        noise = self.noise == "shared"
        policy_c, bits_per_image = image_log_probs(model, inputs["chosen"], seed, noise, return_bit_count=True)
        policy_r = image_log_probs(model, inputs["rejected"], seed, noise)
        # the reference runs under the policy's mixed precision, so a policy equal to it has margin exactly 0;
        # it gets the unwrapped module (DDP's forward would arm gradient sync for a pass with no backward)
        module = self.accelerator.unwrap_model(model)
        with torch.no_grad(), self.accelerator.autocast():
            ref_c = self.reference.log_probs(module, inputs["chosen"], seed, noise)
            ref_r = self.reference.log_probs(module, inputs["rejected"], seed, noise)
        loss, stats = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.beta, self.chosen_nll_weight, bits_per_image)
        for name, value in stats.items():
            self._parts[name].append(value)
        return (loss, {"loss": loss}) if return_outputs else loss


@dataclass(frozen=True)
class ReferenceMemory:
    """What a DPO reference holds for one model and stage, in bytes at `dtype` (buffers: copy only)."""

    stage: str
    dtype: torch.dtype
    parameters: int
    trainable_parameters: int
    copy_bytes: int
    snapshot_bytes: int
    adapter_bytes: int = 0


def reference_memory(config, stage: str = "stage3-dpo", dtype: torch.dtype = torch.bfloat16) -> ReferenceMemory:
    """The reference's memory for `config` and `stage`, counted on the meta device (no weights are made), so
    the full-size figure costs seconds and no memory: the deep copy holds every parameter and buffer, the
    snapshot only the stage's trainable parameters (the adapter reference holds nothing)."""
    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config).to(dtype)
    counts = apply_stage(model, get_stage(stage))
    params = list(model.parameters())
    return ReferenceMemory(
        stage=stage,
        dtype=dtype,
        parameters=counts["trainable"] + counts["frozen"],
        trainable_parameters=counts["trainable"],
        copy_bytes=tensor_bytes(params) + tensor_bytes(model.buffers()),
        snapshot_bytes=tensor_bytes(p for p in params if p.requires_grad),
    )
