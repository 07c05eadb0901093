"""uvicorn's httptools protocol with less memory per connection and a disconnect callback.

A relay holds thousands of idle SSE connections, so what each one costs counts
(``bench/memory_probe.py``). Two things in uvicorn's protocol are heavy for what they do:

* every ``asyncio.Event`` keeps its waiters in a ``collections.deque``, ~760 bytes even
  empty; uvicorn makes two per connection (the request's message event and the flow
  control's writable event), each with at most a waiter or two. A ``list`` does what
  ``Event`` asks of its waiters (append, remove, iterate);
* the pipelined-request queue is a deque too, usually empty forever.

And an ASGI app learns that its client left only by awaiting ``receive()``: one task per
open stream parked there, with its coroutine frames. This protocol puts a
:class:`Disconnect` in the request's scope under :data:`ON_DISCONNECT`; its callbacks run
when the connection is lost before the response ended, so the subscriber needs no
listener task (it falls back to one under any other server).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ON_DISCONNECT", "Disconnect", "StreamingHttpToolsProtocol"]

ON_DISCONNECT = "tokenrelay.disconnect"  # scope key: a Disconnect


class Disconnect:
    """The client of one request left before its response ended: ``gone``, and the
    callbacks (added with ``callbacks.append``) have run."""

    __slots__ = ("callbacks", "gone")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.gone = False

    def fire(self) -> None:
        self.gone = True
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


class _Pipeline(list):  # type: ignore[type-arg]
    """The pipelined-request queue as a list (uvicorn only appends left and pops right)."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lean(event: asyncio.Event) -> None:
    """Swap an Event's empty waiter deque for a list, if it is still the kind we know."""
    waiters = getattr(event, "_waiters", None)
    if type(waiters) is collections.deque and not waiters:
        event._waiters = []  # type: ignore[attr-defined]


class StreamingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the two changes of the module docstring."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if type(self.pipeline) is collections.deque and not self.pipeline:
            self.pipeline = _Pipeline()  # type: ignore[assignment]
        flow = getattr(self, "flow", None)
        if flow is not None:
            _lean(flow._is_writable_event)

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle is before:
            return  # an upgrade (websocket) request: no new request cycle
        _lean(cycle.message_event)
        cycle.scope[ON_DISCONNECT] = Disconnect()  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:
            # The client left before the response ended (what receive() would report).
            hook = cycle.scope.get(ON_DISCONNECT)  # type: ignore[attr-defined]
            if hook is not None:
                hook.fire()
