"""The writer's batches of plain rows on a SQLite file, in one thread hop per batch.

Through SQLAlchemy and aiosqlite, every DB-API call of a batch (the pool's ping, begin,
each ``executemany``, its cursor, commit, the pool's reset) is a round trip to
aiosqlite's thread and back to the event loop: ~25 context switches per batch, on the
core that also serves the streams. Here a batch of rows (the hot path: new
conversations, answers, checkpoints, finishes) is one call into one thread, which owns
its own ``sqlite3`` connection: ``BEGIN``, one ``executemany`` per statement, ``COMMIT``.
The one read on the path to an answer's first byte (where a follow-up message leaves
its conversation) also takes this thread. Everything else (other reads, and writes that
need a result) stays on SQLAlchemy; the writer task runs one batch at a time, so the two
connections never write concurrently.

SQLite keeps the values last bound to each cached statement (Python's ``sqlite3`` resets a
statement but does not clear its bindings) and up to its page cache: after a batch with a
long text (``BIG``) the connection is closed, so a long answer's copies go with it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from tokenrelay.errors import ServiceUnavailable
from tokenrelay.memtrim import BIG

# ``sqlite3`` adapts every value that is not exactly an int, float, str or bytearray: for
# a None or a bool without a registered adapter it looks up ``__adapt__`` on its protocol
# type, which raises and formats an AttributeError (~5,000 instructions per value, ~20
# values per answer). A registered adapter is one dict hit and a C call, and binds the
# same value (NULL; a bool is stored as the integer 0 or 1 either way). Process-wide, so
# SQLAlchemy's aiosqlite connections gain too.
sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))  # -> None
sqlite3.register_adapter(bool, int)


class SQLiteRows:
    """``await rows.write({rank: [row, ...]})``: one transaction, in this object's thread."""

    def __init__(self, path: str, statements: list[str], timeout_s: float) -> None:
        self.path = path
        self.statements = statements
        self.timeout_s = timeout_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenrelay-sqlite")
        self._conn: sqlite3.Connection | None = None  # used only in that thread

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                               check_same_thread=False)
        for pragma in ("foreign_keys=ON", "journal_mode=WAL", "synchronous=NORMAL"):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    def _write(self, rows: dict[int, list[tuple[Any, ...]]]) -> None:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rank in sorted(rows):
                conn.executemany(self.statements[rank], rows[rank])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if _has_big_text(rows):
                self._close()

    async def write(self, rows: dict[int, list[tuple[Any, ...]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._write, rows)
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk, I/O
            raise ServiceUnavailable("database unavailable") from exc

    def _read(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        return conn.execute(statement, params).fetchall()

    async def read(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        """The rows of one ``SELECT`` (its own read transaction), in one thread hop: a read
        on the path to an answer's first byte (through aiosqlite: ~1 ms of hops)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._read, statement, params)
        except sqlite3.OperationalError as exc:
            raise ServiceUnavailable("database unavailable") from exc

    def _close(self) -> None:  # in this object's thread
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)


def _has_big_text(rows: dict[int, list[tuple[Any, ...]]]) -> bool:
    limit = BIG // 4  # up to 4 bytes a char
    for batch in rows.values():  # plain loops: twice as fast as any() over a generator
        for row in batch:
            for value in row:
                if value.__class__ is str and len(value) >= limit:
                    return True
    return False
