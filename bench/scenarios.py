"""The request-rate and sustained-streams scenarios of ``bench/run.py`` (issue 17).

* ``requests``: short answers (16 tokens, unpaced), 32 concurrent, a new connection each,
  against the simulator directly and through ``/api/chat`` of three gateways side by side
  in one run: history off, SQLite history (the default), PostgreSQL history -> requests/s
  and added TTFT p50/p99. The targets take turns in rounds (order rotating) and the ratio
  to history off is the median of the rounds' ratios, so a shared machine's drift hits
  every target alike;
* ``ttft1``: the same one request at a time -> added TTFT p50/p99 at concurrency 1;
* ``sustained``: ramp concurrent 50 tok/s streams (one token per read) until a step's
  inter-token gap p99.9 exceeds twice the pace -> streams sustained per core, for one
  process (pinned to one core) and for ``--workers 2`` (Redis journal, both cores).
  The direct run gives the ceiling of the load generator and simulator themselves: a
  gateway figure equal to it means "at least".

Every gateway of a phase runs at once (idle while another is measured), so the rows
of one run are measured within the same minute of a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

PHASES = ("requests", "ttft1", "sustained")
HISTORY = ("off", "sqlite", "postgresql")
FULL = {
    "requests": {"requests": 2000, "concurrency": 32, "tokens": 16, "rounds": 5},
    "ttft1": {"requests": 300, "concurrency": 1, "tokens": 16, "rounds": 3},
    "sustained": {"rate": 50.0, "step": 100, "step_workers2": 25, "step_s": 2.0,
                  "settle_s": 1.0, "max_steps": 20},
}
QUICK = {
    "requests": {"requests": 40, "concurrency": 4, "tokens": 16, "rounds": 2},
    "ttft1": {"requests": 10, "concurrency": 1, "tokens": 16, "rounds": 2},
    "sustained": {"rate": 50.0, "step": 5, "step_s": 1.0, "settle_s": 0.5, "max_steps": 2},
}
PG_ADMIN = os.environ.get("TOKENRELAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TOKENRELAY_BENCH_REDIS", "redis://127.0.0.1:6379/0")


# --------------------------------------------------------------------------- databases


def _pg(sql: str) -> None:
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@contextlib.contextmanager
def pg_database() -> Iterator[str | None]:
    """A private PostgreSQL database for one phase (None when there is no server)."""
    name = f"tokenrelay_bench_{secrets.token_hex(4)}"
    try:
        _pg(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # no PostgreSQL here: the row says so
        print(f"  (no PostgreSQL at {PG_ADMIN}: {type(exc).__name__}; row skipped)",
              file=sys.stderr)
        yield None
        return
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with contextlib.suppress(Exception):
            _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- one phase


def run_phase(phase: str, spec: dict[str, Any], sim_url: str, sim_pid: int,
              gw_cpus: set[int], load_cpus: set[int], heartbeat: float,
              timeout: float) -> dict[str, Any]:
    """Start this phase's gateways, drive them (and the simulator) with one load generator."""
    import run  # run.py imports this module: not at the top

    with contextlib.ExitStack() as stack:
        targets = {"direct": sim_url}
        pids: dict[str, int] = {}

        def start(name: str, cpus: set[int], **kwargs: Any) -> None:
            url, proc = stack.enter_context(run.gateway(sim_url, cpus, heartbeat, **kwargs))
            targets[name], pids[name] = url, proc.pid

        if phase in ("requests", "ttft1"):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenrelay-bench-"))
            start("off", gw_cpus)
            start("sqlite", gw_cpus, database_url=f"sqlite:///{tmp}/history.db")
            pg = stack.enter_context(pg_database())
            if pg is not None:
                start("postgresql", gw_cpus, database_url=pg)
        else:
            start("gateway", gw_cpus)
            both = gw_cpus | load_cpus
            if len(both) > 1 and _redis_up():
                prefix = f"tokenrelay-bench-{secrets.token_hex(4)}:"
                start("workers2", both, workers=2, env_extra={
                    "TOKENRELAY_REDIS_URL": REDIS, "TOKENRELAY_REDIS_PREFIX": prefix})
        full = {**spec, "targets": targets, "pids": {"upstream": sim_pid},
                "gateway_pids": pids}
        return run.loadgen(full, load_cpus, timeout=timeout)


def _redis_up() -> bool:
    import socket

    host, port = REDIS.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        print(f"  (no Redis at {REDIS}: --workers 2 row skipped)", file=sys.stderr)
        return False


# --------------------------------------------------------------------------- the table


def _values(runs: list[dict[str, Any]], *path: str) -> list[float]:
    out = []
    for r in runs:
        node: Any = r
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int | float):
            out.append(float(node))
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs and (min, max) ranges, for the rows of :func:`rows`."""
    s: dict[str, Any] = {}

    def put(key: str, values: list[float]) -> None:
        if values:
            s[key] = _median(values)
            s[key + "_range"] = (min(values), max(values))

    for phase in ("requests", "ttft1"):
        if not any(phase in r for r in runs):
            continue
        put(f"{phase}_direct_rps", _values(runs, phase, "direct", "requests_per_s"))
        for q in ("ttft_p50_ms", "ttft_p99_ms"):
            put(f"{phase}_direct_{q}", _values(runs, phase, "direct", q))
        for name in HISTORY:
            put(f"{phase}_{name}_rps", _values(runs, phase, name, "requests_per_s"))
            put(f"{phase}_{name}_errors", _values(runs, phase, name, "errors"))
            put(f"{phase}_{name}_cpu_us", [  # gateway CPU (all its threads) per request
                r[phase][name]["cpu_gateway_s"] / r[phase][name]["requests"] * 1e6
                for r in runs if phase in r and name in r[phase]
                and "cpu_gateway_s" in r[phase][name]])
            put(f"{phase}_{name}_ratio", [  # within a run: the median of its rounds' ratios
                statistics.median(x / o for x, o in zip(r[phase][name]["rps_rounds"],
                                                        r[phase]["off"]["rps_rounds"],
                                                        strict=True) if o)
                for r in runs if phase in r and name in r[phase]])
            for q in ("ttft_p50_ms", "ttft_p99_ms"):  # added to direct, run by run
                put(f"{phase}_{name}_added_{q}", [
                    r[phase][name][q] - r[phase]["direct"][q] for r in runs
                    if phase in r and name in r[phase] and r[phase][name][q] is not None
                    and r[phase]["direct"][q] is not None])
    if any("sustained" in r for r in runs):
        for name, cores in (("direct", 1), ("gateway", 1), ("workers2", 2)):
            put(f"sustained_{name}", _values(runs, "sustained", name, "sustained"))
            put(f"sustained_{name}_per_core",
                [v / cores for v in _values(runs, "sustained", name, "sustained")])
        put("sustained_cpu_us_per_read", _values(runs, "sustained", "gateway", "cpu_us_per_read"))
        put("sustained_cpu_bound", _values(runs, "sustained", "gateway", "cpu_bound_streams"))
    return s


def _cell(s: dict[str, Any], key: str, fmt: str) -> str:
    value = s.get(key)
    if value is None:
        return "—"
    low, high = s.get(key + "_range", (value, value))
    text = fmt.format(value)
    if low != high:
        text += f" ({fmt.format(low)}…{fmt.format(high)})"
    return text


def rows(s: dict[str, Any], sizes: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows for run.py's table: (measure, direct, tokenrelay, added/ratio, target, met)."""
    from run import _ok
    out: list[tuple[str, ...]] = []
    labels = {"off": "history off", "sqlite": "SQLite history",
              "postgresql": "PostgreSQL history"}
    for phase, target_rps in (("requests", 1500.0), ("ttft1", None)):
        if f"{phase}_off_rps" not in s:
            continue
        t = sizes[phase]
        head = f"{phase}: {t['tokens']}-token answers, {t['concurrency']} concurrent"
        out.append((f"{head}, direct: requests/s",
                    _cell(s, f"{phase}_direct_rps", "{:,.0f}"), "", "", "", ""))
        for name in HISTORY:
            if f"{phase}_{name}_rps" not in s:
                continue
            ratio = s.get(f"{phase}_{name}_ratio")
            target = met = ""
            if phase == "requests" and name != "off" and ratio is not None:
                target, met = ">= x0.75", _ok(ratio, 0.75, higher=True)
                if name == "sqlite" and target_rps:
                    target += f", >= {target_rps:,.0f}/s"
                    enough = (s.get(f"{phase}_{name}_rps") or 0) >= target_rps
                    met = "yes" if met == "yes" and enough else "no"
            out.append((f"{head}, {labels[name]}: requests/s", "",
                        _cell(s, f"{phase}_{name}_rps", "{:,.0f}"),
                        "" if name == "off" else _cell(s, f"{phase}_{name}_ratio", "x{:.2f}"),
                        target, met))
            if phase == "requests":
                out.append((f"  {labels[name]}: gateway CPU µs per request", "",
                            _cell(s, f"{phase}_{name}_cpu_us", "{:,.0f}"), "", "", ""))
            for q, label in (("ttft_p50_ms", "added TTFT p50 ms"),
                             ("ttft_p99_ms", "added TTFT p99 ms")):
                key = f"{phase}_{name}_added_{q}"
                target, met = "", ""
                if phase == "ttft1" and q == "ttft_p50_ms":
                    target, met = "<= +0.5", _ok(s.get(key), 0.5)
                if phase == "requests" and q == "ttft_p99_ms" and name != "off":
                    off = s.get(f"{phase}_off_added_{q}")
                    if off is not None and s.get(key) is not None:
                        target = f"<= off +2 ({off + 2:+.2f})"
                        met = _ok(s[key] - off, 2.0)
                out.append((f"  {labels[name]}: {label}", "", "",
                            _cell(s, key, "{:+.2f}"), target, met))
    if "sustained_gateway" in s:
        t = sizes["sustained"]
        head = f"sustained: {t['rate']:g} tok/s streams, one token per read, gap p99.9 <= 2x pace"
        out.append((f"{head}: streams (harness ceiling = direct)",
                    _cell(s, "sustained_direct", "{:,.0f}"),
                    _cell(s, "sustained_gateway", "{:,.0f}"), "", "", ""))
        out.append(("  streams sustained per core, one process", "",
                    _cell(s, "sustained_gateway_per_core", "{:,.0f}"), "", ">= 500",
                    _ok(s.get("sustained_gateway_per_core"), 500, True)))
        out.append(("  gateway CPU µs per read during the ramp => streams one core could "
                    "carry", "", _cell(s, "sustained_cpu_us_per_read", "{:.1f}"),
                    _cell(s, "sustained_cpu_bound", "{:,.0f}"), "<= 30 µs",
                    _ok(s.get("sustained_cpu_us_per_read"), 30)))
        if "sustained_workers2" in s:
            out.append(("  streams sustained per core, --workers 2 (Redis journal)", "",
                        _cell(s, "sustained_workers2_per_core", "{:,.0f}"), "", "", ""))
    return out
