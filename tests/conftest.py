"""Shared fixtures: a simulator and the fault upstream on real loopback ports, and gateways
in front of the simulator."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.fault_upstream import FaultUpstream
from support.gateway import Gateway, running_gateway, serve_app
from tokenrelay.simulator import Simulator, SimulatorConfig, create_simulator


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[Simulator, str]]:
    """A fast simulator (speed x20, short first-token delays) on 127.0.0.1; (app, /v1 URL)."""
    sim = create_simulator(SimulatorConfig(speed=20.0, first_token_delay_scale=0.1))
    async with serve_app(sim, lifespan="off") as url:
        yield sim, url + "/v1"


@pytest.fixture
async def fault_upstream() -> AsyncIterator[FaultUpstream]:
    """The scripted fault upstream (support/fault_upstream.py) on 127.0.0.1."""
    async with FaultUpstream() as up:
        yield up


@pytest.fixture
def gateway_factory(
    simulator: tuple[Simulator, str],
) -> Callable[..., AbstractAsyncContextManager[Gateway]]:
    """``async with gateway_factory(**env) as gw``: a gateway whose upstream is the simulator."""
    _, url = simulator

    def factory(server: dict[str, Any] | None = None, **env: str
                ) -> AbstractAsyncContextManager[Gateway]:
        env.setdefault("TOKENRELAY_UPSTREAM_URL", url)
        return running_gateway(server=server, **env)

    return factory


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> AsyncIterator[Gateway]:
    async with gateway_factory() as gw:
        yield gw


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and nothing else
    can take it while the test runs (port 1 is not safe: a root process may bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
