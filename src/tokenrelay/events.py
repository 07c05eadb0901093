"""Normalized stream events and their SSE wire encoding.

Upstream adapters turn provider chunks into the small event objects below (one object per
*read*, not per token: consecutive text deltas of one read are merged). The generation turns
them into SSE frames once, with their sequence number; journals store those frames as bytes
and subscribers write them unchanged. That makes the per-token path a JSON encode and one
bytes format, and lets any number of subscribers share the same bytes.

Wire format (LF line ends only, one ``data:`` line of JSON per event, U+2028/U+2029 escaped):

    id: 7\\ndata: {"content":"Hel"}\\n\\n              text delta (unnamed, the article's format)
    id: 1\\nevent: start\\ndata: {...}\\n\\n            named events carry no "content" key
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# Event names of the browser protocol (DESIGN.md). Text deltas are unnamed.
START = "start"
REASONING = "reasoning"
TOOL_CALL = "tool_call"
RETRY = "retry"
DONE = "done"
ERROR = "error"
CONTINUED = "continued"  # a cut answer goes on from another request (issue 15)

# Final states of an answer.
STREAMING = "streaming"
COMPLETE = "complete"
CANCELLED = "cancelled"
FAILED = "error"
INTERRUPTED = "interrupted"


@dataclass(slots=True)
class TextDelta:
    """Answer text."""

    text: str


@dataclass(slots=True)
class ReasoningDelta:
    """Reasoning-model thoughts (``reasoning_content``, ``reasoning`` or ``<think>``)."""

    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a tool call; the first fragment of an index carries id and name."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(slots=True)
class Usage:
    """Token usage as reported by the provider."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(slots=True)
class Finish:
    """The provider's finish reason for the (first) choice."""

    reason: str


Event = TextDelta | ReasoningDelta | ToolCallDelta | Usage | Finish

_LS = "\u2028".encode()
_PS = "\u2029".encode()
_LS_PS_PREFIX = _LS[:2]  # both are E2 80 A8/A9 in UTF-8
_OPT = orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    """JSON-encode for an SSE ``data:`` line: compact, and U+2028/U+2029 escaped.

    orjson never emits raw CR or LF (they are escaped inside strings), so the result is
    always exactly one line.
    """
    data = orjson.dumps(obj, option=_OPT)
    # find(), not "in": bytes "in" first tries the operand as an int and formats a
    # TypeError, which costs more than the search (~2,000 instructions a call).
    if data.find(_LS_PS_PREFIX) >= 0:
        data = data.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return data


def text_frame(seq: int, text: str) -> bytes:
    """The hot path: one unnamed text event (``dumps`` inlined; an ASCII text holds no
    U+2028/U+2029, which saves the search)."""
    data = orjson.dumps(text)
    if not text.isascii() and data.find(_LS_PS_PREFIX) >= 0:
        data = data.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return b"id: %d\ndata: {\"content\":%b}\n\n" % (seq, data)


def frame(seq: int, name: str | None, data: bytes) -> bytes:
    """An SSE event with id, optional name and one line of (already encoded) JSON data."""
    if name is None:
        return b"id: %d\ndata: %s\n\n" % (seq, data)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode("ascii"), data)


def parse_frame(raw: bytes) -> tuple[int, str | None, bytes]:
    """Split one of *our own* frames into (seq, event name or None, JSON data).

    Only for frames produced by :func:`frame`/:func:`text_frame`; foreign SSE goes through
    :mod:`tokenrelay.sse`.
    """
    head, _, rest = raw.partition(b"\n")
    seq = int(head[4:])
    name: str | None = None
    if rest.startswith(b"event: "):
        line, _, rest = rest.partition(b"\n")
        name = line[7:].decode("ascii")
    return seq, name, rest[6:].rstrip(b"\n")


HEARTBEAT = b": heartbeat\n\n"
