"""What one long answer costs the gateway's memory, and whether it is given back.

    .venv/bin/python bench/long_answer.py [--mb 8] [--history off|sqlite] [--retention 3]

Starts the simulator and a gateway as ``run.py`` does (memory journal; ``--history sqlite``
keeps a SQLite store in a temporary directory; journal retention ``--retention`` seconds),
warms it with a few short answers, then streams one unpaced answer of about ``--mb`` MB of
text through ``POST /api/chat`` and prints the gateway's RSS (``VmRSS``):

* before, after warming up;
* right after the answer's ``done`` (the journal keeps its frames for the retention time);
* after the retention time, once the stream has left the journal.

Not part of ``make bench`` (one answer, a few seconds). Issue 17 asked for the RSS after
the answer leaves the journal to come back within 5 MB of before.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from loadgen import rss_bytes

CHARS_PER_TOKEN = 3.5  # the simulator's text, measured (SSE framing comes on top)


def chat(url: str, tokens: int) -> tuple[int, str]:
    """Stream one answer; returns the body bytes received and the stream id."""
    body = json.dumps({"model": "sim-fast", "messages": [{"role": "user", "content": "long"}],
                       "sim": {"tokens": tokens, "tokens_per_s": 0,
                               "first_token_delay_s": 0}}).encode()
    request = urllib.request.Request(url + "/api/chat", body,
                                     {"Content-Type": "application/json"})
    received = 0
    tail = b""
    with urllib.request.urlopen(request, timeout=600) as resp:
        stream_id = resp.headers.get("X-Stream-Id", "")
        while chunk := resp.read(1 << 16):
            received += len(chunk)
            tail = (tail + chunk)[-400:]
    end = tail[tail.rfind(b"event: "):].split(b"\n", 1)[0].decode()
    if end != "event: done":
        raise SystemExit(f"the answer did not complete: {tail[-300:]!r}")
    return received, stream_id


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="answer text, MB")
    parser.add_argument("--history", choices=("off", "sqlite"), default="off")
    parser.add_argument("--retention", type=float, default=3.0, help="journal retention, s")
    parser.add_argument("--answers", type=int, default=1,
                        help="long answers one after the other (is memory reused?)")
    args = parser.parse_args()
    gw_cpus, load_cpus = run.cores(sorted(run.os.sched_getaffinity(0)))
    tmp = tempfile.mkdtemp(prefix="tokenrelay-long-")
    database = "none" if args.history == "off" else f"sqlite:///{tmp}/history.db"
    extra = {"TOKENRELAY_RETENTION_S": str(args.retention)}
    with run.simulator(load_cpus) as (sim_url, _sim), \
            run.gateway(sim_url, gw_cpus, 5.0, database_url=database,
                        env_extra=extra) as (gw_url, gw):
        for _ in range(20):
            chat(gw_url, 50)
        time.sleep(args.retention + 1)
        before = rss_bytes(gw.pid)
        tokens = int(args.mb * 1e6 / CHARS_PER_TOKEN)
        for n in range(1, args.answers + 1):
            t0 = time.monotonic()
            received, stream_id = chat(gw_url, tokens)
            took = time.monotonic() - t0
            at_done = rss_bytes(gw.pid)
            time.sleep(args.retention + 1.5)  # the journal's retention, and its sweep
            after = rss_bytes(gw.pid)
            try:
                urllib.request.urlopen(f"{gw_url}/api/streams/{stream_id}/events", timeout=10)
                gone = "still there"
            except urllib.error.HTTPError as exc:
                gone = "gone" if exc.code == 404 else f"HTTP {exc.code}"
            print(f"answer {n}: {mb(received)} of SSE ({tokens:,} tokens) in {took:.1f} s, "
                  f"history {args.history}")
            print(f"  gateway RSS before: {mb(before)}; at done: {mb(at_done)} "
                  f"(+{mb(at_done - before)}); after the retention ({args.retention:g} s, "
                  f"stream {gone}): {mb(after)} (+{mb(after - before)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
