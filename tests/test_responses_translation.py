"""The pure Responses API translation (:mod:`tokenrelay.responses_api`)."""

from __future__ import annotations

import orjson
import pytest

from tokenrelay import events as ev
from tokenrelay.errors import BadRequest
from tokenrelay.responses_api import (
    ResponseFolder,
    encode,
    input_messages,
    item_ref,
    output_messages,
)

META = {"created": 1700000000, "model": "m",
        "responses": {"echo": {"tools": []}, "messages": [], "background": True}}


def journal() -> list[bytes]:
    """A stream's frames as a generation writes them: start, reasoning, text, two tool
    calls (the second interleaved with the first), done."""
    data = [
        (ev.START, {"model": "m"}),
        (ev.RETRY, {"attempt": 1, "wait_ms": 5, "reason": "429"}),
        (ev.REASONING, {"reasoning": "think "}),
        (ev.REASONING, {"reasoning": "more"}),
        (None, {"content": "Hel"}),
        (None, {"content": "lo\u2028"}),
        (ev.TOOL_CALL, {"index": 0, "id": "call_a", "name": "f", "arguments": '{"x"'}),
        (ev.TOOL_CALL, {"index": 1, "id": "call_b", "name": "g", "arguments": "{}"}),
        (ev.TOOL_CALL, {"index": 0, "id": None, "name": None, "arguments": ":1}"}),
        (ev.DONE, {"state": "complete", "finish_reason": "tool_calls", "model": "m2",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
    ]
    return [ev.frame(i + 1, name, ev.dumps(payload)) for i, (name, payload) in enumerate(data)]


def decoded(events: list[tuple[int, bytes]]) -> list[dict]:
    """The events' JSON (each checked to be one SSE event whose id is its number)."""
    out = []
    for seq, raw in events:
        id_line, event_line, data_line, *_ = raw.split(b"\n")
        data = orjson.loads(data_line[6:])
        assert id_line == b"id: %d" % seq and data["sequence_number"] == seq
        assert event_line == b"event: " + data["type"].encode()
        out.append(data)
    return out


def test_the_fold_is_the_same_however_the_frames_are_batched():
    frames = journal()
    whole = encode(ResponseFolder("s", META).feed(frames), -1)
    for cut in range(1, len(frames)):
        folder = ResponseFolder("s", META)
        parts = encode(folder.feed(frames[:cut]), -1) + encode(folder.feed(frames[cut:]), -1)
        assert parts == whole
    one_by_one = ResponseFolder("s", META)
    assert b"".join(encode(one_by_one.feed([f]), -1) for f in frames) == whole


def test_events_after_n_are_a_suffix_of_the_full_replay():
    frames = journal()
    full = ResponseFolder("s", META).feed(frames)
    assert [e["sequence_number"] for e in decoded(full)] == list(range(len(full)))
    for n in range(-1, len(full)):
        assert encode(ResponseFolder("s", META).feed(frames), n) == encode(full[n + 1:], -1)


def test_the_snapshot_holds_reasoning_text_and_function_calls():
    folder = ResponseFolder("s", META)
    events = decoded(folder.feed(journal()))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    texts = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [e["delta"] for e in texts] == ["Hel", "lo\u2028"]
    assert texts[0] == {"type": "response.output_text.delta", "item_id": "msg_s_1",
                        "output_index": 1, "content_index": 0, "delta": "Hel",
                        "logprobs": [], "sequence_number": texts[0]["sequence_number"]}
    snap = folder.snapshot()
    assert snap["status"] == "completed" and snap["model"] == "m2"
    assert [item["type"] for item in snap["output"]] == [
        "reasoning", "message", "function_call", "function_call"]
    assert snap["output"][0]["summary"] == [{"type": "summary_text", "text": "think more"}]
    assert snap["output"][1]["content"][0]["text"] == "Hello\u2028"
    assert [(c["call_id"], c["name"], c["arguments"]) for c in snap["output"][2:]] == [
        ("call_a", "f", '{"x":1}'), ("call_b", "g", "{}")]
    assert snap["usage"]["total_tokens"] == 7
    assert [item["id"] for item in snap["output"]] == ["rs_s_0", "msg_s_1", "fc_s_2", "fc_s_3"]
    assert item_ref("fc_s_2") == ("s", 2) and item_ref("fc_a_b_12") == ("a_b", 12)
    assert item_ref("resp_s") is None and item_ref("msg_s_x") is None
    # The output as chat history: the text and both calls in one assistant message.
    assert output_messages(snap["output"]) == [{
        "role": "assistant", "content": "Hello\u2028",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f",
                                                               "arguments": '{"x":1}'}},
            {"id": "call_b", "type": "function", "function": {"name": "g",
                                                               "arguments": "{}"}}]}]


def test_wire_events_are_one_line_of_json_with_the_sequence_number_as_id():
    body = encode(ResponseFolder("s", META).feed(journal()), -1)
    for block in body.split(b"\n\n")[:-1]:
        id_line, event_line, data_line = block.split(b"\n")
        data = orjson.loads(data_line[6:])
        assert id_line == b"id: %d" % data["sequence_number"]
        assert event_line == b"event: " + data["type"].encode()
    assert "\u2028".encode() not in body


def test_a_cancelled_or_failed_answer_closes_its_items_as_incomplete():
    frames = journal()[:5]
    cancelled = ResponseFolder("s", META)
    end = ev.frame(6, ev.DONE, ev.dumps({"state": "cancelled"}))
    events = decoded(cancelled.feed([*frames, end]))
    assert cancelled.snapshot()["status"] == "cancelled"
    assert events[-1]["type"] == "response.output_item.done"
    assert events[-1]["item"]["status"] == "incomplete"
    failed = ResponseFolder("s", META)
    error = {"state": "error", "error": {"code": "upstream_rate_limited", "message": "429"}}
    events = decoded(failed.feed([*frames, ev.frame(6, ev.ERROR, ev.dumps(error))]))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_rate_limited"
    assert events[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_input_items_become_chat_messages():
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    assert input_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_image", "image_url": "data:x"}]},
        {"type": "reasoning", "summary": []},
        {"type": "message", "role": "assistant", "id": "msg_1",
         "content": [{"type": "output_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "ok"}]},
    ]) == [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": "b", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


@pytest.mark.parametrize("items", [
    [], 5, [{"role": "robot", "content": "x"}], [{"type": "function_call", "name": "f"}],
    [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
])
def test_bad_input_is_a_bad_request(items):
    with pytest.raises(BadRequest):
        input_messages(items)
