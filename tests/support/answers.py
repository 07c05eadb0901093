"""What a generation runs on, built as the app's lifespan builds it but with no HTTP in
front: settings whose upstream is a test server, the connection pool and upstream client,
a memory journal and a SQLite store. For tests of the hub and the generation, which
drive those objects directly and read the journal and the store back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tokenrelay.config import ModelRoute, Settings, load_settings
from tokenrelay.events import parse_frame
from tokenrelay.httpclient import Pool
from tokenrelay.journal.memory import MemoryJournal
from tokenrelay.store import open_store
from tokenrelay.upstream import UpstreamClient

OWNER = "key:alice"
BODY = {"messages": [{"role": "user", "content": "hi"}]}
WAIT = 10.0  # bound on any one wait for an event: a hang fails instead of blocking
TERMINAL = ("done", "error")


@dataclass(frozen=True)
class Frame:
    """One journal frame, parsed: ``name`` is None for a text delta."""

    seq: int
    name: str | None
    data: dict[str, Any]


@dataclass
class Parts:
    settings: Settings
    upstream: UpstreamClient
    journal: MemoryJournal
    store: Any  # the SQL store (get_message is not in the Store interface)

    def route(self, model: str = "fault-model") -> ModelRoute:
        found = self.settings.route(model)
        assert found is not None
        return found

    async def conversation(self, owner: str = OWNER) -> str:
        """A new conversation of ``owner`` with one user message, for an answer to join."""
        conversation_id: str = await self.store.ensure_conversation(owner, None, "test")
        await self.store.add_user_message(owner, conversation_id, "hi")
        return conversation_id

    async def message(self, message_id: str, owner: str = OWNER) -> dict[str, Any]:
        """The stored assistant message."""
        found: dict[str, Any] | None = await self.store.get_message(owner, message_id)
        assert found is not None
        return found

    async def frames(self, stream_id: str) -> list[Frame]:
        """Every frame the stream has now."""
        result = await self.journal.read(stream_id, 0, 0, limit=100_000)
        return [parse(raw) for raw in result.frames]

    async def wait_frames(self, stream_id: str, n: int) -> list[Frame]:
        """The stream's frames once it has at least ``n`` (each wait is the journal's own)."""
        frames: list[bytes] = []
        while len(frames) < n:
            result = await self.journal.read(stream_id, len(frames), WAIT)
            assert result.frames or result.finished, f"no frame within {WAIT} s"
            frames += result.frames
            if result.finished:
                break
        return [parse(raw) for raw in frames]


def parse(raw: bytes) -> Frame:
    seq, name, data = parse_frame(raw)
    return Frame(seq, name, orjson.loads(data))


def terminal(frames: list[Frame]) -> Frame:
    """The stream's one terminal frame, checked to be its only one and its last."""
    ends = [f for f in frames if f.name in TERMINAL]
    assert len(ends) == 1, [f.name for f in frames]
    assert frames[-1] is ends[0]
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))  # no gap, no repeat
    return ends[0]


def text(frames: list[Frame]) -> str:
    return "".join(f.data["content"] for f in frames if f.name is None)


@contextlib.asynccontextmanager
async def answer_parts(base_url: str, tmp_path: Path, **env: str) -> AsyncIterator[Parts]:
    """The parts for an upstream at ``base_url`` (any model name routes there);
    ``env`` holds ``TOKENRELAY_*`` settings (one attempt per request unless it says)."""
    settings = load_settings(environ={
        "TOKENRELAY_UPSTREAM_URL": base_url,
        "TOKENRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'answers.db'}",
        "TOKENRELAY_RETRY_MAX_ATTEMPTS": "1",
        **env,
    })
    async with contextlib.AsyncExitStack() as stack:
        pool = Pool(keepalive_s=5.0)
        stack.push_async_callback(pool.aclose)
        journal = MemoryJournal(settings.journal)
        stack.push_async_callback(journal.aclose)
        store = open_store(settings.database_url)
        await store.start()
        stack.push_async_callback(store.aclose)
        yield Parts(settings, UpstreamClient(settings, pool), journal, store)
