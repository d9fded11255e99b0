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
* Image URLs must be `data:` URLs. The server never fetches remote URLs or reads its own files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..image_io import ImageInputError, load_image
from ..pipeline import VARGPTPipeline
from .batching import BatchingWorker, Job, QueueFullError, check_cancelled
from .engine import StreamDecoder, assistant_message, converse_batch, user_message
from .schemas import APIError, ChatCompletionRequest, ChatMessage, ImageGenerationRequest, error_body


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
    max_n: int = 8
    max_prompt_tokens: int = 4096
    default_max_tokens: int = 256
    retry_after_s: int = 1
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        if self.allow_remote_images:
            raise ValueError("--allow-remote-images is not implemented: send images as data URLs")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")


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
            "largest_batch": service.worker.largest_batch,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": config.model_name, "object": "model", "created": service.started, "owned_by": "vargpt"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await service.chat(await _parse_json(request, ChatCompletionRequest))

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> dict:
        return await service.generate(await _parse_json(request, ImageGenerationRequest))

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
        runners = {"chat": self._run_chat, "generate": self._run_generate, "edit": self._run_edit}
        self.worker = BatchingWorker(runners, config.max_batch_size, config.queue_size)

    # -- checks ---------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_tokens(self, text: str, max_new_tokens: int, param: str) -> int:
        count = len(self.pipe.processor.tokenizer(text)["input_ids"])
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
        if size is None or size == "auto":
            return self.native_resolution
        width, sep, height = size.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or width != height:
            raise APIError(400, f"size must be a square 'NxN' such as '256x256', got {size!r}", param="size")
        resolution = int(width)
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
            return await asyncio.to_thread(load_image, data, self.config.max_image_pixels)
        except ImageInputError as error:
            code = "image_too_large" if "over the limit" in str(error) else "invalid_image"
            raise APIError(400, str(error), param=param, code=code) from None

    async def image_from_url(self, url: str, param: str) -> Image.Image:
        if not url.startswith("data:"):
            raise APIError(
                400,
                "image_url must be a data URL (data:image/png;base64,...): this server does not fetch remote "
                "URLs or read local files",
                param=param,
                code="remote_image_not_allowed",
            )
        header, comma, payload = url[len("data:") :].partition(",")
        media_type = header.split(";")[0].strip().lower()
        if not comma or ";base64" not in header.lower():
            raise APIError(400, "image data URLs must be base64 encoded (data:image/png;base64,...)", param=param)
        if not media_type.startswith("image/"):
            raise APIError(400, f"the data URL holds {media_type or 'no media type'}, not an image", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL is not valid base64", param=param, code="invalid_base64") from None
        return await self.decode_image(data, param)

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

    async def wait(self, job: Job, future: asyncio.Future, deadline: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancelled = True
            raise APIError(
                504,
                f"the request took longer than the server's limit of {self.config.timeout_s:g} s",
                type="timeout_error",
                code="timeout",
            ) from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error)) from None

    # -- chat -----------------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest):
        self.check_model(body.model)
        deadline = time.monotonic() + self.config.timeout_s
        conversation, images = await self.conversation(body.messages)
        max_new = body.max_completion_tokens or body.max_tokens or self.config.default_max_tokens
        text = self.pipe.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompt_tokens = self.check_tokens(text, max_new, "messages")
        sampling: dict[str, Any] = {"max_new_tokens": max_new}
        if body.temperature:
            sampling |= {"do_sample": True, "temperature": body.temperature, "top_p": body.top_p or 1.0}
        alone = body.seed is not None
        key = (tuple(sorted(sampling.items())), object() if alone else None)
        payload = {"conversation": conversation, "images": images, "sampling": sampling, "seed": body.seed}
        events: asyncio.Queue = asyncio.Queue()
        job = Job("chat", key, payload, on_event=events.put_nowait if body.stream else None)
        future = self.submit(job)
        reply_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            turn, decoder_state = await self.wait(job, future, deadline)
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
            }
        # Streaming: the events queue carries text deltas, then `_END` once the job's future has settled. The first
        # event is awaited before answering, so a request that never starts still gets a real 504.
        future.add_done_callback(lambda _: events.put_nowait(_END))
        try:
            first = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            first = None
        if first is None or first is _END:
            await self.wait(job, future, deadline)  # raises the 504, or the job's error
        chunks = _ChunkWriter(reply_id, created, self.config.model_name)
        return StreamingResponse(
            self.stream(job, future, events, first, deadline, chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def stream(self, job: Job, future, events: asyncio.Queue, first, deadline: float, chunks: _ChunkWriter):
        try:
            yield chunks.sse({"role": "assistant", "content": ""})
            item = first
            while item is not _END:
                if item is not None:
                    yield chunks.sse({"content": item})
                try:
                    item = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    job.cancelled = True
                    message = f"the request took longer than the server's limit of {self.config.timeout_s:g} s"
                    yield _sse(error_body(message, type="timeout_error", code="timeout"))
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
                job.cancelled = True

    async def conversation(self, messages: Sequence[ChatMessage]) -> tuple[list[dict], list[Image.Image]]:
        """OpenAI messages to the chat template's messages plus the images in placeholder order."""
        conversation: list[dict] = []
        images: list[Image.Image] = []
        for i, message in enumerate(messages):
            parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else None
            parts = parts if parts is not None else [p.model_dump() for p in message.content or []]
            texts = [p["text"] or "" for p in parts if p["type"] == "text"]
            urls = [p["image_url"] for p in parts if p["type"] == "image_url"]
            if message.role in ("system", "developer"):
                conversation.append({"role": "system", "content": [{"type": "text", "text": "\n".join(texts)}]})
            elif message.role == "assistant":
                conversation.append(assistant_message("".join(texts)))
            else:
                for j, url in enumerate(urls):
                    if url is None or not url.get("url"):
                        raise APIError(400, "image_url parts need an image_url.url", param=f"messages[{i}].content")
                    images.append(await self.image_from_url(url["url"], f"messages[{i}].content[{j}]"))
                    if len(images) > self.config.max_images_per_request:
                        raise APIError(
                            400, f"at most {self.config.max_images_per_request} images per request", param="messages"
                        )
                try:
                    conversation.append(user_message("\n".join(t for t in texts if t), len(urls)))
                except ValueError as error:
                    raise APIError(400, str(error), param=f"messages[{i}].content") from None
        if conversation[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        return conversation, images

    def _run_chat(self, jobs: Sequence[Job]) -> list[tuple[Any, dict]]:
        decoders = [StreamDecoder(self.pipe) for _ in jobs]
        counts = [0] * len(jobs)
        image_start = self.pipe.model.config.image_gen_start_token_id

        def on_token(ids_B) -> None:
            check_cancelled(jobs)
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
        turns = converse_batch(
            self.pipe,
            [job.payload["conversation"] for job in jobs],
            [job.payload["images"] for job in jobs],
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
    def image_settings(self, body: Any, size: str | None) -> dict[str, Any]:
        settings = {"resolution": self.resolution(size)}
        for name in ("cfg_scale", "tau", "top_p"):
            value = getattr(body, name, None)
            if value is not None:
                settings[name] = float(value)
        return settings

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

    async def generate(self, body: ImageGenerationRequest) -> dict:
        self.check_model(body.model)
        self.check_n(body.n)
        self.check_format(body.response_format)
        if not body.prompt.strip():
            raise APIError(400, "the prompt is empty: give some text", param="prompt")
        self.check_tokens(body.prompt, 1, "prompt")
        settings = self.image_settings(body, body.size)
        return await self.run_images("generate", {"prompt": body.prompt}, body.n, body.seed, settings)

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
            if not prompt.strip():
                raise APIError(400, "the prompt is empty: give an edit instruction", param="prompt")
            self.check_model(fields.get("model"))
            n = _form_number(fields, "n", int, 1)
            self.check_n(n)
            self.check_format(fields.get("response_format"))
            self.check_tokens(prompt, 1, "prompt")
            image = await self.decode_image(await files[0].read(), "image")
        values = _FormValues(
            cfg_scale=_form_number(fields, "cfg_scale", float, None),
            tau=_form_number(fields, "tau", float, None),
            top_p=_form_number(fields, "top_p", float, None),
        )
        settings = self.image_settings(values, fields.get("size"))
        seed = _form_number(fields, "seed", int, None)
        return await self.run_images("edit", {"prompt": prompt, "image": image}, n, seed, settings)

    async def run_images(self, kind: str, payload: dict, n: int, seed: int | None, settings: dict) -> dict:
        deadline = time.monotonic() + self.config.timeout_s
        key = (tuple(sorted(settings.items())), object() if seed is not None else None)
        job = Job(kind, key, payload | {"n": n, "seed": seed, "settings": settings}, rows=n)
        images = await self.wait(job, self.submit(job), deadline)
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
    """The body as `model`, whatever the Content-Type says (curl users often forget it); errors are 400s."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_field" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code=code) from None


@dataclass
class _FormValues:
    cfg_scale: float | None
    tau: float | None
    top_p: float | None


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

    def sse(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse(self.base | {"choices": [choice]})


class _GuardMiddleware:
    """Runs before any body parsing: the API key (401) on /v1/ paths, then the body size (413), judged from
    Content-Length or, for chunked uploads, while the body streams in."""

    def __init__(self, app: Any, max_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = api_key

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key or "")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1/") and not self.authorized(headers):
            message = "invalid or missing API key (send 'Authorization: Bearer KEY')"
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
