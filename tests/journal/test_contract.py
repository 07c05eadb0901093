"""The journal contract (journal/base.py), run on every backend: memory and Redis.

Each test gets ``make_journal`` for ``memory://`` and for the real Redis on 127.0.0.1:6379
(a random key prefix per test). Two journals built in one test are two instances of one
cluster (with memory, the same object). The last tests start a private redis-server to
stop and restart it.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis

from support.redis_server import RedisServer
from tokenrelay import events as ev
from tokenrelay.config import JournalLimits
from tokenrelay.errors import JournalFull, ServiceUnavailable, StreamClosed, StreamNotFound
from tokenrelay.journal import open_journal
from tokenrelay.journal.redis import RedisJournal

from .conftest import SHARED_REDIS, MakeJournal, delete_prefix, until, waiting


def texts(start: int, stop: int) -> list[bytes]:
    """Text frames with seqs start..stop-1."""
    return [ev.text_frame(seq, f"t{seq} ") for seq in range(start, stop)]


def terminal(seq: int, name: str = ev.DONE, state: str = ev.COMPLETE) -> bytes:
    return ev.frame(seq, name, ev.dumps({"state": state}))


def seqs(frames: list[bytes]) -> list[int]:
    return [ev.parse_frame(f)[0] for f in frames]


async def test_append_then_read_after_n(make_journal: MakeJournal) -> None:
    journal = make_journal()
    await journal.create("s", {"owner": "u1"})
    await journal.append("s", texts(1, 4))
    await journal.append("s", texts(4, 6))

    everything = await journal.read("s", 0, 0)
    assert everything.frames == texts(1, 6)
    assert not everything.finished
    assert (await journal.read("s", 3, 0)).frames == texts(4, 6)
    assert (await journal.read("s", 1, 0, limit=2)).frames == texts(2, 4)
    assert (await journal.read("s", 5, 0)).frames == []


async def test_a_deleted_stream_is_gone_for_every_instance(make_journal: MakeJournal) -> None:
    writer, other = make_journal(), make_journal()
    await writer.create("s", {"owner": "u1"})
    await writer.append("s", texts(1, 3))
    await writer.finish("s", terminal(3), ev.COMPLETE)
    await writer.create("kept", {})
    assert await other.delete("s") is True
    assert await writer.info("s") is None and await other.info("s") is None
    with pytest.raises(StreamNotFound):
        await writer.read("s", 0, 0)
    assert await other.delete("s") is False
    assert await writer.info("kept") is not None


async def test_reads_in_pieces_give_every_frame_exactly_once(make_journal: MakeJournal) -> None:
    writer, reader = make_journal(), make_journal()
    await writer.create("s", {})
    got: list[bytes] = []
    pos = 0
    for start in range(1, 44, 7):
        await writer.append("s", texts(start, start + 7))
        while True:
            result = await reader.read("s", pos, 0, limit=3)
            if not result.frames:
                break
            got += result.frames
            pos += len(result.frames)
    assert seqs(got) == list(range(1, 50))
    assert got == texts(1, 50)


async def test_blocked_read_is_woken_by_append(make_journal: MakeJournal) -> None:
    writer, reader = make_journal(), make_journal()
    await writer.create("s", {})
    await writer.append("s", texts(1, 3))
    task = asyncio.create_task(reader.read("s", 2, timeout=60))
    await until(lambda: waiting(reader, "s"))
    await writer.append("s", texts(3, 5))
    result = await task
    assert result.frames == texts(3, 5)
    assert not result.finished


async def test_read_times_out_empty(make_journal: MakeJournal) -> None:
    journal = make_journal()
    await journal.create("s", {})
    await journal.append("s", texts(1, 2))
    result = await journal.read("s", 1, timeout=0.05)
    assert result.frames == []
    assert not result.finished
    assert result.state is None


async def test_finish_wakes_a_blocked_reader(make_journal: MakeJournal) -> None:
    writer, reader = make_journal(), make_journal()
    await writer.create("s", {})
    await writer.append("s", texts(1, 2))
    task = asyncio.create_task(reader.read("s", 1, timeout=60))
    await until(lambda: waiting(reader, "s"))
    assert await writer.finish("s", terminal(2), ev.COMPLETE)
    result = await task
    assert result.frames == [terminal(2)]
    assert result.finished
    assert result.state == ev.COMPLETE


async def test_racing_finishes_write_exactly_one_terminal_frame(
    make_journal: MakeJournal,
) -> None:
    a, b = make_journal(), make_journal()
    await a.create("s", {})
    await a.append("s", texts(1, 4))
    won = await asyncio.gather(
        a.finish("s", terminal(4, ev.DONE, ev.COMPLETE), ev.COMPLETE),
        b.finish("s", terminal(4, ev.ERROR, ev.INTERRUPTED), ev.INTERRUPTED),
    )
    assert sorted(won) == [False, True]
    result = await b.read("s", 0, 0)
    names = [ev.parse_frame(f)[1] for f in result.frames]
    assert names == [None, None, None, ev.DONE if won[0] else ev.ERROR]
    assert seqs(result.frames) == [1, 2, 3, 4]
    assert result.finished
    assert result.state == (ev.COMPLETE if won[0] else ev.INTERRUPTED)
    assert not await a.finish("s", terminal(5), ev.COMPLETE)
    assert len((await a.read("s", 0, 0)).frames) == 4


async def test_replay_after_finish(make_journal: MakeJournal) -> None:
    journal = make_journal()
    await journal.create("s", {})
    await journal.append("s", texts(1, 3))
    assert await journal.finish("s", terminal(3), ev.COMPLETE)

    replay = await journal.read("s", 0, timeout=60)
    assert replay.frames == [*texts(1, 3), terminal(3)]
    assert replay.finished
    tail = await journal.read("s", 2, timeout=60)
    assert tail.frames == [terminal(3)]
    assert tail.finished
    # Past the end of a finished stream: nothing more will come, so no wait.
    after_end = await journal.read("s", 3, timeout=60)
    assert after_end.frames == []
    assert after_end.finished
    assert after_end.state == ev.COMPLETE
    # A partial read of a finished stream is not finished yet.
    partial = await journal.read("s", 0, 0, limit=2)
    assert partial.frames == texts(1, 3)
    assert not partial.finished


async def test_event_bound(make_journal: MakeJournal) -> None:
    journal = make_journal(max_events=3)
    await journal.create("s", {})
    await journal.append("s", texts(1, 3))
    with pytest.raises(JournalFull):
        await journal.append("s", texts(3, 5))
    await journal.append("s", texts(3, 4))
    with pytest.raises(JournalFull):
        await journal.append("s", texts(4, 5))
    assert await journal.finish("s", terminal(4), ev.FAILED)  # the end is always accepted
    result = await journal.read("s", 0, 0)
    assert seqs(result.frames) == [1, 2, 3, 4]
    assert result.finished


async def test_byte_bound(make_journal: MakeJournal) -> None:
    frames = texts(1, 4)
    journal = make_journal(max_bytes=len(frames[0]) + len(frames[1]))
    await journal.create("s", {})
    await journal.append("s", frames[:2])
    with pytest.raises(JournalFull):
        await journal.append("s", frames[2:])
    assert (await journal.read("s", 0, 0)).frames == frames[:2]


async def test_stream_bound_evicts_the_oldest_finished_stream(make_journal: MakeJournal) -> None:
    journal = make_journal(max_streams=2)
    await journal.create("a", {})
    await journal.create("b", {})
    with pytest.raises(JournalFull):
        await journal.create("c", {})
    assert await journal.finish("a", terminal(1), ev.COMPLETE)
    await journal.create("c", {})
    with pytest.raises(StreamNotFound):
        await journal.read("a", 0, 0)
    assert await journal.info("b") is not None
    assert await journal.info("c") is not None


async def test_finished_streams_expire_after_retention(make_journal: MakeJournal) -> None:
    journal = make_journal(retention_s=0.2)
    await journal.create("s", {})
    await journal.append("s", texts(1, 2))
    await journal.create("live", {})
    assert await journal.finish("s", terminal(2), ev.COMPLETE)
    assert (await journal.read("s", 0, 0)).finished

    async def gone() -> bool:
        return await journal.info("s") is None

    await until(gone)
    with pytest.raises(StreamNotFound):
        await journal.read("s", 0, 0)
    assert await journal.info("live") is not None  # live streams do not expire


async def test_unknown_stream(make_journal: MakeJournal) -> None:
    journal = make_journal()
    assert await journal.info("nope") is None
    with pytest.raises(StreamNotFound):
        await journal.read("nope", 0, 0)
    with pytest.raises(StreamNotFound):
        await journal.read("nope", 0, 0.05)
    with pytest.raises(StreamNotFound):
        await journal.append("nope", texts(1, 2))
    with pytest.raises(StreamNotFound):
        await journal.finish("nope", terminal(1), ev.COMPLETE)


async def test_info(make_journal: MakeJournal) -> None:
    a, b = make_journal(), make_journal()
    meta = {"owner": "u1", "model": "sim-chat", "message_id": "m-1", "conversation_id": None}
    await a.create("s", meta)
    await a.append("s", texts(1, 4))
    info = await b.info("s")
    assert info is not None
    assert (info.stream_id, info.meta, info.finished, info.state, info.last_seq) == (
        "s",
        meta,
        False,
        None,
        3,
    )
    await a.finish("s", terminal(4, ev.ERROR, ev.CANCELLED), ev.CANCELLED)
    info = await b.info("s")
    assert info is not None
    assert (info.finished, info.state, info.last_seq) == (True, ev.CANCELLED, 4)


async def test_lease_expires_when_the_owner_stops_holding(make_journal: MakeJournal) -> None:
    owner, reader = make_journal(lease_s=0.3), make_journal(lease_s=0.3)
    await owner.create("s", {})
    await owner.create("other", {})
    assert await reader.owner_alive("s")
    if not owner.distributed:
        # One process: the owner is whoever runs this code, alive by definition.
        await owner.hold(["s"])
        assert await reader.owner_alive("s")
        return
    # Held for several lease periods: stays alive.
    for _ in range(6):
        await owner.hold(["s", "other"])
        assert await reader.owner_alive("s")
        await asyncio.sleep(0.1)
    # The owner "dies" (stops holding "s"): the lease runs out.

    async def dead() -> bool:
        await owner.hold(["other"])
        return not await reader.owner_alive("s")

    await until(dead)
    assert await reader.owner_alive("other")
    # The reader ends the stream; a late append of the (not so) dead owner is refused.
    assert await reader.finish("s", terminal(1, ev.ERROR, ev.INTERRUPTED), ev.INTERRUPTED)
    assert await reader.owner_alive("s")  # finished: nothing left to end
    with pytest.raises(StreamClosed):
        await owner.append("s", texts(1, 2))
    # Holding a finished stream does not revive it.
    await owner.hold(["s"])
    info = await reader.info("s")
    assert info is not None
    assert (info.finished, info.state) == (True, ev.INTERRUPTED)


async def test_redis_finish_renumbers_after_a_late_append() -> None:
    """A reader ends a dead owner's stream with the seq it last saw, racing one more append.

    Only shared journals have a second writer; the terminal frame takes ``last_seq + 1``.
    """
    prefix = f"trtest:{secrets.token_hex(6)}:"
    owner = open_journal(SHARED_REDIS, JournalLimits(), prefix=prefix)
    reader = open_journal(SHARED_REDIS, JournalLimits(), prefix=prefix)
    try:
        await owner.create("s", {})
        await owner.append("s", texts(1, 3))
        info = await reader.info("s")
        assert info is not None
        await owner.append("s", texts(3, 4))
        stale = terminal(info.last_seq + 1, ev.ERROR, ev.INTERRUPTED)
        assert await reader.finish("s", stale, ev.INTERRUPTED)
        result = await reader.read("s", 0, 0)
        assert seqs(result.frames) == [1, 2, 3, 4]
        assert result.frames[-1] == terminal(4, ev.ERROR, ev.INTERRUPTED)
        assert result.finished
    finally:
        await owner.aclose()
        await reader.aclose()
        await delete_prefix(SHARED_REDIS, prefix)


async def test_cancel_requests_travel_between_instances(make_journal: MakeJournal) -> None:
    owner, other = make_journal(), make_journal()
    if not owner.distributed:
        # One process cancels in process: nothing travels, the channel is empty.
        await other.request_cancel("s")
        assert [sid async for sid in owner.cancel_requests()] == []
        return
    assert isinstance(owner, RedisJournal)
    requests = owner.cancel_requests()
    first = asyncio.ensure_future(anext(requests))
    client = aioredis.Redis.from_url(SHARED_REDIS)
    try:
        channel = owner._cancel_channel

        async def subscribed() -> bool:
            counts = await client.pubsub_numsub(channel)
            return bool(counts[0][1])

        await until(subscribed)
        await other.request_cancel("s1")
        await other.request_cancel("s2")
        assert await first == "s1"
        assert await anext(requests) == "s2"
    finally:
        await requests.aclose()
        await client.aclose()


async def test_many_waiting_readers_share_one_connection(redis_server: RedisServer) -> None:
    """Waiting readers cost futures, not Redis connections, and share one XRANGE per batch."""
    journal = open_journal(redis_server.url, JournalLimits(), prefix="t:", max_connections=6)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        ids = [f"s{i}" for i in range(50)]
        for sid in ids:
            await journal.create(sid, {})
        # One reader per stream subscribes; the ten more that follow find it subscribed.
        readers = [asyncio.create_task(journal.read(sid, 0, timeout=60)) for sid in ids]
        await until(lambda: all(waiting(journal, sid) for sid in ids))
        readers += [
            asyncio.create_task(journal.read(sid, 0, timeout=60)) for sid in ids for _ in range(10)
        ]
        await until(lambda: all(waiting(journal, sid, 11) for sid in ids))
        clients = (await client.info("clients"))["connected_clients"]
        assert clients <= 7  # this checker, and the pool's bound (notifier included)

        async def xranges() -> int:
            stats = await client.info("commandstats")
            return int(stats.get("cmdstat_xrange", {}).get("calls", 0))

        before = await xranges()
        # Another instance appends (its own appends reach this one's readers directly).
        writer = open_journal(redis_server.url, JournalLimits(), prefix="t:")
        try:
            for sid in ids:
                await writer.append(sid, texts(1, 2))
        finally:
            await writer.aclose()
        results = await asyncio.gather(*readers)
        assert all(r.frames == texts(1, 2) for r in results)
        assert await xranges() - before == len(ids)  # eleven readers, one XRANGE
    finally:
        await journal.aclose()
        await client.aclose()


async def test_appends_and_reads_of_many_streams_share_round_trips(
    redis_server: RedisServer,
) -> None:
    """Fifty streams appending at once cost a pipeline or two, not a round trip each, and
    the readers they wake in another instance share MULTIs too; a finished stream's error
    stays its own."""
    writer = open_journal(redis_server.url, JournalLimits(), prefix="t:")
    journal = open_journal(redis_server.url, JournalLimits(), prefix="t:")
    assert isinstance(writer, RedisJournal) and isinstance(journal, RedisJournal)
    try:
        ids = [f"s{i}" for i in range(50)]
        for sid in [*ids, "done"]:
            await writer.create(sid, {})
        assert await writer.finish("done", terminal(1), ev.COMPLETE)
        readers = [asyncio.create_task(journal.read(sid, 0, timeout=60)) for sid in ids]
        await until(lambda: all(waiting(journal, sid) for sid in ids))
        appends, fetches = writer.append_round_trips, journal.fetch_round_trips
        outcomes = await asyncio.gather(
            *(writer.append(sid, texts(1, 3)) for sid in [*ids, "done"]),
            return_exceptions=True,
        )
        assert outcomes[:-1] == [None] * len(ids)
        assert isinstance(outcomes[-1], StreamClosed)
        assert writer.append_round_trips - appends <= 2
        results = await asyncio.gather(*readers)
        assert all(r.frames == texts(1, 3) for r in results)
        assert journal.fetch_round_trips - fetches <= len(ids) // 5
    finally:
        await writer.aclose()
        await journal.aclose()


async def test_a_reader_of_a_stream_this_process_appends_to_needs_no_xrange() -> None:
    """The frames an instance appends reach its own waiting readers directly; a reader
    in another instance still gets them (announcement, then its XRANGE)."""
    prefix = f"trtest:{secrets.token_hex(6)}:"
    owner = open_journal(SHARED_REDIS, JournalLimits(), prefix=prefix)
    other = open_journal(SHARED_REDIS, JournalLimits(), prefix=prefix)
    assert isinstance(owner, RedisJournal) and isinstance(other, RedisJournal)
    try:
        await owner.create("s", {})
        local = asyncio.create_task(owner.read("s", 0, timeout=60, limit=1))
        remote = asyncio.create_task(other.read("s", 0, timeout=60))
        await until(lambda: waiting(owner, "s") and waiting(other, "s"))
        fetches = owner.fetch_round_trips
        await owner.append("s", texts(1, 3))
        assert (await local).frames == texts(1, 2)  # its limit
        assert owner.fetch_round_trips == fetches
        assert (await remote).frames == texts(1, 3)
        assert other.fetch_round_trips > 0
    finally:
        await owner.aclose()
        await other.aclose()
        await delete_prefix(SHARED_REDIS, prefix)


async def test_redis_down_fails_fast_and_recovers(redis_server: RedisServer) -> None:
    prefix = f"trtest:{secrets.token_hex(6)}:"
    journal = open_journal(redis_server.url, JournalLimits(), prefix=prefix)
    try:
        await journal.create("s", {})
        await journal.append("s", texts(1, 2))
        reader = asyncio.create_task(journal.read("s", 1, timeout=60))
        cancels = journal.cancel_requests()
        cancel_wait = asyncio.ensure_future(anext(cancels))
        await until(lambda: waiting(journal, "s"))

        redis_server.stop()
        with pytest.raises(ServiceUnavailable):
            await reader  # woken by the lost connection, then the re-check fails
        with pytest.raises(ServiceUnavailable):
            await cancel_wait
        with pytest.raises(ServiceUnavailable):
            await journal.append("s", texts(2, 3))
        with pytest.raises(ServiceUnavailable):
            await journal.create("t", {})
        with pytest.raises(ServiceUnavailable):
            await journal.read("s", 0, 1)
        with pytest.raises(ServiceUnavailable):
            await journal.hold(["s"])

        redis_server.start()  # empty: --save "" keeps nothing

        async def created() -> bool:
            try:
                await journal.create("t", {})
            except ServiceUnavailable:
                return False
            return True

        await until(created)
        reader = asyncio.create_task(journal.read("t", 0, timeout=60))
        await until(lambda: waiting(journal, "t"))
        await journal.append("t", texts(1, 3))
        assert (await reader).frames == texts(1, 3)
        assert await journal.finish("t", terminal(3), ev.COMPLETE)
        assert (await journal.read("t", 0, 0)).finished
    finally:
        await journal.aclose()
        await delete_prefix(redis_server.url, prefix)


async def test_url_carries_prefix_and_lease() -> None:
    prefix = f"trtest:{secrets.token_hex(6)}:"
    journal = open_journal(f"{SHARED_REDIS}?prefix={prefix}&lease_s=0.5", JournalLimits())
    try:
        assert isinstance(journal, RedisJournal)
        assert (journal.prefix, journal.lease_s) == (prefix, 0.5)
        await journal.create("s", {})
        client = aioredis.Redis.from_url(SHARED_REDIS)
        try:
            assert await client.exists(prefix + "m:s")
        finally:
            await client.aclose()
    finally:
        await journal.aclose()
        await delete_prefix(SHARED_REDIS, prefix)
