"""One answer's task: upstream events -> numbered SSE frames in the journal.

A generation never touches a socket. It owns the upstream request (through an
:class:`~tokenrelay.upstream.UpstreamCall`), appends frames to its stream's journal, keeps
the text so far (checkpointed to the store about once a second), and always ends the
stream with exactly one terminal frame:

* ``done`` with state ``complete`` (the upstream sent ``[DONE]``),
* ``done`` with state ``cancelled`` (Stop, or nobody came back within the grace period),
* ``error`` with state ``error`` (upstream failure, journal bound) or ``interrupted``
  (the process is shutting down).

Cancelling is ``Generation.cancel(reason)``: it cancels the generation's task while it
relays, which exits the upstream response and closes the connection, so the provider
stops; ``run()`` absorbs that one cancellation (``Task.uncancel``) and writes the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tokenrelay import events as ev
from tokenrelay import timerwheel
from tokenrelay.config import ModelRoute
from tokenrelay.errors import JournalFull, TokenRelayError, UpstreamError
from tokenrelay.journal.base import Journal
from tokenrelay.store.base import AssistantResult, Store
from tokenrelay.upstream import (
    AttemptRecord,
    ContinueNotice,
    RetryNotice,
    UpstreamClient,
    attempt_usage,
)

log = logging.getLogger("tokenrelay.generation")


class Observer(Protocol):
    """The hooks a generation calls as its answer goes (``metrics.Metrics`` is the one
    implementation). ``relayed`` runs on the hot path, once per upstream read that carried
    events (after :meth:`Generation._append_now`); the rest once per answer or per retry."""

    def first_token(self, gen: Generation, seconds: float, /) -> None: ...

    def relayed(self, gen: Generation, count: int, /) -> None: ...

    def retry(self, gen: Generation, notice: RetryNotice, /) -> None: ...

    def continued(self, gen: Generation, notice: ContinueNotice, /) -> None: ...

    def finished(self, gen: Generation, error: TokenRelayError | None, /) -> None: ...

CANCEL_USER = "user"
CANCEL_ABANDONED = "abandoned"
CANCEL_SHUTDOWN = "shutdown"
CHECKPOINT_KEEPALIVE_S = 10.0  # well under the store's orphan_after_s (30 s)


class Generation:
    """Runs one answer from the upstream into the journal (see module docstring)."""

    # Slots: a generation lives as long as its answer, thousands at a time when idle.
    __slots__ = (
        "_answered",
        "_dirty",
        "_finishing",
        "_relaying",
        "accepted",
        "attempts",
        "body",
        "cancel_reason",
        "checkpoint_s",
        "content_chunks",
        "conversation_id",
        "created",
        "error",
        "finish_reason",
        "finished",
        "first_token_at",
        "journal",
        "last_token_at",
        "message_id",
        "model_used",
        "observer",
        "on_finish",
        "owner",
        "reasoning",
        "route",
        "seq",
        "started",
        "state",
        "store",
        "stream_id",
        "task",
        "text",
        "tool_calls",
        "upstream",
        "usage",
    )

    def __init__(
        self,
        *,
        stream_id: str,
        message_id: str,
        conversation_id: str | None,
        owner: str,
        route: ModelRoute,
        body: dict[str, Any],
        journal: Journal,
        upstream: UpstreamClient,
        store: Store | None,
        checkpoint_s: float = 1.0,
        on_finish: Callable[[Generation], Awaitable[None] | None] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.owner = owner
        self.route = route
        self.body = body
        self.journal = journal
        self.upstream = upstream
        self.store = store
        self.checkpoint_s = checkpoint_s
        self.on_finish = on_finish
        self.observer = observer  # metrics hooks (optional)
        self.seq = 0
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.usage: ev.Usage | None = None
        self.finish_reason: str | None = None
        self.state = ev.STREAMING
        self.model_used = route.name
        self.created = time.time()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._relaying = False  # the upstream relay is running in self.task
        self._finishing = False  # past the point where cancel() can change anything
        self.content_chunks = 0
        self._dirty = False
        self.error: TokenRelayError | None = None
        self.finished = _Flag()
        self.accepted = False  # an upstream answered 200 (see ``answered``)
        self._answered: _Flag | None = None  # made only for a reader that waits for it
        self.attempts: list[AttemptRecord] = []  # every upstream request, for accounting

    # -- lifecycle ---------------------------------------------------------------------

    def start_frame(self) -> bytes:
        """The ``start`` event; appended by the hub before the task runs (first bytes)."""
        self.seq = 1
        payload = {
            "stream_id": self.stream_id,
            "message_id": self.message_id,
            "conversation_id": self.conversation_id,
            "model": self.route.name,
            "created": int(self.created),
        }
        return ev.frame(1, ev.START, ev.dumps(payload))

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"generation-{self.stream_id[:8]}"
        )
        return self.task

    def cancel(self, reason: str = CANCEL_USER) -> bool:
        """Ask the generation to stop; False if it had already finished."""
        if self.finished.is_set() or self.cancel_reason is not None or self._finishing:
            return False
        self.cancel_reason = reason
        # Cancelling the task exits the upstream response, which closes the connection;
        # run() absorbs exactly this cancellation and goes on to write the terminal frame.
        # Before the relay starts there is nothing to interrupt: run() checks the reason.
        if self._relaying and self.task is not None:
            self.task.cancel()
        return True

    async def run(self) -> None:
        # The checkpoint task starts after the first period: an answer shorter than that
        # costs a coarse timer entry (timerwheel), not a task or a loop timer (issue 17).
        checkpointer: list[asyncio.Task[None]] = []
        timer = None
        if self.store is not None and self.checkpoint_s > 0:
            loop = asyncio.get_running_loop()
            timer = timerwheel.call_at(loop, loop.time() + self.checkpoint_s,
                                       self._start_checkpoints, loop, checkpointer)
        error: TokenRelayError | None = None
        try:
            if self.cancel_reason is None:
                # Inline rather than a method: one coroutine frame less under every open
                # stream (bench/memory_probe.py).
                call = self.upstream.call(self.route, self.body, on_retry=self._on_retry,
                                          on_accept=self._on_accept)
                call.answer = self
                self.attempts = call.records
                self._relaying = True
                try:
                    try:
                        # However it ends (cancel included), call.run() closes the upstream
                        # response.
                        await call.run(
                            self._append_batch,
                            self._append_now if self.journal.sync_append else None,
                        )
                        self.state = ev.COMPLETE
                    finally:
                        # The last model that relayed something (a continuation that
                        # failed before any text did not answer), else the last tried.
                        self.model_used = next(
                            (a.route for a in reversed(call.records) if a.relayed),
                            call.route_used.name,
                        )
                        self.content_chunks = call.content_chunks
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self.cancel_reason is None or task is None or task.uncancel() > 0:
                        raise  # not our own cancel(): e.g. the event loop is shutting down
                finally:
                    self._relaying = False
            if self.cancel_reason is not None and self.state == ev.STREAMING:
                self.state = (
                    ev.INTERRUPTED if self.cancel_reason == CANCEL_SHUTDOWN else ev.CANCELLED
                )
        except TokenRelayError as exc:
            error = exc
            self.state = ev.FAILED
        except asyncio.CancelledError:
            self.state = ev.INTERRUPTED
            raise
        except Exception:  # a bug must still end the stream for its readers
            log.exception("generation %s failed", self.stream_id[:8])
            error = TokenRelayError("internal error while streaming the answer")
            self.state = ev.FAILED
        finally:
            self._finishing = True
            if timer is not None:
                timer.cancel()
            for task in checkpointer:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.shield(self._finish(error))

    # -- events -> frames (the hot path) -------------------------------------------------

    async def _append_batch(self, batch: list[ev.Event]) -> None:
        frames, seq = self._frames(batch)
        if frames:
            await self.journal.append(self.stream_id, frames)
            self._keep(batch)
            self._appended(len(frames), seq)

    def _append_now(self, batch: list[ev.Event]) -> None:
        """``_append_batch`` for a journal that appends without waiting: called from the
        upstream connection's data callback (no task wake-up per read). The call's
        :class:`~tokenrelay.upstream.Sink`."""
        if (len(batch) == 1 and type(item := batch[0]) is ev.TextDelta
                and self.first_token_at is not None):
            # One text delta after the first token, as a live answer's reads come: what
            # _frames and _appended do for it, in the same order, without the calls.
            seq = self.seq + 1
            text = item.text
            frame = ev.text_frame(seq, text)
            self.journal.append_now(self.stream_id, [frame])
            self.text.append(text)  # kept once relayed: the store holds what clients got
            self.last_token_at = time.monotonic()
            self.seq = seq
            self._dirty = True
            if self.observer is not None:
                self.observer.relayed(self, 1)
            return
        frames, seq = self._frames(batch)
        if frames:
            self.journal.append_now(self.stream_id, frames)
            self._keep(batch)
            self._appended(len(frames), seq)

    def _frames(self, batch: list[ev.Event]) -> tuple[list[bytes], int]:
        """The frames of ``batch`` (numbered after ``seq``). Their text is kept by
        :meth:`_keep` once the journal took them (a refused batch is not stored)."""
        frames: list[bytes] = []
        seq = self.seq
        for item in batch:
            if type(item) is ev.TextDelta:
                seq += 1
                frames.append(ev.text_frame(seq, item.text))
            elif type(item) is ev.ReasoningDelta:
                seq += 1
                frames.append(ev.frame(seq, ev.REASONING, ev.dumps({"reasoning": item.text})))
            elif type(item) is ev.ToolCallDelta:
                seq += 1
                frames.append(ev.frame(seq, ev.TOOL_CALL, ev.dumps({
                    "index": item.index, "id": item.id, "name": item.name,
                    "arguments": item.arguments,
                })))
            elif type(item) is ev.Usage:
                self.usage = item
            elif type(item) is ev.Finish:
                self.finish_reason = item.reason
        if frames:
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
                if self.observer is not None:
                    self.observer.first_token(self, now - self.started)
            self.last_token_at = now
        return frames, seq

    def _appended(self, count: int, seq: int) -> None:
        self.seq = seq
        self._dirty = True
        if self.observer is not None:
            self.observer.relayed(self, count)

    def _keep(self, batch: list[ev.Event]) -> None:
        """Keep the text, thoughts and tool calls of a batch the journal took."""
        for item in batch:
            if type(item) is ev.TextDelta:
                self.text.append(item.text)
            elif type(item) is ev.ReasoningDelta:
                self.reasoning.append(item.text)
            elif type(item) is ev.ToolCallDelta:
                call = self.tool_calls.setdefault(
                    item.index, {"index": item.index, "id": None, "name": None, "arguments": ""}
                )
                if item.id:
                    call["id"] = item.id
                if item.name:
                    call["name"] = item.name
                call["arguments"] += item.arguments

    def answered(self) -> _Flag:
        """Set once an upstream accepted the request (``accepted``) or the answer ended
        without one: then /v1 knows which HTTP status a streaming call gets."""
        if self._answered is None:
            self._answered = _Flag()
            if self.accepted or self.finished.is_set():
                self._answered.set()
        return self._answered

    def _on_accept(self, route: ModelRoute) -> None:
        self.model_used = route.name  # after a fallback: the model that answers
        self.accepted = True
        if self._answered is not None:
            self._answered.set()

    async def _on_retry(self, notice: RetryNotice) -> None:
        self.seq += 1
        payload = {
            "attempt": notice.attempt,
            "max_attempts": notice.max_attempts,
            "wait_ms": round(notice.wait_s * 1000),
            "reason": notice.reason,
            "status": notice.status,
            "model": notice.model,
            "next_model": notice.next_model,
            "message": notice.message,
        }
        await self.journal.append(self.stream_id, [ev.frame(self.seq, ev.RETRY, ev.dumps(payload))])
        if self.observer is not None:
            self.observer.retry(self, notice)

    async def on_continue(self, notice: ContinueNotice) -> None:
        self.seq += 1
        payload = {"attempt": notice.attempt, "model": notice.model, "reason": notice.reason,
                   "offset": notice.offset}
        await self.journal.append(self.stream_id,
                                  [ev.frame(self.seq, ev.CONTINUED, ev.dumps(payload))])
        log.info("stream %s continued by %s after %s", self.stream_id[:8], notice.model,
                 notice.reason)
        if self.observer is not None:
            self.observer.continued(self, notice)

    def partial(self) -> tuple[str, bool]:
        """The answer text so far, and whether tool calls began (never continued)."""
        return "".join(self.text), bool(self.tool_calls)

    def progress(self) -> tuple[ev.Usage | None, int]:
        """The last usage seen and the characters relayed: read at attempt boundaries."""
        return self.usage, sum(map(len, self.text)) + sum(map(len, self.reasoning))

    # -- the end -------------------------------------------------------------------------

    def stats(self, tokens: int | None = None) -> dict[str, Any]:
        """``tokens``: ``completion_tokens()`` when the caller has it already."""
        now = time.monotonic()
        if tokens is None:
            tokens = self.completion_tokens()
        ttft = None if self.first_token_at is None else (self.first_token_at - self.started)
        tps = None
        if self.first_token_at is not None and self.last_token_at is not None:
            span = self.last_token_at - self.first_token_at
            if span > 0 and tokens > 1:
                tps = (tokens - 1) / span
        return {
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "tokens_per_s": None if tps is None else round(tps, 1),
            "tokens": tokens,
            "duration_ms": round((now - self.started) * 1000, 1),
        }

    def completion_tokens(self) -> int:
        """What was generated: the sum over the attempts (continuations included; an
        attempt that generated nothing counts 0), else the old single-request estimate."""
        if self.attempts:
            return sum(attempt_usage(a)[0] for a in self.attempts)
        if self.usage is not None:
            return self.usage.completion_tokens
        if self.content_chunks:
            return self.content_chunks
        chars = sum(len(t) for t in self.text) + sum(len(t) for t in self.reasoning)
        return max(1, round(chars / 4)) if chars else 0

    def usage_source(self) -> str:
        """``provider`` when every attempt that generated something reported its usage,
        else ``estimated`` if any was estimated from characters, else ``counted``."""
        sources = {attempt_usage(a)[1] for a in self.attempts
                   if a.usage is not None or a.relayed}
        if not self.attempts:
            sources = {"provider" if self.usage is not None else "estimated"}
        elif not sources:
            return "counted"  # nothing was generated: zero, counted
        for source in ("estimated", "counted"):
            if source in sources:
                return source
        return "provider"

    def models(self) -> list[str]:
        """The models that answered, in order (a continuation may add one)."""
        names: list[str] = []
        for a in self.attempts:
            if a.relayed and a.route not in names:
                names.append(a.route)
        return names or [self.model_used]

    def attempt_dicts(self) -> list[dict[str, Any]]:
        """The attempts as stored with the message."""
        out = []
        for a in self.attempts:
            tokens, source = attempt_usage(a)
            out.append({
                "route": a.route, "provider": a.provider, "upstream_model": a.upstream_model,
                "continuation": a.continuation, "status": a.status, "outcome": a.outcome,
                "started_ms": a.started_ms, "elapsed_ms": a.elapsed_ms,
                "usage": {"prompt_tokens": a.usage.prompt_tokens if a.usage else None,
                          "completion_tokens": tokens, "source": source},
            })
        return out

    def _usage_payload(self, completion: int, source: str) -> dict[str, Any]:
        if self.usage is not None:
            u = self.usage
            # The provider's own total, unless continuations added to its completion count.
            total = (u.total_tokens if completion == u.completion_tokens
                     else u.prompt_tokens + completion)
            return {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": total,
                "estimated": source != "provider",
                "source": source,
            }
        return {
            "prompt_tokens": None,
            "completion_tokens": completion,
            "total_tokens": None,
            "estimated": source != "provider",
            "source": source,
        }

    async def _finish(self, error: TokenRelayError | None) -> None:
        self.error = error
        seq = self.seq + 1
        # Each computed once: the frame, the stored message and the stats all use them.
        tokens = self.completion_tokens()
        source = self.usage_source()
        stats = self.stats(tokens)
        if error is None and self.state in (ev.COMPLETE, ev.CANCELLED):
            payload = {
                "state": self.state,
                "finish_reason": self.finish_reason
                or ("cancelled" if self.state == ev.CANCELLED else None),
                "model": self.model_used,
                "models": self.models(),
                "usage": self._usage_payload(tokens, source),
                "stats": stats,
            }
            frame = ev.frame(seq, ev.DONE, ev.dumps(payload))
        else:
            if error is None:
                error = TokenRelayError(
                    "the server shut down before the answer was complete", code="interrupted"
                )
                error.retryable = True
            elif isinstance(error, UpstreamError | JournalFull):
                error.message = self.upstream.redact(error.message)
            payload = {
                "error": error.to_dict(),
                "state": self.state,
                "model": self.model_used,
                "models": self.models(),
                "usage": self._usage_payload(tokens, source),
                "stats": stats,
            }
            frame = ev.frame(seq, ev.ERROR, ev.dumps(payload))
        # The store first: once a client sees the end, history already shows it.
        if self.store is not None:
            usage = self.usage
            result = AssistantResult(
                state=self.state,
                content="".join(self.text),
                reasoning="".join(self.reasoning),
                tool_calls=list(self.tool_calls.values()) or None,
                finish_reason=self.finish_reason,
                model_used=self.model_used,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=tokens,
                usage_estimated=source != "provider",
                attempts=self.attempt_dicts() or None,
                ttft_ms=stats["ttft_ms"],
                tokens_per_s=stats["tokens_per_s"],
                error_code=error.code if error else None,
                error_message=error.message if error else None,
            )
            try:
                async with asyncio.timeout(10):  # a stuck database must not hold the stream
                    await self.store.finish_assistant(self.message_id, result)
            except Exception:
                log.warning("cannot store the end of message %s", self.message_id[:8])
        try:
            if await self.journal.finish(self.stream_id, frame, self.state):
                self.seq = seq
        except Exception:
            log.exception("cannot write the end of stream %s", self.stream_id[:8])
        self.finished.set()
        if self._answered is not None:
            self._answered.set()
        if self.observer is not None:
            self.observer.finished(self, error)
        if self.on_finish is not None:
            result_ = self.on_finish(self)
            if result_ is not None:
                await result_

    def _start_checkpoints(self, loop: asyncio.AbstractEventLoop,
                           tasks: list[asyncio.Task[None]]) -> None:
        tasks.append(loop.create_task(self._checkpoints()))

    async def _checkpoints(self) -> None:
        """Save the text so far when it changed; at least every ``KEEPALIVE_S`` regardless,
        so a long silent think never looks like an orphan to another instance's sweep."""
        assert self.store is not None
        last = time.monotonic()
        while True:  # started one period in (see run())
            if self._dirty or time.monotonic() - last >= CHECKPOINT_KEEPALIVE_S:
                self._dirty = False
                last = time.monotonic()
                try:
                    await self.store.checkpoint(
                        self.message_id, "".join(self.text), "".join(self.reasoning)
                    )
                except Exception:
                    log.warning("checkpoint of message %s failed", self.message_id[:8])
            await asyncio.sleep(self.checkpoint_s)


class _Flag:
    """``asyncio.Event``'s ``set``/``is_set``/``wait`` for one-shot use, without the
    Event's deque: every live generation holds one, so its size counts per idle stream."""

    __slots__ = ("_fut", "_set")

    def __init__(self) -> None:
        self._set = False
        self._fut: asyncio.Future[None] | None = None  # made only when someone waits

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        await asyncio.shield(self.future())  # a cancelled waiter must not cancel the flag

    def future(self) -> asyncio.Future[None]:
        """The future ``set`` resolves (to wait with callbacks instead of a task); never
        cancel it."""
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
            if self._set:
                self._fut.set_result(None)
        return self._fut
