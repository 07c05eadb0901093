"""The browser protocol end to end: real gateway, real simulator, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import codecs
import gc
import random
import re
import socket

import orjson
import pytest

from support.client import chat_body, read_stream
from support.servers import STREAMING_PROTOCOL
from tokenrelay.simulator import build_text


def expected_text(content: str, model: str = "sim-chat", **kw: object) -> str:
    return "".join(build_text(model, [{"role": "user", "content": content}], **kw))


async def test_chat_streams_the_whole_answer_with_numbered_events(gateway, http):
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("Hello")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"].startswith("no-cache")
        assert resp.headers["X-Accel-Buffering"] == "no"
        stream_id = resp.headers["X-Stream-Id"]
        assert len(stream_id) >= 22  # 128 random bits, base64url
        assert "Content-Encoding" not in resp.headers
        stream = await read_stream(resp)
    events = stream.events
    assert events[0].event == "start"
    assert events[0].data["stream_id"] == stream_id
    assert events[0].data["model"] == "sim-chat"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert len(stream.terminal) == 1 and events[-1].event == "done"
    done = events[-1].data
    assert done["state"] == "complete"
    assert done["finish_reason"] == "stop"
    assert done["usage"]["estimated"] is False and done["usage"]["completion_tokens"] > 0
    assert done["stats"]["ttft_ms"] is not None
    assert stream.text == expected_text("Hello")
    # Named events never carry "content" (the article's client would print them).
    assert all("content" not in e.data for e in events if e.event != "message")
    # LF framing only, one data line per event.
    assert b"\r" not in stream.raw


async def test_first_bytes_go_out_before_the_upstream_answers(gateway, http):
    body = chat_body("slow", sim={"first_token_delay_s": 30})
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream = await read_stream(resp, stop_after=1)
        assert stream.events[0].event == "start"
        await http.post(
            f"{gateway.base_url}/api/streams/{stream.events[0].data['stream_id']}/cancel"
        )


async def test_heartbeats_flow_while_waiting_for_the_first_token(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_HEARTBEAT_S="0.05") as gw:
        body = chat_body("think first", sim={"first_token_delay_s": 1.0})
        async with http.post(gw.base_url + "/api/chat", json=body) as resp:
            raw = b""
            async for chunk in resp.content.iter_any():
                raw += chunk
                if b'"content"' in raw:
                    break
    before_first_token = raw[: raw.index(b'"content"')]
    assert before_first_token.count(b": heartbeat\n\n") >= 2


def article_client(raw: bytes, chunk_size: int = 7) -> str:
    """The article's streamChat loop, line for line, over arbitrary network chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # TextDecoder with {stream: true}
    text = ""
    buffer = ""
    for i in range(0, len(raw), chunk_size):
        buffer += decoder.decode(raw[i : i + chunk_size])
        lines = buffer.split("\n\n")
        buffer = lines.pop()
        for line in lines:
            if line.startswith("event: done"):
                continue
            match = re.search(r"^data: (.+)$", line, re.MULTILINE)  # "." stops at line ends
            if match:
                try:
                    content = orjson.loads(match.group(1)).get("content")
                except orjson.JSONDecodeError:
                    continue
                if content:
                    text += content
    return text


async def test_the_articles_own_client_reads_the_stream(gateway, http):
    question = "Does the article's client work? \u2028 line separator and <b>tags</b>"
    async with http.post(gateway.base_url + "/api/chat", json=chat_body(question)) as resp:
        stream = await read_stream(resp)
    assert "\u2028".encode() not in stream.raw  # escaped, so a JS regex "." keeps it
    assert article_client(stream.raw) == stream.text == expected_text(question)


async def test_resume_after_disconnects_at_random_points_gives_the_exact_text(gateway, http):
    rng = random.Random(7)
    body = chat_body("resume me", sim={"tokens_per_s": 400})
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        first = await read_stream(resp, stop_after=rng.randint(2, 15))
    stream_id = first.events[0].data["stream_id"]
    events = list(first.events)
    while events[-1].event not in ("done", "error"):
        headers = {"Last-Event-ID": str(events[-1].id)}
        url = f"{gateway.base_url}/api/streams/{stream_id}/events"
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 200
            part = await read_stream(resp, stop_after=rng.randint(1, 40))
        assert part.events, "a resume must deliver what comes next"
        events.extend(part.events)
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.data["content"] for e in events if e.event == "message")
    assert text == expected_text("resume me")


async def test_resume_by_query_parameter_and_after_the_end(gateway, http):
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("replay")) as resp:
        full = await read_stream(resp)
    stream_id = full.events[0].data["stream_id"]
    url = f"{gateway.base_url}/api/streams/{stream_id}/events?last_event_id=3"
    async with http.get(url) as resp:
        replay = await read_stream(resp)
    assert [e.id for e in replay.events] == [e.id for e in full.events[3:]]
    async with http.get(f"{gateway.base_url}/api/streams/{stream_id}") as resp:
        info = await resp.json()
    assert info["finished"] is True and info["state"] == "complete"
    assert info["last_seq"] == full.last_id


async def test_two_subscribers_receive_identical_events(gateway, http):
    body = chat_body("two tabs", sim={"tokens_per_s": 300})
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream_id = resp.headers["X-Stream-Id"]
        url = f"{gateway.base_url}/api/streams/{stream_id}/events"
        async with http.get(url) as second:
            a, b = await asyncio.gather(read_stream(resp), read_stream(second))
    assert [(e.id, e.event, e.data) for e in a.events] == [
        (e.id, e.event, e.data) for e in b.events
    ]
    assert a.text == expected_text("two tabs")


async def test_unknown_stream_is_404_json(gateway, http):
    for path in ("", "/events"):
        async with http.get(f"{gateway.base_url}/api/streams/nope{path}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "stream_not_found"
    async with http.post(f"{gateway.base_url}/api/streams/nope/cancel") as resp:
        assert resp.status == 404


async def test_bad_last_event_id_is_400(gateway, http):
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("x")) as resp:
        stream = await read_stream(resp)
    url = f"{gateway.base_url}/api/streams/{stream.events[0].data['stream_id']}/events"
    async with http.get(url, headers={"Last-Event-ID": "abc"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_last_event_id"


async def test_stop_aborts_the_upstream_and_keeps_the_text(simulator, gateway, http):
    sim, _ = simulator
    body = chat_body("stop me", sim={"tokens_per_s": 50})
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream_id = resp.headers["X-Stream-Id"]
        before = await read_stream(resp, stop_after=4)
        async with http.post(f"{gateway.base_url}/api/streams/{stream_id}/cancel") as c:
            assert c.status == 202
            assert (await c.json())["cancelled"] is True
        rest = await read_stream(resp)
    await asyncio.wait_for(sim.wait_disconnected(1), 10)
    events = before.events + rest.events
    assert events[-1].event == "done" and events[-1].data["state"] == "cancelled"
    assert len([e for e in events if e.event in ("done", "error")]) == 1
    text = "".join(e.data["content"] for e in events if e.event == "message")
    assert expected_text("stop me").startswith(text) and text


async def test_stop_before_the_first_token(simulator, gateway, http):
    sim, _ = simulator
    body = chat_body("never mind", sim={"first_token_delay_s": 60})
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream_id = resp.headers["X-Stream-Id"]
        await sim.wait_for("active", 1)
        await http.post(f"{gateway.base_url}/api/streams/{stream_id}/cancel")
        stream = await read_stream(resp)
    await asyncio.wait_for(sim.wait_disconnected(1), 10)
    assert stream.events[-1].data["state"] == "cancelled"
    assert stream.text == ""


@pytest.mark.parametrize("http_protocol", [STREAMING_PROTOCOL, "httptools"])
async def test_abandoned_stream_is_cancelled_after_the_grace_period(
    simulator, gateway_factory, http, http_protocol
):
    # Under our protocol the disconnect arrives by callback; under plain httptools the
    # subscriber's own task waits for it in receive().
    sim, _ = simulator
    async with gateway_factory({"http": http_protocol}, TOKENRELAY_GRACE_S="0.2") as gw:
        body = chat_body("walk away", sim={"tokens_per_s": 20})
        async with http.post(gw.base_url + "/api/chat", json=body) as resp:
            stream_id = resp.headers["X-Stream-Id"]
            await read_stream(resp, stop_after=2)
        await asyncio.wait_for(sim.wait_disconnected(1), 10)
        async with http.get(f"{gw.base_url}/api/streams/{stream_id}/events") as resp:
            replay = await read_stream(resp)
        assert replay.events[-1].data["state"] == "cancelled"


async def test_reattaching_within_the_grace_period_keeps_the_answer(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_GRACE_S="30") as gw:
        body = chat_body("come back", sim={"tokens_per_s": 200})
        async with http.post(gw.base_url + "/api/chat", json=body) as resp:
            stream_id = resp.headers["X-Stream-Id"]
            first = await read_stream(resp, stop_after=3)
        url = f"{gw.base_url}/api/streams/{stream_id}/events"
        async with http.get(url, headers={"Last-Event-ID": str(first.last_id)}) as resp:
            rest = await read_stream(resp)
    assert rest.events[-1].data["state"] == "complete"
    assert first.text + rest.text == expected_text("come back")


async def test_a_client_that_stops_reading_slows_nobody(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_SEND_TIMEOUT_S="1") as gw:
        body = chat_body("big answer", sim={"tokens": 3000})
        async with http.post(gw.base_url + "/api/chat", json=body) as stalled:
            stream_id = stalled.headers["X-Stream-Id"]
            generation = gw.hub.generations[stream_id]
            # `stalled` is never read again; a second subscriber reads everything.
            url = f"{gw.base_url}/api/streams/{stream_id}/events"
            async with http.get(url) as reader:
                stream = await read_stream(reader)
            assert stream.events[-1].data["state"] == "complete"
            await asyncio.wait_for(generation.finished.wait(), 10)


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    gateway_factory, http
):
    """The write that finds the socket full suspends; the send deadline then drops the
    client (its response is cut, without a terminal event) instead of holding it."""
    async with gateway_factory(TOKENRELAY_SEND_TIMEOUT_S="0.5", server={"sndbuf": 8192}) as gw:
        host, port = gw.base_url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        body = orjson.dumps(chat_body("flood", "sim-fast", sim={"tokens": 100_000}))
        writer.write(
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        stream_id = re.search(rb"x-stream-id: (\S+)", head, re.I).group(1).decode()
        generation = gw.hub.generations[stream_id]
        await asyncio.wait_for(generation.finished.wait(), 30)
        # Not reading: the gateway's buffers fill, a write suspends, the deadline fires.
        for _ in range(200):
            if gw.hub.subscriber_count() == 0:
                break
            await asyncio.sleep(0.05)
        assert gw.hub.subscriber_count() == 0
        rest = await asyncio.wait_for(reader.read(), 30)  # now drain it: cut, not finished
        writer.close()
        assert b"event: done" not in rest and b"event: error" not in rest
        ids = [int(n) for n in re.findall(rb"^id: (\d+)$", rest, re.M)]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 1  # in order, no gap
        # The stream itself is whole for anyone who resumes.
        url = f"{gw.base_url}/api/streams/{stream_id}/events"
        async with http.get(url, headers={"Last-Event-ID": "1"}) as resp:
            stream = await read_stream(resp)
        assert stream.events[-1].data["state"] == "complete"


async def test_journal_bound_ends_the_stream_with_a_clear_error(gateway_factory, http):
    # A bound in bytes: the same text reaches it however the upstream's reads were cut
    # (a bound in events depends on how many reads the answer came in).
    async with gateway_factory(TOKENRELAY_JOURNAL_MAX_BYTES="4000") as gw:
        body = chat_body("long", sim={"tokens": 3000, "tokens_per_s": 3000})
        async with http.post(gw.base_url + "/api/chat", json=body) as resp:
            stream = await read_stream(resp)
    assert len(stream.terminal) == 1
    error = stream.events[-1]
    assert error.event == "error" and error.data["error"]["code"] == "journal_full"
    assert 0 < len(stream.text.encode()) < 4000


async def test_upstream_key_is_sent_but_never_shown(http):
    from support.gateway import running_gateway, serve_app
    from tokenrelay.simulator import SimulatorConfig, create_simulator

    secret = "sk-test-0123456789abcdef"
    sim = create_simulator(SimulatorConfig(speed=50, api_key=secret))
    async with (
        serve_app(sim, lifespan="off") as url,
        running_gateway(
            TOKENRELAY_UPSTREAM_URL=url + "/v1", TOKENRELAY_UPSTREAM_API_KEY=secret
        ) as gw,
    ):
        async with http.post(gw.base_url + "/api/chat", json=chat_body("key?")) as resp:
            stream = await read_stream(resp)
        assert sim.last_request_headers["authorization"] == f"Bearer {secret}"
        assert stream.events[-1].data["state"] == "complete"
        assert secret.encode() not in stream.raw
    async with (
        serve_app(sim, lifespan="off") as url,
        running_gateway(
            TOKENRELAY_UPSTREAM_URL=url + "/v1", TOKENRELAY_UPSTREAM_API_KEY="sk-wrong-key-999999"
        ) as gw,
    ):
        async with http.post(gw.base_url + "/api/chat", json=chat_body("key?")) as resp:
            stream = await read_stream(resp)
        error = stream.events[-1].data["error"]
        assert error["code"] == "upstream_rejected"
        assert b"sk-wrong-key-999999" not in stream.raw


async def test_bad_requests_get_clear_4xx_json(gateway, http):
    url = gateway.base_url + "/api/chat"
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[]", 400, "invalid_request"),
        (orjson.dumps({"messages": []}), 400, "invalid_messages"),
        (orjson.dumps({"messages": "hi"}), 400, "invalid_messages"),
        (orjson.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 400, "invalid_messages"),
        (orjson.dumps({"messages": [{"role": "user", "content": 5}]}), 400, "invalid_messages"),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "x"}], "model": 3}),
            400,
            "invalid_model",
        ),
        (
            orjson.dumps(
                {
                    "model": "sim-chat",
                    "messages": [{"role": "user", "content": "x"}],
                    "temperature": "hot",
                }
            ),
            400,
            "invalid_parameter",
        ),
        (
            orjson.dumps(
                {
                    "model": "sim-chat",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 10**9,
                }
            ),
            400,
            "invalid_parameter",
        ),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "a\x00b"}]}),
            400,
            "invalid_messages",
        ),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
        (b" " * 2_000_000, 413, "body_too_large"),
    ]
    for body, status, code in cases:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status, (body[:60], await r.text())
            error = (await r.json())["error"]
            assert error["code"] == code, (body[:60], error)
            assert error["message"]


async def test_unknown_model_with_a_configured_model_table(http):
    from support.gateway import running_gateway

    async with running_gateway() as gw:  # the built-in simulator's model table
        body = chat_body("x", model="gpt-99")
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
        async with http.get(gw.base_url + "/api/models") as r:
            models = (await r.json())["models"]
        assert {"sim-chat", "sim-fast", "sim-reasoner"} <= {m["id"] for m in models}
        assert all(m["simulated"] for m in models)


async def test_passthrough_gateway_lists_the_upstreams_models(gateway, http):
    """TOKENRELAY_UPSTREAM_URL alone: the model list comes from the upstream's /models."""
    async with http.get(gateway.base_url + "/api/models") as r:
        assert r.status == 200
        models = {m["id"]: m for m in (await r.json())["models"]}
    assert {"sim-chat", "sim-fast", "sim-reasoner"} <= set(models)
    assert not models["sim-chat"]["simulated"]  # a real upstream, as far as it knows


async def test_metrics_count_streams_tokens_and_resumes(gateway, http):
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("metrics")) as resp:
        stream = await read_stream(resp)
    url = f"{gateway.base_url}/api/streams/{stream.events[0].data['stream_id']}/events"
    async with http.get(url, headers={"Last-Event-ID": "2"}) as resp:
        await read_stream(resp)
    async with http.get(gateway.base_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    relayed = len(stream.events) - 2  # all but start and done
    assert f'tokenrelay_events_relayed_total{{model="sim-chat"}} {relayed}.0' in text
    assert 'tokenrelay_streams_total{model="sim-chat",state="complete"} 1.0' in text
    assert 'tokenrelay_ttft_seconds_count{model="sim-chat"} 1.0' in text
    assert "tokenrelay_resumes_total 1.0" in text
    gaps = re.search(r'tokenrelay_inter_token_seconds_count\{model="sim-chat"\} (\d+)', text)
    assert gaps and 0 < int(gaps.group(1)) < relayed  # one per read with tokens, but the first
    assert f'tokenrelay_inter_token_seconds_bucket{{le="+Inf",model="sim-chat"}} {gaps.group(1)}' \
        in text
    assert 'tokenrelay_inter_token_seconds_bucket{le="0.001",model="sim-chat"}' in text


async def _chunks(base_url: str, request: bytes) -> list[bytes]:
    """The HTTP chunks of one chunked response, in order, as the server framed them."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return chunks
            chunks.append(data[:-2])
    finally:
        writer.close()


async def test_the_opening_comment_and_what_the_journal_holds_share_one_chunk(gateway, http):
    # One write (one chunk) where there were two: the comment and the start event; and a
    # finished stream replayed is its comment and all its frames in one.
    body = orjson.dumps(chat_body("one write", sim={"first_token_delay_s": 30}))
    host, port = gateway.base_url.removeprefix("http://").split(":")
    request = (b"POST /api/chat HTTP/1.1\r\nHost: %b:%b\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\nconnection: close\r\n\r\n%b"
               % (host.encode(), port.encode(), len(body), body))
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"x-stream-id: (\S+)", head)
        assert found is not None, head
        stream_id = found.group(1).decode()
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        first = (await reader.readexactly(size + 2))[:-2]
        assert first.startswith(b": stream " + stream_id.encode() + b"\n\n")
        assert b"event: start\n" in first
        generation = gateway.hub.generations[stream_id]
        await http.post(f"{gateway.base_url}/api/streams/{stream_id}/cancel")
        await generation.finished.wait()
    finally:
        writer.close()
    replay = await _chunks(gateway.base_url, (
        f"GET /api/streams/{stream_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "connection: close\r\n\r\n").encode())
    assert len(replay) == 1
    assert replay[0].startswith(b": stream ") and replay[0].count(b"\nid: ") >= 1
    assert b"event: start\n" in replay[0] and b"event: done\n" in replay[0]


async def test_a_finished_request_leaves_no_cycle_and_no_task_behind(gateway, http):
    # Each short answer used to leave ~30 objects in reference cycles (the scope held the
    # Deferred, whose send is bound to the request cycle that holds the scope) and its
    # send loop's task on the timer wheel for the send timeout: more garbage collections
    # under load, each with more survivors (bench/setup_cost.py).
    from tokenrelay.protocol import RequestResponseCycle
    from tokenrelay.subscriber import SubscriberResponse, _SendDeadline

    async def answer() -> None:
        async with http.post(gateway.base_url + "/api/chat",
                             json=chat_body("no cycles", model="sim-fast")) as resp:
            stream = await read_stream(resp)
        assert stream.events[-1].event == "done"

    await answer()  # first-use objects (caches, pools) out of the way
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            await answer()
        # Ended means the server's task is done too, not only the client's read.
        serving = [t for t in asyncio.all_tasks() if "run_asgi" in repr(t)]
        if serving:
            await asyncio.wait(serving)
        gc.collect()
        in_cycles = [type(o) for o in gc.garbage
                     if type(o) in (RequestResponseCycle, SubscriberResponse)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert in_cycles == []
    assert [o for o in gc.get_objects() if type(o) is _SendDeadline] == []
