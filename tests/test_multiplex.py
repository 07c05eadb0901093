"""``GET /api/events``: several streams, each resumed after its own seq, over one response."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import orjson

from support.client import chat_body, read_stream
from support.gateway import running_gateway


def _split(raw: bytes) -> dict[str, list[dict[str, Any]]]:
    """The multiplexed body → per stream, its events (id, event, data) in order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for block in raw.split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "stream" in fields:
            out[fields["stream"]].append({
                "id": int(fields["id"]) if "id" in fields else None,
                "event": fields.get("event", "message"),
                "data": orjson.loads(fields["data"]),
            })
    return out


async def _start(http: aiohttp.ClientSession, url: str, **body: Any) -> str:
    """POST /api/chat, read its first event, and let the connection go (as a tab does)."""
    async with http.post(url + "/api/chat", json=chat_body(**body)) as resp:
        first = await read_stream(resp, stop_after=1)
    return str(first.events[0].data["stream_id"])


async def test_one_response_carries_several_streams_exactly_as_their_own_resumes():
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="5",
                               TOKENRELAY_HEARTBEAT_S="0.2") as gw, aiohttp.ClientSession() as http:
        a = await _start(http, gw.base_url, content="first question", model="sim-chat")
        b = await _start(http, gw.base_url, content="second question", model="sim-reasoner")
        url = f"{gw.base_url}/api/events?streams={a}:0,{b}:2,unknown-stream:0"
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = await resp.read()  # ends once both streams have ended
        got = _split(raw)
        assert raw.startswith(b": multiplex\n\n")
        assert got["unknown-stream"] == [{"id": None, "event": "gone", "data": {}}]
        for stream_id, after in ((a, 0), (b, 2)):
            async with http.get(f"{gw.base_url}/api/streams/{stream_id}/events",
                                headers={"Last-Event-ID": str(after)}) as resp:
                truth = await read_stream(resp)
            mine = got[stream_id]
            assert [e["id"] for e in mine] == [e.id for e in truth.events]
            assert [e["data"] for e in mine] == [e.data for e in truth.events]
            assert mine[-1]["event"] == "done"


async def test_a_following_multiplex_keeps_an_abandoned_answer_alive_past_its_grace():
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="3", TOKENRELAY_GRACE_S="0",
                               TOKENRELAY_HEARTBEAT_S="0.2") as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/api/chat", json=chat_body()) as post:
            first = await read_stream(post, stop_after=1)
            stream_id = first.events[0].data["stream_id"]
            # Attach the multiplex while the POST still holds the stream, then let it go:
            # with a grace of 0 the answer would be cancelled if nobody followed it.
            multi = await http.get(f"{gw.base_url}/api/events?streams={stream_id}:1")
            assert multi.headers["x-streams"] == "1"
        raw = await multi.read()
        multi.release()
        events = _split(raw)[stream_id]
        assert events[-1]["event"] == "done"
        assert events[-1]["data"]["state"] == "complete"


async def test_bad_stream_lists_are_refused_with_a_clear_400():
    async with running_gateway() as gw, aiohttp.ClientSession() as http:
        for query in ("", "?streams=", "?streams=abc", "?streams=abc:-1", "?streams=a:1,b",
                      "?streams=" + ",".join(f"s{i}:0" for i in range(33))):
            async with http.get(f"{gw.base_url}/api/events{query}") as resp:
                assert resp.status == 400, query
                assert (await resp.json())["error"]["code"] == "invalid_streams", query
