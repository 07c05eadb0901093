"""Gateway CPU per request: the cost of setting up one short answer (not part of ``make bench``).

    .venv/bin/python bench/setup_cost.py [--requests 2000] [--concurrency 20] [--tokens 5]
        [--endpoint api|v1] [--store | --database-url URL] [--repeat 3] [--src DIR]
        [--profile [--top 30]]
    .venv/bin/python bench/setup_cost.py --callgrind [--requests 300]
    .venv/bin/python bench/setup_cost.py --callgrind --requests 20 --concurrency 5 \
        --tokens 105 --tokens-per-s 20      # minus the same with --tokens 5: cost per read
    .venv/bin/python bench/setup_cost.py --callgrind --per-read [--requests 20]

Starts the standalone simulator and a gateway as ``run.py`` does (same environment: memory
journal, no SQL store; ``--store`` keeps the default SQLite store, in a temporary
directory), then sends ``--requests`` short answers (``sim-fast``, a few tokens, no pacing,
no first-token delay) ``--concurrency`` at a time, one connection per request as the
benchmark's streams do. Reports the gateway's CPU (all threads, /proc schedstat) per
request; with a handful of tokens per answer that is almost all set-up, not relay.

* ``--profile`` records the gateway with ``py-spy`` (collapsed stacks in
  ``bench/results/profile-setup.txt``) and prints the top functions as ``profile.py`` does.
* ``--callgrind`` runs the gateway under ``valgrind --tool=callgrind`` (about a minute for
  1,000 requests), counting only the measured requests, and reports instructions per
  request. CPU time on a shared machine moves by 10-20 % from run to run; the instruction
  count by about 1 %, so it is the figure to compare two versions with. ``--src`` imports
  the package from another copy of ``src/``, e.g. a baseline made with
  ``git archive HEAD src | tar -x -C /tmp/base`` and ``--src /tmp/base/src``.
* ``--per-read`` (with ``--callgrind``) measures, in one gateway, paced answers of
  ``--tokens`` and of ``--tokens`` + 100 tokens (20 tokens/s, so each token is one read)
  and reports the difference per added read: the instructions of one one-token read,
  set-up excluded; then, from an idle window, the same without what an idle gateway runs
  in the long answers' extra seconds (at 100 reads/s that is a few % of a read; at the
  latency phase's 10,000 reads/s it vanishes). ``bench/results/callgrind-read.out``,
  ``callgrind-read-short.out`` and ``callgrind-idle.out`` are the dumps
  (``callgrind_annotate`` any; the difference of the first two, function by function, is
  where a read's instructions go).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import run


def top(path: Path, n: int) -> str:
    """``profile.py``'s summary of a py-spy file (loaded by path: ``profile`` is also the
    name of a standard library module)."""
    spec = importlib.util.spec_from_file_location("bench_profile", run.HERE / "profile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary: str = module.top(path, n)
    return summary


@contextlib.contextmanager
def gateway(upstream: str, cpus: set[int], args: argparse.Namespace) -> Iterator[
        tuple[str, subprocess.Popen[bytes], Path]]:
    """``run.gateway``'s process and environment, plus the options above.

    Yields (url, process, temporary directory); the gateway runs in that directory, so
    ``--store`` gets a fresh SQLite file there and callgrind writes its output there.
    """
    port = run.free_port()
    env = {
        **os.environ,
        "TOKENRELAY_UPSTREAM_URL": upstream,
        "TOKENRELAY_DATABASE_URL": "none",
        "TOKENRELAY_HEARTBEAT_S": "15",
        "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "3600",
        "TOKENRELAY_TOTAL_TIMEOUT_S": "7200",
        "TOKENRELAY_LOG_LEVEL": "warning",
        "TOKENRELAY_PORT": str(port),
        "TOKENRELAY_HOST": "127.0.0.1",
    }
    for name in ("TOKENRELAY_CONFIG", "TOKENRELAY_REDIS_URL"):
        env.pop(name, None)
    if args.store:
        del env["TOKENRELAY_DATABASE_URL"]  # the default: sqlite:///tokenrelay.db in cwd
    if args.database_url:
        env["TOKENRELAY_DATABASE_URL"] = args.database_url
    if args.src:
        env["PYTHONPATH"] = args.src
    cmd = [str(run.BIN / "tokenrelay"), "serve"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.callgrind:
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={tmp}/callgrind.out", *cmd]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, preexec_fn=run._preexec(cpus),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run.wait_http(f"http://127.0.0.1:{port}/healthz", proc,
                          timeout=600 if args.callgrind else 60)
            yield f"http://127.0.0.1:{port}", proc, Path(tmp)
        finally:
            run.stop(proc)


def make_stream(target: loadgen.Target, i: int, tokens: int, endpoint: str,
                rate: float = 0.0) -> loadgen.Stream:
    sim = {"tokens": tokens, "tokens_per_s": rate, "first_token_delay_s": 0}
    if endpoint == "api":
        return target.chat(i, sim)
    body = {"model": target.model, "stream": True, "sim": sim,
            "messages": [{"role": "user", "content": f"benchmark question {i % 97}"}]}
    req = loadgen.http_request("POST", target.host, target.port, "/v1/chat/completions",
                               orjson.dumps(body))
    return loadgen.Stream(req, loadgen.DIRECT_TOKEN, loadgen.DIRECT_END)


async def fire(target: loadgen.Target, n: int, concurrency: int, tokens: int,
               endpoint: str, rate: float = 0.0) -> int:
    """Send ``n`` answers, ``concurrency`` at a time; the number that completed."""
    sem = asyncio.Semaphore(concurrency)
    complete = 0

    async def one(i: int) -> None:
        nonlocal complete
        async with sem:
            s = make_stream(target, i, tokens, endpoint, rate)
            await target.open(s)
            await s.done
            complete += s.complete

    await asyncio.gather(*(one(i) for i in range(n)))
    return complete


def user_sys(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of ``pid`` (clock ticks: coarse, but shows the split)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _poke(url: str) -> None:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5):
        pass


async def callgrind(pid: int, url: str, option: str) -> None:
    """Send one callgrind_control command. Valgrind only looks for one while the process
    runs code, so an idle gateway is poked with ``/healthz`` until the command is done
    (with instrumentation on, one or two of those are counted: noise far below 0.1 %)."""
    command = asyncio.ensure_future(asyncio.to_thread(
        subprocess.run, ["callgrind_control", option, str(pid)], check=True,
        capture_output=True))
    loop = asyncio.get_running_loop()
    while not command.done():
        await asyncio.wait({command}, timeout=0.2)
        if not command.done():
            await loop.run_in_executor(None, _poke, url + "/healthz")
    command.result()


def instructions(out_dir: Path) -> int:
    """Total instructions (Ir) in the callgrind dumps written so far."""
    total = 0
    for path in out_dir.glob("callgrind.out*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


async def measure(args: argparse.Namespace, gw_url: str, gw_pid: int) -> list[dict[str, Any]]:
    target = loadgen.Target("gateway", gw_url, "sim-fast")
    await fire(target, min(300, args.requests), args.concurrency, min(args.tokens, 20),
               args.endpoint)
    if args.callgrind and args.per_read:
        return await per_read(args, target, gw_url, gw_pid)
    if args.callgrind:
        await callgrind(gw_pid, gw_url, "--instr=on")
        done = await fire(target, args.requests, args.concurrency, args.tokens, args.endpoint,
                          args.tokens_per_s)
        await callgrind(gw_pid, gw_url, "--instr=off")
        await callgrind(gw_pid, gw_url, "--dump")
        return [{"complete": done}]
    rounds = []
    for _ in range(args.repeat):
        window = loadgen.CPUWindow({"gateway": gw_pid})
        user0, sys0 = user_sys(gw_pid)
        done = await fire(target, args.requests, args.concurrency, args.tokens, args.endpoint,
                          args.tokens_per_s)
        out = window.stop()
        user1, sys1 = user_sys(gw_pid)
        rounds.append({
            "complete": done,
            "gateway_us_per_request": out["cpu_gateway_s"] / args.requests * 1e6,
            "user_us_per_request": (user1 - user0) / args.requests * 1e6,
            "sys_us_per_request": (sys1 - sys0) / args.requests * 1e6,
            "gateway_busy_pct": out["cpu_gateway_s"] / out["wall_s"] * 100,
            "gateway_runqueue_pct": out["runqueue_gateway_s"] / out["wall_s"] * 100,
            "requests_per_s": args.requests / out["wall_s"],
        })
    return rounds


PER_READ_EXTRA = 100  # tokens added to the long answers of --per-read
PER_READ_RATE = 20.0  # tokens/s: slow enough that each token is a read of its own
PER_READ_IDLE_S = 10.0  # the idle window of --per-read


async def per_read(args: argparse.Namespace, target: loadgen.Target, gw_url: str,
                   gw_pid: int) -> list[dict[str, Any]]:
    """Short and long paced answers, each counted in a dump of its own (``--per-read``),
    then an idle window: what the gateway runs per second with no request (uvicorn's
    0.1 s tick, the timer wheel) is part of the long answers' extra seconds too."""
    counts = []
    for tokens in (args.tokens, args.tokens + PER_READ_EXTRA, 0):
        before = instructions(args.out_dir)
        await callgrind(gw_pid, gw_url, "--instr=on")
        started = time.monotonic()
        done = 0
        if tokens:
            done = await fire(target, args.requests, args.concurrency, tokens,
                              args.endpoint, PER_READ_RATE)
        else:
            await asyncio.sleep(PER_READ_IDLE_S)
        seconds = time.monotonic() - started
        await callgrind(gw_pid, gw_url, "--instr=off")
        await callgrind(gw_pid, gw_url, "--dump")
        counts.append({"tokens": tokens, "complete": done, "seconds": round(seconds, 2),
                       "instructions": instructions(args.out_dir) - before})
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=None,
                        help="per round (default 2000; 300 with --callgrind)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--tokens-per-s", type=float, default=0.0,
                        help="pace the tokens (each then arrives in its own read); the "
                             "difference of two --tokens counts gives the cost per read")
    parser.add_argument("--endpoint", choices=("api", "v1"), default="api")
    parser.add_argument("--store", action="store_true", help="the default SQLite store")
    parser.add_argument("--database-url", default=None,
                        help="this store instead (e.g. an empty PostgreSQL database)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--src", default=None,
                        help="import tokenrelay from this directory (a copy of src/)")
    parser.add_argument("--profile", action="store_true", help="record with py-spy")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per request under valgrind")
    parser.add_argument("--per-read", action="store_true",
                        help="with --callgrind: instructions per one-token read")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = (20 if args.per_read else 300) if args.callgrind else 2000
    if args.per_read and not args.callgrind:
        parser.error("--per-read needs --callgrind")
    cpus = sorted(os.sched_getaffinity(0))
    gw_cpus, load_cpus = run.cores(cpus)
    spy = shutil.which("py-spy", path=str(run.BIN)) or shutil.which("py-spy")
    if args.profile and spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    if args.callgrind and shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    out = run.HERE / "results" / "profile-setup.txt"
    label = args.endpoint + (" +store" if args.store else "") + (f" src={args.src}"
                                                                 if args.src else "")
    with run.simulator(load_cpus) as (sim_url, _sim), \
            gateway(sim_url, gw_cpus, args) as (gw_url, gw, tmp):
        args.out_dir = tmp
        os.sched_setaffinity(0, load_cpus)  # this process is the load generator
        recorder = None
        if args.profile:
            out.parent.mkdir(parents=True, exist_ok=True)
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--format",
                 "raw", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        try:
            factory = None
            with contextlib.suppress(ImportError):
                import uvloop

                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                rounds = runner.run(measure(args, gw_url, gw.pid))
        finally:
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(30)
        if args.callgrind:
            ir = instructions(tmp)
            (run.HERE / "results").mkdir(exist_ok=True)
            # callgrind.out.<n>, one per --dump, in order: for callgrind_annotate
            dumps = sorted(tmp.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
            names = (["callgrind-read-short.out", "callgrind-read.out", "callgrind-idle.out"]
                     if args.per_read else [])
            for dump, name in zip(dumps, names or ["callgrind-setup.out"] * len(dumps),
                                  strict=False):
                shutil.copy(dump, run.HERE / "results" / name)
    for r in rounds:
        print(orjson.dumps(r).decode())
    if args.per_read:
        short, long, idle = rounds
        reads = args.requests * PER_READ_EXTRA
        per_read = (long["instructions"] - short["instructions"]) / reads
        per_s = idle["instructions"] / idle["seconds"]
        busy = per_read - per_s * (long["seconds"] - short["seconds"]) / reads
        print(f"{label}: gateway instructions per one-token read "
              f"({args.requests} answers of {short['tokens']} and {long['tokens']} tokens "
              f"at {PER_READ_RATE:g}/s): {per_read:,.0f}; idle gateway {per_s:,.0f} per s, "
              f"so {busy:,.0f} per read without the idle work of the extra seconds")
        return 0
    if args.callgrind:
        print(f"{label}: gateway instructions per request ({args.requests} requests): "
              f"{ir / args.requests:,.0f}")
        return 0
    cost = statistics.median(r["gateway_us_per_request"] for r in rounds)
    print(f"{label}: gateway CPU per request (median of {len(rounds)} x {args.requests}): "
          f"{cost:.0f} µs")
    if args.profile:
        print(top(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
