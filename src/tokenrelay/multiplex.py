"""Several streams over one SSE response: ``GET /api/events?streams=ID:SEQ,ID:SEQ``.

A browser opens at most six HTTP/1.1 connections per host, and each SSE response holds
one: the seventh tab that streams an answer waits for a free connection. The chat page
therefore follows its answers through one SharedWorker (``web/streams-worker.js``) that
holds a single multiplexed response for all of the browser's tabs.

Each frame is the stream's journal frame unchanged, preceded by a ``stream: <id>`` line
(an SSE field that standard parsers ignore), so ``id: <seq>`` still numbers the frame
within its stream and resuming is "each stream after its own seq". A stream that cannot
be read (unknown, expired, another tenant's) gets one ``event: gone`` frame. The response
ends when every stream has ended. Heartbeats, the send timeout and the dead-owner check
(cluster) work as in :mod:`tokenrelay.subscriber`, which serves the one-stream case on
the hot path; this response is for the page's many-tabs case and favours simplicity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tokenrelay import events as ev
from tokenrelay.asgi import Receive, Scope, Send
from tokenrelay.errors import BadRequest, StreamNotFound, TokenRelayError
from tokenrelay.hub import Hub
from tokenrelay.subscriber import SSE_HEADERS, end_interrupted

log = logging.getLogger("tokenrelay.multiplex")

MAX_STREAMS = 32  # per response: a browser's tabs, not a fan-out API


def parse_streams(value: str | None) -> dict[str, int]:
    """``ID:SEQ,ID:SEQ`` → {stream id: seq to resume after}; a clear 400 otherwise."""
    if not value:
        raise BadRequest("streams must list at least one ID:SEQ", code="invalid_streams")
    positions: dict[str, int] = {}
    for item in value.split(","):
        stream_id, sep, seq = item.strip().partition(":")
        if not sep or not stream_id or len(stream_id) > 64 or not seq.isdigit() or len(seq) > 18:
            raise BadRequest(f"streams: {item[:80]!r} is not ID:SEQ (SEQ a non-negative integer)",
                             code="invalid_streams")
        positions[stream_id] = int(seq)
    if len(positions) > MAX_STREAMS:
        raise BadRequest(f"streams: at most {MAX_STREAMS} per request", code="invalid_streams")
    return positions


class MultiplexResponse:
    """Streams the journal frames of several streams, tagged, to one client."""

    _send: Send  # the server's send, set by __call__ before any write

    def __init__(self, hub: Hub, owner: str, positions: dict[str, int]) -> None:
        self.hub = hub
        self.owner = owner
        self.positions = positions
        self._lock = asyncio.Lock()
        self._last_write = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        hub = self.hub
        readable: dict[str, int] = {}
        gone: list[str] = []
        for stream_id, after in self.positions.items():
            try:
                await hub.info(stream_id, self.owner)  # the owner check of a resume
                readable[stream_id] = after
            except StreamNotFound:
                gone.append(stream_id)
        async with contextlib.AsyncExitStack() as stack:
            # Counted as subscribers before the headers go out: a tab that sees them may
            # drop its own connection to a stream without starting its grace period.
            for stream_id in readable:
                await stack.enter_async_context(hub.subscribed(stream_id))
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*SSE_HEADERS, (b"x-streams", str(len(readable)).encode())]})
            try:
                await self._write(b": multiplex\n\n" + b"".join(_gone(s) for s in gone))
                await self._run(readable, receive)
            except (TimeoutError, OSError) as exc:
                log.debug("multiplexed subscriber ended: %s", type(exc).__name__)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run(self, readable: dict[str, int], receive: Receive) -> None:
        """Follow every stream until all have ended, or the client leaves."""
        followers = [asyncio.create_task(self._follow(s, a)) for s, a in readable.items()]
        helpers = [asyncio.create_task(self._heartbeats()),
                   asyncio.create_task(_disconnected(receive))]
        try:
            pending = set(followers)
            while pending:
                done, pending = await asyncio.wait(
                    pending | {helpers[1]}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is helpers[1]:
                        return  # the client left
                    task.result()  # a write that failed ends the response
                pending -= set(helpers)
        finally:
            for task in followers + helpers:
                task.cancel()
            await asyncio.gather(*followers, *helpers, return_exceptions=True)

    async def _follow(self, stream_id: str, after: int) -> None:
        hub = self.hub
        journal = hub.journal
        wait = hub.settings.heartbeat_s
        if journal.distributed:
            wait = min(wait, journal.lease_s / 2)
        tag = b"stream: " + stream_id.encode() + b"\n"
        while True:
            try:
                result = await journal.read(stream_id, after, wait)
            except TokenRelayError:  # expired meanwhile
                await self._write(_gone(stream_id))
                return
            if result.frames:
                after += len(result.frames)
                await self._write(b"".join(tag + frame for frame in result.frames))
            if result.finished:
                return
            if (not result.frames and journal.distributed and stream_id not in hub.generations
                    and not await journal.owner_alive(stream_id)):
                await end_interrupted(hub, stream_id)

    async def _heartbeats(self) -> None:
        heartbeat_s = self.hub.settings.heartbeat_s
        while True:
            await asyncio.sleep(max(0.0, heartbeat_s - (time.monotonic() - self._last_write)))
            if time.monotonic() - self._last_write >= heartbeat_s * 0.999:
                await self._write(ev.HEARTBEAT)

    async def _write(self, data: bytes) -> None:
        """One write at a time; a client that stops reading is dropped after the timeout."""
        async with self._lock:
            async with asyncio.timeout(self.hub.settings.send_timeout_s):
                await self._send({"type": "http.response.body", "body": data, "more_body": True})
            self._last_write = time.monotonic()


def _gone(stream_id: str) -> bytes:
    return b"stream: " + stream_id.encode() + b"\nevent: gone\ndata: {}\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
