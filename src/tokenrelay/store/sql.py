"""The SQL store: conversations and messages in SQLite (default) or PostgreSQL.

One implementation for both dialects, on SQLAlchemy 2 Core with async drivers
(``sqlite+aiosqlite``, ``postgresql+asyncpg``). The schema is owned by the Alembic
migrations in ``store/migrations/versions`` (append-only, numbered); :meth:`SQLStore.start`
applies them programmatically, so a fresh database needs no manual step. The tables below
mirror the migrations for querying only (``tests/store`` checks they do not drift).

Streaming messages left behind by a dead process. Several instances may share one
PostgreSQL, so start-up must not mark *another live instance's* answers as interrupted.
Each assistant message records the ``instance_id`` of the process that streams it, and
:meth:`SQLStore.start` marks as ``interrupted`` (partial text kept):

- every ``streaming`` message of this ``instance_id`` (only useful when the instance id is
  configured and stable across restarts; the default id is random per process), and
- every ``streaming`` message whose ``updated_at`` is older than ``orphan_after_s``
  (:meth:`SQLStore.interrupt_orphans`). :meth:`~SQLStore.checkpoint` bumps ``updated_at``,
  so a live generation must checkpoint more often than ``orphan_after_s`` even when no new
  text arrived (e.g. while a reasoning model is silent), or another instance starting up
  may mark it interrupted; its :meth:`~SQLStore.finish_assistant` still records the true
  final state.

A conversation's messages form a tree (``messages.parent_id``; migration 0002): the
children of one message are the versions of the next turn (a regenerate, an
edit-and-resend), and ``conversations.active_id`` is the last message of the branch shown.
:meth:`SQLStore.get_conversation` returns that branch, :meth:`SQLStore.find_continuation`
says where a chat request's messages leave it (store/tree.py), and nothing but deleting
the conversation ever deletes a message.

When the database is unreachable every method raises
:class:`~tokenrelay.errors.ServiceUnavailable` quickly (short connect timeout), and the
pool (``pool_pre_ping``) reconnects by itself once the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    delete,
    event,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

from tokenrelay.errors import BadRequest, ConfigError, ServiceUnavailable, TokenRelayError
from tokenrelay.store.base import FOLLOW_ACTIVE, AssistantResult, Store, Turn
from tokenrelay.store.sqlitefast import SQLiteRows
from tokenrelay.store.tree import Tree
from tokenrelay.store.writer import Writer

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
TITLE_MAX = 200
DEFAULT_TITLE = "New conversation"
INTERRUPTED_CODE = "interrupted"
INTERRUPTED_MESSAGE = "the gateway stopped before this answer finished"
# Serialises concurrent migrations of several instances starting against one PostgreSQL.
_PG_MIGRATION_LOCK = 0x746F6B72  # "tokr"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which stores naive text) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", String, primary_key=True),
    Column("owner", String, nullable=False),
    Column("title", String, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("active_id", String, nullable=True),  # the last message of the branch shown
    Index("ix_conversations_owner_updated", "owner", "updated_at"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String, primary_key=True),
    Column(
        "conversation_id",
        String,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("owner", String, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("role", String, nullable=False),
    Column("content", Text, nullable=False),
    Column("reasoning", Text, nullable=False),
    Column("tool_calls", JSON, nullable=True),
    Column("state", String, nullable=False),
    Column("model_requested", String, nullable=True),
    Column("model_used", String, nullable=True),
    Column("finish_reason", String, nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("usage_estimated", Boolean, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("tokens_per_s", Float, nullable=True),
    Column("error_code", String, nullable=True),
    Column("error_message", Text, nullable=True),
    Column("attempts", JSON, nullable=True),  # migration 0002_message_attempts
    Column("stream_id", String, nullable=True),
    Column("instance_id", String, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("parent_id", String, nullable=True),  # the message it follows (store/tree.py)
    UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
    Index("ix_messages_state_updated", "state", "updated_at"),
    Index("ix_messages_model_created", "model_used", "created_at"),
)


def new_id() -> str:
    """A random, unguessable id (128 bits, URL-safe) after its creation time in ms, so
    indexes on ids grow at one end (see ``tokenrelay.hub.new_sortable_id``)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_urlsafe(16)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _sqlite_now() -> str:
    """Now as the text ``sqlite3``'s default datetime adapter binds (naive UTC,
    ``isoformat(" ")``: microseconds unless they are 0), made once per write rather than
    by that adapter, a Python call, for every timestamp bound; the date and time of day
    formatted once a second (issue 17)."""
    global _second
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if seconds != _second[0]:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
        _second = (seconds, text)
    return f"{_second[1]}.{micros:06d}" if micros else _second[1]


def iso(value: datetime) -> str:
    """ISO-8601 in UTC with a ``Z`` suffix, millisecond precision."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def async_url(url: str) -> URL:
    """Turn a user-facing database URL into one with an async driver.

    ``sqlite:///file.db``, ``sqlite:///:memory:`` -> ``sqlite+aiosqlite``;
    ``postgresql://...``, ``postgres://...`` -> ``postgresql+asyncpg`` (libpq's ``sslmode``
    query parameter becomes asyncpg's ``ssl``).
    """
    raw = url.strip()
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"database_url is not a valid URL: {exc}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql" and driver in ("", "asyncpg"):
        query = dict(parsed.query)
        if "sslmode" in query:
            query["ssl"] = query.pop("sslmode")
        return parsed.set(drivername="postgresql+asyncpg", query=query)
    raise ConfigError(
        f"database_url: unsupported scheme {parsed.drivername!r} "
        "(use sqlite:///path.db or postgresql://user@host/db)"
    )


def _is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: enforce foreign keys (cascade), WAL for readers.

    ``synchronous=NORMAL``: in WAL mode a commit then writes the log without an fsync
    (SQLite syncs at its WAL checkpoints), so a process crash loses nothing committed and
    a power loss or OS crash may lose the last transactions (see README, Durability).
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _upgrade(connection: Connection) -> None:
    """Apply every pending migration on an already open connection (run via ``run_sync``)."""
    from alembic import command
    from alembic.config import Config

    if connection.dialect.name == "postgresql":
        # Held until the transaction ends: concurrent starters migrate one after the other.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not sorted_values:
        return None
    rank = p * (len(sorted_values) - 1)
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _message_dict(row: Any) -> dict[str, Any]:
    error = None
    if row.error_code is not None or row.error_message is not None:
        error = {"code": row.error_code, "message": row.error_message}
    return {
        "id": row.id,
        "role": row.role,
        "content": row.content,
        "reasoning": row.reasoning,
        "tool_calls": row.tool_calls,
        "state": row.state,
        "model_requested": row.model_requested,
        "model_used": row.model_used,
        "finish_reason": row.finish_reason,
        "usage": {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "estimated": bool(row.usage_estimated),
        },
        "ttft_ms": row.ttft_ms,
        "tokens_per_s": row.tokens_per_s,
        "error": error,
        "attempts": row.attempts,
        "stream_id": row.stream_id,
        "created_at": iso(row.created_at),
        "parent_id": row.parent_id,
    }


def _summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "title": row.title,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def _clean_title(title: str) -> str:
    return title.strip()[:TITLE_MAX] or DEFAULT_TITLE


def _not_found() -> BadRequest:
    return BadRequest("conversation not found", code="conversation_not_found", status=404)


# Marks an append whose first row follows the conversation's active message.
_ACTIVE = object()


async def _tree(conn: AsyncConnection, conversation_id: str) -> Tree:
    """The conversation's messages as a tree (only what matching and branches need)."""
    rows = await conn.execute(
        select(messages.c.id, messages.c.parent_id, messages.c.seq, messages.c.role,
               messages.c.content).where(messages.c.conversation_id == conversation_id)
    )
    return Tree(row._asdict() for row in rows)


_MESSAGE_COLUMNS = [c for c in messages.c if c.name not in ("owner", "instance_id")]

# The writer's statements, by rank (see store/writer.py: rows of a batch run rank by rank,
# one executemany each). Driver-level SQL: no compilation, no per-row type processing.
(R_CONVERSATION, R_MESSAGE, R_ANSWERED, R_CHECKPOINT, R_FINISH, R_BUMP, R_TURN,
 R_FINISHED) = range(8)
_MESSAGE_INSERT = (
    "id", "conversation_id", "owner", "seq", "role", "content", "reasoning", "state",
    "model_requested", "stream_id", "instance_id", "usage_estimated", "created_at",
    "updated_at", "parent_id",
)
# Every field of AssistantResult is a column of messages (finish_assistant stores them all).
_RESULT_FIELDS = tuple(f.name for f in fields(AssistantResult))
_result_values = operator.attrgetter(*_RESULT_FIELDS)  # one C call for the tuple
# The JSON columns among them, as positions in that tuple.
_RESULT_JSON = tuple(_RESULT_FIELDS.index(name) for name in ("tool_calls", "attempts"))
# An answer that ends while its start is still held (SQLStore.hold_s): inserted finished.
_ANSWERED_INSERT = ("id", "conversation_id", "owner", "seq", "role", "model_requested",
                    "stream_id", "instance_id", "created_at", "updated_at", *_RESULT_FIELDS,
                    "parent_id")


def _statements(dialect: str) -> list[str]:
    def values(n: int) -> str:
        return ", ".join("?" * n)

    sql = [
        "INSERT INTO conversations (id, owner, title, last_seq, created_at, updated_at, "
        f"active_id) VALUES ({values(7)})",
        f"INSERT INTO messages ({', '.join(_MESSAGE_INSERT)}) "
        f"VALUES ({values(len(_MESSAGE_INSERT))})",
        f"INSERT INTO messages ({', '.join(_ANSWERED_INSERT)}) "
        f"VALUES ({values(len(_ANSWERED_INSERT))})",
        "UPDATE messages SET content = ?, reasoning = ?, updated_at = ? "
        "WHERE id = ? AND state = 'streaming'",
        "UPDATE messages SET "
        + ", ".join(f"{name} = ?" for name in (*_RESULT_FIELDS, "updated_at"))
        + " WHERE id = ?",
        "UPDATE conversations SET updated_at = ? "
        "WHERE id = (SELECT conversation_id FROM messages WHERE id = ?)",
    ]
    if dialect == "postgresql":
        # R_TURN: a held answer with one question, its three rows in one statement (each
        # statement is a round trip; PostgreSQL checks the foreign key at its end).
        conversation, question, answer = sql[R_CONVERSATION], sql[R_MESSAGE], sql[R_ANSWERED]
        sql.append(f"WITH c AS ({conversation}), q AS ({question}) {answer}")
        # R_FINISHED: R_FINISH and R_BUMP of one answer in one statement (the end of an
        # answer that outlived its hold: one round trip, written alone; store/writer.py).
        finish = sql[R_FINISH]
        sql.append(f"WITH f AS ({finish} RETURNING conversation_id) UPDATE conversations "
                   "SET updated_at = ? WHERE id IN (SELECT conversation_id FROM f)")
        return [_dollars(statement) for statement in sql]  # asyncpg numbers its parameters
    sql += ["", ""]  # R_TURN, R_FINISHED: PostgreSQL only (SQLite has no UPDATE in WITH)
    return sql


# Where a request's messages leave a conversation (SQLStore.find_continuation).
_CONTINUATION = (
    "SELECT c.active_id, m.id, m.parent_id, m.seq, m.role, m.content FROM conversations c "
    "LEFT OUTER JOIN messages m ON m.conversation_id = c.id WHERE c.id = ? AND c.owner = ?"
)


def _dollars(statement: str) -> str:
    parts = statement.split("?")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


def _json(value: Any) -> Any:
    """A driver-level JSON column value (both drivers take text); None stays NULL.
    (orjson: a tenth of ``json.dumps``'s time for an answer's attempts; compact, which the
    JSON type reads back alike.)"""
    return orjson.dumps(value).decode() if isinstance(value, list | dict) else value


class _Held:
    """A new conversation's first turn, not yet queued (see :meth:`SQLStore.begin_answer`)."""

    __slots__ = ("conversation", "rows")

    def __init__(self, conversation: tuple[Any, ...], rows: list[tuple[Any, ...]]) -> None:
        self.conversation = conversation  # its row
        self.rows = rows  # its messages' rows, in order, the streaming answer last

    def parts(self) -> list[tuple[int, tuple[Any, ...]]]:
        return [(R_CONVERSATION, self.conversation), *((R_MESSAGE, r) for r in self.rows)]

    def release(self, writer: Writer) -> None:
        writer.defer(self.parts())


class _HeldAppend:
    """A turn of an existing conversation, not yet queued: its writer function (it reads
    the conversation's positions), queued with the answer's end if that comes first."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[AsyncConnection], Awaitable[None]]) -> None:
        self.fn = fn

    def release(self, writer: Writer) -> None:
        writer.defer(fn=self.fn)


KEEP_IDLE_S = 30.0  # the writer's kept connection, unused longer than this, is replaced


def _raise_unavailable(exc: Exception) -> None:
    """Raise :class:`ServiceUnavailable` from ``exc`` if it means the database is gone."""
    if isinstance(exc, TokenRelayError):
        return
    if isinstance(exc, DBAPIError):
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            raise ServiceUnavailable("database unavailable") from exc
        return
    if isinstance(exc, OSError | TimeoutError):
        raise ServiceUnavailable("database unavailable") from exc


def _asyncpg_unavailable(exc: Exception) -> bool:
    """An error of asyncpg itself (not through SQLAlchemy) that means the database is gone
    (as :func:`_raise_unavailable` reads SQLAlchemy's)."""
    import asyncpg  # type: ignore[import-untyped]  # ships no type information

    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError
                      | asyncpg.PostgresConnectionError
                      | asyncpg.exceptions.OperatorInterventionError)


async def _on_driver(conn: AsyncConnection, method: str, statement: str,
                     params: tuple[Any, ...]) -> Any:
    """``statement`` run by the asyncpg connection under ``conn`` (its own implicit
    transaction); on an error ``conn`` is invalidated and a lost database raised as
    :class:`ServiceUnavailable`."""
    driver: Any = None
    try:
        driver = (await conn.get_raw_connection()).driver_connection
        return await getattr(driver, method)(statement, *params)
    except BaseException as exc:  # cancelled too: a query cut short leaves no state
        closed = driver is None or driver.is_closed()  # lost, whatever the error says
        with contextlib.suppress(Exception):
            await conn.invalidate()
            await conn.close()  # back to the pool, which will connect anew
        if isinstance(exc, Exception) and (closed or _asyncpg_unavailable(exc)):
            raise ServiceUnavailable("database unavailable") from exc
        raise


class _Row:
    """Attribute access to a row read as a dict (for :func:`_message_dict`)."""

    __slots__ = ("_data",)

    def __init__(self, data: Any) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data[name]


def _rowcount(statement: Any) -> Callable[[AsyncConnection], Awaitable[int]]:
    """A writer function: execute ``statement``, return how many rows it changed."""

    async def run(conn: AsyncConnection) -> int:
        return int((await conn.execute(statement)).rowcount or 0)

    return run


class SQLStore(Store):
    """The :class:`~tokenrelay.store.base.Store` on SQLite or PostgreSQL (see module doc).

    ``instance_id`` is recorded on the assistant messages this process streams (random by
    default); ``orphan_after_s`` is how stale a ``streaming`` message of any instance must be
    for :meth:`start` to mark it interrupted; ``stats_window`` bounds the rows per model read
    by :meth:`model_stats` for percentiles.
    """

    def __init__(
        self,
        url: str,
        *,
        instance_id: str | None = None,
        orphan_after_s: float = 30.0,
        connect_timeout_s: float = 3.0,
        command_timeout_s: float = 30.0,
        pool_size: int = 10,
        stats_window: int = 10_000,
        hold_s: float = 0.25,
    ) -> None:
        self.url = async_url(url)
        self.instance_id = instance_id or secrets.token_hex(8)
        self.orphan_after_s = orphan_after_s
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.pool_size = pool_size
        self.stats_window = stats_window
        self.hold_s = hold_s
        self._held: dict[str, _Held | _HeldAppend] = {}  # by assistant message id
        self._release: asyncio.TimerHandle | None = None
        self._engine: AsyncEngine | None = None
        self._lock: asyncio.Lock | None = None
        self._writer: Writer | None = None
        self._kept: AsyncConnection | None = None  # the writer's (see _begin_kept)
        self._kept_at = 0.0
        self._reader: AsyncConnection | None = None  # see _read_alone
        self._reader_at = 0.0
        self._reading = False
        self._rows: SQLiteRows | None = None
        self._now: Callable[[], Any] = utcnow  # the driver's value of a UTCDateTime for now
        self._turn_statement = False  # R_TURN and R_FINISHED exist (PostgreSQL)

    def __repr__(self) -> str:
        return f"SQLStore({self.url.render_as_string(hide_password=True)!r})"

    # -- lifetime ---------------------------------------------------------------------

    def _create_engine(self) -> AsyncEngine:
        if self.url.get_backend_name() == "sqlite":
            kwargs: dict[str, Any] = {"connect_args": {"timeout": self.command_timeout_s}}
            if _is_memory(self.url):
                # One shared connection (StaticPool): transactions must not interleave.
                self._lock = asyncio.Lock()
            engine = create_async_engine(self.url, pool_pre_ping=True, **kwargs)
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
            return engine
        return create_async_engine(
            self.url,
            pool_pre_ping=True,
            pool_size=self.pool_size,
            max_overflow=self.pool_size,
            pool_timeout=self.command_timeout_s,
            pool_recycle=1800,
            connect_args={
                "timeout": self.connect_timeout_s,
                "command_timeout": self.command_timeout_s,
                # A commit does not wait for the WAL flush (PostgreSQL's own equivalent of
                # SQLite's synchronous=NORMAL): a crash of the database server may lose
                # the last fraction of a second of history, never consistency (README).
                "server_settings": {"application_name": "tokenrelay",
                                    "synchronous_commit": "off"},
            },
        )

    def _sqlite_file(self) -> str | None:
        """The path of a plain SQLite file database (not memory, not a ``file:`` URI)."""
        if self.url.get_backend_name() != "sqlite" or _is_memory(self.url):
            return None
        database = self.url.database or ""
        return None if database.startswith("file:") else database

    def _check_sqlite_directory(self) -> None:
        """A SQLite file in a missing directory is a configuration mistake, said plainly.

        (It also avoids an aiosqlite race: a failed connect leaves its worker thread calling
        back into the event loop, which raises in that thread if the loop has closed.)
        """
        if self.url.get_backend_name() != "sqlite" or _is_memory(self.url):
            return
        database = self.url.database or ""
        if database.startswith("file:"):  # URI form: let SQLite interpret it
            return
        if not Path(database).parent.is_dir():
            raise ConfigError(
                f"database_url: the directory of the SQLite file {database!r} does not exist"
            )

    async def start(self) -> None:
        """Connect, apply migrations, then interrupt this instance's and stale streams."""
        if self._engine is not None:
            return
        self._check_sqlite_directory()
        self._engine = self._create_engine()
        try:
            async with self._begin() as conn:
                await conn.run_sync(_upgrade)
            async with self._begin() as conn:
                await conn.execute(
                    self._interrupt_stmt().where(messages.c.instance_id == self.instance_id)
                )
            dialect = self._engine.dialect
            if dialect.name == "sqlite":
                self._now = _sqlite_now
            else:
                process = UTCDateTime().bind_processor(dialect) or (lambda value: value)
                self._now = lambda: process(utcnow())
            statements = _statements(dialect.name)
            self._turn_statement = bool(statements[R_TURN])
            if dialect.name == "sqlite" and self._sqlite_file() is not None:
                self._rows = SQLiteRows(self._sqlite_file() or "", statements,
                                        self.command_timeout_s)
            self._writer = Writer(
                self._begin_kept, statements, rows=self._rows.write if self._rows else None,
                alone=self._alone if dialect.name == "postgresql" else None)
            self._writer.start()
            await self.interrupt_orphans(self.orphan_after_s)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Write what is queued, dispose of the pool; the store may be started again."""
        self._release_held()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.aclose()
        rows, self._rows = self._rows, None
        if rows is not None:
            await rows.aclose()
        for kept in (self._kept, self._reader):
            if kept is not None:
                with contextlib.suppress(Exception):
                    await kept.close()
        self._kept = self._reader = None
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    @property
    def writer(self) -> Writer:
        """The writer, with every held turn queued first (any use of it may depend on one)."""
        if self._writer is None:
            raise RuntimeError("the store is not started (call start() first)")
        if self._held:
            self._release_held()
        return self._writer

    def _writer_now(self) -> Writer:
        """The writer without releasing the held turns (their order does not matter here)."""
        if self._writer is None:
            raise RuntimeError("the store is not started (call start() first)")
        return self._writer

    def _release_held(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        held, self._held = self._held, {}
        writer = self._writer
        if writer is not None:
            for turn in held.values():
                turn.release(writer)

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; database outages become :class:`ServiceUnavailable`."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("the store is not started (call start() first)")
        async with self._lock or nullcontext():
            conn = await self._connect(engine)
            try:
                try:
                    async with conn.begin():
                        yield conn
                finally:
                    await conn.close()
            except Exception as exc:
                _raise_unavailable(exc)
                raise

    @staticmethod
    async def _connect(engine: AsyncEngine) -> AsyncConnection:
        try:
            return await engine.connect()
        except (DBAPIError, PoolTimeout, OSError, TimeoutError) as exc:
            # Whatever stops us from getting a connection (refused, timeout, auth,
            # "too many clients", "starting up", pool exhausted) means unavailable.
            raise ServiceUnavailable("database unavailable") from exc

    @asynccontextmanager
    async def _begin_kept(self) -> AsyncIterator[AsyncConnection]:
        """The writer's transaction, on a connection it keeps between batches: no pool
        checkout, ping and reset round trips per batch. Dropped after any failure or
        ``KEEP_IDLE_S`` unused (a server may have closed it); the next batch reconnects."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("the store is not started (call start() first)")
        if self._lock is not None:  # one shared in-memory connection: no keeping
            async with self._begin() as shared:
                yield shared
            return
        conn = await self._take_kept(engine)
        try:
            async with conn.begin():
                yield conn
        except Exception as exc:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            _raise_unavailable(exc)
            raise
        self._kept, self._kept_at = conn, time.monotonic()

    async def _take_kept(self, engine: AsyncEngine) -> AsyncConnection:
        """The writer's kept connection (a new one if none, or unused too long)."""
        conn, self._kept = self._kept, None
        return await self._usable(engine, conn, self._kept_at)

    async def _usable(self, engine: AsyncEngine, conn: AsyncConnection | None,
                      used_at: float) -> AsyncConnection:
        """``conn`` if it was used within ``KEEP_IDLE_S`` (a server may close an idle
        one), else a new connection (the old one closed)."""
        if conn is not None and time.monotonic() - used_at > KEEP_IDLE_S:
            with contextlib.suppress(Exception):
                await conn.close()
            conn = None
        return conn if conn is not None else await self._connect(engine)

    async def _alone(self, statement: str, row: tuple[Any, ...]) -> None:
        """The writer's batch of one row of one statement, on PostgreSQL: the statement
        alone, straight to asyncpg on the kept connection, is its own implicit
        transaction, committed when its one round trip returns (``BEGIN``, statement,
        ``COMMIT`` are three; issue 17). Errors as :meth:`_begin_kept` gives them."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("the store is not started (call start() first)")
        conn = await self._take_kept(engine)
        await _on_driver(conn, "execute", statement, row)
        self._kept, self._kept_at = conn, time.monotonic()

    async def _read_alone(self, statement: str, params: tuple[Any, ...]) -> list[Any] | None:
        """One ``SELECT`` on PostgreSQL in one round trip, straight to asyncpg on a
        connection kept for it (a pooled one costs a ping, ``BEGIN``, ``COMMIT``: ~1 ms);
        None when that connection is busy with another read (then use the pool)."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("the store is not started (call start() first)")
        if self._reading:
            return None
        self._reading = True
        try:
            conn, self._reader = self._reader, None
            conn = await self._usable(engine, conn, self._reader_at)
            rows: list[Any] = await _on_driver(conn, "fetch", statement, params)
            self._reader, self._reader_at = conn, time.monotonic()
            return rows
        finally:
            self._reading = False

    # -- streaming leftovers ------------------------------------------------------------

    @staticmethod
    def _interrupt_stmt() -> Any:
        return (
            update(messages)
            .where(messages.c.state == "streaming")
            .values(
                state="interrupted",
                updated_at=utcnow(),
                error_code=func.coalesce(messages.c.error_code, INTERRUPTED_CODE),
                error_message=func.coalesce(messages.c.error_message, INTERRUPTED_MESSAGE),
            )
        )

    async def interrupt_orphans(self, older_than_s: float) -> int:
        """Mark ``streaming`` messages not checkpointed for ``older_than_s`` as interrupted.

        Safe with several instances on one database as long as live generations checkpoint
        more often than ``older_than_s``. Returns how many messages were marked. The
        lead may also call it periodically to clean up after instances that died while
        this one keeps running.
        """
        statement = self._interrupt_stmt().where(
            messages.c.updated_at < utcnow() - timedelta(seconds=older_than_s)
        )
        return int(await self.writer.submit(fn=_rowcount(statement)) or 0)

    async def mark_interrupted(
        self, message_id: str, content: str | None = None, reasoning: str | None = None
    ) -> bool:
        """Mark one message ``interrupted`` if it is still ``streaming`` (text kept, or
        replaced by ``content`` and ``reasoning``: see :meth:`Store.mark_interrupted`)."""
        statement = self._interrupt_stmt().where(messages.c.id == message_id)

        async def run(conn: AsyncConnection) -> int:
            changed = int((await conn.execute(statement)).rowcount or 0)
            if content is not None:
                await conn.execute(
                    update(messages)
                    .where(messages.c.id == message_id, messages.c.state == "interrupted")
                    .values(content=content, reasoning=reasoning or "")
                )
            return changed

        return bool(await self.writer.submit(fn=run))

    # -- writes (all through the one writer task, store/writer.py) ------------------------

    def _message_row(
        self, owner: str, conversation_id: str, message_id: str, seq: int, ts: Any, *,
        role: str, content: str = "", state: str = "complete", model_requested: str | None = None,
        stream_id: str | None = None, parent: str | None = None,
    ) -> tuple[Any, ...]:
        instance = self.instance_id if role == "assistant" else None
        return (message_id, conversation_id, owner, seq, role, content, "", state,
                model_requested, stream_id, instance, False, ts, ts, parent)

    def _assistant_row(
        self, owner: str, conversation_id: str, message_id: str, seq: int, ts: Any,
        stream_id: str, model_requested: str, parent: str | None = None,
    ) -> tuple[Any, ...]:
        return self._message_row(owner, conversation_id, message_id, seq, ts, role="assistant",
                                 state="streaming", model_requested=model_requested,
                                 stream_id=stream_id, parent=parent)

    def _append(self, owner: str, conversation_id: str, rows: list[tuple[Any, ...]],
                parent: Any = _ACTIVE) -> Callable[[AsyncConnection], Awaitable[None]]:
        """A writer function: take the next ``len(rows)`` positions of the conversation
        (owner-checked: 404 otherwise) and insert ``rows`` there (their ``seq`` is set),
        each following the one before, the first following ``parent`` (by default the
        conversation's active message); the last becomes the active message."""
        writer = self.writer
        owned = (conversations.c.id == conversation_id, conversations.c.owner == owner)

        async def append(conn: AsyncConnection) -> None:
            now = utcnow()
            after = parent
            if after is _ACTIVE:
                after = await conn.scalar(select(conversations.c.active_id).where(*owned))
            last = await conn.scalar(
                update(conversations)
                .where(*owned)
                .values(last_seq=conversations.c.last_seq + len(rows), updated_at=now,
                        active_id=rows[-1][0])
                .returning(conversations.c.last_seq)
            )
            if last is None:
                raise _not_found()
            first = int(last) - len(rows) + 1
            placed = []
            for i, row in enumerate(rows):
                placed.append((*row[:3], first + i, *row[4:-1], after))
                after = row[0]
            await conn.exec_driver_sql(writer.statements[R_MESSAGE], placed)

        return append

    async def ensure_conversation(self, owner: str, conversation_id: str | None, title: str) -> str:
        """Create a conversation when ``conversation_id`` is None (title stripped, ≤ 200
        chars, ``"New conversation"`` if blank); otherwise check it is the owner's."""
        if conversation_id is None:
            conversation_id = new_id()
            ts = self._now()
            row = (conversation_id, owner, _clean_title(title), 0, ts, ts, None)
            await self.writer.submit([(R_CONVERSATION, row)])
            return conversation_id
        await self.writer.flush()
        async with self._begin() as conn:
            found = await conn.scalar(
                select(conversations.c.id).where(
                    conversations.c.id == conversation_id, conversations.c.owner == owner
                )
            )
        if found is None:
            raise _not_found()
        return conversation_id

    async def add_user_message(self, owner: str, conversation_id: str, content: str) -> str:
        message_id = new_id()
        row = self._message_row(owner, conversation_id, message_id, 0, self._now(),
                                role="user", content=content)
        await self.writer.submit(fn=self._append(owner, conversation_id, [row]))
        return message_id

    async def begin_assistant(
        self,
        owner: str,
        conversation_id: str,
        message_id: str,
        stream_id: str,
        model_requested: str,
    ) -> None:
        row = self._assistant_row(owner, conversation_id, message_id, 0, self._now(),
                                  stream_id, model_requested)
        await self.writer.submit(fn=self._append(owner, conversation_id, [row]))

    async def begin_answer(
        self, owner: str, turn: Turn, message_id: str, stream_id: str, model_requested: str
    ) -> None:
        """Queue the turn and the ``streaming`` assistant message as one write, without
        waiting for it (retried through a short outage). A new conversation needs no read
        in the transaction: its rows are plain inserts, batched with other answers'.

        While the database is known down, the write is awaited instead, so the request
        gets a 503 before anything streams (or succeeds, and the store is up again).
        """
        cid = turn.conversation_id
        ts = self._now()
        if turn.new:
            # Positions from 1; the active branch ends at the answer; each message follows
            # the one before.
            placed = []
            parent = None
            for seq, text in enumerate(turn.user_messages, 1):
                row = self._message_row(owner, cid, new_id(), seq, ts, role="user",
                                        content=text, parent=parent)
                placed.append(row)
                parent = row[0]
            placed.append(self._assistant_row(owner, cid, message_id, len(placed) + 1, ts,
                                              stream_id, model_requested, parent))
            conversation = (cid, owner, _clean_title(turn.title), len(placed), ts, ts,
                            message_id)
            held = _Held(conversation, placed)
            # Not ``self.writer``, which would queue every other held turn: a new
            # conversation depends on none of them, and they are held to be inserted once.
            writer = self._writer_now()
            if writer.down:
                await writer.submit(held.parts())
                return
            if self.hold_s <= 0:
                writer.defer(held.parts())
                return
            # Held a moment, not queued: a short answer that ends meanwhile is inserted
            # finished (one row, no UPDATEs); anything else queues it first.
            self._hold(message_id, held)
            return
        rows = [self._message_row(owner, cid, new_id(), 0, ts, role="user", content=text)
                for text in turn.user_messages]
        rows.append(self._assistant_row(owner, cid, message_id, 0, ts, stream_id,
                                        model_requested))
        writer = self.writer
        after = _ACTIVE if turn.parent_id == FOLLOW_ACTIVE else turn.parent_id
        append = self._append(owner, cid, rows, after)
        if writer.down:
            await writer.submit(fn=append)
        elif self.hold_s <= 0:
            writer.defer(fn=append)
        else:
            # Held too: its transaction (SQLAlchemy, ~0.4 ms of this core) would otherwise
            # run while the upstream is asked, delaying the first token; a short answer's
            # end then comes in the same transaction.
            self._hold(message_id, _HeldAppend(append))

    def _hold(self, message_id: str, held: _Held | _HeldAppend) -> None:
        self._held[message_id] = held
        if self._release is None:
            loop = asyncio.get_running_loop()
            self._release = loop.call_later(self.hold_s, self._release_held)

    async def checkpoint(self, message_id: str, content: str, reasoning: str) -> None:
        """One UPDATE (batched); ignored once the message left ``streaming`` (or was
        deleted)."""
        row = (content, reasoning, self._now(), message_id)
        await self.writer.submit([(R_CHECKPOINT, row)])

    async def finish_assistant(self, message_id: str, result: AssistantResult) -> None:
        """Record the final state, whatever the current one (it may have been marked
        interrupted by another instance's orphan sweep), and bump the conversation.

        Retried through a short database outage (the writer's ``retry_s``)."""
        ts = self._now()
        values = _result_values(result)
        if any(values[i] is not None for i in _RESULT_JSON):
            listed = list(values)
            for i in _RESULT_JSON:
                listed[i] = _json(listed[i])
            values = tuple(listed)
        held = self._held.pop(message_id, None)
        if isinstance(held, _HeldAppend):  # queued first, then the end: one transaction
            held.release(self._writer_now())
        elif held is not None:
            *asked, answer = held.rows
            c = held.conversation
            conversation = (*c[:5], ts, c[6])
            # answer: id, conversation, owner, seq, role, ..., model_requested, stream_id,
            # instance_id, usage_estimated, created_at, updated_at, parent_id (see
            # _MESSAGE_INSERT)
            answered = (*answer[:5], *answer[8:11], answer[12], ts, *values, answer[14])
            if self._turn_statement and len(asked) == 1:
                parts = [(R_TURN, (*conversation, *asked[0], *answered))]
            else:
                parts = [(R_CONVERSATION, conversation), *((R_MESSAGE, row) for row in asked),
                         (R_ANSWERED, answered)]
            await self._writer_now().submit(parts, retry=True)
            return
        # Its own rows are queued already (not held, or released just now), and it needs
        # no other turn: the other held ones stay held (``self.writer`` would queue them all, and
        # each of those would then end with these two UPDATEs instead of one insert).
        if self._turn_statement:  # and R_FINISHED
            parts = [(R_FINISHED, (*values, ts, message_id, ts))]
        else:
            parts = [(R_FINISH, (*values, ts, message_id)), (R_BUMP, (ts, message_id))]
        await self._writer_now().submit(parts, retry=True)

    async def set_active(self, owner: str, conversation_id: str, message_id: str) -> bool | None:
        """Show the branch through ``message_id`` (down to its newest leaf).

        None when the conversation is not the owner's, False when the message is not
        one of its messages."""

        async def switch(conn: AsyncConnection) -> bool | None:
            owned = (conversations.c.id == conversation_id, conversations.c.owner == owner)
            if await conn.scalar(select(conversations.c.id).where(*owned)) is None:
                return None
            tree = await _tree(conn, conversation_id)
            if message_id not in tree.by_id:
                return False
            await conn.execute(
                update(conversations).where(*owned).values(active_id=tree.leaf_from(message_id))
            )
            return True

        result: bool | None = await self.writer.submit(fn=switch)
        return result

    async def find_continuation(
        self, owner: str, conversation_id: str, said: Sequence[tuple[str, str]]
    ) -> tuple[str | None, int]:
        """Where a request's messages leave the stored conversation (one read; see
        :meth:`Tree.continuation`). Raises a 404 ``BadRequest`` when it is not the owner's."""
        await self.writer.flush()
        # One statement: the conversation (owner-checked) joined to its messages' tree
        # columns; a conversation without messages is one row of NULLs. On a SQLite file,
        # in one hop to the writer's thread (this read delays a follow-up's first byte).
        params = (conversation_id, owner)
        rows: Sequence[Any] | None = None
        if self._rows is not None:
            rows = await self._rows.read(_CONTINUATION, params)
        elif self._turn_statement:  # PostgreSQL
            rows = await self._read_alone(_dollars(_CONTINUATION), params)
        if rows is None:
            async with self._begin() as conn:
                rows = (await conn.exec_driver_sql(
                    _dollars(_CONTINUATION) if self._turn_statement else _CONTINUATION,
                    params)).all()
        if not rows:
            raise _not_found()
        nodes = [  # rows of (active_id, id, parent_id, seq, role, content)
            {"id": id_, "parent_id": parent, "seq": seq, "role": role, "content": content}
            for _, id_, parent, seq, role, content in map(tuple, rows) if id_ is not None
        ]
        return Tree(nodes).continuation(rows[0][0], said)

    async def rename_conversation(self, owner: str, conversation_id: str, title: str) -> bool:
        """Set the title (stripped, ≤ 200 chars); does not change ``updated_at``."""
        statement = (
            update(conversations)
            .where(conversations.c.id == conversation_id, conversations.c.owner == owner)
            .values(title=_clean_title(title))
        )
        return bool(await self.writer.submit(fn=_rowcount(statement)))

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        """Delete it and its messages (FK ``ON DELETE CASCADE``)."""
        statement = delete(conversations).where(
            conversations.c.id == conversation_id, conversations.c.owner == owner
        )
        return bool(await self.writer.submit(fn=_rowcount(statement)))

    # -- reads ------------------------------------------------------------------------

    async def list_conversations(
        self, owner: str, limit: int = 50, offset: int = 0, query: str = ""
    ) -> list[dict[str, Any]]:
        await self.writer.flush()
        found = select(conversations).where(conversations.c.owner == owner)
        if query:
            # Case-insensitive substring of the title or of any message's text; the
            # query's own % and _ are literal (ILIKE on PostgreSQL, lower() LIKE on SQLite).
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_"
            ) + "%"
            in_text = exists().where(
                messages.c.conversation_id == conversations.c.id,
                messages.c.content.ilike(pattern, escape="\\"),
            )
            found = found.where(or_(conversations.c.title.ilike(pattern, escape="\\"), in_text))
        async with self._begin() as conn:
            rows = await conn.execute(
                found.order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
                .limit(max(0, limit))
                .offset(max(0, offset))
            )
            return [_summary(row) for row in rows]

    async def get_conversation(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        await self.writer.flush()
        async with self._begin() as conn:
            row = (
                await conn.execute(
                    select(conversations).where(
                        conversations.c.id == conversation_id, conversations.c.owner == owner
                    )
                )
            ).first()
            if row is None:
                return None
            found = await conn.execute(
                select(*_MESSAGE_COLUMNS).where(messages.c.conversation_id == conversation_id)
            )
            tree = Tree(m._asdict() for m in found)
        # The branch shown, each message with its turn's versions (store/tree.py).
        shown = [
            {**_message_dict(_Row(node)), **tree.versions(node)}
            for node in tree.branch(row.active_id)
        ]
        return {**_summary(row), "messages": shown}

    async def get_message(self, owner: str, message_id: str) -> dict[str, Any] | None:
        """One message (as in :meth:`get_conversation`, plus ``conversation_id``), or None.

        Addition to the base interface: lets a resume whose journal has expired fall back to
        the stored answer.
        """
        await self.writer.flush()
        async with self._begin() as conn:
            row = (
                await conn.execute(
                    select(*_MESSAGE_COLUMNS).where(
                        messages.c.id == message_id, messages.c.owner == owner
                    )
                )
            ).first()
        if row is None:
            return None
        return {**_message_dict(row), "conversation_id": row.conversation_id}

    async def model_stats(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Per ``model_used`` over finished assistant messages (of ``owner`` only, unless
        None), most used first.

        Keys: ``model``, ``count``, ``error_rate`` (error or interrupted), ``cancel_rate``
        (exact, aggregated in SQL), and ``ttft_ms_p50``, ``ttft_ms_p95``,
        ``tokens_per_s_p50`` (computed in Python over the newest ``stats_window`` messages
        of each model, so the rows read stay bounded; None when no values), and
        ``completion_tokens``: what was generated, cancelled and cut answers included.
        """
        done = (
            messages.c.role == "assistant",
            messages.c.state != "streaming",
            messages.c.model_used.is_not(None),
            *(() if owner is None else (messages.c.owner == owner,)),
        )
        failed = case((messages.c.state.in_(("error", "interrupted")), 1), else_=0)
        cancelled = case((messages.c.state == "cancelled", 1), else_=0)
        await self.writer.flush()
        async with self._begin() as conn:
            totals = (
                await conn.execute(
                    select(
                        messages.c.model_used,
                        func.count(),
                        func.sum(failed),
                        func.sum(cancelled),
                        func.sum(func.coalesce(messages.c.completion_tokens, 0)),
                    )
                    .where(*done)
                    .group_by(messages.c.model_used)
                )
            ).all()
            stats = []
            for model, count, errors, cancels, generated in totals:
                sample = (
                    await conn.execute(
                        select(messages.c.ttft_ms, messages.c.tokens_per_s)
                        .where(*done, messages.c.model_used == model)
                        .order_by(messages.c.created_at.desc())
                        .limit(self.stats_window)
                    )
                ).all()
                ttft = sorted(r.ttft_ms for r in sample if r.ttft_ms is not None)
                speed = sorted(r.tokens_per_s for r in sample if r.tokens_per_s is not None)
                stats.append(
                    {
                        "model": model,
                        "count": int(count),
                        "ttft_ms_p50": _round(_percentile(ttft, 0.50), 1),
                        "ttft_ms_p95": _round(_percentile(ttft, 0.95), 1),
                        "tokens_per_s_p50": _round(_percentile(speed, 0.50), 2),
                        "error_rate": round(int(errors or 0) / count, 4),
                        "cancel_rate": round(int(cancels or 0) / count, 4),
                        "completion_tokens": int(generated or 0),
                    }
                )
        stats.sort(key=lambda s: (-s["count"], s["model"]))
        return stats
