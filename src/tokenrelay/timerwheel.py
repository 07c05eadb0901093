"""Coarse timers for thousands of idle streams: one loop timer per tick, not per stream.

Each open stream waits on two deadlines that are seconds away and need no precision: the
subscriber's next heartbeat (the journal read's timeout) and the upstream's first-token
budget. A uvloop timer handle costs ~0.6 KB (handle, libuv timer, arguments); here a
deadline is rounded *up* to the next multiple of :data:`TICK` and joins that tick's list,
and each tick with deadlines holds one loop timer. A deadline costs one small entry, fires
at most one tick late and never early, and a cancelled one is only marked (its entry is
dropped when its tick comes).
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


class Deadline:
    """A scheduled callback; ``cancel()`` makes it a no-op."""

    __slots__ = ("args", "callback")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback: Callable[..., object] | None = callback
        self.args = args

    def cancel(self) -> None:
        self.callback = None
        self.args = ()


class _Wheel:
    __slots__ = ("__weakref__", "_loop", "_ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticks: dict[int, list[Deadline]] = {}

    def call_at(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]
                ) -> Deadline:
        deadline = Deadline(callback, args)
        tick = math.ceil(when / TICK)
        due = self._ticks.get(tick)
        if due is None:
            self._ticks[tick] = [deadline]
            # The tick's own time can be a rounding below ``when``: never fire early.
            self._loop.call_at(max(tick * TICK, when), self._fire, tick)
        else:
            due.append(deadline)
        return deadline

    def _fire(self, tick: int) -> None:
        for deadline in self._ticks.pop(tick, ()):
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
