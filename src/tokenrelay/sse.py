"""Incremental decoding of a foreign SSE stream (WHATWG "parsing an event stream").

The upstream body arrives in reads of arbitrary size: an event, a line, a CRLF pair or a
UTF-8 character may be split anywhere. :class:`SSEDecoder` works on bytes (CR and LF never
occur inside a multi-byte UTF-8 sequence, so splitting bytes on them is exact), keeps the
unterminated tail, and returns only complete events. Event data stays bytes so the JSON
parser downstream reads it without a decode/encode round trip.

This is on the per-token path, so the common cases are plain code: a read that is exactly
one ``data: ...\\n\\n`` event (a live stream) is sliced directly; a larger read is one
``bytes.split(b"\\n")``, and when every event in it is one line followed by a blank line
(what providers send) only every other line is looked at. Anything else takes the general
line walk. A read with CR is normalised with two ``bytes.replace`` calls first. No regexes,
no per-byte loops, no ``splitlines()`` (which also splits on VT, FF, FS, GS, RS, NEL,
U+2028 and U+2029). bench/bench_parsers.py measures it.

Our own frames (LF only, one ``data:`` line) are written by :mod:`tokenrelay.events`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_BOM = b"\xef\xbb\xbf"
_MESSAGE = "message"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: type, data (UTF-8 bytes), last event id and retry field."""

    event: str = _MESSAGE
    data: bytes = b""
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Turn SSE bytes, cut anywhere, into complete :class:`SSEEvent` objects.

    One decoder per upstream response. ``last_event_id`` persists across events (as the
    spec's last event ID buffer does) and ``reconnection_time`` keeps the last valid
    ``retry`` value even when the event carrying it had no data and so was not dispatched.
    """

    __slots__ = (
        "_cr",
        "_data",
        "_event",
        "_open",
        "_parts",
        "_retry",
        "_start",
        "_truncated",
        "last_event_id",
        "reconnection_time",
    )

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unterminated current line, in pieces
        self._start = True  # the BOM check at the very start is still to do
        self._cr = False  # the previous read ended with CR: a leading LF belongs to it
        self._data: list[bytes] | None = None  # data lines of the event being built
        self._event: str | None = None
        self._retry: int | None = None
        self._open = False  # a field line was seen since the last blank line
        self._truncated = False  # flush() discarded an unterminated event
        self.last_event_id: str | None = None
        self.reconnection_time: int | None = None

    @property
    def pending(self) -> bool:
        """True while (or, after :meth:`flush`, if) an unterminated event is buffered."""
        return bool(self._parts or self._open or self._truncated)

    @property
    def between_events(self) -> bool:
        """True when nothing is buffered: the next byte starts a new line of a new event."""
        return not (self._parts or self._open or self._cr or self._start)

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        """Feed one read; return the events it completed (possibly none)."""
        if self._start:
            chunk = self._skip_bom(chunk)
            if not chunk:
                return []
        if self._cr:
            if not chunk:
                return []
            self._cr = False
            if chunk[0] == 10:  # the LF of a CRLF split across reads
                chunk = chunk[1:]
        # find() rather than "in": on bytes it is twice as fast (memchr, no buffer protocol).
        has_cr = chunk.find(b"\r") >= 0
        if not has_cr:
            lf = chunk.find(b"\n")
            if lf < 0:
                # No line end: remember the piece; joining once later keeps long lines linear.
                if chunk:
                    self._parts.append(chunk)
                return []
            if (
                lf == len(chunk) - 2
                and chunk[-1] == 10
                and not self._parts
                and not self._open
                and chunk.startswith(b"data: ")
            ):
                # Exactly one "data: ...\n\n" event, as a live stream delivers its tokens.
                return [SSEEvent(_MESSAGE, chunk[6:-2], self.last_event_id, None)]
        parts = self._parts
        if parts:
            parts.append(chunk)
            chunk = b"".join(parts)
            self._parts = []
        if has_cr:
            # CRLF first, so that a CR directly followed by LF stays one line end.
            if chunk[-1] == 13:
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if tail:
            self._parts.append(tail)
        events: list[SSEEvent] = []
        start = 0
        if self._open:
            # Finish the event begun in an earlier read, up to its blank line.
            try:
                start = lines.index(b"") + 1
            except ValueError:
                start = len(lines)
            self._lines(lines[:start], events)
        if (len(lines) - start) & 1 or any(lines[start + 1 :: 2]):
            # Not the usual one line then one blank line per event: the general walk.
            self._lines(lines[start:] if start else lines, events)
            return events
        # The usual shape: every event is a single line, and most are "data: ...".
        last_id = self.last_event_id
        for line in lines[start::2]:
            if line.startswith(b"data: "):
                events.append(SSEEvent(_MESSAGE, line[6:], last_id, None))
            elif line:
                self._lines([line, b""], events)
                last_id = self.last_event_id  # an "id:" line may have set it
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: per the spec an unterminated event is discarded, so nothing returns.

        Every complete event was already returned by :meth:`decode`. ``pending`` keeps
        telling whether something was discarded, so callers may check it before or after.
        """
        self._truncated = self.pending
        self._parts = []
        self._data = None
        self._event = None
        self._retry = None
        self._open = False
        self._cr = False
        return []

    def _skip_bom(self, chunk: bytes) -> bytes:
        """Drop one leading UTF-8 BOM, which may itself arrive split across reads."""
        if self._parts:
            chunk = b"".join(self._parts) + chunk
            self._parts = []
        if len(chunk) < 3 and _BOM.startswith(chunk):
            if chunk:
                self._parts.append(chunk)  # a BOM prefix so far: wait for more
            return b""
        self._start = False
        return chunk[3:] if chunk.startswith(_BOM) else chunk

    def _lines(self, lines: list[bytes], events: list[SSEEvent]) -> None:
        """Interpret complete lines (terminators removed), appending dispatched events."""
        data = self._data
        event = self._event
        retry = self._retry
        seen = self._open  # a field line since the last blank line
        for line in lines:
            if not line:  # blank line: dispatch
                if data is not None:
                    events.append(
                        SSEEvent(
                            event or _MESSAGE,
                            data[0] if len(data) == 1 else b"\n".join(data),
                            self.last_event_id,
                            retry,
                        )
                    )
                    data = None
                event = None
                retry = None
                seen = False
            elif line.startswith(b"data:"):  # the hot case
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                if data is None:
                    data = [value]
                else:
                    data.append(value)
            elif line[0] == 58:  # ":" comment
                continue
            else:
                field, colon, value = line.partition(b":")
                if colon and value.startswith(b" "):
                    value = value[1:]
                if field == b"event":
                    event = value.decode("utf-8", "replace")
                elif field == b"data":  # "data" without a colon: an empty data line
                    if data is None:
                        data = [value]
                    else:
                        data.append(value)
                elif field == b"id":
                    seen = True
                    if b"\x00" not in value:
                        self.last_event_id = value.decode("utf-8", "replace")
                elif field == b"retry":
                    seen = True
                    if value.isdigit():  # bytes.isdigit() is ASCII digits only
                        retry = int(value)
                        self.reconnection_time = retry
                else:
                    seen = True  # unknown field: ignored, but part of this event
        self._data = data
        self._event = event
        self._retry = retry
        self._open = seen or data is not None or event is not None or retry is not None
