"""How the installed transformers hands the LLM its KV cache, and back.

transformers 5.25 renamed the Qwen2-VL LLM's `past_key_values` argument and output field to `cache` (the old
names warn at every call and are to go in 5.40). We support 5.21 onwards, so we ask the installed LLM class
once which name it takes rather than pinning one spelling.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

CACHE_ARGUMENT: str = (
    "cache" if "cache" in inspect.signature(Qwen2VLTextModel.forward).parameters else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword argument that passes `cache` to the LLM's forward."""
    return {CACHE_ARGUMENT: cache}


def returned_cache(outputs: Any) -> Any:
    """The cache an LLM forward returned."""
    return getattr(outputs, CACHE_ARGUMENT)
