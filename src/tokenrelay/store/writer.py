"""The store's one writer task: the writes of many answers in one transaction.

Every write of :class:`~tokenrelay.store.sql.SQLStore` is an :class:`Op` queued here. One
task takes everything queued (up to ``max_batch`` ops) and applies it in one transaction:
while it commits, the next batch gathers. So at concurrency 1 a write commits at once, and
under load N answers cost one transaction, not 4·N (issue 17).

An op is either *rows* for the store's fixed statements (each a ``(rank, row)`` part,
executed as one ``executemany`` per statement) or a *function* of the connection (anything
that needs a result or a read inside the transaction, e.g. the next message position).
Group commit: woken by a write, the task lets the event loop go round up to
``linger_turns`` times (at most ``linger_s``) before it takes the batch, so the answers
that end meanwhile share the transaction. It stops at the first turn that brought no
write and ran nothing else (under ``IDLE_TURN_S``): at low load a write commits after one
turn; under load each turn runs other streams' work, the writes gather, and that is when a
transaction per answer would cost the most. Measured on 2,000 short answers, 32
at a time, through ``/api/chat`` with SQLite history: without it a transaction held ~2
answers (one thread hop, one ``BEGIN``/``COMMIT`` and ~10 WAL pages each); with 16 turns,
~18, and the gateway's CPU per answer fell 14 % (issue 17, ``bench/README.md``).

Order: the queue is FIFO; a function op is a barrier (the rows queued before it are
written first); between barriers the rows go statement by statement in rank order, which
is correct because an op only ever follows the ops of its own message in a *lower* or
equal rank (insert → checkpoint → finish; a checkpoint only updates a ``streaming``
message, so a finish is never undone).

Failures:

* the database is unreachable (:class:`ServiceUnavailable`): ops marked ``retry`` are
  tried again with backoff for up to ``retry_s``, the others fail at once (their caller
  answers 503); ``down`` stays true until a transaction succeeds;
* anything else (a constraint, a bug): the batch is rolled back and each op runs alone in
  its own transaction, so one bad op never takes the others' writes with it.

An op nobody waits for (a *deferred* write) has no future; its failure is logged.
:meth:`Writer.flush` waits until everything queued before it was written (reads call it:
read-your-writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from tokenrelay.errors import ServiceUnavailable, TokenRelayError

log = logging.getLogger("tokenrelay.store")

IDLE_TURN_S = 50e-6  # a turn of the loop this short ran nothing but the writer itself

Conn = Any  # an SQLAlchemy AsyncConnection
Fn = Callable[[Conn], Awaitable[Any]]


class Op:
    """One write: rows for ranked statements, or a function of the connection."""

    __slots__ = ("failed_at", "fn", "future", "parts", "retry")

    def __init__(
        self,
        parts: Sequence[tuple[int, tuple[Any, ...]]] = (),
        fn: Fn | None = None,
        future: asyncio.Future[Any] | None = None,
        retry: bool = False,
    ) -> None:
        self.parts = parts
        self.fn = fn
        self.future = future
        self.retry = retry
        self.failed_at = 0.0


class Writer:
    """The one task that writes (see module docstring).

    ``begin`` opens one transaction (the store's ``_begin``); ``statements[rank]`` is the
    driver-level SQL of each rank, its parameters in the driver's own style. ``rows``, if
    given, writes a batch made only of rows in one transaction by a faster way (SQLite:
    ``store/sqlitefast.py``). ``alone``, if given, writes a batch of one row of one
    statement as that statement alone, its own implicit transaction (PostgreSQL: one
    round trip where ``BEGIN``, the statement and ``COMMIT`` are three); committed when
    it returns, as a transaction is.
    """

    def __init__(
        self,
        begin: Callable[[], AbstractAsyncContextManager[Conn]],
        statements: Sequence[str],
        *,
        max_batch: int = 1000,
        retry_s: float = 10.0,
        linger_turns: int = 16,
        linger_s: float = 0.01,
        rows: Callable[[dict[int, list[tuple[Any, ...]]]], Awaitable[None]] | None = None,
        alone: Callable[[str, tuple[Any, ...]], Awaitable[None]] | None = None,
    ) -> None:
        self._begin = begin
        self._fast_rows = rows
        self._alone = alone
        self.statements = statements
        self.max_batch = max_batch
        self.retry_s = retry_s
        self.linger_turns = linger_turns
        self.linger_s = linger_s
        self.down = False  # the last transaction failed for want of a database
        self.transactions = 0  # committed, for tests and metrics
        self._queue: list[Op] = []
        self._busy = False
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- queueing -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="store-writer")

    def defer(self, parts: Sequence[tuple[int, tuple[Any, ...]]] = (), fn: Fn | None = None,
              *, retry: bool = True) -> None:
        """Queue a write nobody waits for."""
        self._put(Op(parts, fn, None, retry))

    def submit(self, parts: Sequence[tuple[int, tuple[Any, ...]]] = (), fn: Fn | None = None,
               *, retry: bool = False) -> asyncio.Future[Any]:
        """Queue a write; the future is its function's result once committed."""
        if self._task is None:
            raise RuntimeError("the store is not started (call start() first)")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(Op(parts, fn, future, retry))
        return future

    def _put(self, op: Op) -> None:
        self._queue.append(op)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def flush(self) -> None:
        """Return once every write queued before this call was committed (or failed)."""
        if not self._queue and not self._busy:
            return
        await self.submit()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the task."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._queue or self._busy:
            self._task = task  # submit() needs it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), timeout)
            self._task = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for op in self._queue:
            _fail(op, ServiceUnavailable("the store is closed"))
        if self._queue:
            log.warning("store closed with %d write(s) not done", len(self._queue))
        self._queue = []

    # -- the task -------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            await self._linger()
            batch = self._queue[: self.max_batch]
            del self._queue[: len(batch)]
            self._busy = True
            try:
                written = await self._write(batch)
            finally:
                self._busy = False
                del batch  # not kept while idle: its rows may hold a long answer's text
            backoff = 0.0 if written else min(1.0, backoff * 2 or 0.05)
            if backoff:
                await asyncio.sleep(backoff)

    async def _linger(self) -> None:
        """Let the loop go round (see "Group commit" in the module docstring)."""
        queue = self._queue
        now = time.monotonic()
        deadline = now + self.linger_s
        for _ in range(self.linger_turns):
            if len(queue) >= self.max_batch or now >= deadline:
                return
            queued, began = len(queue), now
            await asyncio.sleep(0)
            now = time.monotonic()
            if len(queue) == queued and now - began < IDLE_TURN_S:
                return

    async def _write(self, batch: list[Op]) -> bool:
        """Apply one batch; False when the database was unreachable."""
        rows: dict[int, list[tuple[Any, ...]]] = {}  # the batch's rows, if it is only rows
        for op in batch:
            if op.fn is not None:
                rows = {}
                break
            for rank, row in op.parts:
                if rank in rows:
                    rows[rank].append(row)
                else:
                    rows[rank] = [row]
        else:
            if not rows:
                for op in batch:  # flush markers only: everything before them is done
                    _done(op, None)
                return True
        results: list[Any] = []
        try:
            if rows:  # only rows: one statement per rank
                if self._fast_rows is not None:
                    await self._fast_rows(rows)
                elif self._alone is not None and _one_row(rows):
                    [(rank, [row])] = rows.items()
                    await self._alone(self.statements[rank], row)
                else:
                    async with self._begin() as conn:
                        await self._rows(conn, rows)
                results = [None] * len(batch)
            else:
                async with self._begin() as conn:
                    results = await self._apply(conn, batch)
        except ServiceUnavailable as exc:
            self.down = True
            self._outage(batch, exc)
            return False
        except Exception:
            log.warning("a batch of %d store write(s) failed; writing them one by one",
                        len(batch), exc_info=True)
            await self._one_by_one(batch)
            return True
        self.down = False
        self.transactions += 1
        for op, result in zip(batch, results, strict=True):
            _done(op, result)
        return True

    async def _apply(self, conn: Conn, batch: list[Op]) -> list[Any]:
        """Run the batch's statements; returns each op's result (or domain error)."""
        rows: dict[int, list[tuple[Any, ...]]] = {}
        results: list[Any] = []
        for op in batch:
            if op.fn is None:
                for rank, row in op.parts:
                    rows.setdefault(rank, []).append(row)
                results.append(None)
                continue
            await self._rows(conn, rows)
            rows = {}
            try:
                results.append(await op.fn(conn))
            except ServiceUnavailable:
                raise
            except TokenRelayError as exc:  # e.g. not the owner's: a result, not a failure
                results.append(exc)
        await self._rows(conn, rows)
        return results

    async def _rows(self, conn: Conn, rows: dict[int, list[tuple[Any, ...]]]) -> None:
        for rank in sorted(rows):
            params = rows[rank]
            await conn.exec_driver_sql(self.statements[rank],
                                       params[0] if len(params) == 1 else params)

    def _outage(self, batch: list[Op], exc: ServiceUnavailable) -> None:
        now = time.monotonic()
        again = []
        for op in batch:
            if op.retry:
                op.failed_at = op.failed_at or now
                if now - op.failed_at < self.retry_s:
                    again.append(op)
                    continue
            _fail(op, exc)
        self._queue[:0] = again
        dropped = len(batch) - len(again)
        log.warning("database unavailable: %d store write(s) kept for a retry, %d given up",
                    len(again), dropped)

    async def _one_by_one(self, batch: list[Op]) -> None:
        for op in batch:
            try:
                async with self._begin() as conn:
                    [result] = await self._apply(conn, [op])
            except Exception as exc:
                if op.future is None:
                    log.warning("a store write failed: %s", type(exc).__name__)
                _fail(op, exc)
            else:
                self.transactions += 1
                _done(op, result)


def _one_row(rows: dict[int, list[tuple[Any, ...]]]) -> bool:
    """The batch is one row of one statement (a short answer's end, at low load)."""
    if len(rows) != 1:
        return False
    for batch in rows.values():
        return len(batch) == 1
    return False


def _done(op: Op, result: Any) -> None:
    future = op.future
    if future is None or future.done():
        if isinstance(result, Exception) and future is None:
            log.warning("a deferred store write was refused: %s", result)
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _fail(op: Op, exc: BaseException) -> None:
    if op.future is not None and not op.future.done():
        op.future.set_exception(exc)
