"""Graceful shutdown of a real ``tokenrelay serve`` process on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import uvicorn

from support.client import chat_body, read_stream
from support.gateway import serve_app
from support.processes import Launcher
from tokenrelay.simulator import SimulatorConfig, create_simulator


@contextlib.asynccontextmanager
async def _upstream(kind: str) -> AsyncIterator[dict[str, str]]:
    """The upstream part of the environment: an external simulator, or none at all."""
    if kind == "built-in simulator":
        yield {}  # the default configuration: the simulator runs inside the gateway
        return
    async with serve_app(create_simulator(SimulatorConfig()), lifespan="off") as url:
        yield {"TOKENRELAY_UPSTREAM_URL": url + "/v1"}


def test_the_in_loop_server_hook_that_keeps_signals_for_the_gateway_exists():
    # tokenrelay.server.InLoopServer overrides it so that the built-in simulator's server
    # leaves SIGTERM to the gateway; a uvicorn that renamed it would break the drain.
    assert callable(getattr(uvicorn.Server, "capture_signals", None)), (
        f"uvicorn {uvicorn.__version__} has no Server.capture_signals"
    )


@pytest.mark.parametrize("upstream", ["external simulator", "built-in simulator"])
async def test_sigterm_drains_then_interrupts_and_stores_the_partial_text(
    tmp_path: Path, http: aiohttp.ClientSession, upstream: str
):
    async with _upstream(upstream) as upstream_env:
        env = {
            "PATH": "/usr/bin:/bin",
            **upstream_env,
            "TOKENRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "TOKENRELAY_DRAIN_S": "1",
            "TOKENRELAY_HEARTBEAT_S": "0.2",
        }
        launcher = Launcher(env, tmp_path, http)
        (gw,) = await launcher.start("gw")
        try:
            quick = chat_body("quick", sim={"tokens": 5, "tokens_per_s": 20})
            slow = chat_body("slow", sim={"tokens": 1000, "tokens_per_s": 20})
            async with http.post(gw.url + "/api/chat", json=quick) as finishing, http.post(
                gw.url + "/api/chat", json=slow
            ) as cut:
                head = await read_stream(cut, stop_after=3)
                gw.proc.send_signal(signal.SIGTERM)
                # A new stream is refused while draining (or the port is already closed).
                try:
                    async with http.post(gw.url + "/api/chat", json=quick) as refused:
                        assert refused.status == 503
                        assert (await refused.json())["error"]["code"] == "service_unavailable"
                except aiohttp.ClientConnectionError:
                    pass
                done = await read_stream(finishing)
                rest = await read_stream(cut)
            assert done.events[-1].event == "done"
            assert done.events[-1].data["state"] == "complete"  # finished within the drain
            end = rest.events[-1]
            assert end.event == "error" and end.data["state"] == "interrupted"
            assert end.data["error"]["code"] == "interrupted"
            partial = head.text + rest.text
            assert partial
            conversation = head.events[0].data["conversation_id"]
            # uvicorn re-raises the signal once it has shut down cleanly
            assert await asyncio.wait_for(gw.proc.wait(), 15) in (0, -signal.SIGTERM)
        finally:
            await launcher.aclose()
        # The history of the stopped instance holds the partial answer as interrupted.
        (again,) = await launcher.start("again")
        try:
            async with http.get(f"{again.url}/api/conversations/{conversation}") as r:
                message = (await r.json())["messages"][-1]
            assert message["state"] == "interrupted"
            assert message["content"] == partial
        finally:
            await launcher.aclose()
