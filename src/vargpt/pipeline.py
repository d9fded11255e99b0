"""`VARGPTPipeline`: model + processor behind three calls: chat, generate, edit.

This is the public API the command line, the server and the evaluations call; its names are stable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .configuration import PRESETS, VARGPTConfig
from .conversation import user_message
from .generation.config import DEFAULT_IMAGE_PRESET, ImageGenerationConfig
from .hub import SHIPPED_MODELS as SHIPPED_MODELS  # re-exported: importable from here as before
from .hub import resolve_checkpoint, shipped_model_path
from .image_io import VideoSource
from .modeling import VARGPTForConditionalGeneration
from .processing import VARGPTProcessor, is_video
from .quantization import is_quantized

ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass
class ChatTurn:
    """One answer: text pieces and images in the order the model wrote them."""

    segments: list[str | Image.Image]

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]


class VARGPTPipeline:
    """Owns a `VARGPTForConditionalGeneration` and its `VARGPTProcessor`.

    >>> pipe = VARGPTPipeline.from_pretrained("path/to/VARGPT-v1.1")          # doctest: +SKIP
    >>> pipe.chat("What is in this picture?", images=["cat.jpg"])             # doctest: +SKIP
    >>> pipe.generate("a red circle above a blue square", num_images=2, seed=0)  # doctest: +SKIP
    >>> pipe.edit("scene.png", "make the circle green", seed=0)                # doctest: +SKIP
    """

    def __init__(
        self,
        model: VARGPTForConditionalGeneration,
        processor: VARGPTProcessor,
        image_preset: str = DEFAULT_IMAGE_PRESET,
        image_config: ImageGenerationConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.image_config = image_config or ImageGenerationConfig.from_preset(image_preset)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        image_preset: str | None = None,
        seed: int = 0,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> VARGPTPipeline:
        """A checkpoint folder (original layout), a shipped model name, a Hugging Face Hub repo id, or a preset.

        Image settings: `image_preset` if given, else the checkpoint's own `image_generation_config.json` if it
        has one, else the "original-code" preset.

        A Hub repo id ("owner/name") loads the checkpoint files from the Hub cache, downloading them first unless
        `local_files_only=True` or `HF_HUB_OFFLINE=1` (`revision`, `cache_dir`, `token`: see
        `vargpt.hub.resolve_checkpoint`). `model_kwargs` go to `VARGPTForConditionalGeneration.from_pretrained`.

        Presets build a randomly initialised model (seeded) with its tokenizer: "tiny" is for tests and
        trying the API without weights; "vargpt-v1.1" is the full-size architecture (needs ~44 GB in fp32).
        A preset takes only the model keywords of `PRESET_MODEL_KWARGS`; any other raises a TypeError (it would
        otherwise be ignored without a word).
        """
        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            quantized = model_kwargs.get("quantization") is not None
            dtype = torch.bfloat16 if device.type == "cuda" or quantized else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        image_config = None
        if str(name_or_path) in PRESETS and not Path(str(name_or_path)).is_dir():
            _check_preset_kwargs(str(name_or_path), model_kwargs, revision)
            config = VARGPTConfig.from_preset(str(name_or_path))
            torch.manual_seed(seed)
            model = VARGPTForConditionalGeneration(config).to(dtype)
            processor = preset_processor(str(name_or_path))
        else:
            path = resolve_checkpoint(
                name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
            )
            if model_kwargs.get("device_map") is None and (device.type != "cpu" or model_kwargs.get("quantization")):
                model_kwargs["device_map"] = {"": str(device)}  # weights go straight to the device, no CPU copy first
            model = VARGPTForConditionalGeneration.from_pretrained(path, dtype=dtype, **model_kwargs)
            processor = VARGPTProcessor.from_pretrained(path)
            if image_preset is None:
                image_config = ImageGenerationConfig.from_pretrained(path)
        if not _is_placed(model):
            model = model.to(device)
        _vae_in_fp32_on_cpu(model)
        return cls(model, processor, image_preset=image_preset or DEFAULT_IMAGE_PRESET, image_config=image_config)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the token embeddings (the main device of a dispatched model)."""
        return self.model.get_input_embeddings().weight.device

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        self.image_config.save_pretrained(directory)

    # -- the three calls -------------------------------------------------------------------------------
    def chat(
        self,
        text: str,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoSource] | None = None,
        **settings: Any,
    ) -> str:
        """Answer a question, optionally about images and videos (each a list of frames or a uint8 [T, H, W, 3]
        array, read through Qwen2-VL's video path). Returns the answer's text."""
        return self.converse(text, images=images, videos=videos, **settings).text

    def chat_batch(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[ImageInput]] | None = None,
        *,
        max_new_tokens: int = 256,
        **settings: Any,
    ) -> list[str]:
        """Answer several questions in one batch (left padded); `images[i]` are the images of `texts[i]`."""
        images = [list(row) for row in images] if images is not None else [[] for _ in texts]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(images)} image lists")
        messages = [[user_message(t, len(row))] for t, row in zip(texts, images, strict=True)]
        inputs = self._encode(messages, images)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **settings)
        new = ids[:, inputs["input_ids"].shape[1] :]
        return [self.processor.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]

    def edit_batch(
        self, images: Sequence[ImageInput], instructions: Sequence[str], seed: int | None = None, **settings: Any
    ) -> list[Image.Image]:
        """Several edits in one batch, one output image per (image, instruction)."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        messages = [[user_message(text, 1)] for text in instructions]
        inputs = self._encode(messages, [[img] for img in images], editing=True)
        seeds = None if seed is None else [seed] * len(instructions)  # each edit depends on its own inputs only
        out = self._draw(inputs, seeds, settings.pop("preset", None), settings)
        return [self.processor.postprocess_generated(row[0].unsqueeze(0))[0] for row in out.images]

    def converse(
        self,
        text: str,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoSource] | None = None,
        *,
        history: Sequence[dict] | None = None,
        allow_images: bool = True,
        seed: int | None = None,
        max_new_tokens: int = 256,
        **settings: Any,
    ) -> ChatTurn:
        """One turn in which the model may answer with text and images (when it decides to draw)."""
        messages = [*history] if history else []
        if videos is not None and (not isinstance(videos, (list, tuple)) or not all(map(is_video, videos))):
            raise ValueError("videos must be a list of videos, each a list of frames or a [T, H, W, 3] array")
        messages.append(user_message(text, len(images or []), len(videos or [])))
        inputs = self._encode([messages], [list(images or [])], videos=list(videos or []))
        mode = "interleaved" if allow_images else "text"
        config = self.image_config.updated(**{k: v for k, v in settings.items() if k in _IMAGE_SETTING_NAMES})
        settings = {k: v for k, v in settings.items() if k not in _IMAGE_SETTING_NAMES}
        out = self.model.generate(
            **inputs,
            generation_mode=mode,
            return_dict_in_generate=True,
            seed=seed,
            max_new_tokens=max_new_tokens,
            image_config=config,
            null_prompt_ids=self.null_prompt_ids(config),
            **settings,
        )
        return self._segments(out, inputs["input_ids"].shape[1], row=0)

    def generate(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        preset: str | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        """Text-to-image. `prompt` may be a list (a batch); returns `num_images` images per prompt, in order.

        Image j of a prompt is drawn from seed `seed + j` alone, so it does not depend on the other prompts in
        the batch: `generate([a, b], seed=s)[1] == generate(b, seed=s)[0]` (bit for bit on the CPU; on a GPU,
        kernels picked by batch size can change low bits and so a draw). `seed` may also be one seed per
        prompt (image j of prompt i then uses `seed[i] + j`), which is how benchmark samplers make a prompt's
        images independent of how prompts are grouped into batches.
        `settings`: cfg_scale, tau, top_k, top_p, resolution, aspect_ratio, uncond_mode, position_mode; and
        `cache_implementation="static"` / `compile=True` (the fast path, see `model.generate`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if seed is None or isinstance(seed, int):
            base_seeds = None if seed is None else [seed] * len(prompts)
        else:
            base_seeds = [int(s) for s in seed]
            if len(base_seeds) != len(prompts):
                raise ValueError(f"got {len(base_seeds)} seeds for {len(prompts)} prompts: give one per prompt")
        batch = [p for p in prompts for _ in range(num_images)]
        messages = [[user_message(p, 0)] for p in batch]
        inputs = self._encode(messages, [[] for _ in batch])
        seeds = None if base_seeds is None else [s + j for s in base_seeds for j in range(num_images)]
        out = self._draw(inputs, seeds, preset, settings)
        return [self.processor.postprocess_generated(imgs[0].unsqueeze(0))[0] for imgs in out.images]

    def edit(self, image: ImageInput, instruction: str, seed: int | None = None, **settings: Any) -> Image.Image:
        """Instruction-based editing: the input image goes to the ViT, the output comes from the scale loop."""
        messages = [[user_message(instruction, 1)]]
        inputs = self._encode(messages, [[image]], editing=True)
        out = self._draw(inputs, seed, settings.pop("preset", None), settings)
        return self.processor.postprocess_generated(out.images[0][0].unsqueeze(0))[0]

    # -- internals -------------------------------------------------------------------------------------
    def _draw(self, inputs, seed, preset, settings):
        config = ImageGenerationConfig.from_preset(preset) if preset else self.image_config
        # how to run, not what to draw: these go to generate, not into the image settings
        speed = {k: settings.pop(k) for k in ("cache_implementation", "compile") if k in settings}
        config = config.updated(**settings)
        return self.model.generate(
            **inputs,
            generation_mode="image",
            image_config=config,
            seed=seed,
            max_new_tokens=1,
            null_prompt_ids=self.null_prompt_ids(config),
            **speed,
        )

    def null_prompt_ids(self, config: ImageGenerationConfig) -> torch.Tensor | None:
        """What `model.generate(null_prompt_ids=...)` needs for `config` (None unless null-prompt guidance)."""
        if config.uncond_mode != "null_prompt":
            return None
        return self.processor.null_prompt_ids()  # `model.generate` moves inputs to the model's device

    def _encode(self, conversations, images, editing: bool = False, videos: Sequence[VideoSource] = ()):
        texts = [
            self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations
        ]
        flat = [img for row in images for img in row]
        kwargs = {"max_pixels": self.processor.edit_max_pixels} if editing and flat else {}
        enc = self.processor(
            text=texts,
            images=flat or None,
            videos=list(videos) or None,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
            **kwargs,
        )
        keep = (
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        )
        return {k: v for k, v in enc.items() if k in keep and v is not None}  # generate() moves them

    def _segments(self, out, prompt_len: int, row: int) -> ChatTurn:
        cfg = self.model.config
        ids = out.sequences[row, prompt_len:].tolist()
        segments: list[str | Image.Image] = []
        pending: list[int] = []
        images = iter(out.images[row])
        skip = False
        for tok in ids:
            if tok == cfg.image_gen_start_token_id:
                if pending:
                    segments.append(self.processor.decode(pending, skip_special_tokens=True))
                    pending = []
                segments.append(self.processor.postprocess_generated(next(images).unsqueeze(0))[0])
                skip = True
            elif tok == cfg.image_gen_end_token_id:
                skip = False
            elif not skip:
                pending.append(tok)
        if pending:
            segments.append(self.processor.decode(pending, skip_special_tokens=True))
        return ChatTurn([s for s in segments if not (isinstance(s, str) and not s)])


# Loading options a preset cannot take (its random model is built in memory, not read from shards): refused by
# name with the way round. Any other keyword is a typo.
PRESET_MODEL_KWARGS = frozenset({"device_map", "max_memory", "quantization", "offload_folder"})
# image settings `converse` may take by name; top_k / top_p there mean text sampling (image_top_k / image_top_p
# reach the bits through `model.generate`)
_IMAGE_SETTING_NAMES = frozenset(ImageGenerationConfig().to_dict()) - {"top_k", "top_p"}


def _vae_in_fp32_on_cpu(model: VARGPTForConditionalGeneration) -> None:
    """A 16-bit VAE on the CPU is cast to fp32: CPUs without 16-bit matrix units run bf16 convolutions far slower
    (the full-size VAE decoding one 256 px image: about 20-30 s in fp32 on this project's 2-core machine, over
    ten minutes in bf16), and the VAE is small (0.11 B parameters, 0.2 GB more in fp32). The scale loop casts
    the latent to the VAE's dtype, so nothing else changes."""
    weight = model.vae_local.decoder.conv_in.conv.weight
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        model.vae_local.float()


def _is_placed(model: torch.nn.Module) -> bool:
    """Whether loading already put the model where it belongs: a device map was applied (moving it would
    collapse a dispatch across devices) or its weights are quantized (bitsandbytes places them itself)."""
    return getattr(model, "hf_device_map", None) is not None or is_quantized(model)


def _check_preset_kwargs(name: str, model_kwargs: dict[str, Any], revision: str | None) -> None:
    """A preset has no checkpoint: refuse keywords it would otherwise drop, naming them."""
    unknown = sorted(set(model_kwargs) - PRESET_MODEL_KWARGS)
    if unknown:
        raise TypeError(
            f"preset {name!r} got unknown keyword argument(s) {', '.join(unknown)}; a preset takes "
            "device, dtype, image_preset and seed"
        )
    if revision is not None:
        raise ValueError(f"revision applies to Hub repo ids, not to preset {name!r} (random weights)")
    given = sorted(k for k, v in model_kwargs.items() if v is not None)
    if given:
        raise ValueError(
            f"{', '.join(given)} apply when loading a checkpoint, and preset {name!r} is built in memory: save it "
            "first (VARGPTPipeline.from_pretrained(name).save_pretrained(DIR)) and load DIR"
        )


def default_model_name() -> str:
    """What commands use without `--model`: the shipped shapes-world model when present, else the random
    `tiny` preset."""
    return "vargpt-shapes-tiny" if shipped_model_path("vargpt-shapes-tiny") is not None else "tiny"


def preset_processor(name: str) -> VARGPTProcessor:
    """The processor a preset's random model pairs with: the small test tokenizer for presets with its vocabulary
    ("tiny", "bench-100m", ...: a 150k-entry vocabulary makes a small model ten times slower), the real Qwen2
    vocabulary for the others."""
    from .tokenization import build_qwen2_tokenizer, build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    small = (
        VARGPTConfig.from_preset(name).text_config.vocab_size == VARGPTConfig.from_preset("tiny").text_config.vocab_size
    )
    return VARGPTProcessor.from_tokenizer(tiny if small else build_qwen2_tokenizer())


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
