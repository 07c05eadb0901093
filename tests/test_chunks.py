"""tokenrelay.chunks: OpenAI chat-completion chunks to normalized events."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.chunks import ChunkDecoder
from tokenrelay.errors import UpstreamError, UpstreamIncomplete, UpstreamProtocolError
from tokenrelay.events import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.sse import SSEDecoder


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> bytes:
    """One chat.completion.chunk as a provider sends it."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
    }
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    body.update(top)
    return orjson.dumps(body)


def feed_each(decoder: ChunkDecoder, payloads: list[bytes]) -> list[list[Any]]:
    """Feed each payload into its own output list (one read per payload)."""
    outs = []
    for payload in payloads:
        out: list[Any] = []
        decoder.feed(payload, out)
        outs.append(out)
    return outs


def feed_all(decoder: ChunkDecoder, payloads: list[bytes]) -> list[Any]:
    """Feed every payload into one output list (one read holding them all)."""
    out: list[Any] = []
    for payload in payloads:
        decoder.feed(payload, out)
    return out


def test_content_becomes_text_delta():
    assert feed_each(ChunkDecoder(), [chunk({"content": "Hel"}), chunk({"content": "lo"})]) == [
        [TextDelta("Hel")],
        [TextDelta("lo")],
    ]


def test_consecutive_text_deltas_of_one_read_are_merged():
    decoder = ChunkDecoder()
    out = feed_all(decoder, [chunk({"content": c}) for c in ["a", "b", "c"]])
    assert out == [TextDelta("abc")]


def test_merging_stops_at_other_events():
    payloads = [
        chunk({"content": "a"}),
        chunk({"reasoning_content": "r1"}),
        chunk({"reasoning_content": "r2"}),
        chunk({"content": "b"}),
        chunk({"content": "c"}),
        chunk({}, finish="stop"),
        chunk({"content": "d"}),
    ]
    assert feed_all(ChunkDecoder(), payloads) == [
        TextDelta("a"),
        ReasoningDelta("r1r2"),
        TextDelta("bc"),
        Finish("stop"),
        TextDelta("d"),
    ]


def test_role_only_and_empty_content_yield_nothing():
    payloads = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"role": "assistant"}),
        chunk({"content": None}),
        chunk({}),
        chunk({"content": ""}),
    ]
    assert feed_all(ChunkDecoder(), payloads) == []


def test_content_next_to_null_fields():
    # DeepSeek and vLLM send "reasoning_content": null and "tool_calls": null with text.
    payload = chunk(
        {"role": "assistant", "content": "x", "reasoning_content": None, "tool_calls": None}
    )
    assert feed_all(ChunkDecoder(), [payload]) == [TextDelta("x")]


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_fields(key):
    payloads = [
        chunk({key: "think"}),
        chunk({key: "ing", "content": None}),
        chunk({"content": "A"}),
    ]
    assert feed_all(ChunkDecoder(), payloads) == [ReasoningDelta("thinking"), TextDelta("A")]


def test_reasoning_sent_under_both_names_is_not_duplicated():
    payload = chunk({"reasoning_content": "r", "reasoning": "r"})
    assert feed_all(ChunkDecoder(), [payload]) == [ReasoningDelta("r")]
    payload = chunk({"reasoning_content": None, "reasoning": "s"})
    assert feed_all(ChunkDecoder(), [payload]) == [ReasoningDelta("s")]


def test_reasoning_details_only_when_no_reasoning_string():
    details = [
        {"type": "reasoning.text", "text": "a"},
        {"type": "reasoning.encrypted", "data": "xyz"},
        {"type": "reasoning.summary", "summary": "b"},
    ]
    assert feed_all(ChunkDecoder(), [chunk({"reasoning_details": details})]) == [
        ReasoningDelta("ab")
    ]
    payload = chunk({"reasoning": "a", "reasoning_details": details[:1]})
    assert feed_all(ChunkDecoder(), [payload]) == [ReasoningDelta("a")]


def test_reasoning_and_content_in_one_delta_keep_their_order():
    payload = chunk({"reasoning_content": "r", "content": "c"})
    assert feed_all(ChunkDecoder(), [payload]) == [ReasoningDelta("r"), TextDelta("c")]


def _call(index, id=None, name=None, arguments=None, **extra):
    function = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    call = {"index": index, "function": function, **extra}
    if id is not None:
        call.update(id=id, type="function")
    return call


def test_tool_call_fragments():
    payloads = [
        chunk(
            {"role": "assistant", "content": None, "tool_calls": [_call(0, "call_1", "get", "")]}
        ),
        chunk({"tool_calls": [_call(0, arguments='{"ci')]}),
        chunk({"tool_calls": [_call(0, arguments='ty": "Oslo"}')]}),
        chunk({}, finish="tool_calls"),
    ]
    assert feed_all(ChunkDecoder(), payloads) == [
        ToolCallDelta(0, "call_1", "get", ""),
        ToolCallDelta(0, None, None, '{"ci'),
        ToolCallDelta(0, None, None, 'ty": "Oslo"}'),
        Finish("tool_calls"),
    ]


def test_parallel_tool_calls_by_index():
    payloads = [
        chunk({"tool_calls": [_call(0, "call_a", "f", '{"x":'), _call(1, "call_b", "g", "")]}),
        chunk({"tool_calls": [_call(1, arguments='{"y":2}')]}),
        chunk({"tool_calls": [_call(0, arguments="1}")]}),
    ]
    assert feed_all(ChunkDecoder(), payloads) == [
        ToolCallDelta(0, "call_a", "f", '{"x":'),
        ToolCallDelta(1, "call_b", "g", ""),
        ToolCallDelta(1, None, None, '{"y":2}'),
        ToolCallDelta(0, None, None, "1}"),
    ]


def test_tool_call_without_index_uses_its_position():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"k": 1}}},
    ]
    assert feed_all(ChunkDecoder(), [chunk({"tool_calls": calls})]) == [
        ToolCallDelta(0, "a", "f", "{}"),
        ToolCallDelta(1, "b", "g", '{"k":1}'),  # an object is passed on as its JSON
    ]


def test_finish_reason():
    decoder = ChunkDecoder()
    assert feed_all(decoder, [chunk({"content": "x"}, finish=None)]) == [TextDelta("x")]
    assert feed_all(decoder, [chunk({}, finish="length")]) == [Finish("length")]
    assert feed_all(decoder, [chunk({"content": "y"}, finish="stop")]) == [
        TextDelta("y"),
        Finish("stop"),
    ]


def test_usage_in_a_final_chunk_with_empty_choices():
    payloads = [
        chunk({"content": "x"}, usage=None),
        chunk({}, finish="stop", usage=None),
        chunk(choices=[], usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}),
    ]
    assert feed_all(ChunkDecoder(), payloads) == [TextDelta("x"), Finish("stop"), Usage(9, 12, 21)]


def test_usage_with_missing_counts():
    payload = chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4})
    assert feed_all(ChunkDecoder(), [payload]) == [Usage(3, 4, 7)]


def test_content_chunks_counts_chunks_that_carried_text_or_reasoning():
    decoder = ChunkDecoder()
    payloads = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "r"}),
        chunk({"content": "a"}),
        chunk({"content": "b", "reasoning_content": "s"}),
        chunk({"tool_calls": [_call(0, "c", "f", "{}")]}),
        chunk({}, finish="stop"),
    ]
    feed_all(decoder, payloads)
    assert decoder.content_chunks == 3
    think_decoder = ChunkDecoder(think_tags=True)
    feed_all(think_decoder, [chunk({"content": "<think>x"}), chunk({"content": "</think>y"})])
    assert think_decoder.content_chunks == 2


def test_done_and_finish():
    decoder = ChunkDecoder()
    feed_all(decoder, [chunk({"content": "x"})])
    assert not decoder.done
    with pytest.raises(UpstreamIncomplete) as info:
        decoder.finish()
    assert info.value.message == "upstream stream ended before [DONE]"
    assert info.value.retryable
    assert feed_all(decoder, [b"[DONE]"]) == []
    assert decoder.done
    decoder.finish()


def test_a_finish_reason_without_done_is_a_complete_stream():
    decoder = ChunkDecoder()
    out = feed_all(decoder, [chunk({"content": "x"}), chunk({}, finish="length"),
                             chunk(usage={"prompt_tokens": 2, "completion_tokens": 1})])
    assert out == [TextDelta("x"), Finish("length"), Usage(2, 1, 3)]
    assert (decoder.done, decoder.finish_reason) == (False, "length")
    decoder.finish()  # several servers never send [DONE]: not an error


def test_everything_after_done_is_ignored():
    decoder = ChunkDecoder()
    out = feed_all(decoder, [chunk({"content": "x"}), b"[DONE]", b"{not json",
                             chunk({"content": "late"}), orjson.dumps({"error": "late"})])
    assert out == [TextDelta("x")]
    assert decoder.done and decoder.content_chunks == 1
    decoder.finish()


def test_vllm_error_object_is_an_error_with_its_message():
    payload = orjson.dumps({"object": "error", "message": "maximum context length exceeded",
                            "type": "BadRequestError", "param": None, "code": 400})
    with pytest.raises(UpstreamError) as info:
        ChunkDecoder().feed(payload, [])
    assert info.value.message == "maximum context length exceeded"
    assert (info.value.code, info.value.retryable) == ("upstream_error", False)


def test_openrouter_finish_reason_error_is_an_error_after_the_chunk_text():
    decoder = ChunkDecoder()
    out: list[Any] = []
    with pytest.raises(UpstreamError) as info:
        decoder.feed(chunk({"content": "par"}, finish="error"), out)
    assert out == [TextDelta("par")]
    assert info.value.message == 'upstream ended the answer with finish_reason "error"'
    assert decoder.finish_reason is None
    error = {"message": "Provider disconnected", "code": "server_error"}
    with pytest.raises(UpstreamError, match="Provider disconnected"):
        ChunkDecoder().feed(orjson.dumps({"choices": [
            {"index": 0, "delta": {}, "finish_reason": "error", "error": error}]}), [])


def test_empty_data_is_a_keep_alive():
    decoder = ChunkDecoder()
    assert feed_all(decoder, [b"", b"", chunk({"content": "x"}), b""]) == [TextDelta("x")]
    assert not decoder.done


def test_model_comes_from_the_first_chunk_that_has_one():
    decoder = ChunkDecoder()
    assert decoder.model is None
    feed_all(decoder, [orjson.dumps({"choices": []})])
    assert decoder.model is None
    feed_all(decoder, [chunk({"content": "a"}, model="gpt-x-2024"), chunk({}, model="other")])
    assert decoder.model == "gpt-x-2024"


@pytest.mark.parametrize(
    "payload",
    [b"{", b'{"choices": [', b"data: {}", b"[DONE", b"\xff", b"[1, 2]", b"42", b'"text"', b"null"],
)
def test_corrupt_chunk_raises(payload):
    with pytest.raises(UpstreamProtocolError, match="upstream sent a corrupt chunk"):
        ChunkDecoder().feed(payload, [])


@pytest.mark.parametrize(
    "body",
    [
        {"choices": 5},
        {"choices": [5]},
        {"choices": [{"delta": "x"}]},
        {"usage": [1]},
        {"choices": [{"delta": {"tool_calls": [{"function": 3}]}}]},
    ],
)
def test_wrongly_shaped_chunk_raises(body):
    with pytest.raises(UpstreamProtocolError):
        ChunkDecoder().feed(orjson.dumps(body), [])


def test_error_object_in_the_stream():
    payload = orjson.dumps(
        {
            "error": {
                "message": "The model `x` does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
        }
    )
    with pytest.raises(UpstreamError) as info:
        ChunkDecoder().feed(payload, [])
    assert type(info.value) is UpstreamError  # not a corrupt chunk: the provider said so
    assert info.value.code == "upstream_error"
    assert info.value.message == "The model `x` does not exist"
    assert not info.value.retryable


@pytest.mark.parametrize(
    "error",
    [
        {
            "message": "Rate limit reached for requests",
            "type": "requests",
            "code": "rate_limit_exceeded",
        },
        {"message": "Provider returned error", "code": 429},
        {"message": "Overloaded", "type": "overloaded_error"},
        {"message": "The server is busy", "code": "503"},
    ],
)
def test_overload_and_rate_limit_errors_are_retryable(error):
    with pytest.raises(UpstreamError) as info:
        ChunkDecoder().feed(orjson.dumps({"error": error, "choices": []}), [])
    assert info.value.retryable
    assert info.value.message == error["message"]


def test_error_next_to_choices_raises_before_emitting():
    payload = chunk({"content": ""}, finish="error", error={"code": 502, "message": "boom"})
    out: list[Any] = []
    with pytest.raises(UpstreamError, match="boom"):
        ChunkDecoder().feed(payload, out)
    assert out == []


def test_error_message_is_redacted_and_a_string_error_is_accepted():
    payload = orjson.dumps({"error": "invalid key sk-abcdefghijklmnop"})
    with pytest.raises(UpstreamError) as info:
        ChunkDecoder().feed(payload, [])
    assert "abcdefghijklmnop" not in info.value.message
    with pytest.raises(UpstreamError, match="upstream reported an error"):
        ChunkDecoder().feed(orjson.dumps({"error": {}}), [])


# <think> tags -----------------------------------------------------------------------------


def think(pieces: list[str], flush: bool = True) -> list[Any]:
    decoder = ChunkDecoder(think_tags=True)
    out = feed_all(decoder, [chunk({"content": p}) for p in pieces])
    if flush:
        decoder.flush(out)
    return out


THINK = "<think>\nLet me see: 2<3, a <b> tag, </thin.\n</think>\n\nThe answer is <4."


def test_think_tags_whole():
    assert think([THINK]) == [
        ReasoningDelta("\nLet me see: 2<3, a <b> tag, </thin.\n"),
        TextDelta("\n\nThe answer is <4."),
    ]


def test_think_tags_split_at_every_offset():
    expected = think([THINK])
    for i in range(len(THINK) + 1):
        assert think([THINK[:i], THINK[i:]]) == expected, i
        for j in range(i, len(THINK) + 1, 3):
            assert think([THINK[:i], THINK[i:j], THINK[j:]]) == expected, (i, j)
    assert think(list(THINK)) == expected


def test_think_tags_anywhere_and_repeated():
    assert think(["pre<think>a</think>mid<think>b</think>post"]) == [
        TextDelta("pre"),
        ReasoningDelta("a"),
        TextDelta("mid"),
        ReasoningDelta("b"),
        TextDelta("post"),
    ]


def test_think_holds_back_only_a_possible_partial_tag():
    decoder = ChunkDecoder(think_tags=True)
    outs = feed_each(decoder, [chunk({"content": c}) for c in ["x<", "t", "hi", "nk", ">y</", "a"]])
    assert outs == [
        [TextDelta("x")],  # "<" might start "<think>"
        [],  # "<t"
        [],  # "<thi"
        [],  # "<think", one character short
        [ReasoningDelta("y")],  # "</" might start "</think>"
        [ReasoningDelta("</a")],  # it did not
    ]
    out: list[Any] = []
    feed_all(decoder, [chunk({"content": "a < b"})])
    decoder.flush(out)
    assert out == []


def test_think_flush_releases_a_partial_tag_at_the_end():
    assert think(["answer <thi"], flush=False) == [TextDelta("answer ")]
    assert think(["answer <thi"]) == [TextDelta("answer <thi")]
    assert think(["<think>hm </thi"]) == [ReasoningDelta("hm </thi")]


def test_think_tags_are_text_when_disabled():
    out = feed_all(ChunkDecoder(), [chunk({"content": "<think>x</think>y"})])
    assert out == [TextDelta("<think>x</think>y")]


def reference_think(text: str) -> list[Any]:
    """Split a whole text on the tags, non-incrementally."""
    out: list[Any] = []
    in_think = False
    while True:
        tag = "</think>" if in_think else "<think>"
        at = text.find(tag)
        piece = text if at < 0 else text[:at]
        if piece:
            kind = ReasoningDelta if in_think else TextDelta
            if out and type(out[-1]) is kind:
                out[-1].text += piece
            else:
                out.append(kind(piece))
        if at < 0:
            return out
        in_think = not in_think
        text = text[at + len(tag) :]


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(
        st.sampled_from(["<think>", "</think>", "<", "</", "<thi", "nk>", "a", " ", "t", ">"]),
        max_size=20,
    ),
    data=st.data(),
)
def test_think_random_text_and_cuts(tokens, data):
    whole = "".join(tokens)
    expected = reference_think(whole)
    assert think([whole]) == expected
    offsets = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    bounds = [0, *offsets, len(whole)]
    assert think([whole[a:b] for a, b in itertools.pairwise(bounds)]) == expected


# The two parsers together -------------------------------------------------------------------


def test_sse_and_chunks_under_every_cut():
    payloads = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "hmm é"}),
        chunk({"content": "caf\u00e9 \U0001f600"}),
        chunk({"content": " \u2028 done"}),
        chunk({"tool_calls": [_call(0, "c", "f", '{"a":')]}),
        chunk({}, finish="stop"),
        chunk(choices=[], usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        b"[DONE]",
    ]
    raw = b"".join(b"data: " + p + b"\r\n\r\n" for p in payloads)
    expected = [
        ReasoningDelta("hmm é"),
        TextDelta("caf\u00e9 \U0001f600 \u2028 done"),
        ToolCallDelta(0, "c", "f", '{"a":'),
        Finish("stop"),
        Usage(1, 2, 3),
    ]
    for i in range(len(raw) + 1):
        sse, decoder = SSEDecoder(), ChunkDecoder()
        out: list[Any] = []
        for part in (raw[:i], raw[i:]):
            for event in sse.decode(part):
                decoder.feed(event.data, out)
        decoder.finish()
        assert not sse.pending
        assert out == expected, i


def test_stream_cut_mid_event_is_incomplete():
    raw = b"data: " + chunk({"content": "a"}) + b"\n\ndata: [DON"
    sse, decoder = SSEDecoder(), ChunkDecoder()
    out: list[Any] = []
    for event in sse.decode(raw):
        decoder.feed(event.data, out)
    assert out == [TextDelta("a")]
    assert sse.flush() == [] and sse.pending
    with pytest.raises(UpstreamIncomplete):
        decoder.finish()
