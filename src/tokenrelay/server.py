"""Running ASGI apps under uvicorn: the gateway with a graceful drain, and in-loop servers.

On SIGTERM/SIGINT: the hub stops accepting streams at once (503), running answers get
``drain_s`` seconds to finish, then the rest end as ``interrupted`` — their subscribers
still receive that terminal event, because uvicorn waits a little longer than ``drain_s``
for open connections before it cancels them.

``serve_in_loop`` runs another app (the built-in simulator, ``tokenrelay bench``'s local
gateway, the tests' servers) on a loopback port of the running event loop. Such a server
must leave the process's signals alone: uvicorn's ``serve()`` installs its own handlers
through ``capture_signals()``, and an inner server that did so would take SIGTERM away
from the gateway, which then never drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from tokenrelay import memtrim
from tokenrelay.asgi import ASGIApp

_SLACK_S = 3.0  # time for subscribers to deliver the interrupted event and close

# Allocations between two young-generation collections (Python's default: 700). With
# history on, an answer's objects live until its end is committed (the writer's group
# commit holds ~18 answers for a few ms), so at 700 most of a collection's objects were
# still alive: promoted, then scanned again by the older generations. At 2,000: 4x fewer
# collections and -13 % gateway CPU per short answer with SQLite history (32 concurrent,
# bench/setup_cost.py --store; unchanged without history), and no more memory per idle
# open stream (bench/memory_probe.py, 2,000 streams: 19.6-19.8 KB). An earlier try cost
# ~0.5 KB per idle stream: each request then left ~30 objects in reference cycles, which
# waited for a collection (fixed in app.py: the scope lets go of its Deferred).
YOUNG_GC_THRESHOLD = 2000


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that starts the hub's drain when asked to exit."""

    def __init__(self, config: uvicorn.Config, app: Starlette, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # Everything alive now (modules, settings, pools) lives as long as the process:
        # moved out of the collector's sight, no full collection has to scan it under load
        # (bench, 200 streams x 50 tok/s: a 35 ms gen-2 pause mid-run without this, none
        # with it).
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        # Buffers of 1 MB or more (a long answer's text) go back to the kernel when freed.
        memtrim.fix_mmap_threshold()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        hub = getattr(self.app.state, "hub", None)
        if hub is not None and self._loop is not None and not hub.draining:
            self._loop.call_soon_threadsafe(hub.begin_drain, self.drain_s)
        super().handle_exit(sig, frame)


def serve(app: Starlette, drain_s: float, **options: Any) -> None:
    """Run ``app`` until SIGTERM/SIGINT, then drain (see module docstring)."""
    # uvicorn annotates the timeout int, but hands it to asyncio.timeout: a float works.
    config = uvicorn.Config(
        app, timeout_graceful_shutdown=drain_s + _SLACK_S,  # type: ignore[arg-type]
        **options)
    DrainingServer(config, app, drain_s).run()


class InLoopServer(uvicorn.Server):
    """uvicorn.Server for a task of a running loop: startup as an event, no signal handlers."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn exits the process when the app's lifespan startup fails; inside a
            # task that would tear through the caller's event loop, so end serve() instead.
            self.should_exit = True
            return
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process's signals belong to the outer server (see module docstring)


async def serve_in_loop(
    app: ASGIApp,
    *,
    sndbuf: int | None = None,
    stop_timeout: float = 10.0,
    force_exit: bool = False,
    **options: Any,
) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Start ``app`` on 127.0.0.1:<free port> in this loop; return its URL and ``stop()``.

    The socket is bound before uvicorn starts, so there is no race for the port.
    ``options`` go to ``uvicorn.Config``; ``sndbuf`` fixes SO_SNDBUF of accepted
    connections (inherited from the listening socket). ``stop()`` lets open connections
    finish for up to ``stop_timeout`` seconds, or not at all with ``force_exit``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {"log_level": "warning", "access_log": False}
    settings.update(options)
    server = InLoopServer(uvicorn.Config(app, **settings))
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
        server.force_exit = force_exit
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=stop_timeout)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            sock.close()

    return f"http://127.0.0.1:{port}", stop


@contextlib.asynccontextmanager
async def running_in_loop(app: ASGIApp, **options: Any) -> AsyncIterator[str]:
    """``async with running_in_loop(app) as base_url:`` (see ``serve_in_loop``)."""
    url, stop = await serve_in_loop(app, **options)
    try:
        yield url
    finally:
        await stop()
