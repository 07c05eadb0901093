"""The journal: an append-only, numbered list of SSE frames per stream.

One writer (the stream's generation) appends frames that already carry their ``id: <seq>``
(seq 1, 2, 3, ... with no gaps); any number of readers replay "everything after seq N" and
then tail. A stream ends with exactly one terminal frame written by :meth:`Journal.finish`.
Finished streams stay readable for ``retention_s`` seconds.

Backends are chosen by URL (``memory://`` or ``redis://...``) in
:func:`tokenrelay.journal.open_journal`. Both pass ``tests/journal/test_contract.py``.

Bounds: ``max_events`` and ``max_bytes`` per stream (appends past them raise
:class:`~tokenrelay.errors.JournalFull`; the terminal frame is always accepted), and
``max_streams`` retained streams (creating one more evicts the oldest finished stream, or
raises ``JournalFull`` when all are live).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenrelay.config import JournalLimits


@dataclass(slots=True)
class ReadResult:
    """Frames after the requested seq, and whether the stream has ended."""

    frames: list[bytes]
    finished: bool
    state: str | None = None  # final state once finished


class Follower(Protocol):
    """A reader that can take new frames synchronously while its read is parked.

    ``pos`` is how many frames it has (its next frame is ``pos + 1``). A journal that
    supports it calls ``push(frames)`` from ``append`` when ``pos`` equals the count before
    them; ``push`` advances ``pos`` by what it took and returns True to stay parked, or
    False to have the read return (with the frames after ``pos``). It must not raise.
    Implemented by ``subscriber._Follower`` (the memory journal pushes; the Redis journal
    fetches, and its parked read returns the frames instead).
    """

    pos: int

    def push(self, frames: list[bytes]) -> bool: ...


@dataclass(slots=True)
class StreamInfo:
    """What the journal knows about a stream besides its frames."""

    stream_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    state: str | None = None
    last_seq: int = 0


class Journal(abc.ABC):
    """Interface of a journal backend."""

    limits: JournalLimits
    distributed = False  # True when other processes share it (leases and remote cancel)
    lease_s = 5.0  # an owner silent for this long is dead (distributed journals only)

    @abc.abstractmethod
    async def create(self, stream_id: str, meta: dict[str, Any]) -> None:
        """Register a new, empty stream. ``meta`` is small JSON-able data (owner, model...)."""

    @abc.abstractmethod
    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        """Append frames (already numbered by the writer) and wake readers."""

    sync_append = False  # True when append_now works: the backend never waits to append

    def append_now(self, stream_id: str, frames: list[bytes]) -> None:
        """``append`` without awaiting. The relay calls it straight from the upstream
        connection's data callback, so a read costs no task wake-up (``sync_append``)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def finish(self, stream_id: str, frame: bytes, state: str) -> bool:
        """Append the terminal frame and mark the stream finished.

        Returns False (and writes nothing) if the stream had already finished: two parties
        racing to end a stream (its generation, and a reader noticing a dead owner) produce
        exactly one terminal event.
        """

    @abc.abstractmethod
    async def read(
        self,
        stream_id: str,
        after: int,
        timeout: float,
        limit: int = 2048,
        follower: Follower | None = None,
    ) -> ReadResult:
        """Up to ``limit`` frames with seq > ``after``; waits up to ``timeout`` s for one.

        ``finished`` is True only once the returned frames include the terminal frame.
        With a ``follower`` (``after == follower.pos``), frames appended while the read
        waits may be pushed to it instead; the read then returns what comes after
        ``follower.pos``. Backends without push support ignore it.

        Raises :class:`~tokenrelay.errors.StreamNotFound` for unknown or expired streams.
        """

    @abc.abstractmethod
    async def info(self, stream_id: str) -> StreamInfo | None:
        """Metadata and state of a stream, or None if unknown/expired."""

    async def delete(self, stream_id: str) -> bool:
        """Forget a *finished* stream now (its frames and metadata); False if unknown.

        Readers of it then get StreamNotFound, as after retention.
        """
        raise NotImplementedError

    async def request_cancel(self, stream_id: str) -> None:  # noqa: B027 - optional hook
        """Ask the instance that owns the stream's generation to cancel it (cluster only)."""

    async def cancel_requests(self) -> AsyncIterator[str]:
        """Stream ids whose cancellation another instance asked for (cluster only)."""
        if False:  # pragma: no cover - an empty async generator
            yield ""

    async def hold(self, stream_ids: Collection[str]) -> None:  # noqa: B027 - optional hook
        """Renew this instance's lease on its live streams (cluster only).

        The hub calls it every ``lease_s / 3`` seconds with the ids of its live
        generations; a lease not renewed for ``lease_s`` marks the owner as dead.
        """

    async def owner_alive(self, stream_id: str) -> bool:
        """False when the stream is unfinished and its owner's lease has expired.

        A reader that waited and got nothing asks this; on False it ends the stream with
        an ``error``/``interrupted`` frame through :meth:`finish` (atomic, so one reader
        wins). Unknown and finished streams count as alive: there is nothing to end.
        """
        return True

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and timers."""

