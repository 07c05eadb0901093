"""Run any ASGI app under a real uvicorn server on a free 127.0.0.1 port, in this loop.

The socket is bound before uvicorn starts (port 0), so there is no race for a port, and
startup is awaited through an event rather than polled. The server runs as a task in the
test's event loop, which lets tests await the app's own events directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn

STREAMING_PROTOCOL = "tokenrelay.protocol:StreamingHttpToolsProtocol"


class _Server(uvicorn.Server):
    """uvicorn.Server that reports startup through an event and leaves signals alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn exits the process when the app's lifespan startup fails; inside a
            # task that would tear through the test's event loop, so end serve() instead.
            self.should_exit = True
            return
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve_asgi(app: Any, **options: Any) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Start ``app`` on 127.0.0.1; return its base URL and an async ``stop()``.

    ``options`` go to ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown``), except
    ``sndbuf``: a fixed SO_SNDBUF for accepted connections (a small one makes a client that
    stops reading fill the server's socket at once, instead of after megabytes).
    """
    sndbuf = options.pop("sndbuf", None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # inherited on accept
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {
        "log_config": None,  # never reconfigure logging globally from a test
        "access_log": False,
        "log_level": "warning",
        "http": STREAMING_PROTOCOL,  # as `tokenrelay serve`
        "lifespan": "auto",
        "timeout_graceful_shutdown": 2,
    }
    settings.update(options)
    server = _Server(uvicorn.Config(app, **settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        sock.close()
        await task  # re-raises a failure other than the app's startup
        raise RuntimeError("the app failed to start (see the lifespan error logged above)")

    async def stop() -> None:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=10)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            sock.close()

    return f"http://127.0.0.1:{port}", stop


@contextlib.asynccontextmanager
async def running_asgi(app: Any, **options: Any) -> AsyncIterator[str]:
    """``async with running_asgi(app) as base_url:`` (no trailing slash, no ``/v1``)."""
    url, stop = await serve_asgi(app, **options)
    try:
        yield url
    finally:
        await stop()
