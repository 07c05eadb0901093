"""tokenrelay.sse: the WHATWG event-stream parsing rules, under every chunking."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.sse import SSEDecoder, SSEEvent

BOM = "\ufeff".encode()


def decode_all(raw: bytes) -> list[SSEEvent]:
    """Decode a stream given in one piece."""
    decoder = SSEDecoder()
    events = decoder.decode(raw)
    assert decoder.flush() == []
    return events


def decode_chunks(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.decode(chunk)
    assert decoder.flush() == []
    return events


def cut(raw: bytes, offsets: list[int]) -> list[bytes]:
    bounds = [0, *sorted(offsets), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def ev(data: str, event: str = "message", id: str | None = None, retry: int | None = None):
    return SSEEvent(event, data.encode(), id, retry)


def reference(raw: bytes) -> list[SSEEvent]:
    """A literal, slow transcription of the spec over text, as an independent oracle."""
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\r":
            lines.append("".join(current))
            current = []
            if text[i + 1 : i + 2] == "\n":
                i += 1
        elif c == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    events = []
    data, event_type, last_id, retry = "", "", None, None
    for line in lines:
        if line == "":
            if data:
                events.append(SSEEvent(event_type or "message", data[:-1].encode(), last_id, retry))
            data, event_type, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_id = value
        elif field == "retry":
            if value and all(ch in "0123456789" for ch in value):
                retry = int(value)
    return events


def assert_every_cut(raw: bytes, expected: list[SSEEvent]) -> None:
    """Whole, cut once at every offset, cut twice at many offsets, and byte by byte."""
    assert decode_all(raw) == expected
    for i in range(len(raw) + 1):
        assert decode_chunks(cut(raw, [i])) == expected, f"cut at {i}"
    if len(raw) <= 150:
        pairs = [(i, j) for i in range(len(raw) + 1) for j in range(i, len(raw) + 1)]
    else:
        rng = random.Random(len(raw))
        pairs = [(rng.randrange(len(raw) + 1), rng.randrange(len(raw) + 1)) for _ in range(300)]
    for offsets in pairs:
        assert decode_chunks(cut(raw, list(offsets))) == expected, f"cut at {offsets}"
    assert decode_chunks([raw[i : i + 1] for i in range(len(raw))]) == expected
    # One read per line, terminator included, as a live stream often arrives.
    line_ends = [i + 1 for i, byte in enumerate(raw) if byte in b"\r\n"]
    assert decode_chunks(cut(raw, line_ends)) == expected


# Spec vectors -----------------------------------------------------------------------------


def test_single_data_line():
    assert decode_all(b"data: hello\n\n") == [ev("hello")]


def test_comments_are_ignored():
    raw = b": heartbeat\n\n:\n: x\ndata: a\n: in the middle\ndata: b\n\n"
    assert decode_all(raw) == [ev("a\nb")]


def test_multi_line_data_joined_with_lf_and_final_lf_removed():
    assert decode_all(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ev("YHOO\n+2\n10")]


def test_empty_data_line_dispatches_an_empty_event():
    # The data buffer is "\n" (not empty), so an event with empty data is dispatched.
    assert decode_all(b"data:\n\n") == [ev("")]
    assert decode_all(b"data\n\n") == [ev("")]
    assert decode_all(b"data\ndata\n\n") == [ev("\n")]


def test_blank_line_without_data_dispatches_nothing_and_resets_event_type():
    raw = b"event: update\n\ndata: x\n\n"
    assert decode_all(raw) == [ev("x")]


def test_event_names():
    raw = b"event: add\ndata: 1\n\ndata: 2\n\nevent:remove\ndata: 3\n\nevent\ndata: 4\n\n"
    assert decode_all(raw) == [
        ev("1", "add"),
        ev("2"),  # the event type does not persist
        ev("3", "remove"),
        ev("4"),  # an empty event type means "message"
    ]


def test_id_persists_across_events():
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\nid\ndata: d\n\n"
    assert decode_all(raw) == [ev("a", id="1"), ev("b", id="1"), ev("c", id="2"), ev("d", id="")]


def test_id_is_none_until_set_and_applies_at_dispatch():
    raw = b"data: a\n\ndata: b\nid: 5\n\n"
    assert decode_all(raw) == [ev("a"), ev("b", id="5")]


def test_id_with_nul_is_ignored():
    raw = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"
    assert decode_all(raw) == [ev("a", id="1"), ev("b", id="1")]


def test_id_set_by_an_event_without_data_still_persists():
    decoder = SSEDecoder()
    assert decoder.decode(b"id: 7\n\ndata: a\n\n") == [ev("a", id="7")]
    assert decoder.last_event_id == "7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1000", 1000),
        (b"0", 0),
        (b"007", 7),
        (b"10a", None),
        (b"-1", None),
        (b"1.5", None),
        (b"", None),
        (b" 5", None),
        (b"\xd9\xa3", None),
    ],  # "٣" is a digit, but not ASCII
)
def test_retry_accepts_ascii_digits_only(value, expected):
    assert decode_all(b"retry: " + value + b"\ndata: x\n\n") == [ev("x", retry=expected)]


def test_retry_belongs_to_its_event_and_reconnection_time_persists():
    decoder = SSEDecoder()
    events = decoder.decode(b"retry: 300\ndata: a\n\ndata: b\n\nretry: 500\n\ndata: c\n\n")
    assert events == [ev("a", retry=300), ev("b"), ev("c")]
    assert decoder.reconnection_time == 500


def test_unknown_fields_are_ignored():
    assert decode_all(b"foo: bar\nDATA: no\nData: no\ndata: yes\nbaz\n\n") == [ev("yes")]


def test_only_one_leading_space_is_stripped():
    raw = b"data:  two\n\ndata:none\n\ndata: \n\nevent:  x\ndata: a \n\n"
    assert decode_all(raw) == [ev(" two"), ev("none"), ev(""), ev("a ", event=" x")]


def test_value_may_contain_colons():
    assert decode_all(b'data: {"a": "b:c"}\n\n') == [ev('{"a": "b:c"}')]


def test_leading_bom_is_skipped_once():
    assert decode_all(BOM + b"data: a\n\n") == [ev("a")]
    # A second BOM is part of the first field name, which is then unknown.
    assert decode_all(BOM + BOM + b"data: a\n\ndata: b\n\n") == [ev("b")]
    # A BOM later in the stream is not special.
    assert decode_all(b"data: a\n\n" + BOM + b"data: b\n\n") == [ev("a")]
    assert decode_all(b"data: " + BOM + b"\n\n") == [ev("\ufeff")]


def test_bom_split_across_reads():
    for chunks in (
        [BOM[:1], BOM[1:2], BOM[2:] + b"data: a\n\n"],
        [BOM[:2], BOM[2:], b"data: a\n\n"],
    ):
        assert decode_chunks(chunks) == [ev("a")]
    assert decode_chunks([b"", BOM[:1], b"", BOM[1:], b"data: a\n\n"]) == [ev("a")]


def test_partial_bom_prefix_is_not_dropped():
    # "\xef\xbb" followed by something else is not a BOM: the bytes stay in the field name.
    assert decode_all(b"\xef\xbbdata: a\n\ndata: b\n\n") == [ev("b")]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_ends(eol):
    raw = eol.join([b"event: e", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert decode_all(raw) == [ev("a\nb", "e"), ev("c")]


def test_mixed_line_ends():
    raw = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r\n"
    # "\r\r\n" is CR then CRLF: two line ends, so the last event is complete too.
    assert decode_all(raw) == [ev("a\nb\nc"), ev("d")]


def test_lf_cr_is_two_line_ends():
    assert decode_all(b"data: a\n\r") == [ev("a")]


def test_crlf_split_between_reads_is_one_line_end():
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\r") == []
    assert decoder.decode(b"") == []
    assert decoder.decode(b"\ndata: b\r") == []
    # Had the LF counted as a second line end, "a\nb" would have been dispatched already.
    assert decoder.decode(b"\n\r") == [ev("a\nb")]
    assert decoder.decode(b"\n") == []  # the LF of that last CRLF, not a blank line
    assert not decoder.pending


def test_cr_at_end_of_read_followed_by_another_line():
    assert decode_chunks([b"data: a\r", b"data: b\r", b"\r"]) == [ev("a\nb")]


@pytest.mark.parametrize(
    "char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_splitlines_characters_are_not_line_ends(char):
    raw = f"data: a{char}b\n\n".encode()
    assert decode_all(raw) == [ev(f"a{char}b")]


def test_data_is_raw_bytes():
    # The decoder never decodes data, so even bytes that are not UTF-8 pass through.
    assert decode_all(b"data: \xff\xfe\n\n") == [SSEEvent("message", b"\xff\xfe", None, None)]


def test_whatwg_examples():
    """The examples of the HTML standard, section "Parsing an event stream"."""
    assert decode_all(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ev("YHOO\n+2\n10")]
    stream = (
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert decode_all(stream) == [
        ev("first event", id="1"),
        ev("second event", id=""),
        ev(" third event", id=""),
    ]
    decoder = SSEDecoder()
    assert decoder.decode(b"data\n\ndata\ndata\n\ndata:") == [ev(""), ev("\n")]
    assert decoder.pending
    assert decoder.flush() == []  # the last, unterminated event is discarded
    assert decoder.pending
    assert decode_all(b"data:test\n\ndata: test\n\n") == [ev("test"), ev("test")]


# Any chunking gives the same events ---------------------------------------------------------

# Text with multi-byte characters (2, 4 and 3 bytes) and an escaped quote and colon.
TEXT_CHUNK = '{"choices":[{"delta":{"content":"caf\u00e9 \U0001f600 \u2028 \\"q:\\""}}]}'
OPENAI = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b": keep-alive\n\n"
    + f"data: {TEXT_CHUNK}\n\n".encode()
    + b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

VECTORS = [
    OPENAI,
    OPENAI.replace(b"\n", b"\r\n"),
    OPENAI.replace(b"\n", b"\r"),
    BOM + OPENAI,
    BOM + b"data: a\r\n\r\ndata: b\rdata: c\n\r\nid: 3\r\nretry: 10\r\nevent: x\n\n",
    b"data: \xc3\xa9\xf0\x9f\x98\x80\xe2\x80\xa8\r\n\r\n",
    b": c\r\rdata\r\n\r\n\r\ndata:  x\n\ndata: tail-without-end",
    b"id: 1\x00\n\nid: 2\r\ndata:\r\n\r\n",
    # A read that looks like a whole "data: ...\n\n" event but continues an earlier one.
    b"data: data: x\n\nevent: e\ndata: y\n\ndata: a\ndata: b\n\nid: 9\n\ndata: c\n\n",
]


@pytest.mark.parametrize("raw", VECTORS)
def test_every_cut_gives_the_same_events(raw):
    expected = reference(raw)
    assert expected  # every vector dispatches something
    assert_every_cut(raw, expected)


def test_openai_vector_events():
    events = decode_all(OPENAI)
    assert [e.data for e in events][-1] == b"[DONE]"
    assert events[1].data.decode() == TEXT_CHUNK


def test_long_line_fed_byte_by_byte():
    payload = b"x" * 20_000
    decoder = SSEDecoder()
    events = []
    for i in range(len(payload)):
        events += decoder.decode(payload[i : i + 1])
    assert events == [] and decoder.pending
    assert decoder.decode(b"\n\n") == []  # a field named "xxx…", unknown
    assert decoder.decode(b"data: " + payload) == []
    assert decoder.decode(b"\n\n") == [SSEEvent("message", payload, None, None)]


_values = st.text(
    alphabet=st.sampled_from(["a", " ", ":", "é", "😀", "\u2028", "\x00", "1", "\ufeff", "{", '"']),
    max_size=6,
)
_lines = st.one_of(
    st.just(""),
    st.builds(lambda v: ":" + v, _values),
    st.builds(
        lambda f, sep, v: f + sep + v,
        st.sampled_from(["data", "event", "id", "retry", "foo", ""]),
        st.sampled_from([":", ": ", ""]),
        _values,
    ),
    st.builds(lambda d: f"retry: {d}", st.integers(0, 99999)),
)
_streams = st.builds(
    lambda bom, lines, eols: (
        ("\ufeff" if bom else "")
        + "".join(line + eol for line, eol in zip(lines, eols, strict=False))
    ),
    st.booleans(),
    st.lists(_lines, max_size=25),
    st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=25, max_size=25),
)


@settings(max_examples=200, deadline=None)
@given(stream=_streams, data=st.data())
def test_random_streams_and_chunkings_match_the_reference(stream, data):
    raw = stream.encode()
    expected = reference(raw)
    assert decode_all(raw) == expected
    offsets = data.draw(st.lists(st.integers(0, len(raw)), max_size=8))
    assert decode_chunks(cut(raw, offsets)) == expected


# pending --------------------------------------------------------------------------------------


def test_pending():
    decoder = SSEDecoder()
    assert not decoder.pending
    decoder.decode(b'data: {"a"')  # an incomplete line
    assert decoder.pending
    decoder.decode(b"}\n")  # a complete line, but the event is not terminated
    assert decoder.pending
    assert decoder.decode(b"\n") == [SSEEvent("message", b'{"a"}', None, None)]
    assert not decoder.pending
    decoder.decode(b": heartbeat\n\n: another\n")  # comments are not events
    assert not decoder.pending
    decoder.decode(b"data: x\r")
    assert decoder.pending
    decoder.decode(b"\n\r\n")
    assert not decoder.pending


@pytest.mark.parametrize("line", [b"event: x\n", b"id: 1\n", b"retry: 5\n", b"foo\n", BOM[:2]])
def test_pending_after_any_field_line_or_partial_input(line):
    decoder = SSEDecoder()
    decoder.decode(line)
    assert decoder.pending
    decoder.decode(b"\n" if line.endswith(b"\n") else BOM[2:] + b"\n")
    assert not decoder.pending


def test_flush_discards_an_unterminated_event_and_keeps_reporting_it():
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\n\ndata: b\n") == [ev("a")]
    assert decoder.flush() == []
    assert decoder.pending


def test_flush_after_a_complete_stream_is_not_pending():
    decoder = SSEDecoder()
    assert decoder.decode(b"data: [DONE]\n\n") == [ev("[DONE]")]
    assert decoder.flush() == []
    assert not decoder.pending
