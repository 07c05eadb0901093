"""Reading an OpenAI-style chat stream (``data: {json}`` blocks ending in ``data: [DONE]``)
as the upstreams of the tests send it: the simulator and the fault upstream."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson


def events_of(raw: bytes) -> list[Any]:
    """The complete events of ``raw``: JSON objects, ``"[DONE]"`` as a string, and
    ``("corrupt", text)`` for a data line the JSON parser rejects."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        if data == "[DONE]":
            out.append(data)
            continue
        try:
            out.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            out.append(("corrupt", data))
    return out


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[Any]:
    """Read until ``n`` complete events arrived, leaving the response open."""
    buf = b""
    while buf.count(b"\n\n") < n:
        chunk = await resp.content.readany()
        assert chunk, "stream ended early"
        buf += chunk
    return events_of(buf[: buf.rindex(b"\n\n") + 2])
