"""The simulator as its own server: ``tokenrelay simulate``, the benchmarks' upstream.

(With no upstream configured, the gateway runs the app in its own event loop instead,
through ``server.running_in_loop``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import uvicorn

from tokenrelay.simulator.app import create_simulator
from tokenrelay.simulator.catalogue import SimulatorConfig

__all__ = ["run_simulator", "serve_simulator"]


async def serve_simulator(host: str, port: int, config: SimulatorConfig | None = None) -> None:
    """Serve the simulator with uvicorn until cancelled or interrupted."""
    server = uvicorn.Server(uvicorn.Config(
        create_simulator(config), host=host, port=port, loop="uvloop", http="httptools",
        access_log=False, log_level="warning", lifespan="on", timeout_graceful_shutdown=1,
    ))
    # sim-drop ends responses mid-body on purpose; uvicorn reports each one as an error.
    quiet = _DropFilter()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(quiet)
    try:
        await server.serve()
    finally:
        logger.removeFilter(quiet)


class _DropFilter:
    """Hides uvicorn's "returned without completing response" line (sim-drop's purpose)."""

    def filter(self, record: Any) -> bool:
        return "without completing response" not in record.getMessage()


def run_simulator(host: str = "127.0.0.1", port: int = 8001, speed: float = 1.0) -> None:
    """Blocking entry point for ``tokenrelay simulate`` (uvloop when available)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve_simulator(host, port, SimulatorConfig(speed=speed)))
