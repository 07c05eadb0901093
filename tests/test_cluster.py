"""Several real ``tokenrelay serve`` processes sharing Redis and PostgreSQL, and nginx.

The module starts two instances (A and B) as subprocesses on free loopback ports, with a
random Redis key prefix and a private PostgreSQL database, in front of a simulator that
runs in the tests' event loop (one loop for the module), so a test can see when an
upstream request ends. The kill test starts a third instance to kill. Instances
heartbeat every 0.5 s and hold 1 s leases, so a dead instance is noticed within about a
second. The nginx tests run ``deploy/nginx.conf`` itself, ports and paths rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
import pytest_asyncio

from support.client import chat_body, read_stream
from support.gateway import serve_app
from support.nginx import NGINX, prepare
from support.processes import TOKENRELAY, Instance, Launcher, free_port
from support.redis_server import RedisServer, delete_prefix
from tokenrelay.simulator import Simulator, SimulatorConfig, build_text, create_simulator

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "test"}
LEASE_S = 1.0
HEARTBEAT_S = 0.5


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(**PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# One worker runs the whole module (make test: -n 2 --dist loadgroup), so the instances
# start once.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("cluster")]
module_fixture = pytest_asyncio.fixture(scope="module", loop_scope="module")


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A private PostgreSQL database for this module, dropped at the end."""
    name = f"tokenrelay_cluster_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@module_fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A random key prefix on the shared Redis; its keys (only) are deleted afterwards."""
    prefix = f"trcluster:{secrets.token_hex(6)}:"
    yield prefix
    await delete_prefix(REDIS_URL, prefix)


@module_fixture
async def sim() -> AsyncIterator[tuple[Simulator, str]]:
    """The upstream of every instance; requests set their own pace (``"sim"`` field)."""
    simulator = create_simulator(SimulatorConfig())
    async with serve_app(simulator, lifespan="off") as url:
        yield simulator, url + "/v1"


@module_fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@module_fixture
async def launcher(
    sim: tuple[Simulator, str],
    pg_database: str,
    redis_prefix: str,
    client: aiohttp.ClientSession,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Launcher]:
    _, upstream = sim
    env = {
        **os.environ,
        "TOKENRELAY_UPSTREAM_URL": upstream,
        "TOKENRELAY_REDIS_URL": REDIS_URL,
        "TOKENRELAY_REDIS_PREFIX": redis_prefix,
        "TOKENRELAY_LEASE_S": str(LEASE_S),
        "TOKENRELAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{pg_database}",
        "TOKENRELAY_HEARTBEAT_S": str(HEARTBEAT_S),
        "TOKENRELAY_CHECKPOINT_S": "0.2",
        "TOKENRELAY_GRACE_S": "30",
        "TOKENRELAY_LOG_LEVEL": "warning",
    }
    launch = Launcher(env, tmp_path_factory.mktemp("cluster"), client)
    try:
        yield launch
    finally:
        await launch.aclose()


@module_fixture
async def cluster(launcher: Launcher) -> tuple[Instance, Instance]:
    """Instances A and B, for the whole module."""
    a, b = await launcher.start("A", "B")
    return a, b


async def start_chat(
    http: aiohttp.ClientSession, base_url: str, *, tokens: int, tokens_per_s: float, **sim: Any
) -> aiohttp.ClientResponse:
    body = chat_body("Explain server-sent events", model="sim-chat")
    body["sim"] = {"tokens": tokens, "tokens_per_s": tokens_per_s, **sim}
    resp = await http.post(base_url + "/api/chat", json=body)
    assert resp.status == 200, await resp.text()
    return resp


async def stored_answer(
    http: aiohttp.ClientSession, base_url: str, conversation_id: str
) -> dict[str, Any]:
    async with http.get(f"{base_url}/api/conversations/{conversation_id}") as got:
        assert got.status == 200, await got.text()
        answer: dict[str, Any] = (await got.json())["messages"][-1]
    assert answer["role"] == "assistant"
    return answer


async def test_resume_on_another_instance_gives_the_exact_text(
    cluster: tuple[Instance, Instance], client: aiohttp.ClientSession
) -> None:
    a, b = cluster
    resp = await start_chat(client, a.url, tokens=60, tokens_per_s=60)
    stream_id = resp.headers["x-stream-id"]
    first = await read_stream(resp, stop_after=6)  # start + 5 text events, then "reload"
    resp.close()
    assert first.events[0].event == "start"
    assert first.text and not first.terminal

    async with client.get(
        f"{b.url}/api/streams/{stream_id}/events",
        headers={"Last-Event-ID": str(first.last_id)},
    ) as resumed:
        assert resumed.status == 200
        rest = await read_stream(resumed)
    assert [t.event for t in rest.terminal] == ["done"]
    ids = [e.id for e in first.events + rest.events]
    assert ids == list(range(1, len(ids) + 1))  # exactly once, in order

    # The whole answer, replayed from the journal through A, is the same text.
    async with client.get(f"{a.url}/api/streams/{stream_id}/events") as replay:
        whole = await read_stream(replay)
    assert first.text + rest.text == whole.text
    assert len(whole.text) > len(first.text) > 0

    # Stored once, complete, in the shared database (read through B).
    answer = await stored_answer(client, b.url, whole.events[0].data["conversation_id"])
    assert (answer["state"], answer["content"]) == ("complete", whole.text)


async def test_cancel_from_another_instance_stops_the_upstream(
    cluster: tuple[Instance, Instance],
    client: aiohttp.ClientSession,
    sim: tuple[Simulator, str],
) -> None:
    simulator, _ = sim
    a, b = cluster
    disconnected = simulator.stats.disconnected
    resp = await start_chat(client, a.url, tokens=5000, tokens_per_s=50)  # 100 s unless stopped
    stream_id = resp.headers["x-stream-id"]
    head = await read_stream(resp, stop_after=3)
    assert head.text

    async with client.post(f"{b.url}/api/streams/{stream_id}/cancel") as cancelled:
        assert cancelled.status == 202
        assert (await cancelled.json())["cancelled"] is True
    tail = await asyncio.wait_for(read_stream(resp), 20)
    resp.close()
    assert [t.event for t in tail.terminal] == ["done"]
    assert tail.terminal[0].data["state"] == "cancelled"
    # A aborted its upstream request: the simulator saw its client go away.
    await asyncio.wait_for(simulator.wait_for("disconnected", disconnected + 1), 20)


async def test_killed_instance_ends_followers_elsewhere_as_interrupted(
    cluster: tuple[Instance, Instance], launcher: Launcher, client: aiohttp.ClientSession
) -> None:
    _, b = cluster
    # Checkpoints a minute apart: whatever history keeps can only come from the journal.
    (victim,) = await launcher.start("C", TOKENRELAY_CHECKPOINT_S="60")
    resp = await start_chat(client, victim.url, tokens=5000, tokens_per_s=50)
    stream_id = resp.headers["x-stream-id"]
    head = await read_stream(resp, stop_after=1)
    conversation_id = head.events[0].data["conversation_id"]

    async with client.get(f"{b.url}/api/streams/{stream_id}/events") as follower:
        seen = await read_stream(follower, stop_after=30)
        assert seen.text
        assert (await stored_answer(client, b.url, conversation_id))["content"] == ""
        await victim.kill()  # kill -9, mid-answer
        rest = await asyncio.wait_for(read_stream(follower), 10 * LEASE_S)
    resp.close()
    assert [t.event for t in rest.terminal] == ["error"]
    error = rest.terminal[0].data
    assert (error["error"]["code"], error["state"]) == ("interrupted", "interrupted")
    received = seen.text + rest.text

    # The partial answer is in the database, marked interrupted by the instance that
    # ended the stream, with exactly the text its followers saw (issue 15): rebuilt from
    # the journal, not left at the dead owner's last checkpoint.
    # (The mark follows the terminal frame, so the follower may see the frame first.)
    for _ in range(200):
        answer = await stored_answer(client, b.url, conversation_id)
        if answer["state"] != "streaming":
            break
        await asyncio.sleep(0.05)
    assert answer["state"] == "interrupted"
    assert received.startswith(seen.text) and answer["content"] == received


async def test_workers_share_streams_through_the_journal(
    launcher: Launcher, client: aiohttp.ClientSession, sim: tuple[Simulator, str]
) -> None:
    """``serve --workers 2``: one port, two processes; any worker resumes or stops any
    stream, whichever of them accepted the request that started it."""
    simulator, _ = sim
    (instance,) = await launcher.start("W", args=("--workers", "2"),
                                       unset=("TOKENRELAY_INSTANCE_ID",),
                                       TOKENRELAY_LOG_LEVEL="info")  # logs worker starts
    fresh = aiohttp.TCPConnector(force_close=True)  # every request on a new connection
    async with aiohttp.ClientSession(connector=fresh) as http:
        starts = await asyncio.gather(*(
            start_chat(http, instance.url, tokens=40, tokens_per_s=80) for _ in range(8)
        ))
        heads = [await read_stream(resp, stop_after=3) for resp in starts]
        for resp in starts:
            resp.close()
        owners = {head.events[0].data["stream_id"]: head for head in heads}
        for stream_id, head in owners.items():
            url = f"{instance.url}/api/streams/{stream_id}/events"
            async with http.get(url, headers={"Last-Event-ID": str(head.last_id)}) as resp:
                rest = await read_stream(resp)
            assert [t.event for t in rest.terminal] == ["done"]
            ids = [e.id for e in head.events + rest.events]
            assert ids == list(range(1, len(ids) + 1))
        # Stops, each on a new connection: the worker that takes it stops the stream
        # directly when it owns it, else through the journal's cancel channel.
        disconnected = simulator.stats.disconnected
        long = [await start_chat(http, instance.url, tokens=5000, tokens_per_s=50)
                for _ in range(4)]
        for resp in long:
            await read_stream(resp, stop_after=2)
            async with http.post(
                f"{instance.url}/api/streams/{resp.headers['x-stream-id']}/cancel"
            ) as cancelled:
                assert (await cancelled.json())["cancelled"] is True
        for resp in long:
            tail = await asyncio.wait_for(read_stream(resp), 20)
            resp.close()
            assert tail.terminal[0].data["state"] == "cancelled"
        await asyncio.wait_for(simulator.wait_for("disconnected", disconnected + 4), 20)
    workers = {line for line in instance.log.read_text().splitlines()
               if "Started server process" in line}
    assert len(workers) == 2, instance.log.read_text()[-2000:]
    await instance.stop()


async def test_workers_refuse_a_memory_journal_or_a_shared_instance_id(
    launcher: Launcher, tmp_path: Path
) -> None:
    for env, unset, message in (
        ({}, ("TOKENRELAY_REDIS_URL",), "needs a shared journal"),
        ({"TOKENRELAY_INSTANCE_ID": "same"}, (), "unset TOKENRELAY_INSTANCE_ID"),
    ):
        proc = await asyncio.create_subprocess_exec(
            str(TOKENRELAY), "serve", "--port", str(free_port()), "--workers", "2",
            env={k: v for k, v in {**launcher.env, **env}.items() if k not in unset},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2 and message in err.decode(), err


async def test_redis_down_gives_503_then_recovers(
    launcher: Launcher, client: aiohttp.ClientSession
) -> None:
    redis = RedisServer(free_port())
    redis.start()
    try:
        (instance,) = await launcher.start(
            "D", TOKENRELAY_REDIS_URL=redis.url, TOKENRELAY_LEASE_S="1"
        )
        resp = await start_chat(client, instance.url, tokens=3, tokens_per_s=100)
        assert [t.event for t in (await read_stream(resp)).terminal] == ["done"]
        resp.close()

        redis.stop()
        body = chat_body("Are you there?")
        async with client.post(instance.url + "/api/chat", json=body) as refused:
            assert refused.status == 503
            error = (await refused.json())["error"]
        assert (error["code"], error["retryable"]) == ("service_unavailable", True)

        redis.start()  # empty: nothing was saved
        for _ in range(200):
            resp = await client.post(instance.url + "/api/chat", json=body)
            if resp.status == 200:
                break
            resp.close()
            await asyncio.sleep(0.05)
        stream = await read_stream(resp)
        resp.close()
        assert [t.event for t in stream.terminal] == ["done"]
        assert stream.text
        await instance.stop()
    finally:
        redis.stop()


# -- nginx in front of two instances ---------------------------------------------------------



def nginx_config(template: str, *, port: int, upstreams: list[int]) -> str:
    """``deploy/nginx.conf`` with test ports and a 2 s read timeout (support.nginx.prepare
    then moves its paths under a prefix)."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstreams)
    conf, n = re.subn(
        r"(upstream tokenrelay \{\n)(.*?)(\s*keepalive)",
        lambda m: m.group(1) + "        least_conn;\n" + servers + m.group(3),
        template,
        flags=re.S,
    )
    assert n == 1
    conf, n = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", conf)
    assert n == 1
    conf, n = re.subn(r"proxy_read_timeout \d+s;", "proxy_read_timeout 2s;", conf)
    assert n == 1
    return conf


@pytest_asyncio.fixture(loop_scope="module")
async def nginx(
    cluster: tuple[Instance, Instance], client: aiohttp.ClientSession
) -> AsyncIterator[str]:
    """nginx on a free loopback port in front of A and B; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-nginx-") as tmp:
        port = free_port()
        template = (ROOT / "deploy" / "nginx.conf").read_text()
        conf = nginx_config(template, port=port, upstreams=[i.port for i in cluster])
        path = prepare(Path(tmp), conf)
        proc = await asyncio.create_subprocess_exec(
            NGINX,
            "-p",
            tmp,
            "-c",
            str(path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                if proc.returncode is not None:
                    assert proc.stderr is not None
                    raise RuntimeError(f"nginx exited: {(await proc.stderr.read()).decode()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with client.get(base_url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("nginx did not answer")
            yield base_url
        finally:
            proc.terminate()  # fast shutdown: the tests have closed their streams
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_nginx_relays_tokens_as_they_arrive(
    nginx: str, cluster: tuple[Instance, Instance], client: aiohttp.ClientSession
) -> None:
    _, b = cluster
    resp = await start_chat(client, nginx, tokens=40, tokens_per_s=20)
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in resp.headers
    stream_id = resp.headers["x-stream-id"]
    chunks: list[bytes] = []
    finished_at_first_text: bool | None = None
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        if finished_at_first_text is None and b'"content"' in chunk:
            async with client.get(f"{b.url}/api/streams/{stream_id}") as info:
                finished_at_first_text = (await info.json())["finished"]
        if b"event: done" in chunk:
            break
    resp.close()
    # The first text reached the client while the answer was still being generated...
    assert finished_at_first_text is False
    # ...and the text came in many separate reads, not in one block at the end.
    assert sum(1 for c in chunks if b'"content"' in c) >= 5
    assert b"event: done" in b"".join(chunks)


async def test_nginx_keeps_a_slow_first_token_alive_with_heartbeats(
    nginx: str, client: aiohttp.ClientSession
) -> None:
    # A silent upstream for 4 s: twice nginx's proxy_read_timeout (2 s) in this test.
    resp = await start_chat(client, nginx, tokens=5, tokens_per_s=50, first_token_delay_s=4.0)
    stream = await asyncio.wait_for(read_stream(resp), 30)
    resp.close()
    assert [t.event for t in stream.terminal] == ["done"]
    assert stream.terminal[0].data["state"] == "complete"
    assert stream.text
    assert stream.raw.count(b": heartbeat") >= 4  # 0.5 s heartbeats over a 4 s silence


def _sdk(instance: Instance) -> Any:
    return openai.AsyncOpenAI(base_url=instance.url + "/v1", api_key="unused", max_retries=0)


async def test_background_response_resumes_on_another_instance(
    cluster: tuple[Instance, Instance]
) -> None:
    a, b = cluster
    on_a, on_b = _sdk(a), _sdk(b)
    stream = await on_a.responses.create(
        model="sim-chat", input="Explain SSE", stream=True, background=True,
        extra_body={"sim": {"tokens": 60, "tokens_per_s": 60}})
    before = []
    async for event in stream:
        before.append(event)
        if len(before) >= 8:
            break
    await stream.close()  # dropped: the answer goes on in A's journal (Redis)
    response_id = before[0].response.id

    resumed = await on_b.responses.retrieve(response_id, stream=True,
                                            starting_after=before[-1].sequence_number)
    after = [event async for event in resumed]
    numbers = [e.sequence_number for e in before + after]
    assert numbers == list(range(len(numbers)))  # exactly once, across instances
    assert after[-1].type == "response.completed"
    text = "".join(e.delta for e in before + after if e.type == "response.output_text.delta")
    expected = "".join(build_text("sim-chat", [{"role": "user", "content": "Explain SSE"}],
                                  length=60))
    assert text == expected
    got = await on_b.responses.retrieve(response_id)
    assert (got.status, got.output_text) == ("completed", expected)

    await on_b.responses.delete(response_id)
    with pytest.raises(openai.NotFoundError) as gone:
        await on_a.responses.retrieve(response_id)
    assert gone.value.body["type"] == "not_found_error"
    await on_a.close()
    await on_b.close()


async def test_background_response_cancelled_from_another_instance(
    cluster: tuple[Instance, Instance], sim: tuple[Simulator, str]
) -> None:
    simulator, _ = sim
    a, b = cluster
    on_a, on_b = _sdk(a), _sdk(b)
    disconnected = simulator.stats.disconnected
    created = await on_a.responses.create(
        model="sim-chat", input="Explain SSE", background=True,
        extra_body={"sim": {"tokens": 5000, "tokens_per_s": 50}})  # 100 s unless stopped
    follow = await on_b.responses.retrieve(created.id, stream=True)
    async for event in follow:
        if event.type == "response.output_text.delta":
            break
    cancelled = await on_b.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.output_text
    await asyncio.wait_for(simulator.wait_for("disconnected", disconnected + 1), 20)
    assert (await on_a.responses.retrieve(created.id)).status == "cancelled"
    await follow.close()
    await on_a.close()
    await on_b.close()
