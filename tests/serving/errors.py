"""The shape every server error must have (OpenAI's), checked in one place for all server tests."""

from __future__ import annotations


def assert_openai_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The response has `status` and an OpenAI-shaped error naming `param` (and `code`, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error
