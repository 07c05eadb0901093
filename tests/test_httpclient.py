"""The gateway's own HTTP/1.1 client (``tokenrelay.httpclient``) against scripted servers.

Every server here is a real asyncio server on 127.0.0.1: it reads each request (head and
Content-Length body), records it, and answers with raw bytes written by the test's
handler. Tests synchronise on the server's events (a connection accepted, a request read,
the client's EOF seen), never on sleeps, and every test is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import re
import shutil
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tokenrelay.httpclient import (
    BadResponse,
    ConnectFailed,
    Disconnected,
    Origin,
    Pool,
    Proxy,
    ProxyRefused,
    Response,
    encode_head,
)

WAIT = 5.0  # bound of every test: a bug fails fast instead of hanging
BODY = b'{"model": "m1", "stream": true}'

CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sized(body: bytes, status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    """A response with a Content-Length body; ``headers`` are extra raw header lines."""
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, headers, len(body), body)


# -- a scripted loopback server -------------------------------------------------------------


@dataclass
class Request:
    number: int  # order of arrival at the server, over all connections
    conn: int  # index of the connection it came on
    head: bytes  # request line and header lines, with the blank line
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


def replying(raw: bytes) -> Handler:
    """A handler answering every request with the same bytes."""

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return handler


class Upstream:
    """``async with Upstream(handler) as server``: HTTP/1.1 on 127.0.0.1, any free port.

    Per connection it reads requests one after another and awaits ``handler(request,
    writer)`` for each; a handler that closes the writer ends the connection. With
    ``handler=None`` the server is mute: it accepts, reads until EOF and never answers.
    Counters (``connections``, ``requests``) and awaitable events (``connected(i)``,
    ``request(i)``, ``eof(i)``: the client closed connection ``i``) let tests follow it.
    """

    def __init__(self, handler: Handler | None, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._events: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        if exc_info[0] is None:
            assert not self.errors, f"the server's handler failed: {self.errors!r}"

    def url(self, scheme: str | None = None) -> str:
        scheme = scheme or ("https" if self.tls else "http")
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    @property
    def origin(self) -> Origin:
        return Origin.parse(self.url())

    def _event(self, kind: str, index: int) -> asyncio.Future[Any]:
        future = self._events.get((kind, index))
        if future is None:
            future = self._events[(kind, index)] = asyncio.get_running_loop().create_future()
        return future

    def _set(self, kind: str, index: int, value: Any = None) -> None:
        future = self._event(kind, index)
        if not future.done():
            future.set_result(value)

    async def connected(self, index: int) -> None:
        await self._event("connected", index)

    async def request(self, index: int) -> Request:
        return await self._event("request", index)  # type: ignore[no-any-return]

    async def eof(self, index: int) -> None:
        """Until the client has closed connection ``index`` (the server read EOF)."""
        await self._event("eof", index)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.connections
        self.connections += 1
        self._set("connected", index)
        try:
            while True:
                try:
                    if self.handler is None:
                        if not await reader.read(1 << 16):
                            raise asyncio.IncompleteReadError(b"", None)
                        continue
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                    body = await reader.readexactly(int(length[1]) if length else 0)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self._set("eof", index)
                    return
                request = Request(len(self.requests), index, head, body)
                self.requests.append(request)
                self._set("request", request.number, request)
                await self.handler(request, writer)
                if writer.is_closing():
                    return
        except asyncio.CancelledError:
            # Cancelled by __aexit__ only. Finishing normally keeps Python 3.11's
            # start_server done-callback from logging the cancelled task as an error.
            return
        except Exception as exc:  # reported by __aexit__
            self.errors.append(exc)
        finally:
            writer.close()
            self._tasks.discard(task)


# -- client helpers -------------------------------------------------------------------------


@asynccontextmanager
async def open_pool(**options: Any) -> AsyncIterator[Pool]:
    pool = Pool(**options)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with open_pool() as p:
        yield p


async def send(pool: Pool, server: Upstream, body: bytes = BODY,
               connect_timeout: float = 2.0) -> Response:
    origin = server.origin
    head = encode_head("POST", origin, "/chat/completions", {"Content-Type": "application/json"})
    return await pool.request(origin, head, body, connect_timeout=connect_timeout)


async def send_to(pool: Pool, origin: Origin, body: bytes = BODY) -> Response:
    head = encode_head("POST", origin, "/chat/completions", {"Content-Type": "application/json"})
    return await pool.request(origin, head, body, connect_timeout=2.0)


async def ask_ok(pool: Pool, server: Upstream) -> None:
    """One request whose body must be b"ok", read to the end and released."""
    resp = await send(pool, server)
    assert await read_body(resp) == b"ok"
    resp.release()


async def read_body(resp: Response) -> bytes:
    out = bytearray()
    while data := await resp.read():
        out += data
    return bytes(out)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key, made by the openssl CLI."""
    if shutil.which("openssl") is None:  # scripts/system-deps.sh installs it (make test)
        pytest.fail("the openssl command is not installed: run scripts/system-deps.sh")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    return context


# -- bodies and framing ---------------------------------------------------------------------


async def test_chunked_body_is_read_piece_by_piece(pool: Pool) -> None:
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED)
        while (piece := await pieces.get()) is not None:
            writer.write(chunk(piece))  # one write per piece: the test has read the last
        writer.write(LAST_CHUNK)

    sent = [b'data: {"a": 1}\n\n', b"data: two\n\n", b"x" * 3000]
    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert resp.status == 200
        got = []
        for piece in sent:
            pieces.put_nowait(piece)
            got.append(await resp.read())
        assert got == sent
        pieces.put_nowait(None)
        assert await resp.read() == b""
        assert await resp.read() == b""  # the end stays the end
        resp.release()

        seen = server.requests[0]
        assert seen.head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert seen.header("Host") == f"127.0.0.1:{server.port}"
        assert seen.header("Content-Type") == "application/json"
        assert seen.header("Content-Length") == str(len(BODY))
        assert seen.body == BODY


async def test_sized_body_status_and_kept_headers(pool: Pool) -> None:
    raw = sized(b'{"error": "slow down"}', b"429 Too Many Requests",
                b"CONTENT-TYPE: application/json\r\nRetry-After: 3\r\nX-Request-Id: abc\r\n")
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        resp = await send(pool, server)
        assert resp.status == 429
        # Only the headers the gateway reads are kept, under lower-case names.
        assert resp.headers == {"content-type": "application/json", "retry-after": "3"}
        assert await read_body(resp) == b'{"error": "slow down"}'
        resp.release()


async def test_read_all_stops_at_the_limit(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(sized(b"0123456789"))) as server:
        resp = await send(pool, server)
        assert await resp.read_all(4) == b"0123"
        resp.close()


async def test_body_delimited_by_close_ends_at_eof(pool: Pool) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(b"part one, ")
        await writer.drain()
        writer.write(b"part two")
        writer.close()  # no length, not chunked: the close ends the body

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert resp.status == 200
        assert await read_body(resp) == b"part one, part two"
        assert await resp.read() == b""
        resp.release()
        resp2 = await send(pool, server)  # nothing to reuse: a new connection
        assert await read_body(resp2) == b"part one, part two"
        resp2.release()
        assert (server.connections, pool.connects) == (2, 2)


async def test_204_without_length_ends_at_once_and_keeps_the_connection(pool: Pool) -> None:
    raw = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        for _ in range(2):
            resp = await send(pool, server)
            assert resp.status == 204
            assert await resp.read() == b""
            resp.release()
        assert (server.connections, len(server.requests), pool.connects) == (1, 2, 1)


def raw_deflate(data: bytes) -> bytes:
    """RFC 1951 deflate without the zlib wrapper: what some servers send as "deflate"."""
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
     ("deflate", raw_deflate)],
)
async def test_compressed_body_is_decoded(pool: Pool, encoding: str, compress: Any) -> None:
    plain = b"".join(b"data: {\"token\": %d}\n\n" % i for i in range(500))
    packed = compress(plain)
    third = len(packed) // 3

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % encoding.encode())
        for piece in (packed[:third], packed[third:2 * third], packed[2 * third:]):
            writer.write(chunk(piece))
            await writer.drain()
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert resp.headers["content-encoding"] == encoding
        assert await read_body(resp) == plain
        resp.release()


@pytest.mark.parametrize("compress", [zlib.compress, raw_deflate], ids=["zlib", "raw"])
async def test_deflate_sent_one_byte_per_chunk_is_decoded(pool: Pool, compress: Any) -> None:
    plain = b"data: {\"token\": 1}\n\n" * 50
    packed = compress(plain)

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(len(packed)):  # the two header bytes arrive apart
            writer.write(chunk(packed[i:i + 1]))
            await writer.drain()
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert await read_body(resp) == plain
        resp.release()


# -- keep-alive and the pool ----------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(pool: Pool) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED + chunk(b"answer %d" % request.number) + LAST_CHUNK)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        for number in range(2):
            resp = await send(pool, server)
            assert await read_body(resp) == b"answer %d" % number
            resp.release()
        assert server.connections == 1
        assert [r.conn for r in server.requests] == [0, 0]
        assert pool.connects == 1


async def test_connection_close_response_is_not_reused(pool: Pool) -> None:
    # The server keeps the socket open: the client must drop it on its own.
    raw = sized(b"bye", headers=b"Connection: close\r\n")
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        resp = await send(pool, server)
        assert await read_body(resp) == b"bye"
        resp.release()
        await server.eof(0)
        resp2 = await send(pool, server)
        assert await read_body(resp2) == b"bye"
        resp2.release()
        assert [r.conn for r in server.requests] == [0, 1]
        assert pool.connects == 2


async def test_release_with_unread_body_closes_the_connection(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(sized(b"x" * 10))) as server:
        resp = await send(pool, server)
        resp.release()  # nothing read: the connection cannot carry another request
        await server.eof(0)
        resp2 = await send(pool, server)
        assert await read_body(resp2) == b"x" * 10
        resp2.release()
        assert (server.connections, pool.connects) == (2, 2)


async def test_bytes_arriving_on_an_idle_connection_close_it(pool: Pool) -> None:
    released = asyncio.get_running_loop().create_future()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(sized(b"ok"))
        if request.number == 0:
            await released
            writer.write(sized(b"unasked"))  # nothing was asked: the client drops it

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        await ask_ok(pool, server)
        released.set_result(None)
        await server.eof(0)
        await ask_ok(pool, server)
        assert (server.connections, pool.connects) == (2, 2)


async def test_idle_connection_expires_after_keepalive() -> None:
    async with asyncio.timeout(WAIT), open_pool(keepalive_s=0.05) as pool, \
            Upstream(replying(sized(b"ok"))) as server:
        await ask_ok(pool, server)
        await server.eof(0)  # the pool closed it once idle for keepalive_s
        await ask_ok(pool, server)
        assert (server.connections, pool.connects) == (2, 2)


async def test_max_idle_per_origin_closes_the_surplus() -> None:
    async with asyncio.timeout(WAIT), open_pool(max_idle_per_origin=1) as pool, \
            Upstream(replying(sized(b"ok"))) as server:
        first, second = await asyncio.gather(send(pool, server, b"a"), send(pool, server, b"b"))
        assert pool.connects == 2
        for resp in (first, second):
            assert await read_body(resp) == b"ok"
            resp.release()
        conn_of = {r.body: r.conn for r in server.requests}
        await server.eof(conn_of[b"b"])  # released when the one idle slot was taken
        resp = await send(pool, server, b"c")
        resp.release()
        assert server.requests[-1].conn == conn_of[b"a"]
        assert pool.connects == 2


async def test_aclose_closes_idle_connections() -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(sized(b"ok"))) as server:
        pool = Pool()
        await ask_ok(pool, server)
        await pool.aclose()
        await server.eof(0)


async def test_response_released_after_aclose_is_closed() -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(sized(b"ok"))) as server:
        pool = Pool()
        resp = await send(pool, server)
        await pool.aclose()
        assert await read_body(resp) == b"ok"
        resp.release()  # the pool is closed: nothing is kept
        await server.eof(0)


# -- stale connections and disconnects ------------------------------------------------------


async def test_reused_connection_closed_after_reading_the_request_is_not_resent(
        pool: Pool) -> None:
    # The server read the request, then closed: it may have started (and billed) the
    # answer, so the client must not send it again on its own (issue 15).
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.number == 0:
            writer.write(sized(b"ok"))
        else:
            writer.close()

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        await ask_ok(pool, server)
        with pytest.raises(Disconnected) as caught:
            await send(pool, server)
        assert caught.value.mid_body is False
        assert [r.conn for r in server.requests] == [0, 0]
        assert pool.connects == 1


async def test_an_idempotent_request_closed_before_any_answer_is_sent_once_more(
        pool: Pool) -> None:
    # A GET (the model list) may be sent again, as HTTP allows: once, on a new connection.
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.number in (1, 3):
            writer.close()
        else:
            writer.write(sized(b"ok"))

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        await ask_ok(pool, server)
        origin = server.origin
        head = encode_head("GET", origin, "/models", {})
        resp = await pool.request(origin, head, b"", connect_timeout=2, idempotent=True)
        assert await read_body(resp) == b"ok"
        resp.close()
        # On a new connection it is not sent again: one request, one error.
        with pytest.raises(Disconnected):
            await pool.request(origin, head, b"", connect_timeout=2, idempotent=True)
        assert [r.conn for r in server.requests] == [0, 0, 1, 2]


async def test_idle_connection_closed_by_the_server_is_replaced_before_writing(
        pool: Pool) -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(sized(b"ok"))
        if request.number == 0:
            await writer.drain()
            writer.close()  # a server's keep-alive timeout, while the connection sits idle
            await writer.wait_closed()
            closed.set_result(None)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        await ask_ok(pool, server)
        await closed
        await ask_ok(pool, server)
        assert [r.conn for r in server.requests] == [0, 1]  # sent once, on a new one
        assert pool.connects == 2


async def test_idle_connection_whose_eof_the_loop_has_not_handled_is_replaced(
        pool: Pool) -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(sized(b"ok"))
        if request.number == 0:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            closed.set_result(None)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert await read_body(resp) == b"ok"
        resp.release()
        assert resp.transport is not None
        # Not reading: the FIN waits in the socket, unseen by the loop (as when it arrives
        # just before the next request); only the poll of the idle socket can find it.
        resp.transport.pause_reading()
        await closed
        await ask_ok(pool, server)
        assert [r.conn for r in server.requests] == [0, 1]
        assert pool.connects == 2
        assert resp.closed


async def test_reused_connection_closed_after_a_partial_answer_is_not_resent(pool: Pool) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.number == 0:
            writer.write(sized(b"ok"))
        else:
            writer.write(b"HTTP/1.1 20")  # the server did read this request
            writer.close()

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        await ask_ok(pool, server)
        with pytest.raises(Disconnected) as caught:
            await send(pool, server)
        assert caught.value.mid_body is False
        assert (len(server.requests), server.connections, pool.connects) == (2, 1, 1)


async def test_fresh_connection_closed_before_answering_is_not_resent(pool: Pool) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        with pytest.raises(Disconnected) as caught:
            await send(pool, server)
        assert caught.value.mid_body is False
        assert (len(server.requests), server.connections, pool.connects) == (1, 1, 1)


@pytest.mark.parametrize(
    ("raw", "before"),
    [
        # Two whole chunks, then two bytes of a third announced as five.
        (CHUNKED + chunk(b"hello") + chunk(b"world") + b"5\r\nwo", b"helloworldwo"),
        # Content-Length promises ten bytes more than are sent.
        (sized(b"helloworld" + b"!" * 10)[:-10], b"helloworld"),
    ],
    ids=["chunked", "sized"],
)
async def test_close_in_the_middle_of_the_body(pool: Pool, raw: bytes, before: bytes) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        writer.close()

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        received = bytearray()
        with pytest.raises(Disconnected) as caught:
            while True:
                received += await resp.read()
        assert caught.value.mid_body is True
        assert bytes(received) == before  # all that came before the close
        with pytest.raises(Disconnected):
            await resp.read()  # the failure stays
        resp.close()


# -- stream(): the body handed to a callback ------------------------------------------------


async def test_stream_hands_the_body_to_the_callback_then_read_sees_the_end(pool: Pool) -> None:
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED + chunk(b"first"))
        while (piece := await pieces.get()) is not None:
            writer.write(chunk(piece))
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert await resp.read() == b"first"  # pulled, then switched to the callback
        got: list[bytes] = []
        arrived: asyncio.Queue[None] = asyncio.Queue()

        def on_data(data: bytes) -> None:
            got.append(data)
            arrived.put_nowait(None)

        resp.stream(on_data)
        end = asyncio.ensure_future(resp.read())  # waits for the end of the body only
        for piece in (b"two", b"three"):
            pieces.put_nowait(piece)
            await arrived.get()
        assert got == [b"two", b"three"] and not end.done()
        pieces.put_nowait(None)
        assert await end == b""
        resp.release()
        await send(pool, server)  # the connection went back to the pool
        assert server.connections == 1


async def test_stream_hands_over_each_read_at_once_its_chunks_joined(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(CHUNKED + chunk(b"a"))) as server:
        resp = await send(pool, server)
        assert await resp.read() == b"a"
        got: list[bytes] = []
        resp.stream(got.append)
        resp.data_received(chunk(b"b") + chunk(b"c"))  # two chunks in one read: one call,
        assert got == [b"bc"]  # made before data_received returns (no loop callback)
        resp.data_received(chunk(b"d"))
        assert got == [b"bc", b"d"]
        resp.close()


def gated(first: bytes) -> tuple[Handler, asyncio.Queue[bytes | None]]:
    """A handler writing ``first``, then each queued raw piece when the test queues it;
    None closes the connection (no terminating chunk)."""
    gate: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        while (raw := await gate.get()) is not None:
            writer.write(raw)
        writer.close()

    return handler, gate


async def test_stream_failure_comes_after_the_data_before_it(pool: Pool) -> None:
    handler, gate = gated(CHUNKED + chunk(b"a"))
    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        got: list[bytes] = []
        assert await resp.read() == b"a"
        resp.stream(got.append)
        gate.put_nowait(chunk(b"last words"))
        gate.put_nowait(None)  # closed without the terminating chunk
        with pytest.raises(Disconnected) as caught:
            await resp.read()
        assert caught.value.mid_body is True
        assert b"".join(got) == b"last words"


async def test_stream_callback_that_closes_stops_the_body(pool: Pool) -> None:
    """The relay's contract: a failing callback keeps its error and calls close(); nothing
    more reaches it and the pending read() raises."""
    handler, gate = gated(CHUNKED + chunk(b"a"))
    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        resp = await send(pool, server)
        assert await resp.read() == b"a"
        got: list[bytes] = []

        def on_data(data: bytes) -> None:
            got.append(data)
            resp.close()
            resp.data_received(chunk(b"late"))  # what a socket could still deliver

        resp.stream(on_data)
        gate.put_nowait(chunk(b"b"))
        with pytest.raises(Disconnected):
            await resp.read()
        await asyncio.sleep(0)  # a handover scheduled by the late bytes would run now
        assert got == [b"b"]
        assert resp.closed
        gate.put_nowait(None)


async def test_stream_refuses_while_read_has_pieces_waiting(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(CHUNKED)) as server:
        resp = await send(pool, server)
        resp.data_received(chunk(b"x"))  # arrived, not read
        with pytest.raises(RuntimeError):
            resp.stream(lambda data: None)
        assert await resp.read() == b"x"
        resp.close()


async def test_close_wakes_a_pending_read(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(CHUNKED + chunk(b"partial"))) as server:
        resp = await send(pool, server)
        assert await resp.read() == b"partial"
        asyncio.get_running_loop().call_soon(resp.close)  # runs once read() below waits
        with pytest.raises(Disconnected) as caught:
            await resp.read()
        assert caught.value.mid_body is True
        await server.eof(0)


async def test_cancelled_request_closes_its_connection(pool: Pool) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        if request.number > 0:  # the first request is never answered
            writer.write(sized(b"ok"))

    async with asyncio.timeout(WAIT), Upstream(handler) as server:
        task = asyncio.create_task(send(pool, server))
        await server.request(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.eof(0)
        resp = await send(pool, server)  # nothing was pooled: a new connection
        assert await read_body(resp) == b"ok"
        resp.release()
        assert [r.conn for r in server.requests] == [0, 1]
        assert pool.connects == 2


# -- bad responses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-length"],
)
async def test_malformed_head_is_bad_response(pool: Pool, raw: bytes) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        with pytest.raises(BadResponse):
            await send(pool, server)
        await server.eof(0)  # the connection is dropped


async def test_malformed_chunk_is_bad_response_on_read(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(CHUNKED + b"zz\r\nhello\r\n")) as server:
        resp = await send(pool, server)
        assert resp.status == 200
        with pytest.raises(BadResponse):
            await read_body(resp)
        resp.close()
        await server.eof(0)


async def test_unsupported_encoding_is_bad_response(pool: Pool) -> None:
    raw = sized(b"\x0b\x02\x80hi\x03", headers=b"Content-Encoding: br\r\n")
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        with pytest.raises(BadResponse):
            await send(pool, server)


async def test_unsupported_encoding_error_names_the_encoding(pool: Pool) -> None:
    raw = sized(b"\x0b\x02\x80hi\x03", headers=b"Content-Encoding: br\r\n")
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        with pytest.raises(BadResponse, match=r"unsupported encoding \(br\)"):
            await send(pool, server)


async def test_corrupt_gzip_body_is_bad_response_on_read(pool: Pool) -> None:
    raw = sized(b"this is not gzip data", headers=b"Content-Encoding: gzip\r\n")
    async with asyncio.timeout(WAIT), Upstream(replying(raw)) as server:
        resp = await send(pool, server)
        with pytest.raises(BadResponse):
            await read_body(resp)
        resp.close()


# -- connecting -----------------------------------------------------------------------------


async def test_connection_refused_is_connect_failed(pool: Pool, refused_port: int) -> None:
    origin = Origin.parse(f"http://127.0.0.1:{refused_port}/v1")
    head = encode_head("GET", origin, "/models", {})
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await pool.request(origin, head, b"", connect_timeout=2.0)
    assert pool.connects == 0


async def test_tls_handshake_timeout_fails_in_time_and_closes_the_socket(pool: Pool) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT), Upstream(None) as server:  # TCP accepted, TLS never
        origin = Origin.parse(server.url("https"))
        start = loop.time()
        with pytest.raises(ConnectFailed):
            await pool.request(origin, encode_head("GET", origin, "/models", {}), b"",
                               connect_timeout=0.3)
        assert 0.25 <= loop.time() - start < 2.0
        await server.eof(0)
        assert pool.connects == 0


async def test_connect_timeout_is_connect_failed_naming_the_budget(pool: Pool) -> None:
    async with asyncio.timeout(WAIT), Upstream(None) as server:
        origin = Origin.parse(server.url("https"))
        with pytest.raises(ConnectFailed, match=r"no connection within 0.3 s"):
            await pool.request(origin, encode_head("GET", origin, "/models", {}), b"",
                               connect_timeout=0.3)


async def test_tls_request_with_a_trusted_certificate(tls_files: tuple[Path, Path]) -> None:
    client_tls = ssl.create_default_context(cafile=str(tls_files[0]))
    async with asyncio.timeout(WAIT), open_pool(ssl_context=client_tls) as pool, \
            Upstream(replying(sized(b"secure")), tls=server_tls(tls_files)) as server:
        assert server.url().startswith("https://")
        resp = await send(pool, server)
        assert resp.status == 200
        assert await read_body(resp) == b"secure"
        resp.release()
        assert server.requests[0].body == BODY
        assert server.requests[0].header("Host") == f"127.0.0.1:{server.port}"


async def test_tls_connection_is_kept_alive(tls_files: tuple[Path, Path]) -> None:
    client_tls = ssl.create_default_context(cafile=str(tls_files[0]))
    async with asyncio.timeout(WAIT), open_pool(ssl_context=client_tls) as pool, \
            Upstream(replying(sized(b"secure")), tls=server_tls(tls_files)) as server:
        for _ in range(2):
            resp = await send(pool, server)
            assert await read_body(resp) == b"secure"
            resp.release()
        assert (server.connections, len(server.requests), pool.connects) == (1, 2, 1)


async def test_tls_untrusted_certificate_is_connect_failed(
    pool: Pool, tls_files: tuple[Path, Path]
) -> None:
    async with asyncio.timeout(WAIT), \
            Upstream(replying(sized(b"secure")), tls=server_tls(tls_files)) as server:
        with pytest.raises(ConnectFailed, match="certificate"):
            await send(pool, server)  # the default context does not trust a self-signed cert
        assert server.requests == []
        assert pool.connects == 0


# -- proxies (a scripted proxy here; tests/test_proxy.py runs a real one) --------------------


@pytest.mark.parametrize(("answer", "retryable"), [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", True),
])
async def test_connect_refused_by_the_proxy_names_it_and_the_status(
    pool: Pool, answer: bytes, retryable: bool
) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(answer)) as proxy:
        origin = Origin.parse("https://api.example.com/v1",
                              f"http://me:secret-pw@127.0.0.1:{proxy.port}")
        with pytest.raises(ProxyRefused) as info:
            await pool.request(origin, encode_head("GET", origin, "/models", {}), b"",
                               connect_timeout=2.0)
        seen = proxy.requests[0]
        assert seen.head.startswith(b"CONNECT api.example.com:443 HTTP/1.1\r\n")
        assert seen.header("Proxy-Authorization") == "Basic bWU6c2VjcmV0LXB3"  # me:secret-pw
    message = str(info.value)
    assert message.startswith(f"proxy http://me:***@127.0.0.1:{proxy.port} refused to open "
                              "a tunnel to api.example.com:443 (HTTP ")
    assert "secret-pw" not in message
    assert info.value.retryable is retryable
    assert pool.connects == 0


async def test_plain_http_through_a_proxy_is_absolute_form_on_the_proxy_connection(
    pool: Pool
) -> None:
    async with asyncio.timeout(WAIT), Upstream(replying(sized(b"ok"))) as proxy:
        origin = Origin.parse("http://api.example.com:8080/v1", f"127.0.0.1:{proxy.port}")
        for _ in range(2):
            resp = await send_to(pool, origin)
            assert await read_body(resp) == b"ok"
            resp.release()
        assert [r.head.split(b"\r\n")[0] for r in proxy.requests] == [
            b"POST http://api.example.com:8080/v1/chat/completions HTTP/1.1"] * 2
        assert proxy.requests[0].header("Host") == "api.example.com:8080"
        assert proxy.requests[0].header("Proxy-Authorization") is None
        assert (proxy.connections, pool.connects) == (1, 1)  # kept alive, keyed by proxy


def test_proxy_parse_decodes_credentials_and_hides_the_password() -> None:
    proxy = Proxy.parse("http://us%20er:p%40ss@proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.display) == (
        "proxy.corp", 3128, "http://us%20er:***@proxy.corp:3128")
    assert proxy.authorization == "Basic dXMgZXI6cEBzcw=="  # "us er:p@ss"
    assert "p%40ss" not in repr(proxy) and "dXMg" not in repr(proxy)
    assert Origin.parse("https://a/v1", "http://p:1") != Origin.parse("https://a/v1")


# -- flow control ---------------------------------------------------------------------------


async def test_large_body_read_slowly_arrives_intact(pool: Pool) -> None:
    big = random.Random(7).randbytes(4 << 20)
    piece = 1 << 16

    async def handler(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED)
        for offset in range(0, len(big), piece):
            writer.write(chunk(big[offset:offset + piece]))
            await writer.drain()
        writer.write(LAST_CHUNK)

    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT * 2), Upstream(handler) as server:
        resp = await send(pool, server)
        # Watch the client's transport (asyncio's, not the code under test).
        transport = resp.transport
        assert transport is not None
        paused = loop.create_future()
        resumes = 0
        pause, resume = transport.pause_reading, transport.resume_reading

        def watch_pause() -> None:
            pause()
            if not paused.done():
                paused.set_result(None)

        def watch_resume() -> None:
            nonlocal resumes
            resumes += 1
            resume()

        transport.pause_reading = watch_pause  # type: ignore[method-assign]
        transport.resume_reading = watch_resume  # type: ignore[method-assign]

        received = [await resp.read()]
        await paused  # not reading: the client stops the socket instead of buffering it all
        received.append(await resp.read())
        assert len(received[-1]) < 1 << 20  # what was buffered while paused is bounded
        received.append(await read_body(resp))
        assert resumes >= 1
        assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(big).digest()
        resp.release()


# -- request heads and origins --------------------------------------------------------------


def test_encode_head_request_line_host_and_headers() -> None:
    origin = Origin.parse("http://127.0.0.1:8080/v1/")
    head = encode_head("POST", origin, "/chat/completions",
                       {"Authorization": "Bearer k", "Accept": "text/event-stream"})
    assert head == (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                    b"Authorization: Bearer k\r\nAccept: text/event-stream\r\n")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer secret\r\nX-Injected: 1"},
        {"Authorization": "Bearer secret\nX-Injected: 1"},
        {"Authorization": "Bearer secret\r"},
        {"X-A\r\nX-Injected": "secret"},
        {"X-A\n": "secret"},
        {"X-A: b": "secret"},
    ],
)
def test_encode_head_refuses_line_breaks(headers: dict[str, str]) -> None:
    origin = Origin.parse("https://api.example.com/v1")
    with pytest.raises(ValueError) as caught:
        encode_head("POST", origin, "/chat/completions", headers)
    assert "secret" not in str(caught.value)  # a value may be the API key: never echoed


@pytest.mark.parametrize(
    ("url", "expected", "host_header"),
    [
        ("https://api.example.com/v1/", ("https", "api.example.com", 443, "/v1"),
         "api.example.com"),
        ("http://Example.COM", ("http", "example.com", 80, ""), "example.com"),
        ("https://h:443/openai/v1//", ("https", "h", 443, "/openai/v1"), "h"),
        ("http://h:443/v1", ("http", "h", 443, "/v1"), "h:443"),
        ("http://localhost:8080/v1", ("http", "localhost", 8080, "/v1"), "localhost:8080"),
        ("http://[::1]:8443/v1", ("http", "::1", 8443, "/v1"), "[::1]:8443"),
        ("https://[2001:db8::1]/", ("https", "2001:db8::1", 443, ""), "[2001:db8::1]"),
    ],
)
def test_origin_parse(url: str, expected: tuple[str, str, int, str], host_header: str) -> None:
    origin = Origin.parse(url)
    assert (origin.scheme, origin.host, origin.port, origin.base_path) == expected
    assert origin.host_header == host_header
    assert Origin.parse(url) == origin and hash(Origin.parse(url)) == hash(origin)  # pool key


@pytest.mark.parametrize(
    "url",
    [
        "ftp://files.example.com/v1",
        "api.example.com/v1",
        "http:///v1",
        "http://h/v1?key=1",
        "http://h/v1#part",
        "http://user:pw@h/v1",
        "http://h:99999/v1",
    ],
)
def test_origin_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        Origin.parse(url)
