"""The journal of each stream's SSE frames; the backend is chosen by URL.

``open_journal("memory://", limits)`` (the default, see ``config.py``) or
``open_journal("redis://host/0?prefix=...", limits)`` (needs the ``tokenrelay[redis]``
extra). The contract is :class:`~tokenrelay.journal.base.Journal`.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.config import JournalLimits
from tokenrelay.errors import ConfigError
from tokenrelay.journal.base import Journal


def open_journal(url: str, limits: JournalLimits, **options: Any) -> Journal:
    """Build the journal backend named by ``url``; optional drivers load only when chosen."""
    if url.startswith("memory:"):
        from tokenrelay.journal.memory import MemoryJournal

        return MemoryJournal(limits)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tokenrelay.journal.redis import RedisJournal

        return RedisJournal(url, limits, **options)
    raise ConfigError(f"journal_url {url!r}: expected memory:// or redis://")


__all__ = ["Journal", "open_journal"]
