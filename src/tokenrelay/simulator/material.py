"""The text simulated answers are assembled from, and what a token is.

Immutable phrases, kept small and varied: markdown features (headings, lists, code,
tables, emphasis, links), punctuation and some non-ASCII. :func:`tokenize` cuts text into
word pieces of 1-6 characters, and :class:`Material` holds the phrases pre-tokenized once,
so a long answer costs list concatenation.
"""

from __future__ import annotations

import re

__all__ = ["CITIES", "DEFAULT_TOOLS", "INTROS", "THOUGHTS", "Material", "tokenize"]

_TITLES = (
    "Streaming tokens reliably",
    "How server-sent events work",
    "Backpressure in practice",
    "Retries without duplicates",
    "Designing for reconnection",
    "Measuring time to first token",
    "Keeping connections alive",
    "A short overview",
    "Thinking about latency",
    "What actually happens on the wire",
)

INTROS = (
    'You asked: "{q}". Here is a short, structured answer.',
    'Regarding "{q}": here is how I would think about it.',
    '"{q}" is a good question, so let me walk through it.',
    'Thanks for asking about "{q}". The key points are below.',
)

_SENTENCES = (
    "A streaming response sends each token as soon as the model produces it.",
    "The client reads the body incrementally and renders text as it arrives.",
    "Server-sent events are plain text: every event ends with a blank line.",
    "Latency matters more than throughput for the first few words.",
    "Most users perceive anything below twenty tokens per second as sluggish.",
    "A proxy that buffers the response makes the whole answer arrive at once.",
    "Retrying before the first token is safe; retrying after it duplicates text.",
    "An idle connection may be closed by a load balancer after a minute or two.",
    "A heartbeat comment keeps intermediaries from timing the stream out.",
    "Every event carries an id, so a client can resume after a reload.",
    "The generation should keep running while the browser reconnects.",
    "Cancelling the upstream request is the only way to stop the billing.",
    "Parsers must accept any chunking, including a UTF-8 character split in two.",
    "Rate limits are announced with a 429 status and a Retry-After header.",
    "Exponential backoff with jitter spreads retries out over time.",
    "A partial answer is still worth keeping when the stream fails.",
    "Reasoning models may think for a long time before they say anything.",
    "Tool calls arrive as fragments that must be joined by their index.",
    "It is worth measuring both time to first token and tokens per second.",
    "Small, well-named functions make the hot path easy to profile.",
    "The journal is append-only, which makes replay simple and exact.",
    "Slow readers should never slow down the producer or other readers.",
    "Café owners and naïve benchmarks both care about the résumé of a request.",
    "Think of the stream as a log, not as a socket — the socket is just a view.",
    "In short: decouple generation from delivery, and most problems disappear.",
    "Backpressure tells the sender to wait until the receiver catches up.",
    "A test that never fails proves nothing, so every check should be able to.",
    "Determinism makes simulated answers easy to assert on in tests.",
    "Compression middleware can silently buffer an event stream; turn it off.",
    "HTTP/2 lets many streams share one connection without head-of-line waits.",
)

_SUBHEADINGS = ("Key points", "In practice", "Details", "Things to watch", "Summary")

_BULLETS = (
    "**Latency**: send the first token as early as possible.",
    "**Resilience**: retry only before any text was delivered.",
    "**Resume**: give every event a monotonic id.",
    "**Cancellation**: abort the upstream call when the user presses Stop.",
    "**Heartbeats**: a comment line every 15 seconds keeps proxies happy.",
    "Disable buffering with `X-Accel-Buffering: no`.",
    "Use `Cache-Control: no-cache` on event streams.",
    "Escape model output before rendering it as HTML.",
    "Keep partial content when the stream breaks.",
    "Honour `Retry-After`, in seconds or as an HTTP date.",
    "Measure tokens per second per model, not just price.",
    "Bound every buffer, and say what happens when it is full.",
    "Split lines on CR, LF or CRLF — never on anything else.",
    "Prefer real servers over mocks in integration tests.",
)

_CODE = (
    (
        "python",
        'async for chunk in client.stream("POST", url, json=body):\n'
        "    for event in decoder.decode(chunk):\n"
        '        print(event.data, end="", flush=True)',
    ),
    (
        "javascript",
        "const res = await fetch(url, { method: 'POST', body });\n"
        "const reader = res.body.getReader();\n"
        "const decoder = new TextDecoder();\n"
        "while (true) {\n"
        "  const { done, value } = await reader.read();\n"
        "  if (done) break;\n"
        "  buffer += decoder.decode(value, { stream: true });\n"
        "}",
    ),
    (
        "bash",
        "curl -N http://localhost:8000/v1/chat/completions \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        '  -d \'{"model": "sim-chat", "stream": true, "messages": []}\'',
    ),
    (
        "json",
        '{\n  "id": "chatcmpl-123",\n  "object": "chat.completion.chunk",\n'
        '  "choices": [{"index": 0, "delta": {"content": "Hi"}}]\n}',
    ),
    (
        "python",
        "def backoff(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:\n"
        "    return random.uniform(0, min(cap, base * 2 ** attempt))",
    ),
)

_TABLES = (
    "| Model | Tokens/s | First token |\n|---|---:|---:|\n"
    "| sim-chat | 60 | 0.3 s |\n| sim-fast | unlimited | 0 s |\n| sim-reasoner | 60 | ~3 s |",
    "| Status | Meaning | Retry? |\n|---|---|---|\n"
    "| 429 | rate limited | yes, after Retry-After |\n| 500 | server error | yes |\n"
    "| 400 | bad request | no |",
    "| Event | Carries |\n|---|---|\n| start | stream id |\n| delta | text |\n"
    "| done | usage and timing |",
)

_CLOSINGS = (
    "I hope this helps — let me know if you want more detail.",
    "Feel free to ask a follow-up question.",
    "That is the gist of it; the details depend on your setup.",
    "If anything is unclear, ask and I will expand on it.",
)

THOUGHTS = (
    "Let me think about what the user is actually asking.",
    'The message starts with "{q}", so that is the topic.',
    "First, I should recall how streaming responses work.",
    "Hmm, there are a few different angles here.",
    "Maybe a structured answer with a list would be clearest.",
    "I should mention retries, but only before the first token.",
    "Wait, I also need to consider what happens on reconnect.",
    "A small code example would make this concrete.",
    "Let me double-check that the details are accurate.",
    "Okay, I think I have enough to write a good answer.",
    "The user probably wants something practical, not theory.",
    "I will keep it concise but complete.",
)

CITIES = ("Paris", "Tokyo", "Lisbon", "Nairobi", "Montréal", "Oslo", "Lima", "Seoul")
DEFAULT_TOOLS = (
    ("get_weather", ("location", "unit")),
    ("get_time", ("timezone",)),
)

# Word pieces: runs of newlines, an optional space plus a word, an optional space plus
# punctuation, or lone whitespace. Pieces longer than _MAX_PIECE are cut further.
_PIECE_RE = re.compile(r"\n+| ?\w+| ?[^\w\s]+|\s")
_MAX_PIECE = 6


def tokenize(text: str) -> list[str]:
    """Split text into word pieces of 1-6 characters (a leading space rides along)."""
    out: list[str] = []
    for piece in _PIECE_RE.findall(text):
        limit = _MAX_PIECE + (piece[0] == " ")
        if len(piece) <= limit:
            out.append(piece)
            continue
        parts = -(-len(piece) // 5)  # near-equal pieces of at most 5-6 characters
        step, extra = divmod(len(piece), parts)
        i = 0
        for k in range(parts):
            size = step + (k < extra)
            out.append(piece[i : i + size])
            i += size
    return out


class Material:
    """The text material, pre-tokenized once so long answers cost list concatenation."""

    def __init__(self) -> None:
        self.sentences = [tokenize(" " + s) for s in _SENTENCES]
        self.bullets = [tokenize("- " + b + "\n") for b in _BULLETS]
        self.code = [tokenize(f"```{lang}\n{src}\n```") for lang, src in _CODE]
        self.tables = [tokenize(t) for t in _TABLES]
        self.titles = [tokenize("## " + t) for t in _TITLES]
        self.subheadings = [tokenize("### " + t) for t in _SUBHEADINGS]
        self.closings = [tokenize(" " + c) for c in _CLOSINGS]
