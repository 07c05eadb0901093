"""Fixtures of the store tests: a SQLite file and a private PostgreSQL database.

The PostgreSQL database (``tokenrelay_test_<random>`` on 127.0.0.1:5432, trust auth) is
created once per test session (per xdist worker) and dropped at the end; each test starts
from an empty ``public`` schema, so every test also exercises the migrations from scratch.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tokenrelay.store import open_store
from tokenrelay.store.sql import SQLStore

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "test"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a private loop (session fixtures live outside the test loops)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=5
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The name of a fresh database, dropped when the session ends."""
    name = f"tokenrelay_test_{secrets.token_hex(6)}"
    _run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def reset_schema(database: str) -> None:
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=database, timeout=5
    )
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def pg_url(database: str, port: int = PG_PORT) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{port}/{database}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_database: str) -> str:
    """An empty database of each dialect, as a user-facing URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    await reset_schema(pg_database)
    return pg_url(pg_database)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SQLStore]:
    """A started store on an empty, freshly migrated database."""
    started = open_store(db_url, instance_id="test-instance", orphan_after_s=3600)
    assert isinstance(started, SQLStore)
    await started.start()
    try:
        yield started
    finally:
        await started.aclose()


class TcpProxy:
    """A loopback TCP forwarder that can be cut and restored, to take a database "down"."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def pg_proxy(pg_database: str) -> AsyncIterator[TcpProxy]:
    await reset_schema(pg_database)
    proxy = TcpProxy(PG_PORT)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
