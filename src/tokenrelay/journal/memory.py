"""In-process journal: the embedded default for a single tokenrelay process.

Each stream is a list of frames; readers park on a future that the next append resolves,
so a generation wakes its subscribers once per upstream read, not once per token. A parked
reader that passed a *follower* is not even woken: the append hands it the new frames
synchronously (``Follower.push``), so a caught-up subscriber costs no task switch per read.
A slow reader only holds an index into the list: it never slows the writer or other readers.

A finished stream leaves when its retention ends, not only when a reader or a new stream
happens to notice: finished streams queue in finish order (they expire in that order), and
one loop timer at a time waits for the oldest. So a long answer's frames are freed on time,
and dropping a big one asks for a ``malloc_trim`` (``memtrim.py``) so the process shrinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from typing import Any

from tokenrelay import timerwheel
from tokenrelay.config import JournalLimits
from tokenrelay.errors import JournalFull, StreamNotFound
from tokenrelay.journal.base import Follower, Journal, ReadResult, StreamInfo
from tokenrelay.memtrim import BIG, Trimmer


class _Waiter:
    """A parked read: its future, and the follower that may take frames without waking."""

    __slots__ = ("follower", "fut")

    def __init__(self, fut: asyncio.Future[None], follower: Follower | None) -> None:
        self.fut = fut
        self.follower = follower


class _Stream:
    __slots__ = ("expires_at", "finished", "frames", "meta", "nbytes", "state", "waiters")

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.frames: list[bytes] = []
        self.nbytes = 0
        self.finished = False
        self.state: str | None = None
        self.waiters: list[_Waiter] = []
        self.expires_at = 0.0

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.fut.done():
                w.fut.set_result(None)


def _expire(stream: _Stream, waiter: _Waiter) -> None:
    """A read's wait ran out: wake it with nothing, and forget it."""
    if not waiter.fut.done():
        waiter.fut.set_result(None)
        with contextlib.suppress(ValueError):
            stream.waiters.remove(waiter)


class MemoryJournal(Journal):
    """Bounded in-memory journal (see :mod:`tokenrelay.journal.base` for the contract)."""

    def __init__(self, limits: JournalLimits | None = None) -> None:
        self.limits = limits or JournalLimits()
        # Insertion order = creation order, so eviction scans the oldest first.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self.trimmer = Trimmer()
        # (expires_at, id, stream) in finish order; entries of streams already evicted
        # are skipped when they come up.
        self._expiring: deque[tuple[float, str, _Stream]] = deque()
        self._sweep: asyncio.TimerHandle | None = None

    def _drop(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.nbytes >= BIG:
            self.trimmer.soon()

    def _get(self, stream_id: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or (stream.finished and stream.expires_at <= time.monotonic()):
            if stream is not None:
                self._drop(stream_id)
            raise StreamNotFound("no such stream (unknown or expired)")
        return stream

    def _queue_expiry(self, stream_id: str, stream: _Stream) -> None:
        expiring = self._expiring
        expiring.append((stream.expires_at, stream_id, stream))
        if len(expiring) > 2 * self.limits.max_streams:  # evicted ones pile up: forget them
            self._expiring = deque(e for e in expiring if self._streams.get(e[1]) is e[2])
        if self._sweep is None:
            self._arm()

    def _arm(self) -> None:
        delay = max(0.0, self._expiring[0][0] - time.monotonic())
        self._sweep = asyncio.get_running_loop().call_later(delay + 0.001, self._expire)

    def _expire(self) -> None:
        """The oldest finished streams' retention ended: drop them (the loop timer)."""
        self._sweep = None
        now = time.monotonic()
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            _, stream_id, stream = expiring.popleft()
            if self._streams.get(stream_id) is stream:
                self._drop(stream_id)
        if expiring:
            self._arm()

    def _evict(self) -> None:
        now = time.monotonic()
        for sid in [s for s, st in self._streams.items() if st.finished and st.expires_at <= now]:
            self._drop(sid)
        if len(self._streams) < self.limits.max_streams:
            return
        for sid, st in self._streams.items():
            if st.finished:
                self._drop(sid)
                return
        raise JournalFull(
            f"too many live streams (journal max_streams={self.limits.max_streams})"
        )

    async def create(self, stream_id: str, meta: dict[str, Any]) -> None:
        if len(self._streams) >= self.limits.max_streams:
            self._evict()
        self._streams[stream_id] = _Stream(meta)

    sync_append = True

    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        self.append_now(stream_id, frames)

    def append_now(self, stream_id: str, frames: list[bytes]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.finished:
            stream = self._get(stream_id)  # what it says about these (the same dict get)
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
        before = len(stream.frames)
        stream.frames.extend(frames)
        stream.nbytes += size
        if stream.waiters:
            # Push the new frames to caught-up followers, wake the other readers: in place
            # (a push never adds or removes a waiter, and usually all stay parked).
            woken = False
            for w in stream.waiters:
                fut = w.fut
                if not fut.done():
                    follower = w.follower
                    if follower is not None and follower.pos == before and follower.push(frames):
                        continue  # delivered: it stays parked
                    fut.set_result(None)
                woken = True
            if woken:  # the parked ones are those whose future is still pending
                stream.waiters = [w for w in stream.waiters if not w.fut.done()]

    async def finish(self, stream_id: str, frame: bytes, state: str) -> bool:
        stream = self._get(stream_id)
        if stream.finished:
            return False
        stream.frames.append(frame)
        stream.nbytes += len(frame)
        stream.finished = True
        stream.state = state
        stream.expires_at = time.monotonic() + self.limits.retention_s
        self._queue_expiry(stream_id, stream)
        stream.wake()
        return True

    async def read(
        self,
        stream_id: str,
        after: int,
        timeout: float,
        limit: int = 2048,
        follower: Follower | None = None,
    ) -> ReadResult:
        stream = self._get(stream_id)
        if after >= len(stream.frames) and not stream.finished and timeout > 0:
            # A coarse timer that resolves the future: cheaper than asyncio.timeout (and
            # than a loop timer per parked subscriber), and a timeout is not an error here
            # (the caller heartbeats).
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop.create_future(), follower)
            stream.waiters.append(waiter)
            timer = timerwheel.call_at(loop, loop.time() + timeout, _expire, stream, waiter)
            try:
                await waiter.fut
            finally:
                timer.cancel()
                if not waiter.fut.done():
                    waiter.fut.cancel()
                # A cancelled read (its task was cancelled) must leave no waiter behind.
                if waiter in stream.waiters:
                    stream.waiters.remove(waiter)
            if follower is not None:
                after = follower.pos  # past what was pushed while parked
        frames = stream.frames[after : after + limit] if after < len(stream.frames) else []
        done = stream.finished and after + len(frames) >= len(stream.frames)
        return ReadResult(frames, done, stream.state)

    async def info(self, stream_id: str) -> StreamInfo | None:
        try:
            stream = self._get(stream_id)
        except StreamNotFound:
            return None
        return StreamInfo(stream_id, stream.meta, stream.finished, stream.state, len(stream.frames))

    async def delete(self, stream_id: str) -> bool:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return False
        stream.wake()
        return True

    async def hold(self, stream_ids: Collection[str]) -> None:
        """Nothing to renew: the owner is this process, which is alive if it runs this."""

    async def owner_alive(self, stream_id: str) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._streams)

    async def aclose(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
