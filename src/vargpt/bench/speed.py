"""`vargpt bench`: how fast a model draws and reads, and how much of the machine it uses.

Measured on a randomly initialised preset (speed does not depend on the weights) or a shipped model:

* image generation latency per batch, images/s and scale steps/s, by resolution and batch size;
* the analytic FLOPs per image (`vargpt.bench.flops`) over the time per image, as a share of the
  machine's measured matmul peak (a large square matmul in the run's dtype);
* text tokens/s for understanding: prefill of a fixed prompt, and decoding a fixed number of new tokens;
* peak memory (CUDA: max allocated; CPU: the process's peak RSS, which only grows);
* the weight memory of the full-size model at fp32 / bf16 / int8, from parameter counts on the meta device.

Nothing here depends on `vargpt.generation` internals: it times the public `VARGPTPipeline.generate`
(tokenisation and PIL conversion included, as a user sees it) and `model.generate` for text.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..configuration import PRESETS, VARGPTConfig
from ..hub import known_names, shipped_model_path
from ..schedule import scale_schedule
from .flops import generation_flops
from .measure import matmul_peak, median, peak_memory, reset_peak_memory, time_call

# About 103M parameters (LLM 76M, visual decoder 20M, VAE 3.7M, ViT 1.1M), on the tiny tokenizer's ids, so
# that timings reflect matrix work rather than Python overhead. Proposed for `configuration.PRESETS`.
FULL_SIZE_PRESET = "vargpt-v1.1"
BENCH_PROMPT = "a red circle above a blue square on a white background"
UNDERSTANDING_PROMPT = "Describe the picture: which shapes are there, what colours do they have and where are they?"


def bench_config(preset: str) -> VARGPTConfig:
    """A preset of `configuration.PRESETS` ("tiny", "bench-100m", ...) or a model shipped in the package
    ("vargpt-shapes-tiny", its own configuration)."""
    if preset in PRESETS:
        return VARGPTConfig.from_preset(preset)
    shipped = shipped_model_path(preset)
    if shipped is not None:
        return VARGPTConfig.from_pretrained(shipped)
    raise ValueError(f"unknown preset {preset!r}; choose a preset or shipped model: {', '.join(known_names())}")


def available_resolutions(config: VARGPTConfig) -> list[int]:
    """Square resolutions the model can draw whose last latent grid is a power of two of at least 4 (the
    decoder's RoPE reference grid bounds the largest): tiny -> 16, 32."""
    stride = config.image_tokenizer_config.downsample_factor
    out = []
    side = 4
    while side <= config.visual_decoder_config.rope_max_grid:
        try:
            scale_schedule(side * stride, stride=stride)
        except ValueError:
            break
        out.append(side * stride)
        side *= 2
    return out


def weight_memory(config: VARGPTConfig) -> dict[str, Any]:
    """Parameter count (built on the meta device: nothing allocated) and weight bytes at fp32 / bf16 / int8."""
    from ..modeling import VARGPTForConditionalGeneration

    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config)
    per_module = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    total = sum(per_module.values())
    return {
        "parameters": total,
        "parameters_by_module": per_module,
        "bytes": {"fp32": 4 * total, "bf16": 2 * total, "int8": total},
    }


def _build_pipeline(config: VARGPTConfig, device: torch.device, dtype: torch.dtype):
    from ..modeling import VARGPTForConditionalGeneration
    from ..pipeline import VARGPTPipeline
    from ..processing import VARGPTProcessor
    from ..tokenization import build_qwen2_tokenizer, build_tiny_tokenizer

    torch.manual_seed(0)
    model = VARGPTForConditionalGeneration(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    tiny_ids = config.text_config.vocab_size == PRESETS["tiny"]["vocab_size"]
    tokenizer = build_tiny_tokenizer() if tiny_ids else build_qwen2_tokenizer()
    return VARGPTPipeline(model, VARGPTProcessor.from_tokenizer(tokenizer))


def _load_shipped(name: str, device: torch.device, dtype: torch.dtype):
    """A shipped model as users run it: its weights and its own image settings (guidance mode, which the FLOP
    count follows)."""
    from ..pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(name, device=device, dtype=dtype)
    pipe.model.requires_grad_(False)
    return pipe


def _prompt_tokens(pipe, text: str) -> dict[str, torch.Tensor]:
    message = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    rendered = pipe.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    encoded = pipe.processor(text=[rendered], return_tensors="pt")
    return {k: encoded[k].to(pipe.device) for k in ("input_ids", "attention_mask")}


def bench_generation(
    pipe,
    resolution: int,
    batch_size: int,
    repeats: int,
    peak_flops: float,
    cfg_scale: float = 3.0,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One (resolution, batch size) cell: latency, throughput, FLOPs and the share of the matmul peak.

    `speed`: `generate`'s fast-path keywords (`cache_implementation`, `compile`); the untimed warm-up call
    pays any compilation."""
    speed = speed or {}
    device = pipe.device
    schedule = pipe.model.generation_schedule(resolution)
    prompt_len = int(_prompt_tokens(pipe, BENCH_PROMPT)["input_ids"].shape[1])
    prompts = [BENCH_PROMPT] * batch_size
    reset_peak_memory(device)
    times = time_call(
        lambda: pipe.generate(prompts, seed=0, resolution=resolution, cfg_scale=cfg_scale, **speed), device, repeats
    )
    latency = median(times)
    mode = pipe.image_config.uncond_mode
    null_ids = pipe.null_prompt_ids(pipe.image_config)
    flops = generation_flops(
        pipe.model.config,
        schedule,
        prompt_len,
        cfg=cfg_scale != 1.0,
        uncond_mode=mode,
        null_prompt_tokens=None if null_ids is None else int(null_ids.numel()),
        batch_size=batch_size,
    )
    per_image = latency / batch_size
    achieved = flops["total"] / per_image
    return {
        "resolution": resolution,
        "batch_size": batch_size,
        "scale_steps": len(schedule),
        "tokens_per_image": schedule.num_tokens,
        "prompt_tokens": prompt_len,
        "cfg_scale": cfg_scale,
        "uncond_mode": mode,
        "latency_s": latency,
        "latency_all_s": times,
        "seconds_per_image": per_image,
        "images_per_s": batch_size / latency,
        "scale_steps_per_s": len(schedule) / latency,
        "flops_per_image": flops,
        "achieved_flops_per_s": achieved,
        "share_of_matmul_peak": achieved / peak_flops,
        "peak_memory": peak_memory(device),
    }


def bench_understanding(pipe, new_tokens: int, repeats: int, speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prefill tokens/s (prompt + 1 token) and decode tokens/s (the extra `new_tokens` - 1 steps), batch 1.

    EOS is disabled (`eos_token_id=-1`) so that a random model decodes exactly `new_tokens` tokens.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to separate decoding from prefill, got {new_tokens}")
    inputs = _prompt_tokens(pipe, UNDERSTANDING_PROMPT)
    length = int(inputs["input_ids"].shape[1])
    limit = pipe.model.config.text_config.max_position_embeddings
    if length + new_tokens > limit:
        raise ValueError(f"prompt ({length}) + new_tokens ({new_tokens}) exceeds the model's {limit} positions")

    def run(n: int):
        return lambda: pipe.model.generate(**inputs, max_new_tokens=n, eos_token_id=-1, **(speed or {}))

    reset_peak_memory(pipe.device)
    prefill = median(time_call(run(1), pipe.device, repeats))
    full = median(time_call(run(new_tokens), pipe.device, repeats))
    decode = max(full - prefill, 1e-9)
    return {
        "prompt_tokens": length,
        "new_tokens": new_tokens,
        "prefill_s": prefill,
        "prefill_tokens_per_s": length / prefill,
        "decode_s": decode,
        "decode_tokens_per_s": (new_tokens - 1) / decode,
        "end_to_end_tokens_per_s": (length + new_tokens) / full,
        "peak_memory": peak_memory(pipe.device),
    }


def run_benchmark(
    preset: str = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    resolutions: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    text_new_tokens: int = 32,
    matmul_size: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    static_cache: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """The whole benchmark as a JSON-ready dict (see the module docstring).

    `threads` sets torch's intra-op threads for the run (on a shared CPU, fewer threads than cores avoids
    oversubscription, which otherwise dominates the timings). `static_cache` / `compile` time the fast path
    (`model.generate(cache_implementation="static", compile=True)`); compilation happens in the warm-up."""
    speed = {"cache_implementation": "static", "compile": compile} if static_cache or compile else {}
    _set_threads(threads)
    device, dtype = _device_and_dtype(device, dtype)
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    config = bench_config(preset)
    resolutions = _chosen_resolutions(config, preset, resolutions)
    # A GPU finishes a 2048-wide product in tens of microseconds, where launch and synchronisation
    # overheads dominate the clock; 8192 wide takes milliseconds there and seconds on a CPU.
    if matmul_size is None:
        matmul_size = 8192 if device.type == "cuda" else 2048
    peak = matmul_peak(device, dtype, size=matmul_size)
    pipe = _build_pipeline(config, device, dtype) if preset in PRESETS else _load_shipped(preset, device, dtype)
    generation = [
        _generation_row(pipe, preset, resolution, batch, repeats, peak["flops_per_s"], speed, progress)
        for resolution in resolutions
        for batch in batch_sizes
    ]
    return {
        "preset": preset,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": _machine(device),
        "repeats": repeats,
        "decoding": "compiled" if compile else "static_cache" if static_cache else "eager",
        "matmul_peak": peak,
        "model": weight_memory(config),
        "generation": generation,
        "understanding": bench_understanding(pipe, text_new_tokens, repeats, speed),
        "full_size_weight_memory": weight_memory(VARGPTConfig.from_preset(FULL_SIZE_PRESET)),
    }


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _device_and_dtype(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device, dtype


def _chosen_resolutions(config: VARGPTConfig, preset: str, resolutions: Sequence[int] | None) -> list[int]:
    """The asked resolutions (default: every available one), each checked to be available."""
    allowed = available_resolutions(config)
    chosen = list(resolutions) if resolutions else allowed
    bad = [r for r in chosen if r not in allowed]
    if bad:
        raise ValueError(f"resolutions {bad} are not available for preset {preset!r}; available: {allowed}")
    return chosen


def _generation_row(
    pipe,
    preset: str,
    resolution: int,
    batch: int,
    repeats: int,
    peak_flops: float,
    speed: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    row = bench_generation(pipe, resolution, batch, repeats, peak_flops, speed=speed)
    if progress:
        print(
            f"{preset} {resolution}px batch {batch}: {row['latency_s']:.3f} s, "
            f"{row['images_per_s']:.2f} img/s, "
            f"{100 * row['share_of_matmul_peak']:.1f}% of peak",
            flush=True,
        )
    return row


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def write_report(
    report: dict[str, Any], json_path: str | os.PathLike, plot_path: str | os.PathLike | None = None
) -> Path:
    """Write the JSON report and its plot (default: beside the JSON, .png). Returns the plot's path."""
    import json

    from .plot import plot_benchmark

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot = Path(plot_path) if plot_path is not None else json_path.with_suffix(".png")
    plot_benchmark(report, plot)
    return plot
