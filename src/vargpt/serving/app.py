"""The OpenAI-compatible HTTP API (FastAPI) in front of one `VARGPTPipeline`.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (optionally streamed as SSE),
`POST /v1/images/generations`, `POST /v1/images/edits` (multipart). Handlers only validate and translate; the
model runs on the single worker thread of `BatchingWorker`, which batches compatible requests.

Choices where OpenAI's API has no answer for this model:

* When the model draws an image while answering a chat, `message.content` becomes a list of content parts in the
  order the model wrote them: `{"type": "text", "text": ...}` and
  `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`. Without images it stays a string.
  When streaming, text arrives as usual string deltas and the drawn images follow in one extra chunk whose
  `delta.content` is the list of image parts, just before the chunk carrying `finish_reason`.
* `temperature` omitted or 0 means greedy decoding (reproducible); above 0 samples with that temperature.
* A request with a `seed` runs in a batch of its own, so its outputs depend on nothing but its own settings
  (same seed, same bytes). Images are already drawn from per-row seeds; chat text sampling still shares one
  random stream per batch, which is why seeded requests are kept apart. Requests without a seed are batched.
* Earlier assistant turns are fed back as text; images they contained are dropped (no slot in the template).
* Image URLs must be `data:` URLs. The server never fetches remote URLs or reads its own files. Input images
  must be PNG, JPEG, WebP, GIF, BMP or TIFF (`SERVER_IMAGE_FORMATS`): other decoders never see untrusted bytes.
* Videos (OpenAI has no video part) come as vLLM and SGLang take them, `{"type": "video_url", "video_url": {"url":
  "data:video/mp4;base64,..."}}` (MP4/QuickTime, WebM/Matroska, GIF or AVI; decoding needs the `video` extra), or
  as frames, `{"type": "video", "video": [image data URLs]}`. Like images they must be data URLs; frames are
  sampled as Qwen2-VL samples them (2 per second) up to `max_video_frames`, each within `max_image_pixels`, from a
  file of at most `max_video_source_frames` frames.
* `images/generations` and `images/edits` answer `b64_json` whether or not `response_format` is given (as OpenAI's
  gpt-image models do); `response_format: "url"` is refused with a 400, since the server keeps no files to link.
* A model whose folder holds a `model_card.json` (the shipped `vargpt-shapes-tiny` does; see `vargpt.model_card`)
  gets warnings, never refusals: when the prompt (a chat's last user message) uses words the model never saw in
  training, or asks for a `size` it was not trained at, the response carries a top-level `"warnings"` list of
  one-line strings (in a streamed chat, on the first chunk). Without warnings, or without a card, the field is
  absent and responses are as OpenAI's.

One request cannot stall the others: prompts are refused by length before tokenising (`CHARS_PER_TOKEN_BOUND`)
and tokenised off the event loop; a request whose client timed out or disconnected leaves the queue at once, or
stops its batch at the next token or scale step when it was the batch's last live request; and each kind of
request (chat, generation, edit) has queue places the others cannot take.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..conversation import (
    EmptyPromptError,
    StreamDecoder,
    assistant_message,
    converse_batch,
    require_prompt,
    user_message,
)
from ..generation import GenerationCancelled, stop_when
from ..image_io import ImageInputError, load_image, load_video_frames
from ..model_card import model_card_of
from ..pipeline import VARGPTPipeline
from ..video_io import VideoSampling, load_video
from .batching import BatchCancelledError, BatchingWorker, Job, QueueFullError
from .schemas import APIError, ChatCompletionRequest, ChatMessage, ImageGenerationRequest, error_body
from .validation import check_length, check_text, image_settings, square_size

# Input image formats the server decodes; PIL knows ~40 more, some of which run external programs (EPS runs
# Ghostscript) or rarely exercised parsers.
SERVER_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# A prompt with more characters than this many per allowed token is refused before tokenising: English averages
# about 4 characters per Qwen2 token. (An exact bound would be the longest token, 128 characters, which would let
# a 4096-token limit admit 0.5 MB prompts that take seconds to tokenise.)
CHARS_PER_TOKEN_BOUND = 8
# Paths served without the API key even when one is set. Everything else (the API and FastAPI's /docs, /redoc
# and /openapi.json) needs it.
OPEN_PATHS = frozenset({"/health"})

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """Limits and behaviour of one server; every limit answers a clear 4xx instead of failing later."""

    model_name: str = "vargpt"
    api_key: str | None = None
    max_batch_size: int = 8
    queue_size: int = 64
    timeout_s: float = 60.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 4
    max_videos_per_request: int = 1
    max_video_frames: int = 32  # frames the model sees per video (sampled from a file, or given as frames)
    max_video_source_frames: int = 18_000  # frames in an uploaded file: 10 minutes at 30 frames per second
    max_n: int = 8
    max_prompt_tokens: int = 4096
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_BOUND * max_prompt_tokens
    default_max_tokens: int = 256
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.max_video_frames < 2:
            raise ValueError(f"max_video_frames must be >= 2 (frames are paired), got {self.max_video_frames}")

    @property
    def video_sampling(self) -> VideoSampling:
        """Qwen2-VL's frame sampling with this server's frame limit."""
        return VideoSampling(max_frames=self.max_video_frames, min_frames=min(4, self.max_video_frames))

    @property
    def prompt_char_limit(self) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens


def create_app(pipe: VARGPTPipeline, config: ServerConfig | None = None) -> FastAPI:
    """The application; its worker thread starts and stops with the app's lifespan."""
    config = config or ServerConfig()
    service = _Service(pipe, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()
            service.text_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vargpt", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_GuardMiddleware, max_bytes=config.max_body_bytes, api_key=config.api_key)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = service.worker.alive
        body = {
            "status": "ok" if alive else "worker stopped",
            "model": config.model_name,
            "queued": service.worker.queued,
            "batches_run": service.worker.batches_run,
            "batches_stopped": service.worker.batches_stopped,
            "largest_batch": service.worker.largest_batch,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": config.model_name, "object": "model", "created": service.started, "owned_by": "vargpt"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await service.chat(await _parse_json(request, ChatCompletionRequest), request)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> dict:
        return await service.generate(await _parse_json(request, ImageGenerationRequest), request)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> dict:
        return await service.edit(request)

    return app


# -- the service: validation, jobs, responses ------------------------------------------------------------------
class _Service:
    def __init__(self, pipe: VARGPTPipeline, config: ServerConfig) -> None:
        self.pipe = pipe
        self.config = config
        self.started = int(time.time())
        self.context = pipe.model.config.text_config.max_position_embeddings
        self.native_resolution = pipe.model.config.image_resolution
        self.card = model_card_of(pipe)  # None: a checkpoint without a card, which gets no warnings
        runners = {"chat": self._run_chat, "generate": self._run_generate, "edit": self._run_edit}
        runners = {kind: _stoppable(runner) for kind, runner in runners.items()}
        self.worker = BatchingWorker(runners, config.max_batch_size, config.queue_size)
        # Prompts are templated and tokenised on this one thread, off the event loop, with a tokenizer of their
        # own: the model thread's tokenizer is not shared across threads.
        self.text_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vargpt-tokenizer")
        self.tokenizer = copy.deepcopy(pipe.processor.tokenizer)

    # -- checks ---------------------------------------------------------------------------------------------
    def warnings(self, text: str, resolution: int | None = None) -> dict[str, list[str]]:
        """`{"warnings": [...]}` for a response when the model's card finds unseen words in `text` or an
        untrained `resolution`; `{}` otherwise (and always for a model without a card)."""
        found = [] if self.card is None else self.card.warnings(text, resolution)
        return {"warnings": found} if found else {}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def off_loop(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` on the text thread, so the event loop keeps answering meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.text_executor, lambda: function(*args, **kwargs))

    def check_prompt(self, texts: Sequence[tuple[str, str]], param: str) -> None:
        """Every (text, param) is valid Unicode and together they are within the character limit."""
        for text, text_param in texts:
            check_text(text, text_param)
        check_length(sum(len(text) for text, _ in texts), self.config.prompt_char_limit, param)

    async def check_tokens(self, text: str, max_new_tokens: int, param: str) -> int:
        count = await self.off_loop(lambda: len(self.tokenizer(text)["input_ids"]))
        if count > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {count} tokens, over the limit of {self.config.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )
        if count + max_new_tokens > self.context:
            raise APIError(
                400,
                f"the prompt's {count} tokens plus max_tokens={max_new_tokens} exceed the model's context of "
                f"{self.context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return count

    def resolution(self, size: str | None) -> int:
        """'RxR' (square only) to a resolution the model supports; None means the model's native size."""
        resolution = square_size(size)
        if resolution is None:
            return self.native_resolution
        try:
            self.pipe.model.generation_schedule(resolution)
        except ValueError as error:
            raise APIError(400, f"unsupported size {size!r}: {error}", param="size", code="unsupported_size") from None
        return resolution

    def check_n(self, n: int) -> None:
        if not 1 <= n <= self.config.max_n:
            raise APIError(400, f"n must be between 1 and {self.config.max_n}, got {n}", param="n")

    async def decode_image(self, data: bytes, param: str) -> Image.Image:
        try:
            return await asyncio.to_thread(load_image, data, self.config.max_image_pixels, SERVER_IMAGE_FORMATS)
        except ImageInputError as error:
            code = "image_too_large" if "over the limit" in str(error) else "invalid_image"
            raise APIError(400, str(error), param=param, code=code) from None

    async def image_from_url(self, url: str, param: str) -> Image.Image:
        return await self.decode_image(_data_url_bytes(url, param, "image"), param)

    async def video_from_url(self, url: str, param: str) -> list[Image.Image]:
        """A video file's sampled frames; the file is checked (format, frame size, length) before decoding."""
        data = _data_url_bytes(url, param, "video")
        limits = (self.config.video_sampling, self.config.max_image_pixels, self.config.max_video_source_frames)
        try:
            return await asyncio.to_thread(load_video, data, *limits)
        except ImageInputError as error:
            code = "video_too_large" if "over the limit" in str(error) or "too long" in str(error) else "invalid_video"
            raise APIError(400, str(error), param=param, code=code) from None
        except ImportError as error:
            raise APIError(400, str(error), param=param, code="video_not_supported") from None

    async def video_from_frames(self, urls: Any, param: str) -> list[Image.Image]:
        """A video given as its frames, each an image data URL; all of one size."""
        if not isinstance(urls, list) or not urls:
            raise APIError(400, "video parts need a non-empty 'video' list of image data URLs", param=param)
        if len(urls) > self.config.max_video_frames:
            raise APIError(
                400, f"at most {self.config.max_video_frames} frames per video, got {len(urls)}", param=param
            )
        frames = [await self.image_from_url(url, f"{param}.video[{k}]") for k, url in enumerate(urls)]
        try:
            return load_video_frames(frames, self.config.max_image_pixels)
        except ImageInputError as error:
            raise APIError(400, str(error), param=param, code="invalid_video") from None

    def submit(self, job: Job) -> asyncio.Future:
        try:
            return self.worker.submit(job)
        except QueueFullError as error:
            raise APIError(
                429,
                f"{error}; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None

    async def wait(self, job: Job, future: asyncio.Future, deadline: float, request: Request | None) -> Any:
        """The job's result; a 504 past the deadline. A job nobody waits for any more (time limit, client gone,
        handler cancelled) is cancelled so that it stops taking the model's time."""
        try:
            return await _unless_disconnected(asyncio.shield(future), request, deadline)
        except asyncio.TimeoutError:
            self.worker.cancel(job)
            raise self.timeout_error() from None
        except (_Disconnected, asyncio.CancelledError):
            self.worker.cancel(job)
            raise
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error)) from None

    def timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request took longer than the server's limit of {self.config.timeout_s:g} s",
            type="timeout_error",
            code="timeout",
        )

    # -- chat -----------------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request | None = None):
        self.check_model(body.model)
        deadline = time.monotonic() + self.config.timeout_s
        conversation, images, videos = await self.conversation(body.messages)
        max_new = body.max_completion_tokens or body.max_tokens or self.config.default_max_tokens
        text = await self.off_loop(
            self.pipe.processor.apply_chat_template, conversation, add_generation_prompt=True, tokenize=False
        )
        prompt_tokens = await self.check_tokens(text, max_new, "messages")
        warnings = self.warnings(_last_user_text(body.messages))
        sampling: dict[str, Any] = {"max_new_tokens": max_new}
        if body.temperature:
            sampling |= {"do_sample": True, "temperature": body.temperature, "top_p": body.top_p or 1.0}
        alone = body.seed is not None
        key = (tuple(sorted(sampling.items())), object() if alone else None)
        payload = {
            "conversation": conversation,
            "images": images,
            "videos": videos,
            "sampling": sampling,
            "seed": body.seed,
        }
        events: asyncio.Queue = asyncio.Queue()
        job = Job("chat", key, payload, on_event=events.put_nowait if body.stream else None)
        future = self.submit(job)
        reply_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            turn, decoder_state = await self.wait(job, future, deadline, request)
            content = _message_content(turn.segments)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": decoder_state["tokens"],
                "total_tokens": prompt_tokens + decoder_state["tokens"],
            }
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": decoder_state["finish_reason"],
            }
            return {
                "id": reply_id,
                "object": "chat.completion",
                "created": created,
                "model": self.config.model_name,
                "choices": [choice],
                "usage": usage,
            } | warnings
        # Streaming: the events queue carries text deltas, then `_END` once the job's future has settled. The first
        # event is awaited before answering, so a request that never starts still gets a real 504.
        future.add_done_callback(lambda _: events.put_nowait(_END))
        try:
            first = await _unless_disconnected(events.get(), request, deadline)
        except asyncio.TimeoutError:
            first = None
        except (_Disconnected, asyncio.CancelledError):
            self.worker.cancel(job)
            raise
        if first is None or first is _END:
            await self.wait(job, future, deadline, request)  # raises the 504, or the job's error
        chunks = _ChunkWriter(reply_id, created, self.config.model_name)
        return StreamingResponse(
            self.stream(job, future, events, first, deadline, chunks, warnings),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def stream(
        self,
        job: Job,
        future,
        events: asyncio.Queue,
        first,
        deadline: float,
        chunks: _ChunkWriter,
        warnings: dict[str, list[str]],
    ):
        try:
            yield chunks.sse({"role": "assistant", "content": ""}, extra=warnings)
            item = first
            while item is not _END:
                if item is not None:
                    yield chunks.sse({"content": item})
                try:
                    item = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    self.worker.cancel(job)
                    yield _sse(self.timeout_error().body())
                    break
            else:
                try:
                    turn, state = future.result()
                except Exception as error:
                    yield _sse(error_body(str(error), type="server_error"))
                else:
                    images = [_image_part(s) for s in turn.segments if isinstance(s, Image.Image)]
                    if images:
                        yield chunks.sse({"content": images})
                    yield chunks.sse({}, finish_reason=state["finish_reason"])
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                self.worker.cancel(job)

    async def conversation(
        self, messages: Sequence[ChatMessage]
    ) -> tuple[list[dict], list[Image.Image], list[list[Image.Image]]]:
        """OpenAI messages to the chat template's messages plus the images and videos in placeholder order.

        All text is checked (Unicode, total length) before any image is decoded or anything is tokenised."""
        parts_of = [_parts(message) for message in messages]
        self.check_prompt(_message_texts(messages, parts_of), "messages")
        conversation: list[dict] = []
        images: list[Image.Image] = []
        videos: list[list[Image.Image]] = []
        for i, (message, parts) in enumerate(zip(messages, parts_of, strict=True)):
            texts = [p["text"] or "" for p in parts if p["type"] == "text"]
            if message.role in ("system", "developer"):
                conversation.append({"role": "system", "content": [{"type": "text", "text": "\n".join(texts)}]})
            elif message.role == "assistant":
                conversation.append(assistant_message("".join(texts)))
            else:
                conversation.append(await self.user_turn(i, parts, texts, images, videos))
        if conversation[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        return conversation, images, videos

    async def user_turn(
        self,
        index: int,
        parts: list[dict],
        texts: list[str],
        images: list[Image.Image],
        videos: list[list[Image.Image]],
    ) -> dict:
        """Message `index` (a user's) as a template message; its images and videos are decoded and appended to
        `images` and `videos`."""
        urls = [(j, p["image_url"]) for j, p in enumerate(parts) if p["type"] == "image_url"]
        for j, url in urls:
            param = f"messages[{index}].content[{j}]"
            if url is None or not url.get("url"):
                raise APIError(400, "image_url parts need an image_url.url", param=param)
            if len(images) == self.config.max_images_per_request:
                raise APIError(
                    400, f"at most {self.config.max_images_per_request} images per request", param="messages"
                )
            images.append(await self.image_from_url(url["url"], param))
        added = await self.user_videos(index, parts, videos)
        with _refused_as(f"messages[{index}].content"):
            return user_message("\n".join(t for t in texts if t), len(urls), added)

    async def user_videos(self, index: int, parts: list[dict], videos: list[list[Image.Image]]) -> int:
        """Decode message `index`'s video parts onto `videos`; how many it had."""
        found = [(j, p) for j, p in enumerate(parts) if p["type"] in ("video_url", "video")]
        for j, part in found:
            param = f"messages[{index}].content[{j}]"
            if len(videos) == self.config.max_videos_per_request:
                raise APIError(
                    400, f"at most {self.config.max_videos_per_request} video(s) per request", param="messages"
                )
            if part["type"] == "video":
                videos.append(await self.video_from_frames(part.get("video"), param))
                continue
            if not (part.get("video_url") or {}).get("url"):
                raise APIError(400, "video_url parts need a video_url.url", param=param)
            videos.append(await self.video_from_url(part["video_url"]["url"], param))
        return len(found)

    def _run_chat(self, jobs: Sequence[Job]) -> list[tuple[Any, dict]]:
        decoders = [StreamDecoder(self.pipe) for _ in jobs]
        counts = [0] * len(jobs)
        image_start = self.pipe.model.config.image_gen_start_token_id

        def on_token(ids_B) -> None:
            for b, (job, decoder) in enumerate(zip(jobs, decoders, strict=True)):
                if decoder.finished:
                    continue
                token = int(ids_B[b])
                counts[b] += 1
                delta = decoder.push(token)
                if delta:
                    job.emit(delta)
                elif token == image_start:
                    pass  # the drawn image is sent with the result

        first = jobs[0].payload
        videos = [job.payload["videos"] for job in jobs]
        turns = converse_batch(
            self.pipe,
            [job.payload["conversation"] for job in jobs],
            [job.payload["images"] for job in jobs],
            **({"videos": videos} if any(videos) else {}),
            on_token=on_token,
            seed=first["seed"],
            **first["sampling"],
        )
        results = []
        for job, decoder, count, turn in zip(jobs, decoders, counts, turns, strict=True):
            rest = decoder.flush()
            if rest:
                job.emit(rest)
            state = {"tokens": count, "finish_reason": "stop" if decoder.finished else "length"}
            results.append((turn, state))
        return results

    # -- images ---------------------------------------------------------------------------------------------
    def image_settings(self, values: dict[str, Any], size: str | None) -> dict[str, Any]:
        return {"resolution": self.resolution(size)} | image_settings(values)

    @staticmethod
    def check_format(response_format: str | None) -> None:
        if response_format not in (None, "b64_json"):
            raise APIError(
                400,
                f"response_format {response_format!r} is not supported: use 'b64_json' (this server keeps no "
                "files to link to)",
                param="response_format",
                code="unsupported_response_format",
            )

    async def generate(self, body: ImageGenerationRequest, request: Request | None = None) -> dict:
        self.check_model(body.model)
        self.check_n(body.n)
        self.check_format(body.response_format)
        self.check_prompt([(body.prompt, "prompt")], "prompt")
        with _refused_as("prompt"):
            require_prompt(body.prompt)
        settings = self.image_settings(body.model_dump(), body.size)
        await self.check_tokens(body.prompt, 1, "prompt")
        payload = {"prompt": body.prompt}
        response = await self.run_images("generate", payload, body.n, body.seed, settings, request)
        return response | self.warnings(body.prompt, settings["resolution"])

    async def edit(self, request: Request) -> dict:
        try:
            form = await request.form(max_files=4, max_fields=32)
        except Exception as error:
            raise APIError(400, f"the body must be multipart/form-data: {error}") from None
        async with _ClosingForm(form):
            files = [v for k in ("image", "image[]") for v in form.getlist(k) if not isinstance(v, str)]
            if len(files) != 1:
                raise APIError(400, f"send exactly one image file in 'image', got {len(files)}", param="image")
            if form.get("mask") is not None:
                raise APIError(400, "masks are not supported: the model edits from the instruction", param="mask")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            prompt = fields.get("prompt", "")
            self.check_prompt([(prompt, "prompt")], "prompt")
            with _refused_as("prompt"):
                require_prompt(prompt, hint="give an edit instruction")
            self.check_model(fields.get("model"))
            n = _form_number(fields, "n", int, 1)
            self.check_n(n)
            self.check_format(fields.get("response_format"))
            numbers = {name: _form_number(fields, name, float, None) for name in ("cfg_scale", "tau", "top_p")}
            settings = self.image_settings(numbers, fields.get("size"))
            seed = _form_number(fields, "seed", int, None)
            await self.check_tokens(prompt, 1, "prompt")
            image = await self.decode_image(await files[0].read(), "image")
        response = await self.run_images("edit", {"prompt": prompt, "image": image}, n, seed, settings, request)
        return response | self.warnings(prompt, settings["resolution"])

    async def run_images(
        self, kind: str, payload: dict, n: int, seed: int | None, settings: dict, request: Request | None
    ) -> dict:
        deadline = time.monotonic() + self.config.timeout_s
        key = (tuple(sorted(settings.items())), object() if seed is not None else None)
        job = Job(kind, key, payload | {"n": n, "seed": seed, "settings": settings}, rows=n)
        images = await self.wait(job, self.submit(job), deadline, request)
        return {"created": int(time.time()), "data": [{"b64_json": _png_b64(img)} for img in images]}

    def _run_generate(self, jobs: Sequence[Job]) -> list[list[Image.Image]]:
        prompts = [job.payload["prompt"] for job in jobs for _ in range(job.payload["n"])]
        first = jobs[0].payload
        images = self.pipe.generate(prompts, num_images=1, seed=first["seed"], **first["settings"])
        return _split(images, [job.payload["n"] for job in jobs])

    def _run_edit(self, jobs: Sequence[Job]) -> list[list[Image.Image]]:
        sources = [job.payload["image"] for job in jobs for _ in range(job.payload["n"])]
        prompts = [job.payload["prompt"] for job in jobs for _ in range(job.payload["n"])]
        first = jobs[0].payload
        images = self.pipe.edit_batch(sources, prompts, seed=first["seed"], **first["settings"])
        return _split(images, [job.payload["n"] for job in jobs])


# -- helpers ---------------------------------------------------------------------------------------------------
_END = object()  # end of a streamed job's events: its future has settled


async def _parse_json(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, whatever the Content-Type says (curl users often forget it); errors are 400s. Parsed
    off the event loop: a body of many megabytes takes a while."""
    return await asyncio.to_thread(_validated_json, await request.body(), model)


def _validated_json(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_field" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code=code) from None


class _ClosingForm:
    """Closes an uploaded form's temporary files when the handler is done with them."""

    def __init__(self, form: Any) -> None:
        self.form = form

    async def __aenter__(self) -> Any:
        return self.form

    async def __aexit__(self, *exc: object) -> None:
        await self.form.close()


def _form_number(fields: dict[str, str], name: str, kind: type, default: Any) -> Any:
    if name not in fields or fields[name] == "":
        return default
    try:
        return kind(fields[name])
    except ValueError:
        raise APIError(400, f"{name} must be a number, got {fields[name]!r}", param=name) from None


@contextlib.contextmanager
def _refused_as(param: str) -> Iterator[None]:
    """An empty prompt found inside (the check every front end shares) answered as a 400 naming `param`."""
    try:
        yield
    except EmptyPromptError as error:
        raise APIError(400, str(error), param=param) from None


def _message_texts(messages: Sequence[ChatMessage], parts_of: Sequence[list[dict]]) -> list[tuple[str, str]]:
    """Every text part of a chat as (text, param naming where it is), for the Unicode and length checks."""
    return [
        (part["text"] or "", f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]"))
        for i, (m, parts) in enumerate(zip(messages, parts_of, strict=True))
        for j, part in enumerate(parts)
        if part["type"] == "text"
    ]


def _data_url_bytes(url: str, param: str, kind: str) -> bytes:
    """The bytes of a base64 `data:` URL whose media type is `kind`/* ("image" or "video"); anything else is a 400."""
    example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
    if not url.startswith("data:"):
        raise APIError(
            400,
            f"{kind}_url must be a data URL ({example}): this server does not fetch remote URLs or read local files",
            param=param,
            code=f"remote_{kind}_not_allowed",
        )
    header, comma, payload = url[len("data:") :].partition(",")
    media_type = header.split(";")[0].strip().lower()
    if not comma or ";base64" not in header.lower():
        raise APIError(400, f"{kind} data URLs must be base64 encoded ({example})", param=param)
    if not media_type.startswith(f"{kind}/"):
        what = "an image" if kind == "image" else "a video"
        raise APIError(400, f"the data URL holds {media_type or 'no media type'}, not {what}", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"the {kind} data URL is not valid base64", param=param, code="invalid_base64") from None


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    """The text of the last user message: the prompt a chat answers (earlier turns were warned about then)."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        return ""
    return "\n".join(p["text"] or "" for p in _parts(users[-1]) if p["type"] == "text")


def _parts(message: ChatMessage) -> list[dict]:
    """A message's content as OpenAI content parts (a plain string is one text part)."""
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content, "image_url": None}]
    return [part.model_dump() for part in message.content or []]


class _Disconnected(APIError):
    """The client went away before its answer was ready (answered with nginx's 499, which nobody reads)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", code="client_closed_request")


async def _unless_disconnected(awaitable: Awaitable[T], request: Request | None, deadline: float) -> T:
    """`awaitable`'s result; `asyncio.TimeoutError` at `deadline` (time.monotonic()), `_Disconnected` as soon as
    `request`'s client disconnects (uvicorn reports it to a `receive` after the body has been read)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnect(request)) if request is not None else None
    waiting = {task} if watcher is None else {task, watcher}
    try:
        timeout = max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waiting:
            pending.cancel()
    if task in done:
        return task.result()
    if watcher is not None and watcher in done:
        raise _Disconnected()
    raise asyncio.TimeoutError


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stoppable(runner: Callable[[Sequence[Job]], T]) -> Callable[[Sequence[Job]], T]:
    """`runner` that stops at the model's next token or scale step once every job of its batch is cancelled."""

    def run(jobs: Sequence[Job]) -> T:
        with _batch_stops(jobs):
            return runner(jobs)

    return run


@contextlib.contextmanager
def _batch_stops(jobs: Sequence[Job]) -> Iterator[None]:
    try:
        with stop_when(lambda: all(job.cancelled for job in jobs)):
            yield
    except GenerationCancelled:
        raise BatchCancelledError("every request of this batch was cancelled") from None


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start : start + count])
        start += count
    return out


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_b64(image)}"}}


def _message_content(segments: Sequence[str | Image.Image]) -> str | list[dict]:
    if not any(isinstance(s, Image.Image) for s in segments):
        return "".join(s for s in segments if isinstance(s, str))
    return [{"type": "text", "text": s} if isinstance(s, str) else _image_part(s) for s in segments]


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _ChunkWriter:
    """`chat.completion.chunk` events of one streamed answer."""

    def __init__(self, reply_id: str, created: int, model: str) -> None:
        self.base = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def sse(self, delta: dict, finish_reason: str | None = None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse(self.base | {"choices": [choice]} | (extra or {}))


class _GuardMiddleware:
    """Runs before any body parsing: the API key (401) on every path but `OPEN_PATHS`, then the body size (413),
    judged from Content-Length or, for chunked uploads, while the body streams in."""

    def __init__(self, app: Any, max_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = None if api_key is None else api_key.encode("utf-8")

    def authorized(self, raw_headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Exactly one `Authorization: Bearer KEY` header. Compared as bytes: header values may hold any byte
        (compare_digest refuses non-ASCII str), and with two headers the one a proxy checked may not be ours."""
        values = [value for name, value in raw_headers if name.lower() == b"authorization"]
        if len(values) != 1 or self.api_key is None:
            return False
        scheme, _, token = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        headers = dict(raw_headers)
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self.authorized(raw_headers):
            message = "invalid or missing API key (send one 'Authorization: Bearer KEY' header)"
            response = JSONResponse(error_body(message, type="authentication_error", code="invalid_api_key"), 401)
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0
        chunks: list[dict] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await _too_large(self.max_bytes)(scope, receive, send)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(chunks)

        async def replayed() -> dict:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


def _too_large(limit: int) -> JSONResponse:
    message = f"the request body is over the server's limit of {limit} bytes"
    return JSONResponse(error_body(message, code="request_too_large"), status_code=413)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), type=kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", type="server_error"), status_code=500)
