"""`VARGPTProcessor`: prompts, understanding images and generation targets in, model inputs out.

Understanding images go through Qwen2-VL's image processor (its PIL backend: no torchvision needed) and appear in
the token sequence as `<|vision_start|>` + `<|image_pad|>` x N + `<|vision_end|>`, N = merged patch count.
A generation target appears as `<|image_gen_start|>` + `<|image_gen_pad|>` x L + `<|image_gen_end|>`; the chat
template writes an empty start/end pair and `__call__` fills in L pads when asked (training), or leaves the pair
alone. Generation targets themselves are pixels in [-1, 1] for the image tokenizer (`preprocess_generation_target`),
and generated images come back to PIL with the original's truncating conversion (`postprocess_generated`).
Videos take Qwen2-VL's video path without torchvision (see `_process_videos`): each frame goes through the same PIL
image processor, and consecutive frames are paired into temporal patches as `Qwen2VLVideoProcessor.patchify` does;
a video appears as `<|vision_start|>` + `<|video_pad|>` x N + `<|vision_end|>`, N = grid_t*grid_h*grid_w/merge**2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from .configuration import IMAGE_GEN_END, IMAGE_GEN_PAD, IMAGE_GEN_START
from .hub import resolve_checkpoint
from .image_io import ImageSource, VideoSource, load_image, load_video_frames
from .schedule import Schedule
from .tokenization import (
    CHAT_TEMPLATE,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    naming_unreadable_files,
)
from .video_io import load_video

# Qwen2-VL's defaults for understanding images (pixels after its smart resize).
UNDERSTANDING_MIN_PIXELS = 56 * 56
UNDERSTANDING_MAX_PIXELS = 28 * 28 * 1280
# The original pipeline shrinks every input image to at most 512 x 512 pixels; editing inputs use this cap.
EDIT_MAX_PIXELS = 512 * 512
# Qwen2-VL's video processor defaults: pixels per frame after smart resize.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# Generation targets: the short side is resized to round(1.125 * resolution) before cropping (original's mid_reso).
GENERATION_RESIZE_RATIO = 1.125

# The conversation of null-prompt guidance's unconditional branch, and what prompt dropout trains a
# text-to-image row into: one empty user turn.
NULL_PROMPT_MESSAGES: tuple[dict[str, str], ...] = ({"role": "user", "content": ""},)

_PADDING_CHOICES = (True, False, "longest", "max_length", "do_not_pad")
# Keyword arguments `ProcessorMixin.apply_chat_template(tokenize=True)` always forwards; they carry no audio here.
_CHAT_TEMPLATE_AUDIO_KWARGS = ("audio_from_video_indices", "load_audio_from_video")


def _as_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        height = width = resolution
    elif isinstance(resolution, Sequence) and len(resolution) == 2 and all(isinstance(v, int) for v in resolution):
        height, width = resolution
    else:
        raise ValueError(f"resolution must be an int or a (height, width) pair of ints, got {resolution!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return height, width


def _cover_size(width: int, height: int, min_height: int, min_width: int) -> tuple[int, int]:
    """(width, height) after an aspect-preserving resize so the image just covers min_height x min_width.

    For a square target this is torchvision's `Resize(int)`: the short side becomes exactly the target and the long
    side `int(target * long / short)`.
    """
    if min_height * width >= min_width * height:
        return max(min_width, int(min_height * width / height)), min_height
    return min_width, max(min_height, int(min_width * height / width))


def shrink_to_max_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """The original (LLaMA-Factory) pre-shrink: above `max_pixels`, scale both sides by sqrt(max_pixels / area),
    truncate to ints and resample nearest-neighbour; smaller images are returned unchanged."""
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    width, height = image.size
    if width * height <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / (width * height))
    new_size = (max(1, int(width * factor)), max(1, int(height * factor)))
    return image.resize(new_size, resample=Image.Resampling.NEAREST)


def preprocess_generation_target(
    image: ImageSource,
    resolution: int | tuple[int, int],
    random_crop: bool = False,
    generator: torch.Generator | None = None,
    resize_ratio: float = GENERATION_RESIZE_RATIO,
    pre_shrink_max_pixels: int | None = None,
) -> torch.Tensor:
    """Turn a target image into the image tokenizer's input: float32 [3, H, W] in [-1, 1].

    As in the original: resize (Lanczos) so the image covers round(resize_ratio * H) x round(resize_ratio * W),
    then crop H x W from the centre (evaluation) or at a uniformly random offset drawn from `generator`
    (training), then scale 0..255 to [-1, 1]. `resize_ratio=1.0` crops straight from a short-side resize.
    `pre_shrink_max_pixels=512*512` reproduces the original training data path exactly, which first shrank every
    image above that many pixels with nearest-neighbour sampling (see `shrink_to_max_pixels`); off by default.
    """
    height, width = _as_hw(resolution)
    if not resize_ratio >= 1.0:
        raise ValueError(f"resize_ratio must be >= 1 so the crop fits inside the resized image, got {resize_ratio}")
    rgb = load_image(image)
    if pre_shrink_max_pixels is not None:
        rgb = shrink_to_max_pixels(rgb, pre_shrink_max_pixels)
    new_width, new_height = _cover_size(*rgb.size, round(resize_ratio * height), round(resize_ratio * width))
    if (new_width, new_height) != rgb.size:
        rgb = rgb.resize((new_width, new_height), resample=Image.Resampling.LANCZOS)
    if random_crop and (new_height, new_width) != (height, width):
        top = int(torch.randint(0, new_height - height + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, new_width - width + 1, (1,), generator=generator).item())
    else:
        top = round((new_height - height) / 2.0)
        left = round((new_width - width) / 2.0)
    pixels_HW3 = np.asarray(rgb.crop((left, top, left + width, top + height)), dtype=np.uint8)
    x_3HW = torch.from_numpy(pixels_HW3.copy()).permute(2, 0, 1).float().div(255)
    return x_3HW + x_3HW - 1


def postprocess_generated(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """Decoder output in [-1, 1] to RGB PIL images, exactly as the original: ((x + 1) / 2 * 255) truncated to uint8.

    Computed in float32. Values are clamped to 0..255 before truncation (a no-op for the decoder's clamped output;
    it only stops out-of-range inputs from wrapping around).
    """
    if not isinstance(images_B3HW, torch.Tensor) or images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3:
        shape = tuple(images_B3HW.shape) if isinstance(images_B3HW, torch.Tensor) else type(images_B3HW).__name__
        raise ValueError(f"postprocess_generated expects a [B, 3, H, W] tensor, got {shape}")
    x_B3HW = images_B3HW.detach().to(device="cpu", dtype=torch.float32)
    pixels_BHW3 = ((x_B3HW + 1) / 2).mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(pixels_HW3)) for pixels_HW3 in pixels_BHW3]


def _flatten_images(images: Any) -> list[ImageSource]:
    """Accept one image, a list of images, or a list of per-prompt lists (as `apply_chat_template` passes them)."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat: list[ImageSource] = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    return [images]


def is_video(item: Any) -> bool:
    """A video is a file (path or bytes, decoded by `vargpt.video_io.load_video`), an array [T, H, W, 3] or a list
    of frames; a list of videos (per-prompt nesting) is not."""
    if hasattr(item, "ndim") or isinstance(item, (str, os.PathLike, bytes)):
        return True
    return (
        isinstance(item, (list, tuple))
        and bool(item)
        and not isinstance(item[0], (list, tuple))
        and not hasattr(item[0], "ndim")
    )


def _flatten_videos(videos: Any) -> list[VideoSource]:
    """Accept one video array, a list of videos, or a list of per-prompt lists of videos."""
    if videos is None:
        return []
    if hasattr(videos, "ndim"):
        return [videos]
    if not isinstance(videos, (list, tuple)):
        raise ValueError(f"videos must be a list of videos (each a list of frames or an array), got {type(videos)}")
    flat: list[VideoSource] = []
    for item in videos:
        if is_video(item):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(_flatten_videos(item))
        else:
            raise ValueError(
                f"each video must be a list of frames or a [frames, height, width, 3] array, got {type(item).__name__}"
            )
    return flat


def _pil_image_processor(image_processor: Any) -> Qwen2VLImageProcessorPil:
    """The PIL backend with `image_processor`'s settings.

    Where torchvision is installed, transformers loads a saved Qwen2-VL image processor with its torchvision
    backend, whose resizing gives other pixel values than the PIL path the model was trained with (and than
    the same checkpoint gives on a machine without torchvision). One backend everywhere keeps inputs equal.
    """
    skip = ("image_processor_type", "processor_class")
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in skip}
    return Qwen2VLImageProcessorPil(**settings)


class VARGPTProcessor(ProcessorMixin):
    """Qwen2-VL image processor + Qwen2 tokenizer (+ VARGPT's generation tokens) in one processor.

    `padding_side` ("left" by default, for batched generation) applies to `__call__`'s padding. Understanding images
    are resized by Qwen2-VL's smart resize within [56*56, 28*28*1280] pixels; `editing=True` caps them at
    `edit_max_pixels` (512*512), the size the original fed its editing model.
    """

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        padding_side: str = "left",
        edit_max_pixels: int = EDIT_MAX_PIXELS,
        video_min_pixels: int = VIDEO_MIN_PIXELS,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
    ):
        if tokenizer is None:
            raise ValueError("VARGPTProcessor needs a tokenizer (see vargpt.tokenization.build_qwen2_tokenizer)")
        if image_processor is None:
            image_processor = Qwen2VLImageProcessorPil(
                min_pixels=UNDERSTANDING_MIN_PIXELS, max_pixels=UNDERSTANDING_MAX_PIXELS
            )
        elif not isinstance(image_processor, Qwen2VLImageProcessorPil):
            image_processor = _pil_image_processor(image_processor)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(edit_max_pixels, int) or edit_max_pixels <= 0:
            raise ValueError(f"edit_max_pixels must be a positive integer, got {edit_max_pixels!r}")
        for name, value in (("video_min_pixels", video_min_pixels), ("video_max_pixels", video_max_pixels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if video_min_pixels > video_max_pixels:
            raise ValueError(f"video_min_pixels ({video_min_pixels}) exceeds video_max_pixels ({video_max_pixels})")
        self.padding_side = padding_side
        self.edit_max_pixels = edit_max_pixels
        self.video_min_pixels = video_min_pixels
        self.video_max_pixels = video_max_pixels
        self.video_token = VIDEO_PAD
        self.video_token_id = self._token_id(tokenizer, VIDEO_PAD)
        self.image_token = IMAGE_PAD
        self.image_token_id = self._token_id(tokenizer, IMAGE_PAD)
        self.vision_start_token_id = self._token_id(tokenizer, VISION_START)
        self.vision_end_token_id = self._token_id(tokenizer, VISION_END)
        self.image_gen_start_token_id = self._token_id(tokenizer, IMAGE_GEN_START)
        self.image_gen_end_token_id = self._token_id(tokenizer, IMAGE_GEN_END)
        self.image_gen_pad_token_id = self._token_id(tokenizer, IMAGE_GEN_PAD)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; VARGPTProcessor pads batches with it")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> VARGPTProcessor:
        """transformers' loader, on the folder `vargpt.hub.resolve_checkpoint` finds: a local folder, a shipped
        model name ("vargpt-shapes-tiny") or a Hub repo id (downloaded or found in the Hub cache), so that the
        processor takes the same names as the model and fails on any other in one line."""
        folder = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            require=None,
        )
        return super().from_pretrained(folder, force_download=force_download, local_files_only=True, **kwargs)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> VARGPTProcessor:
        """A processor with Qwen2-VL's default image processor around `tokenizer` (e.g. `build_tiny_tokenizer()`)."""
        return cls(image_processor=None, tokenizer=tokenizer, **kwargs)

    @staticmethod
    def _token_id(tokenizer: Any, token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"the tokenizer has no {token} token")
        return int(token_id)

    # transformers' two loading steps, with a corrupt file of the folder named in the error (see
    # `naming_unreadable_files`): processor_config.json and the chat template, then tokenizer and image processor.
    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        with naming_unreadable_files(pretrained_model_name_or_path):
            return super().get_processor_dict(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> tuple[dict, dict]:
        with naming_unreadable_files(pretrained_model_name_or_path):
            return super()._resolve_subprocessors(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        ]

    def null_prompt_ids(self) -> torch.Tensor:
        """1-D ids of the empty conversation up to the assistant header (`uncond_mode="null_prompt"`): the same
        tokens a text-to-image training row has in front of `<|image_gen_start|>` after prompt dropout."""
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in NULL_PROMPT_MESSAGES],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    preprocess_generation_target = staticmethod(preprocess_generation_target)
    postprocess_generated = staticmethod(postprocess_generated)

    def __call__(
        self,
        text: str | list[str],
        images: Any = None,
        image_gen_num_tokens: int | Schedule | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        *,
        max_length: int | None = None,
        padding_side: str | None = None,
        editing: bool = False,
        max_pixels: int | None = None,
        videos: Any = None,
        audio: Any = None,
        **chat_template_kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts, expand image placeholders and pad into a batch.

        Returns `input_ids`, `attention_mask`, `mm_token_type_ids` (1 on `<|image_pad|>`, 2 on `<|video_pad|>`, 0
        elsewhere, as Qwen2-VL marks them) and, with images, `pixel_values` and `image_grid_thw`; with `videos`
        (each a list of frames or a uint8 [T, H, W, 3] array, matched to `<|video_pad|>` placeholders in order),
        `pixel_values_videos` and `video_grid_thw`. Each `<|image_pad|>` becomes grid_t*grid_h*grid_w/merge**2
        copies for the next image (images are matched to placeholders in order across the batch; paths, bytes or
        PIL images, possibly nested per prompt). With `image_gen_num_tokens`, every empty
        `<|image_gen_start|><|image_gen_end|>` pair gets that many `<|image_gen_pad|>` between (given a `Schedule`,
        its `num_pad_tokens`). `max_pixels`
        (or `editing=True`, meaning `edit_max_pixels`) caps understanding images. Prompts are never truncated: a
        prompt longer than `max_length` is an error.
        """
        _refuse_audio(audio, chat_template_kwargs)
        texts = self._check_texts(text)
        side = self._check_padding(padding, padding_side)
        image_gen_num_tokens = _pad_slot_count(image_gen_num_tokens)
        sources, videos_flat = _matched_media(texts, images, videos)
        if editing and max_pixels is None:
            max_pixels = self.edit_max_pixels
        media_inputs, tokens_per_image, tokens_per_video = self._process_media(sources, videos_flat, max_pixels)
        encoded = self.tokenizer(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
        image_counts, video_counts = iter(tokens_per_image), iter(tokens_per_video)
        sequences = [self._expand(ids, image_counts, image_gen_num_tokens, video_counts) for ids in encoded]
        for index, ids in enumerate(sequences):
            if max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"prompt {index} is {len(ids)} tokens long (after image expansion), longer than "
                    f"max_length={max_length}"
                )
        data = self._pad(sequences, padding, side, max_length, return_tensors)
        data.update(media_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_padding(self, padding: bool | str, padding_side: str | None) -> str:
        """The side to pad on, after checking both options."""
        if padding not in _PADDING_CHOICES:
            raise ValueError(f"padding must be one of {_PADDING_CHOICES}, got {padding!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    def _process_media(
        self, sources: list[ImageSource], videos: list[VideoSource], max_pixels: int | None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """Pixel inputs of the understanding images and videos, and how many placeholder tokens each one takes."""
        media_inputs: dict[str, Any] = {}
        tokens_per_image: list[int] = []
        if sources:
            media_inputs, tokens_per_image = self._process_understanding_images(sources, max_pixels=max_pixels)
        tokens_per_video: list[int] = []
        if videos:
            video_inputs, tokens_per_video = self._process_videos(videos)
            media_inputs.update(video_inputs)
        return media_inputs, tokens_per_image, tokens_per_video

    @staticmethod
    def _check_texts(text: str | list[str]) -> list[str]:
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(sample, str) for sample in texts):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("text is an empty list: give at least one prompt")
        for index, sample in enumerate(texts):
            if not sample.strip():
                raise ValueError(f"prompt {index} is empty or whitespace only")
        return texts

    def _process_understanding_images(
        self, sources: list[ImageSource], max_pixels: int | None
    ) -> tuple[dict[str, Any], list[int]]:
        rgb_images = [load_image(source) for source in sources]
        options: dict[str, Any] = {}
        if max_pixels is not None:
            if not isinstance(max_pixels, int) or max_pixels <= 0:
                raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
            min_pixels = self.image_processor.size["shortest_edge"]
            options["size"] = {"shortest_edge": min(min_pixels, max_pixels), "longest_edge": max_pixels}
        processed = self.image_processor(rgb_images, return_tensors="pt", **options)
        merge_area = self.image_processor.merge_size**2
        tokens_per_image = [math.prod(grid) // merge_area for grid in processed["image_grid_thw"].tolist()]
        return {
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
        }, tokens_per_image

    def _process_videos(self, videos: list[VideoSource]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Qwen2-VL's video features from the PIL image processor, one frame at a time.

        `Qwen2VLVideoProcessor` needs torchvision. Its math is: smart-resize every frame to one size (within
        `video_min_pixels`..`video_max_pixels`), rescale and normalise, repeat the last frame up to a multiple of
        `temporal_patch_size`, then cut patches laid out as (t, block row, block column, merge row, merge column,
        channel, frame in pair, patch row, patch column). The image processor gives each frame exactly that layout
        with the frame repeated in the pair slot, so taking one copy per frame and pairing consecutive frames
        rebuilds the video layout. Resizing is PIL's bicubic (as for images here), not torchvision's.
        """
        processor = self.image_processor
        temporal, patch, merge = processor.temporal_patch_size, processor.patch_size, processor.merge_size
        size = {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels}
        pixels, grids, tokens = [], [], []
        for video in videos:
            frames = load_video(video) if isinstance(video, (str, os.PathLike, bytes)) else load_video_frames(video)
            frames.extend([frames[-1]] * (-len(frames) % temporal))
            processed = processor(frames, return_tensors="pt", size=size)
            _, grid_h, grid_w = processed["image_grid_thw"][0].tolist()
            channels = processed["pixel_values"].shape[-1] // (temporal * patch * patch)
            # [T * N, C * temporal * p * p] -> one copy of each frame: [T, N, C, p, p]
            per_frame = processed["pixel_values"].view(len(frames), grid_h * grid_w, channels, temporal, patch, patch)
            per_frame = per_frame[:, :, :, 0]
            grid_t = len(frames) // temporal
            # pair frames: [grid_t, temporal, N, C, p, p] -> [grid_t, N, C, temporal, p, p]
            paired = per_frame.view(grid_t, temporal, grid_h * grid_w, channels, patch, patch).permute(0, 2, 3, 1, 4, 5)
            pixels.append(paired.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch))
            grids.append([grid_t, grid_h, grid_w])
            tokens.append(grid_t * grid_h * grid_w // merge**2)
        return {
            "pixel_values_videos": torch.cat(pixels, dim=0),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }, tokens

    def _expand(
        self, ids: list[int], image_counts: Any, image_gen_num_tokens: int | None, video_counts: Any
    ) -> list[int]:
        expanded: list[int] = []
        for position, token_id in enumerate(ids):
            if token_id == self.image_token_id:
                expanded.extend([self.image_token_id] * next(image_counts))
                continue
            if token_id == self.video_token_id:
                expanded.extend([self.video_token_id] * next(video_counts))
                continue
            expanded.append(token_id)
            is_empty_gen_pair = (
                token_id == self.image_gen_start_token_id
                and position + 1 < len(ids)
                and ids[position + 1] == self.image_gen_end_token_id
            )
            if image_gen_num_tokens is not None and is_empty_gen_pair:
                expanded.extend([self.image_gen_pad_token_id] * image_gen_num_tokens)
        return expanded

    def _pad(
        self,
        sequences: list[list[int]],
        padding: bool | str,
        side: str,
        max_length: int | None,
        return_tensors: str | None,
    ) -> dict[str, list[list[int]]]:
        lengths = [len(ids) for ids in sequences]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(
                    f"prompts of different lengths {lengths} cannot form a tensor without padding; "
                    "pass padding=True or return_tensors=None"
                )
            target = None
        data: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
        for ids in sequences:
            fill = 0 if target is None else target - len(ids)
            kinds = {self.image_token_id: 1, self.video_token_id: 2}
            types = [kinds.get(token_id, 0) for token_id in ids]
            pad_ids, pad_zeros = [self.tokenizer.pad_token_id] * fill, [0] * fill
            if side == "left":
                data["input_ids"].append(pad_ids + ids)
                data["attention_mask"].append(pad_zeros + [1] * len(ids))
                data["mm_token_type_ids"].append(pad_zeros + types)
            else:
                data["input_ids"].append(ids + pad_ids)
                data["attention_mask"].append([1] * len(ids) + pad_zeros)
                data["mm_token_type_ids"].append(types + pad_zeros)
        return data


def _refuse_audio(audio: Any, chat_template_kwargs: dict[str, Any]) -> None:
    """Only the chat template's audio switches are accepted as extra keywords, and only switched off."""
    for key, value in chat_template_kwargs.items():
        if key not in _CHAT_TEMPLATE_AUDIO_KWARGS:
            raise TypeError(f"VARGPTProcessor.__call__ got an unexpected keyword argument {key!r}")
        if value:
            raise ValueError("VARGPTProcessor does not support audio inputs")
    if audio is not None:
        raise ValueError("VARGPTProcessor supports text, images and videos, not audio")


def _pad_slot_count(image_gen_num_tokens: int | Schedule | None) -> int | None:
    """`<|image_gen_pad|>` slots per generation block: a positive int, or a `Schedule`'s `num_pad_tokens`
    (`model.generation_schedule(...)`), so that callers need not count them."""
    if isinstance(image_gen_num_tokens, Schedule):
        return image_gen_num_tokens.num_pad_tokens
    valid_count = isinstance(image_gen_num_tokens, int) and not isinstance(image_gen_num_tokens, bool)
    if image_gen_num_tokens is not None and not (valid_count and image_gen_num_tokens >= 1):
        raise ValueError(f"image_gen_num_tokens must be a positive integer, got {image_gen_num_tokens!r}")
    return image_gen_num_tokens


def _matched_media(texts: list[str], images: Any, videos: Any) -> tuple[list[ImageSource], list[VideoSource]]:
    """The images and videos as flat lists, checked to match the prompts' placeholders one for one."""
    sources = _flatten_images(images)
    num_placeholders = sum(sample.count(IMAGE_PAD) for sample in texts)
    if num_placeholders != len(sources):
        raise ValueError(
            f"the prompts hold {num_placeholders} {IMAGE_PAD} placeholder(s) but {len(sources)} image(s) were given"
        )
    videos_flat = _flatten_videos(videos)
    num_video_placeholders = sum(sample.count(VIDEO_PAD) for sample in texts)
    if num_video_placeholders != len(videos_flat):
        raise ValueError(
            f"the prompts hold {num_video_placeholders} {VIDEO_PAD} placeholder(s) but {len(videos_flat)} "
            "video(s) were given; pass one entry of `videos` (a list of frames or an array) per placeholder"
        )
    return sources, videos_flat
