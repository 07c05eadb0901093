"""Answer versions (issue 19): the stored conversation is a tree, on SQLite and PostgreSQL.

A regenerate or an edit-and-resend adds a sibling (a version of that turn) and never
deletes; the branch shown is remembered; the 0003 migration turns today's linear
conversations into one branch each without losing a message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tokenrelay.store import AssistantResult, Turn, open_store
from tokenrelay.store.sql import MIGRATIONS_DIR, SQLStore, async_url
from tokenrelay.store.tree import Tree

from .test_store import client  # noqa: F401  (the routes fixture)


def done(content: str, state: str = "complete") -> AssistantResult:
    return AssistantResult(state=state, content=content, model_used="m")


async def ask(store: SQLStore, cid: str, said: list[tuple[str, str]], answer_id: str,
              answer: str, state: str = "complete") -> None:
    """What POST /api/chat stores for a request that sends ``said``: the new part of the
    branch and its answer."""
    parent, matched = await store.find_continuation("local", cid, said)
    new = [c for role, c in said[matched:] if role == "user"]
    await store.begin_answer("local", Turn(cid, False, "t", new, parent), answer_id,
                             "s-" + answer_id, "m")
    await store.finish_assistant(answer_id, done(answer, state))


async def shown(store: SQLStore, cid: str) -> list[tuple[str, int, int]]:
    found = await store.get_conversation("local", cid)
    assert found is not None
    return [(m["content"], m["version"], m["versions"]) for m in found["messages"]]


async def first_turn(store: SQLStore) -> str:
    cid = "c-" + Path(__file__).stem
    await store.begin_answer("local", Turn(cid, True, "t", ["q1"]), "a1", "s-a1", "m")
    await store.finish_assistant("a1", done("A1"))
    return cid


async def test_a_regenerate_adds_a_version_of_the_answer_and_shows_it(store: SQLStore) -> None:
    cid = await first_turn(store)
    await ask(store, cid, [("user", "q1")], "a1b", "A1 again")
    assert await shown(store, cid) == [("q1", 1, 1), ("A1 again", 2, 2)]
    found = await store.get_conversation("local", cid)
    assert found is not None
    question, answer = found["messages"]
    assert question["parent_id"] is None and answer["parent_id"] == question["id"]
    assert answer["sibling_ids"] == ["a1", "a1b"]

    # Back to the first version: the branch through it is shown again.
    assert await store.set_active("local", cid, "a1") is True
    assert await shown(store, cid) == [("q1", 1, 1), ("A1", 1, 2)]


async def test_an_edit_adds_a_version_of_the_question_and_keeps_the_old_branch(
        store: SQLStore) -> None:
    cid = await first_turn(store)
    await ask(store, cid, [("user", "q1"), ("assistant", "A1"), ("user", "q2")], "a2", "A2")
    await ask(store, cid, [("user", "q1"), ("assistant", "A1"), ("user", "q2 edited")],
              "a2e", "A2e")
    assert await shown(store, cid) == [("q1", 1, 1), ("A1", 1, 1), ("q2 edited", 2, 2),
                                       ("A2e", 1, 1)]
    found = await store.get_conversation("local", cid)
    assert found is not None
    old_question = found["messages"][2]["sibling_ids"][0]
    # Switching to the old question shows its answer: the branch goes down to its leaf.
    assert await store.set_active("local", cid, old_question) is True
    assert await shown(store, cid) == [("q1", 1, 1), ("A1", 1, 1), ("q2", 1, 2), ("A2", 1, 1)]

    # Continuing the shown branch follows it (not the newest one), adding nothing else.
    await ask(store, cid, [("user", "q1"), ("assistant", "A1"), ("user", "q2"),
                           ("assistant", "A2"), ("user", "q3")], "a3", "A3")
    assert await shown(store, cid) == [("q1", 1, 1), ("A1", 1, 1), ("q2", 1, 2), ("A2", 1, 1),
                                       ("q3", 1, 1), ("A3", 1, 1)]
    # Editing the first question: a new root, everything else still there.
    await ask(store, cid, [("user", "q1 edited")], "a1e", "A1e")
    assert await shown(store, cid) == [("q1 edited", 2, 2), ("A1e", 1, 1)]
    assert await store.set_active("local", cid, found["messages"][0]["id"]) is True
    assert [c for c, _, _ in await shown(store, cid)] == ["q1", "A1", "q2", "A2", "q3", "A3"]


async def test_a_stopped_answer_is_a_version_and_one_without_text_is_stepped_over(
        store: SQLStore) -> None:
    cid = await first_turn(store)
    await ask(store, cid, [("user", "q1")], "a1s", "A1 par", state="cancelled")
    found = await store.get_conversation("local", cid)
    assert found is not None
    assert [(m["state"], m["version"], m["versions"]) for m in found["messages"]][1] == (
        "cancelled", 2, 2)

    # Stopped before any text: the page does not send it back; the next question follows it.
    await ask(store, cid, [("user", "q1")], "a1empty", "", state="cancelled")
    await ask(store, cid, [("user", "q1"), ("user", "q2")], "a2", "A2")
    found = await store.get_conversation("local", cid)
    assert found is not None
    assert [(m["content"], m["versions"]) for m in found["messages"]] == [
        ("q1", 1), ("", 3), ("q2", 1), ("A2", 1)]


async def test_the_same_messages_sent_again_find_the_branch_shown(store: SQLStore) -> None:
    cid = await first_turn(store)
    await ask(store, cid, [("user", "q1")], "a1b", "A1")  # a regenerate with the same text
    await store.set_active("local", cid, "a1")
    parent, matched = await store.find_continuation(
        "local", cid, [("user", "q1"), ("assistant", "A1"), ("user", "q2")])
    assert (parent, matched) == ("a1", 2)  # the shown one, though a1b is newer
    await store.set_active("local", cid, "a1b")
    assert (await store.find_continuation("local", cid, [("user", "q1"), ("assistant", "A1")]))[
        0] == "a1b"


async def test_finding_where_a_request_continues_is_one_statement(store: SQLStore) -> None:
    """Issue 17's budget: a request in an existing conversation reads once before it
    streams (it used to be two reads: the owner check, then the messages), and that
    read is one statement on the driver, without the pool's ping, BEGIN and COMMIT."""
    cid = await first_turn(store)
    await store.writer.flush()
    assert store._engine is not None
    statements: list[str] = []
    pooled: list[str] = []  # through SQLAlchemy's pool: a ping, BEGIN, COMMIT, hops

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        pooled.append(statement)

    # Not through SQLAlchemy (one round trip, one thread hop): the driver's statements.
    await store.find_continuation("local", cid, [("user", "q1")])  # opens its connection
    if store._rows is not None:  # a SQLite file: the writer's thread and connection
        assert store._rows._conn is not None
        store._rows._conn.set_trace_callback(statements.append)
    elif store._reader is not None:  # PostgreSQL: a kept connection of its own
        driver = (await store._reader.get_raw_connection()).driver_connection
        assert driver is not None
        driver.add_query_logger(lambda record: statements.append(record.query))
    event.listen(store._engine.sync_engine, "before_cursor_execute", seen)
    try:
        found = await store.find_continuation("local", cid, [("user", "q1")])
    finally:
        event.remove(store._engine.sync_engine, "before_cursor_execute", seen)
    question = (await store.get_conversation("local", cid) or {})["messages"][0]["id"]
    assert found == (question, 1)
    assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT")
    assert pooled == []


async def test_switching_is_owner_scoped_and_checks_the_message(store: SQLStore) -> None:
    cid = await first_turn(store)
    other = await store.ensure_conversation("local", None, "other")
    await store.add_user_message("local", other, "elsewhere")
    elsewhere = (await store.get_conversation("local", other) or {})["messages"][0]["id"]
    assert await store.set_active("mallory", cid, "a1") is None
    assert await store.set_active("local", "no-such", "a1") is None
    assert await store.set_active("local", cid, "no-such") is False
    assert await store.set_active("local", cid, elsewhere) is False
    with pytest.raises(Exception) as caught:
        await store.find_continuation("mallory", cid, [("user", "q1")])
    assert getattr(caught.value, "status", None) == 404


async def test_legacy_appends_follow_the_branch_shown(store: SQLStore) -> None:
    cid = await store.ensure_conversation("local", None, "t")
    await store.add_user_message("local", cid, "q1")
    await store.begin_assistant("local", cid, "a1", "s1", "m")
    await store.add_user_message("local", cid, "q2")
    found = await store.get_conversation("local", cid)
    assert found is not None
    ids = [m["id"] for m in found["messages"]]
    assert [m["parent_id"] for m in found["messages"]] == [None, ids[0], ids[1]]


def test_the_tree_survives_unknown_parents_and_picks_the_newest_leaf() -> None:
    tree = Tree([
        {"id": "u", "parent_id": None, "seq": 1, "role": "user", "content": "q"},
        {"id": "a", "parent_id": "u", "seq": 2, "role": "assistant", "content": "x"},
        {"id": "b", "parent_id": "u", "seq": 3, "role": "assistant", "content": "y"},
        {"id": "o", "parent_id": "gone", "seq": 4, "role": "user", "content": "orphan"},
    ])
    assert [n["id"] for n in tree.branch("u")] == ["u", "b"]
    assert [n["id"] for n in tree.branch(None)] == ["o"]  # the newest message's branch
    assert tree.versions(tree.by_id["o"]) == {"version": 2, "versions": 2,
                                              "sibling_ids": ["u", "o"]}
    assert tree.continuation("a", [("user", "q"), ("assistant", "y"), ("user", "z")]) == ("b", 2)


# -- the 0003 migration on a database with today's (linear) conversations -----------------


async def migrate_to(url: str, revision: str) -> None:
    engine = create_async_engine(async_url(url))

    def upgrade(conn: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.upgrade(config, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
    finally:
        await engine.dispose()


async def fill_0001(url: str) -> None:
    """Two linear conversations as 0001 stored them (one with a gap left by a truncate)."""
    engine = create_async_engine(async_url(url))
    now: Any = datetime(2026, 1, 1, tzinfo=UTC)
    if url.startswith("sqlite"):
        now = now.replace(tzinfo=None)  # as UTCDateTime stores it
    conv = text("INSERT INTO conversations (id, owner, title, last_seq, created_at, updated_at)"
                " VALUES (:id, 'local', :id, :last, :now, :now)")
    msg = text("INSERT INTO messages (id, conversation_id, owner, seq, role, content, reasoning,"
               " state, usage_estimated, created_at, updated_at) VALUES (:id, :cid, 'local',"
               " :seq, :role, :content, '', :state, false, :now, :now)")
    rows: list[dict[str, Any]] = [
        {"id": "m1", "cid": "old", "seq": 1, "role": "user", "content": "q1"},
        {"id": "m2", "cid": "old", "seq": 2, "role": "assistant", "content": "A1"},
        {"id": "m3", "cid": "old", "seq": 5, "role": "user", "content": "q2"},
        {"id": "m4", "cid": "old", "seq": 6, "role": "assistant", "content": "A2 par"},
        {"id": "n1", "cid": "other", "seq": 1, "role": "user", "content": "hello"},
    ]
    try:
        async with engine.begin() as conn:
            for cid, last in (("old", 6), ("other", 1), ("empty", 0)):
                await conn.execute(conv, {"id": cid, "last": last, "now": now})
            await conn.execute(msg, [{**r, "now": now, "state": "cancelled" if r["id"] == "m4"
                                      else "complete"} for r in rows])
    finally:
        await engine.dispose()


async def test_the_migration_keeps_every_conversation_as_one_branch(db_url: str) -> None:
    await migrate_to(db_url, "0001")
    await fill_0001(db_url)
    store = open_store(db_url)
    assert isinstance(store, SQLStore)
    await store.start()  # applies 0002_message_attempts and 0003
    try:
        found = await store.get_conversation("local", "old")
        assert found is not None
        assert [(m["id"], m["parent_id"], m["content"], m["state"], m["versions"])
                for m in found["messages"]] == [
            ("m1", None, "q1", "complete", 1), ("m2", "m1", "A1", "complete", 1),
            ("m3", "m2", "q2", "complete", 1), ("m4", "m3", "A2 par", "cancelled", 1)]
        other = await store.get_conversation("local", "other")
        assert other is not None and [m["content"] for m in other["messages"]] == ["hello"]
        empty = await store.get_conversation("local", "empty")
        assert empty is not None and empty["messages"] == []
        assert {c["id"] for c in await store.list_conversations("local")} == {
            "old", "other", "empty"}

        # A migrated conversation takes versions: regenerate its stopped answer.
        await ask(store, "old", [("user", "q1"), ("assistant", "A1"), ("user", "q2")],
                  "m4b", "A2")
        assert await shown(store, "old") == [("q1", 1, 1), ("A1", 1, 1), ("q2", 1, 1),
                                             ("A2", 2, 2)]
        # And the new rows take positions after the old ones (last_seq kept).
        async with store._begin() as conn:
            seq = await conn.scalar(text("SELECT seq FROM messages WHERE id = 'm4b'"))
        assert seq == 7
    finally:
        await store.aclose()


# -- PATCH /api/conversations/{id} {"active_message_id"} -------------------------------------


async def test_routes_switch_the_version_shown(
        client: tuple[httpx.AsyncClient, SQLStore]) -> None:  # noqa: F811
    http, store = client
    cid = await first_turn(store)
    await ask(store, cid, [("user", "q1")], "a1b", "A1b")
    switched = await http.patch(f"/api/conversations/{cid}", json={"active_message_id": "a1"})
    assert switched.status_code == 200
    body = switched.json()
    assert [(m["content"], m["version"], m["versions"]) for m in body["messages"]] == [
        ("q1", 1, 1), ("A1", 1, 2)]
    assert body["messages"][1]["sibling_ids"] == ["a1", "a1b"]
    assert (await http.get(f"/api/conversations/{cid}")).json() == body

    unknown = await http.patch(f"/api/conversations/{cid}", json={"active_message_id": "zz"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "message_not_found"
    theirs = await http.patch(f"/api/conversations/{cid}", json={"active_message_id": "a1b"},
                              headers={"X-Owner": "bob"})
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "conversation_not_found"
    for bad in ({"active_message_id": 5}, {"active_message_id": ""},
                {"active_message_id": "x" * 101}, {"active_message_id": "a1b", "title": ""}):
        response = await http.patch(f"/api/conversations/{cid}", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "invalid_request"
    # Nothing of the refused requests was applied.
    assert (await http.get(f"/api/conversations/{cid}")).json() == body
