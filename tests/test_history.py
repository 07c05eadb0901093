"""The conversation stored by POST /api/chat follows the conversation the client sends."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from support.client import read_stream


async def ask(http, gateway, messages, conversation_id=None):
    body = {"model": "sim-chat", "messages": messages, "sim": {"tokens": 5}}
    if conversation_id:
        body["conversation_id"] = conversation_id
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream = await read_stream(resp)
    assert stream.events[-1].data["state"] == "complete"
    return stream.events[0].data["conversation_id"], stream.text


async def conversation(http, gateway, conversation_id):
    async with http.get(f"{gateway.base_url}/api/conversations/{conversation_id}") as resp:
        assert resp.status == 200
        return await resp.json()


async def stored(http, gateway, conversation_id):
    data = await conversation(http, gateway, conversation_id)
    return [(m["role"], m["content"]) for m in data["messages"]]


async def versions(http, gateway, conversation_id):
    data = await conversation(http, gateway, conversation_id)
    return [(m["version"], m["versions"]) for m in data["messages"]]


async def switch(http, gateway, conversation_id, message_id):
    async with http.patch(f"{gateway.base_url}/api/conversations/{conversation_id}",
                          json={"active_message_id": message_id}) as resp:
        assert resp.status == 200
        data = await resp.json()
    return [(m["role"], m["content"]) for m in data["messages"]]


async def test_regenerate_and_edit_add_versions_and_lose_nothing_issue_19(gateway, http):
    a = {"role": "user", "content": "first question"}
    cid, answer = await ask(http, gateway, [a])
    assert await stored(http, gateway, cid) == [("user", a["content"]), ("assistant", answer)]

    b = {"role": "user", "content": "second question"}
    history = [a, {"role": "assistant", "content": answer}, b]
    _, answer_b = await ask(http, gateway, history, cid)
    assert await stored(http, gateway, cid) == [
        ("user", a["content"]), ("assistant", answer),
        ("user", b["content"]), ("assistant", answer_b),
    ]

    # Regenerate the last answer (same messages again): a second version of it, shown.
    _, again = await ask(http, gateway, history, cid)
    assert await stored(http, gateway, cid) == [
        ("user", a["content"]), ("assistant", answer),
        ("user", b["content"]), ("assistant", again),
    ]
    assert await versions(http, gateway, cid) == [(1, 1), (1, 1), (1, 1), (2, 2)]
    first_b = (await conversation(http, gateway, cid))["messages"][3]["sibling_ids"][0]

    # Edit the last question and resend: a second version of the question, with its answer.
    edited = {"role": "user", "content": "second question, edited"}
    _, answer_e = await ask(http, gateway, [*history[:2], edited], cid)
    assert await stored(http, gateway, cid) == [
        ("user", a["content"]), ("assistant", answer),
        ("user", edited["content"]), ("assistant", answer_e),
    ]
    assert await versions(http, gateway, cid) == [(1, 1), (1, 1), (2, 2), (1, 1)]

    # Every earlier version is still there: the first answer to the unedited question.
    assert await switch(http, gateway, cid, first_b) == [
        ("user", a["content"]), ("assistant", answer),
        ("user", b["content"]), ("assistant", answer_b),
    ]
    assert await versions(http, gateway, cid) == [(1, 1), (1, 1), (1, 2), (1, 2)]
    # The conversation continues from the branch shown.
    c = {"role": "user", "content": "third question"}
    _, answer_c = await ask(http, gateway, [*history, {"role": "assistant", "content": answer_b},
                                            c], cid)
    assert [content for _, content in await stored(http, gateway, cid)] == [
        a["content"], answer, b["content"], answer_b, c["content"], answer_c]


async def test_history_disabled_is_a_clear_404(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_DATABASE_URL="none") as gw:
        async with http.get(gw.base_url + "/api/conversations") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "history_disabled"
        async with http.get(gw.base_url + "/api/config") as resp:
            assert (await resp.json())["history"] is False


async def _listing(http, gateway):
    async with http.get(gateway.base_url + "/api/conversations") as resp:
        conversations = (await resp.json())["conversations"]
    async with http.get(gateway.base_url + "/api/stats") as resp:
        stats = (await resp.json())["models"]
    return conversations, stats


async def test_history_off_streams_the_answer_but_stores_nothing_issue_14(gateway, http):
    """Tools (tokenrelay bench, chat --no-history) leave the page's history and stats alone."""
    await ask(http, gateway, [{"role": "user", "content": "kept"}])
    before = await _listing(http, gateway)
    body = {"model": "sim-fast", "messages": [{"role": "user", "content": "not kept"}],
            "sim": {"tokens": 5}}
    async with http.post(gateway.base_url + "/api/chat", json=body,
                         headers={"X-TokenRelay-History": "off"}) as resp:
        assert resp.status == 200
        assert "X-Conversation-Id" not in resp.headers
        stream = await read_stream(resp)
    assert stream.events[-1].data["state"] == "complete" and stream.text
    assert await _listing(http, gateway) == before
    assert "sim-fast" not in {m["model"] for m in before[1]}


async def test_a_bad_history_header_is_refused_before_anything_is_stored(gateway, http):
    before = await _listing(http, gateway)
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(gateway.base_url + "/api/chat", json=body,
                         headers={"X-TokenRelay-History": "maybe"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_header"
    assert await _listing(http, gateway) == before


async def test_tokenrelay_bench_leaves_no_history(gateway, http, tmp_path):
    tokenrelay = Path(sys.executable).with_name("tokenrelay")
    proc = await asyncio.create_subprocess_exec(
        str(tokenrelay), "bench", "--url", gateway.base_url, "--model", "sim-fast",
        "--requests", "2", "--max-tokens", "10", "--out", str(tmp_path / "chart.svg"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert (tmp_path / "chart.svg").exists()
    assert await _listing(http, gateway) == ([], [])


async def test_ids_in_the_headers_are_valid_at_once_and_history_shows_an_answer_right_after_done(
        gateway, http):
    """Issue 17: the first byte waits for no database write, yet the conversation id sent
    at the start is readable at once, and the finished answer is stored before `done`."""

    async def one(i: int) -> None:
        body = {"model": "sim-fast", "messages": [{"role": "user", "content": f"q{i}"}],
                "sim": {"tokens": 12}}
        async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
            cid = resp.headers["X-Conversation-Id"]
            message_id = resp.headers["X-Message-Id"]
            async with http.get(f"{gateway.base_url}/api/conversations/{cid}") as early:
                assert early.status == 200
                found = await early.json()
            assert [m["role"] for m in found["messages"]] == ["user", "assistant"]
            assert found["messages"][1]["id"] == message_id
            stream = await read_stream(resp)
        assert stream.events[-1].event == "done"
        messages = (await stored_full(http, gateway, cid))["messages"]
        assert [(m["role"], m["content"], m["state"]) for m in messages] == [
            ("user", f"q{i}", "complete"), ("assistant", stream.text, "complete")]

    await asyncio.gather(*(one(i) for i in range(16)))


async def stored_full(http, gateway, conversation_id):
    async with http.get(f"{gateway.base_url}/api/conversations/{conversation_id}") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_a_stopped_answer_stays_a_version_after_a_regenerate_issue_19(gateway, http):
    question = {"role": "user", "content": "stop this one"}
    body = {"model": "sim-chat", "messages": [question], "sim": {"tokens_per_s": 50}}
    async with http.post(gateway.base_url + "/api/chat", json=body) as resp:
        stream_id = resp.headers["X-Stream-Id"]
        cid = resp.headers["X-Conversation-Id"]
        before = await read_stream(resp, stop_after=4)
        async with http.post(f"{gateway.base_url}/api/streams/{stream_id}/cancel") as c:
            assert c.status == 202
        rest = await read_stream(resp)
    assert rest.events[-1].data["state"] == "cancelled"
    stopped = "".join(e.data["content"] for e in before.events + rest.events
                      if e.event == "message")

    _, again = await ask(http, gateway, [question], cid)  # Regenerate
    data = await conversation(http, gateway, cid)
    answer = data["messages"][1]
    assert (answer["content"], answer["state"], answer["version"], answer["versions"]) == (
        again, "complete", 2, 2)
    async with http.patch(f"{gateway.base_url}/api/conversations/{cid}",
                          json={"active_message_id": answer["sibling_ids"][0]}) as resp:
        first = (await resp.json())["messages"][1]
    assert (first["content"], first["state"], first["version"]) == (stopped, "cancelled", 1)
