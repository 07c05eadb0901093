"""OpenAI's streaming wire format, as byte templates.

A chat completion stream is ``data: {chunk}\\n\\n`` frames that differ only in their
delta, so :class:`Chunks` pre-encodes everything around it once per response and a token
costs one ``orjson.dumps`` of its text (:func:`tokens_batch`). :func:`tool_frames` lays out
parallel tool calls the way OpenAI fragments them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import orjson

__all__ = ["Chunks", "tokens_batch", "tool_frames"]


class Chunks:
    """Byte templates of one response's chunks: per token, only the token is encoded."""

    __slots__ = ("content_head", "created", "id", "model", "prefix", "reasoning_head", "tail")

    def __init__(self, chat_id: str, created: int, model: str, include_usage: bool) -> None:
        self.id = chat_id
        self.created = created
        self.model = model
        self.prefix = (
            b'data: {"id":"' + chat_id.encode() + b'","object":"chat.completion.chunk",'
            b'"created":' + str(created).encode() + b',"model":' + orjson.dumps(model)
            + b',"choices":[{"index":0,"delta":{'
        )
        self.content_head = self.prefix + b'"content":'
        self.reasoning_head = self.prefix + b'"reasoning_content":'
        self.tail = b'},"finish_reason":null}]' + (b',"usage":null' if include_usage else b"")
        self.tail += b"}\n\n"

    def role(self, content_null: bool) -> bytes:
        content = b"null" if content_null else b'""'
        return self.prefix + b'"role":"assistant","content":' + content + self.tail

    def delta(self, delta: dict[str, Any]) -> bytes:
        return self.prefix + orjson.dumps(delta)[1:-1] + self.tail

    def finish(self, reason: str) -> bytes:
        return self.prefix + b'},"finish_reason":"' + reason.encode() + b'"' + self.tail[22:]

    def usage(self, usage: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [], "usage": usage,
        }) + b"\n\n"


def tokens_batch(head: bytes, tail: bytes, tokens: Sequence[str]) -> Callable[[int, int], bytes]:
    """``batch(i, j)``: the chunks of ``tokens[i:j]``, one per token, in one bytes object."""
    dumps = orjson.dumps

    def batch(i: int, j: int) -> bytes:
        parts: list[bytes] = []
        append = parts.append
        for tok in tokens[i:j]:
            append(head)
            append(dumps(tok))
            append(tail)
        return b"".join(parts)

    return batch


def tool_frames(
    chunks: Chunks, calls: Sequence[tuple[str, str, str]], rng: random.Random
) -> list[bytes]:
    """OpenAI's sequence: per call, a header fragment (id, name) then argument pieces
    of 3-8 characters drawn from ``rng``."""
    frames = []
    for index, (call_id, name, args) in enumerate(calls):
        frames.append(chunks.delta({"tool_calls": [{
            "index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": ""}}]}))
        for piece in _fragments(args, rng):
            frames.append(chunks.delta({"tool_calls": [{
                "index": index, "function": {"arguments": piece}}]}))
    return frames


def _fragments(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        size = rng.randint(3, 8)
        out.append(text[i : i + size])
        i += size
    return out
