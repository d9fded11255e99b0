"""Collate validated rows (see `vargpt.data.formats`) into batches for `VARGPTForConditionalGeneration.forward`.

A row is rendered with the processor's chat template (Qwen2-VL format), tokenized, and expanded by the processor:
each `<image>` becomes `<|vision_start|>` + `<|image_pad|>` x patches + `<|vision_end|>`, each `<image_gen>` becomes
`<|image_gen_start|>` + `<|image_gen_pad|>` x `num_image_gen_pad_tokens` + `<|image_gen_end|>`. Each `<video>` of a
user turn (the chat template knows only `<image>` in string contents, so it is rewritten here) becomes
`<|vision_start|>` + `<|video_pad|>` x merged patches + `<|vision_end|>`, its file decoded by `video_io.load_video`.

Labels (the text loss) cover the assistant turns only: each turn's content and its closing `<|im_end|>`, found by
character spans of the rendered text, so they follow the chat template rather than assumptions about token ids.
Unlabelled (-100): the system prompt, user turns, the assistant header `<|im_start|>assistant\\n`, the newline after
`<|im_end|>`, padding, every `<|image_gen_pad|>` slot (the image loss covers those), and `<|image_gen_end|>`:
generation inserts that token itself after the image instead of sampling it, so there is nothing to learn at the
last pad slot. `<|image_gen_start|>` is labelled: the model decides when to draw. A token that straddles the header
and the answer (Qwen2's BPE merges the header's newline with an answer's leading newlines) is labelled.

Padding is on the right, with an attention mask. Both sides would work for this model (it derives M-RoPE positions
from the mask), but right padding keeps every sample's tokens at the same positions as when it is alone, the
usual convention for training; batched generation pads on the left instead. Samples longer than `max_length` are an
error naming the row: truncating would cut assistant answers or image slots and silently change what is learned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..image_io import load_image
from ..processing import NULL_PROMPT_MESSAGES
from ..tokenization import IM_END, VIDEO_PAD, VISION_END, VISION_START
from ..video_io import VideoSampling, load_video

IGNORE_INDEX = -100
# LLaMA-Factory's video placeholder in sharegpt rows (validated by `data.formats`).
SHAREGPT_VIDEO_PLACEHOLDER = "<video>"
_VIDEO_SLOT = VISION_START + VIDEO_PAD + VISION_END
# the processor's outputs for understanding images and videos, passed on when present
_VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def row_name(row: Mapping[str, Any], position: int) -> str:
    """How errors name a row: its data file and row index when known, else its position in the batch."""
    if row.get("source_file") is not None and row.get("source_row") is not None:
        return f"{row['source_file']} row {row['source_row']}"
    return f"batch item {position}"


def _positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def render_with_label_spans(
    tokenizer: Any, chat_template: str, messages: Sequence[Mapping[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character span of each assistant answer.

    A span starts after the assistant header (the text `add_generation_prompt` adds) and ends after that turn's
    `<|im_end|>`. It is found by rendering prefixes of the conversation, which requires the template to render
    each prefix as a prefix of the whole (true of Qwen2-VL's template).
    """

    def render(part: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            list(part), chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(messages[:index], add_generation_prompt=True)
        upto = render(messages[: index + 1])
        end = upto.rfind(IM_END)
        if not (text.startswith(upto) and upto.startswith(head)) or end < len(head):
            raise ValueError("the chat template does not render conversation prefixes as prefixes of the whole")
        spans.append((len(head), end + len(IM_END)))
    return text, spans


def _labelled_tokens(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it overlaps an answer span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        any(start < span_end and end > span_start for span_start, span_end in spans)
        for start, end in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask


def _with_video_slots(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """User turns' `<video>` placeholders as the video slot Qwen2-VL's template writes for a video part."""
    return [
        {**m, "content": m["content"].replace(SHAREGPT_VIDEO_PLACEHOLDER, _VIDEO_SLOT)} if m["role"] == "user" else m
        for m in messages
    ]


class SFTCollator:
    """Rows with `messages`, `images` (understanding inputs) and `gen_images` (generation targets) to a batch.

    Returns `input_ids`, `attention_mask`, `mm_token_type_ids`, `labels` `[B, L]`; with understanding images
    `pixel_values` and `image_grid_thw` (Qwen2-VL's image processor; `max_pixels` caps them, e.g. 512*512 for
    editing as in the original); with generation targets `pixel_gen_values` `[N, 3, R, R]` in [-1, 1], in reading
    order row by row (the order of the `<|image_gen_start|>` tokens in the batch). `random_crop=True` crops targets
    at random offsets drawn from torch's global generator (seeded per DataLoader worker) as the original's training
    transform did; the default is the centre crop. Use with the Trainer's `remove_unused_columns=False`, since the
    rows' columns are not `forward` arguments.

    `prompt_dropout=p` replaces the user turn of a text-to-image row (a generation target, no understanding
    image) with the empty one of `NULL_PROMPT_MESSAGES` with probability p (torch's global generator, like
    `random_crop`): the model then learns the unconditional image distribution that null-prompt guidance
    (`uncond_mode="null_prompt"`) subtracts at inference.

    Rows may carry `videos` (file paths, one per `<video>`): their frames are sampled and sized by `video_sampling`
    (default: Qwen2-VL's, `VideoSampling()`) and the batch gains `pixel_values_videos` and `video_grid_thw`.
    """

    def __init__(
        self,
        processor: Any,
        image_gen_resolution: int,
        num_image_gen_pad_tokens: int,
        max_length: int | None = None,
        random_crop: bool = False,
        max_pixels: int | None = None,
        resize_ratio: float = 1.125,
        prompt_dropout: float = 0.0,
        video_sampling: VideoSampling | None = None,
    ):
        _positive_int(image_gen_resolution, "image_gen_resolution")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must lie in [0, 1), got {prompt_dropout}")
        if resize_ratio < 1.0:
            raise ValueError(
                f"resize_ratio must be >= 1 (short side = ratio x resolution before cropping), got {resize_ratio}"
            )
        _positive_int(num_image_gen_pad_tokens, "num_image_gen_pad_tokens")
        _positive_int(max_length, "max_length", allow_none=True)
        _positive_int(max_pixels, "max_pixels", allow_none=True)
        self.processor = processor
        self.image_gen_resolution = image_gen_resolution
        self.num_image_gen_pad_tokens = num_image_gen_pad_tokens
        self.max_length = max_length
        self.random_crop = random_crop
        self.max_pixels = max_pixels
        self.resize_ratio = resize_ratio
        self.prompt_dropout = prompt_dropout
        self.video_sampling = video_sampling or VideoSampling()

    def _maybe_drop_prompt(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        # a one-turn drawing request only: a conversation that draws after a question keeps its question
        one_turn = sum(m["role"] == "user" for m in row["messages"]) == 1
        text_to_image = row.get("gen_images") and not row["images"] and not row.get("videos") and one_turn
        if not text_to_image or self.prompt_dropout == 0.0 or float(torch.rand(())) >= self.prompt_dropout:
            return row
        # every user turn emptied, system turns dropped: a one-turn row becomes exactly the null conversation
        empty = NULL_PROMPT_MESSAGES[0]["content"]
        messages = [{**m, "content": empty} if m["role"] == "user" else dict(m) for m in row["messages"]]
        return {**row, "messages": [m for m in messages if m["role"] != "system"]}

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        names = [row_name(row, position) for position, row in enumerate(rows)]
        rows = [self._maybe_drop_prompt(row) for row in rows]
        processor, tokenizer = self.processor, self.processor.tokenizer
        texts, bases = [], []
        for row in rows:
            text, spans = render_with_label_spans(
                tokenizer, processor.chat_template, _with_video_slots(row["messages"])
            )
            texts.append(text)
            bases.append(_labelled_tokens(tokenizer, text, spans))
        images, videos = self._understanding_inputs(rows, names)
        batch = processor(
            text=texts,
            images=images or None,
            videos=videos or None,
            image_gen_num_tokens=self.num_image_gen_pad_tokens,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            max_pixels=self.max_pixels,
        )
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for b, (name, length, (base_ids, base_mask)) in enumerate(zip(names, lengths, bases, strict=True)):
            if self.max_length is not None and length > self.max_length:
                raise ValueError(
                    f"{name} is {length} tokens long after image expansion, longer than max_length={self.max_length}"
                )
            row_labels = self._align(base_ids, base_mask, batch["input_ids"][b, :length].tolist(), name)
            labels[b, :length] = torch.tensor(row_labels, dtype=labels.dtype)
        out = {key: batch[key] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        out["labels"] = labels
        out |= {key: batch[key] for key in _VISUAL_KEYS if batch.get(key) is not None}
        targets = [
            self._target(path, name) for row, name in zip(rows, names, strict=True) for path in row["gen_images"]
        ]
        starts = int((batch["input_ids"] == processor.image_gen_start_token_id).sum())
        if len(targets) != starts:
            raise ValueError(f"the batch has {starts} <image_gen> placeholders but {len(targets)} generation targets")
        if targets:
            out["pixel_gen_values"] = torch.stack(targets)
        return out

    def _understanding_inputs(self, rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> tuple[list, list]:
        """The rows' understanding images and videos (each a list of frames), decoded, in reading order."""
        images = [self._load(path, name) for row, name in zip(rows, names, strict=True) for path in row["images"]]
        videos = [
            self._load_video(path, name)
            for row, name in zip(rows, names, strict=True)
            for path in row.get("videos") or []
        ]
        return images, videos

    def _load(self, path: str, name: str) -> Any:
        try:
            return load_image(path)
        except ValueError as error:
            raise ValueError(f"{name}: cannot read image {path}: {error}") from error

    def _load_video(self, path: str, name: str) -> list[Any]:
        try:
            return load_video(path, self.video_sampling)
        except ValueError as error:
            raise ValueError(f"{name}: cannot read video {path}: {error}") from error

    def _target(self, path: str, name: str) -> torch.Tensor:
        image = self._load(path, name)
        return self.processor.preprocess_generation_target(
            image, self.image_gen_resolution, random_crop=self.random_crop, resize_ratio=self.resize_ratio
        )

    def _align(self, base_ids: list[int], base_mask: list[bool], expanded: list[int], name: str) -> list[int]:
        """Carry the per-token answer mask from the plain tokenization over to the processor's expanded sequence,
        where `<|image_pad|>` and `<|image_gen_pad|>` runs have been inserted."""
        processor = self.processor
        inserted = (processor.image_token_id, processor.video_token_id, processor.image_gen_pad_token_id)
        never_labelled = (*inserted, processor.image_gen_end_token_id)
        labels, i = [], 0
        for token in expanded:
            if i < len(base_ids) and token == base_ids[i]:
                labelled = base_mask[i] and token not in never_labelled
                labels.append(token if labelled else IGNORE_INDEX)
                i += 1
            elif token in inserted:
                labels.append(IGNORE_INDEX)
            else:
                raise RuntimeError(f"{name}: the processor's tokens do not extend the plain tokenization")
        if i != len(base_ids):
            raise RuntimeError(f"{name}: the processor's tokens do not extend the plain tokenization")
        return labels


class PreferenceCollator:
    """Preference rows (`prompt`, `chosen`, `rejected`, `images`, `chosen_gen_images`, `rejected_gen_images`) to
    `{"chosen": batch, "rejected": batch}`: two `SFTCollator` batches whose rows share the prompt (same tokens, same
    understanding images) and each end in its own answer and generation target(s). Arguments as `SFTCollator`."""

    def __init__(
        self,
        processor: Any,
        image_gen_resolution: int,
        num_image_gen_pad_tokens: int,
        max_length: int | None = None,
        random_crop: bool = False,
        max_pixels: int | None = None,
        resize_ratio: float = 1.125,
        video_sampling: VideoSampling | None = None,
    ):
        self.sft = SFTCollator(
            processor,
            image_gen_resolution,
            num_image_gen_pad_tokens,
            max_length,
            random_crop,
            max_pixels,
            resize_ratio,
            video_sampling=video_sampling,
        )

    @staticmethod
    def side(row: Mapping[str, Any], which: str) -> dict[str, Any]:
        """One side ("chosen" or "rejected") of a preference row as an SFT row."""
        return {
            "messages": [*row["prompt"], {"role": "assistant", "content": row[which]}],
            "images": row["images"],
            "gen_images": row[f"{which}_gen_images"],
            "videos": row.get("videos") or [],
            "source_file": row.get("source_file"),
            "source_row": row.get("source_row"),
        }

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {which: self.sft([self.side(row, which) for row in rows]) for which in ("chosen", "rejected")}
