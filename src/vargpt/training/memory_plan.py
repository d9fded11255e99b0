"""How much memory one training rank needs: weights, gradients, AdamW state, activations, DPO reference.

An estimate from the configuration alone (the model is built on the meta device), so that `vargpt inspect
--train STAGE` says which GPU a training setting fits before anything is downloaded. The inference plan
(`vargpt.memory_plan`) gives the weight bytes; this module adds what training holds on top.

What it assumes:

* precision "bf16" is DeepSpeed-style mixed precision: every weight in bf16, gradients of the trained
  parameters in bf16, and AdamW keeping an fp32 master copy plus two fp32 moments per trained value
  (12 bytes); activations in bf16. Precision "fp32" is a plain fp32 run (what the CPU benchmark measures):
  4-byte weights and gradients and two 4-byte moments, no master copy.
* sharding over `gpus` ranks: "none" keeps a full replica per rank (DDP); "2" (ZeRO-2) shards gradients and
  optimizer state; "3" (ZeRO-3) and "fsdp" (full shard) shard the weights too and gather two units at a time
  (the one computing and the one prefetched; a unit is a transformer block or, for FSDP, the root's leftover
  modules, for ZeRO-3 the largest single module).
* activations are what autograd saves for one sample, layer by layer, following the code's operations: an
  LLM layer holds its RMSNorm inputs in fp32, q, k (repeated to every head), v and the attention output, the
  SwiGLU's gate, up and activation; the inputs of linear layers only where their weights (or LoRA adapters)
  train. Attention is a fused kernel (no score matrix; only the additive masks are square). A visual-decoder
  block likewise. The full-vocabulary text head runs only on the rows the text loss reads (the forward gathers
  the positions whose next label is set; the image slots never are): their fp32 log-softmax is saved, and
  their gradient is a transient. A generation sample's answer labels `answer_tokens` tokens (the image
  block's start and end; the prompt is unlabelled). Gradient checkpointing keeps only each layer's input and
  recomputes one layer at a time.
* a single process without sharding frees gradients between steps (Trainer zeroes them to None), so they
  and the activations peak at different times; DDP buckets and ZeRO partitions are allocated once and stay.
* LoRA trains rank-r adapters on every linear layer of the stage's trained modules (not the text head);
  everything else is frozen. `quantize="int4"` stores the frozen base's block linears in NF4 (QLoRA).
* DPO (`kind == "dpo"`) runs the policy on chosen and rejected images before one backward (twice the saved
  activations) and keeps a frozen reference of the trained parameters only. (Its forward still computes the
  text loss of the answer's few labelled tokens, which the DPO loss then drops; they are counted all the same.)
* samples are generation samples: `prompt_tokens` of text, then `<|image_gen_start|>`, the image's pad
  slots (`num_image_gen_pad_tokens` of the schedule) and `<|image_gen_end|>`; no understanding images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configuration import VARGPTConfig
from ..memory_plan import GPU_SIZES_GB, RUNTIME_BYTES, weight_bytes
from ..modeling import VARGPTForConditionalGeneration
from ..schedule import scale_schedule
from ..visual_decoder.layers import ffn_hidden_size
from .stages import StagePlan, get_stage

PRECISIONS = ("bf16", "fp32")
SHARDINGS = ("none", "2", "3", "fsdp")
_FP32 = 4
# modules whose output reaches the LLM's input: training any of them sends gradients back through the LLM
_BEFORE_LLM = ("visual.", "model.", "image_gen_projector.", "sos_embedding.", "vargpt_gen.")
_BLOCKS = ("model.layers.", "vargpt_gen.block_chunks.", "visual.blocks.")


@dataclass(frozen=True)
class TrainingSetup:
    """One training setting to plan for (per rank: `batch` is the micro-batch of one GPU)."""

    stage: str = "stage3-decoder"
    gpus: int = 1
    zero: str = "none"
    resolution: int = 512
    batch: int = 1
    lora_rank: int | None = None
    gradient_checkpointing: bool = False
    quantize: str | None = None
    precision: str = "bf16"
    prompt_tokens: int = 64
    answer_tokens: int = 2
    device: str = "cuda"
    trainable: tuple[str, ...] | None = field(default=None)

    def check(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {self.gpus}")
        if self.zero not in SHARDINGS:
            raise ValueError(f"--zero must be one of {', '.join(SHARDINGS)}, got {self.zero!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt tokens must be at least 1, got {self.prompt_tokens}")
        if self.answer_tokens < 0:
            raise ValueError(f"answer tokens must be at least 0, got {self.answer_tokens}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.quantize not in (None, "int4"):
            raise ValueError(f"--quantize must be int4 (QLoRA), got {self.quantize!r}")
        if self.quantize and self.lora_rank is None:
            raise ValueError("4-bit weights cannot be trained: --quantize int4 needs --lora")
        if self.quantize and self.precision != "bf16":
            raise ValueError("--quantize int4 plans a bf16 run (NF4 computes in bf16)")


@dataclass(frozen=True)
class ParameterCounts:
    """Values of the model and of what one setting trains (adapters under LoRA)."""

    total: int
    fp32_bytes: int
    trained: int
    largest_trained: int
    largest_unit: int
    root_leftover: int


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one rank holds at its peak, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    reference: int
    gathered: int
    runtime: int
    step_transient: int
    gradients_persist: bool
    counts: ParameterCounts
    sequence: dict[str, int]

    @property
    def total(self) -> int:
        static = self.weights + self.optimizer + self.reference + self.gathered + self.runtime
        if self.gradients_persist:
            return static + self.gradients + self.activations
        # gradients are allocated during backward as the saved activations are freed, and the optimizer step's
        # temporaries come after both
        return static + max(self.activations, self.gradients + self.step_transient)

    def fits(self, gigabytes: float, headroom: float = 0.95) -> bool:
        """Whether the total stays under `headroom` of a device of `gigabytes` (10^9 bytes)."""
        return self.total <= headroom * gigabytes * 10**9


def resolve_plan(setup: TrainingSetup) -> StagePlan:
    plan = get_stage(setup.stage)
    return plan.with_trainable(*setup.trainable) if setup.trainable else plan


def lora_targets(model: nn.Module, plan: StagePlan) -> list[nn.Linear]:
    """The linear layers LoRA adapts: every one under the stage's trained prefixes but the text head."""
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.".startswith(plan.trainable) and name != "lm_head"
    ]


def parameter_counts(model: nn.Module, plan: StagePlan, lora_rank: int | None = None) -> ParameterCounts:
    """Count what `plan` trains in `model` (a meta-device or real model), with the plan's freeze applied."""
    names = [name for name, _ in model.named_parameters()]
    if not any(name.startswith(plan.trainable) for name in names):
        raise ValueError(f"stage {plan.name!r} trains nothing: no parameter starts with {plan.trainable}")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    total = sum(t.numel() for _, t in tensors)
    fp32_bytes = sum(t.numel() * (_FP32 if t.is_floating_point() else t.element_size()) for _, t in tensors)
    if lora_rank is None:
        trained_sizes = [p.numel() for name, p in model.named_parameters() if name.startswith(plan.trainable)]
    else:
        trained_sizes = [
            lora_rank * size
            for m in lora_targets(model, plan)
            for size in (m.in_features, m.out_features)  # A: [r, in], B: [out, r]
        ]
    units = [sum(p.numel() for p in m.parameters()) for m in _block_modules(model)]
    in_blocks = sum(units)
    leaves = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ParameterCounts(
        total=total,
        fp32_bytes=fp32_bytes,
        trained=sum(trained_sizes),
        largest_trained=max(trained_sizes, default=0),
        largest_unit=max([*units, *leaves]),
        root_leftover=sum(p.numel() for p in model.parameters()) - in_blocks,
    )


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks that gradient checkpointing and sharding treat as units."""
    found = []
    for name, module in model.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and f"{parent}.".endswith(("layers.", "module.", "blocks.")) and name.startswith(_BLOCKS):
            found.append(module)
    return found


def sequence_lengths(
    config: VARGPTConfig, resolution: int, prompt_tokens: int, answer_tokens: int = 2
) -> dict[str, int]:
    """Tokens of one generation sample: LLM sequence, image tokens (decoder sequence), pad slots, context, and
    the rows the text loss reads (`answer_tokens`, at most the sample's non-slot tokens)."""
    stride = config.image_tokenizer_config.downsample_factor
    schedule = scale_schedule(resolution, stride=stride)
    image_tokens = sum(h * w for h, w in schedule)
    multiple = config.image_gen_pad_multiple
    pads = -(-image_tokens // multiple) * multiple  # what `num_image_gen_pad_tokens` gives for this schedule
    return {
        "llm": prompt_tokens + 1 + pads + 1,
        "image": image_tokens,
        "pads": pads,
        "context": prompt_tokens,
        "text_loss": min(answer_tokens, prompt_tokens + 1),
    }


@dataclass(frozen=True)
class _Flow:
    """Which parts train and which carry gradients, for the activation count."""

    llm_weights: bool
    llm_inputs: bool  # linear inputs saved: weights or adapters train
    llm_grad: bool
    decoder_weights: bool
    decoder_inputs: bool
    decoder_grad: bool
    head_weights: bool
    projector_in: bool
    projector_out: bool


def _flow(plan: StagePlan, lora: bool) -> _Flow:
    def trains(prefix: str) -> bool:
        return any(p.startswith(prefix) or prefix.startswith(p) for p in plan.trainable)

    llm_grad = any(trains(p) for p in _BEFORE_LLM)
    decoder_grad = llm_grad or trains("image_gen_projector_out.")
    llm, decoder = trains("model.layers."), trains("vargpt_gen.block_chunks.")
    return _Flow(
        llm_weights=llm and not lora,
        llm_inputs=llm,
        llm_grad=llm_grad,
        decoder_weights=decoder and not lora,
        decoder_inputs=decoder,
        decoder_grad=decoder_grad,
        head_weights=trains("lm_head.") and not lora,
        projector_in=trains("image_gen_projector."),
        projector_out=trains("image_gen_projector_out."),
    )


def _llm_layer_bytes(config: VARGPTConfig, flow: _Flow, act: int) -> int:
    """Bytes one LLM layer saves per token."""
    text = config.text_config
    h, inner, heads = text.hidden_size, text.intermediate_size, text.num_attention_heads
    norm = _FP32 * h + _FP32 + (act * h if flow.llm_weights else 0) + (act * h if flow.llm_inputs else 0)
    attention = 4 * act * h + _FP32 * heads  # q, k, v (repeated to every head), output; log-sum-exp
    mlp = 3 * act * inner + (act * inner if flow.llm_inputs else 0)  # gate, up, SiLU(gate); down's input
    return 2 * norm + attention + mlp


def _decoder_block_bytes(config: VARGPTConfig, flow: _Flow, act: int, image: int, context: int) -> int:
    """Bytes one visual-decoder block saves for one image (all its scales)."""

    d = config.visual_decoder_config
    C, heads = d.embed_dim, d.num_heads
    ffn = ffn_hidden_size(C, d.mlp_ratio, d.ffn_hidden_multiple)
    # fp32 copies for both AdaLNs; qkv, rotated q and k, attention out, cross-attn norm, q and out; q/k norms
    per_token = 2 * _FP32 * C + 9 * act * C + 4 * act * heads + 2 * _FP32 * heads + 6 * _FP32 + act * ffn
    context_bytes = 2 * act * C * context  # the projected context keys and values
    if flow.decoder_weights:  # modulation products, residual branches, every linear's input
        per_token += 9 * act * C + act * ffn
        context_bytes += act * C * context
    elif flow.decoder_inputs:  # adapters: the linear inputs only
        per_token += 4 * act * C + act * ffn
        context_bytes += act * C * context
    return image * per_token + context_bytes


def activation_bytes(config: VARGPTConfig, setup: TrainingSetup, plan: StagePlan) -> tuple[int, int]:
    """(saved, transient) activation bytes of one rank's micro-batch: what autograd keeps from the forward
    until the backward, and the largest working set on top of it (the text head's gradient, or a layer being
    recomputed under gradient checkpointing)."""
    act = 2 if setup.precision == "bf16" else _FP32
    flow = _flow(plan, setup.lora_rank is not None)
    text, d = config.text_config, config.visual_decoder_config
    seq = sequence_lengths(config, setup.resolution, setup.prompt_tokens, setup.answer_tokens)
    L, T, N, read = seq["llm"], seq["image"], seq["context"], seq["text_loss"]
    head_dim = text.hidden_size // text.num_attention_heads
    layers, blocks = text.num_hidden_layers, d.depth

    llm_layer = _llm_layer_bytes(config, flow, act) * L if flow.llm_grad else 0
    decoder_block = _decoder_block_bytes(config, flow, act, T, N) if flow.decoder_grad else 0
    # per forward: two square additive masks and the rotary tables of the LLM; the decoder's mask and tables
    once = 2 * _FP32 * L * L + 2 * act * L * head_dim + _FP32 * T * T + act * T * (d.embed_dim // d.num_heads)
    # text head, on the rows the text loss reads only: its input where it trains, their fp32 log-softmax over the
    # vocabulary and the gather's boolean mask (a byte per position) where anything before the head trains
    # (otherwise the text loss has no gradient)
    head = act * text.hidden_size * read if flow.head_weights else 0
    if read and (flow.llm_grad or flow.head_weights):
        head += _FP32 * text.vocab_size * read + L
    # projectors (two-layer MLPs): input, hidden and GELU output where trained, else the GELU input
    C, H = d.embed_dim, text.hidden_size
    projectors = (3 if flow.projector_in else 1) * act * C * seq["pads"] * flow.llm_grad
    projectors += (3 if flow.projector_out else 1) * act * H * (T + N) * flow.decoder_grad
    bit_logits = _FP32 * T * d.bits * 2 * 2  # fp32 copy and log-softmax of the bit logits
    if setup.gradient_checkpointing:
        kept = layers * act * text.hidden_size * L * flow.llm_grad + blocks * act * C * T * flow.decoder_grad
        recompute = max(llm_layer, decoder_block)
    else:
        kept = layers * llm_layer + blocks * decoder_block
        recompute = 0
    saved = kept + once + head + projectors + bit_logits
    head_gradient = (2 * _FP32 + act) * text.vocab_size * read  # fp32 gradient, softmax temporary, 16-bit gradient
    # a recomputed layer's saved tensors and its backward's gradients
    transient = max(head_gradient, 2 * recompute)
    passes = 2 if plan.kind == "dpo" else 1  # chosen and rejected images before one backward
    return passes * setup.batch * saved, setup.batch * transient


def training_memory(config: VARGPTConfig, setup: TrainingSetup) -> TrainingMemory:
    """Peak memory of one rank training `setup` on a model of `config`."""
    setup.check()
    plan = resolve_plan(setup)

    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config)
    counts = parameter_counts(model, plan, setup.lora_rank)
    bf16 = setup.precision == "bf16"
    if bf16:
        weights = weight_bytes(config, setup.quantize or "bf16")
        value = 2
    else:
        weights = counts.fp32_bytes
        value = _FP32
    lora = setup.lora_rank is not None
    if lora:
        weights += counts.trained * value  # the adapters themselves
    gradients = counts.trained * value
    optimizer = counts.trained * (12 if bf16 else 8)  # fp32 master + two moments; fp32: two moments
    reference = counts.trained * value if plan.kind == "dpo" else 0
    n = setup.gpus
    gathered = 0
    if setup.zero in ("2", "3", "fsdp"):
        gradients, optimizer = math.ceil(gradients / n), math.ceil(optimizer / n)
    if setup.zero in ("3", "fsdp"):
        unit = counts.largest_unit if setup.zero == "3" else max(counts.largest_unit, counts.root_leftover)
        full = weights
        weights, reference = math.ceil(weights / n), math.ceil(reference / n)
        gathered = min(full - weights, 2 * unit * value) if n > 1 else 0
    saved, transient = activation_bytes(config, setup, plan)
    single = n == 1 and setup.zero == "none"
    return TrainingMemory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=saved + transient,
        reference=reference,
        gathered=gathered,
        runtime=RUNTIME_BYTES["cpu" if setup.device == "cpu" else "cuda"],
        step_transient=counts.largest_trained * _FP32,
        gradients_persist=not single,
        counts=counts,
        sequence=sequence_lengths(config, setup.resolution, setup.prompt_tokens, setup.answer_tokens),
    )


def format_training_memory(config: VARGPTConfig, setup: TrainingSetup) -> str:
    """The per-rank table `vargpt inspect --train` prints, with what it assumes."""
    m = training_memory(config, setup)
    gb = 10**9
    plan = resolve_plan(setup)
    sharding = {"none": "full replica (DDP)", "2": "ZeRO-2", "3": "ZeRO-3", "fsdp": "FSDP full shard"}[setup.zero]
    if setup.gpus == 1 and setup.zero == "none":
        sharding = "one process"
    what = f"LoRA r={setup.lora_rank} adapters" if setup.lora_rank else "full weights"
    if setup.quantize:
        what += f", {setup.quantize} base"
    seq = m.sequence
    lines = [
        f"training memory per rank: {plan.name} ({plan.kind}), {setup.gpus} GPU(s), {sharding}, {what}",
        f"  {setup.resolution} px, micro-batch {setup.batch}, {setup.precision} "
        + ("mixed precision (fp32 master weights + 2 AdamW moments)" if setup.precision == "bf16" else "(AdamW)")
        + f", gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}",
        f"  sample: {seq['llm']} LLM tokens ({setup.prompt_tokens} prompt + {seq['pads']} image slots + 2), "
        f"{seq['image']} decoder tokens, text loss on {seq['text_loss']} tokens; trained values "
        f"{m.counts.trained:,} of {m.counts.total:,}",
        f"  {'part':<34}{'GB':>8}",
    ]
    parts = [
        ("weights", m.weights),
        ("gradients", m.gradients),
        ("optimizer state (AdamW)", m.optimizer),
        ("activations" + (" (chosen + rejected)" if plan.kind == "dpo" else ""), m.activations),
    ]
    if plan.kind == "dpo":
        parts.append(("DPO reference (trained params)", m.reference))
    if m.gathered:
        parts.append(("gathered shards (2 units)", m.gathered))
    parts.append(("runtime (CUDA context)" if setup.device != "cpu" else "runtime (Python + torch)", m.runtime))
    lines.extend(f"  {name:<34}{value / gb:>8.2f}" for name, value in parts)
    note = "" if m.gradients_persist else "  (gradients and activations peak apart)"
    lines.append(f"  {'total (peak)':<34}{m.total / gb:>8.2f}{note}")
    fits = [s for s in GPU_SIZES_GB if m.fits(s)]
    lines.append(
        "  fits: " + (", ".join(f"{s} GB" for s in fits) if fits else "none of 24 / 40 / 80 GB") + " (95% usable)"
    )
    return "\n".join(lines)
