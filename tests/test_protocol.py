"""tokenrelay.protocol: uvicorn's httptools protocol, leaner, with a disconnect callback."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import orjson

from support.client import read_stream
from support.gateway import running_gateway
from support.servers import STREAMING_PROTOCOL, running_asgi
from tokenrelay.asgi import ON_DISCONNECT
from tokenrelay.protocol import chunk_cycle, write_chunk


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


async def test_write_chunk_writes_what_send_writes_and_leaves_the_rest_to_send():
    answers: dict[str, list[Any]] = {}
    gone, answered = asyncio.Event(), asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        cycle = chunk_cycle(send)
        got = answers.setdefault(scope["method"] + scope["path"], [cycle is not None])
        assert cycle is not None and chunk_cycle(lambda message: None) is None
        got.append(write_chunk(cycle, b"early"))  # before the start: only send can say
        await send({"type": "http.response.start", "status": 200, "headers": []})
        got.append(write_chunk(cycle, b"abc"))
        await send({"type": "http.response.body", "body": b"de", "more_body": True})
        cycle.flow.pause_writing()  # as the transport does when the client stops reading
        got.append(write_chunk(cycle, b"paused"))
        cycle.flow.resume_writing()
        if scope["path"] == "/leave":
            scope[ON_DISCONNECT].callbacks.append(gone.set)
            await gone.wait()
            got.append(write_chunk(cycle, b"after"))  # nothing written, as send does
            answered.set()
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        got.append(write_chunk(cycle, b"late"))  # the response ended: send raises

    async with running_asgi(app, http=STREAMING_PROTOCOL) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await request(port, get("/"))
        data = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert data.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")  # no body: only send knows
        assert b"transfer-encoding" not in await asyncio.wait_for(
            reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        reader, writer = await request(port, get("/leave"))
        await asyncio.wait_for(reader.readuntil(b"2\r\nde\r\n"), 5)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(answered.wait(), 5)
    assert answers["GET/"] == [True, False, True, False, False]
    assert answers["HEAD/"] == [True, False, False, False, False]
    assert answers["GET/leave"] == [True, False, True, False, True]


# -- bounded request heads, refusals that arrive (issue 16, point 3) ----------------------


async def _read_all(reader: asyncio.StreamReader, budget: float) -> bytes:
    """Everything until the server closes (EOF or reset), within ``budget`` seconds."""
    data = b""
    async with asyncio.timeout(budget):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


async def test_a_slow_head_is_cut_within_the_header_timeout_while_streams_flow(http):
    timeout = 1.0
    async with running_gateway(TOKENRELAY_HEADER_TIMEOUT_S=str(timeout),
                               TOKENRELAY_SIMULATOR_SPEED="1") as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "keep going"}],
                "sim": {"tokens": 400, "tokens_per_s": 50}}
        async with http.post(gw.base_url + "/api/chat", json=body) as stream:
            first = await read_stream(stream, stop_after=3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            slow, slow_w = await request(port, b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            silent, silent_w = await request(port, b"")
            cut = await _read_all(slow, timeout + 2)
            quiet = await _read_all(silent, timeout + 2)
            elapsed = loop.time() - started
            during = await read_stream(stream, stop_after=5)  # the stream still flows
            slow_w.close()
            silent_w.close()
        assert elapsed < timeout + 2
        assert cut.startswith(b"HTTP/1.1 408 "), cut
        head, _, payload = cut.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower()
        assert orjson.loads(payload)["error"]["code"] == "request_timeout"
        assert quiet == b""  # a connection that never sent a byte is just closed
        assert len(first.events) == 3 and len(during.events) == 5
        assert during.events[0].id == first.events[-1].id + 1


async def test_more_than_max_headers_is_a_431_json_error(http):
    async with running_gateway(TOKENRELAY_MAX_HEADERS="100") as gw:
        many = {f"X-H{i}": "v" for i in range(200)}
        async with http.get(gw.base_url + "/api/models", headers=many) as r:
            assert r.status == 431
            assert (await r.json())["error"]["code"] == "too_many_headers"
        # cut while parsing: the app never saw it, and a body behind it is not a reset
        port = int(gw.base_url.rsplit(":", 1)[1])
        head = b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(200)) + b"Content-Length: 3000000\r\n\r\n"
        reader, writer = await request(port, head)
        with contextlib.suppress(ConnectionError):
            for _ in range(30):
                writer.write(b"x" * 100_000)
                await writer.drain()
        answer = await _read_all(reader, 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == \
            "too_many_headers"
        fine = {f"X-H{i}": "v" for i in range(90)}  # with aiohttp's own, under 100
        async with http.get(gw.base_url + "/api/models", headers=fine) as r:
            assert r.status == 200


async def test_too_many_headers_under_plain_uvicorn_are_refused_by_the_middleware(http):
    async with running_gateway(server={"http": "httptools"}) as gw:
        async with http.get(gw.base_url + "/api/models",
                            headers={f"X-H{i}": "v" for i in range(150)}) as r:
            assert r.status == 431
            assert (await r.json())["error"]["code"] == "too_many_headers"


async def test_a_body_over_the_limit_gets_its_413_as_json_not_a_reset(http):
    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        url = gw.base_url + "/api/chat"
        ten_mb = b'{"messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}'
        for _ in range(5):  # a reset was intermittent
            async with http.post(url, data=ten_mb,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "body_too_large"

        async def chunked():
            for _ in range(100):
                yield b"x" * 100_000

        async with http.post(url, data=chunked(),
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"
        async with http.get(gw.base_url + "/healthz") as r:
            assert r.status == 200


async def test_a_body_nobody_reads_is_dropped_only_up_to_a_bound():
    # An early answer, then a body that never ends: the connection is closed once the
    # body's deadline passes, instead of reading (or holding) it forever.
    async with running_gateway(TOKENRELAY_DATABASE_URL="none",
                               TOKENRELAY_BODY_TIMEOUT_S="1") as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        reader, writer = await request(port, (
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n"))
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 413 ")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(ConnectionError):
            while loop.time() - started < 8:  # a trickle, as a slowloris would send
                writer.write(b"x" * 100)
                await writer.drain()
                if reader.at_eof():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(65536), 0.2)
        assert reader.at_eof()
        assert loop.time() - started < 1 + 2 + 1  # body deadline, linger, slack
        writer.close()


def test_the_uvicorn_internals_the_protocol_relies_on_are_still_there():
    """protocol.py overrides and reads private parts of uvicorn's httptools protocol; an
    upgrade of uvicorn that renames one must fail here, not silently stop a limit. (Each
    is also listed in tokenrelay/couplings.py; this test checks how uvicorn uses them.)"""
    import inspect

    from uvicorn.protocols.http import httptools_impl

    proto = httptools_impl.HttpToolsProtocol
    for name in ("on_message_begin", "on_header", "on_headers_complete", "on_body",
                 "on_message_complete", "on_response_complete", "send_400_response",
                 "data_received", "connection_made", "connection_lost"):
        assert callable(getattr(proto, name, None)), name
    init = inspect.getsource(proto.__init__)
    for attr in ("self.config", "self.loop", "self.headers", "self.cycle", "self.pipeline",
                 "self.transport", "self.flow"):
        assert attr in init, attr
    # a parser error (our on_header raising) is answered through send_400_response
    assert "send_400_response" in inspect.getsource(proto.data_received)
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle.__init__)
    for attr in ("self.more_body", "self.response_complete", "self.message_event"):
        assert attr in cycle, attr
    assert "loaded_app" in inspect.getsource(proto.__init__)
    assert "STATUS_LINE" in dir(httptools_impl)


async def test_a_malformed_request_gets_a_json_400():
    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        reader, writer = await request(port, (
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n"))
        answer = await _read_all(reader, 10)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head
    assert orjson.loads(body)["error"]["code"] == "invalid_http"


async def test_a_head_that_never_ends_is_refused_once_it_outgrows_the_buffer_bound():
    from tokenrelay.protocol import MAX_HEAD_BYTES

    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        reader, writer = await request(port, b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < 3 * MAX_HEAD_BYTES:
                writer.write(b"X-Long: " + b"a" * 8000 + b"\r\n")  # one endless head
                await writer.drain()
                sent += 8010
        answer = await _read_all(reader, 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert b'"headers_too_large"' in answer


# -- the head goes with the first body bytes (_HeadHold) -----------------------------------


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


class _Cycle:
    def __init__(self) -> None:
        self.response_started = False
        self.response_complete = False
        self.transport: Any = None


async def _queued_callbacks_ran() -> None:
    """Return once the loop has run every callback queued before this call (a loop runs
    its ready callbacks in order): the end of the turn a held head waits for."""
    loop = asyncio.get_running_loop()
    ran = loop.create_future()
    loop.call_soon(ran.set_result, None)
    await ran


def _held() -> tuple[_Transport, _Cycle, Any]:
    from tokenrelay.protocol import _HeadHold

    transport, cycle = _Transport(), _Cycle()
    cycle.transport = hold = _HeadHold(transport, cycle, asyncio.get_running_loop())
    return transport, cycle, hold


async def test_the_head_goes_out_with_the_first_body_bytes_in_one_write():
    transport, cycle, hold = _held()
    hold.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: passes at once
    cycle.response_started = True
    hold.write(b"HEAD")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    hold.write(b"BODY")
    assert transport.writes[1:] == [b"HEADBODY"]
    assert cycle.transport is transport  # its own transport back, for every later write
    assert hold.get_extra_info("peername") == "info:peername"  # the rest is the transport's
    await _queued_callbacks_ran()  # the end-of-turn flush was cancelled: nothing more
    assert len(transport.writes) == 2


async def test_a_head_with_no_body_in_its_turn_goes_out_alone_at_the_turns_end():
    transport, cycle, hold = _held()
    cycle.response_started = True
    hold.write(b"HEAD")
    assert transport.writes == []
    await _queued_callbacks_ran()
    assert transport.writes == [b"HEAD"] and cycle.transport is transport


async def test_a_held_head_is_written_before_a_close_and_never_to_a_closed_transport():
    transport, cycle, hold = _held()
    cycle.response_started = True
    hold.write(b"HEAD")
    hold.close()
    assert transport.writes == [b"HEAD"] and transport.closed
    transport, cycle, hold = _held()
    cycle.response_started = True
    hold.write(b"HEAD")
    transport.closed = True  # the client left meanwhile
    await _queued_callbacks_ran()
    assert transport.writes == []


async def test_expect_100_continue_is_answered_before_the_body_is_sent():
    # The interim response is the cycle's first write, before any head: never held.
    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        body = orjson.dumps({"model": "sim-fast", "stream": False,
                             "messages": [{"role": "user", "content": "hi"}]})
        reader, writer = await request(port, (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "content-type: application/json\r\nexpect: 100-continue\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.search(rb"content-length: (\d+)", head).group(1))
        answer = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        assert answer["choices"][0]["message"]["content"]
        writer.close()
