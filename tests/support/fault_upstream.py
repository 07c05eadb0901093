"""A scripted, fault-injecting OpenAI-compatible upstream on 127.0.0.1 for gateway tests.

It is a tiny HTTP/1.1 server on raw asyncio streams rather than a framework, because the
faults live below what frameworks let you control: a body written one byte per TCP write,
a chunked body cut off without its terminator, a reset instead of a response, a stall
after the headers. Each request attempt consumes the next scripted :class:`Step` (the
last one repeats), every request is recorded, and tests await counters instead of
polling::

    async with FaultUpstream() as up:
        up.script(status(429, headers={"Retry-After": "1"}), ok(["Hel", "lo"]))
        ...  # point the gateway at up.base_url
        await up.wait_requests(2)

Stream bodies are ``text/event-stream``, chunked, one HTTP chunk per write, drained after
every write. Chunks look like OpenAI's: a role chunk, one chunk per token, a finish chunk,
an optional usage chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

from tokenrelay.simulator.plan import after_prefix

__all__ = [
    "FaultUpstream",
    "RecordedRequest",
    "Step",
    "continues",
    "corrupt",
    "hang",
    "huge_chunk",
    "in_stream_error",
    "no_done",
    "no_head",
    "ok",
    "refuse",
    "rejects_prefill",
    "reset_after",
    "slow",
    "split_bytes",
    "stall_after",
    "stall_first",
    "status",
    "zero_usage",
]

CORRUPT_LINE = b'data: {"id":"chatcmpl-broken","choices":[{"index":0,"delta":{"content":"oops\n\n'
_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    408: "Request Timeout", 413: "Payload Too Large", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class Step:
    """What one request attempt gets. Build it with the factory functions below."""

    kind: str
    tokens: tuple[str, ...] = ()
    n: int = 0
    usage: bool = True
    reasoning: tuple[str, ...] = ()
    status: int = 200
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float | None = None
    interval: float = 0.0
    message: str = ""
    code: str = "server_error"
    finish_reason: str = "stop"
    hard: bool = False  # close with a TCP reset (RST) instead of a FIN

    @property
    def text(self) -> str:
        """The content the step delivers when nothing goes wrong."""
        return "".join(self.tokens)


def ok(
    tokens: Iterable[str], usage: bool = True, reasoning: Iterable[str] | None = None,
    finish_reason: str = "stop",
) -> Step:
    """A normal stream: role, reasoning (if any), tokens, finish, usage, ``[DONE]``."""
    return Step("ok", tuple(tokens), usage=usage, reasoning=tuple(reasoning or ()),
                finish_reason=finish_reason)


def status(
    code: int, body: Any = None, headers: Mapping[str, str] | None = None
) -> Step:
    """A plain non-2xx (or any) answer; a dict body is sent as JSON, a str as text."""
    if body is None:
        body = {"error": {"message": f"simulated {code}", "type": "server_error",
                          "code": str(code)}}
    return Step("status", status=code, body=body, headers=tuple((headers or {}).items()))


def refuse(reset: bool = True) -> Step:
    """Read the request, then close the TCP connection without any response.
    ``reset=True`` sends an RST ("connection reset by peer"), else a plain FIN."""
    return Step("refuse", hard=reset)


def hang() -> Step:
    """Read the request, then answer nothing (not even headers) until the client leaves;
    its leaving counts in ``closed_by_client``."""
    return Step("hang")


def reset_after(tokens: Iterable[str], n: int, hard: bool = False) -> Step:
    """Send ``n`` tokens, then close the connection mid-body (no terminator, no [DONE]).
    The default FIN guarantees the client sees those n tokens; ``hard`` sends an RST,
    which may make the client lose bytes it had not read yet."""
    return Step("reset_after", tuple(tokens), n=n, hard=hard)


def corrupt(tokens: Iterable[str], at: int) -> Step:
    """A normal stream with an unparseable ``data:`` line after ``at`` tokens."""
    return Step("corrupt", tuple(tokens), n=at)


def split_bytes(tokens: Iterable[str] = ("H", "é", "😀", " ok", "日本"),
                interval: float = 0.0) -> Step:
    """A normal stream whose body goes out one byte per HTTP chunk and per write."""
    return Step("split_bytes", tuple(tokens), interval=interval)


def no_done(tokens: Iterable[str]) -> Step:
    """Tokens and a finish chunk, then a clean end of body without ``[DONE]``."""
    return Step("no_done", tuple(tokens))


def stall_first(seconds: float | None = None, tokens: Iterable[str] = ("late",)) -> Step:
    """Headers, then silence for ``seconds`` (forever if None), then a normal stream."""
    return Step("stall_first", tuple(tokens), seconds=seconds)


def stall_after(tokens: Iterable[str], n: int) -> Step:
    """``n`` tokens, then silence until the client goes away."""
    return Step("stall_after", tuple(tokens), n=n)


def huge_chunk(size: int, char: str = "x") -> Step:
    """One content delta of ``size`` characters in a single chunk and write."""
    return Step("huge_chunk", ((char * size)[:size],))


def slow(tokens: Iterable[str], interval: float) -> Step:
    """A normal stream with ``interval`` seconds between tokens."""
    return Step("slow", tuple(tokens), interval=interval)


def in_stream_error(
    tokens: Iterable[str], n: int, message: str = "upstream failure", code: str = "server_error"
) -> Step:
    """``n`` tokens, then ``data: {"error": {...}}`` and a clean end of body."""
    return Step("in_stream_error", tuple(tokens), n=n, message=message, code=code)


@dataclass
class RecordedRequest:
    """One request as the upstream received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    arrived: float  # time.monotonic()
    step: Step | None = field(default=None)


class _ClientGone(Exception):
    """The client closed its side while we were answering."""


class _Conn:
    """One accepted connection; a pump task reads ahead so a close is noticed at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while chunk := await self.reader.read(65536):
                self.buf += chunk
                self.changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.changed.set()

    async def read_until(self, sep: bytes) -> bytes | None:
        while True:
            idx = self.buf.find(sep)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(sep)])
                del self.buf[: idx + len(sep)]
                return out
            if self.closed.is_set():
                return None
            self.changed.clear()
            await self.changed.wait()

    async def read_exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if self.closed.is_set():
                return None
            self.changed.clear()
            await self.changed.wait()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        if self.closed.is_set() or self.writer.is_closing():
            raise _ClientGone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            raise _ClientGone from None

    async def chunk(self, data: bytes) -> None:
        await self.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def pause(self, seconds: float | None) -> None:
        """Sleep, but raise :class:`_ClientGone` as soon as the client leaves. Zero still
        yields to the loop once, so a client in the same loop reads in between."""
        if seconds is not None and seconds <= 0:
            await asyncio.sleep(0)
            if self.closed.is_set():
                raise _ClientGone
            return
        try:
            await asyncio.wait_for(self.closed.wait(), seconds)
        except TimeoutError:
            return
        raise _ClientGone

    def close(self, hard: bool = False) -> None:
        if hard:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()
        self.pump.cancel()


class FaultUpstream:
    """The scripted upstream server. State lives on the instance; start it in the test's
    own event loop (``async with FaultUpstream() as up``)."""

    def __init__(self, model: str = "fault-model", *, tls: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        self.model = model
        self.tls = tls  # serve HTTPS with this context
        self.host = host  # the name base_url uses (the socket is on 127.0.0.1 either way)
        self.requests: list[RecordedRequest] = []
        self.closed_by_client = 0
        self.closed_idle = 0  # connections closed while idle by close_when_idle steps
        self.connections = 0  # TCP connections accepted
        self.base_url = ""
        self.port = 0
        self._steps: list[Step] = [ok(["Hello", ",", " world", "!"])]
        self._pos = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []

    async def __aenter__(self) -> FaultUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self.tls else "http"
        self.base_url = f"{scheme}://{self.host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn.close(hard=False)
        tasks = list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def script(self, *steps: Step) -> None:
        """Answer the next requests with ``steps`` in order; the last one then repeats."""
        if not steps:
            raise ValueError("script() needs at least one step")
        self._steps = list(steps)
        self._pos = 0

    async def wait_requests(self, n: int) -> None:
        await self._wait("requests", n)

    async def wait_client_closed(self, n: int) -> None:
        await self._wait("closed_by_client", n)

    # ---- internals

    async def wait_closed_idle(self, n: int) -> None:
        await self._wait("closed_idle", n)

    def _count(self, name: str) -> int:
        return len(self.requests) if name == "requests" else int(getattr(self, name))

    async def _wait(self, name: str, n: int) -> None:
        if self._count(name) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (name, n, fut)
        self._waiters.append(entry)
        try:
            await fut
        finally:
            self._waiters.remove(entry)

    def _notify(self) -> None:
        for name, n, fut in self._waiters:
            if not fut.done() and self._count(name) >= n:
                fut.set_result(None)

    def _next_step(self) -> Step:
        step = self._steps[min(self._pos, len(self._steps) - 1)]
        self._pos += 1
        return step

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self.connections += 1
        try:
            while True:
                request = await self._read_request(conn)
                if request is None:
                    return
                request.step = step = self._next_step()
                self.requests.append(request)
                self._notify()
                in_body = [False]
                try:
                    keep_alive = await self._respond(conn, request, step, in_body)
                except _ClientGone:
                    if in_body[0]:
                        self.closed_by_client += 1
                        self._notify()
                    return
                if not keep_alive or request.headers.get("connection", "").lower() == "close":
                    return
        finally:
            self._conns.discard(conn)
            if not writer.is_closing():
                conn.close()
            conn.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.pump
            self._handlers.discard(task)

    async def _read_request(self, conn: _Conn) -> RecordedRequest | None:
        head = await conn.read_until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await conn.read_exactly(int(headers["content-length"])) or b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size_line = await conn.read_until(b"\r\n")
                if size_line is None:
                    return None
                size = int(size_line.split(b";")[0], 16)
                data = await conn.read_exactly(size + 2)
                if data is None:
                    return None
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        return RecordedRequest(method, path, headers, body, parsed, time.monotonic())

    def _events(self, request: RecordedRequest) -> _Events:
        model = request.json.get("model", self.model) if isinstance(request.json, dict) else None
        return _Events(model if isinstance(model, str) else self.model)

    async def _respond(
        self, conn: _Conn, request: RecordedRequest, step: Step, in_body: list[bool]
    ) -> bool:
        """Write the answer for one request; return whether the connection stays open."""
        kind = step.kind
        if kind in _COMPLETION_KINDS:  # the issue-15 block at the end of this module
            return await _respond_completion(self, conn, request, step, in_body)
        if kind in _FAILOVER_KINDS:
            return await _respond_failover(self, conn, request, step, in_body)
        if kind == "refuse":
            conn.close(hard=step.hard)
            return False
        if kind == "status":
            await _write_plain(conn, step.status, step.body, step.headers)
            return True
        if kind == "hang":
            in_body[0] = True  # count the client's leaving, as for a stalled body
            await conn.pause(None)
        ev = self._events(request)
        if kind == "ok" and isinstance(request.json, dict) and request.json.get("stream") is False:
            await _write_plain(conn, 200, ev.completion(step), ())
            return True
        await conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        in_body[0] = True
        tokens = step.tokens
        if kind == "stall_first":
            await conn.pause(step.seconds)
            if step.seconds is None:
                raise _ClientGone  # unreachable: pause(None) only returns by raising
        if kind == "split_bytes":
            body = b"".join(ev.full(step))
            for i in range(len(body)):
                await conn.chunk(body[i : i + 1])
                await conn.pause(step.interval)
            await conn.write(b"0\r\n\r\n")
            return True
        if kind in ("reset_after", "stall_after", "in_stream_error"):
            await conn.chunk(ev.role())
            for tok in tokens[: step.n]:
                await conn.chunk(ev.content(tok))
            if kind == "reset_after":
                conn.close(hard=step.hard)
                return False
            if kind == "stall_after":
                await conn.pause(None)
            await conn.chunk(b"data: " + orjson.dumps(
                {"error": {"message": step.message, "type": "server_error", "param": None,
                           "code": step.code}}) + b"\n\n")
            await conn.write(b"0\r\n\r\n")
            return True
        for i, event in enumerate(ev.full(step, done=kind != "no_done")):
            if kind == "slow" and i > 1 and i <= len(tokens) + len(step.reasoning):
                await conn.pause(step.interval)
            if kind == "corrupt" and i == 1 + len(step.reasoning) + step.n:
                await conn.chunk(CORRUPT_LINE)
            await conn.chunk(event)
        await conn.write(b"0\r\n\r\n")
        return True


class _Events:
    """Encoders for one response's OpenAI chunks."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "chatcmpl-fault" + uuid.uuid4().hex[:12]
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }) + b"\n\n"

    def role(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def content(self, token: str) -> bytes:
        return self._chunk({"content": token})

    def error_chunk(self, extra: dict[str, Any]) -> bytes:
        """OpenRouter's failure chunk: an empty delta, finish_reason "error", ``extra``."""
        return b"data: " + orjson.dumps({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "provider": "fault",
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
            **extra,
        }) + b"\n\n"

    def full(self, step: Step, done: bool = True) -> list[bytes]:
        """Role, reasoning, tokens, finish, usage and [DONE], one event per item."""
        out = [self.role()]
        out += [self._chunk({"reasoning_content": r}) for r in step.reasoning]
        out += [self.content(t) for t in step.tokens]
        out.append(self._chunk({}, step.finish_reason))
        if step.usage:
            out.append(b"data: " + orjson.dumps({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": _usage(step),
            }) + b"\n\n")
        if done:
            out.append(b"data: [DONE]\n\n")
        return out

    def completion(self, step: Step) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": step.text}
        if step.reasoning:
            message["reasoning_content"] = "".join(step.reasoning)
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": step.finish_reason}],
            "usage": _usage(step),
        }


def _usage(step: Step) -> dict[str, int]:
    completion = len(step.tokens) + len(step.reasoning)
    return {"prompt_tokens": 5, "completion_tokens": completion,
            "total_tokens": 5 + completion}


async def _write_plain(
    conn: _Conn, code: int, body: Any, headers: Sequence[tuple[str, str]]
) -> None:
    if isinstance(body, bytes):
        data, ctype = body, "application/octet-stream"
    elif isinstance(body, str):
        data, ctype = body.encode(), "text/plain; charset=utf-8"
    else:
        data, ctype = orjson.dumps(body), "application/json"
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}",
             f"content-type: {ctype}", f"content-length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    await conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)


# ---- Completion rules and hidden resends (issue 15) --------------------------------------
# Kept apart from the modes above so that other blocks can be added beside it.

GARBAGE_LINE = b"data: this is not JSON\n\n"  # a data line the JSON parser rejects
__all__ += [
    "GARBAGE_LINE",
    "after_done",
    "close_after_request",
    "close_when_idle",
    "no_finish",
    "openrouter_error",
    "vllm_error",
]
_COMPLETION_KINDS = frozenset({
    "no_finish", "after_done", "vllm_error", "openrouter_error", "close_after_request",
    "close_when_idle",
})


def no_finish(tokens: Iterable[str]) -> Step:
    """Role and tokens, then a clean end of body with neither a finish_reason nor
    ``[DONE]``: a cut answer even though HTTP says nothing went wrong."""
    return Step("no_finish", tuple(tokens))


def after_done(tokens: Iterable[str], extra: bytes = GARBAGE_LINE, end: str = "clean") -> Step:
    """A normal stream and ``[DONE]``, then ``extra`` bytes, then ``end``: ``"clean"``
    (the chunked terminator), ``"cut"`` (the connection closed without it) or
    ``"stall"`` (silence until the client leaves)."""
    if end not in ("clean", "cut", "stall"):
        raise ValueError(f"after_done: end must be clean, cut or stall, not {end!r}")
    return Step("after_done", tuple(tokens), body=extra, message=end)


def vllm_error(tokens: Iterable[str], n: int, message: str = "CUDA out of memory",
               code: int = 500) -> Step:
    """``n`` tokens, then vLLM's in-stream error (the bare error object, no choices:
    ``{"object": "error", "message", "type", "param", "code"}``), ``[DONE]`` (vLLM
    sends it after its error) and a clean end of body."""
    return Step("vllm_error", tuple(tokens), n=n, message=message, code=str(code))


def openrouter_error(tokens: Iterable[str], n: int,
                     message: str | None = "Provider disconnected unexpectedly") -> Step:
    """``n`` tokens, then OpenRouter's mid-stream failure: a chunk with
    ``finish_reason: "error"`` and, unless ``message`` is None, a top-level error object
    (code 502); then ``[DONE]`` and a clean end of body."""
    return Step("openrouter_error", tuple(tokens), n=n, message=message or "",
                hard=message is None)


def close_after_request() -> Step:
    """Read the request (it reached the provider), then close the connection with a FIN
    and no response byte: what a kept-alive connection that the server drops just as
    the next request arrives looks like to the client."""
    return Step("close_after_request")


def close_when_idle(tokens: Iterable[str]) -> Step:
    """A normal keep-alive stream; once it is written the server closes the connection
    while it sits idle (a server's keep-alive timeout). ``closed_idle`` counts these."""
    return Step("close_when_idle", tuple(tokens))


async def _respond_completion(
    upstream: FaultUpstream, conn: _Conn, request: RecordedRequest, step: Step,
    in_body: list[bool],
) -> bool:
    """The answers of this block's steps; returns whether the connection stays open."""
    kind = step.kind
    if kind == "close_after_request":
        conn.close(hard=False)
        return False
    ev = upstream._events(request)
    await conn.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    in_body[0] = True
    if kind in ("vllm_error", "openrouter_error", "no_finish"):
        await conn.chunk(ev.role())
        for tok in step.tokens if kind == "no_finish" else step.tokens[: step.n]:
            await conn.chunk(ev.content(tok))
        if kind == "vllm_error":
            code: Any = int(step.code) if step.code.isdigit() else step.code
            await conn.chunk(b"data: " + orjson.dumps(
                {"object": "error", "message": step.message, "type": "InternalServerError",
                 "param": None, "code": code}) + b"\n\n")
        elif kind == "openrouter_error":
            extra = {} if step.hard else {"error": {"code": 502, "message": step.message}}
            await conn.chunk(ev.error_chunk(extra))
        if kind != "no_finish":
            await conn.chunk(b"data: [DONE]\n\n")
        await conn.write(b"0\r\n\r\n")
        return True
    for event in ev.full(step):
        await conn.chunk(event)
    if kind == "close_when_idle":
        await conn.write(b"0\r\n\r\n")
        await conn.pause(0)  # let the client read the end first
        conn.close(hard=False)
        with contextlib.suppress(ConnectionError, OSError):
            await conn.writer.wait_closed()
        upstream.closed_idle += 1
        upstream._notify()
        return False
    if step.body:
        await conn.chunk(step.body)
    if step.message == "cut":
        conn.close(hard=False)
        return False
    if step.message == "stall":
        await conn.pause(None)
    await conn.write(b"0\r\n\r\n")
    return True


# ---- issue 15: failover modes -------------------------------------------------------------
# A provider that continues an assistant prefix exactly, one that refuses prefill with a
# 400, one that never sends a response head, and one that reports zero usage.

_FAILOVER_KINDS = frozenset({"continues", "rejects_prefill", "no_head", "zero_usage"})


def continues(tokens: Iterable[str]) -> Step:
    """A provider with assistant prefill: a request whose last message is ``assistant``
    gets the rest of ``tokens``' text after that prefix (the token in which the prefix
    ends is sent from there); without one, the whole answer. A prefix that is not the
    start of the text gets a 400 (a test's gateway sent altered text)."""
    return Step("continues", tuple(tokens))


def rejects_prefill(tokens: Iterable[str]) -> Step:
    """A provider without prefill: a last ``assistant`` message gets a 400; else ``ok``."""
    return Step("rejects_prefill", tuple(tokens))


def no_head() -> Step:
    """Accept the request, then send nothing at all (no status line) until the client
    leaves; the client's close counts in ``closed_by_client``."""
    return Step("no_head")


def zero_usage(tokens: Iterable[str]) -> Step:
    """A normal stream whose usage chunk says ``completion_tokens: 0`` explicitly."""
    return Step("zero_usage", tuple(tokens))


def _prefix_of(request: RecordedRequest) -> str | None:
    body = request.json if isinstance(request.json, dict) else {}
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return str(messages[-1].get("content") or "")
    return None


def _rest_after(tokens: Sequence[str], prefix: str) -> tuple[str, ...] | None:
    """The tokens that follow ``prefix`` (the one it ends inside, cut), or None: the
    simulator's own rule for a prefilled answer."""
    rest = after_prefix(list(tokens), prefix)
    return None if rest is None else tuple(rest)


async def _respond_failover(
    up: FaultUpstream, conn: _Conn, request: RecordedRequest, step: Step, in_body: list[bool]
) -> bool:
    kind = step.kind
    if kind == "no_head":
        in_body[0] = True  # so the client's close is counted
        await conn.pause(None)
        raise _ClientGone  # unreachable: pause(None) only returns by raising
    prefix = _prefix_of(request)
    tokens = step.tokens
    if kind == "rejects_prefill" and prefix is not None:
        await _write_plain(conn, 400, {"error": {
            "message": "assistant message prefill is not supported",
            "type": "invalid_request_error", "code": "unsupported_prefill"}}, ())
        return True
    if kind == "continues" and prefix is not None:
        rest = _rest_after(tokens, prefix)
        if rest is None:
            await _write_plain(conn, 400, {"error": {
                "message": "the assistant prefix is not the start of this answer",
                "type": "invalid_request_error"}}, ())
            return True
        tokens = rest
    ev = up._events(request)
    await conn.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    in_body[0] = True
    events = ev.full(Step("ok", tokens))
    if kind == "zero_usage":
        events[-2] = b"data: " + orjson.dumps({
            "id": ev.id, "object": "chat.completion.chunk", "created": ev.created,
            "model": ev.model, "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5},
        }) + b"\n\n"
    for event in events:
        await conn.chunk(event)
    await conn.write(b"0\r\n\r\n")
    return True
