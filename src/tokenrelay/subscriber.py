"""The subscriber: an ASGI response that replays a stream's journal and then tails it.

The response's own task runs the **send loop**: it reads frames after ``after`` from the
journal and writes them (all that is pending in one write, so a subscriber that fell behind
catches up in big writes); when nothing arrives for ``heartbeat_s`` it writes a
``: heartbeat`` comment; a write stuck for ``send_timeout_s`` drops the client instead of
holding memory; in a cluster it also notices a dead owner and ends the stream with
``error``/``interrupted``. When the client leaves, the send loop is cancelled, and absorbs
that one cancellation (``Task.uncancel``): told by the server's protocol
(:mod:`tokenrelay.protocol`), or under another server by a small task waiting for
``http.disconnect``.

The generation never waits for a subscriber: a subscriber is only an index into the
journal. ``ARCHITECTURE.md`` draws the timelines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import orjson

from tokenrelay import events as ev
from tokenrelay import timerwheel
from tokenrelay.asgi import (
    DEFERRED,
    ON_DISCONNECT,
    Deferred,
    Disconnect,
    Message,
    Receive,
    Scope,
    Send,
)
from tokenrelay.errors import TokenRelayError
from tokenrelay.hub import Hub
from tokenrelay.protocol import chunk_cycle, write_chunk

log = logging.getLogger("tokenrelay.subscriber")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


# A send driven by hand (_Follower.push): the coroutine it returns suspends, if at all, on
# an asyncio future, or on a bare yield (None).
_Write = Coroutine[asyncio.Future[Any] | None, None, None]
_DrivenSend = Callable[[Message], _Write]


class SubscriberResponse:
    """Streams one journal stream to one client as SSE (see module docstring)."""

    # Slots, and the body a bound method rather than a closure: this object lives as long
    # as the stream.
    __slots__ = ("_hook", "_receive", "_send", "after", "headers", "heartbeat", "hub",
                 "stream_id", "transform")

    def __init__(
        self,
        hub: Hub,
        stream_id: str,
        after: int = 0,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        transform: Callable[[list[bytes]], bytes] | None = None,
        heartbeat: bytes = ev.HEARTBEAT,
    ) -> None:
        self.hub = hub
        self.stream_id = stream_id
        self.after = after
        self.headers = SSE_HEADERS + [(b"x-stream-id", stream_id.encode())] + (headers or [])
        self.transform = transform
        self.heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, self.headers = self.headers, []  # sent: not kept for the stream's life
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        deferred: Deferred | None = scope.get(DEFERRED)
        if deferred is not None:
            send = deferred.send  # body chunks skip the middleware (see app.py)
        self._send = send
        self._receive = receive
        self._hook: Disconnect | None = scope.get(ON_DISCONNECT)
        if deferred is not None and deferred.body is None:
            deferred.body = self._body  # run by the app (Deferred)
            return
        await self._body()

    async def _body(self) -> None:
        """Subscribe, run the send loop, end the response: one coroutine, not a method
        per part, as its frame waits under every open stream (bench/memory_probe.py)."""
        send, receive, hook = self._send, self._receive, self._hook
        hub = self.hub
        journal = hub.journal
        async with hub.subscribed(self.stream_id):
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            deadline = _SendDeadline(loop, hub.settings.send_timeout_s)
            deadline.task = task
            listener = _Listener(task)
            listening: asyncio.Task[None] | None = None
            if hook is None:  # a server other than ours: a task waits in receive()
                listening = loop.create_task(listener.run(receive))
            elif hook.gone:
                listener.disconnected()
            else:
                hook.callbacks.append(listener.disconnected)
            follower = _Follower(self.after, send, self.transform, deadline)
            completed = False
            final = b""  # the last frames, written with the end of the response
            try:
                # The send loop (module docstring).
                heartbeat_s = hub.settings.heartbeat_s
                # Only a shared journal can outlive the instance that writes to it.
                lease_check = journal.owner_alive if journal.distributed else None
                check_every = journal.lease_s / 2
                transform = self.transform
                write = follower.write
                # A comment first: bytes reach the client (and any proxy) before the
                # upstream answers. What the journal holds already (the start event, or
                # a resumed stream's frames) goes in the same write: one syscall and one
                # segment where there were two, on every request.
                result = await journal.read(self.stream_id, follower.pos, 0.0)
                opening = b": stream " + self.stream_id.encode() + b"\n\n"
                if result.frames:
                    follower.pos += len(result.frames)
                    opening += transform(result.frames) if transform is not None else (
                        b"".join(result.frames))
                if result.finished:
                    final = opening
                else:
                    await write(opening)
                # Not kept by this frame, which waits under every open stream.
                opening = b""
                while not result.finished:
                    wait = max(0.0, heartbeat_s - (time.monotonic() - follower.last_write))
                    if lease_check is not None:
                        wait = min(wait, check_every)
                    deadline.park()
                    # While parked here, the journal may write new frames through the
                    # follower itself (no wake-up of this task); it returns what is left.
                    result = await journal.read(
                        self.stream_id, follower.pos, wait, follower=follower
                    )
                    await follower.settle()
                    if result.frames:
                        follower.pos += len(result.frames)
                        if result.finished:  # with the end of the response: one write
                            final = transform(result.frames) if transform is not None else (
                                b"".join(result.frames))
                            break
                        if transform is not None:
                            data = transform(result.frames)
                            if data:
                                await write(data)
                        else:
                            await write(b"".join(result.frames))
                        continue
                    if result.finished:
                        break
                    if time.monotonic() - follower.last_write >= heartbeat_s * 0.999:
                        await write(self.heartbeat)
                    if lease_check is not None and self.stream_id not in hub.generations:
                        if not await lease_check(self.stream_id):
                            await end_interrupted(hub, self.stream_id)
                completed = True
            except asyncio.CancelledError:
                # Absorb only our own cancellations: the client left, or a write stuck
                # past the deadline (which can fire just before the loop awaits it).
                if not (listener.gone or deadline.expired) or task.uncancel() > 0:
                    raise
            except (TimeoutError, OSError, TokenRelayError) as exc:
                # A client that stopped reading, a broken socket, or a stream that expired.
                log.debug("subscriber of %s ended: %s", self.stream_id[:8], type(exc).__name__)
            finally:
                follower.close()  # a send a push left suspended, if the loop ended meanwhile
                listener.armed = False  # from here on a disconnect cancels nothing
                deadline.close()
                if listening is not None:
                    listening.cancel()
                    await asyncio.wait((listening,))
                elif hook is not None and not hook.gone:
                    hook.callbacks.remove(listener.disconnected)
            if completed and not listener.gone:
                try:  # under the send deadline too: the last frames may wait for a reader
                    await deadline.send(send, {"type": "http.response.body", "body": final,
                                               "more_body": False})
                except (TimeoutError, OSError) as exc:
                    log.debug("subscriber of %s ended: %s", self.stream_id[:8],
                              type(exc).__name__)
                finally:
                    deadline.close()  # not left on the timer wheel, holding this task


class _Follower:
    """Writes frames pushed by the journal while the send loop is parked in ``read`` (a
    :class:`~tokenrelay.journal.base.Follower`).

    The push runs inside the generation's append, so a caught-up subscriber costs no task
    wake-up per upstream read. The server's ``send`` is driven by hand: it almost always
    completes without suspending (the socket takes the bytes); when it does suspend (the
    client is not reading and flow control paused the transport), the half-run send is
    kept and the parked read returns, so the send loop finishes it in its own task under
    the send deadline (``settle``). A failure is kept and raised there too.
    """

    __slots__ = ("_cycle", "_deadline", "_send", "_transform", "error", "last_write", "pending",
                 "pos")

    def __init__(
        self,
        pos: int,
        send: Send,
        transform: Callable[[list[bytes]], bytes] | None,
        deadline: _SendDeadline,
    ) -> None:
        self.pos = pos
        # ASGI promises an awaitable; every server's send is a coroutine function, which
        # push relies on (a send that is not fails there, and the send loop raises it).
        self._send = cast(_DrivenSend, send)
        # uvicorn's httptools request cycle behind send: a push that need not wait writes
        # straight to it (protocol.write_chunk), no coroutine per read.
        self._cycle = chunk_cycle(send)
        self._transform = transform
        self._deadline = deadline
        self.last_write = time.monotonic()
        # (suspended send, what it waits for)
        self.pending: tuple[_Write, asyncio.Future[Any] | None] | None = None
        self.error: BaseException | None = None

    def push(self, frames: list[bytes]) -> bool:
        if self.pending is not None or self.error is not None:
            return False
        try:
            if self._transform is not None:
                data = self._transform(frames)
            else:
                data = frames[0] if len(frames) == 1 else b"".join(frames)
        except Exception as exc:  # a bug in a transform must end this response only
            self.error = exc
            return False
        self.pos += len(frames)
        if not data:
            return True
        cycle = self._cycle
        if cycle is not None:
            try:
                if write_chunk(cycle, data):
                    self.last_write = time.monotonic()
                    return True
            except Exception as exc:  # a broken socket: the send loop raises it
                self.error = exc
                return False
        coro = self._send({"type": "http.response.body", "body": data, "more_body": True})
        try:
            waiting_for = coro.send(None)
        except StopIteration:
            self.last_write = time.monotonic()
            return True
        except Exception as exc:  # a broken socket: the send loop raises it
            self.error = exc
            return False
        self.pending = (coro, waiting_for)
        self._deadline.begin()
        return False

    async def write(self, data: bytes) -> None:
        """Write from the send loop's own task, under the send deadline."""
        await self._deadline.send(self._send, {"type": "http.response.body", "body": data,
                                               "more_body": True})
        self.last_write = time.monotonic()

    def close(self) -> None:
        """The send loop is over: drop a send that a push left suspended."""
        if self.pending is not None:
            self.pending[0].close()
            self.pending = None

    async def settle(self) -> None:
        """Finish a send that suspended during a push; raise what a push hit."""
        if self.pending is not None:
            coro, waiting_for = self.pending
            self.pending = None
            await self._deadline.wait(_finish_suspended(coro, waiting_for))
            self.last_write = time.monotonic()
        if self.error is not None:
            raise self.error


async def _finish_suspended(coro: _Write, waiting_for: asyncio.Future[Any] | None) -> None:
    """Run to its end, in this task, a coroutine that suspended while driven by hand.

    It suspended on ``waiting_for`` (an asyncio future, or None for a bare yield); this
    awaits that, then resumes it, as a task would, until it returns. Cancellation reaches
    it like any await.
    """
    try:
        while True:
            try:
                if waiting_for is None:
                    await asyncio.sleep(0)
                else:
                    # What a task does with a future its coroutine yields; awaiting it
                    # again would otherwise fail ("await wasn't used with future").
                    waiting_for._asyncio_future_blocking = False
                    await waiting_for
            except BaseException as exc:
                waiting_for = coro.throw(exc)
            else:
                waiting_for = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()


class _SendDeadline:
    """The send timeout of one subscriber, without a timer per write.

    A write only stamps when it began; one timer, re-armed lazily, cancels the send task
    once a write has been stuck for ``timeout`` (a client that stopped reading), and that
    write then raises TimeoutError, as ``asyncio.timeout`` would. Frames are on the
    per-token path, so this saves a timer create/cancel per write.
    """

    __slots__ = ("_handle", "_loop", "_timeout", "expired", "started", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self.task: asyncio.Task[None] | None = None  # the send loop, set once created
        self._timeout = timeout
        # On the timer wheel: a loop timer costs ~5k instructions to arm and drop, and a
        # short answer armed one per write; a send stuck for seconds may be cut a tick late.
        self._handle: timerwheel.Deadline | None = None
        self.started = 0.0  # loop time the pending write began; 0.0 when none
        self.expired = False

    def _fire(self) -> None:
        self._handle = None
        if not self.started:
            return
        due = self.started + self._timeout
        if self._loop.time() >= due:
            self.expired = True
            if self.task is not None:
                self.task.cancel()
        else:
            self._handle = timerwheel.call_at(self._loop, due, self._fire)

    def begin(self) -> None:
        """A write starts now (it may finish elsewhere: see ``_Follower``)."""
        self.started = self._loop.time()
        if self._handle is None:
            self._handle = timerwheel.call_at(self._loop, self.started + self._timeout,
                                              self._fire)

    async def wait(self, write: Awaitable[None]) -> None:
        """Await a write begun with ``begin``; TimeoutError if the deadline cancelled it."""
        try:
            await write
        except asyncio.CancelledError:
            if self.expired and self.task is not None and self.task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self.started = 0.0

    async def send(self, send: Send, message: Message) -> None:
        self.begin()
        await self.wait(send(message))

    def park(self) -> None:
        """No write is pending. The deadline stays on the timer wheel (a few dozen bytes,
        where a uvloop timer was ~0.5 KB): when its tick comes with no write pending it is
        dropped, and until then the next write arms nothing. Cancelled instead, a parked
        subscriber would leave one dead entry per write on the wheel for ``timeout``."""

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _Listener:
    """Told of the disconnect (by our protocol's callback, or by its own task waiting for
    ``http.disconnect``), cancels the send loop while it is armed.

    Disarmed synchronously once the send loop has returned, so its cancellation can only
    ever land inside the send loop, where it is absorbed.
    """

    __slots__ = ("armed", "gone", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.armed = True
        self.gone = False

    def disconnected(self) -> None:
        self.gone = True
        if self.armed:
            self.task.cancel()

    async def run(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected()
                return


async def end_interrupted(hub: Hub, stream_id: str) -> None:
    """Write the terminal frame for a stream whose owning instance died."""
    info = await hub.journal.info(stream_id)
    if info is None or info.finished:
        return
    error = TokenRelayError(
        "the instance generating this answer stopped; the partial answer is kept",
        code="interrupted",
    )
    error.retryable = True
    payload = {"error": error.to_dict(), "state": ev.INTERRUPTED, "model": info.meta.get("model")}
    frame = ev.frame(info.last_seq + 1, ev.ERROR, ev.dumps(payload))
    if await hub.journal.finish(stream_id, frame, ev.INTERRUPTED):
        message_id = info.meta.get("message_id")
        if hub.store is not None and isinstance(message_id, str):
            # The journal holds every relayed event (the owner's last checkpoint may be a
            # second behind): keep exactly what the followers saw.
            text: tuple[str, str] | tuple[()] = ()
            try:
                text = await _relayed_text(hub, stream_id)
            except Exception as exc:
                log.warning("cannot read the text of stream %s back (%s)", stream_id[:8],
                            type(exc).__name__)
            with contextlib.suppress(Exception):  # the start-up sweep catches it otherwise
                await hub.store.mark_interrupted(message_id, *text)


async def _relayed_text(hub: Hub, stream_id: str) -> tuple[str, str]:
    """The content and reasoning of a finished stream, rebuilt from its journal frames."""
    content: list[str] = []
    reasoning: list[str] = []
    after = 0
    while True:
        result = await hub.journal.read(stream_id, after, timeout=0)
        for raw in result.frames:
            after, name, data = ev.parse_frame(raw)
            if name is None:  # only text deltas are unnamed
                content.append(orjson.loads(data)["content"])
            elif name == ev.REASONING:
                reasoning.append(orjson.loads(data)["reasoning"])
        if result.finished or not result.frames:
            return "".join(content), "".join(reasoning)
