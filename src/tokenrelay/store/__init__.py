"""Persistence of conversations and messages; the backend is chosen by URL.

``open_store("sqlite:///tokenrelay.db")`` (the default, see ``config.py``),
``open_store("sqlite:///:memory:")`` or ``open_store("postgresql://user@host/db")``
(``postgres://`` works too; needs the ``tokenrelay[postgres]`` extra for asyncpg).
"""

from __future__ import annotations

from tokenrelay.store.base import AssistantResult, Store, Turn


def open_store(url: str, *, instance_id: str | None = None, orphan_after_s: float = 30.0) -> Store:
    """Build (not start) the store for ``url``; ``await store.start()`` connects and migrates.

    ``instance_id`` and ``orphan_after_s``: see :class:`tokenrelay.store.sql.SQLStore`.
    Raises :class:`~tokenrelay.errors.ConfigError` for an unsupported URL.
    """
    from tokenrelay.store.sql import SQLStore  # SQLAlchemy is imported only when used

    return SQLStore(url, instance_id=instance_id, orphan_after_s=orphan_after_s)


__all__ = ["AssistantResult", "Store", "Turn", "open_store"]
