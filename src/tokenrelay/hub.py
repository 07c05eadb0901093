"""The hub: registry of this process's live generations, subscriber counts and grace timers.

Routes ask the hub to start, find, follow and cancel streams; the hub never writes to a
socket. Streams are visible only to their owner: any other caller gets
:class:`~tokenrelay.errors.StreamNotFound`, exactly like an unknown id.

Grace period: when the last subscriber of a live stream leaves, a timer of ``grace_s``
starts; a subscriber that (re)attaches in time cancels it, otherwise the generation is
cancelled so the provider stops billing for an answer nobody reads.

In a cluster (Redis journal) a cancel for a stream owned by another instance travels
through the journal's cancel channel, and this instance renews a lease for each of its
live generations so readers elsewhere can tell a dead owner from a slow one.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import math
import os
import time
from typing import Any

from tokenrelay import events as ev
from tokenrelay.config import ModelRoute, Settings
from tokenrelay.errors import ServiceUnavailable, StreamNotFound, TokenRelayError
from tokenrelay.generation import (
    CANCEL_ABANDONED,
    CANCEL_SHUTDOWN,
    CANCEL_USER,
    Generation,
    Observer,
)
from tokenrelay.journal.base import Journal, StreamInfo
from tokenrelay.limits import Lease
from tokenrelay.store.base import Store, Turn
from tokenrelay.upstream import UpstreamClient

log = logging.getLogger("tokenrelay.hub")


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _random_urlsafe() -> str:
    """``secrets.token_urlsafe(16)``, the same text from the same 16 random bytes, without
    its three Python calls (three ids per request)."""
    return binascii.b2a_base64(os.urandom(16), newline=False).translate(_URLSAFE)[
        :22].decode("ascii")


def new_id(prefix: str = "") -> str:
    """An unguessable id: 128 random bits, URL-safe."""
    return prefix + _random_urlsafe()


def new_sortable_id(prefix: str = "") -> str:
    """An unguessable id (128 random bits) after the creation time in ms (12 hex digits).

    For rows of the store: an index on ids that grow with time is written at its end, so
    a batch of answers dirties a few shared pages instead of a random page per row (with
    SQLite, each dirty page is a WAL frame written per commit; issue 17).
    """
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{_random_urlsafe()}"


class Hub:
    """See module docstring."""

    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        upstream: UpstreamClient,
        store: Store | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.upstream = upstream
        self.store = store
        self.observer = observer
        self.instance_id = settings.instance_id or new_id("i-")
        self.generations: dict[str, Generation] = {}
        self._subscribers: dict[str, int] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._grace_override: dict[str, float] = {}
        self._leases: dict[str, Lease] = {}  # rate-limit slots, freed when the answer ends
        self._background: list[asyncio.Task[None]] = []
        self.draining = False

    # -- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._listen_cancels()))
        if self.store is not None:
            self._background.append(loop.create_task(self._sweep_orphans()))
        if self.journal.distributed:
            self._background.append(loop.create_task(self._renew_leases()))

    def begin_drain(self, drain_s: float) -> None:
        """Refuse new streams from now on; end the running ones after ``drain_s``."""
        self.draining = True
        log.info("draining: %d stream(s) may finish within %g s", len(self.generations), drain_s)
        asyncio.get_running_loop().call_later(drain_s, self._interrupt_all)

    def _interrupt_all(self) -> None:
        for gen in list(self.generations.values()):
            gen.cancel(CANCEL_SHUTDOWN)

    async def shutdown(self) -> None:
        """End every running answer as ``interrupted`` and stop the background tasks.

        The drain (letting answers finish first) happens before, in :meth:`begin_drain`.
        """
        self.draining = True
        for gen in list(self.generations.values()):
            gen.cancel(CANCEL_SHUTDOWN)
        tasks = [g.task for g in self.generations.values() if g.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for handle in self._grace.values():
            handle.cancel()
        for lease in list(self._leases.values()):  # shared (Redis) slots of unfinished answers
            await lease.finish()
        self._leases.clear()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- streams -------------------------------------------------------------------------

    async def start(
        self,
        *,
        owner: str,
        route: ModelRoute,
        body: dict[str, Any],
        conversation_id: str | None = None,
        message_id: str | None = None,
        grace_s: float | None = None,
        record: bool = False,
        stream_id: str | None = None,
        lease: Lease | None = None,
        meta: dict[str, Any] | None = None,
        turn: Turn | None = None,
    ) -> Generation:
        """Create the stream, write its ``start`` event, and launch the generation.

        With ``record`` (and a store), the answer is stored as an assistant message of
        ``conversation_id``: created now as ``streaming``, checkpointed, then finished.
        A ``lease`` (from the limiter) is finished with the answer's token count when the
        generation ends; if this method raises, the caller still owns it. ``meta`` adds
        keys to the journal's metadata of the stream (e.g. a Responses API request).
        A ``grace_s`` of ``math.inf`` never cancels the answer for lack of readers.
        ``turn`` (a chat request's new conversation and user messages) is stored with
        the answer's message, in one write that the first byte does not wait for.
        """
        if self.draining:
            raise ServiceUnavailable("this instance is shutting down; retry on another one")
        stream_id = stream_id or new_id()
        store = self.store if record and conversation_id else None
        gen = Generation(
            stream_id=stream_id,
            message_id=message_id or new_id("m-"),
            conversation_id=conversation_id,
            owner=owner,
            route=route,
            body=body,
            journal=self.journal,
            upstream=self.upstream,
            store=store,
            checkpoint_s=self.settings.checkpoint_s,
            on_finish=self._forget,
            observer=self.observer,
        )
        meta = {
            **(meta or {}),
            "owner": owner,
            "model": route.name,
            "message_id": gen.message_id,
            "conversation_id": conversation_id,
            "instance": self.instance_id,
            "created": int(gen.created),
        }
        # Readers use meta.get(): absent is None. Five keys or fewer fit a dict's smallest
        # table (~0.1 KB less under each open stream).
        meta = {key: value for key, value in meta.items() if value is not None}
        # The journal first: if Redis is down nothing is stored; if the database is down
        # the new stream is ended at once, so it never lingers unfinished.
        await self.journal.create(stream_id, meta)
        if store is not None and conversation_id is not None:
            try:
                if turn is not None:
                    await store.begin_answer(owner, turn, gen.message_id, stream_id, route.name)
                else:
                    await store.begin_assistant(
                        owner, conversation_id, gen.message_id, stream_id, route.name
                    )
            except Exception as exc:
                error = exc if isinstance(exc, TokenRelayError) else ServiceUnavailable(
                    "the database is unavailable; try again shortly"
                )
                frame = ev.frame(1, ev.ERROR, ev.dumps({"error": error.to_dict(),
                                                        "state": ev.FAILED}))
                with contextlib.suppress(Exception):
                    await self.journal.finish(stream_id, frame, ev.FAILED)
                raise error from exc
        await self.journal.append(stream_id, [gen.start_frame()])
        self.generations[stream_id] = gen
        if lease is not None:
            self._leases[stream_id] = lease
        if grace_s is not None:
            self._grace_override[stream_id] = grace_s
        gen.start()
        # One step for the answer's task before this request's response goes out: its
        # upstream request is written (or its connection begun) first, so the upstream's
        # time to answer runs while the response's head and opening are written, not
        # after them (on the path to the first token at low load).
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            gen.cancel(CANCEL_ABANDONED)  # its request is gone: nobody will follow it
            raise
        return gen

    async def _forget(self, gen: Generation) -> None:
        self.generations.pop(gen.stream_id, None)
        self._grace_override.pop(gen.stream_id, None)
        handle = self._grace.pop(gen.stream_id, None)
        if handle is not None:
            handle.cancel()
        lease = self._leases.pop(gen.stream_id, None)
        if lease is not None:
            await lease.finish(gen.completion_tokens())

    async def info(self, stream_id: str, owner: str) -> StreamInfo:
        """The stream's info if it exists and belongs to ``owner``; else StreamNotFound."""
        info = await self.journal.info(stream_id)
        if info is None or info.meta.get("owner") != owner:
            raise StreamNotFound("no such stream (unknown, expired, or not yours)")
        return info

    async def cancel(self, stream_id: str, owner: str) -> bool:
        """Stop a stream. True if a live generation was asked to stop."""
        info = await self.info(stream_id, owner)
        if info.finished:
            return False
        gen = self.generations.get(stream_id)
        if gen is not None:
            return gen.cancel(CANCEL_USER)
        await self.journal.request_cancel(stream_id)
        return True

    async def _listen_cancels(self) -> None:
        while True:
            try:
                async for stream_id in self.journal.cancel_requests():
                    gen = self.generations.get(stream_id)
                    if gen is not None:
                        gen.cancel(CANCEL_USER)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cancel channel failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _renew_leases(self) -> None:
        period = max(0.05, self.journal.lease_s / 3)
        while True:
            try:
                await self.journal.hold(list(self.generations))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease renewal failed (%s)", type(exc).__name__)
            await asyncio.sleep(period)

    async def _sweep_orphans(self, every_s: float = 60.0, older_than_s: float = 60.0) -> None:
        """Messages left ``streaming`` by an instance that died while this one runs."""
        assert self.store is not None
        while True:
            await asyncio.sleep(every_s)
            try:
                swept = await self.store.interrupt_orphans(older_than_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("orphan sweep failed (%s)", type(exc).__name__)
                continue
            if swept:
                log.info("marked %d orphaned message(s) as interrupted", swept)

    # -- subscribers and the grace period -----------------------------------------------

    def subscribed(self, stream_id: str) -> _Subscription:
        """``async with hub.subscribed(stream_id):`` counts a subscriber for the grace
        period while the block runs."""
        return _Subscription(self, stream_id)

    def _subscribe(self, stream_id: str) -> None:
        self._subscribers[stream_id] = self._subscribers.get(stream_id, 0) + 1
        handle = self._grace.pop(stream_id, None)
        if handle is not None:
            handle.cancel()

    def _unsubscribe(self, stream_id: str) -> None:
        left = self._subscribers.get(stream_id, 1) - 1
        if left > 0:
            self._subscribers[stream_id] = left
        else:
            self._subscribers.pop(stream_id, None)
            self._start_grace(stream_id)

    def _start_grace(self, stream_id: str) -> None:
        gen = self.generations.get(stream_id)
        if gen is None or gen.finished.is_set():
            return
        grace = self._grace_override.get(stream_id, self.settings.grace_s)
        loop = asyncio.get_running_loop()
        if grace <= 0:
            gen.cancel(CANCEL_ABANDONED)
            return
        if grace == math.inf:  # a background answer: runs whoever reads it
            return
        self._grace[stream_id] = loop.call_later(grace, self._abandon, stream_id)

    def _abandon(self, stream_id: str) -> None:
        self._grace.pop(stream_id, None)
        if self._subscribers.get(stream_id):
            return
        gen = self.generations.get(stream_id)
        if gen is not None:
            log.info("stream %s abandoned after the grace period; cancelling", stream_id[:8])
            gen.cancel(CANCEL_ABANDONED)

    def subscriber_count(self) -> int:
        return sum(self._subscribers.values())


class _Subscription:
    """The context manager of :meth:`Hub.subscribed`: a plain class, as it runs once per
    response (a generator-based one costs a generator and its wrapper objects)."""

    __slots__ = ("hub", "stream_id")

    def __init__(self, hub: Hub, stream_id: str) -> None:
        self.hub = hub
        self.stream_id = stream_id

    async def __aenter__(self) -> None:
        self.hub._subscribe(self.stream_id)

    async def __aexit__(self, *exc_info: object) -> None:
        self.hub._unsubscribe(self.stream_id)
