"""Weight-only quantization of the two big transformers (the LLM's layers and the visual decoder's blocks).

The library is bitsandbytes, through transformers' `BitsAndBytesConfig`: it is the one maintained library
whose int8 *and* 4-bit weights are really stored packed on both the CPU and CUDA (torchao's 4-bit formats
need CUDA or extra kernels; on the CPU its int4 is kept unpacked in int8), transformers quantizes each tensor
as it is read from the shards (so a 22 GB bf16 checkpoint never sits in memory at full size), and peft's
QLoRA trains on exactly these layers.

What stays in high precision, and why: the token and `sos` embeddings and the text head (lookups and the
softmax over 152k words are sensitive and cheap), the bit head and the decoder's own embeddings and AdaLN
modulation (they set every bit's logit and every block's scale), both projectors between the towers
(small), the ViT (one pass per image) and the VAE (convolutions; bitsandbytes quantizes only linear layers).
Norms have no linear layers and are never touched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

QUANTIZATION_MODES = ("int8", "int4")
# the containers whose blocks' linear layers are quantized: the LLM's layers and the visual decoder's blocks
QUANTIZED_BLOCK_CONTAINERS = ("model.layers", "vargpt_gen.block_chunks")


def high_precision_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose linear layers keep the model's dtype: everything outside
    `QUANTIZED_BLOCK_CONTAINERS`, named as transformers' `llm_int8_skip_modules` matches (a prefix up to a dot).

    Read off the model's children rather than typed out, so a renamed or added module is never quantized by
    accident. `model` may live on the meta device.
    """
    names: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in QUANTIZED_BLOCK_CONTAINERS:
                continue
            if any(container.startswith(full + ".") for container in QUANTIZED_BLOCK_CONTAINERS):
                visit(full + ".", child)
            else:
                names.append(full)

    visit("", model)
    return sorted(names)


def bitsandbytes_config(mode: str, compute_dtype: torch.dtype, skip_modules: list[str]) -> Any:
    """transformers' `BitsAndBytesConfig` for `mode` ("int8" or "int4"), skipping `skip_modules`.

    int4 is NF4 with double quantization (QLoRA's choice: NF4 suits normally distributed weights) and
    computes in `compute_dtype`; int8 is LLM.int8 with its default outlier threshold.
    """
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if mode == "int4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)} or None, got {mode!r}")


def check_quantization_available(mode: str) -> None:
    """Fail early, in one line, when the library is missing (it is an optional extra)."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)} or None, got {mode!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"quantization={mode!r} needs bitsandbytes: pip install 'vargpt[quantization]' (or bitsandbytes)"
        ) from err


def is_quantized(model: nn.Module) -> bool:
    """True when transformers loaded `model` with a quantization config."""
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)


class _OnceFilter(logging.Filter):
    """Lets a record whose message starts with `prefix` through the first time only.

    bitsandbytes' 8-bit matmul logs "inputs will be cast from torch.bfloat16 to float16" on every call: a full-size
    int8 image (hundreds of thousands of matmuls) buried the run's own output under that one line."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


def log_int8_cast_once() -> None:
    """Install `_OnceFilter` on bitsandbytes' matmul logger (idempotent): the notice is still seen, once."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) and f.prefix == INT8_CAST_NOTICE for f in logger.filters):
        logger.addFilter(_OnceFilter(INT8_CAST_NOTICE))


def quantization_load_kwargs(model_class: type, config: Any, mode: str, dtype: Any) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments that load `model_class(config)` with `mode` weights.

    The skip list is read off the architecture built on the meta device (no memory). The compute dtype is
    the requested one; for "auto" the checkpoint's own when it is 16-bit, else bf16 (bitsandbytes' 8-bit
    matmul casts fp32 inputs to fp16 anyway, and a quantized model is chosen to save memory).
    """
    check_quantization_available(mode)
    if mode == "int8":
        log_int8_cast_once()
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        stored = getattr(config, "dtype", None)
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        dtype = stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
    with torch.device("meta"):
        skeleton = model_class(config)
    return {"quantization_config": bitsandbytes_config(mode, dtype, high_precision_modules(skeleton)), "dtype": dtype}
