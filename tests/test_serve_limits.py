"""The real ``tokenrelay serve`` command, one process and ``--workers 2``: every worker
reads the head limits and the Host allow-list from the settings (issue 16, points 2-3)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest

from support.processes import Launcher
from support.redis_server import delete_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"
HEADER_TIMEOUT_S = 1.0


@pytest.fixture
async def launcher(tmp_path, http) -> AsyncIterator[Launcher]:
    prefix = f"trlimits:{secrets.token_hex(6)}:"
    env = {
        "PATH": "/usr/bin:/bin",
        "TOKENRELAY_DATABASE_URL": "none",
        "TOKENRELAY_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "TOKENRELAY_MAX_HEADERS": "50",
        "TOKENRELAY_REDIS_URL": REDIS_URL,
        "TOKENRELAY_REDIS_PREFIX": prefix,
        "TOKENRELAY_LOG_LEVEL": "warning",
    }
    launch = Launcher(env, tmp_path, http)
    try:
        yield launch
    finally:
        await launch.aclose()
        await delete_prefix(REDIS_URL, prefix)


async def _slow_head(port: int) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    loop = asyncio.get_running_loop()
    started = loop.time()
    data = b""
    with contextlib.suppress(ConnectionError):
        data = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S + 5)
    writer.close()
    return data, loop.time() - started


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_bounds_heads_and_checks_hosts_in_every_worker(launcher, workers):
    unset = ("TOKENRELAY_INSTANCE_ID",) if workers != "1" else ()
    (instance,) = await launcher.start("L", args=("--workers", workers), unset=unset)
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection: any worker may take it
    async with aiohttp.ClientSession(connector=fresh) as http:
        for _ in range(6):
            async with http.get(instance.url + "/api/models",
                                headers={f"X-H{i}": "v" for i in range(60)}) as r:
                assert r.status == 431
                assert (await r.json())["error"]["code"] == "too_many_headers"
            async with http.get(instance.url + "/api/models",
                                headers={"Host": "rebound.example"}) as r:
                assert r.status == 421
            async with http.get(instance.url + "/api/models") as r:
                assert r.status == 200
    results = await asyncio.gather(*(_slow_head(instance.port) for _ in range(6)))
    for data, elapsed in results:
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert elapsed < HEADER_TIMEOUT_S + 2
