"""What an idle open stream costs the gateway in memory, and what it is made of.

    .venv/bin/python bench/memory_probe.py [--streams 2000] [--trace 25] [--objects]
                                          [--http streaming|httptools|h11] [--patch NAME ...]
                                          [--env KEY=VALUE ...] [--json out.json]

Setting (as ``bench/run.py``'s capacity phase): the standalone simulator
(``tokenrelay simulate``) in its own process; the gateway in a child process of this
script, built exactly as ``tokenrelay serve`` builds it (same settings from the same
environment, same uvicorn options) plus one route, ``/__probe/mark``, that takes a
measurement inside the gateway; N clients in this process (raw asyncio sockets, the load
generator's ``Stream``), each a ``POST /api/chat`` that the simulator holds before its first
token (``first_token_delay_s`` = an hour), with heartbeats every ``--heartbeat`` seconds.

Reports, per open stream (after - before, divided by N):

* RSS (``VmRSS``, plus ``RssAnon``); measured in the same run as the others, but before
  them, so their own allocations are not in it. With ``--trace`` the RSS includes
  tracemalloc's own bookkeeping: take the RSS figure from a run without ``--trace``.
* ``--trace K``: Python-allocated bytes (tracemalloc, all domains, K frames) grouped by the
  allocating line, and by the first frame of the traceback that is in a named package
  (who asked for the memory).
* ``--objects``: GC-tracked objects by type (count and ``sys.getsizeof``).

With ``--dump DIR`` the two snapshots are kept; ``--analyze DIR --streams N`` prints their
biggest allocation sites by whole traceback.

``--src DIR`` imports tokenrelay from a copy of ``src/`` (others may be editing the tree);
``--python`` runs the gateway under another interpreter (its own venv with the same
packages).

``--patch`` applies a named experiment inside the gateway before the app is built (see
``PATCHES``: ``event_list``; the experiments that paid off are in the code now, the last
one the streaming HTTP/1.1 client that replaced aiohttp, ``httpclient.py``);
``--uvicorn JSON`` adds uvicorn options;
``--env`` sets environment variables of the gateway (e.g. MALLOC_ARENA_MAX=2,
PYTHONMALLOC=malloc). Everything is loopback and bounded; the processes it starts are
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import free_port, simulator, stop, wait_http  # noqa: E402

MARK = "/__probe/mark"


# --------------------------------------------------------------------------- the gateway


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _object_counts() -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        t = type(obj)
        name = f"{t.__module__}.{t.__qualname__}"
        entry = counts.setdefault(name, [0, 0])
        entry[0] += 1
        with contextlib.suppress(Exception):
            entry[1] += sys.getsizeof(obj)
    return counts


_HTTP = {"streaming": "tokenrelay.protocol:StreamingHttpToolsProtocol",
         "httptools": "httptools", "h11": "h11"}
_PACKAGES = ("tokenrelay", "uvicorn", "starlette", "aiohttp", "asyncio", "uvloop",
             "multidict", "yarl", "httptools", "h11")


def _owner(tb: Any) -> str:
    """The innermost frame that belongs to a named package, as 'pkg/file.py:line'."""
    for frame in reversed(tb):  # a Traceback lists the oldest frame first
        name = frame.filename
        for pkg in _PACKAGES:
            marker = f"/{pkg}/"
            if marker in name:
                return f"{pkg}/{name.split(marker, 1)[1]}:{frame.lineno}"
    return f"{tb[0].filename.rsplit('/', 1)[-1]}:{tb[0].lineno}" if len(tb) else "?"


class Probe:
    """The measurements the gateway takes of itself, by name."""

    def __init__(self, dump: str | None = None) -> None:
        self.marks: dict[str, dict[str, Any]] = {}
        self.dump = dump

    def mark(self, name: str, objects: bool) -> dict[str, Any]:
        import tracemalloc

        gc.collect()
        entry: dict[str, Any] = {"status": _status(), "time": time.time()}
        if objects:
            entry["objects"] = _object_counts()
        if tracemalloc.is_tracing():
            entry["traced"] = tracemalloc.get_traced_memory()[0]
            entry["snapshot"] = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
        if self.dump and "snapshot" in entry:  # for analysis after the run
            entry["snapshot"].dump(os.path.join(self.dump, f"{name}.snap"))
        self.marks[name] = entry
        return {"status": entry["status"], "traced": entry.get("traced")}

    def report(self, a: str, b: str, n: int, top: int) -> dict[str, Any]:
        x, y = self.marks[a], self.marks[b]
        out: dict[str, Any] = {
            "rss_per_stream": (y["status"]["VmRSS"] - x["status"]["VmRSS"]) / n,
            "anon_per_stream": (y["status"]["RssAnon"] - x["status"]["RssAnon"]) / n,
        }
        if "objects" in x and "objects" in y:
            rows = []
            for name, (count, size) in y["objects"].items():
                c0, s0 = x["objects"].get(name, (0, 0))
                if count - c0:
                    rows.append((name, (count - c0) / n, (size - s0) / n))
            rows.sort(key=lambda r: -r[2])
            out["objects"] = rows[:top]
            out["objects_total"] = [sum(r[1] for r in rows), sum(r[2] for r in rows)]
        if "snapshot" in x and "snapshot" in y:
            out["traced_per_stream"] = (y["traced"] - x["traced"]) / n
            stats = y["snapshot"].compare_to(x["snapshot"], "lineno")
            out["by_line"] = [
                (f"{s.traceback[0].filename.split('site-packages/')[-1].split('/src/')[-1]}"
                 f":{s.traceback[0].lineno}", s.size_diff / n, s.count_diff / n)
                for s in stats[:top]
            ]
            owners: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            for s in y["snapshot"].compare_to(x["snapshot"], "traceback"):
                key = _owner(s.traceback)
                owners[key] += s.size_diff
                counts[key] += s.count_diff
            out["by_owner"] = [(k, v / n, counts[k] / n) for k, v in owners.most_common(top)]
            out["tracebacks"] = [
                (s.size_diff / n, s.count_diff / n,
                 [f"{f.filename.split('site-packages/')[-1].split('/src/')[-1]}:{f.lineno}"
                  for f in reversed(s.traceback)][:12])
                for s in y["snapshot"].compare_to(x["snapshot"], "traceback")[:top]
            ]
        return out


def _apply_patches(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()


def _patch_event_list() -> None:
    """asyncio.Event keeps its waiters in a list instead of a deque (760 bytes empty).

    Event only appends, removes and iterates its waiters, which a list does as well.
    Applies to every Event: uvicorn's two per connection and the Generation's.
    """
    import asyncio.locks

    def init(self: Any) -> None:
        self._waiters = []
        self._value = False

    asyncio.locks.Event.__init__ = init  # type: ignore[method-assign]


PATCHES = {
    "event_list": _patch_event_list,
}


def child(cfg: dict[str, Any]) -> None:
    """The gateway: ``tokenrelay serve``'s own construction plus the probe route."""
    if cfg.get("trace"):
        import tracemalloc

        tracemalloc.start(cfg["trace"])
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tokenrelay.app import create_app
    from tokenrelay.config import load_settings
    from tokenrelay.logs import configure_logging
    from tokenrelay.server import serve

    _apply_patches(cfg.get("patches", []))
    settings = load_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json,
                      secrets=settings.secrets)
    app = create_app(settings)
    probe = Probe(cfg.get("dump"))

    async def mark(request: Request) -> JSONResponse:
        q = request.query_params
        if "report" in q:
            return JSONResponse(probe.report(q["a"], q["b"], int(q["n"]), int(q.get("top", 25))))
        return JSONResponse(probe.mark(q["name"], q.get("objects") == "1"))

    # First in the route list: no middleware or wrapper is added around the streams.
    app.router.routes.insert(0, Route(MARK, mark, methods=["GET"]))
    kwargs: dict[str, Any] = dict(  # as cli.cmd_serve
        host=settings.host, port=settings.port, loop="uvloop",
        http=_HTTP[cfg.get("http", "streaming")],
        log_level=settings.log_level, access_log=False, proxy_headers=False, backlog=4096,
    )
    kwargs.update(cfg.get("uvicorn", {}))
    serve(app, settings.drain_s, **kwargs)


# --------------------------------------------------------------------------- the clients


def _get(url: str, timeout: float = 600) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


async def _clients(gw_url: str, n: int, heartbeat_s: float, objects: bool, top: int,
                   settle_s: float) -> dict[str, Any]:
    from loadgen import IDLE_SIM, Target, warm_idle_path

    loop = asyncio.get_running_loop()
    target = Target("gateway", gw_url, "sim-fast")
    idle_sim = IDLE_SIM
    await warm_idle_path(target)  # as the capacity phase does
    q = "&objects=1" if objects else ""
    before = await loop.run_in_executor(None, _get, f"{gw_url}{MARK}?name=before{q}")
    streams = [target.chat(i, idle_sim) for i in range(n)]
    sem = asyncio.Semaphore(200)

    async def open_one(s: Any) -> None:
        async with sem:
            await target.open(s)
            await s.opened

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(s) for s in streams))
    open_s = time.perf_counter() - t0
    opened = [s for s in streams if s.status == 200 and not s.done.done()]
    if opened:
        await asyncio.wait([s.heartbeat_seen for s in opened], timeout=heartbeat_s * 2.5 + 5)
    await asyncio.sleep(max(settle_s, heartbeat_s * 1.2))
    alive = sum(1 for s in streams if s.heartbeats >= 1 and not s.done.done())
    after = await loop.run_in_executor(None, _get, f"{gw_url}{MARK}?name=after{q}")
    report = await loop.run_in_executor(
        None, _get, f"{gw_url}{MARK}?report=1&a=before&b=after&n={len(opened)}&top={top}")
    for s in streams:
        s.abort()
    await asyncio.sleep(0.5)
    report.update(streams=n, opened=len(opened), alive=alive, open_s=open_s,
                  before=before, after=after)
    return report


# --------------------------------------------------------------------------- main


def _print(report: dict[str, Any], label: str) -> None:
    kb = 1024
    print(f"== {label}: {report['opened']} open streams ({report['alive']} alive), "
          f"opened in {report['open_s']:.1f} s")
    print(f"RSS per stream:  {report['rss_per_stream'] / kb:7.2f} KB "
          f"(anon {report['anon_per_stream'] / kb:.2f} KB)")
    if "traced_per_stream" in report:
        print(f"traced per stream: {report['traced_per_stream'] / kb:7.2f} KB (tracemalloc)")
        print("\n-- allocated by line (bytes/stream, blocks/stream)")
        for where, size, count in report["by_line"]:
            print(f"{size:9.0f} {count:6.1f}  {where}")
        print("\n-- by owner: innermost frame in a named package")
        for where, size, count in report["by_owner"]:
            print(f"{size:9.0f} {count:6.1f}  {where}")
    if "objects" in report:
        count, size = report["objects_total"]
        print(f"\n-- GC objects per stream: {count:.1f} objects, {size:.0f} bytes (getsizeof)")
        for name, c, s in report["objects"]:
            print(f"{s:9.0f} {c:6.2f}  {name}")


def analyze(folder: str, n: int, top: int) -> None:
    """Print the biggest allocation sites of a ``--dump`` folder by whole traceback
    (innermost frame first), per stream: what to read to see who holds what."""
    import tracemalloc

    before = tracemalloc.Snapshot.load(os.path.join(folder, "before.snap"))
    after = tracemalloc.Snapshot.load(os.path.join(folder, "after.snap"))

    def short(frame: Any) -> str:
        name = frame.filename.split("site-packages/")[-1].split("/src/")[-1]
        return f"{re.sub(r'^.*/lib/python3[.0-9]*/', '', name)}:{frame.lineno}"

    stats = after.compare_to(before, "traceback")
    print(f"traced per stream: {sum(s.size_diff for s in stats) / n:,.0f} bytes")
    for stat in stats[:top]:
        frames = [short(f) for f in reversed(stat.traceback)][:8]
        print(f"{stat.size_diff / n:7.0f} {stat.count_diff / n:5.1f}  " + " <- ".join(frames))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--heartbeat", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="extra seconds to wait before the 'after' mark")
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0 = off)")
    parser.add_argument("--objects", action="store_true", help="count GC objects by type")
    parser.add_argument("--http", default="streaming", choices=sorted(_HTTP),
                        help="streaming: tokenrelay's protocol, as `tokenrelay serve` uses")
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES))
    parser.add_argument("--uvicorn", default="{}", help="extra uvicorn options (JSON)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateway")
    parser.add_argument("--src", help="import tokenrelay from this folder (a frozen copy of "
                        "src/, so runs compare while others edit the tree)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the gateway (another Python version)")
    parser.add_argument("--dump", help="with --trace: write the snapshots to this folder")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--analyze", metavar="DIR",
                        help="print the top tracebacks of a --dump folder (--streams = N)")
    args = parser.parse_args()
    if args.analyze:
        analyze(args.analyze, args.streams, args.top)
        return 0
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.src:  # the simulator and the gateway both inherit it
        os.environ["PYTHONPATH"] = os.path.abspath(args.src)
    cpus = sorted(os.sched_getaffinity(0))
    port = free_port()
    with simulator({cpus[0]}) as (sim_url, _sim):
        env = {
            **os.environ,
            "TOKENRELAY_UPSTREAM_URL": sim_url, "TOKENRELAY_DATABASE_URL": "none",
            "TOKENRELAY_HEARTBEAT_S": str(args.heartbeat),
            "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "3600", "TOKENRELAY_TOTAL_TIMEOUT_S": "7200",
            "TOKENRELAY_LOG_LEVEL": "warning", "TOKENRELAY_PORT": str(port),
            "TOKENRELAY_HOST": "127.0.0.1",
        }
        env.pop("TOKENRELAY_CONFIG", None)
        env.pop("TOKENRELAY_REDIS_URL", None)
        for item in args.env:
            key, _, value = item.partition("=")
            env[key] = value
        cfg = {"trace": args.trace, "http": args.http, "patches": args.patch,
               "uvicorn": json.loads(args.uvicorn),
               "dump": args.dump and os.path.abspath(args.dump)}
        # The gateway's log goes to a file: a pipe nobody reads while the clients run
        # would block the gateway once full.
        log = tempfile.TemporaryFile()
        gw = subprocess.Popen([args.python, __file__, "--child", json.dumps(cfg)], env=env,
                              stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", gw)
            factory = None
            with contextlib.suppress(ImportError):
                import uvloop

                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                report = runner.run(_clients(f"http://127.0.0.1:{port}", args.streams,
                                             args.heartbeat, args.objects, args.top,
                                             args.settle))
        finally:
            if gw.poll() is None:
                gw.send_signal(signal.SIGINT)
            stop(gw)
            log.seek(0)
            err = log.read().decode(errors="replace")
            log.close()
            if "ERROR" in err or "Exception in" in err:  # not the KeyboardInterrupt of stop()
                cut = err if len(err) < 6000 else err[:3000] + "\n...\n" + err[-3000:]
                print("gateway log:\n" + cut, file=sys.stderr)
    label = args.label or " ".join([args.http, *args.patch, *args.env]) or "baseline"
    _print(report, label)
    if args.json:
        report.update(label=label, args=vars(args))
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
