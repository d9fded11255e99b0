"""How much memory inference needs: weights, both KV caches and the peak activations of one image.

An estimate from the configuration alone (the architecture is built on the meta device), so that `vargpt
inspect` can say which GPU a setting fits before anything is downloaded. Each term follows what the code
holds at its peak, the last scale of an image:

* weights: every tensor in the model's dtype, except the linear layers `quantization=` stores in 8 or 4 bits
  (with their scales: one fp32 per row for int8; for NF4 with double quantization one byte per 64 weights
  plus a second-level fp32 per 256 blocks);
* LLM KV cache: prompt + `<|image_gen_start|>` + all scale tokens, per layer keys and values of the KV heads,
  for each batch row of every branch that keeps a cache (guidance's "original" unconditional branch keeps
  none; "null_prompt" keeps a second one);
* decoder KV cache: self-attention keys and values of all scale tokens and the projected context, per block,
  for the conditional and unconditional rows;
* activations: the largest scale's hidden states and MLP intermediates in the LLM and the decoder, the
  attention scores where the attention kernel materialises them (the CPU's math kernel does; a GPU's fused
  kernels do not), the bit logits, and the VAE decoder's largest feature maps for one image (images are
  decoded one at a time);
* runtime: what the process holds besides tensors (CUDA context, or Python + torch + transformers on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .configuration import VARGPTConfig
from .quantization import QUANTIZED_BLOCK_CONTAINERS
from .schedule import Schedule, scale_schedule

WEIGHT_FORMATS = ("bf16", "int8", "int4")
GPU_SIZES_GB = (24, 40, 80)
# measured: CUDA context and allocator reserve on an H100; on this project's CPU runs, the resident set of a
# process that has imported vargpt, torch and transformers (benchmarks/load_memory.py prints it)
RUNTIME_BYTES = {"cuda": int(0.6 * 2**30), "cpu": int(0.55 * 2**30)}
_QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5 + 1 / 64 + 4 / (64 * 256)}


@dataclass(frozen=True)
class InferenceMemory:
    """Bytes of each part at the peak of one text-to-image call."""

    weights: int
    llm_kv_cache: int
    decoder_kv_cache: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.llm_kv_cache + self.decoder_kv_cache + self.activations + self.runtime

    def fits(self, gigabytes: float, headroom: float = 0.95) -> bool:
        """Whether the total stays under `headroom` of a device of `gigabytes` (10^9 bytes, as GPUs are sold);
        fragmentation takes the rest."""
        return self.total <= headroom * gigabytes * 10**9


def weight_bytes(config: VARGPTConfig, weight_format: str = "bf16") -> int:
    """Bytes of every parameter and buffer, with the quantized linear layers at their packed size."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    from .modeling import VARGPTForConditionalGeneration

    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config)
    total = 0
    quantized_prefixes = tuple(f"{c}." for c in QUANTIZED_BLOCK_CONTAINERS)
    for name, module in model.named_modules():
        for tensor_name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            size = 2 if t.is_floating_point() else t.element_size()
            quantized = (
                weight_format != "bf16"
                and isinstance(module, torch.nn.Linear)
                and tensor_name == "weight"
                and name.startswith(quantized_prefixes)
            )
            if quantized:
                rows = t.shape[0]
                scales = rows * 4 if weight_format == "int8" else 0
                total += math.ceil(t.numel() * _QUANTIZED_BYTES[weight_format]) + scales
            else:
                total += t.numel() * size
    return total


def inference_memory(
    config: VARGPTConfig,
    *,
    weight_format: str = "bf16",
    resolution: int = 512,
    batch_size: int = 1,
    prompt_tokens: int = 64,
    guidance: bool = True,
    uncond_mode: str = "original",
    device: str = "cuda",
) -> InferenceMemory:
    """Peak memory of drawing `batch_size` images at `resolution` with bf16 activations on `device`."""
    text = config.text_config
    decoder = config.visual_decoder_config
    stride = config.image_tokenizer_config.downsample_factor
    schedule = Schedule.for_resolution(resolution, stride=stride)
    image_tokens = schedule.num_tokens
    last = schedule.scale_token_counts[-1]
    act = 2  # bf16 bytes
    rows = batch_size * (2 if guidance else 1)  # the decoder runs conditional and unconditional rows together

    head_dim = text.hidden_size // text.num_attention_heads
    llm_token_bytes = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * act
    llm_tokens = prompt_tokens + 1 + image_tokens
    cached_branches = 2 if guidance and uncond_mode == "null_prompt" else 1
    llm_kv = cached_branches * batch_size * llm_tokens * llm_token_bytes

    decoder_token_bytes = decoder.depth * 2 * decoder.embed_dim * act
    decoder_kv = rows * (image_tokens + prompt_tokens) * decoder_token_bytes

    llm_rows = rows  # the original unconditional branch runs the current scale through the LLM too
    llm_act = llm_rows * last * (4 * text.hidden_size + 3 * text.intermediate_size) * act
    llm_logits = batch_size * prompt_tokens * text.vocab_size * 4  # prefill logits, fp32
    ffn = round(decoder.embed_dim * decoder.mlp_ratio)
    decoder_act = rows * last * (6 * decoder.embed_dim + 2 * ffn) * act + rows * last * decoder.bits * 2 * 4
    scores = 0
    if device == "cpu":  # the math attention kernel holds a [rows, heads, l, seen] score matrix
        scores = (
            max(
                llm_rows * text.num_attention_heads * last * llm_tokens,
                rows * decoder.num_heads * last * image_tokens,
            )
            * 4
        )
    vae = _vae_decode_bytes(config, resolution)
    activations = max(llm_act + scores, decoder_act + scores, llm_logits, vae)
    weights = weight_bytes(config, weight_format)
    if device == "cpu":
        # the pipeline keeps a 16-bit model's VAE in fp32 on a CPU (two more bytes per value), and bitsandbytes'
        # CPU int8 matmul unpacks the weight it multiplies into fp32 for the call
        weights += 2 * sum(_module_values(config, "vae_local").values())
        if weight_format == "int8":
            activations += 4 * text.intermediate_size * text.hidden_size
    return InferenceMemory(
        weights=weights,
        llm_kv_cache=llm_kv,
        decoder_kv_cache=decoder_kv,
        activations=activations,
        runtime=RUNTIME_BYTES["cpu" if device == "cpu" else "cuda"],
    )


def _module_values(config: VARGPTConfig, prefix: str) -> dict[str, int]:
    """Values of every tensor under a top-level module (built on the meta device)."""
    from .modeling import VARGPTForConditionalGeneration

    with torch.device("meta"):
        module = VARGPTForConditionalGeneration(config).get_submodule(prefix)
    return {name: t.numel() for name, t in module.state_dict().items()}


def _vae_decode_bytes(config: VARGPTConfig, resolution: int) -> int:
    """The VAE decoder's peak for one image: a few full-resolution maps of its widest last level, with the
    group norms computed in fp32."""
    tokenizer = config.image_tokenizer_config
    channels = tokenizer.base_channels * tokenizer.channel_multipliers[0]
    return 6 * channels * resolution * resolution * 4


def table_resolutions(config: VARGPTConfig) -> list[int]:
    """256 and 512 px where the model's schedule has them (the published model), else its own resolution."""
    stride = config.image_tokenizer_config.downsample_factor
    supported = []
    for resolution in (256, 512):
        try:
            scale_schedule(resolution, stride=stride)
        except ValueError:
            continue
        supported.append(resolution)
    return supported or [config.image_resolution]


def memory_table(config: VARGPTConfig, device: str = "cuda") -> list[dict]:
    """Rows of `inference_memory` for every weight format, 256 / 512 px (see `table_resolutions`), batch 1 / 8."""
    rows = []
    for weight_format in WEIGHT_FORMATS:
        for resolution in table_resolutions(config):
            for batch_size in (1, 8):
                m = inference_memory(
                    config, weight_format=weight_format, resolution=resolution, batch_size=batch_size, device=device
                )
                rows.append(
                    {
                        "weights": weight_format,
                        "resolution": resolution,
                        "batch": batch_size,
                        "memory": m,
                        "fits": [size for size in GPU_SIZES_GB if m.fits(size)],
                    }
                )
    return rows


def format_memory_table(config: VARGPTConfig, device: str = "cuda") -> str:
    gb = 10**9
    where = "a GPU (fused attention)" if device != "cpu" else "a CPU (math attention, fp32 VAE)"
    lines = [
        f"inference memory (GB, bf16 activations, cfg on, 64-token prompt) on {where}:",
        f"{'weights':<8}{'px':>5}{'batch':>6}{'weights':>9}{'LLM KV':>8}{'dec KV':>8}{'activ.':>8}{'total':>8}  fits",
    ]
    for row in memory_table(config, device):
        m = row["memory"]
        fits = ", ".join(f"{s} GB" for s in row["fits"]) or "none of 24 / 40 / 80 GB"
        lines.append(
            f"{row['weights']:<8}{row['resolution']:>5}{row['batch']:>6}{m.weights / gb:>9.1f}"
            f"{m.llm_kv_cache / gb:>8.2f}{m.decoder_kv_cache / gb:>8.2f}{m.activations / gb:>8.2f}"
            f"{m.total / gb:>8.1f}  {fits}"
        )
    return "\n".join(lines)
