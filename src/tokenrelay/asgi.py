"""ASGI's types, and the two objects tokenrelay adds to a request's scope.

The types are Starlette's (:mod:`starlette.types`, the ASGI specification's ``scope``,
``receive``, ``send`` and application written as ``typing`` aliases), so our pure-ASGI
middleware and Starlette's own stack accept each other. They are aliases only: nothing
here adds a call or an attribute lookup per request.

The scope extensions, each under a key of its own:

* ``scope[DEFERRED]``, a :class:`Deferred`: set by ``app.TokenRelayApp`` on every HTTP
  request. A streaming response leaves its body there, to run after the middleware and
  the route returned; the access log middleware waits for that body's end through it.
* ``scope[ON_DISCONNECT]``, a :class:`Disconnect`: set by
  ``protocol.StreamingHttpToolsProtocol`` (``tokenrelay serve``) on every request. Its
  callbacks tell the subscriber and the ``/v1`` route that the client left, without a
  task waiting in ``receive()``; under any other server it is absent and they start one.

Both are plain objects with slots, read with one ``scope.get`` per response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DEFERRED", "ON_DISCONNECT", "ASGIApp", "Deferred", "Disconnect", "Message", "Receive",
    "Scope", "Send",
]

DEFERRED = "tokenrelay.deferred"  # scope key: a Deferred (set in app.py)
ON_DISCONNECT = "tokenrelay.disconnect"  # scope key: a Disconnect (set in protocol.py)


class Deferred:
    """A response body that the app runs after the middleware and the route returned.

    A stream may stay open for hours; run inside the route, its task would keep the
    coroutine frames of every middleware, the router and the route alive all that time
    (~2 KB per open stream, ``bench/memory_probe.py``). So a SubscriberResponse sends
    its start through the middleware (which add their headers), leaves its body here, and
    returns. A middleware that acts when the response ends (the access log) appends a
    callback to ``after``: the app calls them once the body has ended. ``send`` is the
    server's own send: body chunks skip the middleware wrappers.
    """

    __slots__ = ("after", "body", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.body: Callable[[], Awaitable[None]] | None = None
        self.after: list[Callable[[], None]] = []


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
