"""Recognising an upstream's "the request is longer than the model's context window".

Providers say it in different words; each entry below is what one of them sends (as far
as their documentation and public bug reports show), matched case-insensitively against
the error's ``code``, ``type`` and ``message``. Only 400, 413 and 422 answers are looked
at: the same words in a 5xx are a server problem, not the request's length.

A match becomes :class:`~tokenrelay.errors.ContextTooLong`, which the upstream policy
routes to the model's ``context_fallbacks`` and never resends to the same model.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["CONTEXT_SIGNS", "is_context_overflow"]

# (provider, what it sends). Lower case; a substring of "code type message".
CONTEXT_SIGNS: tuple[tuple[str, str], ...] = (
    ("OpenAI, Azure OpenAI, Groq (code)", "context_length_exceeded"),
    ("OpenAI, Azure, DeepSeek, vLLM, OpenRouter", "maximum context length"),
    ("OpenAI, DeepSeek, vLLM (older wording)", "this model's maximum context length is"),
    ("vLLM", "is longer than the model's context length"),
    ("vLLM, Groq", "please reduce the length of the messages"),
    ("Anthropic (OpenAI-compatible endpoint)", "prompt is too long"),
    ("llama.cpp server (code exceed_context_size_error)", "exceed_context_size"),
    ("llama.cpp server, Ollama", "exceeds the available context size"),
    ("Ollama", "exceeded max context length"),
    ("Ollama, LM Studio", "context length of only"),
    ("Mistral", "too large for model with"),
    ("Google Gemini (OpenAI-compatible)", "exceeds the maximum number of tokens allowed"),
    ("xAI", "maximum prompt length"),
    ("Hugging Face TGI, Together", "tokens + `max_new_tokens` must be"),
    ("AWS Bedrock (OpenAI-compatible)", "input is too long for requested model"),
    ("Cohere (OpenAI-compatible)", "too many tokens"),
)
_STATUSES = frozenset({400, 413, 422})


def is_context_overflow(status: int, body: bytes) -> bool:
    """Whether an error answer (status and raw body) means "context too long"."""
    if status not in _STATUSES:
        return False
    text = _error_text(body).lower()
    return any(sign in text for _, sign in CONTEXT_SIGNS)


def _error_text(body: bytes) -> str:
    """``code type message`` of a JSON error body, else the body as text."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:4096].decode("utf-8", "replace")
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        parts = [err.get(k) for k in ("code", "type", "message", "detail", "msg")]
        return " ".join(str(p) for p in parts if p)
    return str(err)[:4096]
