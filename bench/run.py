"""The gateway benchmark: one command, one table (``make bench``).

    .venv/bin/python bench/run.py [--quick] [--runs 3] [--only throughput,latency,capacity,resume]

What it does: starts the standalone simulator (``tokenrelay simulate``) and, for each phase,
a fresh ``tokenrelay serve`` pointed at it (memory journal, no SQL store), pinned to its own
core; a load generator process (``bench/loadgen.py``, raw asyncio sockets on uvloop) runs on
the other core with the simulator and drives the phase twice when a comparison makes sense:
once against the simulator directly, once through tokenrelay. Everything is loopback,
bounded in stream count and time, and every process it starts is stopped at the end.

Phases (the issue's definitions):

* throughput: 50 concurrent streams x 500 tokens, unpaced, 10 rounds back to back (one
  round is too short for a stable CPU figure) -> relayed tokens/s and gateway
  CPU microseconds per token (all its threads, from /proc schedstat);
* latency: 200 concurrent streams at 50 tokens/s (starts spread over 1 s) -> added time to
  first token p50/p99, added inter-token p99, and CPU per token when each read is one token;
* capacity: idle streams waiting for a first token (the simulator holds them for an hour)
  with heartbeats on -> gateway RSS delta per open stream, and how many are alive (each
  saw a heartbeat and was still open one heartbeat period later);
* resume: drop a live stream after a few tokens, reconnect with Last-Event-ID -> time to the
  first replayed event.

Results go to ``bench/results/<date>.json``; the table is printed with date and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import scenarios  # bench/ is the script's directory, first on sys.path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent

PHASES = ("throughput", "latency", "capacity", "resume", *scenarios.PHASES)

FULL = {
    "throughput": {"streams": 50, "tokens": 500, "rounds": 10},
    "latency": {"streams": 200, "tokens": 150, "rate": 50.0, "ramp_s": 1.0},
    "capacity": {"streams": 10_000, "max_opening": 200},
    "resume": {"streams": 100, "tokens": 100, "rate": 20.0, "ramp_s": 1.0},
    **scenarios.FULL,
}
QUICK = {
    "throughput": {"streams": 5, "tokens": 50, "rounds": 1},
    "latency": {"streams": 10, "tokens": 20, "rate": 50.0, "ramp_s": 0.2},
    "capacity": {"streams": 100, "max_opening": 50},
    "resume": {"streams": 5, "tokens": 40, "rate": 50.0, "ramp_s": 0.2},
    **scenarios.QUICK,
}
TARGETS = {  # the goals, for the last column
    "cpu_batched": 6.0, "cpu_per_read": 30.0, "ttft_p99": 5.0, "gap_p99": 2.0,
    "rss_kb": 20.0, "resume_p99": 20.0, "streams": 10_000,
}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores(cpus: list[int]) -> tuple[set[int], set[int]]:
    """(gateway core, load core): two different CPUs when the machine has them."""
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[1]}, {cpus[0]}


def _preexec(cpus: set[int]) -> Any:
    def setup() -> None:
        os.sched_setaffinity(0, cpus)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.setpgrp()  # our own group: ^C of run.py reaches us only through stop()

    return setup


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll until the server answers (start-up of a separate process: nothing to await)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def simulator(cpus: set[int]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "tokenrelay"), "simulate", "--port", str(port), "--speed", "1"],
        preexec_fn=_preexec(cpus), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        stop(proc)


@contextlib.contextmanager
def gateway(upstream: str, cpus: set[int], heartbeat_s: float, database_url: str = "none",
            workers: int = 1, env_extra: dict[str, str] | None = None) -> Iterator[
        tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "TOKENRELAY_UPSTREAM_URL": upstream,
        "TOKENRELAY_DATABASE_URL": database_url,
        "TOKENRELAY_HEARTBEAT_S": str(heartbeat_s),
        "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "3600",
        "TOKENRELAY_TOTAL_TIMEOUT_S": "7200",
        "TOKENRELAY_LOG_LEVEL": "warning",
        "TOKENRELAY_PORT": str(port),
        "TOKENRELAY_HOST": "127.0.0.1",
    }
    env.pop("TOKENRELAY_CONFIG", None)
    env.pop("TOKENRELAY_REDIS_URL", None)
    env.update(env_extra or {})
    command = [str(BIN / "tokenrelay"), "serve"]
    if workers > 1:
        command += ["--workers", str(workers)]
    proc = subprocess.Popen(
        command, env=env, preexec_fn=_preexec(cpus),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def loadgen(spec: dict[str, Any], cpus: set[int], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), json.dumps(spec)],
        preexec_fn=_preexec(cpus), capture_output=True, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- one run


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def run_once(args: argparse.Namespace, sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    gw_cpus, load_cpus = cores(args.cpus)
    out: dict[str, Any] = {}
    with simulator(load_cpus) as (sim_url, sim):
        for phase in args.only:
            spec = {**sizes[phase], "phase": phase, "model": "sim-fast",
                    "heartbeat_s": args.heartbeat}
            if phase in scenarios.PHASES:
                t0 = time.monotonic()
                out[phase] = scenarios.run_phase(phase, spec, sim_url, sim.pid, gw_cpus,
                                                 load_cpus, args.heartbeat, args.phase_timeout)
                out[phase]["elapsed_s"] = time.monotonic() - t0
                out[phase]["spec"] = spec
                print(f"  {phase}: done in {out[phase]['elapsed_s']:.1f} s", file=sys.stderr)
                continue
            if phase == "capacity":
                # Each relayed stream holds two sockets in the gateway (client + upstream).
                room = (nofile_limit() - 200) // 2
                spec["streams"] = min(spec["streams"], room)
            with gateway(sim_url, gw_cpus, args.heartbeat) as (gw_url, gw):
                targets = {"gateway": gw_url}
                if phase in ("throughput", "latency"):
                    targets = {"direct": sim_url, "gateway": gw_url}
                spec["targets"] = targets
                spec["pids"] = {"gateway": gw.pid, "upstream": sim.pid}
                t0 = time.monotonic()
                out[phase] = loadgen(spec, load_cpus, timeout=args.phase_timeout)
                out[phase]["elapsed_s"] = time.monotonic() - t0
                out[phase]["spec"] = {k: v for k, v in spec.items()
                                      if k not in ("targets", "pids")}
            print(f"  {phase}: done in {out[phase]['elapsed_s']:.1f} s", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- the table


def _get(runs: list[dict[str, Any]], *path: str) -> float | None:
    """Median over runs of one numeric result (None when missing)."""
    values = []
    for run in runs:
        node: Any = run
        for key in path:
            if not isinstance(node, dict) or key not in node:
                node = None
                break
            node = node[key]
        if isinstance(node, int | float):
            values.append(float(node))
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {}

    def per(target: str, phase: str, who: str) -> float | None:
        cpu = _get(runs, phase, target, f"cpu_{who}_s")
        tokens = _get(runs, phase, target, "tokens")
        return None if cpu is None or not tokens else cpu / tokens * 1e6

    def share(target: str, phase: str, who: str, key: str = "") -> float | None:
        cpu = _get(runs, phase, target, key or f"cpu_{who}_s")
        wall = _get(runs, phase, target, "wall_s")
        return None if cpu is None or not wall else cpu / wall * 100

    for phase in PHASES:
        if any(phase in r for r in runs):
            s[f"runqueue_{phase}"] = share("gateway", phase, "gateway",
                                          key="runqueue_gateway_s")
        kernel = _get(runs, phase, "gateway", "kernel_gateway_s")
        cpu = _get(runs, phase, "gateway", "cpu_gateway_s")
        if kernel is not None and cpu:
            s[f"kernel_{phase}"] = min(100.0, kernel / cpu * 100)
    if any("throughput" in r for r in runs):
        s["tps_direct"] = _get(runs, "throughput", "direct", "tokens_per_s")
        s["tps_gateway"] = _get(runs, "throughput", "gateway", "tokens_per_s")
        s["cpu_batched"] = per("gateway", "throughput", "gateway")
        s["tps_core"] = 1e6 / s["cpu_batched"] if s["cpu_batched"] else None
        s["busy_throughput"] = share("gateway", "throughput", "gateway")
        s["load_throughput"] = share("gateway", "throughput", "loadgen")
        s["sim_throughput"] = share("gateway", "throughput", "upstream")
        s["errors_throughput"] = _get(runs, "throughput", "gateway", "errors")
    if any("latency" in r for r in runs):
        for q in ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms"):
            s[f"{q}_direct"] = _get(runs, "latency", "direct", q)
            s[f"{q}_gateway"] = _get(runs, "latency", "gateway", q)
        s["cpu_per_read"] = per("gateway", "latency", "gateway")
        s["busy_latency"] = share("gateway", "latency", "gateway")
        s["load_latency"] = share("gateway", "latency", "loadgen")
        s["sim_latency"] = share("gateway", "latency", "upstream")
        s["errors_latency"] = _get(runs, "latency", "gateway", "errors")
    if any("capacity" in r for r in runs):
        s["cap_streams"] = _get(runs, "capacity", "gateway", "streams")
        s["cap_alive"] = _get(runs, "capacity", "gateway", "alive")
        s["cap_rss_kb"] = (_get(runs, "capacity", "gateway", "rss_per_stream") or 0) / 1024
        s["cap_open_s"] = _get(runs, "capacity", "gateway", "open_s")
        s["load_capacity"] = share("gateway", "capacity", "loadgen")
    if any("resume" in r for r in runs):
        s["resume_p50"] = _get(runs, "resume", "gateway", "p50_ms")
        s["resume_p99"] = _get(runs, "resume", "gateway", "p99_ms")
        s["resume_n"] = _get(runs, "resume", "gateway", "resumes")
        s["resume_wrong"] = _get(runs, "resume", "gateway", "wrong_first_id")
    s.update(scenarios.summarize(runs))
    return s


def _f(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _ok(value: float | None, limit: float, higher: bool = False) -> str:
    if value is None:
        return ""
    good = value >= limit if higher else value <= limit
    return "yes" if good else "no"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def table(s: dict[str, Any], sizes: dict[str, dict[str, Any]], header: str) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []
    if "cpu_batched" in s:
        t = sizes["throughput"]
        name = (f"throughput, {t['streams']} streams x {t['tokens']} tokens, unpaced"
                + (f", x{t['rounds']}" if t.get("rounds", 1) > 1 else ""))
        rows.append((name + ": tokens/s", _f(s["tps_direct"], "{:,.0f}"),
                     _f(s["tps_gateway"], "{:,.0f}"),
                     _f(None if not s["tps_direct"] or s["tps_gateway"] is None
                        else s["tps_gateway"] / s["tps_direct"], "x{:.2f}"), "", ""))
        rows.append(("  gateway CPU µs/token, batched (=> tokens/s on one core)", "",
                     _f(s["cpu_batched"], "{:.2f}"),
                     _f(s["tps_core"], "{:,.0f}/s"), "<= 6", _ok(s["cpu_batched"], 6)))
    if "cpu_per_read" in s:
        t = sizes["latency"]
        name = f"latency, {t['streams']} streams x {t['rate']:g} tok/s"
        for label, key, target in (
            ("TTFT p50 ms", "ttft_p50_ms", None), ("TTFT p99 ms", "ttft_p99_ms", 5.0),
            ("inter-token p50 ms", "gap_p50_ms", None),
            ("inter-token p99 ms", "gap_p99_ms", 2.0),
        ):
            d, g = s[f"{key}_direct"], s[f"{key}_gateway"]
            added = _diff(d, g)
            rows.append((f"{name}: {label}", _f(d, "{:.2f}"), _f(g, "{:.2f}"),
                         _f(added, "{:+.2f}"), "" if target is None else f"<= +{target:g}",
                         "" if target is None else _ok(added, target)))
        rows.append(("  gateway CPU µs/token, one token per read", "",
                     _f(s["cpu_per_read"], "{:.1f}"), "", "<= 30",
                     _ok(s["cpu_per_read"], 30)))
    if "cap_rss_kb" in s:
        rows.append((f"capacity: idle streams alive (of {_f(s['cap_streams'], '{:,.0f}')})",
                     "", _f(s["cap_alive"], "{:,.0f}"), "", ">= 10,000",
                     _ok(s["cap_alive"], 10_000, higher=True)))
        rows.append(("  gateway RSS per idle open stream, KB", "",
                     _f(s["cap_rss_kb"], "{:.1f}"), "", "<= 20", _ok(s["cap_rss_kb"], 20)))
    if "resume_p99" in s:
        rows.append(("resume: reconnect -> first replayed event p50 ms", "",
                     _f(s["resume_p50"], "{:.2f}"), "", "", ""))
        rows.append(("resume: reconnect -> first replayed event p99 ms", "",
                     _f(s["resume_p99"], "{:.2f}"), "", "<= 20", _ok(s["resume_p99"], 20)))
    rows += scenarios.rows(s, sizes)  # type: ignore[arg-type]
    head = ("measure", "direct", "tokenrelay", "added / ratio", "target", "met")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                        strict=True)]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [header, "", line(head), sep, *(line(r) for r in rows), ""]
    notes = []
    for phase, key in (("throughput", "throughput"), ("latency", "latency"),
                       ("capacity", "capacity")):
        load = s.get(f"load_{key}")
        if load is not None:
            extra = ""
            if s.get(f"busy_{key}") is not None:
                extra = f", gateway core {s[f'busy_{key}']:.0f}% busy"
            if s.get(f"sim_{key}") is not None:
                extra += f", simulator {s[f'sim_{key}']:.0f}%"
            notes.append(f"{phase}: load generator {load:.0f}% of its core{extra}")
    if notes:
        lines.append("CPU during the tokenrelay runs: " + "; ".join(notes) + ".")
    kernel = {p: s[f"kernel_{p}"] for p in PHASES if s.get(f"kernel_{p}") is not None}
    if kernel:
        lines.append("Share of the gateway's CPU spent in the kernel (sockets, epoll): "
                     + ", ".join(f"{p} {k:.0f}%" for p, k in kernel.items()) + ".")
    waits = {p: s[f"runqueue_{p}"] for p in PHASES if s.get(f"runqueue_{p}") is not None}
    if waits:
        lines.append("Gateway runnable but waiting for its CPU (other processes on its core): "
                     + ", ".join(f"{p} {w:.0f}%" for p, w in waits.items())
                     + (" -- latency figures are not trustworthy on a busy machine."
                        if max(waits.values()) > 5 else "."))
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny load (smoke test)")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--only", default=",".join(PHASES),
                        help="comma-separated phases: " + ",".join(PHASES))
    parser.add_argument("--streams", type=int, default=None,
                        help="idle streams in the capacity phase (default 10000)")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="gateway heartbeat interval in s (default 5, quick 1)")
    parser.add_argument("--phase-timeout", type=float, default=600.0)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    if args.heartbeat is None:
        args.heartbeat = 1.0 if args.quick else 5.0
    sizes = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.streams is not None:
        sizes["capacity"]["streams"] = args.streams
    args.cpus = sorted(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cores(args.cpus)[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = datetime.datetime.now().astimezone()
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs} ...", file=sys.stderr)
        runs.append(run_once(args, sizes))
    summary = summarize(runs)
    gw, load = cores(args.cpus)
    header = (f"tokenrelay benchmark, {started:%Y-%m-%d %H:%M %Z}, {machine()}; "
              f"gateway on CPU {min(gw)}, load generator + simulator on CPU {min(load)}; "
              f"{'quick load, ' if args.quick else ''}median of {args.runs} run(s)")
    text = table(summary, sizes, header)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"bench-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"date": started.isoformat(), "machine": machine(),
                                "quick": args.quick, "sizes": sizes, "runs": runs,
                                "summary": summary, "table": text}, indent=2))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
