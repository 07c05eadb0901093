"""A real tokenrelay gateway on a free loopback port, inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from tokenrelay.app import create_app
from tokenrelay.config import Settings, load_settings


@dataclass
class Gateway:
    """A running gateway: its URL, app and settings, and the hub once started."""

    base_url: str
    app: Any
    settings: Settings

    @property
    def hub(self) -> Any:
        return self.app.state.hub


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, lifespan: str = "on") -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port>; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        http="httptools",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings | None = None, **env: str
) -> AsyncIterator[Gateway]:
    """Start the real app (lifespan included) with ``TOKENRELAY_*`` overrides in ``env``."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-test-") as tmp:
        if settings is None:
            environ = {
                "TOKENRELAY_DATABASE_URL": f"sqlite:///{Path(tmp) / 'test.db'}",
                "TOKENRELAY_HEARTBEAT_S": "15",
                **env,
            }
            settings = load_settings(environ=environ)
        app = create_app(settings)
        async with serve_app(app) as base_url:
            yield Gateway(base_url, app, settings)
