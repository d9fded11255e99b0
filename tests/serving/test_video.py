"""Videos in chat requests, in process with the tiny model: vLLM's `video_url` data URLs, frames as image data URLs,
and every bad video answered as a 400 naming its content part."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.clips import MP4, encode_clip, moving_square
from tests.serving.errors import assert_openai_error
from vargpt.pipeline import VARGPTPipeline
from vargpt.serving import ServerConfig, create_app
from vargpt.video_io import load_video

FRAME = 56
MAX_VIDEO_FRAMES = 4


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    pipe = VARGPTPipeline.from_pretrained("tiny", seed=0)
    # frames stay 56 x 56 inside the processor: 8 video tokens per temporal patch, a short prompt
    pipe.processor.video_min_pixels = pipe.processor.video_max_pixels = FRAME * FRAME
    return pipe


@pytest.fixture(scope="module")
def config() -> ServerConfig:
    return ServerConfig(
        model_name="tiny", max_video_frames=MAX_VIDEO_FRAMES, max_video_source_frames=40, max_image_pixels=300 * 300
    )


@pytest.fixture(scope="module")
def client(pipe, config) -> Iterator[TestClient]:
    with TestClient(create_app(pipe, config), raise_server_exceptions=False) as test_client:
        yield test_client


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _chat(client: TestClient, *parts: dict, max_tokens: int = 3):
    content = [*parts, {"type": "text", "text": "What moves?"}]
    return client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    )


def _video_url(data: bytes, media_type: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": _data_url(data, media_type)}}


def test_a_video_url_is_decoded_sampled_and_answered_like_the_pipeline(client, pipe, config):
    clip = encode_clip(moving_square(20), rate=10, kind=MP4)  # 2 s: 4 frames at 2 per second
    reply = _chat(client, _video_url(clip))
    assert reply.status_code == 200, reply.text
    answer = reply.json()["choices"][0]["message"]["content"]
    frames = load_video(clip, config.video_sampling)
    assert len(frames) == 4
    assert answer == pipe.converse("What moves?", videos=[frames], max_new_tokens=3).text


def test_frames_as_image_data_urls_read_as_that_video(client, pipe):
    frames = moving_square(4)
    reply = _chat(client, {"type": "video", "video": [_data_url(_png(f), "image/png") for f in frames]})
    assert reply.status_code == 200, reply.text
    expected = pipe.converse("What moves?", videos=[frames], max_new_tokens=3).text
    assert reply.json()["choices"][0]["message"]["content"] == expected


BAD_VIDEOS = [
    ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, "remote_video_not_allowed"),
    ({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, "remote_video_not_allowed"),
    ({"type": "video_url"}, None),
    (_video_url(b"x", "image/png"), None),  # an image media type in a video part
    (_video_url(b"<html></html>"), "invalid_video"),
    (_video_url(b"GIF89a but not really"), "invalid_video"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}}, "invalid_base64"),
    ({"type": "video", "video": []}, None),
    ({"type": "video", "video": ["data:image/png;base64,AAAA"] * (MAX_VIDEO_FRAMES + 1)}, None),
    ({"type": "video", "video": ["data:image/png;base64,bm90IGFuIGltYWdl"]}, "invalid_image"),
]


@pytest.mark.parametrize(("part", "code"), BAD_VIDEOS, ids=[str(i) for i in range(len(BAD_VIDEOS))])
def test_bad_videos_are_400s_naming_the_content_part(client, part, code):
    param = "messages[0].content[0]" + (".video[0]" if code == "invalid_image" else "")
    assert_openai_error(_chat(client, part), 400, param, code)


def test_video_limits_are_400s(client):
    long_clip = encode_clip(moving_square(41), rate=10, kind=MP4)  # over max_video_source_frames=40
    assert_openai_error(_chat(client, _video_url(long_clip)), 400, "messages[0].content[0]", "video_too_large")
    large = encode_clip(np.zeros((2, 320, 320, 3), dtype=np.uint8), kind=MP4)  # over 300 x 300 pixels a frame
    assert_openai_error(_chat(client, _video_url(large)), 400, "messages[0].content[0]", "video_too_large")
    two = [_video_url(encode_clip(moving_square(4), kind=MP4))] * 2  # max_videos_per_request is 1
    assert_openai_error(_chat(client, *two), 400, "messages")
    sizes = [moving_square(1)[0], moving_square(1, size=28)[0]]
    frames = {"type": "video", "video": [_data_url(_png(f), "image/png") for f in sizes]}
    assert_openai_error(_chat(client, frames), 400, "messages[0].content[0]", "invalid_video")


def test_the_server_limit_on_frames_must_allow_a_pair():
    with pytest.raises(ValueError, match="max_video_frames must be >= 2"):
        ServerConfig(max_video_frames=1)
