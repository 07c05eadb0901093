"""The hub (hub.py): the registry of this process's live generations.

What it promises: a stream is visible only to its owner (anyone else is told exactly what
an unknown id gets); when the last subscriber of a live stream leaves, a grace timer
starts and cancels the answer when it runs out, unless a subscriber came back; a drain
refuses new streams and interrupts running ones at its deadline; an answer that ends is
forgotten and its rate-limit lease freed.

The generations are real, relaying from the fault upstream on a loopback port; the grace
periods are short, set through the settings or ``start(grace_s=...)``. Nothing sleeps: to
show that a stream outlived a grace period, a second stream (the *witness*) is left at
the same moment or later with a grace period as long or shorter, and the test awaits the
witness being cancelled. Timers that must fire in order are ``SHORT_S`` apart, as a
witness is seen cancelled only once it has finished, a few loop turns after its timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from support.answers import BODY, OWNER, WAIT, Parts, answer_parts, terminal
from support.fault_upstream import FaultUpstream, ok, stall_after
from tokenrelay.errors import RateLimited, ServiceUnavailable, StreamNotFound
from tokenrelay.generation import CANCEL_ABANDONED, CANCEL_SHUTDOWN, CANCEL_USER, Generation
from tokenrelay.hub import Hub
from tokenrelay.limits import open_limiter

GRACE_S = 0.4
SHORT_S = 0.2  # the margin between two timers that must fire in order
TOKENS = ["Hel", "lo", ", ", "wor", "ld", "!"]


@pytest.fixture
def upstream(fault_upstream: FaultUpstream) -> FaultUpstream:
    fault_upstream.script(stall_after(TOKENS, 1))  # answers that run until cancelled
    return fault_upstream


@contextlib.asynccontextmanager
async def _running_hub(base_url: str, tmp_path: Path, env: dict[str, str]
                       ) -> AsyncIterator[tuple[Hub, Parts]]:
    async with answer_parts(base_url, tmp_path, TOKENRELAY_GRACE_S=str(GRACE_S), **env) as p:
        hub = Hub(p.settings, p.journal, p.upstream, p.store)
        await hub.startup()
        try:
            yield hub, p
        finally:
            await hub.shutdown()


@pytest.fixture
def hub_of(upstream: FaultUpstream, tmp_path: Path
           ) -> Callable[..., AbstractAsyncContextManager[tuple[Hub, Parts]]]:
    """``async with hub_of(**env) as (hub, parts)``: a started hub (grace ``GRACE_S``)."""
    def make(**env: str) -> AbstractAsyncContextManager[tuple[Hub, Parts]]:
        return _running_hub(upstream.base_url, tmp_path, env)
    return make


async def start(hub: Hub, p: Parts, owner: str = OWNER, **options: Any) -> Generation:
    return await hub.start(owner=owner, route=p.route(), body=BODY, **options)


async def cancelled_for(gen: Generation) -> str | None:
    """The generation's cancel reason, once it has ended (bounded wait)."""
    await asyncio.wait_for(gen.finished.wait(), WAIT)
    return gen.cancel_reason


async def leave(hub: Hub, *gens: Generation) -> None:
    """Each stream gets a subscriber that leaves at once (its last one)."""
    for gen in gens:
        async with hub.subscribed(gen.stream_id):
            pass


# -- start and the owner check --------------------------------------------------------------


async def test_start_records_the_owner_and_writes_the_start_frame_first(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        info = await hub.info(gen.stream_id, OWNER)
        assert info.meta["owner"] == OWNER and info.meta["model"] == "fault-model"
        assert info.meta["message_id"] == gen.message_id and not info.finished
        [first] = await p.wait_frames(gen.stream_id, 1)
        assert first.seq == 1 and first.name == "start"
        assert first.data["stream_id"] == gen.stream_id
        assert hub.generations[gen.stream_id] is gen


async def test_another_owner_is_told_what_an_unknown_id_gets_and_cannot_stop_the_stream(
        hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        with pytest.raises(StreamNotFound) as unknown:
            await hub.info("no-such-stream", OWNER)
        for ask in (hub.info, hub.cancel):
            with pytest.raises(StreamNotFound) as other:
                await ask(gen.stream_id, "key:mallory")
            assert other.value.to_dict() == unknown.value.to_dict()
        assert gen.cancel_reason is None and not gen.finished.is_set()
        assert await hub.cancel(gen.stream_id, OWNER) is True  # the owner can
        assert await cancelled_for(gen) == CANCEL_USER
        assert await hub.cancel(gen.stream_id, OWNER) is False  # nothing left to stop
        end = terminal(await p.frames(gen.stream_id))
        assert end.name == "done" and end.data["state"] == "cancelled"


async def test_an_answer_that_ends_is_forgotten_and_its_lease_freed(
        upstream: FaultUpstream, hub_of: Any) -> None:
    upstream.script(ok(TOKENS))
    async with hub_of(TOKENRELAY_MAX_CONCURRENT_STREAMS="1") as (hub, p):
        limiter = open_limiter(p.settings)
        lease = await limiter.acquire(OWNER)
        gen = await start(hub, p, lease=lease)
        with pytest.raises(RateLimited):
            await limiter.acquire(OWNER)  # the answer holds the one slot
        assert await cancelled_for(gen) is None  # it completed
        assert gen.stream_id not in hub.generations
        await (await limiter.acquire(OWNER)).finish()  # the slot is free again


async def test_a_stream_whose_store_write_fails_is_ended_at_once(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        conversation_id = await p.conversation()
        await p.store.aclose()  # the database goes away
        with pytest.raises(ServiceUnavailable):
            await start(hub, p, conversation_id=conversation_id, record=True,
                        stream_id="s-database-down")
        info = await hub.info("s-database-down", OWNER)
        assert info.finished and info.state == "error"  # never left unfinished
        end = terminal(await p.frames("s-database-down"))
        assert end.name == "error" and end.data["error"]["code"] == "service_unavailable"
        assert hub.generations == {}
        await p.store.start()  # for the parts' own cleanup


# -- the grace period ---------------------------------------------------------------------


async def test_a_stream_whose_last_subscriber_left_is_cancelled_after_the_grace_period(
        hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        witness = await start(hub, p, grace_s=SHORT_S)
        await leave(hub, gen, witness)
        assert await cancelled_for(witness) == CANCEL_ABANDONED
        assert gen.cancel_reason is None  # not before its own, longer, period
        assert await cancelled_for(gen) == CANCEL_ABANDONED  # but after it
        end = terminal(await p.frames(gen.stream_id))
        assert end.name == "done" and end.data["state"] == "cancelled"
        assert hub.generations == {}


async def test_a_subscriber_that_comes_back_within_the_grace_period_keeps_the_stream(
        hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        witness = await start(hub, p)  # the same grace period, left after the stream
        await leave(hub, gen, witness)
        async with hub.subscribed(gen.stream_id):  # back before the period ran out
            assert await cancelled_for(witness) == CANCEL_ABANDONED
            assert gen.cancel_reason is None
        assert await cancelled_for(gen) == CANCEL_ABANDONED  # left again: a new period


async def later(hub: Hub, p: Parts) -> None:
    """Let ``SHORT_S`` pass, as the hub measures it: a witness of that grace period left
    now is cancelled."""
    step = await start(hub, p, grace_s=SHORT_S)
    await leave(hub, step)
    assert await cancelled_for(step) == CANCEL_ABANDONED


async def test_a_subscriber_that_comes_back_restarts_the_grace_period(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        witness = await start(hub, p)
        await leave(hub, gen, witness)
        await later(hub, p)
        await leave(hub, gen)  # back and gone again: a new period from now
        assert await cancelled_for(witness) == CANCEL_ABANDONED
        assert gen.cancel_reason is None  # the first period no longer counts
        assert await cancelled_for(gen) == CANCEL_ABANDONED


async def test_no_timer_runs_while_one_of_several_subscribers_stays(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        witness = await start(hub, p)
        async with hub.subscribed(gen.stream_id):
            await leave(hub, gen, witness)  # a second subscriber of the stream leaves
            assert hub.subscriber_count() == 1
            await later(hub, p)
        # The last one left: the stream's period starts only now.
        assert hub.subscriber_count() == 0
        assert await cancelled_for(witness) == CANCEL_ABANDONED
        assert gen.cancel_reason is None
        assert await cancelled_for(gen) == CANCEL_ABANDONED


async def test_a_grace_period_of_zero_cancels_as_the_last_subscriber_leaves(
        hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p, grace_s=0.0)
        await leave(hub, gen)
        assert gen.cancel_reason == CANCEL_ABANDONED  # at once, not on a timer
        assert await cancelled_for(gen) == CANCEL_ABANDONED


async def test_an_infinite_grace_period_never_cancels_for_lack_of_readers(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p, grace_s=math.inf)
        witness = await start(hub, p, grace_s=SHORT_S)
        await leave(hub, gen, witness)
        assert await cancelled_for(witness) == CANCEL_ABANDONED
        assert gen.cancel_reason is None and not gen.finished.is_set()


# -- drain and shutdown -------------------------------------------------------------------


async def test_a_drain_refuses_new_streams_and_interrupts_running_ones_at_its_deadline(
        hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        hub.begin_drain(SHORT_S)
        with pytest.raises(ServiceUnavailable):
            await start(hub, p)
        assert gen.cancel_reason is None  # it may still finish within the drain
        assert await cancelled_for(gen) == CANCEL_SHUTDOWN
        end = terminal(await p.frames(gen.stream_id))
        assert end.name == "error" and end.data["state"] == "interrupted"


async def test_shutdown_ends_every_running_answer_as_interrupted(hub_of: Any) -> None:
    async with hub_of() as (hub, p):
        gens = [await start(hub, p) for _ in range(3)]
        await hub.shutdown()
        for gen in gens:
            assert gen.finished.is_set() and gen.cancel_reason == CANCEL_SHUTDOWN
            end = terminal(await p.frames(gen.stream_id))
            assert end.data["state"] == "interrupted"
        with pytest.raises(ServiceUnavailable):
            await start(hub, p)


async def test_the_answer_took_its_first_step_when_start_returns(hub_of) -> None:
    # Its upstream request is on its way before the caller writes the response's head,
    # so the upstream's time to answer overlaps that work (the first token, at low load).
    async with hub_of() as (hub, p):
        gen = await start(hub, p)
        assert gen._relaying  # its task runs the upstream call (a new connection: begun)
        gen.cancel(CANCEL_USER)
        assert await cancelled_for(gen) == CANCEL_USER


async def test_a_start_cancelled_at_its_first_step_cancels_the_answer(
        hub_of, monkeypatch: pytest.MonkeyPatch) -> None:
    # The request that started it is gone (the server is stopping): nobody will follow it.
    started = Generation.start

    def start_then_cancel_the_caller(gen: Generation) -> None:
        started(gen)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # delivered at the caller's next await: the first step's yield

    monkeypatch.setattr(Generation, "start", start_then_cancel_the_caller)
    async with hub_of() as (hub, p):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(start(hub, p))
        [gen] = hub.generations.values()
        assert await cancelled_for(gen) == CANCEL_ABANDONED
