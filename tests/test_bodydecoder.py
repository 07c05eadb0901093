"""tokenrelay.bodydecoder: the template fast path gives exactly what the exact parsers give.

The reference is the SSE decoder feeding every message/error event to the chunk decoder,
one output list per read (what the relay did before the fast path). Streams are generated
with every kind of chunk providers send, plus hostile ones, and cut at random places.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.bodydecoder import BodyDecoder
from tokenrelay.chunks import ChunkDecoder
from tokenrelay.errors import UpstreamError
from tokenrelay.events import Finish, ReasoningDelta, TextDelta
from tokenrelay.sse import SSEDecoder

HEAD = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "m-1", "system_fingerprint": "fp_1"}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> bytes:
    body: dict[str, Any] = dict(HEAD)
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    body.update(top)
    return orjson.dumps(body)


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def text_events(words: list[str]) -> bytes:
    return b"".join(event(chunk({"content": w})) for w in words)


class Reference:
    """The exact parsers alone."""

    def __init__(self, think_tags: bool = False) -> None:
        self.sse = SSEDecoder()
        self.chunks = ChunkDecoder(think_tags=think_tags)

    def decode(self, data: bytes) -> tuple[list[Any], UpstreamError | None]:
        out: list[Any] = []
        try:
            for ev in self.sse.decode(data):
                if ev.event in ("message", "error"):
                    self.chunks.feed(ev.data, out)
        except UpstreamError as exc:
            return out, exc
        return out, None


def run(decoder: Any, reads: list[bytes]) -> list[Any]:
    """Per read: the events and the error (type and message); stops at the first error."""
    results = []
    for data in reads:
        out, err = decoder.decode(data)
        results.append((out, None if err is None else (type(err), str(err))))
        if err is not None:
            break
    results.append((decoder.chunks.content_chunks, decoder.chunks.model, decoder.chunks.done))
    return results


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(body), *(p % (len(body) + 1) for p in points)})
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def assert_same(body: bytes, reads: list[bytes], think_tags: bool = False) -> BodyDecoder:
    assert b"".join(reads) == body
    decoder = BodyDecoder(think_tags=think_tags)
    assert run(decoder, reads) == run(Reference(think_tags), reads)
    return decoder


def count_exact_feeds(decoder: BodyDecoder, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record what reaches this decoder's exact chunk parser from now on."""
    fed: list[bytes] = []
    feed = ChunkDecoder.feed

    def spy(self: ChunkDecoder, data: bytes, out: list[Any]) -> None:
        if self is decoder.chunks:
            fed.append(data)
        feed(self, data, out)

    monkeypatch.setattr(ChunkDecoder, "feed", spy)
    return fed


# --- the fast path is taken, and gives the text --------------------------------------


def test_a_live_answer_goes_through_the_template_after_its_first_text_chunk(monkeypatch):
    decoder = BodyDecoder()
    first = event(chunk({"role": "assistant", "content": ""})) + event(chunk({"content": "Hi"}))
    assert decoder.decode(first) == ([TextDelta("Hi")], None)
    fed = count_exact_feeds(decoder, monkeypatch)
    words = [" there", ",", " how", " are", " you", "?", ""]
    out, err = decoder.decode(text_events(words))
    assert (out, err) == ([TextDelta(" there, how are you?")], None)
    assert fed == []  # not one chunk parsed as JSON
    assert decoder.chunks.content_chunks == 1 + 6  # the empty one does not count


def test_one_event_per_read_takes_the_template_too(monkeypatch):
    decoder = BodyDecoder()
    decoder.decode(event(chunk({"content": "a"})))
    fed = count_exact_feeds(decoder, monkeypatch)
    outs = [decoder.decode(event(chunk({"content": w})))[0] for w in ["b", "c", "d"]]
    assert outs == [[TextDelta("b")], [TextDelta("c")], [TextDelta("d")]]
    assert fed == []


def test_escapes_and_non_ascii_text_decode_as_json_would(monkeypatch):
    decoder = BodyDecoder()
    decoder.decode(event(chunk({"content": "x"})))
    fed = count_exact_feeds(decoder, monkeypatch)
    words = ["\n\n", 'say "hi"', "tab\there", "é", "日本", "😀", "back\\slash", "\u2028"]
    body = text_events(words)
    # A provider may escape what orjson writes raw: \u00e9 and a surrogate pair.
    body += event(chunk({"content": "X"}).replace(b'"X"', b'"\\u00e9\\ud83d\\ude00"'))
    out, err = decoder.decode(body)
    assert err is None
    assert out == [TextDelta("".join(words) + "é😀")]
    assert fed == []


def test_a_read_mixing_template_and_other_events_keeps_their_order(monkeypatch):
    decoder = BodyDecoder()
    decoder.decode(event(chunk({"content": "a"})))
    fed = count_exact_feeds(decoder, monkeypatch)
    tool = chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f",
                                                                      "arguments": "{}"}}]})
    body = (text_events(["b", "c"]) + b"id: 9\n" + event(chunk({"content": "d"}))
            + event(tool) + text_events(["e"]) + event(chunk(finish="stop"))
            + event(chunk(usage={"prompt_tokens": 1, "completion_tokens": 5}))
            + b"data: [DONE]\n\n")
    reads = [body]
    assert run(decoder, reads)[0] == run_reference_after(["a"], reads)[0]
    out = decoder.decode(b"")[0]
    assert out == []
    assert len(fed) == 4  # the tool call, finish, usage, [DONE]
    assert decoder.chunks.done


def run_reference_after(words: list[str], reads: list[bytes]) -> list[Any]:
    ref = Reference()
    ref.decode(text_events(words))
    return run(ref, reads)


def test_reasoning_then_answer_learns_a_template_for_each(monkeypatch):
    decoder = BodyDecoder()
    thought = [chunk({"content": None, "reasoning_content": w}) for w in ["Let", " me", " see"]]
    out, _ = decoder.decode(b"".join(event(c) for c in thought))
    assert out == [ReasoningDelta("Let me see")]
    fed = count_exact_feeds(decoder, monkeypatch)
    more = [chunk({"content": None, "reasoning_content": w}) for w in [".", " Ok"]]
    assert decoder.decode(b"".join(event(c) for c in more))[0] == [ReasoningDelta(". Ok")]
    assert fed == []
    decoder.decode(text_events(["The"]))  # exact: the template is for reasoning
    assert len(fed) == 1
    assert decoder.decode(text_events([" answer", "."]))[0] == [TextDelta(" answer.")]
    assert len(fed) == 1


def test_think_tags_never_take_the_template(monkeypatch):
    decoder = BodyDecoder(think_tags=True)
    fed = count_exact_feeds(decoder, monkeypatch)
    out, _ = decoder.decode(text_events(["<think>", "hmm", "</think>", "Hi", " you"]))
    assert out == [ReasoningDelta("hmm"), TextDelta("Hi you")]
    assert len(fed) == 5


def test_chunks_that_vary_elsewhere_never_give_a_template_and_stay_exact(monkeypatch):
    decoder = BodyDecoder()
    body = b"".join(event(chunk({"content": f"w{i}"}, created=i)) for i in range(20))
    fed = count_exact_feeds(decoder, monkeypatch)
    assert decoder.decode(body)[0] == [TextDelta("".join(f"w{i}" for i in range(20)))]
    assert len(fed) == 20


@pytest.mark.parametrize(
    "bad",
    [
        b'"\xe6\x97',  # half a UTF-8 character
        b'"\\x41',  # an escape JSON does not have
        b'"\\ud800',  # a lone surrogate escape
        b'"\xff',  # not UTF-8 at all
    ],
)
def test_a_bad_string_is_the_exact_parsers_error_after_the_good_text(bad):
    good = text_events(["a", "b"])
    broken = event(chunk({"content": "Q"}).replace(b'"Q', bad))
    body = good + broken + text_events(["c"])
    one_per_read = [text_events(["a"]), text_events(["b"]), broken, text_events(["c"])]
    for reads in ([body], [good[:-1], good[-1:] + broken, text_events(["c"])], one_per_read):
        assert_same(text_events(["x"]) + body, [text_events(["x"]), *reads])


def test_a_read_of_one_empty_text_event_is_no_event_and_no_chunk():
    decoder = assert_same(text_events(["x", "", "y"]),
                          [text_events(["x"]), text_events([""]), text_events(["y"])])
    assert decoder.chunks.content_chunks == 2


def test_a_character_split_across_two_chunks_is_still_an_error():
    word = "日".encode()
    body = (event(chunk({"content": "X"}).replace(b'"X"', b'"' + word[:2] + b'"'))
            + event(chunk({"content": "X"}).replace(b'"X"', b'"' + word[2:] + b'"')))
    decoder = assert_same(text_events(["x"]) + body, [text_events(["x"]), body])
    assert decoder._head  # the template was there and did not hide it


def test_an_event_that_differs_only_after_its_text_is_not_taken_for_the_template():
    # "finish_reason":"ab" is as long as "finish_reason":null: only the bytes tell.
    same_length = event(chunk({"content": "b"}, finish="ab"))
    body = text_events(["x"]) + text_events(["a"]) + same_length + text_events(["c"])
    decoder = assert_same(body, [text_events(["x"]), body[len(text_events(["x"])):]])
    out, _ = BodyDecoder().decode(body)
    assert decoder._head
    assert out == [TextDelta("xab"), Finish("ab"), TextDelta("c")]


def test_a_chunk_written_over_several_data_lines_does_not_become_a_template():
    payload = chunk({"content": "a"})  # split after "{": the line end is JSON whitespace
    split = b"data: {\ndata: " + payload[1:] + b"\n\n"
    # The same bytes without the second "data: ": SSE ignores that line (an unknown field),
    # so the event's data is "{", a corrupt chunk, not the text.
    crafted = b"data: {\n" + payload[1:].replace(b'"a"', b'"b"') + b"\n\n"
    decoder = assert_same(split + crafted, [split, crafted])
    assert not decoder._head


def test_an_event_whose_prefix_and_suffix_share_their_quote_is_not_an_empty_text():
    # '..."content":"},"finish_reason":...': the prefix's last quote is the suffix's first,
    # so there is no text between them, and no valid chunk either.
    good = chunk({"content": "a"})
    at = good.index(b'"a"')
    overlapped = event(good[: at + 1] + good[at + 3 :])
    lead = text_events(["x"])
    for body in (overlapped + text_events(["b"]), text_events(["b"]) + overlapped):
        decoder = assert_same(lead + body, [lead, body])
        assert decoder._head
    decoder = assert_same(lead + overlapped, [lead, overlapped])  # a read of its own
    assert decoder._head


def test_crlf_streams_and_events_with_ids_stay_exact():
    body = text_events(["a", "b", "c"]).replace(b"\n", b"\r\n")
    assert_same(body, cut(body, [7, 80, 190, 300]))
    body = b"".join(b"id: %d\n" % i + event(chunk({"content": str(i)})) for i in range(9))
    assert_same(body, cut(body, [5, 100, 333]))


# --- [DONE] and the errors providers send inside a stream ------------------------------


def test_nothing_after_done_counts_even_a_chunk_that_fits_the_template(monkeypatch):
    decoder = BodyDecoder()
    decoder.decode(text_events(["a", "b"]))
    assert decoder._head
    after = text_events(["late"]) + event(b"{not json") + text_events(["later"])
    body = text_events(["c"]) + b"data: [DONE]\n\n" + after
    for reads in ([body], cut(body, [3, 70, 200, 260])):
        assert_same(text_events(["a", "b"]) + body, [text_events(["a", "b"]), *reads])
    out, err = decoder.decode(body)
    assert (out, err) == ([TextDelta("c")], None)
    assert decoder.chunks.done
    fed = count_exact_feeds(decoder, monkeypatch)
    assert decoder.decode(text_events(["more"]) + b"garbage\n\n") == ([], None)
    assert fed == [chunk({"content": "more"})]  # to the chunk decoder, which ignores it


def test_vllm_error_object_ends_the_stream_with_its_message():
    body = text_events(["Hel", "lo"]) + event(orjson.dumps(
        {"object": "error", "message": "CUDA out of memory", "type": "InternalServerError",
         "param": None, "code": 500}))
    decoder = assert_same(body, [body])
    out, err = BodyDecoder().decode(body)
    assert out == [TextDelta("Hello")]
    assert isinstance(err, UpstreamError) and err.message == "CUDA out of memory"
    assert not decoder.chunks.done


@pytest.mark.parametrize(("extra", "text", "message"), [
    ({}, "Hello!", 'upstream ended the answer with finish_reason "error"'),
    # An error object wins over the rest of its chunk (OpenRouter's delta is empty there).
    ({"error": {"code": 502, "message": "Provider disconnected"}}, "Hello",
     "Provider disconnected"),
])
def test_openrouter_finish_reason_error_ends_the_stream_with_its_message(extra, text, message):
    body = text_events(["Hel", "lo"]) + event(chunk({"content": "!"}, finish="error", **extra))
    assert_same(body, [body])
    out, err = BodyDecoder().decode(body)
    assert out == [TextDelta(text)]
    assert isinstance(err, UpstreamError) and err.message == message
    assert err.code == "upstream_error"


# --- generated streams, cut anywhere --------------------------------------------------

_texts = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(
    ["a", " the", "\n", '"', "\\", "é", "😀", "</think>", "<think>", ""])


@st.composite
def _events(draw: Any) -> bytes:
    kind = draw(st.sampled_from(
        ["text"] * 8 + ["reasoning", "text+finish"] * 2
        + ["role", "finish", "usage", "tool", "done", "id", "event", "comment", "blank",
           "error", "corrupt", "raw", "multiline", "nospace", "vary", "vllm_error",
           "finish_error", "openrouter_error"]))
    text = draw(_texts)
    if kind == "text":
        return event(chunk({"content": text}))
    if kind == "reasoning":
        return event(chunk({"content": None, "reasoning_content": text}))
    if kind == "role":
        return event(chunk({"role": "assistant", "content": ""}))
    if kind == "finish":
        return event(chunk({}, finish="stop"))
    if kind == "text+finish":  # "ab" is as long as the usual null
        return event(chunk({"content": text}, finish=draw(st.sampled_from(["ab", "stop"]))))
    if kind == "usage":
        return event(chunk(usage={"prompt_tokens": 3, "completion_tokens": 4}))
    if kind == "tool":
        return event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}))
    if kind == "done":
        return b"data: [DONE]\n\n"
    if kind == "id":
        return b"id: 5\n" + event(chunk({"content": text}))
    if kind == "event":
        return b"event: ping\n" + event(chunk({"content": text}))
    if kind == "comment":
        return b": keep-alive\n\n"
    if kind == "blank":
        return b"\n"
    if kind == "error":
        return b"event: error\n" + event(orjson.dumps({"error": {"message": "overloaded"}}))
    if kind == "corrupt":
        return event(b"{not json")
    if kind == "vllm_error":  # vLLM's bare error object, no choices
        return event(orjson.dumps({"object": "error", "message": text, "type": "BadRequestError",
                                   "param": None, "code": 400}))
    if kind == "finish_error":  # OpenRouter's finish_reason "error" without an error object
        return event(chunk({"content": text}, finish="error"))
    if kind == "openrouter_error":
        return event(chunk({"content": ""}, finish="error",
                           error={"code": 502, "message": "Provider disconnected"}))
    if kind == "raw":  # arbitrary bytes where the text goes
        raw = draw(st.binary(max_size=4))
        return event(chunk({"content": "X"}).replace(b'"X"', b'"' + raw + b'"'))
    if kind == "multiline":
        payload = chunk({"content": text})
        return b"data: " + payload[:10] + b"\ndata: " + payload[10:] + b"\n\n"
    if kind == "nospace":
        return b"data:" + chunk({"content": text}) + b"\n\n"
    return event(chunk({"content": text}, created=draw(st.integers(0, 3))))


@settings(max_examples=400, deadline=None)
@given(
    lead=st.lists(st.sampled_from(["Hi", " a", "b"]), min_size=0, max_size=3),
    events=st.lists(_events(), max_size=25),
    points=st.lists(st.integers(0, 10_000), max_size=8),
    crlf=st.booleans(),
    think_tags=st.booleans(),
)
def test_generated_streams_decode_exactly_as_the_exact_parsers(lead, events, points, crlf,
                                                               think_tags):
    body = text_events(lead) + b"".join(events)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    assert_same(body, cut(body, points), think_tags)
