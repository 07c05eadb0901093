"""The store's one writer (issue 17): batching, read-your-writes, failures, outages.

Nothing here times anything: batching is proved by counting transactions.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from tokenrelay.errors import ServiceUnavailable
from tokenrelay.hub import new_id
from tokenrelay.store import AssistantResult, Turn, open_store
from tokenrelay.store import writer as writer_module
from tokenrelay.store.sql import SQLStore

from .conftest import TcpProxy, pg_url


def turn(question: str = "q", cid: str | None = None) -> Turn:
    return Turn(cid or new_id(), True, "title", [question])


def done(content: str) -> AssistantResult:
    return AssistantResult(state="complete", content=content, model_used="m",
                           completion_tokens=3, ttft_ms=1.5, tokens_per_s=10.0)


async def test_answers_started_together_are_written_in_one_transaction(store: SQLStore) -> None:
    before = store.writer.transactions
    turns = [turn(f"q{i}") for i in range(32)]
    await asyncio.gather(*(store.begin_answer("local", t, f"m{i}", f"s{i}", "m")
                           for i, t in enumerate(turns)))
    await asyncio.gather(*(store.finish_assistant(f"m{i}", done(f"a{i}")) for i in range(32)))
    # 32 answers: their conversations, questions and answers, then their 32 finishes
    # (one transaction in all when the answers end while their starts are still held).
    assert store.writer.transactions - before <= 2
    for i, t in enumerate(turns):
        found = await store.get_conversation("local", t.conversation_id)
        assert found is not None and found["title"] == "title"
        assert [(m["role"], m["content"], m["state"]) for m in found["messages"]] == [
            ("user", f"q{i}", "complete"), ("assistant", f"a{i}", "complete")]


@pytest.mark.parametrize("hold_s", [0.25, 0.0])
async def test_a_short_answer_costs_one_transaction_or_two_without_holding(
        db_url: str, hold_s: float) -> None:
    store = open_store(db_url, instance_id="a", orphan_after_s=3600)
    assert isinstance(store, SQLStore)
    store.hold_s = hold_s
    await store.start()
    try:
        before = store.writer.transactions
        t = turn("question")
        await store.begin_answer("local", t, "m1", "s1", "model")
        if not hold_s:
            await store.writer.flush()  # the start alone: it is not held back for the end
        await store.finish_assistant("m1", done("answer"))
        assert store.writer.transactions - before == (1 if hold_s else 2)
        found = await store.get_conversation("local", t.conversation_id)
        assert found is not None and found["title"] == "title"
        user, answer = found["messages"]
        assert (user["content"], user["state"]) == ("question", "complete")
        assert (answer["id"], answer["content"], answer["state"]) == ("m1", "answer", "complete")
        assert (answer["stream_id"], answer["model_requested"], answer["model_used"]) == (
            "s1", "model", "m")
        assert answer["usage"] == {"prompt_tokens": None, "completion_tokens": 3,
                                   "estimated": False}
        assert found["updated_at"] >= found["created_at"]
        async with store._begin() as conn:  # the conversation was bumped by the end
            bumped = await conn.scalar(text(
                "SELECT c.updated_at = m.updated_at FROM conversations c JOIN messages m "
                "ON m.conversation_id = c.id WHERE m.id = 'm1'"))
        assert bumped
    finally:
        await store.aclose()


async def test_overlapping_answers_are_each_inserted_once_finished(store: SQLStore) -> None:
    store.hold_s = 3600  # no release by the timer: only the answers themselves act here
    first, second = turn("q1"), turn("q2")
    await store.begin_answer("local", first, "m1", "s1", "m")
    await store.begin_answer("local", second, "m2", "s2", "m")
    # Neither the second start nor the first end queues the other answer's held start:
    # it would then be inserted streaming and need UPDATEs at its end.
    assert set(store._held) == {"m1", "m2"}
    await store.finish_assistant("m1", done("a1"))
    assert set(store._held) == {"m2"}
    await store.finish_assistant("m2", done("a2"))
    assert not store._held
    for t, answer in ((first, "a1"), (second, "a2")):
        found = await store.get_conversation("local", t.conversation_id)
        assert found is not None
        assert [(m["content"], m["state"]) for m in found["messages"]][1] == (
            answer, "complete")


async def test_answers_that_end_a_loop_turn_apart_share_one_transaction(
        store: SQLStore) -> None:
    # Group commit: under load, answers end on successive turns of the loop, not in the
    # same one; the writer lets the loop go round before it takes a batch.
    store.hold_s = 3600
    turns = [turn(f"q{i}") for i in range(8)]
    for i, t in enumerate(turns):
        await store.begin_answer("local", t, f"m{i}", f"s{i}", "m")
    await store._writer_now().flush()
    before = store.writer.transactions

    async def one_a_turn() -> list[asyncio.Future[None]]:
        ends = []
        for i in range(len(turns)):
            ends.append(asyncio.ensure_future(store.finish_assistant(f"m{i}", done(f"a{i}"))))
            await asyncio.sleep(0)  # the next answer ends on the next turn: the scenario itself
        return ends

    await asyncio.gather(*await one_a_turn())
    assert store.writer.transactions - before == 1
    for i, t in enumerate(turns):
        found = await store.get_conversation("local", t.conversation_id)
        assert found is not None and found["messages"][-1]["content"] == f"a{i}"


@pytest.mark.parametrize(("turns", "seconds", "idle"),
                         [(16, 3600.0, 0.0), (10**9, 0.0, 0.0), (10**9, 3600.0, 50e-6)])
async def test_a_lone_write_commits_at_whichever_linger_bound_comes_first(
        store: SQLStore, monkeypatch: pytest.MonkeyPatch, turns: int, seconds: float,
        idle: float) -> None:
    # A few turns, no time at all, or a turn of an idle loop that brought no other write:
    # none waits for the others.
    monkeypatch.setattr(writer_module, "IDLE_TURN_S", idle)
    writer = store._writer_now()
    writer.linger_turns, writer.linger_s = turns, seconds
    t = turn()
    await store.begin_answer("local", t, "m1", "s1", "model")
    async with asyncio.timeout(30):  # a guard: the unbounded one would wait an hour / ever
        await store.finish_assistant("m1", done("answer"))
    found = await store.get_conversation("local", t.conversation_id)
    assert found is not None and found["messages"][-1]["content"] == "answer"


async def test_a_read_sees_a_write_that_nobody_waited_for(store: SQLStore) -> None:
    t = turn()
    await store.begin_answer("local", t, "m1", "s1", "model")
    found = await store.get_conversation("local", t.conversation_id)
    assert found is not None
    assert [(m["role"], m["state"]) for m in found["messages"]] == [
        ("user", "complete"), ("assistant", "streaming")]
    assert found["messages"][1]["stream_id"] == "s1"
    assert [c["id"] for c in await store.list_conversations("local")] == [t.conversation_id]


async def test_a_turn_in_an_existing_conversation_takes_the_next_positions(
        store: SQLStore) -> None:
    cid = await store.ensure_conversation("local", None, "t")
    await store.add_user_message("local", cid, "first")
    await store.begin_answer("local", Turn(cid, False, "ignored", ["second", "third"]),
                             "m1", "s1", "model")
    await store.finish_assistant("m1", done("answer"))
    found = await store.get_conversation("local", cid)
    assert found is not None
    assert [m["content"] for m in found["messages"]] == ["first", "second", "third", "answer"]
    assert found["title"] == "t"


async def test_one_bad_write_does_not_lose_the_others_of_its_batch(
        store: SQLStore, caplog: pytest.LogCaptureFixture) -> None:
    taken = turn()
    await store.begin_answer("local", taken, "m0", "s0", "model")
    await store.writer.flush()
    good = [turn(f"q{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="tokenrelay.store"):
        await store.begin_answer("local", good[0], "m1", "s1", "model")
        await store.begin_answer("local", taken, "m-dup", "s-dup", "model")  # same conversation
        await store.begin_answer("local", good[1], "m2", "s2", "model")
        await store.finish_assistant("m1", done("one"))
        await store.begin_answer("local", good[2], "m3", "s3", "model")
        await store.writer.flush()
    assert "store write failed" in caplog.text
    assert await store.get_message("local", "m-dup") is None
    for t in good:
        assert await store.get_conversation("local", t.conversation_id) is not None
    one = await store.get_message("local", "m1")
    assert one is not None and (one["state"], one["content"]) == ("complete", "one")


async def test_a_short_answer_in_an_existing_conversation_costs_one_transaction(
        store: SQLStore) -> None:
    first = turn("one")
    await store.begin_answer("local", first, "m1", "s1", "model")
    await store.finish_assistant("m1", done("first"))
    cid = first.conversation_id
    said = [("user", "one"), ("assistant", "first"), ("user", "two")]
    parent, matched = await store.find_continuation("local", cid, said)
    before = store.writer.transactions
    await store.begin_answer("local", Turn(cid, False, "t", ["two"], parent), "m2", "s2", "m")
    # What is queued is written while the answer streams (not what is held).
    await store._writer_now().flush()
    assert store.writer.transactions == before  # held: nothing runs before the first token
    await store.finish_assistant("m2", done("second"))
    assert store.writer.transactions - before == 1  # the turn and its end together
    found = await store.get_conversation("local", cid)
    assert found is not None
    assert [(m["content"], m["state"]) for m in found["messages"]] == [
        ("one", "complete"), ("first", "complete"), ("two", "complete"),
        ("second", "complete")]
    assert matched == 2 and found["messages"][-1]["id"] == "m2"


async def test_a_refused_write_alone_is_an_error_not_an_outage(store: SQLStore) -> None:
    # On PostgreSQL a short answer's end is one statement, sent without BEGIN/COMMIT: a
    # constraint it breaks must still read as that write's error, not as a database down.
    first = turn("one")
    await store.begin_answer("local", first, "m1", "s1", "model")
    await store.finish_assistant("m1", done("first"))
    await store.begin_answer("local", turn("two"), "m1", "s2", "model")  # the same id
    with pytest.raises(Exception) as caught:
        await store.finish_assistant("m1", done("second"))
    assert not isinstance(caught.value, ServiceUnavailable)
    assert not store.writer.down
    third = turn("three")
    await store.begin_answer("local", third, "m3", "s3", "model")
    await store.finish_assistant("m3", done("third"))  # the writer goes on
    for t, answer in ((first, "first"), (third, "third")):
        found = await store.get_conversation("local", t.conversation_id)
        assert found is not None and found["messages"][-1]["content"] == answer


async def test_sqlite_commits_without_an_fsync_each(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(store, SQLStore)
    await store.start()
    try:
        async with store._begin() as conn:
            assert (await conn.scalar(text("PRAGMA synchronous"))) == 1  # NORMAL
            assert (await conn.scalar(text("PRAGMA journal_mode"))) == "wal"
    finally:
        await store.aclose()


async def test_closing_writes_what_is_queued(db_url: str) -> None:
    first = open_store(db_url, instance_id="a", orphan_after_s=3600)
    await first.start()
    t = turn()
    await first.begin_answer("local", t, "m1", "s1", "model")
    await first.aclose()
    again = open_store(db_url, instance_id="b", orphan_after_s=3600)
    await again.start()
    try:
        message = await again.get_message("local", "m1")
        assert message is not None and message["state"] == "streaming"
    finally:
        await again.aclose()


async def test_a_deferred_write_waits_out_a_short_outage_and_a_known_outage_is_a_503(
        pg_proxy: TcpProxy, pg_database: str) -> None:
    proxied = open_store(pg_url(pg_database, pg_proxy.port))
    assert isinstance(proxied, SQLStore)
    await proxied.start()
    try:
        await pg_proxy.stop()
        t = turn()
        await proxied.begin_answer("local", t, "m1", "s1", "model")  # queued, not refused
        with pytest.raises(ServiceUnavailable):  # a write someone waits for fails fast
            await proxied.checkpoint("m1", "partial", "")
        assert proxied.writer.down
        with pytest.raises(ServiceUnavailable):  # the database is known down: refused
            await proxied.begin_answer("local", turn(), "m2", "s2", "model")
        await pg_proxy.start()
        # The finish queues behind the kept write: once it is stored, both are.
        await proxied.finish_assistant("m1", done("full"))
        assert not proxied.writer.down
        message = await proxied.get_message("local", "m1")
        assert message is not None and (message["state"], message["content"]) == (
            "complete", "full")
        assert await proxied.get_message("local", "m2") is None
    finally:
        await proxied.aclose()
