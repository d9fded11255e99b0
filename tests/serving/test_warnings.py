"""The server's model-card warnings: a `warnings` list in the response, never a refusal (issue 28)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from vargpt import VARGPTPipeline
from vargpt.cli.demo import demo_scene
from vargpt.serving import ServerConfig, create_app


def _client(name: str) -> Iterator[TestClient]:
    pipe = VARGPTPipeline.from_pretrained(name, device="cpu")
    with TestClient(create_app(pipe, ServerConfig(model_name=name))) as client:
        yield client


@pytest.fixture(scope="module")
def shapes() -> Iterator[TestClient]:
    yield from _client("vargpt-shapes-tiny")


@pytest.fixture(scope="module")
def tiny() -> Iterator[TestClient]:
    yield from _client("tiny")


def _chat(client: TestClient, text: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2, "seed": 0} | extra
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_chat_warns_about_words_the_model_never_saw(shapes):
    body = _chat(shapes, "What is the capital of France?").json()
    (line,) = body["warnings"]
    assert "'capital', 'france'" in line and "\n" not in line
    assert body["choices"][0]["message"]["role"] == "assistant"  # answered all the same
    assert "warnings" not in _chat(shapes, "What colour is the circle?").json()


def test_only_the_last_user_message_is_checked(shapes):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "draw a circle"}]},
    ]
    response = shapes.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "seed": 0})
    assert "warnings" not in response.json()


def test_a_streamed_chat_carries_the_warnings_on_its_first_chunk(shapes):
    response = _chat(shapes, "hello", stream=True)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert "'hello'" in chunks[0]["warnings"][0]
    assert all("warnings" not in chunk for chunk in chunks[1:])


def test_images_warn_about_unseen_words_and_untrained_sizes(shapes):
    response = shapes.post("/v1/images/generations", json={"prompt": "a dog", "size": "16x16", "seed": 0})
    assert response.status_code == 200
    body = response.json()
    assert len(body["data"]) == 1
    words, size = body["warnings"]
    assert "'dog'" in words and "16 px" in size
    plain = shapes.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 0}).json()
    assert "warnings" not in plain


def test_edits_warn_too(shapes):
    png = io.BytesIO()
    demo_scene().save(png, format="PNG")
    files = {"image": ("scene.png", png.getvalue(), "image/png")}
    response = shapes.post("/v1/images/edits", data={"prompt": "make the circle pink", "seed": "0"}, files=files)
    assert response.status_code == 200
    assert "'pink'" in response.json()["warnings"][0]


def test_a_model_without_a_card_gets_no_warnings(tiny):
    assert "warnings" not in _chat(tiny, "What is the capital of France?").json()
    response = tiny.post("/v1/images/generations", json={"prompt": "a dog", "size": "16x16", "seed": 0})
    assert "warnings" not in response.json()
