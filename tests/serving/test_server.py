"""The OpenAI-compatible server as clients use it: a real uvicorn process driven by the official `openai` client.

One server process (tiny model) serves the whole module; the fixture always terminates it. Its limits are set
small so that each limit can be hit cheaply: queue 8, batches of 4, 1 MiB bodies, 300 x 300-pixel images, 512
prompt tokens, n <= 4 and a 10 s time limit.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.live_server import free_port, running_server
from tests.serving.errors import assert_openai_error
from vargpt.cli.demo import demo_scene

API_KEY = "test-key"


@contextlib.contextmanager
def _running_server(*options: str) -> Iterator[str]:
    """`python -m vargpt.serving` on a free port with the tiny model; yields its base URL, always terminates it."""
    port = free_port()
    command = [sys.executable, "-m", "vargpt.serving", "--model", "tiny", "--port", str(port), "--api-key", API_KEY]
    with running_server([*command, *options], port) as base:
        yield base


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    limits = ["--queue-size", "8", "--max-batch-size", "4", "--timeout", "30", "--max-body-mb", "1"]
    limits += ["--max-image-pixels", str(300 * 300), "--max-prompt-tokens", "512", "--max-n", "4"]
    with _running_server(*limits) as base:
        yield base


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _healthy(server: str) -> bool:
    return httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"


# -- the API as documented -------------------------------------------------------------------------------------
def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_plain_and_streamed_give_the_same_text(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) > 2 and "".join(deltas) == text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_about_an_image_data_url(client):
    content = [
        {"type": "image_url", "image_url": {"url": _data_url(_png_bytes(demo_scene()))}},
        {"type": "text", "text": "What colour is the shape?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6)
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 6


def test_images_the_model_draws_in_chat_come_back_as_image_parts(server, client):
    # seed 0 at temperature 1 makes the tiny model draw while answering (found by trying seeds)
    request = {"messages": [{"role": "user", "content": "draw a cat"}], "max_tokens": 64, "temperature": 1.0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{server}/v1/chat/completions", json=request | {"seed": 0}, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    content = reply.json()["choices"][0]["message"]["content"]
    assert isinstance(content, list) and {p["type"] for p in content} == {"text", "image_url"}
    urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
    for url in urls:
        assert url.startswith("data:image/png;base64,")
        assert _decode_png(url.split(",", 1)[1]).size == (32, 32)
    stream = client.chat.completions.create(model="tiny", stream=True, seed=0, **request)
    streamed = [c.choices[0].delta.content for c in stream if isinstance(c.choices[0].delta.content, list)]
    assert [p["image_url"]["url"] for p in streamed[0]] == urls


def test_images_generate_b64_size_and_seed(client):
    first = client.images.generate(
        prompt="a red circle", n=2, size="32x32", response_format="b64_json", extra_body={"seed": 7}
    )
    assert len(first.data) == 2
    assert all(_decode_png(d.b64_json).size == (32, 32) for d in first.data)
    again = client.images.generate(prompt="a red circle", n=2, response_format="b64_json", extra_body={"seed": 7})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]
    other = client.images.generate(prompt="a red circle", response_format="b64_json", extra_body={"seed": 8})
    assert other.data[0].b64_json != first.data[0].b64_json
    guided = client.images.generate(
        prompt="a red circle", response_format="b64_json", extra_body={"seed": 7, "cfg_scale": 1.0, "tau": 1.0}
    )
    assert guided.data[0].b64_json != first.data[0].b64_json
    larger = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json")
    assert _decode_png(larger.data[0].b64_json).size == (64, 64)


def test_images_edit_multipart(client):
    scene = ("scene.png", _png_bytes(demo_scene()), "image/png")
    edited = client.images.edit(
        image=scene, prompt="make the circle blue", n=2, response_format="b64_json", extra_body={"seed": 1}
    )
    assert len(edited.data) == 2 and all(_decode_png(d.b64_json).size == (32, 32) for d in edited.data)
    again = client.images.edit(image=scene, prompt="make the circle blue", n=2, extra_body={"seed": 1})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in edited.data]


# -- load ------------------------------------------------------------------------------------------------------
def test_fifty_concurrent_requests_are_answered_or_rejected_with_429(server, client, tmp_path):
    results: list[tuple[str, float]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            if i % 2:
                client.images.generate(prompt=f"a red circle number {i}", response_format="b64_json")
            else:
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8
                )
            outcome = "ok"
        except openai.RateLimitError as error:
            assert error.response.headers.get("retry-after") == "1"
            outcome = "429"
        except BaseException as error:  # anything else is a lost request
            with lock:
                failures.append(error)
            return
        with lock:
            results.append((outcome, time.perf_counter() - t0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    assert not failures, failures[:3]
    answered = [s for outcome, s in results if outcome == "ok"]
    rejected = [s for outcome, s in results if outcome == "429"]
    assert len(answered) + len(rejected) == 50 and answered and rejected
    health = httpx.get(f"{server}/health", timeout=5).json()
    assert health["status"] == "ok" and health["largest_batch"] > 1  # queued requests were batched
    q = statistics.quantiles(answered, n=20) if len(answered) > 1 else [answered[0]] * 19
    figures = {
        "requests": 50,
        "concurrency": 50,
        "answered": len(answered),
        "rejected_429": len(rejected),
        "answered_p50_s": round(statistics.median(answered), 3),
        "answered_p95_s": round(q[18], 3),
        "rejected_p50_s": round(statistics.median(rejected), 3),
        "wall_s": round(wall, 2),
        "largest_batch": health["largest_batch"],
    }
    (tmp_path / "load_test.json").write_text(json.dumps(figures, indent=2))
    print(f"\nload test: {json.dumps(figures)} (written to {tmp_path / 'load_test.json'})")


# -- bad requests ----------------------------------------------------------------------------------------------
def _post(server: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"} | kwargs.pop("headers", {})
    return httpx.post(f"{server}/v1/{path}", headers=headers, timeout=30, **kwargs)


def _chat_with_image(url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "send", "status", "code", "param"),
    [
        ("images/generations", {"content": b'{"prompt": "a red'}, 400, "invalid_json", None),
        ("images/generations", {"json": ["a red circle"]}, 400, "invalid_json", None),
        ("images/generations", {"json": {"n": 1}}, 400, "missing_field", "prompt"),
        ("images/generations", {"json": {"prompt": " "}}, 400, None, "prompt"),
        ("images/generations", {"json": {"prompt": "x", "n": 5}}, 400, None, "n"),
        ("images/generations", {"json": {"prompt": "x", "size": "100x100"}}, 400, "unsupported_size", "size"),
        ("images/generations", {"json": {"prompt": "x", "size": "32x64"}}, 400, None, "size"),
        ("images/generations", {"json": {"prompt": "x", "response_format": "url"}}, 400, None, "response_format"),
        ("images/generations", {"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model_not_found", "model"),
        ("images/generations", {"json": {"prompt": "word " * 600}}, 400, "context_length_exceeded", "prompt"),
        ("images/generations", {"content": b"x" * (1024 * 1024 + 1)}, 413, "request_too_large", None),
        ("chat/completions", {"json": {"messages": []}}, 400, None, "messages"),
        ("chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}}, 400, None,
         "max_tokens"),
        ("chat/completions", {"json": _chat_with_image("data:image/png;base64,%%%notbase64")}, 400, "invalid_base64",
         "messages[0].content[0]"),
        ("chat/completions", {"json": _chat_with_image(_data_url(b"hello", "text/plain"))}, 400, None,
         "messages[0].content[0]"),
        ("chat/completions", {"json": _chat_with_image(_data_url(b"not a png at all"))}, 400, "invalid_image",
         "messages[0].content[0]"),
        ("chat/completions", {"json": _chat_with_image(_data_url(_png_bytes(Image.new("RGB", (301, 300)))))}, 400,
         "image_too_large", "messages[0].content[0]"),
        ("chat/completions", {"json": _chat_with_image("https://example.com/cat.png")}, 400,
         "remote_image_not_allowed", "messages[0].content[0]"),
        ("chat/completions", {"json": _chat_with_image("file:///etc/passwd")}, 400, "remote_image_not_allowed",
         "messages[0].content[0]"),
        ("chat/completions", {"json": {"messages": [{"role": "assistant", "content": "hi"}]}}, 400, None, "messages"),
        ("images/edits", {"data": {"prompt": "make it blue"}}, 400, None, "image"),
        ("images/edits", {"files": {"image": ("a.png", b"garbage", "image/png")}, "data": {"prompt": "x"}}, 400,
         "invalid_image", "image"),
        ("images/edits", {"files": {"image": ("a.png", _png_bytes(demo_scene()), "image/png")}, "data": {}}, 400,
         None, "prompt"),
        ("images/generations", {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, 401,
         "invalid_api_key", None),
    ],
)  # fmt: skip
def test_malformed_requests_get_clear_4xx_and_the_server_keeps_serving(server, path, send, status, code, param):
    assert_openai_error(_post(server, path, **send), status, param, code)
    assert _healthy(server)


def test_wrong_api_key_with_the_official_client(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_time_limit_answers_504_and_frees_the_worker():
    with _running_server("--timeout", "1") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        t0 = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as caught:  # 1900 greedy tokens take ~15 s on the tiny model
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=1900
            )
        assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
        assert time.perf_counter() - t0 < 3
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None  # within 1 s: the abandoned batch was stopped
        assert _healthy(base)
