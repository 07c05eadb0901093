"""Reading our SSE responses in tests, with the package's own spec-following decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tokenrelay.sse import SSEDecoder


@dataclass
class Event:
    """One SSE event as a client sees it."""

    id: int | None
    event: str
    data: dict[str, Any]


@dataclass
class Stream:
    """What a client read: events, comments seen, raw bytes."""

    events: list[Event] = field(default_factory=list)
    raw: bytes = b""

    @property
    def text(self) -> str:
        return "".join(e.data["content"] for e in self.events if e.event == "message")

    @property
    def reasoning(self) -> str:
        return "".join(e.data["reasoning"] for e in self.events if e.event == "reasoning")

    @property
    def terminal(self) -> list[Event]:
        return [e for e in self.events if e.event in ("done", "error")]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.event == name]

    @property
    def last_id(self) -> int:
        ids = [e.id for e in self.events if e.id is not None]
        return ids[-1] if ids else 0


async def read_stream(
    resp: aiohttp.ClientResponse, *, stop_after: int | None = None
) -> Stream:
    """Read SSE events until the terminal event, EOF, or ``stop_after`` events."""
    decoder = SSEDecoder()
    out = Stream()
    async for chunk in resp.content.iter_any():
        out.raw += chunk
        for sse in decoder.decode(chunk):
            ident = int(sse.id) if sse.id else None
            out.events.append(Event(ident, sse.event, orjson.loads(sse.data)))
            if sse.event in ("done", "error"):
                return out
            if stop_after is not None and len(out.events) >= stop_after:
                return out
    return out


def chat_body(content: str = "Tell me about SSE", model: str = "sim-chat", **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
