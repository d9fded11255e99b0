"""Batched, streamable conversation turns on a `VARGPTPipeline`: what the chat command and the server share.

`VARGPTPipeline.converse` answers one conversation whose earlier turns carry no images; the server batches
several conversations, each with images anywhere in its history, and streams every row's text as it is decoded.
This module adds exactly that on top of the pipeline's encoding and segmenting, so both front ends behave alike.

It also holds the one check of a prompt's text (`require_prompt`) that the pipeline, the commands, the server
and the web page refuse empty prompts with, each in its own way (exit code 2, a 400, a message on the page).
The pipeline's names are imported for annotations only, so the pipeline can import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .image_io import VideoSource
    from .pipeline import ChatTurn, ImageInput, VARGPTPipeline

Message = dict[str, Any]


class EmptyPromptError(ValueError):
    """A prompt, question or instruction that is missing or only white space: refused before the model runs."""


def require_prompt(text: object, what: str = "the prompt", hint: str = "give some text") -> str:
    """`text` itself when it holds something other than white space; otherwise EmptyPromptError saying
    "`what` is empty: `hint`"."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyPromptError(f"{what} is empty: {hint}")
    return text


def user_message(text: str, num_images: int = 0, num_videos: int = 0) -> Message:
    """A user message in the chat template's part format: image then video placeholders first, then the text.

    Text always travels as a text part, so a literal "<image>" typed by a user stays text instead of becoming an
    image placeholder (the template only rewrites string contents).
    """
    require_prompt(text)
    placeholders = [*({"type": "image"} for _ in range(num_images)), *({"type": "video"} for _ in range(num_videos))]
    return {"role": "user", "content": [*placeholders, {"type": "text", "text": text}]}


def assistant_message(text: str) -> Message:
    """An earlier answer kept in the history (its drawn images are not fed back: the template has no slot for them)."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class StreamDecoder:
    """Turns one row's token ids into text deltas as they arrive.

    Decodes the whole answer each time and emits what is new; a trailing U+FFFD (half of a multi-byte character)
    is held back until the next token completes it. Tokens after end-of-sequence are ignored, as are the ids the
    decoder skips as special (image block markers), so the deltas concatenate to the final decoded text.
    """

    def __init__(self, pipe: VARGPTPipeline) -> None:
        self._tokenizer = pipe.processor
        eos = pipe.model.config.text_config.eos_token_id
        self._eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self._ids: list[int] = []
        self._sent = ""
        self.finished = False

    def push(self, token_id: int) -> str:
        if self.finished:
            return ""
        if token_id in self._eos:
            self.finished = True
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""
        delta, self._sent = text[len(self._sent) :], text
        return delta

    def flush(self) -> str:
        """Whatever is still held back once decoding is over."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        delta = text[len(self._sent) :] if text.startswith(self._sent) else ""
        self._sent = text if delta else self._sent
        return delta


def converse_batch(
    pipe: VARGPTPipeline,
    conversations: Sequence[Sequence[Message]],
    images: Sequence[Sequence[ImageInput]],
    *,
    videos: Sequence[Sequence[VideoSource]] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    seed: int | None = None,
    max_new_tokens: int = 256,
    allow_images: bool = True,
    **settings: Any,
) -> list[ChatTurn]:
    """Answer several conversations in one left-padded batch; `images[i]` fill conversation i's placeholders in order,
    and `videos[i]` (each a list of frames or a uint8 [T, H, W, 3] array) its video placeholders.

    `on_token` receives every new token id `[B]` as it is sampled (see `generate_interleaved`); `settings` are the
    text sampling settings of `model.generate` (do_sample, temperature, top_p, ...).
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    if videos is not None and len(videos) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(videos)} video lists")
    flat_videos = [video for row in videos or [] for video in row]
    inputs = pipe._encode([list(c) for c in conversations], [list(row) for row in images], videos=flat_videos)
    out = pipe.model.generate(
        **inputs,
        generation_mode="interleaved" if allow_images else "text",
        return_dict_in_generate=True,
        seed=seed,
        max_new_tokens=max_new_tokens,
        image_config=pipe.image_config,
        null_prompt_ids=pipe.null_prompt_ids(pipe.image_config),
        on_token=on_token,
        **settings,
    )
    prompt_len = inputs["input_ids"].shape[1]
    return [pipe._segments(out, prompt_len, row=b) for b in range(len(conversations))]
