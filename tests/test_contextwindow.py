"""Recognising "context too long" in each provider's words (tokenrelay.contextwindow)."""

from __future__ import annotations

import orjson
import pytest

from tokenrelay.contextwindow import CONTEXT_SIGNS, is_context_overflow


@pytest.mark.parametrize(("who", "sign"), CONTEXT_SIGNS)
def test_every_listed_sign_is_recognised_in_an_error_body(who: str, sign: str) -> None:
    message = f"Request failed: {sign.upper()} (details follow)"
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    assert is_context_overflow(400, body), who


@pytest.mark.parametrize("body", [
    # OpenAI / Azure / Groq: the code alone is enough
    {"error": {"message": "Too long.", "type": "invalid_request_error",
               "code": "context_length_exceeded"}},
    # vLLM's own error object (no "error" wrapper)
    {"object": "error", "message": "This model's maximum context length is 4096 tokens. "
     "However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).",
     "type": "BadRequestError", "code": 400},
    # Anthropic's OpenAI-compatible endpoint
    {"type": "error", "error": {"type": "invalid_request_error",
                                "message": "prompt is too long: 208310 tokens > 200000 maximum"}},
    # llama.cpp server
    {"error": {"code": 400, "message": "the request exceeds the available context size, try "
               "increasing it", "type": "exceed_context_size_error"}},
])
def test_real_provider_bodies_are_recognised(body: dict) -> None:
    assert is_context_overflow(400, orjson.dumps(body))


def test_a_plain_text_body_is_read_too() -> None:
    assert is_context_overflow(413, b"Input is too long for requested model.")


@pytest.mark.parametrize(("status", "body"), [
    (400, {"error": {"message": "max_tokens must be at most 4096"}}),
    (400, {"error": {"message": "Invalid API key"}}),
    (500, {"error": {"message": "This model's maximum context length is 4096 tokens."}}),
    (429, {"error": {"code": "context_length_exceeded"}}),
])
def test_other_errors_and_other_statuses_are_not(status: int, body: dict) -> None:
    assert not is_context_overflow(status, orjson.dumps(body))
