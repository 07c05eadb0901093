"""The memory journal gives a long answer's memory back on time (issue 17)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tokenrelay import memtrim
from tokenrelay.config import JournalLimits
from tokenrelay.journal.memory import MemoryJournal


async def test_a_finished_stream_leaves_when_its_retention_ends_and_a_big_one_asks_for_a_trim(
) -> None:
    journal = MemoryJournal(JournalLimits(retention_s=0.05, max_bytes=4 * memtrim.BIG))
    asked = asyncio.Event()
    journal.trimmer.soon = asked.set  # type: ignore[method-assign]
    await journal.create("small", {})
    await journal.finish("small", b"end", "complete")
    await journal.create("big", {})
    await journal.append("big", [b"x" * memtrim.BIG])
    await journal.finish("big", b"end", "complete")
    assert len(journal) == 2
    # Nobody reads or creates a stream: the retention timers alone drop them (the small
    # one finished first, so it is gone by the time the big one asks for a trim).
    await asyncio.wait_for(asked.wait(), timeout=10)
    assert len(journal) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="malloc_trim and M_MMAP_THRESHOLD are glibc's (CI is Linux)")
async def test_on_glibc_the_trim_runs_and_big_buffers_get_their_own_mapping() -> None:
    assert memtrim.fix_mmap_threshold()
    trimmer = memtrim.Trimmer()
    assert trimmer.available
    trimmed = asyncio.Event()
    done = trimmer._done

    def observed(future: object) -> None:
        done(future)
        trimmed.set()

    trimmer._done = observed  # type: ignore[method-assign]
    trimmer.soon()
    trimmer.soon()  # one pending trim at a time
    await asyncio.wait_for(trimmed.wait(), timeout=10)
    assert trimmer.trims == 1 and not trimmer._pending
