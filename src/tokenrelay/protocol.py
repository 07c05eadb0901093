"""uvicorn's httptools protocol with less memory per connection and a disconnect callback.

A relay holds thousands of idle SSE connections, so what each one costs counts
(``bench/memory_probe.py``). Two things in uvicorn's protocol are heavy for what they do:

* every ``asyncio.Event`` keeps its waiters in a ``collections.deque``, ~760 bytes even
  empty; uvicorn makes two per connection (the request's message event and the flow
  control's writable event), each with at most a waiter or two. A ``list`` does what
  ``Event`` asks of its waiters (append, remove, iterate);
* the pipelined-request queue is a deque too, usually empty forever.

And an ASGI app learns that its client left only by awaiting ``receive()``: one task per
open stream parked there, with its coroutine frames. This protocol puts a
:class:`~tokenrelay.asgi.Disconnect` in the request's scope under
:data:`~tokenrelay.asgi.ON_DISCONNECT`; its callbacks run when the connection is lost
before the response ended, so the subscriber needs no listener task (it falls back to
one under any other server).

A response's head waits for its first body bytes (:class:`_HeadHold`): uvicorn writes
the head as soon as the app sends ``http.response.start`` and the body apart, two writes
where one does; each write to a loopback socket also runs the client's receive in the
kernel and wakes it. The head goes with the first body bytes written in the same turn of
the event loop, or alone at the end of that turn.

It also bounds what a client may hold before the app sees a request, which plain uvicorn
does not (:class:`HeadLimits`, read from the app's settings): a request head must be
complete within ``header_timeout_s`` (else ``408`` and close; a connection that sent
nothing is closed quietly), may have at most ``max_headers`` lines and
:data:`MAX_HEAD_BYTES` (else ``431``). A
response sent before the request body was read (``413``, ``401``) is followed by reading
and discarding the rest of the body, up to :data:`DISCARD_BYTES` and ``body_timeout_s``;
every close after a refusal is a lingering one (our side shut, the client's bytes read
and dropped for :data:`LINGER_S`), so the client reads the JSON error instead of a reset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from tokenrelay import timerwheel
from tokenrelay.asgi import ON_DISCONNECT, Disconnect

__all__ = ["HeadLimits", "StreamingHttpToolsProtocol", "chunk_cycle", "write_chunk"]

DISCARD_BYTES = 64 * 1024 * 1024  # request body read and dropped after an early answer
MAX_HEAD_BYTES = 1024 * 1024  # buffered for one head (the app refuses > 64 KiB of headers)
LINGER_S = 2.0  # after a refusal: how long the client's further bytes are read and dropped

log = logging.getLogger("tokenrelay.access")


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What a connection may cost before its request reaches the app."""

    header_timeout_s: float = 10.0
    max_headers: int = 100
    body_timeout_s: float = 30.0  # for discarding a body the app did not read

    @classmethod
    def of(cls, config: Any) -> HeadLimits:
        """The limits of the tokenrelay app that uvicorn's ``config`` serves (found through
        the wrappers uvicorn puts around it), or the defaults for any other app; computed
        once per config."""
        limits: HeadLimits | None = getattr(config, "_tokenrelay_head_limits", None)
        if limits is None:
            app, settings = getattr(config, "loaded_app", None), None
            for _ in range(8):  # ProxyHeadersMiddleware(MessageLoggerMiddleware(app)) ...
                settings = getattr(getattr(app, "state", None), "settings", None)
                if settings is not None or app is None:
                    break
                app = getattr(app, "app", None)
            limits = cls() if settings is None else cls(
                settings.header_timeout_s, settings.max_headers,
                settings.limits.body_timeout_s)
            config._tokenrelay_head_limits = limits
        return limits


def chunk_cycle(send: Any) -> RequestResponseCycle | None:
    """The uvicorn httptools request cycle whose ``send`` this is, for :func:`write_chunk`;
    None for any other server's send (or a wrapper around one)."""
    cycle = getattr(send, "__self__", None)
    return cycle if type(cycle) is RequestResponseCycle else None


def write_chunk(cycle: RequestResponseCycle, data: bytes) -> bool:
    """``await cycle.send({"type": "http.response.body", "body": data, "more_body": True})``
    done synchronously when that send would not wait: True once done (as the send does:
    nothing if the client has left), False when only the send can do it (the transport is
    paused by flow control, or the response is not a chunked one being sent).

    One body chunk per upstream read goes to each caught-up subscriber: the send's
    coroutine, its message dict and the StopIteration that ends it cost more than the
    write. The branch is uvicorn's own (tests/test_couplings.py checks it is unchanged)."""
    if cycle.disconnected:
        return True
    if cycle.flow.write_paused or not cycle.chunked_encoding or cycle.response_complete:
        return False
    if data:
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
    return True


class _HeadHold:
    """A request cycle's transport until its response's head has gone out (see the module
    docstring): the head is held, then written with the next bytes the cycle writes, or
    alone by a loop callback at the end of this turn; then the cycle gets its transport
    back. Anything else is the transport's own (a ``100 Continue`` before the head, too)."""

    __slots__ = ("_cycle", "_handle", "_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._cycle = cycle
        self._loop = loop
        self._head = b""
        self._handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if self._head:
            self._release(self._head + data)
        elif self._cycle.response_started and not self._cycle.response_complete:
            self._head = data
            self._handle = self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        if self._head:
            self._release(self._head)

    def _release(self, data: bytes) -> None:
        self._head = b""
        self._cycle.transport = self._transport
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._transport.is_closing():
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadRefused(Exception):
    """Raised from a parser callback: the head breaks a limit (answered in send_400_response,
    which uvicorn calls for any parser error)."""


class _Pipeline(list[Any]):
    """The pipelined-request queue as a list (uvicorn only appends left and pops right)."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lean(event: asyncio.Event) -> None:
    """Swap an Event's empty waiter deque for a list, if it is still the kind we know."""
    waiters = getattr(event, "_waiters", None)
    if type(waiters) is collections.deque and not waiters:
        event._waiters = []  # type: ignore[assignment]  # a list for the deque, knowingly


def _json_response(status: int, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message, "retryable": False}})
    return b"".join((
        STATUS_LINE[status], b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body), b"x-content-type-options: nosniff\r\n",
        b"cache-control: no-store\r\nconnection: close\r\n\r\n", body,
    ))


class StreamingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the changes of the module docstring."""

    # Slots, not the instance dict: uvicorn's ~30 attributes fill that dict's table, and
    # one more entry doubles it (~1.5 KB per idle stream, bench/memory_probe.py).
    __slots__ = ("_deadline", "_discard_left", "_head_bytes", "_head_started", "_lingering",
                 "_refusal")

    # uvicorn narrows the transport to asyncio.Transport (and ignores [override] itself).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: timerwheel.Deadline | None = None
        self._head_started = False
        self._head_bytes = 0  # read while a head is incomplete
        self._discard_left = 0  # > 0 while dropping the rest of a body nobody read
        self._lingering = False
        self._refusal: _HeadRefused | None = None
        super().connection_made(transport)
        if type(self.pipeline) is collections.deque and not self.pipeline:
            self.pipeline = _Pipeline()  # type: ignore[assignment]  # a list for the deque
        flow = getattr(self, "flow", None)
        if flow is not None:
            _lean(flow._is_writable_event)
        self._arm(self._limits.header_timeout_s, self._head_timeout)

    # -- time and size bounds ------------------------------------------------------------

    @property
    def _limits(self) -> HeadLimits:
        return HeadLimits.of(self.config)  # kept on the config: nothing more per connection

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = timerwheel.call_at(self.loop, self.loop.time() + seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timeout(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A head pipelined behind a response still being sent: wait for that one.
            self._arm(self._limits.header_timeout_s, self._head_timeout)
            return
        if not self._head_started:
            self.transport.close()  # nothing sent at all: close quietly, as keep-alive does
            return
        timeout = self._limits.header_timeout_s
        log.info("request head not complete within %g s: 408, connection closed", timeout)
        self._refuse(_json_response(
            408, "request_timeout",
            f"the request head (request line and headers) did not arrive within {timeout:g} s"))

    def _refuse(self, response: bytes) -> None:
        """Write a refusal, shut our side, and read and drop what the client still sends
        for LINGER_S: closing with unread bytes would reset the connection, and a reset can
        destroy the response before the client reads it."""
        self.transport.write(response)
        self._linger()

    def _linger(self) -> None:
        self._lingering = True
        self._discard_left = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._arm(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # dropped: see _refuse
        super().data_received(data)
        if self._head_started and not self._lingering:
            # Still no complete head after this read: all of it was head (a pipelined
            # request's body end aside). uvicorn would buffer headers without limit.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("request head over %d bytes: 431, connection closed", MAX_HEAD_BYTES)
                self._refuse(_json_response(
                    431, "headers_too_large",
                    f"the request head is larger than {MAX_HEAD_BYTES} bytes"))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, as JSON and with a lingering close."""
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            self._refuse(_json_response(431, "too_many_headers", str(refusal)))
        else:
            self._refuse(_json_response(400, "invalid_http", (
                "the request is not valid HTTP/1.1 (request line, header syntax, "
                "Content-Length or chunked framing)")))

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        if self._deadline is None:
            self._arm(self._limits.header_timeout_s, self._head_timeout)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self._discard_left:
            self._discard_left -= len(body)
            if self._discard_left <= 0:
                log.info("request body still arriving after its response: connection closed")
                self._linger()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self._discard_left:
            # The rest of a body nobody read has been dropped: wait for the next request,
            # which uvicorn's keep-alive timer (cancelled by these reads) no longer bounds.
            self._discard_left = 0
            self._head_started = False
            self._arm(self._limits.header_timeout_s, self._head_timeout)
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if (cycle is not None and cycle.more_body and not self._lingering
                and not self.transport.is_closing()):
            # Answered before the body was read (a 413, a 401): drop the rest, bounded.
            self._discard_left = DISCARD_BYTES
            self._arm(self._limits.body_timeout_s, self._discard_timeout)

    def _discard_timeout(self) -> None:
        self._deadline = None
        if self._discard_left and not self.transport.is_closing():
            self._linger()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_started = False
        self._head_bytes = 0
        limit = self._limits.max_headers
        if len(self.headers) > limit:  # counted once here, not per header (CPU per request)
            log.info("more than %d request headers: 431, connection closed", limit)
            self._refusal = _HeadRefused(
                f"more than {limit} request headers; send fewer (the limit is max_headers)")
            raise self._refusal  # a parser error for uvicorn: see send_400_response
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle is before:
            return  # an upgrade (websocket) request: no new request cycle
        _lean(cycle.message_event)
        cycle.transport = _HeadHold(cycle.transport, cycle, self.loop)  # type: ignore[assignment]
        # A scope extension: not a key of uvicorn's HTTPScope TypedDict.
        cycle.scope[ON_DISCONNECT] = Disconnect()  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:
            # The client left before the response ended (what receive() would report).
            hook = cycle.scope.get(ON_DISCONNECT)
            if isinstance(hook, Disconnect):
                hook.fire()
