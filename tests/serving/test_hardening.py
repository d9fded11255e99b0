"""Inputs that once made the server answer 500 or do more than asked (issue 29), in process with the tiny model.

Each case is a request a client can send; the answer must be a 4xx in OpenAI's error shape naming the field. The
model is never reached by these requests, so the tests take milliseconds each after the model loads.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.serving.errors import assert_openai_error
from vargpt.cli.demo import demo_scene
from vargpt.image_io import ImageInputError, load_image
from vargpt.pipeline import VARGPTPipeline
from vargpt.serving import ServerConfig, create_app
from vargpt.serving.app import CHARS_PER_TOKEN_BOUND, SERVER_IMAGE_FORMATS

KEY = "K"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    pipe = VARGPTPipeline.from_pretrained("tiny", seed=0)
    config = ServerConfig(model_name="tiny", api_key=KEY, max_prompt_tokens=MAX_PROMPT_TOKENS, timeout_s=30)
    with TestClient(create_app(pipe, config), raise_server_exceptions=False) as test_client:
        yield test_client


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    demo_scene().save(buffer, format=fmt)
    return buffer.getvalue()


def _edit(client: TestClient, fields: dict, image: bytes | None = None, headers: dict | None = None):
    files = {"image": ("scene.png", image or _image_bytes("PNG"), "image/png")}
    return client.post(
        "/v1/images/edits", data={"prompt": "make it blue"} | fields, files=files, headers=headers or AUTH
    )


# -- item 1: long prompts are refused before tokenising -----------------------------------------------------------
def test_a_prompt_over_the_character_bound_is_refused_unread(client):
    limit = CHARS_PER_TOKEN_BOUND * MAX_PROMPT_TOKENS
    chat = {"messages": [{"role": "system", "content": "a" * limit}, {"role": "user", "content": "b"}]}
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 400, "messages")
    assert error["code"] == "context_length_exceeded" and f"limit of {limit}" in error["message"]
    error = assert_openai_error(
        client.post("/v1/images/generations", json={"prompt": "a " * limit}, headers=AUTH), 400, "prompt"
    )
    assert "characters" in error["message"]
    assert_openai_error(_edit(client, {"prompt": "x" * (limit + 1)}), 400, "prompt", "context_length_exceeded")


# -- item 5: a non-ASCII key -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"Bearer \xe9", b"Bearer K\xe9", b"\xe9\xe9", b"Bearer \xff\xfe"])
def test_non_ascii_authorization_headers_are_401(client, value):
    response = client.get("/v1/models", headers=[(b"authorization", value)])
    assert_openai_error(response, 401, code="invalid_api_key")


def test_a_key_with_non_ascii_characters_works(client):
    pipe = client.app.state.service.pipe
    app = create_app(pipe, ServerConfig(model_name="tiny", api_key="clé"))
    with TestClient(app, raise_server_exceptions=False) as other:
        assert other.get("/v1/models", headers=[(b"authorization", "Bearer clé".encode())]).status_code == 200
        assert_openai_error(other.get("/v1/models", headers=[(b"authorization", b"Bearer cle")]), 401)


# -- item 6: deeply nested JSON -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations"])
def test_deeply_nested_json_is_a_400(client, path):
    assert_openai_error(client.post(path, content=b"[" * 100_000, headers=AUTH), 400, code="invalid_json")


# -- item 7: sampling settings that would make NaNs ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
        (b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
        (b'{"prompt": "x", "cfg_scale": 1e308}', "cfg_scale"),
        (b'{"prompt": "x", "cfg_scale": -1}', "cfg_scale"),
        (b'{"prompt": "x", "tau": 1e-300}', "tau"),
        (b'{"prompt": "x", "tau": 0}', "tau"),
        (b'{"prompt": "x", "tau": -Infinity}', "tau"),
        (b'{"prompt": "x", "top_p": 1.5}', "top_p"),
        (b'{"prompt": "x", "top_p": NaN}', "top_p"),
    ],
)
def test_out_of_range_generation_settings_are_400s(client, body, param):
    assert_openai_error(client.post("/v1/images/generations", content=body, headers=AUTH), 400, param, "invalid_value")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"cfg_scale": "nan"}, "cfg_scale"),
        ({"cfg_scale": "inf"}, "cfg_scale"),
        ({"cfg_scale": "1e308"}, "cfg_scale"),
        ({"tau": "nan"}, "tau"),
        ({"tau": "1e-300"}, "tau"),
        ({"top_p": "-0.5"}, "top_p"),
    ],
)
def test_out_of_range_edit_form_fields_are_the_same_400s(client, fields, param):
    assert_openai_error(_edit(client, fields), 400, param, "invalid_value")


# -- item 8: sizes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["²x²", "0x0", "00x00", "٣٢x٣٢", "-32x-32", "32x32x32", "x"])
def test_malformed_sizes_are_400s(client, size):
    assert_openai_error(
        client.post("/v1/images/generations", json={"prompt": "x", "size": size}, headers=AUTH), 400, "size"
    )
    assert_openai_error(_edit(client, {"size": size}), 400, "size")


# -- item 9: lone surrogates ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/images/generations", b'{"prompt": "a \\udfff circle"}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, '
            b'{"type": "text", "text": "\\udfff"}]}]}',
            "messages[0].content[1]",
        ),
    ],
)
def test_lone_surrogates_are_400s(client, path, body, param):
    assert_openai_error(client.post(path, content=body, headers=AUTH), 400, param, "invalid_text")


# -- item 10: hardening -------------------------------------------------------------------------------------------
def test_two_authorization_headers_are_refused_even_if_one_is_right(client):
    for pair in ([KEY, "wrong"], ["wrong", KEY], [KEY, KEY]):
        headers = [(b"authorization", f"Bearer {key}".encode()) for key in pair]
        assert_openai_error(client.get("/v1/models", headers=headers), 401, code="invalid_api_key")


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/nowhere"])
def test_the_api_docs_need_the_key_when_one_is_set(client, path):
    assert_openai_error(client.get(path), 401, code="invalid_api_key")
    assert client.get(path, headers=AUTH).status_code == (404 if path == "/nowhere" else 200)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "EPS"])
def test_image_formats_outside_the_short_list_are_refused(client, fmt):
    data = _image_bytes(fmt)
    error = assert_openai_error(_edit(client, {}, image=data), 400, "image", "invalid_image")
    assert "accepted format" in error["message"]
    url = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert_openai_error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 400, "messages[0].content[0]")


@pytest.mark.parametrize("fmt", SERVER_IMAGE_FORMATS)
def test_the_short_list_of_formats_loads(fmt):
    image = load_image(_image_bytes(fmt), formats=SERVER_IMAGE_FORMATS)
    assert image.size == demo_scene().size and image.mode == "RGB"


def test_load_image_without_a_format_list_still_reads_every_format():
    assert load_image(_image_bytes("PPM")).size == demo_scene().size
    with pytest.raises(ImageInputError, match="PNG, JPEG"):
        load_image(_image_bytes("PPM"), formats=("PNG", "JPEG"))


# -- item 11: OpenAI conformance ------------------------------------------------------------------------------------
def test_images_default_to_b64_json_and_url_is_refused_naming_it(client):
    reply = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 1}, headers=AUTH)
    assert reply.status_code == 200 and set(reply.json()["data"][0]) == {"b64_json"}
    body = {"prompt": "a red circle", "response_format": "url"}
    error = assert_openai_error(client.post("/v1/images/generations", json=body, headers=AUTH), 400, "response_format")
    assert "b64_json" in error["message"]
    assert (
        "b64_json" in assert_openai_error(_edit(client, {"response_format": "url"}), 400, "response_format")["message"]
    )


def test_a_bad_image_is_named_by_its_content_part_index(client):
    parts = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
    ]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    assert_openai_error(
        client.post("/v1/chat/completions", json=body, headers=AUTH), 400, "messages[0].content[1]", "invalid_image"
    )
    parts = [parts[0], {"type": "image_url", "image_url": {"url": ""}}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    assert_openai_error(client.post("/v1/chat/completions", json=body, headers=AUTH), 400, "messages[0].content[1]")


def test_the_server_still_answers_after_all_that(client):
    reply = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, headers=AUTH
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    assert client.get("/health").json()["status"] == "ok"
