"""Run any ASGI app under a real uvicorn server on a free 127.0.0.1 port, in this loop.

The server is the app's own in-loop helper (``tokenrelay.server.serve_in_loop``): the
socket is bound before uvicorn starts, startup is awaited through an event, and the
process's signals are left alone. Running in the test's event loop lets tests await the
app's own events directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from tokenrelay.server import serve_in_loop

STREAMING_PROTOCOL = "tokenrelay.protocol:StreamingHttpToolsProtocol"


async def serve_asgi(app: Any, **options: Any) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Start ``app`` on 127.0.0.1; return its base URL and an async ``stop()``.

    ``options`` go to ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown``), except
    ``sndbuf``: a fixed SO_SNDBUF for accepted connections (a small one makes a client that
    stops reading fill the server's socket at once, instead of after megabytes).
    """
    settings: dict[str, Any] = {
        "log_config": None,  # never reconfigure logging globally from a test
        "http": STREAMING_PROTOCOL,  # as `tokenrelay serve`
        "lifespan": "auto",
        "timeout_graceful_shutdown": 2,
    }
    settings.update(options)
    return await serve_in_loop(app, **settings)


@contextlib.asynccontextmanager
async def running_asgi(app: Any, **options: Any) -> AsyncIterator[str]:
    """``async with running_asgi(app) as base_url:`` (no trailing slash, no ``/v1``)."""
    url, stop = await serve_asgi(app, **options)
    try:
        yield url
    finally:
        await stop()
