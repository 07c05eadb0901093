"""Microseconds per event of the upstream wire parsers (SSEDecoder + ChunkDecoder).

Not a test: run ``python bench/bench_parsers.py`` and read the numbers. The stream is 500
realistic OpenAI chunks of one word each plus ``[DONE]``, fed the way the upstream client
sees it: in 16 KB reads (a fast provider, or a backlog after a stall) and one event per
read (a slow provider, one token per packet). Each case runs in a loop mirroring the
caller: a fresh output list per read, every SSE event's data fed to the chunk decoder.
``BodyDecoder`` adds the template fast path to the two (what the relay runs).
The budget (STYLE.md point 15) is ~1 µs per event for each parser, 6 µs for a whole token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenrelay.bodydecoder import BodyDecoder
from tokenrelay.chunks import ChunkDecoder
from tokenrelay.sse import SSEDecoder

N_EVENTS = 500
READ_SIZE = 16 * 1024


def make_stream(n: int = N_EVENTS) -> tuple[bytes, list[bytes]]:
    """The raw body and its events (one ``bytes`` per event, terminator included)."""
    first = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        b'"finish_reason":null}]}\n\n'
    )
    word = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}\n\n'
    )
    last = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    events = [first] + [word] * (n - 2) + [last, b"data: [DONE]\n\n"]
    return b"".join(events), events


def run_both(reads: list[bytes]) -> int:
    """SSE decode + chunk decode, as the upstream client does; returns events seen."""
    sse = SSEDecoder()
    chunks = ChunkDecoder()
    seen = 0
    for read in reads:
        out: list[object] = []
        events = sse.decode(read)
        seen += len(events)
        for event in events:
            chunks.feed(event.data, out)
    chunks.finish()
    return seen


def run_body(reads: list[bytes]) -> int:
    """BodyDecoder: the same parsers plus the template fast path (what the relay runs);
    returns the events seen (the text chunks, plus the role, finish and [DONE])."""
    body = BodyDecoder()
    for read in reads:
        _, error = body.decode(read)
        assert error is None
    body.chunks.finish()
    return body.chunks.content_chunks + 3


def run_sse(reads: list[bytes]) -> int:
    sse = SSEDecoder()
    seen = 0
    for read in reads:
        seen += len(sse.decode(read))
    return seen


def run_chunks(payloads: list[bytes], per_read: int) -> int:
    """The chunk decoder alone, with a fresh output list every ``per_read`` payloads."""
    chunks = ChunkDecoder()
    out: list[object] = []
    for i, payload in enumerate(payloads):
        if i % per_read == 0:
            out = []
        chunks.feed(payload, out)
    return len(payloads)


def run_loads(payloads: list[bytes]) -> int:
    for payload in payloads[:-1]:
        orjson.loads(payload)
    return len(payloads)


def measure(fn: Callable[[], int], repeat: int) -> tuple[float, float]:
    """(best, median) µs per event over ``repeat`` runs."""
    n = fn()  # warm up, and count the events
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return min(times) / n / 1000, statistics.median(times) / n / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    raw, events = make_stream()
    batched = [raw[i : i + READ_SIZE] for i in range(0, len(raw), READ_SIZE)]
    one_each = events
    payloads = [e.data for e in SSEDecoder().decode(raw)]
    assert run_both(batched) == run_both(one_each) == len(events) == len(payloads)
    assert run_body(batched) == run_body(one_each) == len(events)
    per_read = len(events) // len(batched) + 1

    cases = [
        ("sse + chunks, 16 KB reads", lambda: run_both(batched)),
        ("sse + chunks, one event per read", lambda: run_both(one_each)),
        ("body decoder (template), 16 KB reads", lambda: run_body(batched)),
        ("body decoder (template), one event per read", lambda: run_body(one_each)),
        ("sse only, 16 KB reads", lambda: run_sse(batched)),
        ("sse only, one event per read", lambda: run_sse(one_each)),
        ("chunks only, ~16 KB worth per out list", lambda: run_chunks(payloads, per_read)),
        ("chunks only, one per out list", lambda: run_chunks(payloads, 1)),
        ("(floor: orjson.loads alone)", lambda: run_loads(payloads)),
    ]
    print(
        f"{len(events)} events, {len(raw)} bytes, {len(batched)} reads of <= {READ_SIZE} bytes; "
        f"Python {sys.version.split()[0]}"
    )
    print(f"{'case':42} {'best µs/event':>14} {'median':>8}")
    for name, fn in cases:
        best, median = measure(fn, args.repeat)
        print(f"{name:42} {best:14.3f} {median:8.3f}")


if __name__ == "__main__":
    main()
