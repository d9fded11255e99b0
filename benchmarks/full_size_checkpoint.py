"""Write a synthetic checkpoint in the published VARGPT-v1.1 layout, tensor by tensor.

The layout is the original's: `config.json` (model_type `vargpt_qwen2_vl`), the tokenizer and processor
files, `model.safetensors.index.json` and `model-0000K-of-0000N.safetensors` shards in bf16 under the
original tensor names. Names, shapes and dtypes come from the package's own model built on the meta device,
so the result is exactly what `VARGPTForConditionalGeneration.from_pretrained` expects.

Weights are random but follow the model's own initialisation, tensor kind by tensor kind:
  * LLM, ViT, projectors, `sos_embedding` (transformers' initialiser): linear / conv / embedding weights
    normal(0, initializer_range = 0.02), biases 0, LayerNorm / RMSNorm weights 1 (biases 0), the padding row
    of an embedding 0;
  * `vae_local` (PyTorch defaults): conv weights and biases uniform(+-1/sqrt(fan_in)) (kaiming-uniform with
    a = sqrt(5)), GroupNorm 1 / 0;
  * `vargpt_gen` (Infinity's scheme): linear and embedding weights normal(0, init_std), the head and the
    head's AdaLN scaled down (`head_init_scale`, `ada_init_scale`), residual output projections by
    1/sqrt(2 depth), `ada_gss` normal / sqrt(C) * ada_init_scale, `scale_mul_1H11` = ln 4, q/v biases 0,
    `pos_start` and the pooled query `mat_q` normal(0, sqrt(1 / (3 C))), `cfg_uncond` exactly the model's
    own seeded draw;
  * buffers: `zero_k_bias` zeros, the quantiser's `lfq.mask` exactly as the model builds it.
Exact values (`cfg_uncond`, `lfq.mask`) are read from small real instances of the owning modules.
`tests/test_benchmarks_full_size.py` checks every rule against a real model of the "tiny" preset.

Every tensor is drawn from its own seeded generator (seed and tensor name) in chunks and written straight
into its shard file, so the writer holds a few hundred MB whatever the model's size. The directory is
written in a temporary sibling and swapped into place when complete.

Run:  python benchmarks/full_size_checkpoint.py --out runs/vargpt-v1.1-synthetic
      python benchmarks/full_size_checkpoint.py --preset tiny --out runs/tiny-sharded --max-shard-size 300KB
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vargpt.checkpoint import INDEX_FILE, atomic_directory_write
from vargpt.configuration import PRESETS, VARGPTConfig
from vargpt.image_tokenizer.multiscale import MultiScaleBSQ
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.processing import VARGPTProcessor
from vargpt.visual_decoder import InfinityDecoder
from vargpt.visual_decoder.attention import CosineSelfAttention, CrossAttention
from vargpt.visual_decoder.block import DecoderBlock
from vargpt.visual_decoder.layers import RMSNorm as DecoderRMSNorm

# The architecture name the published config.json carries (the package loads by model_type, not by it).
PUBLISHED_ARCHITECTURE = "VARGPTQwen2VLForConditionalGeneration"
SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.int32: "I32",
}
CHUNK_VALUES = 1 << 25  # values drawn per step: 128 MB of fp32 scratch


@dataclass(frozen=True)
class Init:
    """How one tensor is filled. kind: "normal" (std), "uniform" (+-bound), "constant" (value) or "exact"."""

    kind: str
    scale: float = 0.0
    exact: torch.Tensor | None = None
    zero_row: int | None = None  # an embedding's padding row, zeroed after the draw


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype on disk
    init: Init

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


# -- configuration ------------------------------------------------------------------------------------


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_config(preset: str = "vargpt-v1.1", overrides: dict[str, Any] | None = None) -> VARGPTConfig:
    """A preset's configuration with `overrides` merged in (nested dicts merge key by key, so
    `{"vision_config": {"depth": 2}}` keeps the ViT's other fields)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return VARGPTConfig(**_deep_merge(PRESETS[preset], overrides or {}))


def meta_model(config: VARGPTConfig) -> VARGPTForConditionalGeneration:
    with torch.device("meta"):
        return VARGPTForConditionalGeneration(config)


# -- initialisation rules ---------------------------------------------------------------------------------


def _probe_exact_values(config: VARGPTConfig) -> dict[str, torch.Tensor]:
    """Values the model draws deterministically, read from small real instances of their owners: the decoder's
    `cfg_uncond` (a seeded draw whose shape depends only on `cfg_uncond_length` and `context_dim`) and the
    quantiser's `lfq.mask`."""
    dec = config.visual_decoder_config
    small = dec.__class__(**{**dec.to_dict(), "depth": 1, "num_block_chunks": 1, "embed_dim": 32, "num_heads": 1})
    probe = InfinityDecoder(small)
    quantizer = MultiScaleBSQ(config.image_tokenizer_config.bits)
    exact = {"vargpt_gen.cfg_uncond": probe.cfg_uncond.detach().clone()}
    for name, buffer in quantizer.named_buffers():
        exact[f"vae_local.quantizer.{name}"] = buffer.detach().clone()
    return exact


def _norm_like(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.GroupNorm) or "LayerNorm" in name or "RMSNorm" in name


def _transformers_rule(module: nn.Module, pname: str, std: float) -> Init | None:
    """transformers' `PreTrainedModel._init_weights` (the LLM, the ViT, projectors, `sos_embedding`)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Init("normal", std) if pname == "weight" else Init("constant", 0.0)
    if isinstance(module, nn.Embedding) and pname == "weight":
        return Init("normal", std, zero_row=module.padding_idx)
    if _norm_like(module):
        return Init("constant", 1.0 if pname == "weight" else 0.0)
    return None


def _torch_default_rule(module: nn.Module, pname: str) -> Init | None:
    """PyTorch's constructors (the image tokenizer initialises nothing itself)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight.shape[1] * math.prod(module.weight.shape[2:])
        return Init("uniform", 1.0 / math.sqrt(fan_in))  # weight: kaiming_uniform(a=sqrt(5)); bias: the same bound
    if isinstance(module, nn.GroupNorm):
        return Init("constant", 1.0 if pname == "weight" else 0.0)
    return None


def _decoder_rules(decoder: nn.Module, prefix: str, saved: set[str]) -> dict[str, Init]:
    """Infinity's from-scratch initialisation as `InfinityDecoder.reset_parameters` applies it."""
    config = decoder.config
    C, std = config.embed_dim, config.init_std
    rules: dict[str, Init] = {}
    for mname, module in decoder.named_modules():
        for pname, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{mname}.{pname}" if mname else pname
            if prefix + key not in saved:
                continue  # a non-persistent buffer
            rule = None
            if isinstance(module, nn.Linear):
                rule = Init("normal", std) if pname == "weight" else Init("constant", 0.0)
            elif isinstance(module, nn.Embedding):
                rule = Init("normal", std)
            elif isinstance(module, nn.LayerNorm):
                rule = Init("constant", 1.0 if pname == "weight" else 0.0)
            elif isinstance(module, DecoderRMSNorm):
                rule = Init("constant", 1.0)
            elif isinstance(module, CosineSelfAttention):
                rule = Init("constant", math.log(4.0) if pname == "scale_mul_1H11" else 0.0)
            elif isinstance(module, CrossAttention):
                rule = Init("normal", math.sqrt(1 / module.dim / 3)) if pname == "mat_q" else Init("constant", 0.0)
            elif isinstance(module, DecoderBlock) and pname == "ada_gss":
                rule = Init("normal", config.ada_init_scale / math.sqrt(C))
            elif module is decoder and pname == "pos_start":
                rule = Init("normal", math.sqrt(1 / C / 3))
            elif module is decoder and pname == "cfg_uncond":
                rule = Init("exact")  # filled from the probe
            if rule is None:
                raise ValueError(f"no initialisation rule for {prefix}{key} ({type(module).__name__})")
            rules[prefix + key] = rule
    # the multipliers `reset_parameters` applies after the draws
    scaled = {"head_nm.ada_lin.1.weight": config.ada_init_scale, "head.weight": config.head_init_scale}
    proj = 1 / math.sqrt(2 * config.depth)
    for bname, module in decoder.named_modules():
        if isinstance(module, DecoderBlock):
            for sub in ("sa.proj.weight", "ca.proj.weight", "ffn.fc2.weight"):
                scaled[f"{bname}.{sub}"] = proj
    for key, factor in scaled.items():
        rule = rules[prefix + key]
        rules[prefix + key] = Init("normal", rule.scale * factor)
    return rules


def init_rules(model: VARGPTForConditionalGeneration, config: VARGPTConfig) -> dict[str, Init]:
    """The initialisation of every state-dict tensor of `model` (built on the meta device)."""
    rules: dict[str, Init] = {}
    text_std = getattr(config.text_config, "initializer_range", None) or 0.02
    vision_std = getattr(config.vision_config, "initializer_range", None) or 0.02
    saved = set(model.state_dict())
    rules.update(_decoder_rules(model.vargpt_gen, "vargpt_gen.", saved))
    for mname, module in model.named_modules():
        if mname == "vargpt_gen" or mname.startswith("vargpt_gen."):
            continue
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{mname}.{pname}"
            if key not in saved:
                continue  # a non-persistent buffer (rotary frequencies)
            if mname.startswith("vae_local"):
                rule = None if not tensor.dtype.is_floating_point else _torch_default_rule(module, pname)
                if rule is None and key == "vae_local.quantizer.lfq.mask":
                    rule = Init("exact")
            else:
                std = vision_std if mname.startswith("visual") else text_std
                rule = _transformers_rule(module, pname, std)
            if rule is None:
                raise ValueError(f"no initialisation rule for {key} ({type(module).__name__})")
            rules[key] = rule
    exact = _probe_exact_values(config)
    for name, rule in rules.items():
        if rule.kind == "exact":
            rules[name] = Init("exact", exact=exact[name])
    return rules


def tensor_plan(config: VARGPTConfig, dtype: torch.dtype = torch.bfloat16) -> list[TensorPlan]:
    """Every state-dict tensor in the model's order, with its shape, dtype on disk and initialisation."""
    model = meta_model(config)
    rules = init_rules(model, config)
    state = model.state_dict()
    if set(state) != set(rules):
        raise ValueError(f"rules and state dict disagree: {sorted(set(state) ^ set(rules))[:10]}")
    plan = []
    for name, tensor in state.items():
        on_disk = dtype if tensor.dtype.is_floating_point else tensor.dtype
        plan.append(TensorPlan(name, tuple(tensor.shape), on_disk, rules[name]))
    return plan


# -- values ---------------------------------------------------------------------------------------------------


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def value_chunks(item: TensorPlan, seed: int, chunk: int = CHUNK_VALUES) -> Iterator[torch.Tensor]:
    """The tensor's values, flattened, in on-disk dtype, `chunk` values at a time."""
    init = item.init
    if init.kind == "exact":
        values = init.exact.reshape(-1).to(item.dtype)
        if tuple(init.exact.shape) != item.shape:
            raise ValueError(f"{item.name}: exact value of shape {tuple(init.exact.shape)}, expected {item.shape}")
        yield values
        return
    generator = torch.Generator().manual_seed(tensor_seed(seed, item.name))
    row = item.shape[-1] if item.shape else 1
    for start in range(0, item.numel, chunk):
        n = min(chunk, item.numel - start)
        if init.kind == "constant":
            values = torch.full((n,), init.scale, dtype=torch.float32)
        elif init.kind == "normal":
            values = torch.randn(n, generator=generator).mul_(init.scale)
        elif init.kind == "uniform":
            values = torch.empty(n).uniform_(-init.scale, init.scale, generator=generator)
        else:
            raise ValueError(f"{item.name}: unknown initialisation {init.kind!r}")
        if init.zero_row is not None:
            lo, hi = init.zero_row * row - start, (init.zero_row + 1) * row - start
            values[max(lo, 0) : max(min(hi, n), 0)] = 0.0
        yield values.to(item.dtype)


def materialise(item: TensorPlan, seed: int) -> torch.Tensor:
    """One tensor in full (tests and small checks; the writer never calls this)."""
    return torch.cat(list(value_chunks(item, seed))).view(item.shape)


# -- safetensors files ---------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """Bytes of a size: "5GB" -> 5e9, "300KiB" -> 307200, 1234 -> 1234 (transformers' units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 300KB, 1234)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * powers[unit])


def plan_shards(plan: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def safetensors_header(items: list[TensorPlan]) -> bytes:
    """The file's 8-byte length and JSON header, padded with spaces to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.name] = {
            "dtype": SAFETENSORS_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shard(path: Path, items: list[TensorPlan], seed: int, advance: Callable[[int], None]) -> None:
    """Header first, then each tensor's bytes chunk by chunk; the file's pages are dropped from the page cache
    once written (other processes share this machine's memory)."""
    with open(path, "wb") as handle:
        handle.write(safetensors_header(items))
        for item in items:
            written = 0
            for values in value_chunks(item, seed):
                data = values.contiguous().view(torch.uint8).numpy()
                handle.write(memoryview(data))
                written += data.nbytes
                advance(data.nbytes)
            if written != item.nbytes:
                raise RuntimeError(f"{item.name}: wrote {written} bytes, expected {item.nbytes}")
        handle.flush()
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def save_processor(config: VARGPTConfig, directory: Path) -> None:
    """The real Qwen2 tokenizer for a model with its vocabulary, the tiny byte tokenizer otherwise."""
    from vargpt.tokenization import build_qwen2_tokenizer, build_tiny_tokenizer

    big = config.text_config.vocab_size > config.image_gen_pad_token_id >= 151659
    tokenizer = build_qwen2_tokenizer() if big else build_tiny_tokenizer()
    VARGPTProcessor.from_tokenizer(tokenizer).save_pretrained(directory)


def write_checkpoint(
    out: str | os.PathLike,
    preset: str = "vargpt-v1.1",
    overrides: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the checkpoint to `out`; returns a summary (sizes, counts, seconds)."""
    t0 = time.perf_counter()
    config = build_config(preset, overrides)
    config.architectures = [PUBLISHED_ARCHITECTURE]
    config.dtype = dtype
    plan = tensor_plan(config, dtype)
    shards = plan_shards(plan, parse_size(max_shard_size))
    total_bytes = sum(item.nbytes for item in plan)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]

    def write(staging: Path) -> None:
        config.save_pretrained(staging)
        save_processor(config, staging)
        weight_map = {item.name: name for name, items in zip(names, shards, strict=True) for item in items}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="weights", disable=not progress) as bar:
            for name, items in zip(names, shards, strict=True):
                bar.set_postfix_str(name)
                write_shard(staging / name, items, seed, bar.update)

    atomic_directory_write(out, write)
    return {
        "out": str(out),
        "preset": preset,
        "overrides": overrides or {},
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(plan),
        "values": sum(item.numel for item in plan),
        "bytes": total_bytes,
        "shards": len(shards),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/vargpt-v1.1-synthetic", help="checkpoint directory to write")
    parser.add_argument("--preset", default="vargpt-v1.1", choices=sorted(PRESETS))
    parser.add_argument(
        "--overrides", default="{}", help="JSON merged into the preset, e.g. '{\"num_hidden_layers\": 2}'"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard (transformers' units: 5GB, 300KB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = write_checkpoint(
        args.out,
        preset=args.preset,
        overrides=json.loads(args.overrides),
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        progress=not args.quiet,
    )
    print(
        f"wrote {summary['out']}: {summary['tensors']} tensors, {summary['values']:,} values, "
        f"{summary['bytes'] / 1e9:.2f} GB ({summary['bytes'] / 2**30:.2f} GiB) in {summary['shards']} shard(s), "
        f"{summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
