"""Security over real HTTP: tenant isolation, hostile input, SSE injection, secrets, fuzz.

Every test runs a real gateway on 127.0.0.1 in front of the simulator or a scripted
upstream; nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, ok, refuse, status
from support.gateway import running_gateway, serve_app
from tokenrelay.simulator import SimulatorConfig, build_text, create_simulator
from tokenrelay.sse import SSEDecoder

KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789"
ALICE = {"Authorization": "Bearer alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-0123456789"}
JSON = {"Content-Type": "application/json"}
EVENT_NAMES = {"message", "start", "reasoning", "tool_call", "retry", "done", "error"}


# -- tenant isolation --------------------------------------------------------------------


async def test_streams_are_invisible_to_other_keys(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS, TOKENRELAY_GRACE_S="30") as gw:
        body = chat_body("mine", sim={"tokens_per_s": 100, "tokens": 40})
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            stream_id = r.headers["X-Stream-Id"]
            first = await read_stream(r, stop_after=2)
            base = f"{gw.base_url}/api/streams/{stream_id}"
            probes = [("GET", base), ("GET", base + "/events"), ("POST", base + "/cancel"),
                      ("GET", base + "/events?last_event_id=0")]
            for method, url in probes:
                async with http.request(method, url, headers=BOB) as other:
                    assert other.status == 404, (method, url)
                    error = (await other.json())["error"]
                    assert error["code"] == "stream_not_found"
                # exactly what an unknown id gets, so ids cannot be probed
                unknown = url.replace(stream_id, "x" * len(stream_id))
                async with http.request(method, unknown, headers=BOB) as miss:
                    assert miss.status == 404
                    assert (await miss.json())["error"] == error
            rest = await read_stream(r)  # bob's cancel did not stop alice's answer
        assert rest.events[-1].data["state"] == "complete"
        assert first.text + rest.text == "".join(
            build_text("sim-chat", body["messages"], length=40))
        async with http.get(base, headers=ALICE) as mine:
            assert mine.status == 200 and (await mine.json())["state"] == "complete"
        async with http.get(base + "/events", headers=ALICE) as mine:
            assert (await read_stream(mine)).events[-1].data["state"] == "complete"


async def test_the_local_user_and_a_key_are_different_tenants(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        owners = {k.owner for k in gw.settings.api_keys}
        assert owners == {"key:alice", "key:bob"} and "local" not in owners
        body = chat_body("who", sim={"tokens": 3})
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            stream_id = r.headers["X-Stream-Id"]
            await read_stream(r)
        info = await gw.hub.journal.info(stream_id)
        assert info.meta["owner"] == "key:alice"
        assert "alice-key" not in orjson.dumps(info.meta).decode()  # the key is not stored


async def test_an_idempotency_key_is_scoped_to_its_tenant(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        body = chat_body("same key", sim={"tokens": 3})
        idem = {"Idempotency-Key": "shared-key-1"}
        async with http.post(gw.base_url + "/api/chat", json=body,
                             headers={**ALICE, **idem}) as r:
            alice_stream = r.headers["X-Stream-Id"]
            await read_stream(r)
        async with http.post(gw.base_url + "/api/chat", json=body,
                             headers={**BOB, **idem}) as r:
            assert r.status == 200
            assert r.headers["X-Stream-Id"] != alice_stream
            assert "Idempotent-Replayed" not in r.headers
            await read_stream(r)


async def test_conversations_are_invisible_to_other_keys(gateway_factory, http, tmp_path):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS,
                               TOKENRELAY_DATABASE_URL=f"sqlite:///{tmp_path / 'c.db'}") as gw:
        body = chat_body("private", sim={"tokens": 3})
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            conversation_id = r.headers["X-Conversation-Id"]
            await read_stream(r)
        url = f"{gw.base_url}/api/conversations/{conversation_id}"
        for method, payload in (("GET", None), ("PATCH", {"title": "mine now"}),
                                ("DELETE", None)):
            async with http.request(method, url, json=payload, headers=BOB) as other:
                assert other.status == 404, method
        async with http.get(gw.base_url + "/api/conversations", headers=BOB) as other:
            assert conversation_id not in await other.text()
        cont = {**body, "conversation_id": conversation_id}
        async with http.post(gw.base_url + "/api/chat", json=cont, headers=BOB) as other:
            assert other.status == 404
        async with http.get(url, headers=ALICE) as mine:
            assert mine.status == 200


# -- bad requests ------------------------------------------------------------------------

MSG = [{"role": "user", "content": "x"}]


def _body(**fields: object) -> bytes:
    return orjson.dumps({"model": "sim-chat", "messages": MSG, **fields})


# Beyond tests/test_gateway.py::test_bad_requests_get_clear_4xx_json: (body, status, code).
BAD_BODIES = [
    (b"null", 400, "invalid_request"),
    (b'"a string"', 400, "invalid_request"),
    (b"123", 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "x"}]', 400, "invalid_json"),
    (b'{"messages": [], "messages": []}', 400, "invalid_messages"),
    (b"\xff\xfe{}", 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_json"),
    (orjson.dumps({}), 400, "invalid_messages"),
    (orjson.dumps({"messages": None}), 400, "invalid_messages"),
    (orjson.dumps({"messages": {"role": "user"}}), 400, "invalid_messages"),
    (orjson.dumps({"messages": ["hello"]}), 400, "invalid_messages"),
    (orjson.dumps({"messages": [{"content": "no role"}]}), 400, "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user"}]}), 400, "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "USER", "content": "x"}]}), 400, "invalid_messages"),
    (orjson.dumps({"messages": [{"role": ["user"], "content": "x"}]}), 400,
     "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}), 400,
     "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": {"nested": [[[]]]}}]}), 400,
     "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": "x", "name": 5}]}), 400,
     "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": "x\u0000"}]}), 400,
     "invalid_messages"),
    (orjson.dumps({"messages": [{"role": "user", "content": "x" * 200_001}]}), 400,
     "message_too_long"),
    (orjson.dumps({"messages": MSG * 501}), 400, "too_many_messages"),
    (_body(model=""), 400, None),  # empty model: the default one, or invalid
    (_body(model=None), 400, None),
    (_body(model="m" * 201), 400, "invalid_model"),
    (_body(model=["sim-chat"]), 400, "invalid_model"),
    (_body(model="gpt-\u0000"), 404, "model_not_found"),
    (_body(model="no-such-model\r\nX-Injected: 1"), 404, "model_not_found"),
    (_body(stream="yes"), 400, "invalid_parameter"),
    (_body(n=2), 400, "invalid_parameter"),
    (_body(n=True), 400, "invalid_parameter"),
    (_body(max_tokens=0), 400, "invalid_parameter"),
    (_body(max_tokens=-1), 400, "invalid_parameter"),
    (_body(max_tokens=1.5), 400, "invalid_parameter"),
    (_body(max_tokens=True), 400, "invalid_parameter"),
    (_body(max_completion_tokens=10**12), 400, "invalid_parameter"),
    (_body(temperature=[1]), 400, "invalid_parameter"),
    (_body(stop=5), 400, "invalid_parameter"),
    (_body(stream_options="yes"), 400, "invalid_parameter"),
    (_body(conversation_id=""), 400, "invalid_parameter"),
    (_body(conversation_id=7), 400, "invalid_parameter"),
    (_body(conversation_id="c" * 101), 400, "invalid_parameter"),
    (b'{"messages":' + b"[" * 1100 + b"]" * 1100 + b"}", 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "metadata": '
     + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}", 400, "invalid_json"),
]


@pytest.fixture
async def model_table_gateway():
    """A gateway with a model table (the built-in simulator): unknown models are 404."""
    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        yield gw


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_bad_request_corpus_gets_documented_4xx_json(model_table_gateway, http, path):
    gateway = model_table_gateway
    url = gateway.base_url + path
    for body, expected_status, code in BAD_BODIES:
        if path.startswith("/v1") and b"conversation_id" in body:
            continue  # not an OpenAI field: forwarded to the upstream unchecked
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if expected_status == 400 and code is None:  # a model default may apply
                if r.status == 200:
                    await r.read()
                    continue
            assert r.status == expected_status, (body[:80], await r.text())
            assert r.headers["Content-Type"].startswith("application/json")
            error = (await r.json())["error"]
            if code is not None:
                assert error["code"] == code, (body[:80], error)
            if path.startswith("/v1"):  # OpenAI's shape
                assert error["message"] and error["type"].endswith("_error")
            else:
                assert error["message"] and error["retryable"] is False
            assert "X-Injected" not in r.headers
    assert not gateway.hub.generations  # nothing started upstream


def _parts(*parts: object) -> list[dict]:
    return [{"role": "system", "content": "s"}, {"role": "user", "content": list(parts)}]


# (content parts of messages[1], the path the error must name)
BAD_PARTS = [
    ([{"type": "text"}], "messages[1].content[0].text"),
    ([{"type": "text", "text": "ok"}, {"type": "text", "text": None}],
     "messages[1].content[1].text"),
    ([{"type": "text", "text": ["a"]}], "messages[1].content[0].text"),
    ([{"type": "image_url"}], "messages[1].content[0].image_url"),
    ([{"type": "image_url", "image_url": "http://x/y.png"}], "messages[1].content[0].image_url"),
    ([{"type": "image_url", "image_url": {"detail": "low"}}],
     "messages[1].content[0].image_url.url"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA"}}],
     "messages[1].content[0].input_audio.format"),
    ([{"type": "input_audio", "input_audio": {"format": "wav"}}],
     "messages[1].content[0].input_audio.data"),
    ([{"type": "file", "file": {"filename": "a.pdf"}}], "messages[1].content[0].file"),
    ([{"type": "file"}], "messages[1].content[0].file"),
    ([{"type": "refusal"}], "messages[1].content[0].refusal"),
    (["just a string"], "messages[1].content[0]"),
    ([{"text": "no type"}], "messages[1].content[0]"),
]
GOOD_PARTS = [
    {"type": "text", "text": "look"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
    {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA",
                              "filename": "a.pdf"}},
    {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},  # others pass through
]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_content_parts_are_checked_for_their_required_fields(gateway_factory, http, path):
    async with FaultUpstream() as up:
        up.script(ok(["seen"]))
        async with gateway_factory(TOKENRELAY_UPSTREAM_URL=up.base_url,
                                   TOKENRELAY_DATABASE_URL="none") as gw:
            for parts, where in BAD_PARTS:
                body = {"model": "m", "messages": _parts(*parts), "stream": True}
                async with http.post(gw.base_url + path, json=body) as r:
                    assert r.status == 400, (parts, await r.text())
                    error = (await r.json())["error"]
                    assert error["code"] == "invalid_messages"
                    assert error["message"].startswith(where + " "), (where, error)
            assert up.requests == []  # refused before any upstream call
            body = {"model": "m", "messages": _parts(*GOOD_PARTS), "stream": True}
            async with http.post(gw.base_url + path, json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
            assert len(up.requests) == 1
            sent = orjson.loads(up.requests[0].body)["messages"][1]["content"]
            assert sent == GOOD_PARTS  # forwarded unchanged


async def test_oversized_and_slow_bodies(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_BODY_TIMEOUT_S="0.3") as gw:
        url = gw.base_url + "/api/chat"
        ten_mb = b'{"messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}'
        try:
            async with http.post(url, data=ten_mb, headers=JSON) as r:  # declared length
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "body_too_large"
        except aiohttp.ClientOSError:
            pass  # the server may answer and close before the client finished writing

        async def chunked():  # no Content-Length: the cap applies while reading
            for _ in range(100):
                yield b"x" * 100_000

        try:
            async with http.post(url, data=chunked(), headers=JSON) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "body_too_large"
        except aiohttp.ClientOSError:
            pass

        async def trickle():
            yield b'{"messages": '
            await asyncio.sleep(5)  # never finishes within the 0.3 s body deadline
            yield b"[]}"

        async with http.post(url, data=trickle(), headers=JSON) as r:
            assert r.status == 408
            assert (await r.json())["error"]["code"] == "request_timeout"
        async with http.get(gw.base_url + "/healthz") as r:
            assert r.status == 200  # still serving


async def test_huge_and_hostile_headers_are_refused_without_a_500(gateway, http):
    base = gateway.base_url
    for headers, code in (
        ({"X-Filler": "a" * 200_000}, "headers_too_large"),
        ({f"X-H{i}": "v" * 100 for i in range(2000)}, "too_many_headers"),
    ):
        for path in ("/healthz", "/api/chat"):
            async with http.post(base + path, headers=headers, json=chat_body("x")) as r:
                assert r.status == 431, r.status
                assert (await r.json())["error"]["code"] == code
                assert r.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(base + "/healthz", headers={"X-Filler": "a" * 30_000}) as r:
        assert r.status == 200  # large but below the cap
    async with http.get(base + "/healthz") as r:
        assert r.status == 200
    port = int(base.rsplit(":", 1)[1])
    for raw, statuses in (
        (b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
         (b"400",)),
        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x01b\r\n\r\n",
         (b"200", b"400")),
        (b"GET /api/streams/a\x00b HTTP/1.1\r\nHost: localhost\r\n\r\n", (b"400", b"404")),
    ):  # what no well-behaved client library would send
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.split()[1] in statuses, (raw, status_line)
        finally:
            writer.close()
    for idem in ("x" * 201, "caf\u00e9"):
        async with http.post(base + "/api/chat", json=chat_body("x"),
                             headers={"Idempotency-Key": idem}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_idempotency_key"


async def test_allowed_models_is_an_allow_list(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_ALLOWED_MODELS="sim-chat") as gw:
        for model in ("sim-fast", "gpt-4o"):  # passthrough would route any name
            async with http.post(gw.base_url + "/api/chat",
                                 json=chat_body("x", model=model)) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "model_not_found"
        async with http.post(gw.base_url + "/api/chat",
                             json=chat_body("x", sim={"tokens": 2})) as r:
            assert r.status == 200
            await read_stream(r)
        async with http.get(gw.base_url + "/api/models") as r:
            assert [m["id"] for m in (await r.json())["models"]] == ["sim-chat"]
        async with http.get(gw.base_url + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == []  # none configured


# -- SSE injection -----------------------------------------------------------------------

HOSTILE = [
    "\n\nevent: done\ndata: {\"state\":\"complete\"}\n\n",
    "id: 999999\n",
    "data: {\"content\":\"forged\"}\r\n\r\n",
    "\r\revent: error\r",
    "retry: 1\n\n",
    ": comment\n\n",
    "\u2028\u2029\u0085",
    "\x00\x01\x1b[31m\x7f",
    "</script><script>alert(1)</script>",
    "\ufeffevent: start\n",
    "plain ending",
]


def _check_sse(raw: bytes) -> list[tuple[str, int, dict]]:
    """Parse with the spec-following decoder, cut at every 7 bytes, and check the framing:
    integer ids 1..n, event names from the fixed set, one JSON object per event."""
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(raw), 7):
        for e in decoder.decode(raw[i : i + 7]):
            assert e.id is not None and e.id.isdigit(), e
            assert e.event in EVENT_NAMES, e
            data = orjson.loads(e.data)
            assert isinstance(data, dict)
            events.append((e.event, int(e.id), data))
    decoder.flush()
    assert [i for _, i, _ in events] == list(range(1, len(events) + 1))
    # Every line on the wire is a field we wrote: no injected field can exist.
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            assert line == b"" or line.startswith((b"id: ", b"event: ", b"data: {", b": "))
    assert b"\r" not in raw and "\u2028".encode() not in raw
    return events


def _sequence(events: list[tuple[str, int, dict]]) -> list[str]:
    """Event names with consecutive text deltas folded into one."""
    out: list[str] = []
    for name, _, _ in events:
        if not (name == "message" and out and out[-1] == "message"):
            out.append(name)
    return out


async def test_hostile_upstream_text_cannot_create_or_alter_events(gateway_factory, http):
    async with FaultUpstream() as up:
        up.script(ok(HOSTILE))
        async with gateway_factory(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
            async with http.post(gw.base_url + "/api/chat", json=chat_body("x", "m")) as r:
                stream = await read_stream(r)
            events = _check_sse(stream.raw)
            assert _sequence(events) == ["start", "message", "done"]
            assert stream.text == "".join(HOSTILE)
            assert events[-1][2]["state"] == "complete"

            body = {**chat_body("x", "m"), "stream": True}
            async with http.post(gw.base_url + "/v1/chat/completions", json=body) as r:
                raw = await r.read()
            chunks = []
            for e in SSEDecoder().decode(raw):
                assert e.event == "message" and e.id is None
                chunks.append(e.data)
            assert chunks[-1] == b"[DONE]"
            parsed = [orjson.loads(c) for c in chunks[:-1]]
            text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed)
            assert text == "".join(HOSTILE)
            assert b"\r" not in raw


async def test_hostile_user_text_quoted_back_cannot_alter_events(gateway, http):
    question = "".join(HOSTILE).replace("\x00", "") + " data: event: id: 5"
    async with http.post(gateway.base_url + "/api/chat", json=chat_body(question)) as r:
        stream = await read_stream(r)
    events = _check_sse(stream.raw)
    assert _sequence(events) == ["start", "message", "done"]
    expected = "".join(build_text("sim-chat", [{"role": "user", "content": question}]))
    assert stream.text == expected


HOSTILE_CONVERSATION = "c\r\nSet-Cookie: pwned=1\r\n\r\nevent: done"


async def test_a_hostile_conversation_id_never_reaches_a_header(gateway_factory, http):
    body = {**chat_body("x", sim={"tokens": 2}), "conversation_id": HOSTILE_CONVERSATION}
    async with gateway_factory() as gw:  # with the store: not an id of this tenant
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            assert r.status == 404 and "Set-Cookie" not in r.headers
            assert (await r.json())["error"]["code"] == "conversation_not_found"
        async with http.post(gw.base_url + "/api/chat", json=chat_body("x")) as r:
            conversation_id = r.headers["X-Conversation-Id"]  # server-made
            assert conversation_id.replace("-", "").replace("_", "").isalnum()
            await read_stream(r)
    async with gateway_factory(TOKENRELAY_DATABASE_URL="none") as gw:  # no store: echoed
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            assert r.status == 200
            assert "Set-Cookie" not in r.headers
            assert "X-Conversation-Id" not in r.headers  # only id-shaped values go there
            for name, value in r.headers.items():
                assert "\n" not in value and "\r" not in value, name
            stream = await read_stream(r)
        events = _check_sse(stream.raw)
        assert _sequence(events) == ["start", "message", "done"]
        assert events[0][2]["conversation_id"] == HOSTILE_CONVERSATION


async def test_hostile_model_name_stays_inside_json(gateway_factory, http):
    model = 'm\n\nevent: done\ndata: {}\n\nid: 7\r\u2028"}'
    async with FaultUpstream(model=model) as up:
        up.script(ok(["fine"]))
        async with gateway_factory(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
            async with http.post(gw.base_url + "/api/chat", json=chat_body("x", model)) as r:
                assert r.status == 200
                for name, value in r.headers.items():
                    assert "\n" not in value and "\r" not in value, name
                stream = await read_stream(r)
            events = _check_sse(stream.raw)
            assert _sequence(events) == ["start", "message", "done"]
            assert events[0][2]["model"] == model
            assert stream.text == "fine"
            v1 = {**chat_body("x", model), "stream": True}
            async with http.post(gw.base_url + "/v1/chat/completions", json=v1) as r:
                raw = await r.read()
            decoded = list(SSEDecoder().decode(raw))
            assert decoded[-1].data == b"[DONE]"
            assert all(orjson.loads(e.data)["model"] == model for e in decoded[:-1])
            async with http.get(f"{gw.base_url}/api/streams/{model}/events") as r:
                assert r.status == 404 and "Set-Cookie" not in r.headers


# -- secrets -----------------------------------------------------------------------------

UPSTREAM_KEY = "sk-upstream-SECRET-0123456789abcdef"
CLIENT_KEY = "client-SECRET-key-0123456789"


class _Capture(logging.Handler):
    """Every record of a logger tree, fully formatted (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def _captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    loggers = [logging.getLogger(name) for name in ("tokenrelay", "uvicorn", "aiohttp")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


async def _collect(http: aiohttp.ClientSession, base: str, seen: list[bytes]) -> None:
    """Everything a client can read: pages, config, models, streams, errors, metrics."""
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    requests = [
        ("GET", "/", None, {}), ("GET", "/api/config", None, {}), ("GET", "/healthz", None, {}),
        ("GET", "/metrics", None, auth), ("GET", "/api/models", None, auth),
        ("GET", "/v1/models", None, auth),
        ("POST", "/api/chat", chat_body("hi", sim={"tokens": 3}), auth),
        ("POST", "/v1/chat/completions", {**chat_body("hi"), "stream": False}, auth),
        ("POST", "/v1/chat/completions", {**chat_body("hi"), "stream": True}, auth),
        ("POST", "/api/chat", chat_body("hi"), {"Authorization": "Bearer " + CLIENT_KEY[:-1]}),
        ("POST", "/api/chat", {"messages": "bad"}, auth),
    ]
    for method, path, body, headers in requests:
        async with http.request(method, base + path, json=body, headers=headers) as r:
            seen.append(repr(sorted(r.headers.items())).encode())
            seen.append(await r.read())


async def test_no_key_ever_appears_in_responses_streams_or_logs(http, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[bytes] = []
    sim = create_simulator(SimulatorConfig(speed=100, first_token_delay_scale=0,
                                           api_key=UPSTREAM_KEY))
    fast = {"TOKENRELAY_API_KEYS": f"carol:{CLIENT_KEY}", "TOKENRELAY_DATABASE_URL": "none",
            "TOKENRELAY_RETRY_MAX_ATTEMPTS": "1", "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01"}
    with _captured_logs() as logs:
        async with serve_app(sim, lifespan="off") as sim_url:
            # 1. the right upstream key: normal answers
            async with running_gateway(TOKENRELAY_UPSTREAM_URL=sim_url + "/v1",
                                       TOKENRELAY_UPSTREAM_API_KEY=UPSTREAM_KEY, **fast) as gw:
                await _collect(http, gw.base_url, seen)
                assert sim.last_request_headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        # 2. an upstream that rejects the key and echoes it back in its error
        async with FaultUpstream() as up:
            echo = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}",
                              "type": "invalid_request_error", "code": "invalid_api_key"}}
            up.script(status(401, body=echo))
            async with running_gateway(TOKENRELAY_UPSTREAM_URL=up.base_url,
                                       TOKENRELAY_UPSTREAM_API_KEY=UPSTREAM_KEY, **fast) as gw:
                await _collect(http, gw.base_url, seen)
            up.script(refuse())  # 3. the connection reset before any answer
            async with running_gateway(TOKENRELAY_UPSTREAM_URL=up.base_url,
                                       TOKENRELAY_UPSTREAM_API_KEY=UPSTREAM_KEY, **fast) as gw:
                await _collect(http, gw.base_url, seen)
        # 4. nothing listening at all
        async with running_gateway(
            TOKENRELAY_UPSTREAM_URL=f"http://127.0.0.1:{_closed_port()}/v1",
            TOKENRELAY_UPSTREAM_API_KEY=UPSTREAM_KEY, **fast,
        ) as gw:
            await _collect(http, gw.base_url, seen)
    everything = b"\n".join(seen)
    assert b"upstream_rejected" in everything  # the 401 really happened
    assert b"upstream_unavailable" in everything  # and the connect error
    assert b'"content"' in everything  # and normal answers
    text = everything.decode("utf-8", "replace")
    log_text = "\n".join(logs.lines) + "\n" + caplog.text
    assert "POST /api/chat" in log_text  # the access log was captured
    for secret in (UPSTREAM_KEY, CLIENT_KEY, "SECRET"):
        assert secret not in text
        assert secret not in log_text


def test_log_redaction_covers_client_and_upstream_keys():
    from tokenrelay.config import load_settings
    from tokenrelay.logs import RedactingFilter

    settings = load_settings(environ={
        "TOKENRELAY_API_KEYS": f"carol:{CLIENT_KEY}",
        "TOKENRELAY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
        "TOKENRELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
    })
    record = logging.LogRecord("tokenrelay", logging.INFO, __file__, 1,
                               "headers %s and %s", (CLIENT_KEY, UPSTREAM_KEY), None)
    RedactingFilter(settings.secrets).filter(record)
    message = record.getMessage()
    assert CLIENT_KEY not in message and UPSTREAM_KEY not in message
    assert message.count("[redacted]") == 2


# -- fuzz --------------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)
_text = st.text(max_size=30)
_good_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "developer", "assistant"]),
    "content": _text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                        "text": _text}), max_size=2),
})
_valid = st.fixed_dictionaries(
    {"messages": st.lists(_good_message, min_size=1, max_size=3).map(
        lambda ms: [*ms, {"role": "user", "content": "fuzz"}]),
     "sim": st.just({"tokens": 3})},
    optional={
        "model": st.sampled_from(["sim-chat", "sim-fast", "sim-reasoner", "other-model"]),
        "stream": st.booleans(),
        "max_tokens": st.integers(1, 32_768),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stop": _text | st.lists(_text, max_size=3),
        "seed": st.integers(0, 2**31),
        "user": _text,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.just(1),
    },
)
_fields = st.sampled_from([
    "messages", "model", "stream", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "stop", "n", "seed", "user", "stream_options", "conversation_id", "tools",
    "tool_choice", "response_format", "logit_bias", "metadata", "logprobs", "top_logprobs",
    "parallel_tool_calls", "reasoning_effort", "sim", "unexpected", "",
])
_message_fields = st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"])


def _set(body: dict, key: str, value: object) -> dict:
    return {**body, key: value}


def _set_in_message(body: dict, key: str, value: object) -> dict:
    messages = [dict(m) for m in body["messages"]]
    messages[0][key] = value
    return {**body, "messages": messages}


# Valid requests, valid ones with one field (or one message field) replaced by any JSON
# value, arbitrary JSON, and arbitrary bytes.
_bodies = st.one_of(
    _valid.map(orjson.dumps),
    st.builds(_set, _valid, _fields, _json).map(orjson.dumps),
    st.builds(_set_in_message, _valid, _message_fields, _json).map(orjson.dumps),
    _json.map(orjson.dumps),
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
)


@pytest.fixture
async def fuzz_gateway():
    sim = create_simulator(SimulatorConfig(speed=1000, first_token_delay_scale=0))
    async with serve_app(sim, lifespan="off") as url, running_gateway(
        TOKENRELAY_UPSTREAM_URL=url + "/v1", TOKENRELAY_DATABASE_URL="none",
        TOKENRELAY_GRACE_S="0", TOKENRELAY_RETRY_MAX_ATTEMPTS="1",
    ) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield gw, session


async def _read_response(r: aiohttp.ClientResponse, openai: bool) -> None:
    assert r.status < 500, (r.status, await r.text())
    event(f"status {r.status}")
    kind = r.headers.get("Content-Type", "")
    if r.status >= 400:
        assert kind.startswith("application/json")
        error = (await r.json())["error"]
        assert isinstance(error["code"], str) and error["message"]
    elif kind.startswith("text/event-stream"):
        raw = await r.read()
        if not openai:
            _check_sse(raw)
    else:
        assert kind.startswith("application/json")
        await r.json()


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies, openai=st.booleans())
async def test_fuzzed_chat_bodies_never_get_a_5xx(fuzz_gateway, body, openai):
    gw, session = fuzz_gateway
    path = "/v1/chat/completions" if openai else "/api/chat"
    async with session.post(gw.base_url + path, data=body,
                            headers={"Content-Type": "application/json"}) as r:
        await _read_response(r, openai)
