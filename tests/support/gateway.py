"""A real tokenrelay gateway on a free loopback port, inside the test's event loop."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.servers import running_asgi
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


def serve_app(
    app: Any, *, lifespan: str = "on", **options: Any
) -> contextlib.AbstractAsyncContextManager[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port>; yield its base URL."""
    return running_asgi(app, lifespan=lifespan, timeout_graceful_shutdown=1, **options)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings | None = None, *, server: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[Gateway]:
    """Start the real app (lifespan included) with ``TOKENRELAY_*`` overrides in ``env``;
    ``server`` holds options for :func:`support.servers.serve_asgi`."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-test-") as tmp:
        if settings is None:
            environ = {
                "TOKENRELAY_DATABASE_URL": f"sqlite:///{Path(tmp) / 'test.db'}",
                "TOKENRELAY_HEARTBEAT_S": "15",
                **env,
            }
            settings = load_settings(environ=environ)
        app = create_app(settings)
        async with serve_app(app, **(server or {})) as base_url:
            yield Gateway(base_url, app, settings)
