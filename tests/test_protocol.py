"""tokenrelay.protocol: uvicorn's httptools protocol, leaner, with a disconnect callback."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from support.gateway import running_gateway
from support.servers import STREAMING_PROTOCOL, running_asgi
from tokenrelay.protocol import ON_DISCONNECT


class Recorder:
    """An ASGI app that answers GET /done at once and streams GET /stream until told to
    stop, recording what the protocol gives it."""

    def __init__(self) -> None:
        self.fired: list[str] = []
        self.hooks: dict[str, Any] = {}
        self.waiters: list[type] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.left = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        hook = scope.get(ON_DISCONNECT)
        self.hooks[path] = hook
        if hook is not None:
            hook.callbacks.append(lambda: (self.fired.append(path), self.left.set()))
        cycle = getattr(receive, "__self__", None)  # uvicorn's request cycle
        if cycle is not None:
            self.waiters.append(type(cycle.message_event._waiters))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        if path == "/stream":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            self.started.set()
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": path.encode()})


async def request(port: int, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    return reader, writer


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_a_client_leaving_mid_response_runs_the_callbacks_and_a_finished_one_does_not():
    app = Recorder()
    async with running_asgi(app, http=STREAMING_PROTOCOL) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await request(port, get("/done"))
        assert (await reader.readuntil(b"/done")).endswith(b"/done")
        writer.close()  # after its response ended: nothing to report
        await writer.wait_closed()
        reader, writer = await request(port, get("/stream"))
        await asyncio.wait_for(app.started.wait(), 5)
        writer.close()  # mid-response
        await writer.wait_closed()
        await asyncio.wait_for(app.left.wait(), 5)
        assert app.hooks["/stream"].gone
        app.release.set()
    assert app.fired == ["/stream"]
    assert not app.hooks["/done"].gone
    # The request cycle's event keeps its waiters in a list, not a ~0.8 KB deque.
    assert app.waiters == [list, list]


async def test_pipelined_requests_are_still_answered_in_order():
    app = Recorder()
    async with running_asgi(app, http=STREAMING_PROTOCOL) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await request(port, get("/a") + get("/b") + get("/c"))
        data = b""
        while data.count(b"\r\n0\r\n\r\n") < 3:  # three chunked bodies ended
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            assert chunk, data
            data += chunk
        writer.close()
        await writer.wait_closed()
    assert re.findall(rb"\r\n\r\n2\r\n(/[abc])\r\n0\r\n", data) == [b"/a", b"/b", b"/c"]


async def test_an_upgrade_request_is_answered_as_plain_uvicorn_answers_it():
    # A websocket handshake makes no request cycle; the protocol must leave it to uvicorn.
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status = {}
    for http_protocol in (STREAMING_PROTOCOL, "httptools"):
        async with running_gateway(server={"http": http_protocol}) as gw:
            reader, writer = await request(int(gw.base_url.rsplit(":", 1)[1]), upgrade)
            status[http_protocol] = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            await writer.wait_closed()
    assert status[STREAMING_PROTOCOL] == status["httptools"]
    assert status["httptools"].startswith(b"HTTP/1.1 403")
