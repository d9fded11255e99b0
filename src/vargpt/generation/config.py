"""Settings of image generation, with the two published presets.

The original code hard-codes cfg 3, tau 0.5, top-k 900, top-p 0.97; the technical report states cfg 1.5,
top-k 900, top-p 0.95 (it gives no tau, so the code's 0.5 is kept). Every value can be set per call.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

UNCOND_MODES = ("original", "null_prompt")
# A checkpoint may carry its own defaults (e.g. a model whose unconditional branch was never trained draws
# without guidance); `VARGPTPipeline.from_pretrained` uses them unless a preset is asked for.
IMAGE_GENERATION_CONFIG_NAME = "image_generation_config.json"
POSITION_MODES = ("mrope", "cache")


@dataclass(frozen=True)
class ImageGenerationConfig:
    """How one image is drawn.

    * `cfg_scale`: classifier-free guidance on bit logits (1.0 disables the unconditional branch).
    * `tau`: logits are divided by tau before guidance.
    * `top_k`, `top_p`: filtering of each bit's two-way distribution (top-k below 2 means greedy).
    * `resolution`: pixels of the square side (None: the model's default, 512 for the published model).
    * `aspect_ratio`: height / width, snapped to Infinity's templates.
    * `uncond_mode`: "original" = the published unconditional branch (context `cfg_uncond[:N]`, condition
      from `cfg_uncond[0]`, an LLM pass over only the current scale's tokens with no prompt and no cache).
      That branch is never trained (training only swaps the condition embedding), so guidance pushes away
      from an arbitrary distribution. "null_prompt" = the unconditional branch is the same conversation with an
      empty user turn, run exactly like the conditional one (its own LLM cache, its own decoder context, the
      usual condition embedding): what a model trained with prompt dropout (`SFTCollator(prompt_dropout=p)`)
      has learnt to draw without a prompt. The caller passes the empty conversation's ids
      (`VARGPTPipeline` does).
    * `position_mode`: rotary positions of the scale tokens in the LLM. "mrope" continues the prompt's
      M-RoPE text positions (what training sees); "cache" uses the raw cache index, as the original
      inference does (identical for prompts without understanding images).
    """

    cfg_scale: float = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    resolution: int | None = None
    aspect_ratio: float = 1.0
    uncond_mode: str = "original"
    position_mode: str = "mrope"

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.uncond_mode not in UNCOND_MODES:
            raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {self.uncond_mode!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if self.aspect_ratio <= 0:
            raise ValueError(f"aspect_ratio must be positive, got {self.aspect_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / IMAGE_GENERATION_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageGenerationConfig | None:
        """The defaults a checkpoint directory ships, or None when it ships none."""
        path = Path(directory) / IMAGE_GENERATION_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object of image generation settings")
        try:
            return cls().updated(**raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def updated(self, **changes: Any) -> ImageGenerationConfig:
        """A copy with the given fields replaced; unknown names are an error, None leaves a field as is."""
        known = set(self.to_dict())
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown image generation settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> ImageGenerationConfig:
        if name not in IMAGE_PRESETS:
            raise ValueError(f"unknown image preset {name!r}; choose one of {sorted(IMAGE_PRESETS)}")
        return IMAGE_PRESETS[name].updated(**changes)


IMAGE_PRESETS: dict[str, ImageGenerationConfig] = {
    "original-code": ImageGenerationConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97),
    "paper": ImageGenerationConfig(cfg_scale=1.5, tau=0.5, top_k=900, top_p=0.95),
}
DEFAULT_IMAGE_PRESET = "original-code"
