"""The load generator of ``bench/run.py``: one process, raw asyncio sockets, uvloop.

Started by ``run.py`` as ``python bench/loadgen.py '<json spec>'`` on its own core; prints
one JSON object on stdout. Why raw sockets rather than aiohttp: every stream needs a
timestamp per network read, and a protocol's ``data_received`` gives that with no task
wake-up per read, so the load generator stays far from saturating its core (its own CPU
is reported with every phase to show it).

A stream only counts markers in the bytes it receives: ``data: {"content":`` for the
gateway's frames, ``"delta":{"content":`` for the upstream's OpenAI chunks. Both servers
write whole events per write, so HTTP chunk-size lines never cut a marker; a marker cut
by a read boundary is counted once through a carried tail.

Phases (``spec["phase"]``): ``throughput``, ``latency``, ``capacity``, ``resume``; each
measures the ``targets`` it is given (``direct`` = the upstream, ``gateway`` = tokenrelay)
one after the other, so the comparison comes from one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson

GATEWAY_TOKEN = b'data: {"content":'
DIRECT_TOKEN = b'"delta":{"content":'
HEARTBEAT = b": heartbeat"
GATEWAY_END = (b"event: done\n", b"event: error\n")
DIRECT_END = (b"data: [DONE]",)
TAIL = 32
_ID = re.compile(rb"(?m)^id: (\d+)\n")


# --------------------------------------------------------------------------- measuring


def family(pid: int) -> list[int]:
    """``pid`` and its descendants: ``serve --workers 2`` does its work in child processes."""
    out = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += family(int(child))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants, all threads."""
    return sum(_cpu_seconds(p) for p in family(pid))


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (ns precision from schedstat, else clock ticks)."""
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        return total
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kernel_seconds(pid: int) -> float:
    """System (kernel) CPU time of ``pid`` and its descendants (clock ticks, /proc stat)."""
    total = 0.0
    for p in family(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return total


def wait_seconds(pid: int) -> float:
    """Time the threads of ``pid`` and its descendants were runnable but waiting for a
    CPU (other processes)."""
    total = 0.0
    for p in family(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1]) / 1e9
    return total


class CPUWindow:
    """CPU seconds used by the gateway, the upstream and this process over a window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.pids["loadgen"] = os.getpid()
        self.start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.waited = {k: wait_seconds(p) for k, p in self.pids.items()}
        self.kernel = {k: kernel_seconds(p) for k, p in self.pids.items()}
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out = {f"cpu_{k}_s": cpu_seconds(p) - self.start[k] for k, p in self.pids.items()}
        for k, p in self.pids.items():
            out[f"runqueue_{k}_s"] = wait_seconds(p) - self.waited[k]
            out[f"kernel_{k}_s"] = kernel_seconds(p) - self.kernel[k]
        out["wall_s"] = wall
        return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# --------------------------------------------------------------------------- one stream


class Stream(asyncio.Protocol):
    """One HTTP/1.1 request whose SSE body is watched, never fully parsed."""

    def __init__(self, request: bytes, token: bytes, ends: tuple[bytes, ...],
                 keep_body: bool = False, gaps: bool = False) -> None:
        self.request = request
        self.token = token
        self.ends = ends
        self.keep_body = keep_body
        self.want_gaps = gaps
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.stream_id: str | None = None
        self.tail = b""
        self.body: list[bytes] = []
        self.t_start = time.perf_counter()
        self.t_first: float | None = None  # first token
        self.t_first_id: float | None = None  # first "id:" line (resume)
        self.t_last: float | None = None
        self.tokens = 0
        self.heartbeats = 0
        self.gaps: list[float] = []
        self.gap_at: list[float] = []  # when each (non-zero) gap ended
        self.opened = asyncio.get_running_loop().create_future()  # response head read
        self.done = asyncio.get_running_loop().create_future()  # end of answer or socket
        self.heartbeat_seen = asyncio.get_running_loop().create_future()
        self.id_seen = asyncio.get_running_loop().create_future()  # keep_body only
        self.want_tokens = 0  # resolve ``got_tokens`` once this many tokens arrived
        self.got_tokens = asyncio.get_running_loop().create_future()
        self.ended = False
        self.complete = False  # ended with done / [DONE] (not error, not a dropped socket)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"x-stream-id":
                    self.stream_id = value.strip().decode()
            if not self.opened.done():
                self.opened.set_result(None)
            if self.status != 200:
                self._end()
                return
            if not data:
                return
        if self.keep_body:
            self.body.append(data)
            if self.t_first_id is None and b"id: " in data:
                self.t_first_id = now
                self.id_seen.set_result(None)
        tail = self.tail
        buf = tail + data
        n = buf.count(self.token) - tail.count(self.token)
        if n:
            self.tokens += n
            if self.t_first is None:
                self.t_first = now
            elif self.want_gaps:
                self.gaps.append(now - self.t_last)  # type: ignore[operator]
                self.gap_at.append(now)
                if n > 1:
                    self.gaps.extend([0.0] * (n - 1))
            self.t_last = now
            if self.want_tokens and self.tokens >= self.want_tokens and not self.got_tokens.done():
                self.got_tokens.set_result(None)
        if buf.count(HEARTBEAT) - tail.count(HEARTBEAT):
            self.heartbeats += 1
            if not self.heartbeat_seen.done():
                self.heartbeat_seen.set_result(None)
        for end in self.ends:
            if buf.count(end) - tail.count(end):
                self.complete = end != b"event: error\n"
                self._end()
                return
        self.tail = buf[-TAIL:]

    def _end(self) -> None:
        self.ended = True
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(None)
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def ids(self) -> list[int]:
        return [int(m) for m in _ID.findall(b"".join(self.body))]


def http_request(method: str, host: str, port: int, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Target:
    """Where streams go: the upstream directly, or tokenrelay's browser endpoint."""

    def __init__(self, name: str, url: str, model: str) -> None:
        self.name = name
        hostport = url.split("//", 1)[1].split("/", 1)[0]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.model = model
        self.gateway = name != "direct"  # gateway, or one of several (history off, sqlite, ...)

    def chat(self, i: int, sim: dict[str, Any], *, keep_body: bool = False,
             gaps: bool = False) -> Stream:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"benchmark question {i % 97}"}],
            "sim": sim,
        }
        if self.gateway:
            path, token, ends = "/api/chat", GATEWAY_TOKEN, GATEWAY_END
        else:
            path, token, ends = "/v1/chat/completions", DIRECT_TOKEN, DIRECT_END
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        req = http_request("POST", self.host, self.port, path, orjson.dumps(body))
        return Stream(req, token, ends, keep_body=keep_body, gaps=gaps)

    async def open(self, stream: Stream) -> Stream:
        loop = asyncio.get_running_loop()
        stream.t_start = time.perf_counter()
        try:
            await loop.create_connection(lambda: stream, self.host, self.port)
        except OSError:
            stream.connection_lost(None)
        return stream


async def run_streams(target: Target, streams: list[Stream], ramp_s: float = 0.0,
                      max_opening: int = 0) -> None:
    """Open every stream (spread over ``ramp_s``), then wait for all to end."""
    sem = asyncio.Semaphore(max_opening) if max_opening else None

    async def one(k: int, s: Stream) -> None:
        if ramp_s:
            await asyncio.sleep(ramp_s * k / len(streams))
        if sem is not None:
            async with sem:
                await target.open(s)
                await s.opened
        else:
            await target.open(s)
        await s.done

    await asyncio.gather(*(one(k, s) for k, s in enumerate(streams)))


# --------------------------------------------------------------------------- phases

IDLE_SIM = {"tokens": 5, "first_token_delay_s": 3600}  # held an hour before its first token


async def warm_idle_path(target: Target) -> None:
    """Run the code of complete and of idle streams once (imports, caches, pools) before
    memory is measured: ten short answers, then twenty idle streams, dropped."""
    warm = [target.chat(i, {"tokens": 5, "tokens_per_s": 0, "first_token_delay_s": 0})
            for i in range(10)]
    await run_streams(target, warm)
    idle = [target.chat(i, IDLE_SIM) for i in range(20)]
    for s in idle:
        await target.open(s)
        await s.opened
    await asyncio.sleep(0.5)  # the gateway has started their upstream requests
    for s in idle:
        s.abort()
    await asyncio.sleep(1.0)  # and noticed the aborts (grace timers, closed upstreams)


async def throughput(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    n, tokens = spec["streams"], spec["tokens"]
    sim = {"tokens": tokens, "tokens_per_s": 0, "first_token_delay_s": 0}
    warm = [target.chat(i, {**sim, "tokens": min(tokens, 100)}) for i in range(min(n, 10))]
    await run_streams(target, warm)
    # Several rounds of n concurrent streams, back to back: one round is a fraction of a
    # second, too short for a stable CPU figure.
    rounds = spec.get("rounds", 1)
    streams: list[Stream] = []
    window = CPUWindow(spec["pids"])
    for r in range(rounds):
        batch = [target.chat(r * n + i, sim) for i in range(n)]
        await run_streams(target, batch)
        streams += batch
    out = window.stop()
    complete = sum(1 for s in streams if s.complete)
    total = complete * tokens  # the gateway merges the tokens of one read into one frame
    out.update(tokens=total, frames=sum(s.tokens for s in streams),
               errors=len(streams) - complete, tokens_per_s=total / out["wall_s"])
    return out


async def latency(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    n, tokens, rate = spec["streams"], spec["tokens"], spec["rate"]
    sim = {"tokens": tokens, "tokens_per_s": rate, "first_token_delay_s": 0}
    warm = [target.chat(i, {**sim, "tokens": 5}) for i in range(min(n, 10))]
    await run_streams(target, warm)
    streams = [target.chat(i, sim, gaps=True) for i in range(n)]
    window = CPUWindow(spec["pids"])
    await run_streams(target, streams, ramp_s=spec.get("ramp_s", 1.0))
    out = window.stop()
    ttft = [(s.t_first - s.t_start) * 1e3 for s in streams if s.t_first is not None]
    gaps = [g * 1e3 for s in streams for g in s.gaps]
    # Steady state: gaps ending after every stream has started (ramp over) and had time
    # to get its first token, so the ramp's request set-up cost is not counted twice.
    steady_from = window.t0 + spec.get("ramp_s", 1.0) + 0.5
    steady = [g * 1e3 for s in streams for g, at in zip(s.gaps, s.gap_at, strict=False)
              if at >= steady_from]
    complete = sum(1 for s in streams if s.complete)
    out.update(
        tokens=complete * tokens, frames=sum(s.tokens for s in streams), errors=n - complete,
        ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
        gap_p50_ms=pct(gaps, 50), gap_p99_ms=pct(gaps, 99), gap_max_ms=max(gaps, default=None),
        steady_gap_p99_ms=pct(steady, 99), steady_gap_max_ms=max(steady, default=None),
    )
    return out


async def capacity(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    """Idle streams waiting for a first token that never comes; heartbeats keep them up."""
    n = spec["streams"]
    gw = spec["pids"]["gateway"]
    sim = IDLE_SIM
    await warm_idle_path(target)
    rss0 = rss_bytes(gw)
    window = CPUWindow(spec["pids"])
    streams = [target.chat(i, sim) for i in range(n)]
    sem = asyncio.Semaphore(spec.get("max_opening", 200))
    t0 = time.perf_counter()

    async def open_one(s: Stream) -> None:
        async with sem:
            await target.open(s)
            await s.opened

    await asyncio.gather(*(open_one(s) for s in streams))
    open_s = time.perf_counter() - t0
    opened = sum(1 for s in streams if s.status == 200 and not s.done.done())
    # Every open stream must see a heartbeat; bounded by a few heartbeat periods.
    waiting = [s.heartbeat_seen for s in streams if s.status == 200 and not s.done.done()]
    hb_wait = spec["heartbeat_s"] * 2.5 + 5
    if waiting:
        await asyncio.wait(waiting, timeout=hb_wait)
    await asyncio.sleep(spec["heartbeat_s"] * 1.2)  # one more period: still alive after it
    rss1 = rss_bytes(gw)
    out = window.stop()
    alive = sum(1 for s in streams if s.heartbeats >= 1 and not s.done.done())
    beats = sum(s.heartbeats for s in streams)
    for s in streams:
        s.abort()
    out.update(
        streams=n, opened=opened, alive=alive, heartbeats=beats, open_s=open_s,
        rss_before=rss0, rss_after=rss1,
        rss_per_stream=(rss1 - rss0) / max(1, opened),
    )
    await asyncio.sleep(1.0)
    return out


async def resume(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    """Read a few events, drop the connection, reconnect with Last-Event-ID, time the replay."""
    n, rate = spec["streams"], spec["rate"]
    sim = {"tokens": spec["tokens"], "tokens_per_s": rate, "first_token_delay_s": 0}
    times: list[float] = []
    wrong = 0
    failed = 0

    async def one(i: int) -> None:
        nonlocal wrong, failed
        await asyncio.sleep(random.random() * spec.get("ramp_s", 1.0))
        first = target.chat(i, sim, keep_body=True)
        first.want_tokens = 8
        await target.open(first)
        await asyncio.wait([first.got_tokens, first.done], timeout=30,
                           return_when=asyncio.FIRST_COMPLETED)
        ids = first.ids()
        first.abort()
        if first.status != 200 or not ids or first.stream_id is None:
            failed += 1
            return
        after = max(1, ids[-1] - 5)  # ask for a few events again: a real replay
        await asyncio.sleep(0.05 + random.random() * 0.05)
        req = http_request("GET", target.host, target.port,
                           f"/api/streams/{first.stream_id}/events",
                           headers={"Last-Event-ID": str(after)})
        again = Stream(req, GATEWAY_TOKEN, GATEWAY_END, keep_body=True)
        await target.open(again)
        await asyncio.wait([again.id_seen, again.done], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        if again.t_first_id is None:
            failed += 1
        else:
            times.append((again.t_first_id - again.t_start) * 1e3)
            got = again.ids()
            if not got or got[0] != after + 1:
                wrong += 1
        again.abort()

    window = CPUWindow(spec["pids"])
    await asyncio.gather(*(one(i) for i in range(n)))
    out = window.stop()
    out.update(resumes=len(times), failed=failed, wrong_first_id=wrong,
               p50_ms=pct(times, 50), p99_ms=pct(times, 99), max_ms=max(times, default=None))
    return out


async def _short_answers(target: Target, spec: dict[str, Any], n: int) -> list[Stream]:
    """``n`` short answers, ``concurrency`` at a time, a new connection each."""
    conc = spec["concurrency"]
    sim = {"tokens": spec["tokens"], "tokens_per_s": 0, "first_token_delay_s": 0}
    done: list[Stream] = []

    async def worker(first: int, count: int) -> None:
        for i in range(first, first + count):
            s = target.chat(i, sim)
            await target.open(s)
            await s.done
            done.append(s)

    share = [n // conc + (1 if k < n % conc else 0) for k in range(conc)]
    starts = [sum(share[:k]) for k in range(conc)]
    await asyncio.gather(*(worker(a, c) for a, c in zip(starts, share, strict=True) if c))
    return done


async def requests(spec: dict[str, Any], targets: dict[str, Target]) -> dict[str, Any]:
    """Short answers back to back against every target, interleaved: ``rounds`` rounds,
    each giving every target ``requests / rounds`` answers in turn (the order rotating),
    so a shared machine's drift hits all targets alike -> requests/s (and the ratio of
    each to the first gateway, round by round) and time to first token."""
    rounds = max(1, spec.get("rounds", 1))
    per = max(1, spec["requests"] // rounds)
    names = list(targets)
    acc: dict[str, dict[str, Any]] = {
        name: {"streams": [], "wall_s": 0.0, "rps_rounds": [], "cpu": {}} for name in names}
    for name in names:  # warm: imports, pools, the store's statements
        await _short_answers(targets[name], spec, max(spec["concurrency"] * 4, 20))
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            window = CPUWindow(spec["pids_of"][name])
            done = await _short_answers(targets[name], spec, per)
            out = window.stop()
            a = acc[name]
            a["streams"] += done
            wall = out.pop("wall_s")
            a["wall_s"] += wall
            for key, value in out.items():
                a["cpu"][key] = a["cpu"].get(key, 0.0) + value
            a["rps_rounds"].append(sum(1 for s in done if s.complete) / wall)
    results: dict[str, Any] = {}
    for name in names:
        a = acc[name]
        streams = a["streams"]
        ttft = [(s.t_first - s.t_start) * 1e3 for s in streams if s.t_first is not None]
        complete = sum(1 for s in streams if s.complete)
        results[name] = {
            **a["cpu"], "wall_s": a["wall_s"], "requests": len(streams), "complete": complete,
            "errors": len(streams) - complete, "requests_per_s": complete / a["wall_s"],
            "rps_rounds": a["rps_rounds"], "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99),
        }
    return results


async def cancel_answers(target: Target, stream_ids: list[str | None],
                         concurrency: int = 16) -> int:
    """Cancel the gateway's answers (a closed /api/chat connection does not stop one), so
    the simulator and this gateway go idle before the next target is measured."""
    sem = asyncio.Semaphore(concurrency)

    async def one(stream_id: str) -> bool:
        async with sem:
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                writer.write(http_request("POST", target.host, target.port,
                                          f"/api/streams/{stream_id}/cancel", b"{}",
                                          {"Connection": "close"}))
                status = (await reader.readline()).split()
                return len(status) > 1 and status[1] == b"202"
            finally:
                writer.close()

    done = await asyncio.gather(*(one(sid) for sid in stream_ids if sid),
                                return_exceptions=True)
    return sum(1 for ok in done if ok is True)


async def sustained(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    """Ramp long 50 tok/s streams (one token per read) by ``step`` every ``step_s`` until
    the inter-token gap p99.9 of a step exceeds twice the pace -> the last count held."""
    rate = spec["rate"]
    limit_ms = 2 * 1000 / rate
    long_sim = {"tokens": int(rate * spec["step_s"] * (spec["max_steps"] + 2)),
                "tokens_per_s": rate, "first_token_delay_s": 0}
    open_: list[Stream] = []
    steps: list[dict[str, Any]] = []
    sustained_n = 0
    # A target may ramp by finer steps (``step_<name>``): --workers 2 shares both cores
    # with the simulator, load generator and Redis, so it holds fewer than one full step.
    step = spec.get(f"step_{target.name}", spec["step"])
    window = CPUWindow(spec["pids"])
    try:
        for _ in range(spec["max_steps"]):
            new = [target.chat(len(open_) + i, long_sim, gaps=True)
                   for i in range(step)]
            for s in new:
                await target.open(s)
            open_ += new
            await asyncio.sleep(spec["settle_s"])  # the new streams' first tokens
            t0 = time.perf_counter()
            for s in open_:  # only this step's gaps (and bounded memory)
                s.gaps.clear()
                s.gap_at.clear()
            await asyncio.sleep(spec["step_s"])
            gaps = [g * 1e3 for s in open_ for g, at in zip(s.gaps, s.gap_at, strict=False)
                    if at >= t0]
            broken = sum(1 for s in open_ if s.ended)
            p999 = pct(gaps, 99.9)
            steps.append({"streams": len(open_), "gap_p999_ms": p999,
                          "gap_max_ms": max(gaps, default=None), "ended": broken})
            if broken or p999 is None or p999 > limit_ms:
                break
            sustained_n = len(open_)
    finally:
        for s in open_:
            s.abort()
    out = window.stop()
    if target.gateway:  # answers outlive their readers: stop them before the next target
        out["cancelled"] = await cancel_answers(target, [s.stream_id for s in open_])
    reads = sum(s.tokens for s in open_)  # one token per read
    out.update(sustained=sustained_n, steps=steps, limit_ms=limit_ms, reads=reads,
               reached_max=sustained_n == step * spec["max_steps"])
    if reads and "cpu_gateway_s" in out:  # what the gateway's CPU alone would allow
        out["cpu_us_per_read"] = out["cpu_gateway_s"] / reads * 1e6
        out["cpu_bound_streams"] = 1e6 / (out["cpu_us_per_read"] * rate)
    await asyncio.sleep(1.0)  # let the servers notice the aborts
    return out


PHASES = {"throughput": throughput, "latency": latency, "capacity": capacity, "resume": resume,
          "sustained": sustained}


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["phase"] in ("requests", "ttft1"):  # all targets at once, interleaved
        targets = {name: Target(name, url, spec["model"])
                   for name, url in spec["targets"].items()}
        pids_of = {}
        for name in targets:
            pids = dict(spec["pids"])
            pids.pop("gateway", None)
            if name in spec.get("gateway_pids", {}):
                pids["gateway"] = spec["gateway_pids"][name]
            pids_of[name] = pids
        return await requests({**spec, "pids_of": pids_of}, targets)
    results: dict[str, Any] = {}
    for name, url in spec["targets"].items():
        target = Target(name, url, spec["model"])
        pids = dict(spec["pids"])
        if name in spec.get("gateway_pids", {}):  # several gateways side by side
            pids["gateway"] = spec["gateway_pids"][name]
        if name == "direct":
            pids.pop("gateway", None)
        results[name] = await PHASES[spec["phase"]]({**spec, "pids": pids}, target)
    return results


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    _raise_nofile()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    spec = orjson.loads(sys.argv[1])
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main(spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
