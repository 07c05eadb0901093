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
for ``identity``. No redirects, cookies or HTTP/2: an OpenAI-compatible upstream needs
none of them.

Proxies (an :class:`Origin` may name a :class:`Proxy`): an ``https`` origin is reached
through a ``CONNECT`` tunnel, and TLS is then verified end to end against the origin's
own name; an ``http`` origin gets absolute-form requests sent to the proxy. Either way
the proxy may be ``http://`` or ``https://`` (TLS to the proxy too), with ``user:pass@``
sent as ``Proxy-Authorization: Basic``. The proxy is part of the origin, so of the pool's
key; closing a response closes the connection to the proxy, and so the tunnel.

Pooling: idle connections are kept per origin (last in, first out) for ``keepalive_s``.
A pooled connection the server has closed (or written to) while it sat idle is dropped
and replaced before anything is written on it: the event loop saw its EOF, or a poll of
its socket finds bytes or an EOF the loop has not handled yet. Once a byte of a request
is written, a chat request is never re-sent here: the server may have read it and started
(and billed) the answer, so a connection that closes before any response byte raises
:class:`Disconnected` and the caller's retry policy decides, counting an attempt. (Only an
idempotent GET, the model list, is sent once more on a new connection, as HTTP allows.)

Errors are this module's own (:class:`ConnectFailed`, the connect timeout included,
:class:`Disconnected`, :class:`BadResponse`); ``upstream.py`` turns them into the
gateway's :class:`~tokenrelay.errors.UpstreamError` classes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import httptools

_READ_LIMIT = 1 << 16  # buffered body bytes before the socket stops being read
# Response headers kept (lower-case): the ones this gateway reads. Keeping all of them
# would cost every open stream a dict of strings it never looks at.
_KEPT_HEADERS = frozenset({
    b"content-type", b"content-encoding", b"retry-after", b"retry-after-ms",
    b"location",  # named in the error of a redirect, which is not followed
})


class HTTPError(Exception):
    """Base of the errors of this module."""


class ConnectFailed(HTTPError):
    """No connection to the origin (DNS, refused, unreachable, TLS handshake), or to or
    through its proxy. ``retryable`` is False where waiting cannot help (a certificate
    that is not trusted, a proxy that wants other credentials)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ProxyRefused(ConnectFailed):
    """The proxy answered ``CONNECT`` with a status other than 2xx (``status``)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, retryable=status == 429 or status >= 500)
        self.status = status


class Disconnected(HTTPError):
    """The connection ended before the response did."""

    def __init__(self, message: str, *, mid_body: bool) -> None:
        super().__init__(message)
        self.mid_body = mid_body  # the status line and headers had arrived


class BadResponse(HTTPError):
    """Bytes that are not an HTTP/1.1 response (or an encoding we cannot decode)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy; ``display`` is its URL without the password (for messages)."""

    scheme: str  # "http", or "https": TLS to the proxy itself
    host: str
    port: int
    display: str
    authorization: str | None = field(default=None, repr=False)  # "Basic ..."

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else "http://" + url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}"
        if parts.username is not None:
            shown = f"{scheme}://{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"not an http(s) proxy URL: {shown}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in proxy URL: {shown}") from None
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(scheme, host, port, shown, authorization)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, the request-target prefix, and the proxy
    in between (if any)."""

    scheme: str
    host: str
    port: int
    base_path: str  # the URL's path without a trailing slash, e.g. "/v1"
    proxy: Proxy | None = None

    @classmethod
    def parse(cls, url: str, proxy: str | None = None) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in URL: {url!r}") from None
        if parts.query or parts.fragment or parts.username:
            raise ValueError(f"an upstream base URL has no query, fragment or user: {url!r}")
        via = Proxy.parse(proxy) if proxy else None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), via)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def encode_head(method: str, origin: Origin, path: str, headers: Mapping[str, str]) -> bytes:
    """The request line and header lines (without the final blank line) as bytes,
    built once per provider. Refuses CR/LF in names and values: header injection.

    Through a proxy, an ``http`` origin's request is in absolute form and carries the
    proxy's credentials; an ``https`` one goes through a tunnel and carries neither."""
    target = f"{origin.base_path}{path}"
    proxy = origin.proxy
    plain_via_proxy = proxy is not None and origin.scheme == "http"
    if plain_via_proxy:
        target = f"http://{origin.host_header}{target}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.host_header}"]
    if plain_via_proxy and proxy is not None and proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    for name, value in headers.items():
        if any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break or a colon")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class _Deflate:
    """``Content-Encoding: deflate`` as servers send it: zlib-wrapped (RFC 1950, what
    the name means) or raw (RFC 1951, what some send), told apart by the first two bytes."""

    __slots__ = ("_head", "_obj")

    def __init__(self) -> None:
        self._head = b""
        self._obj: Any = None

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0  # a zlib header
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            self._head = b""
        return self._obj.decompress(data)

    def flush(self) -> bytes:
        return self._obj.flush() if self._obj is not None else b""


class _ProxyAnswer(asyncio.Protocol):
    """The proxy's answer to ``CONNECT``: its status line and headers, nothing after."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if not self.head.done() and (end >= 0 or len(self._buffer) > _READ_LIMIT):
            self.head.set_result(self._buffer[:end] if end >= 0 else b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_result(b"")


class BodyReceiver(Protocol):
    """What a streaming :class:`Response` hands its body to (:meth:`Response.stream`),
    implemented by ``upstream._Relay.on_data``.

    ``on_body`` (httptools, inside ``data_received``) keeps each piece; once the read is
    parsed, ``data_received`` calls this with all the body that read carried (no loop
    callback per read). It is not told of the end of the body or of a failure: those reach
    the task's pending ``read()`` (``b""``, or the error raised), after this has had the
    good bytes before them. It must not raise: it keeps what it hit and calls
    ``close()``.
    """

    def __call__(self, data: bytes, /) -> None: ...


class Response(asyncio.Protocol):
    """One pooled connection, and the response of the request it currently carries.

    ``status`` and ``headers`` are set when :meth:`Pool.request` returns; then ``read()``
    until it returns ``b""``, and ``release()`` (body read to the end: back to the pool)
    or ``close()`` (anything else: the connection is dropped, so the server stops).
    """

    __slots__ = (
        "_decoder", "_done", "_error", "_framed", "_head", "_idle_timer",
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
        self._keep_alive = False  # the complete response lets the connection carry another
        self._framed = False  # Content-Length or chunked: the parser sees where it ends
        self._until_close = False  # neither: the body ends with the connection
        self._decoder: Any = None
        self._on_data: BodyReceiver | None = None  # see stream()

    # -- asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # idle in the pool: nothing may arrive now
            self.close()
            return
        if self._error is not None:  # failed or closed: what still arrives is dropped
            return
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
        on_data, pieces = self._on_data, self._pieces
        if on_data is not None and pieces:
            # Streaming: the body of this read (the good bytes before a failure too), in
            # one call, now: no loop callback per read (see stream()).
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            on_data(body)

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
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header
        elif encoding == "deflate":
            self._decoder = _Deflate()
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
            return  # data_received hands the read's body to _on_data once it is parsed
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

    def stream(self, on_data: BodyReceiver) -> None:
        """From now on hand the body to ``on_data`` from a callback instead of keeping it
        for ``read()``, which then only waits for the end of the body (``b""``) or its
        failure. ``on_data`` must not raise: it keeps what it hit and calls ``close()``.

        One call per read from the socket, with all the body that read carried (a
        chunked body's chunks joined), made once the read is parsed: no task wake-up and
        no loop callback per read. No flow control then: the callback takes everything
        at once."""
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


async def _send_on(conn: Response, payload: bytes) -> Response:
    """Write a request on ``conn``; the connection once its response head arrived."""
    head_future = conn._begin(payload)
    try:
        await head_future
    except BaseException:
        conn.close()
        raise
    return conn


def _readable(conn: Response) -> bool:
    """True when an idle connection's socket has something to read: the server closed it
    or wrote to it (both make it unusable), though the loop has not handled that yet."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))  # an EOF or a reset reads as POLLIN/POLLHUP too
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


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
        idempotent: bool = False,
    ) -> Response:
        """Send ``head`` (from :func:`encode_head`) with ``body``; return once the status
        line and headers have arrived. Cancelling it closes the connection it was using.

        A chat request is never sent twice from here, even when a reused connection closes
        before any answer: the server may have read it (see the module docstring). Only an
        ``idempotent`` one (a GET of the model list) is then sent once more, on a new
        connection, as HTTP allows."""
        payload = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        conn = self._take(origin)
        if conn is not None and idempotent:
            try:
                return await _send_on(conn, payload)
            except Disconnected as exc:
                if exc.mid_body:
                    raise
                conn = None  # closed before answering: once more, on a new connection
        if conn is None:
            conn = await self._connect(origin, connect_timeout)
        return await _send_on(conn, payload)

    def _take(self, origin: Origin) -> Response | None:
        idle = self._idle.get(origin)
        while idle:
            conn, _ = idle.popitem()  # the most recently used: the least likely stale
            conn._pool_slot = None
            if conn._idle_timer is not None:
                conn._idle_timer.cancel()
                conn._idle_timer = None
            if conn.closed:
                continue
            if _readable(conn):  # an EOF (or stray bytes) the loop has not handled yet
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, origin: Origin, timeout: float) -> Response:
        loop = asyncio.get_running_loop()
        tls = self._tls() if origin.scheme == "https" else None
        conn = Response(loop, self, origin)
        proxy = origin.proxy
        # Named in every message: the proxy (password left out) when there is one.
        where = "upstream" if proxy is None else f"upstream through proxy {proxy.display}"
        try:
            async with asyncio.timeout(timeout):
                if proxy is None:
                    await loop.create_connection(
                        lambda: conn, origin.host, origin.port,
                        ssl=tls, server_hostname=origin.host if tls else None,
                        ssl_handshake_timeout=timeout if tls else None,
                    )
                else:
                    await self._through_proxy(loop, conn, origin, proxy, tls, timeout)
        except TimeoutError:  # before OSError, its base class
            conn.close()
            raise ConnectFailed(f"cannot connect to {where} (no connection within "
                                f"{timeout:g} s)") from None
        except ConnectFailed:
            conn.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            # Behind a proxy, the usual cause is one that inspects TLS with its own CA.
            hint = ("trust a private CA with SSL_CERT_FILE" if proxy is None else
                    f"through proxy {proxy.display}: if it inspects TLS, trust its CA with "
                    "SSL_CERT_FILE")
            raise ConnectFailed(f"TLS certificate not trusted ({exc.verify_message}); {hint}",
                                retryable=False) from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed ({exc.reason or 'ssl error'})") from None
        except OSError as exc:  # socket.gaierror included
            # asyncio's strerror is "Connect call failed (...)": the errno says why.
            errno = None if isinstance(exc, socket.gaierror) else exc.errno
            reason = (os.strerror(errno) if errno and errno > 0 else exc.strerror) \
                or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {where} ({reason})") from None
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        return conn

    async def _through_proxy(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: Response,
        origin: Origin,
        proxy: Proxy,
        tls: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        """Connect ``conn`` to ``origin`` through ``proxy``: a ``CONNECT`` tunnel then TLS
        checked against the origin's name (https), or the proxy connection itself (http)."""
        answer = _ProxyAnswer(loop)
        proxy_tls = self._tls() if proxy.scheme == "https" else None
        try:
            transport, _ = await loop.create_connection(
                lambda: answer, proxy.host, proxy.port,
                ssl=proxy_tls, server_hostname=proxy.host if proxy_tls else None,
                ssl_handshake_timeout=timeout if proxy_tls else None,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailed(f"TLS certificate of proxy {proxy.display} not trusted "
                                f"({exc.verify_message})", retryable=False) from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None)
            raise ConnectFailed(f"cannot connect to proxy {proxy.display} "
                                f"({reason or type(exc).__name__})") from None
        try:
            if origin.scheme == "http":  # absolute-form requests on the proxy connection
                transport.set_protocol(conn)
                conn.connection_made(transport)
                return
            authority = f"[{origin.host}]:{origin.port}" if ":" in origin.host \
                else f"{origin.host}:{origin.port}"
            lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
            if proxy.authorization:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            _check_connect_answer(await answer.head, proxy, authority)
            assert tls is not None
            tunnel = await loop.start_tls(
                transport, conn, tls, server_hostname=origin.host,
                ssl_handshake_timeout=timeout,
            )
        except BaseException:
            transport.close()
            raise
        if tunnel is None:  # the loop's way of saying the connection is gone
            raise ConnectFailed(f"proxy {proxy.display} closed the tunnel to {authority}")
        conn.connection_made(tunnel)

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


def _check_connect_answer(head: bytes, proxy: Proxy, authority: str) -> None:
    """Raise unless ``head`` (status line and headers) opens the tunnel (2xx)."""
    if not head:
        raise ConnectFailed(f"proxy {proxy.display} closed the connection instead of "
                            f"answering CONNECT {authority}")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectFailed(f"proxy {proxy.display} answered CONNECT with something that "
                            "is not HTTP", retryable=False)
    status = int(parts[1])
    if 200 <= status < 300:
        return
    reason = parts[2].strip() if len(parts) > 2 else ""
    said = f"HTTP {status}{' ' + reason if reason else ''}"
    if status == 407:
        hint = ("the user or password in the proxy URL is wrong" if proxy.authorization
                else "put user:password@ in the proxy URL")
        raise ProxyRefused(f"proxy {proxy.display} wants authentication ({said}): {hint}",
                           status=status)
    raise ProxyRefused(f"proxy {proxy.display} refused to open a tunnel to {authority} "
                       f"({said})", status=status)
