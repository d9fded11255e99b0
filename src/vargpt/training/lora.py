"""LoRA and QLoRA on the LLM's layers and the visual decoder's blocks, through peft.

The adapters go on the linear layers of the two big transformers only (the LLM's attention and MLP
projections in `model.layers`, the decoder's self-attention, cross-attention and FFN linears in
`vargpt_gen.block_chunks`); the ViT, the VAE, the embeddings, the heads and the projectors stay frozen.

Why `get_peft_model` (a `PeftModel` wrapping ours) and not `inject_adapter_in_model` (adapters inserted in the
bare model): the wrapper is what transformers' `Trainer` recognises, so its checkpoints hold the adapter alone
(megabytes, not the 22 GB model) and `resume_from_checkpoint` reloads that adapter; the wrapper's
`save_pretrained` writes peft's format while the wrapped model keeps the `save_pretrained` that writes the
original layout, so neither can be mistaken for the other. A bare model with injected layers would write
`lora_A` / `base_layer` tensors into what claims to be the original layout, which `check_checkpoint` refuses.

The decoder's fused q/v-bias projections (`sa.mat_qkv`, `ca.mat_kv`) take an `F.linear` shortcut only for a
plain `nn.Linear`; peft's wrapper is called as a module (see `visual_decoder.layers.linear_with_bias`), so the
adapter acts there too.

QLoRA is a 4-bit base (`VARGPTForConditionalGeneration.from_pretrained(path, quantization="int4")`) plus
`apply_lora`. peft's `prepare_model_for_kbit_training` is not called: it casts every non-quantized weight (ViT,
VAE, embeddings, text head) to fp32, memory the 4-bit load was chosen to save; the adapter weights themselves
are kept in fp32 by `get_peft_model` (`autocast_adapter_dtype`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..checkpoint import atomic_directory_write
from ..modeling import VARGPTForConditionalGeneration
from ..quantization import is_quantized

LORA_PARTS = ("llm", "decoder")
# the container each part's adapted layers live in, and how its blocks are numbered below it
PART_CONTAINERS = {"llm": r"model\.layers\.\d+", "decoder": r"vargpt_gen\.block_chunks\.\d+\.module\.\d+"}
# module paths inside one block (the names the published checkpoint uses)
LLM_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
DECODER_TARGETS = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")


def parse_parts(text: str) -> tuple[str, ...]:
    """`--lora-parts` value to parts: "llm", "decoder", "both", or a comma-separated list."""
    if text.strip() == "both":
        return LORA_PARTS
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in LORA_PARTS]
    if unknown or not parts:
        raise ValueError(f"LoRA parts must be 'llm', 'decoder' or 'both', got {text!r}")
    return parts


@dataclass(frozen=True)
class LoraSettings:
    """What LoRA adapts and how.

    `alpha / rank` scales the update (peft's `lora_alpha`); `dropout` applies to the adapter's input only.
    `llm_targets` / `decoder_targets` are module paths inside one block of each part; only the targets of the
    chosen `parts` are used.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    parts: tuple[str, ...] = LORA_PARTS
    llm_targets: tuple[str, ...] = LLM_TARGETS
    decoder_targets: tuple[str, ...] = DECODER_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.parts, str):
            object.__setattr__(self, "parts", parse_parts(self.parts))
        object.__setattr__(self, "parts", tuple(self.parts))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"LoRA parts must be a non-empty subset of {LORA_PARTS} without repeats, got {self.parts}")
        unknown = [p for p in self.parts if p not in LORA_PARTS]
        if unknown:
            raise ValueError(f"unknown LoRA part(s) {unknown}; choose from {LORA_PARTS}")
        for part, targets in self.targets_by_part.items():
            if not targets:
                raise ValueError(f"LoRA on the {part} needs at least one target module")
            bad = [t for t in targets if not re.fullmatch(r"[A-Za-z_][\w.]*", t)]
            if bad:
                raise ValueError(f"{part} LoRA targets must be module paths such as 'mlp.up_proj', got {bad}")

    @property
    def targets_by_part(self) -> dict[str, tuple[str, ...]]:
        """The chosen parts and the module paths adapted in each."""
        targets = {"llm": tuple(self.llm_targets), "decoder": tuple(self.decoder_targets)}
        return {part: targets[part] for part in self.parts}

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def target_pattern(self) -> str:
        """One regular expression that peft full-matches against module names (saved in adapter_config.json)."""
        alternatives = []
        for part, targets in self.targets_by_part.items():
            names = "|".join(re.escape(t) for t in targets)
            alternatives.append(rf"{PART_CONTAINERS[part]}\.(?:{names})")
        return "|".join(f"(?:{a})" for a in alternatives)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_pattern(),
            bias="none",
        )


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear, so quantized bases count
    return isinstance(module, nn.Linear)


def lora_target_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The linear layers `settings` adapts in `model`, by name; every requested target must exist.

    Checked here rather than left to peft, which only complains when nothing at all matches: a misspelt
    target next to correct ones would silently go unadapted.
    """
    linears = [name for name, module in model.named_modules() if _is_linear(module)]
    found: list[str] = []
    for part, targets in settings.targets_by_part.items():
        in_part = [n for n in linears if re.match(PART_CONTAINERS[part] + r"\.", n)]
        for target in targets:
            pattern = re.compile(rf"{PART_CONTAINERS[part]}\.{re.escape(target)}")
            matched = [n for n in in_part if pattern.fullmatch(n)]
            if not matched:
                inside = sorted({re.sub(PART_CONTAINERS[part] + r"\.", "", n) for n in in_part})
                raise ValueError(f"no {part} linear layer is called {target!r}; the {part}'s blocks have {inside}")
            found.extend(matched)
    return sorted(found)


def apply_lora(model: VARGPTForConditionalGeneration, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with LoRA adapters on the settings' targets; only the adapters train.

    Works on a full-precision model (LoRA) and on one loaded with `quantization="int4"` (QLoRA) or "int8".
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model already carries adapters: merge_lora() it first, or train the ones it has")
    if not isinstance(model, VARGPTForConditionalGeneration):
        raise TypeError(f"apply_lora expects a VARGPTForConditionalGeneration, got {type(model).__name__}")
    expected = lora_target_names(model, settings)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, settings.lora_config())
    adapted = {name for name, module in peft_model.get_base_model().named_modules() if isinstance(module, LoraLayer)}
    if adapted != set(expected):
        raise RuntimeError(f"peft adapted {sorted(adapted ^ set(expected))[:5]} unlike the settings' targets")
    not_lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if not_lora:
        raise RuntimeError(f"parameters outside the adapters would train: {not_lora[:5]}")
    return peft_model


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.3f}%)"


def _logical_numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two per byte, its quant state the shape."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and total parameters, counting 4-bit weights by their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCounts(trainable, total)


def save_adapter(model: PeftModel, directory: str | Path) -> None:
    """Write the adapter alone in peft's format (adapter_config.json + adapter_model.safetensors), atomically."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter expects the model apply_lora returned, got {type(model).__name__}")
    atomic_directory_write(directory, lambda staging: model.save_pretrained(staging))


def load_adapter(model: VARGPTForConditionalGeneration, directory: str | Path, trainable: bool = True) -> PeftModel:
    """Put a saved adapter on `model` (full precision or quantized): to resume training, or to merge it."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ValueError(f"{directory} holds no adapter (adapter_config.json missing); save one with save_adapter")
    if isinstance(model, PeftModel):
        raise ValueError("the model already carries adapters: load the adapter onto the bare model")
    return PeftModel.from_pretrained(model, directory, is_trainable=trainable)


def _adapter_deltas(base: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight update `scaling * B @ A` (summed over its active adapters), in fp32."""
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        delta = None
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
                raise ValueError(f"{name}: DoRA / LoRA-bias adapters are not supported by merge_lora")
            update = module.get_delta_weight(adapter).float()
            delta = update if delta is None else delta + update
        if delta is not None:
            deltas[name] = delta
    return deltas


@torch.no_grad()
def merge_lora(model: PeftModel) -> VARGPTForConditionalGeneration:
    """Fold the adapters into the base weights; return a plain model whose `save_pretrained` writes the
    original layout (same tensor names and shapes as the model LoRA was applied to).

    Each update is added in fp32 and rounded once to the weight's dtype. A QLoRA model (4-bit base) is first
    dequantized to its compute dtype (transformers' `dequantize`), so the merged model holds what the QLoRA
    model computed with: the NF4-rounded base plus the update, in high precision. Those are not the original
    full-precision weights plus the update; for that, load the original checkpoint unquantized, `load_adapter`
    the saved adapter onto it and merge that instead (the adapter was trained against the rounded base, so
    the two differ by the quantization error). The returned model's parameters stay frozen, as `apply_lora`
    left them: a later stage sets what trains (`apply_stage`).
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_lora expects the model apply_lora / load_adapter returned, got {type(model).__name__}")
    deltas = _adapter_deltas(model.get_base_model())
    base = model.unload()  # the adapter layers removed, their base layers back in place, nothing merged
    vars(base).pop("peft_config", None)  # peft's note of the adapters that are now gone
    if not isinstance(base, VARGPTForConditionalGeneration):
        raise TypeError(f"the adapted model is a {type(base).__name__}, not a VARGPTForConditionalGeneration")
    if is_quantized(base):
        base = base.dequantize()
    for name, delta in deltas.items():
        weight = base.get_submodule(name).weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return base
