"""In-process journal: the embedded default for a single tokenrelay process.

Each stream is a list of frames; readers park on a future that the next append resolves,
so a generation wakes its subscribers once per upstream read, not once per token. A slow
reader only holds an index into the list: it never slows the writer or other readers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

from tokenrelay.errors import JournalFull, StreamNotFound
from tokenrelay.journal.base import Journal, JournalLimits, ReadResult, StreamInfo


class _Stream:
    __slots__ = ("expires_at", "finished", "frames", "meta", "nbytes", "state", "waiters")

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.frames: list[bytes] = []
        self.nbytes = 0
        self.finished = False
        self.state: str | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self.expires_at = 0.0

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


def _expire(stream: _Stream, fut: asyncio.Future[None]) -> None:
    """A read's wait ran out: wake it with nothing, and forget it."""
    if not fut.done():
        fut.set_result(None)
        try:
            stream.waiters.remove(fut)
        except ValueError:
            pass


class MemoryJournal(Journal):
    """Bounded in-memory journal (see :mod:`tokenrelay.journal.base` for the contract)."""

    def __init__(self, limits: JournalLimits | None = None) -> None:
        self.limits = limits or JournalLimits()
        # Insertion order = creation order, so eviction scans the oldest first.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

    def _get(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or (stream.finished and stream.expires_at <= time.monotonic()):
            if stream is not None:
                del self._streams[stream_id]
            raise StreamNotFound("no such stream (unknown or expired)")
        return stream

    def _evict(self) -> None:
        now = time.monotonic()
        for sid in [s for s, st in self._streams.items() if st.finished and st.expires_at <= now]:
            del self._streams[sid]
        if len(self._streams) < self.limits.max_streams:
            return
        for sid, st in self._streams.items():
            if st.finished:
                del self._streams[sid]
                return
        raise JournalFull(
            f"too many live streams (journal max_streams={self.limits.max_streams})"
        )

    async def create(self, stream_id: str, meta: dict[str, Any]) -> None:
        if len(self._streams) >= self.limits.max_streams:
            self._evict()
        self._streams[stream_id] = _Stream(meta)

    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        stream = self._get(stream_id)
        size = 0
        for f in frames:
            size += len(f)
        limits = self.limits
        if (
            len(stream.frames) + len(frames) > limits.max_events
            or stream.nbytes + size > limits.max_bytes
        ):
            raise JournalFull(
                f"stream exceeds the journal bound ({limits.max_events} events, "
                f"{limits.max_bytes} bytes)"
            )
        stream.frames.extend(frames)
        stream.nbytes += size
        if stream.waiters:
            stream.wake()

    async def finish(self, stream_id: str, frame: bytes, state: str) -> bool:
        stream = self._get(stream_id)
        if stream.finished:
            return False
        stream.frames.append(frame)
        stream.nbytes += len(frame)
        stream.finished = True
        stream.state = state
        stream.expires_at = time.monotonic() + self.limits.retention_s
        stream.wake()
        return True

    async def read(
        self, stream_id: str, after: int, timeout: float, limit: int = 2048
    ) -> ReadResult:
        stream = self._get(stream_id)
        if after >= len(stream.frames) and not stream.finished and timeout > 0:
            # A plain timer that resolves the future: cheaper than asyncio.timeout on the
            # per-read path, and a timeout is not an error here (the caller heartbeats).
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            stream.waiters.append(fut)
            timer = loop.call_later(timeout, _expire, stream, fut)
            try:
                await fut
            finally:
                timer.cancel()
                if not fut.done():
                    fut.cancel()
                    try:
                        stream.waiters.remove(fut)
                    except ValueError:
                        pass
        frames = stream.frames[after : after + limit] if after < len(stream.frames) else []
        done = stream.finished and after + len(frames) >= len(stream.frames)
        return ReadResult(frames, done, stream.state)

    async def info(self, stream_id: str) -> StreamInfo | None:
        try:
            stream = self._get(stream_id)
        except StreamNotFound:
            return None
        return StreamInfo(stream_id, stream.meta, stream.finished, stream.state, len(stream.frames))

    async def hold(self, stream_ids: Collection[str]) -> None:
        """Nothing to renew: the owner is this process, which is alive if it runs this."""

    async def owner_alive(self, stream_id: str) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._streams)
