"""Request bodies of the OpenAI-compatible endpoints, and errors in OpenAI's shape.

Unknown fields are accepted and ignored (clients send `user`, `quality`, ... routinely); fields we cannot honour
(`response_format="url"`, remote image or video URLs) are refused with a 400 naming the field rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    """A content part: text, an image, or a video as vLLM and SGLang accept it (OpenAI defines no video part):
    `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`, or its frames as
    `{"type": "video", "video": ["data:image/png;base64,...", ...]}` (qwen-vl-utils' list-of-frames form)."""

    type: Literal["text", "image_url", "video_url", "video"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None
    video: list[str] | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ImageGenerationRequest(_Lenient):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = "b64_json"  # the only format served, so also the default
    seed: int | None = None
    # ranges are checked by `validation.image_settings`, which also checks the same fields of multipart edits
    cfg_scale: float | None = None
    tau: float | None = None
    top_p: float | None = None
