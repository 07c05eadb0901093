"""Alembic environment of tokenrelay's store.

Normal use is programmatic: :func:`tokenrelay.store.sql._upgrade` passes an open (sync
facade of an async) connection in ``config.attributes["connection"]``, inside a transaction.
From the ``alembic`` command line, the database URL comes from ``-x url=...`` (any URL that
``open_store`` accepts) and a short-lived async engine is used.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from tokenrelay.store.sql import async_url

    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_with)
    finally:
        await engine.dispose()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("pass the database with: alembic -x url=sqlite:///path.db ...")
    if context.is_offline_mode():
        from tokenrelay.store.sql import async_url

        context.configure(url=async_url(url), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(run_from_url(url))


main()
