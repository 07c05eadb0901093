"""The upstream's HTTP/1.1 client: keep-alive pool, TLS, connect timeout, streamed bodies.

Why not aiohttp (which the CLI tools still use as clients of the gateway): on the relay's
hot path every upstream read went through aiohttp's protocol, ``StreamReader`` (feed,
wait, read-nowait, chunk bookkeeping, flow control) and a request/response pair of
objects kept for the life of the answer. Measured (``bench/``): that was ~12 % of the
gateway's CPU when each read carries one token, and ~10 KB of the memory of each idle open
stream. Here the response *is* the connection's protocol: httptools parses the bytes in
``data_received``, the body pieces wait in a list, and ``read()`` hands over all of them
at once.

Scope, deliberately small: HTTP/1.1 over TCP or TLS (``ssl.create_default_context()``
verification), one request at a time per connection, bodies sent whole (a chat request),
response bodies chunked, sized or delimited by close, gzip/deflate decoded though we ask
for ``identity``. No proxies, redirects, cookies or HTTP/2: an OpenAI-compatible
upstream needs none of them.

Pooling: idle connections are kept per origin (last in, first out) for ``keepalive_s``.
A pooled connection can be closed by the server just as we send on it; a request on a
*reused* connection that sees the connection close before any response byte is sent once
more on a new connection (the server cannot have read it).

Errors are this module's own (:class:`ConnectFailed`, the connect timeout included,
:class:`Disconnected`, :class:`BadResponse`); ``upstream.py`` turns them into the
gateway's :class:`~tokenrelay.errors.UpstreamError` classes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

_READ_LIMIT = 1 << 16  # buffered body bytes before the socket stops being read
# Response headers kept (lower-case): the ones this gateway reads. Keeping all of them
# would cost every open stream a dict of strings it never looks at.
_KEPT_HEADERS = frozenset({
    b"content-type", b"content-encoding", b"retry-after", b"retry-after-ms",
})


class HTTPError(Exception):
    """Base of the errors of this module."""


class ConnectFailed(HTTPError):
    """No connection to the origin (DNS, refused, unreachable, TLS handshake)."""


class Disconnected(HTTPError):
    """The connection ended before the response did."""

    def __init__(self, message: str, *, mid_body: bool) -> None:
        super().__init__(message)
        self.mid_body = mid_body  # the status line and headers had arrived


class BadResponse(HTTPError):
    """Bytes that are not an HTTP/1.1 response (or an encoding we cannot decode)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the request-target prefix."""

    scheme: str
    host: str
    port: int
    base_path: str  # the URL's path without a trailing slash, e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in URL: {url!r}") from None
        if parts.query or parts.fragment or parts.username:
            raise ValueError(f"an upstream base URL has no query, fragment or user: {url!r}")
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def encode_head(method: str, origin: Origin, path: str, headers: Mapping[str, str]) -> bytes:
    """The request line and header lines (without the final blank line) as bytes,
    built once per provider. Refuses CR/LF in names and values: header injection."""
    lines = [f"{method} {origin.base_path}{path} HTTP/1.1", f"Host: {origin.host_header}"]
    for name, value in headers.items():
        if any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break or a colon")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class Response(asyncio.Protocol):
    """One pooled connection, and the response of the request it currently carries.

    ``status`` and ``headers`` are set when :meth:`Pool.request` returns; then ``read()``
    until it returns ``b""``, and ``release()`` (body read to the end: back to the pool)
    or ``close()`` (anything else: the connection is dropped, so the server stops).
    """

    __slots__ = (
        "_body_seen", "_decoder", "_done", "_error", "_flushing", "_framed", "_head", "_idle_timer",
        "_keep_alive", "_loop", "_on_data", "_origin", "_parser", "_paused", "_pieces", "_pool",
        "_pool_slot", "_size", "_until_close", "_waiter", "headers", "status", "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Pool, origin: Origin) -> None:
        self._loop = loop
        self._pool = pool
        self._origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._pool_slot: dict[Response, None] | None = None  # the idle set it sits in
        self._idle_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pieces: list[bytes] = []
        self._size = 0
        self._paused = False
        self._done = False  # the whole body has arrived
        self._error: HTTPError | None = None
        self._body_seen = False  # any byte of this response arrived
        self._keep_alive = False  # the complete response lets the connection carry another
        self._framed = False  # Content-Length or chunked: the parser sees where it ends
        self._until_close = False  # neither: the body ends with the connection
        self._decoder: Any = None
        self._on_data: Callable[[bytes], None] | None = None  # see stream()
        self._flushing = False  # a _flush is scheduled

    # -- asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # idle in the pool: nothing may arrive now
            self.close()
            return
        if self._error is not None:  # failed or closed: what still arrives is dropped
            return
        self._body_seen = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("upstream switched protocols"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__  # what a callback below raised (httptools wraps it)
            self._fail(cause if isinstance(cause, HTTPError)
                       else BadResponse(f"malformed HTTP response from upstream ({exc})"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed HTTP response from upstream ({exc})"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._pool_slot is not None:
            self._pool_slot.pop(self, None)
            self._pool_slot = None
        if self._head is None or self._done:
            return
        if self._until_close and self.status:
            self._finish()
            return
        if self.status:
            self._fail(Disconnected("upstream closed the connection in the middle of the "
                                    "answer", mid_body=True))
        else:
            self._fail(Disconnected("upstream closed the connection before answering",
                                    mid_body=False))

    # -- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding"
                                         and value.lower().find(b"chunked") >= 0):
            self._framed = True
        if name in _KEPT_HEADERS:
            self.headers[name.decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self.status = parser.get_status_code()
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header
        elif encoding not in ("identity", ""):
            raise BadResponse(f"upstream answered with an unsupported encoding ({encoding})")
        # The parser finds the end of sized and chunked bodies; others run to the close.
        self._until_close = not self._framed and self.status not in (204, 304)
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error:
                raise BadResponse("upstream sent a corrupt compressed body") from None
            if not body:
                return
        self._pieces.append(body)
        if self._on_data is not None:
            if not self._flushing:
                self._flushing = True
                self._loop.call_soon(self._flush)
            return
        self._size += len(body)
        if self._size > _READ_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()  # the reader is behind: let TCP push back
        self._wake()

    def on_message_complete(self) -> None:
        self._until_close = False
        # Only meaningful here: once this returns llhttp resets its flags, and
        # should_keep_alive() answers False for every sized or chunked response.
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    # -- response API -----------------------------------------------------------------

    async def read(self) -> bytes:
        """All body bytes that arrived since the last call; ``b""`` at the end of the body.
        Raises :class:`Disconnected` or :class:`BadResponse` once the bytes before the
        failure have been read."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def stream(self, on_data: Callable[[bytes], None]) -> None:
        """From now on hand the body to ``on_data`` from a callback instead of keeping it
        for ``read()``, which then only waits for the end of the body (``b""``) or its
        failure. ``on_data`` must not raise: it keeps what it hit and calls ``close()``.

        One call per event-loop iteration with all that arrived in it: what a task
        wake-up per read would coalesce, without the wake-up. No flow control then: the
        callback takes everything at once."""
        if self._pieces:
            raise RuntimeError("read() the body received so far before stream()")
        self._on_data = on_data
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def read_all(self, limit: int) -> bytes:
        """The body, up to ``limit`` bytes (the rest is not read: close, do not release)."""
        out = bytearray()
        while len(out) < limit:
            data = await self.read()
            if not data:
                break
            out += data
        return bytes(out[:limit])

    def _flush(self) -> None:
        self._flushing = False
        pieces = self._pieces
        if not pieces or self._on_data is None:
            return
        self._pieces = []
        self._on_data(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        """Drop the connection and what was not read (a response not read to its end, or
        any failure)."""
        self._pieces = []
        if self.transport is not None:
            self.transport.close()
        if self._head is not None and not self._done:
            self._fail(Disconnected("the response was closed", mid_body=bool(self.status)))

    def release(self) -> None:
        """Back to the pool if the body was read to the end and the server keeps the
        connection open; closed otherwise."""
        if (not self._done or self._pieces or self._error is not None or self.closed
                or not self._keep_alive):
            self.close()
            return
        self._reset()
        self._pool._park(self)

    # -- internals --------------------------------------------------------------------

    def _finish(self) -> None:
        if self._decoder is not None:
            tail = self._decoder.flush()
            self._decoder = None
            if tail:
                self._pieces.append(tail)
        self._done = True
        self._wake()

    def _fail(self, error: HTTPError) -> None:
        if self._error is None and not self._done:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved: a request cancelled meanwhile must not warn
        self._wake()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _begin(self, payload: bytes) -> asyncio.Future[None]:
        """Send a request on this connection; the future resolves with the headers."""
        self._head = head = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return head


class Pool:
    """Keep-alive connections per origin; see the module docstring."""

    def __init__(
        self,
        *,
        keepalive_s: float = 30.0,
        max_idle_per_origin: int = 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, dict[Response, None]] = {}
        self._closed = False
        self.connects = 0  # new connections opened (tests and metrics read it)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def request(
        self,
        origin: Origin,
        head: bytes,
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Response:
        """Send ``head`` (from :func:`encode_head`) with ``body``; return once the status
        line and headers have arrived. Cancelling it closes the connection it was using."""
        payload = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        fresh = False
        while True:
            conn = None if fresh else self._take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            head_future = conn._begin(payload)
            try:
                await head_future
            except Disconnected:
                if reused and not conn._body_seen:
                    fresh = True  # the server had closed the idle connection: send once
                    continue  # more, on a new one
                raise
            except BaseException:
                conn.close()
                raise
            return conn

    def _take(self, origin: Origin) -> Response | None:
        idle = self._idle.get(origin)
        while idle:
            conn, _ = idle.popitem()  # the most recently used: the least likely stale
            conn._pool_slot = None
            if conn._idle_timer is not None:
                conn._idle_timer.cancel()
                conn._idle_timer = None
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: Origin, timeout: float) -> Response:
        loop = asyncio.get_running_loop()
        tls = self._tls() if origin.scheme == "https" else None
        conn = Response(loop, self, origin)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: conn, origin.host, origin.port,
                    ssl=tls, server_hostname=origin.host if tls else None,
                    ssl_handshake_timeout=timeout if tls else None,
                )
        except TimeoutError:  # before OSError, its base class
            conn.close()
            raise ConnectFailed(f"cannot connect to upstream (no connection within "
                                f"{timeout:g} s)") from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailed(f"TLS certificate not trusted ({exc.verify_message})") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed ({exc.reason or 'ssl error'})") from None
        except OSError as exc:  # socket.gaierror included
            # asyncio's strerror is "Connect call failed (...)": the errno says why.
            plain = exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror)
            reason = (os.strerror(exc.errno) if plain else exc.strerror) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to upstream ({reason})") from None
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        return conn

    def _park(self, conn: Response) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.setdefault(conn._origin, {})
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        idle[conn] = None
        conn._pool_slot = idle
        conn._idle_timer = conn._loop.call_later(self.keepalive_s, conn.close)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()
