"""Coarse timers for thousands of idle streams: one loop timer per tick, not per stream.

Each open stream waits on two deadlines that are seconds away and need no precision: the
subscriber's next heartbeat (the journal read's timeout) and the upstream's first-token
budget. A uvloop timer handle costs ~0.6 KB (handle, libuv timer, arguments); here a
deadline is rounded *up* to the next multiple of :data:`TICK` and joins that tick's list,
and each tick with deadlines holds one loop timer. A deadline costs one small entry, fires
at most one tick late and never early. A cancelled one is marked, and its tick's list is
rebuilt without the marked entries once they are most of it: almost every deadline is
cancelled long before its time (a heartbeat wait that got a token, a first-token budget
that got its token), and kept until their tick, seconds away, they piled up at a high
request rate (~8 a short request), each an object the garbage collector walks.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["TICK", "Deadline", "call_at"]

TICK = 0.05  # seconds

_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wheel] = (
    weakref.WeakKeyDictionary()
)

_last: _Wheel | None = None  # the wheel of the loop call_at last served


_COMPACT_AT = 32  # cancelled entries of one tick before its list may be rebuilt


class _Tick(list["Deadline"]):
    """One tick's deadlines, and how many of them are cancelled."""

    __slots__ = ("cancelled",)

    def __init__(self, first: Deadline) -> None:
        super().__init__((first,))
        self.cancelled = 0

    def compact(self) -> None:
        self[:] = [d for d in self if d.callback is not None]
        self.cancelled = 0


class Deadline:
    """A scheduled callback; ``cancel()`` makes it a no-op."""

    __slots__ = ("args", "callback", "tick")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback: Callable[..., object] | None = callback
        self.args = args
        # Its tick's list until that fires or this is cancelled (a reference cycle only
        # while both are in the wheel: _fire and cancel() break it).
        self.tick: _Tick | None = None

    def cancel(self) -> None:
        if self.callback is None:
            return
        self.callback = None
        self.args = ()
        tick, self.tick = self.tick, None
        if tick is not None:
            tick.cancelled += 1
            if tick.cancelled >= _COMPACT_AT and tick.cancelled * 2 >= len(tick):
                tick.compact()


class _Wheel:
    __slots__ = ("__weakref__", "_loop", "_ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticks: dict[int, _Tick] = {}

    def call_at(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]
                ) -> Deadline:
        deadline = Deadline(callback, args)
        tick = math.ceil(when / TICK)
        due = self._ticks.get(tick)
        if due is None:
            due = self._ticks[tick] = _Tick(deadline)
            # The tick's own time can be a rounding below ``when``: never fire early.
            self._loop.call_at(max(tick * TICK, when), self._fire, tick)
        else:
            due.append(deadline)
        deadline.tick = due
        return deadline

    def _fire(self, tick: int) -> None:
        due = self._ticks.pop(tick, None)
        if due is None:
            return
        for deadline in due:
            deadline.tick = None
        for deadline in due:
            callback = deadline.callback
            if callback is not None:
                args = deadline.args
                deadline.cancel()
                try:
                    callback(*args)
                except Exception as exc:  # one failing callback must not skip the others
                    self._loop.call_exception_handler(
                        {"message": "timer callback failed", "exception": exc}
                    )


def call_at(loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., object],
            *args: Any) -> Deadline:
    """Run ``callback(*args)`` on ``loop`` once loop time ``when`` has passed (up to one
    tick later), unless cancelled."""
    global _last
    wheel = _last
    if wheel is None or wheel._loop is not loop:
        # WeakKeyDictionary.get is a Python call that makes a weak reference: looked up
        # only when the loop changes (several deadlines per request, one loop in serving).
        wheel = _wheels.get(loop)
        if wheel is None:
            wheel = _wheels[loop] = _Wheel(loop)
        _last = wheel
    return wheel.call_at(when, callback, args)
