"""Wake-ups for the Redis journal's waiting readers: one pub/sub connection per journal.

A reader of :class:`~tokenrelay.journal.redis.RedisJournal` that has caught up waits for
the stream's ``P n:ID`` channel ("new frames up to seq", published by append and finish)
instead of holding a Redis connection or polling. One :class:`Notifier` per journal keeps a
single pub/sub connection subscribed to the channels of streams that local readers wait
on, and one XRANGE per announced batch serves every local reader of that stream; frames
this process appends go straight to its own waiting readers. A reader re-checks with
XRANGE after a timeout or a reconnect, so a lost notification costs latency, never frames.

The journal hands the notifier its coalesced read (:data:`Fetch`); the Redis error
translation (:func:`unavailable`) and the frame helpers are shared with the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.errors import ServiceUnavailable
from tokenrelay.journal.base import ReadResult

# The journal's logger: the notifier's warnings kept their name when it moved out of redis.py.
log = logging.getLogger("tokenrelay.journal.redis")

DOWN = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """Translate "cannot talk to Redis" into the one error the routes turn into a 503."""
    try:
        yield
    except DOWN as exc:
        raise ServiceUnavailable("redis unavailable") from exc


def seq_of(frame: bytes) -> int:
    """The ``id:`` of one of our frames (``b"id: 7\\n..."``)."""
    return int(frame[4 : frame.index(b"\n")])


@dataclass(slots=True)
class Range:
    """One XRANGE with the stream's state, before it is cut for a given reader."""

    frames: list[bytes]
    finished: bool
    state: str | None
    last_seq: int

    def cut(self, low: int, after: int, limit: int) -> ReadResult:
        """The part of these frames (seqs ``low + 1``...) that a reader after ``after`` wants."""
        part = self.frames[after - low : after - low + limit]
        done = self.finished and after + len(part) >= self.last_seq
        return ReadResult(part, done, self.state)


Fetch = Callable[[str, int, int], Awaitable[Range]]
_Waiter = tuple[int, int, "asyncio.Future[ReadResult | None]"]  # after, limit, future


class _Channel:
    """Local state of one stream's notification channel."""

    __slots__ = (
        "confirmed",
        "fetching",
        "finished",
        "idle_since",
        "last_seq",
        "stream_id",
        "waiters",
    )

    def __init__(self, stream_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.stream_id = stream_id
        self.confirmed: asyncio.Future[None] = loop.create_future()
        self.waiters: list[_Waiter] = []
        self.idle_since = time.monotonic()
        # Highest seq announced while continuously subscribed (None: unknown). A reader
        # at or past it can wait without an XRANGE: anything newer will be announced.
        self.last_seq: int | None = None
        self.finished = False
        self.fetching: asyncio.Task[None] | None = None

    def wake_all(self) -> None:
        """Every waiter returns and re-checks with its own XRANGE."""
        waiters, self.waiters = self.waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self.idle_since = time.monotonic()


class Notifier:
    """One pub/sub connection per journal that wakes every local reader (see module doc).

    When a stream announces new frames, one XRANGE serves all of this process's readers
    of that stream (each gets its slice), so a thousand tabs on one answer cost one read
    per batch, not a thousand. Channels stay subscribed while readers wait on them and
    ``idle_s`` after the last one left, so a subscriber tailing a live stream does not
    re-subscribe per batch. Readers send SUBSCRIBE themselves (under a lock) while the
    listener task reads, so a new channel costs one round trip. When the connection
    fails, every waiter is woken to re-check, the state is dropped, and the next
    subscription waits for a backoff (0.05 s doubling to 2 s).
    """

    def __init__(self, client: aioredis.Redis, fetch: Fetch, idle_s: float = 15.0) -> None:
        self._client = client
        self._fetch = fetch
        self._idle_s = idle_s
        self._channels: dict[bytes, _Channel] = {}
        self._pending: set[bytes] = set()  # registered, SUBSCRIBE not sent yet
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one sender of SUBSCRIBE/UNSUBSCRIBE at a time
        self._backoff = 0.0
        self._not_before = 0.0
        self._closed = False

    def confirmed(self, channel: bytes) -> bool:
        ch = self._channels.get(channel)
        return ch is not None and ch.confirmed.done()

    def kick(self, channel: bytes, after: int, *, force: bool = False) -> None:
        """Fetch for the waiters of ``channel`` unless announcements say nothing is new."""
        ch = self._channels.get(channel)
        if ch is None or ch.fetching is not None:
            return  # a running fetch re-checks every waiter against the latest seq
        if force or ch.last_seq is None or ch.finished or after < ch.last_seq:
            ch.fetching = asyncio.get_running_loop().create_task(self._deliver(ch))

    def register(
        self, channel: bytes, stream_id: str, after: int, limit: int
    ) -> asyncio.Future[ReadResult | None]:
        """A future resolved with frames after ``after``, or None for "re-check yourself"."""
        loop = asyncio.get_running_loop()
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(stream_id, loop)
            self._pending.add(channel)
        fut: asyncio.Future[ReadResult | None] = loop.create_future()
        ch.waiters.append((after, limit, fut))
        return fut

    def appended(self, channel: bytes, frames: list[bytes]) -> None:
        """This process just appended ``frames``: hand them to the local waiters that are
        right before them, without waiting for the announcement and an XRANGE (a request
        reads the answer its own process generates). Others wait for the usual path."""
        ch = self._channels.get(channel)
        if ch is None or not ch.waiters:
            return
        low = seq_of(frames[0]) - 1
        got = Range(frames, False, None, low + len(frames))
        keep: list[_Waiter] = []
        for after, limit, fut in ch.waiters:
            if fut.done():
                continue
            if low <= after < got.last_seq:
                fut.set_result(got.cut(low, after, limit))
            else:
                keep.append((after, limit, fut))
        ch.waiters = keep
        if not keep:
            ch.idle_since = time.monotonic()

    def unregister(self, channel: bytes, fut: asyncio.Future[ReadResult | None]) -> None:
        if not fut.done():
            fut.cancel()
        ch = self._channels.get(channel)
        if ch is not None and ch.waiters:
            ch.waiters = [w for w in ch.waiters if w[2] is not fut]
            if not ch.waiters:
                ch.idle_since = time.monotonic()

    async def until_confirmed(self, channel: bytes, timeout: float) -> bool:
        """Subscribe if needed; True once Redis confirmed the subscription within ``timeout``."""
        ch = self._channels.get(channel)
        if ch is None:
            return False
        if not ch.confirmed.done():
            try:
                async with asyncio.timeout(timeout):
                    delay = self._not_before - time.monotonic()
                    if delay > 0:  # backing off after a failure
                        await asyncio.sleep(delay)
                    await self._flush()
                    await asyncio.shield(ch.confirmed)
            except TimeoutError:
                return False
        return True

    async def _flush(self) -> None:
        """Send SUBSCRIBE for the channels registered since the last flush."""
        if self._closed:
            return
        async with self._lock:
            if not self._pending:
                return
            channels = list(self._pending)
            self._pending.clear()
            try:
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub()
                with unavailable():
                    await self._pubsub.subscribe(*channels)
            except BaseException:
                self._pending.update(c for c in channels if c in self._channels)
                raise
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        last_sweep = time.monotonic()
        while not self._closed and self._pubsub is not None:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
                self._backoff = 0.0
                if msg is not None:
                    self._dispatch(msg)
                if time.monotonic() - last_sweep > self._idle_s / 3:
                    last_sweep = time.monotonic()
                    await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("redis notifications failed (%s); will resubscribe", type(exc).__name__)
                await self._reset()
                return

    def _dispatch(self, msg: dict[str, Any]) -> None:
        ch = self._channels.get(msg["channel"])
        if ch is None:
            return
        kind = msg["type"]
        if kind == "message":
            try:
                seq = int(msg["data"])  # negative: the terminal frame
            except (TypeError, ValueError):
                ch.last_seq = None
                ch.wake_all()
                return
            if seq < 0:
                seq = -seq
                ch.finished = True
            if ch.last_seq is None or seq > ch.last_seq:
                ch.last_seq = seq
            if ch.fetching is None and any(after < seq for after, _, _ in ch.waiters):
                ch.fetching = asyncio.get_running_loop().create_task(self._deliver(ch))
        elif kind == "subscribe":
            if not ch.confirmed.done():
                ch.confirmed.set_result(None)
            else:
                # redis-py resubscribed after a reconnect: messages may be lost, re-check.
                ch.last_seq = None
                ch.wake_all()

    async def _deliver(self, ch: _Channel) -> None:
        """Read once for all waiters of a stream and hand each its slice.

        Repeats while some waiter is behind the latest announced seq (announcements and
        readers keep arriving during a fetch); a round that serves nobody although
        someone is behind means the stream is not what we think: everyone re-checks.
        """
        try:
            while True:
                waiters = [w for w in ch.waiters if not w[2].done()]
                if not waiters:
                    return
                low = min(after for after, _, _ in waiters)
                try:
                    got = await self._fetch(ch.stream_id, low, max(lim for _, lim, _ in waiters))
                except Exception:
                    ch.wake_all()
                    return
                if got.frames and seq_of(got.frames[0]) != low + 1:  # not contiguous
                    ch.wake_all()
                    return
                keep: list[_Waiter] = []
                served = 0
                for after, limit, fut in ch.waiters:
                    if fut.done():
                        continue
                    if after >= low:
                        result = got.cut(low, after, limit)
                        if result.frames or result.finished:
                            fut.set_result(result)
                            served += 1
                            continue
                    keep.append((after, limit, fut))
                ch.waiters = keep
                if got.finished:
                    ch.finished = True
                if ch.last_seq is None or got.last_seq > ch.last_seq:
                    ch.last_seq = got.last_seq
                # Announcements that arrived during the fetch raised ch.last_seq.
                last = ch.last_seq
                if not any(after < last for after, _, _ in keep):
                    if not keep:
                        ch.idle_since = time.monotonic()
                    return
                if not served and not got.frames:
                    ch.wake_all()
                    return
        finally:
            ch.fetching = None

    async def _sweep(self) -> None:
        """Unsubscribe from channels nobody waited on for ``idle_s``."""
        now = time.monotonic()
        idle = [
            name
            for name, ch in self._channels.items()
            if not ch.waiters
            and ch.fetching is None
            and ch.confirmed.done()
            and now - ch.idle_since > self._idle_s
        ]
        if idle:
            for name in idle:
                del self._channels[name]
            async with self._lock:
                with unavailable():
                    await self._pubsub.unsubscribe(*idle)

    async def _reset(self) -> None:
        """Drop the connection and all state; waiters wake up and re-check with XRANGE."""
        self._backoff = min(max(self._backoff * 2, 0.05), 2.0)
        self._not_before = time.monotonic() + self._backoff
        pubsub, self._pubsub = self._pubsub, None
        channels, self._channels = self._channels, {}
        self._pending.clear()
        for ch in channels.values():
            if not ch.confirmed.done():
                ch.confirmed.set_result(None)
            ch.wake_all()
            if ch.fetching is not None:
                ch.fetching.cancel()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        fetches = [ch.fetching for ch in self._channels.values() if ch.fetching is not None]
        await self._reset()
        for fetch in fetches:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetch
