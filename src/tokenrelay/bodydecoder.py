"""An upstream chat-completion body, read by read, to normalized events.

:class:`BodyDecoder` composes the two exact parsers, :class:`~tokenrelay.sse.SSEDecoder`
and :class:`~tokenrelay.chunks.ChunkDecoder`, and adds a fast path for what a live answer
is made of: chunks that are byte for byte the same except for their text. OpenAI, vLLM,
Ollama and the simulator repeat id, model, created and fingerprint in every chunk, so

    data: {"id":"chatcmpl-1",...,"delta":{"content":"Hel"},"finish_reason":null}]}\\n\\n

differs from the next token's event only between ``"content":"`` and the closing quote.
Once the decoder has seen such a chunk it learns the template (the bytes before and after
the string). A read of whole events that all fit it is then one ``split`` on the bytes
between two texts (the end of one event and the start of the next) and one check of
what is left: the texts, which must be JSON string bodies. Parsing every object would give
the same result. The SSE and chunk parsers only see what does not fit (the role chunk,
the finish, usage, ``[DONE]``, a multi-line event, a CR...). Nothing after ``[DONE]``
counts, not even a chunk that fits the template.

Exactness is the rule, not an approximation:

* a template is only learnt when two probe chunks built from it decode, through a fresh
  ``ChunkDecoder``, to exactly one text (or reasoning) delta carrying a marker string,
  and to nothing for the empty string;
* an event only takes the fast path when it starts where the SSE decoder is between
  events (the start of a read at a boundary, or right after a blank line) and the read has
  no CR;
* every text must be a JSON string body (no quote, backslash or control character
  unescaped): then no text holds a line end, so the lines of the read are exactly the
  template's. A text is decoded by the same JSON parser (escapes) or UTF-8 decoder (none),
  one event at a time, so a character split across two chunks is still an error; whatever
  fails is handed to the exact parsers.

No regular expression is built per stream: ids differ per answer, and compiling one costs
more than a short answer's relay.

bench/bench_parsers.py measures both paths; tests/test_bodydecoder.py compares them with
the exact parsers on generated streams cut at random places.
"""

from __future__ import annotations

import re

from orjson import JSONDecodeError, dumps, loads

from tokenrelay.chunks import ChunkDecoder
from tokenrelay.errors import UpstreamError
from tokenrelay.events import Event, ReasoningDelta, TextDelta
from tokenrelay.sse import SSEDecoder

__all__ = ["BodyDecoder"]

# A quote, a backslash or a control character: a text without one is its own JSON string
# body, and only UTF-8 decoding is left to check.
_UNSAFE = re.compile(rb'["\\\x00-\x1f]').search
# Text chunks that may fail to give a template before the decoder stops trying (a
# provider whose chunks vary elsewhere, e.g. a counter, never gives one).
_LEARN_ATTEMPTS = 8
_FIRST_EVENTS = 4
_PROBE_TEXT = "tokenrelay-probe"
_PROBE = _PROBE_TEXT.encode()
_TEXT_KEYS = ("content", "reasoning_content", "reasoning")


class BodyDecoder:
    """Decode one upstream response body; ``decode`` once per read."""

    __slots__ = ("_head", "_kind", "_learn", "_middle", "_prefix", "_suffix", "_tail",
                 "chunks", "sse")

    def __init__(self, *, think_tags: bool = False) -> None:
        self.sse = SSEDecoder()
        self.chunks = ChunkDecoder(think_tags=think_tags)
        # <think> tags make the text's meaning depend on its content: no template then.
        self._learn = 0 if think_tags else _LEARN_ATTEMPTS
        self._prefix = b""  # the chunk before its text (up to the opening quote)...
        self._suffix = b""  # ... and after it (from the closing quote)
        self._head = b""  # an event before its text: "data: " + prefix; empty: no template
        self._tail = b""  # an event after its text: suffix + blank line
        self._middle = b""  # from one event's text to the next one's: tail + head
        self._kind: type[TextDelta | ReasoningDelta] = TextDelta

    def decode(self, data: bytes) -> tuple[list[Event], UpstreamError | None]:
        """The events of one read, and the error that stopped the parse (if any): the
        good text before a corrupt chunk is still returned."""
        out: list[Event] = []
        head, tail, sse = self._head, self._tail, self.sse
        if (
            head
            and data.endswith(tail)
            and data.startswith(head)
            and len(data) >= len(head) + len(tail)
            # sse.between_events, without the property's call (once per read)
            and not (sse._parts or sse._open or sse._cr or sse._start)
        ):
            # One whole template event, as a live answer's tokens come (what _fast finds
            # first, with fewer searches): a text without a control character holds no
            # line end, so the read is exactly this one event, and it has no CR (head and
            # tail come from an SSE payload, which has none).
            body = data[len(head) : len(data) - len(tail)]
            if _UNSAFE(body) is None:
                try:
                    text = body.decode()
                except UnicodeDecodeError:
                    pass  # the exact parsers say what is wrong with it
                else:
                    if text:
                        self.chunks.content_chunks += 1
                        out.append(self._kind(text))
                    return out, None
        try:
            if not head and self._learn:
                data = self._first_events(data, out)
            if not self._head or data.find(b"\r") >= 0:
                self._exact(data, out)
            else:
                self._fast(data, out)
        except UpstreamError as exc:
            return out, exc
        except _Ended:
            # [DONE]: the rest of this read was not looked at, and no template applies
            # from now on, so every later event goes to the chunk decoder, which ignores it.
            self._head = self._prefix = b""
            self._learn = 0
        return out, None

    def _first_events(self, data: bytes, out: list[Event]) -> bytes:
        """No template yet: the exact parsers through the read's first few events (the
        role chunk and a text chunk), so that the rest of a long read may use the
        template they teach. Returns the rest."""
        cut = -2
        for _ in range(_FIRST_EVENTS):
            cut = data.find(b"\n\n", cut + 2)
            if cut < 0:
                return data
        self._exact(data[: cut + 2], out)
        return data[cut + 2 :]

    def _exact(self, data: bytes, out: list[Event]) -> None:
        """The exact parsers (the template still saves the JSON parse of a fitting chunk),
        learning a template from the text chunks they see."""
        chunks = self.chunks
        prefix, suffix = self._prefix, self._suffix
        for event in self.sse.decode(data):
            if event.event == "message" or event.event == "error":
                payload = event.data
                if prefix and (text := _between(payload, prefix, suffix)) is not None:
                    self._add(text, out, self._kind)
                    continue
                if self._learn:
                    before = chunks.content_chunks
                    chunks.feed(payload, out)
                    # A text chunk, and no template yet or one for the other kind (the
                    # answer after the reasoning): learn from it.
                    if chunks.content_chunks != before and (
                        not prefix or type(out[-1]) is not self._kind
                    ):
                        self._learn_from(payload)
                        prefix, suffix = self._prefix, self._suffix
                else:
                    chunks.feed(payload, out)
                if chunks.done:
                    raise _Ended

    def _fast(self, data: bytes, out: list[Event]) -> None:
        """Split the read at event boundaries: the whole events in the middle go through
        the template; an event begun in the previous read and the unfinished one at the
        end go through the exact parsers."""
        start = 0
        if self.sse.between_events:
            # One whole event, as a live answer's tokens come: its text alone.
            if (
                data.find(b"\n\n") == len(data) - 2
                and (text := _between(data, self._head, self._tail)) is not None
            ):
                self._add(text, out, self._kind)
                return
        else:
            start = data.find(b"\n\n") + 2
            if start == 1 or start == len(data):
                self._exact(data, out)
                return
            self._exact(data[:start], out)
            if not self.sse.between_events:
                self._exact(data[start:], out)
                return
        end = data.rfind(b"\n\n") + 2
        if end <= start:  # no whole event after start
            self._exact(data[start:] if start else data, out)
            return
        self._events(data if start == 0 and end == len(data) else data[start:end], out)
        if end < len(data):
            self._exact(data[end:], out)

    def _events(self, seg: bytes, out: list[Event]) -> None:
        """Whole events (``seg`` starts between events and ends with a blank line)."""
        head, tail = self._head, self._tail
        if seg.startswith(head):
            # The run of events up to the last one that ends like the template: in a
            # fast answer's last read, the finish, usage and [DONE] come after it.
            cut = len(seg) if seg.endswith(tail) else seg.rfind(tail) + len(tail)
            texts = self._texts(seg, cut)
            if texts is not None:
                joined = texts[0] if len(texts) == 1 else b"".join(texts)
                text: str | None
                if _UNSAFE(joined) is None:
                    text = joined.decode() if joined.isascii() else _decode_each(texts)
                else:
                    text = _decode_each(texts)
                if text is not None:  # every event of the run fits
                    self._add(text, out, self._kind, len(texts) - texts.count(b""))
                    if cut < len(seg):
                        self._walk(seg[cut:], out)
                    return
        self._walk(seg, out)

    def _texts(self, seg: bytes, cut: int) -> list[bytes] | None:
        """The texts of ``seg[:cut]`` if it is template events and nothing else (it starts
        with the head and ends with the tail).

        Split on the blank line and "data: " between events (a short separator: CPython
        searches for a long one with an algorithm it sets up again for every occurrence),
        then count the template's whole middle once: one middle per split, with the heads
        and tails at the ends, means every event is prefix, text, suffix."""
        head, tail = self._head, self._tail
        if cut < len(head) + len(tail):
            return None
        prefix, suffix = len(self._prefix), len(self._suffix)
        events = seg[6 : cut - 2].split(b"\n\ndata: ")  # 6: "data: ", 2: the blank line
        if len(events) > 1:
            count = seg.count(self._middle, 0, cut)
            if (
                count != len(events) - 1
                or len(events[0]) < prefix + suffix
                or len(events[-1]) < prefix + suffix
            ):
                return None
        return [event[prefix : len(event) - suffix] for event in events]

    def _walk(self, seg: bytes, out: list[Event]) -> None:
        """Whole events of which some do not fit: event by event, the template where it
        applies and the exact parsers for the rest. (These events are of this template,
        even if the parsers in between learn another.)"""
        head, suffix, kind, find = self._head, self._suffix, self._kind, seg.find
        pending = 0  # where the events not yet given to the exact parsers start
        at = 0  # the start of an event: after a blank line, with no CR in the read
        while at < len(seg):
            end = find(b"\n\n", at)  # a template event is one line: its text has no LF
            if end < 0:
                break
            start, stop = at + len(head), end - len(suffix)
            if (
                seg.startswith(head, at)
                and stop >= start
                and seg.startswith(suffix, stop)
                and (text := _text(seg[start:stop])) is not None
            ):
                if at != pending:
                    self._exact(seg[pending:at], out)
                self._add(text, out, kind)
                pending = end + 2
            at = end + 2
        if pending < len(seg):
            self._exact(seg[pending:] if pending else seg, out)

    def _add(self, text: str, out: list[Event], kind: type[TextDelta | ReasoningDelta],
             count: int = 1) -> None:
        """The text of ``count`` template events, merged into the previous item of its
        kind (as the chunk decoder merges); empty text is no event and counts no chunk."""
        if text:
            self.chunks.content_chunks += count
            if out and type(last := out[-1]) is kind:
                last.text += text
            else:
                out.append(kind(text))

    def _learn_from(self, data: bytes) -> None:
        """Try to make ``data`` (a chunk that carried text) the template."""
        self._learn -= 1
        try:
            delta = loads(data)["choices"][0]["delta"]
            for key in _TEXT_KEYS:
                value = delta.get(key)
                if type(value) is str and value:
                    break
            else:
                return
        except (LookupError, TypeError, AttributeError, JSONDecodeError):
            return
        template = _template(data, value)
        if template is not None:
            prefix, suffix, self._kind = template
            self._prefix, self._suffix = prefix, suffix
            self._head = b"data: " + prefix
            self._tail = suffix + b"\n\n"
            self._middle = self._tail + self._head


class _Ended(Exception):
    """``[DONE]`` was decoded: stop reading the read (what follows it is ignored)."""


def _template(
    data: bytes, text: str
) -> tuple[bytes, bytes, type[TextDelta | ReasoningDelta]] | None:
    """Prefix and suffix around ``text`` in ``data``, if the probes prove it is the only
    thing that varies; and the kind of delta it becomes."""
    if data.find(b"\n") >= 0:
        return None  # data of several lines: its events are not one "data:" line each
    encoded = dumps(text)  # with its quotes
    at = data.find(encoded)
    if at < 0 or data.find(encoded, at + 1) >= 0:
        return None  # written another way (escapes), or not only there
    prefix, suffix = data[: at + 1], data[at + len(encoded) - 1 :]
    # The marker appears nowhere else, so a delta that carries it came from this place:
    # any other non-empty text there becomes that text (the chunk decoder only asks
    # whether it is a non-empty string). The empty string must give nothing.
    probe = ChunkDecoder()
    out: list[Event] = []
    try:
        probe.feed(prefix + _PROBE + suffix, out)
        first = out[0] if len(out) == 1 else None
        if (
            not isinstance(first, (TextDelta, ReasoningDelta))  # neither has a subclass
            or first.text != _PROBE_TEXT
            or probe.content_chunks != 1
            or probe.done
        ):
            return None
        kind: type[TextDelta | ReasoningDelta] = type(first)
        out = []
        probe.feed(prefix + suffix, out)
    except UpstreamError:
        return None
    return (prefix, suffix, kind) if not out and probe.content_chunks == 1 else None


def _between(data: bytes, head: bytes, tail: bytes) -> str | None:
    """The text of ``data`` if it is ``head``, a JSON string body and ``tail``; else None."""
    if len(data) < len(head) + len(tail) or not data.startswith(head) or not data.endswith(tail):
        return None
    return _text(data[len(head) : len(data) - len(tail)])


def _text(body: bytes) -> str | None:
    """One JSON string body as the JSON parser reads it; None if it is not one. (With its
    quotes added, any unescaped quote inside leaves trailing bytes the parser rejects.)"""
    try:
        if _UNSAFE(body) is None:
            return body.decode()
        text: str = loads(b'"' + body + b'"')
        return text
    except (UnicodeDecodeError, JSONDecodeError):
        return None


def _decode_each(bodies: list[bytes]) -> str | None:
    """The bodies' texts joined, each decoded on its own (a character split between two
    chunks is as invalid here as in the chunks); None if one is not valid."""
    texts = []
    for body in bodies:
        text = _text(body)
        if text is None:
            return None
        texts.append(text)
    return "".join(texts)
