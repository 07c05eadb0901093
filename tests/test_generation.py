"""The generation (generation.py): one answer from the upstream into the journal, ended by
exactly one terminal frame whatever ends it, with the text so far stored with that end.

Each cause of an end is driven for real: the fault upstream on a loopback port scripts
the upstream's side (a complete answer, a cut, an error chunk, silence), and the journal
and the SQLite store are the real ones. No sleeps: the tests await the journal's frames
and the generation's ``finished`` flag, each wait bounded.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from support.answers import BODY, OWNER, WAIT, Parts, answer_parts, terminal, text
from support.fault_upstream import (
    FaultUpstream,
    in_stream_error,
    ok,
    reset_after,
    slow,
    stall_after,
    stall_first,
    status,
)
from tokenrelay.generation import CANCEL_ABANDONED, CANCEL_SHUTDOWN, CANCEL_USER, Generation

TOKENS = ["Hel", "lo", ", ", "wor", "ld", "!"]



@pytest.fixture
def parts(fault_upstream: FaultUpstream, tmp_path: Path
          ) -> Callable[..., AbstractAsyncContextManager[Parts]]:
    """``async with parts(**env) as p``: the pieces, pointed at the fault upstream."""
    def make(**env: str) -> AbstractAsyncContextManager[Parts]:
        return answer_parts(fault_upstream.base_url, tmp_path, **env)
    return make


async def start(p: Parts) -> Generation:
    """Start an answer as the hub does: the stream and the stored message first, the
    ``start`` frame, then the task."""
    conversation_id = await p.conversation()
    stream_id, message_id = secrets.token_hex(8), "m-" + secrets.token_hex(8)
    route = p.route()
    gen = Generation(stream_id=stream_id, message_id=message_id,
                     conversation_id=conversation_id, owner=OWNER, route=route, body=BODY,
                     journal=p.journal, upstream=p.upstream, store=p.store,
                     checkpoint_s=p.settings.checkpoint_s)
    await p.journal.create(stream_id, {"owner": OWNER})
    await p.store.begin_assistant(OWNER, conversation_id, message_id, stream_id, route.name)
    await p.journal.append(stream_id, [gen.start_frame()])
    gen.start()
    return gen


async def ended(gen: Generation) -> None:
    await asyncio.wait_for(gen.finished.wait(), WAIT)
    assert gen.task is not None
    await asyncio.wait_for(gen.task, WAIT)  # the task ends too, without an exception


async def end_of(p: Parts, gen: Generation) -> tuple[Any, str, dict[str, Any]]:
    """The terminal frame (checked to be the only one), the text relayed, and the stored
    message, once the generation has ended."""
    await ended(gen)
    frames = await p.frames(gen.stream_id)
    assert frames[0].name == "start"
    return terminal(frames), text(frames), await p.message(gen.message_id)


async def test_a_complete_answer_ends_with_one_done_frame_and_is_stored_whole(
        fault_upstream: FaultUpstream, parts: Any) -> None:
    fault_upstream.script(ok(TOKENS))
    async with parts() as p:
        gen = await start(p)
        end, relayed, stored = await end_of(p, gen)
    assert end.name == "done" and end.data["state"] == "complete"
    assert end.data["finish_reason"] == "stop"
    assert end.data["usage"]["source"] == "provider"
    assert relayed == "".join(TOKENS)
    assert (stored["state"], stored["content"], stored["error"]) == ("complete", relayed, None)


@pytest.mark.parametrize(("reason", "state"), [
    (CANCEL_USER, "cancelled"),  # Stop
    (CANCEL_ABANDONED, "cancelled"),  # nobody came back within the grace period
])
async def test_a_cancelled_answer_ends_with_one_done_frame_and_keeps_its_partial_text(
        fault_upstream: FaultUpstream, parts: Any, reason: str, state: str) -> None:
    fault_upstream.script(stall_after(TOKENS, 3))
    async with parts() as p:
        gen = await start(p)
        await _wait_text(p, gen, "".join(TOKENS[:3]))
        assert gen.cancel(reason) is True
        end, relayed, stored = await end_of(p, gen)
        await asyncio.wait_for(fault_upstream.wait_client_closed(1), WAIT)  # the provider stops
        assert gen.cancel(CANCEL_USER) is False  # an ended answer cannot end again
        assert terminal(await p.frames(gen.stream_id)) == end
    assert end.name == "done" and end.data["state"] == state
    assert end.data["finish_reason"] == "cancelled"
    assert relayed == "".join(TOKENS[:3])
    assert (stored["state"], stored["content"]) == (state, relayed)


async def _wait_text(p: Parts, gen: Generation, expected: str) -> None:
    """Until the journal holds ``expected`` as the answer's text."""
    seen = 0
    while True:
        frames = await p.wait_frames(gen.stream_id, seen + 1)
        seen = len(frames)
        if text(frames) == expected:
            return
        assert expected.startswith(text(frames)), text(frames)


async def test_a_shutdown_ends_the_answer_as_interrupted_with_one_error_frame(
        fault_upstream: FaultUpstream, parts: Any) -> None:
    fault_upstream.script(stall_after(TOKENS, 2))
    async with parts() as p:
        gen = await start(p)
        await _wait_text(p, gen, "".join(TOKENS[:2]))
        assert gen.cancel(CANCEL_SHUTDOWN) is True
        assert gen.cancel(CANCEL_USER) is False  # the first reason stands
        end, relayed, stored = await end_of(p, gen)
    assert end.name == "error" and end.data["state"] == "interrupted"
    assert end.data["error"]["code"] == "interrupted" and end.data["error"]["retryable"]
    assert relayed == "".join(TOKENS[:2])
    assert (stored["state"], stored["content"]) == ("interrupted", relayed)
    assert stored["error"]["code"] == "interrupted"


async def test_a_cancel_before_the_relay_starts_asks_nothing_of_the_upstream(
        fault_upstream: FaultUpstream, parts: Any) -> None:
    async with parts() as p:
        gen = await start(p)
        assert gen.cancel(CANCEL_USER) is True  # the task has not run yet
        end, relayed, stored = await end_of(p, gen)
    assert end.name == "done" and end.data["state"] == "cancelled"
    assert relayed == "" and stored["state"] == "cancelled"
    assert fault_upstream.requests == []


@pytest.mark.parametrize(("step", "env", "code", "kept"), [
    # The upstream refuses before any token (one attempt: no retry).
    (status(500), {}, "upstream_error", 0),
    # The connection is cut mid-answer: no [DONE].
    (reset_after(TOKENS, 4), {}, "upstream_incomplete", 4),
    # The upstream reports an error inside the stream.
    (in_stream_error(TOKENS, 2, message="model crashed"), {}, "upstream_error", 2),
    # The upstream goes silent between two tokens: the idle timeout ends it.
    (stall_after(TOKENS, 3), {"TOKENRELAY_IDLE_TIMEOUT_S": "0.2"}, "upstream_timeout", 3),
    # The upstream never sends a first token.
    (stall_first(), {"TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "0.2"}, "upstream_timeout", 0),
], ids=["status-500", "cut", "error-chunk", "idle-timeout", "first-token-timeout"])
async def test_an_upstream_failure_ends_with_one_error_frame_and_keeps_the_text_so_far(
        fault_upstream: FaultUpstream, parts: Any, step: Any, env: dict[str, str], code: str,
        kept: int) -> None:
    fault_upstream.script(step)
    async with parts(**env) as p:
        gen = await start(p)
        end, relayed, stored = await end_of(p, gen)
    assert end.name == "error" and end.data["state"] == "error"
    assert end.data["error"]["code"] == code, end.data
    assert relayed == "".join(TOKENS[:kept])
    assert (stored["state"], stored["content"]) == ("error", relayed)
    assert stored["error"]["code"] == code
    assert len(fault_upstream.requests) == 1


async def _past_the_journal_bound(fault_upstream: FaultUpstream, parts: Any
                                  ) -> tuple[Any, str, dict[str, Any]]:
    tokens = [f"{i:03d}" * 30 for i in range(40)]  # 3.6 KB of text, one token per read
    fault_upstream.script(slow(tokens, 0.005))
    async with parts(TOKENRELAY_JOURNAL_MAX_BYTES="1000") as p:
        gen = await start(p)
        end, relayed, stored = await end_of(p, gen)
    assert relayed and "".join(tokens).startswith(relayed) and len(relayed) < 1000
    return end, relayed, stored


async def test_a_stream_past_the_journal_bound_ends_with_one_error_frame(
        fault_upstream: FaultUpstream, parts: Any) -> None:
    end, relayed, stored = await _past_the_journal_bound(fault_upstream, parts)
    assert end.name == "error" and end.data["state"] == "error"
    assert end.data["error"]["code"] == "journal_full"
    assert stored["state"] == "error" and stored["content"].startswith(relayed)


async def test_past_the_journal_bound_the_stored_text_is_the_text_relayed(
        fault_upstream: FaultUpstream, parts: Any) -> None:
    _, relayed, stored = await _past_the_journal_bound(fault_upstream, parts)
    assert stored["content"] == relayed


@pytest.mark.parametrize("where", ["status", "in-stream"])
async def test_the_upstream_key_never_reaches_the_error_frame_or_the_store(
        fault_upstream: FaultUpstream, parts: Any, where: str) -> None:
    key = "sk-upstream-secret-4411"
    said = f"Incorrect API key provided: {key}"
    fault_upstream.script(status(401, {"error": {"message": said, "type": "invalid_request_error"}})
                    if where == "status" else in_stream_error(TOKENS, 1, message=said))
    async with parts(TOKENRELAY_UPSTREAM_API_KEY=key) as p:
        gen = await start(p)
        end, _, stored = await end_of(p, gen)
    assert end.name == "error" and "Incorrect API key" in end.data["error"]["message"]
    assert key not in str(end.data) and key not in str(stored)
