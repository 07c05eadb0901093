"""tokenrelay.store: the same contract on SQLite and PostgreSQL, plus the HTTP routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenrelay.config import Settings
from tokenrelay.errors import BadRequest, ConfigError, ServiceUnavailable, TokenRelayError
from tokenrelay.routes.conversations import routes
from tokenrelay.store import AssistantResult, open_store
from tokenrelay.store.sql import SQLStore, _percentile, async_url, metadata

from .conftest import TcpProxy, pg_url

# -- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///tokenrelay.db", "sqlite+aiosqlite:///tokenrelay.db"),
        ("sqlite:////var/lib/tr.db", "sqlite+aiosqlite:////var/lib/tr.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:p@h:5433/db", "postgresql+asyncpg://u:p@h:5433/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql+asyncpg://u@h/db?ssl=require"),
    ],
)
def test_async_url(given: str, expected: str) -> None:
    assert async_url(given).render_as_string(hide_password=False) == expected


def test_memory_url_uses_aiosqlite() -> None:
    url = async_url("sqlite:///:memory:")
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", ":memory:")


@pytest.mark.parametrize("bad", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "nonsense"])
def test_unsupported_url_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        open_store(bad)


def test_percentile_interpolates_between_ranks() -> None:
    assert _percentile([], 0.5) is None
    assert _percentile([7.0], 0.95) == 7.0
    assert _percentile([100.0, 200.0, 300.0, 400.0], 0.5) == 250.0
    assert _percentile([100.0, 200.0, 300.0, 400.0], 0.95) == pytest.approx(385.0)


# -- migrations -------------------------------------------------------------------------


async def test_migrations_run_from_an_empty_database(store: SQLStore) -> None:
    assert store._engine is not None
    async with store._engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        assert version == "0003"

        def diff(sync_conn: Connection) -> list[Any]:
            return compare_metadata(MigrationContext.configure(sync_conn), metadata)

        # The query-side tables in sql.py match what the migrations built.
        assert await conn.run_sync(diff) == []


async def test_starting_again_is_a_no_op(db_url: str) -> None:
    for _ in range(2):
        again = open_store(db_url)
        await again.start()
        assert await again.list_conversations("local") == []
        await again.aclose()


async def test_memory_database() -> None:
    memory = open_store("sqlite:///:memory:")
    await memory.start()
    try:
        cid = await memory.ensure_conversation("local", None, "in memory")
        await memory.add_user_message("local", cid, "hi")
        found = await memory.get_conversation("local", cid)
        assert found is not None and [m["content"] for m in found["messages"]] == ["hi"]
    finally:
        await memory.aclose()


# -- conversations ----------------------------------------------------------------------


def parse_iso(value: str) -> datetime:
    assert value.endswith("Z")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    return parsed


async def test_create_list_get_rename_delete(store: SQLStore) -> None:
    first = await store.ensure_conversation("alice", None, "  First chat  ")
    second = await store.ensure_conversation("alice", None, "")
    assert first != second and len(first) >= 20

    listed = await store.list_conversations("alice")
    assert [c["id"] for c in listed] == [second, first]  # newest first
    assert listed[1]["title"] == "First chat"
    assert listed[0]["title"] == "New conversation"
    assert set(listed[0]) == {"id", "title", "created_at", "updated_at"}
    parse_iso(listed[0]["created_at"])

    # Activity moves a conversation to the top.
    await store.add_user_message("alice", first, "hello")
    assert [c["id"] for c in await store.list_conversations("alice")] == [first, second]
    assert [c["id"] for c in await store.list_conversations("alice", limit=1, offset=1)] == [second]

    assert await store.ensure_conversation("alice", first, "ignored") == first
    assert await store.rename_conversation("alice", first, "Renamed " + "x" * 300)
    found = await store.get_conversation("alice", first)
    assert found is not None
    assert found["title"] == ("Renamed " + "x" * 300)[:200]
    assert [m["content"] for m in found["messages"]] == ["hello"]

    assert await store.delete_conversation("alice", first)
    assert await store.get_conversation("alice", first) is None
    assert not await store.delete_conversation("alice", first)
    assert [c["id"] for c in await store.list_conversations("alice")] == [second]


async def test_another_owner_sees_nothing(store: SQLStore) -> None:
    cid = await store.ensure_conversation("alice", None, "private")
    await store.add_user_message("alice", cid, "secret")
    await store.begin_assistant("alice", cid, "msg-a", "stream-a", "m")

    assert await store.list_conversations("mallory") == []
    assert await store.get_conversation("mallory", cid) is None
    assert await store.get_message("mallory", "msg-a") is None
    assert not await store.rename_conversation("mallory", cid, "mine")
    assert not await store.delete_conversation("mallory", cid)
    for attempt in (
        store.ensure_conversation("mallory", cid, "x"),
        store.add_user_message("mallory", cid, "x"),
        store.begin_assistant("mallory", cid, "msg-m", "stream-m", "m"),
        store.ensure_conversation("alice", "no-such-id", "x"),
    ):
        with pytest.raises(BadRequest) as caught:
            await attempt
        assert (caught.value.status, caught.value.code) == (404, "conversation_not_found")

    found = await store.get_conversation("alice", cid)
    assert found is not None and found["title"] == "private"
    assert [m["content"] for m in found["messages"]] == ["secret", ""]


ATTEMPTS = [
    {"route": "fast", "provider": "p", "upstream_model": "fast-v1", "continuation": False,
     "status": 200, "outcome": "upstream_incomplete", "started_ms": 0.0, "elapsed_ms": 80.5,
     "usage": {"prompt_tokens": None, "completion_tokens": 1, "source": "counted"}},
    {"route": "fast-v2", "provider": "p", "upstream_model": "fast-v2", "continuation": True,
     "status": 200, "outcome": "ok", "started_ms": 81.0, "elapsed_ms": 40.0,
     "usage": {"prompt_tokens": 12, "completion_tokens": 2, "source": "provider"}},
]


async def test_assistant_lifecycle(store: SQLStore) -> None:
    cid = await store.ensure_conversation("local", None, "t")
    user_id = await store.add_user_message("local", cid, "question")
    await store.begin_assistant("local", cid, "answer-1", "stream-1", "fast")
    await store.checkpoint("answer-1", "Hel", "thinking")

    found = await store.get_conversation("local", cid)
    assert found is not None
    user, answer = found["messages"]
    assert user["id"] == user_id and user["role"] == "user" and user["state"] == "complete"
    assert answer == {
        "id": "answer-1",
        "role": "assistant",
        "content": "Hel",
        "reasoning": "thinking",
        "tool_calls": None,
        "state": "streaming",
        "model_requested": "fast",
        "model_used": None,
        "finish_reason": None,
        "usage": {"prompt_tokens": None, "completion_tokens": None, "estimated": False},
        "ttft_ms": None,
        "tokens_per_s": None,
        "error": None,
        "attempts": None,
        "stream_id": "stream-1",
        "created_at": answer["created_at"],
        "parent_id": user_id,
        "version": 1,
        "versions": 1,
        "sibling_ids": ["answer-1"],
    }
    parse_iso(answer["created_at"])
    before = parse_iso(found["updated_at"])

    tool_calls = [
        {
            "index": 0,
            "id": "c1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"a": 1}'},
        }
    ]
    await store.finish_assistant(
        "answer-1",
        AssistantResult(
            state="complete",
            content="Hello",
            reasoning="thinking hard",
            tool_calls=tool_calls,
            finish_reason="stop",
            model_used="fast-v2",
            prompt_tokens=12,
            completion_tokens=3,
            usage_estimated=True,
            ttft_ms=120.5,
            tokens_per_s=42.0,
            attempts=ATTEMPTS,
        ),
    )
    # A checkpoint arriving late never overwrites the final answer.
    await store.checkpoint("answer-1", "Hel", "")

    message = await store.get_message("local", "answer-1")
    assert message is not None
    assert message["conversation_id"] == cid
    assert (message["state"], message["content"], message["reasoning"]) == (
        "complete",
        "Hello",
        "thinking hard",
    )
    assert message["tool_calls"] == tool_calls
    assert message["finish_reason"] == "stop" and message["model_used"] == "fast-v2"
    assert message["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "estimated": True}
    assert (message["ttft_ms"], message["tokens_per_s"]) == (120.5, 42.0)
    assert message["attempts"] == ATTEMPTS  # issue 15: every attempt, as stored JSON
    found = await store.get_conversation("local", cid)
    assert found is not None and parse_iso(found["updated_at"]) >= before

    await store.begin_assistant("local", cid, "answer-2", "stream-2", "fast")
    await store.finish_assistant(
        "answer-2",
        AssistantResult(
            state="error", content="par", error_code="upstream_error", error_message="boom"
        ),
    )
    failed = await store.get_message("local", "answer-2")
    assert failed is not None
    assert failed["error"] == {"code": "upstream_error", "message": "boom"}
    assert failed["content"] == "par"

    assert await store.delete_conversation("local", cid)
    assert await store.get_message("local", "answer-1") is None  # cascaded


async def test_start_interrupts_own_and_stale_streams(db_url: str) -> None:
    first = open_store(db_url, instance_id="a", orphan_after_s=3600)
    await first.start()
    cid = await first.ensure_conversation("local", None, "t")
    await first.begin_assistant("local", cid, "mine", "s1", "m")
    await first.checkpoint("mine", "partial answer", "partial thought")
    await first.aclose()  # the process "dies" mid-stream

    # Another instance sharing the database leaves a recent stream of "a" alone...
    other = open_store(db_url, instance_id="b", orphan_after_s=3600)
    await other.start()
    assert isinstance(other, SQLStore)
    await other.begin_assistant("local", cid, "theirs", "s2", "m")
    message = await other.get_message("local", "mine")
    assert message is not None and message["state"] == "streaming"
    assert await other.interrupt_orphans(3600) == 0

    # ...but "a" restarting with the same instance id takes over its own leftovers.
    restarted = open_store(db_url, instance_id="a", orphan_after_s=3600)
    await restarted.start()
    message = await restarted.get_message("local", "mine")
    assert message is not None
    assert message["state"] == "interrupted"
    assert (message["content"], message["reasoning"]) == ("partial answer", "partial thought")
    assert message["error"] is not None and message["error"]["code"] == "interrupted"
    theirs = await restarted.get_message("local", "theirs")
    assert theirs is not None and theirs["state"] == "streaming"
    await restarted.aclose()

    # A stream not checkpointed for longer than orphan_after_s is an orphan for anyone.
    sweeper = open_store(db_url, instance_id="c", orphan_after_s=0)
    await sweeper.start()
    theirs = await sweeper.get_message("local", "theirs")
    assert theirs is not None and theirs["state"] == "interrupted"
    await sweeper.aclose()

    # The live generation of "b" still records its true final state.
    await other.checkpoint("theirs", "ignored once interrupted", "")
    await other.finish_assistant("theirs", AssistantResult(state="complete", content="full"))
    theirs = await other.get_message("local", "theirs")
    assert theirs is not None and (theirs["state"], theirs["content"]) == ("complete", "full")
    await other.aclose()


async def test_mark_interrupted_with_the_relayed_text_replaces_the_checkpoint(
        store: SQLStore) -> None:
    cid = await store.ensure_conversation("local", None, "t")
    await store.begin_assistant("local", cid, "dead", "s1", "m")
    await store.checkpoint("dead", "a second", "old thought")
    assert await store.mark_interrupted("dead", "a second behind the journal", "thought")
    message = await store.get_message("local", "dead")
    assert message is not None and message["state"] == "interrupted"
    assert (message["content"], message["reasoning"]) == ("a second behind the journal",
                                                          "thought")
    # Marked first by an orphan sweep: the journal's text still wins, the state stays.
    await store.begin_assistant("local", cid, "swept", "s2", "m")
    await store.checkpoint("swept", "part", "")
    assert await store.interrupt_orphans(0) == 1
    assert not await store.mark_interrupted("swept", "part and more", "")
    message = await store.get_message("local", "swept")
    assert message is not None
    assert (message["state"], message["content"]) == ("interrupted", "part and more")
    # Without text, the checkpoint is kept; a finished message is never touched.
    await store.begin_assistant("local", cid, "kept", "s3", "m")
    await store.checkpoint("kept", "checkpointed", "")
    assert await store.mark_interrupted("kept")
    message = await store.get_message("local", "kept")
    assert message is not None and message["content"] == "checkpointed"
    await store.finish_assistant("kept", AssistantResult(state="complete", content="whole"))
    await store.mark_interrupted("kept", "other", "")
    message = await store.get_message("local", "kept")
    assert message is not None and (message["state"], message["content"]) == ("complete", "whole")


async def finished(
    store: SQLStore, cid: str, model: str, state: str, ttft: float | None, tps: float | None
) -> None:
    message_id = f"{model}-{state}-{ttft}-{tps}"
    await store.begin_assistant("local", cid, message_id, "s-" + message_id, model)
    await store.finish_assistant(
        message_id,
        AssistantResult(state=state, content="x", model_used=model, ttft_ms=ttft, tokens_per_s=tps,
                        completion_tokens=3),
    )


async def test_model_stats(store: SQLStore) -> None:
    assert await store.model_stats() == []
    cid = await store.ensure_conversation("local", None, "t")
    await store.add_user_message("local", cid, "not counted")
    await finished(store, cid, "alpha", "complete", 100, 10)
    await finished(store, cid, "alpha", "complete", 200, 20)
    await finished(store, cid, "alpha", "error", 300, 30)
    await finished(store, cid, "alpha", "cancelled", 400, None)
    await finished(store, cid, "beta", "interrupted", None, None)
    await store.begin_assistant("local", cid, "still-streaming", "s", "alpha")

    assert await store.model_stats() == [
        {
            "model": "alpha",
            "count": 4,
            "ttft_ms_p50": 250.0,
            "ttft_ms_p95": 385.0,
            "tokens_per_s_p50": 20.0,
            "error_rate": 0.25,
            "cancel_rate": 0.25,
            "completion_tokens": 12,
        },
        {
            "model": "beta",
            "count": 1,
            "ttft_ms_p50": None,
            "ttft_ms_p95": None,
            "tokens_per_s_p50": None,
            "error_rate": 1.0,
            "cancel_rate": 0.0,
            "completion_tokens": 3,
        },
    ]

    # Percentiles read only the newest `stats_window` messages of each model.
    store.stats_window = 2
    alpha = (await store.model_stats())[0]
    assert (alpha["count"], alpha["ttft_ms_p50"], alpha["tokens_per_s_p50"]) == (4, 350.0, 30.0)


# -- outages ------------------------------------------------------------------------------


async def test_closed_port_raises_service_unavailable() -> None:
    down = open_store("postgresql://postgres@127.0.0.1:1/x")
    with pytest.raises(ServiceUnavailable) as caught:
        await down.start()
    assert caught.value.status == 503 and caught.value.message == "database unavailable"
    with pytest.raises(RuntimeError):  # a store that failed to start is not half-open
        await down.list_conversations("local")


async def test_sqlite_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    missing = open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(ConfigError, match="database_url"):
        await missing.start()


async def test_database_outage_and_recovery(pg_proxy: TcpProxy, pg_database: str) -> None:
    proxied = open_store(pg_url(pg_database, pg_proxy.port))
    await proxied.start()
    try:
        cid = await proxied.ensure_conversation("local", None, "before")
        assert isinstance(proxied, SQLStore)
        with pytest.raises(ServiceUnavailable):  # lost in the middle of a transaction
            async with proxied._begin() as conn:
                await pg_proxy.stop()
                await conn.execute(text("SELECT 1"))
        await pg_proxy.start()
        assert [c["id"] for c in await proxied.list_conversations("local")] == [cid]
        said = [("user", "q")]
        assert await proxied.find_continuation("local", cid, said) == (None, 0)  # kept conn
        await pg_proxy.stop()  # the database goes away, pooled connections die
        with pytest.raises(ServiceUnavailable):
            await proxied.list_conversations("local")
        with pytest.raises(ServiceUnavailable):
            await proxied.checkpoint("nothing", "x", "")
        with pytest.raises(ServiceUnavailable):
            await proxied.find_continuation("local", cid, said)
        await pg_proxy.start()  # same port: the pool reconnects by itself
        assert [c["id"] for c in await proxied.list_conversations("local")] == [cid]
        assert await proxied.find_continuation("local", cid, said) == (None, 0)
    finally:
        await proxied.aclose()


# -- routes ---------------------------------------------------------------------------------


class OwnerFromHeader:
    """Stands in for the auth middleware: ``X-Owner`` sets ``request.state.owner``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-owner":
                    scope.setdefault("state", {})["owner"] = value.decode()
        await self.app(scope, receive, send)


async def render_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenRelayError)
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, SQLStore]]:
    sqlite = open_store(f"sqlite:///{tmp_path / 'routes.db'}")
    assert isinstance(sqlite, SQLStore)
    await sqlite.start()
    app = Starlette(routes=routes, exception_handlers={TokenRelayError: render_error})
    app.state.store = sqlite
    app.state.settings = Settings()
    transport = httpx.ASGITransport(app=OwnerFromHeader(app))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, sqlite
    finally:
        await sqlite.aclose()


NOT_FOUND = {
    "error": {
        "code": "conversation_not_found",
        "message": "conversation not found",
        "retryable": False,
    }
}


async def test_routes_conversation_flow(client: tuple[httpx.AsyncClient, SQLStore]) -> None:
    http, store = client
    assert (await http.get("/api/conversations")).json() == {"conversations": []}
    cid = await store.ensure_conversation("local", None, "Hello")
    await store.add_user_message("local", cid, "hi")
    other = await store.ensure_conversation("bob", None, "Bob's")

    listed = (await http.get("/api/conversations")).json()["conversations"]
    assert [c["id"] for c in listed] == [cid]
    got = await http.get(f"/api/conversations/{cid}")
    assert got.status_code == 200
    assert got.json()["title"] == "Hello" and got.json()["messages"][0]["content"] == "hi"

    renamed = await http.patch(f"/api/conversations/{cid}", json={"title": "  New name "})
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "New name" and "messages" not in renamed.json()
    assert set(renamed.json()) == {"id", "title", "created_at", "updated_at"}

    # Bob's conversation is invisible to the local owner, visible to Bob.
    for response in (
        await http.get(f"/api/conversations/{other}"),
        await http.patch(f"/api/conversations/{other}", json={"title": "mine"}),
        await http.delete(f"/api/conversations/{other}"),
        await http.get("/api/conversations/does-not-exist"),
    ):
        assert response.status_code == 404 and response.json() == NOT_FOUND
    bob = await http.get("/api/conversations", headers={"X-Owner": "bob"})
    assert [c["id"] for c in bob.json()["conversations"]] == [other]

    deleted = await http.delete(f"/api/conversations/{cid}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await http.delete(f"/api/conversations/{cid}")).status_code == 404
    assert (await http.get(f"/api/conversations/{cid}")).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b'{"title": ""}',
        b'{"title": "   "}',
        b'{"title": 5}',
        b"{}",
        b"[]",
        b"not json",
        ('{"title": "' + "x" * 201 + '"}').encode(),
    ],
)
async def test_routes_rename_validation(
    client: tuple[httpx.AsyncClient, SQLStore], body: bytes
) -> None:
    http, store = client
    cid = await store.ensure_conversation("local", None, "keep")
    response = await http.patch(f"/api/conversations/{cid}", content=body)
    assert response.status_code == 400
    expected = "invalid_json" if body == b"not json" else "invalid_request"
    assert response.json()["error"]["code"] == expected
    found = await store.get_conversation("local", cid)
    assert found is not None and found["title"] == "keep"


async def test_routes_list_paging(client: tuple[httpx.AsyncClient, SQLStore]) -> None:
    http, store = client
    ids = [await store.ensure_conversation("local", None, str(i)) for i in range(3)]
    page = await http.get("/api/conversations", params={"limit": 2, "offset": 1})
    assert [c["id"] for c in page.json()["conversations"]] == [ids[1], ids[0]]
    for params in ({"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"offset": "-1"}):
        response = await http.get("/api/conversations", params=params)
        assert response.status_code == 400, params


async def test_search_finds_titles_and_message_text_case_insensitively(store: SQLStore) -> None:
    trip = await store.ensure_conversation("alice", None, "Trip to Lisbon")
    code = await store.ensure_conversation("alice", None, "Code review")
    await store.add_user_message("alice", code, "Why does my Regex fail on 100% of inputs?")
    await store.add_user_message("alice", trip, "plain text")
    other = await store.ensure_conversation("bob", None, "lisbon too")

    async def ids(query: str) -> list[str]:
        return [c["id"] for c in await store.list_conversations("alice", query=query)]

    assert await ids("LISBON") == [trip]  # title, any case; bob's is not alice's
    assert await ids("regex") == [code]  # message text
    assert await ids("100%") == [code]  # % is literal, not a wildcard
    assert await ids("1_0") == []  # so is _
    assert set(await ids("")) == {trip, code}
    assert other not in await ids("lisbon")


async def test_routes_search_and_its_limit(client: tuple[httpx.AsyncClient, SQLStore]) -> None:
    http, store = client
    wanted = await store.ensure_conversation("local", None, "Needle in a haystack")
    await store.ensure_conversation("local", None, "Other")
    found = await http.get("/api/conversations", params={"q": "needle"})
    assert [c["id"] for c in found.json()["conversations"]] == [wanted]
    too_long = await http.get("/api/conversations", params={"q": "x" * 201})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "invalid_query"


async def test_routes_stats(client: tuple[httpx.AsyncClient, SQLStore]) -> None:
    http, store = client
    cid = await store.ensure_conversation("local", None, "t")
    await finished(store, cid, "alpha", "complete", 100, 10)
    response = await http.get("/api/stats")
    assert response.status_code == 200
    assert response.json() == {
        "models": [
            {
                "model": "alpha",
                "count": 1,
                "ttft_ms_p50": 100.0,
                "ttft_ms_p95": 100.0,
                "tokens_per_s_p50": 10.0,
                "error_rate": 0.0,
                "cancel_rate": 0.0,
                "completion_tokens": 3,
            }
        ]
    }
