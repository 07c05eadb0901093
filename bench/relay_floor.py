"""The floor under one relayed read in Python: a relay that does nothing else (not part of
``make bench``).

    .venv/bin/python bench/relay_floor.py [--rounds 2] [--streams 200] [--tokens 150]

Runs the latency phase's load (``--streams`` streams of ``--tokens`` tokens at 50 tokens/s,
one token per read, the simulator upstream) through two gateways in turn, each pinned to
the gateway's core as ``run.py`` pins it:

* ``floor``: a minimal relay on uvloop (this file, ``--serve``): it reads the client's
  request, sends it to the simulator, and writes every upstream read to the client as it
  is, from the upstream connection's ``data_received``. No HTTP parsing, no framing, no
  journal: one ``recv``, one ``send`` and the loop's ``epoll`` per read, and the least
  Python a read can cost;
* ``tokenrelay``: ``tokenrelay serve`` on ``/api/chat`` (memory journal, history off).

It reports each one's CPU per read (``/proc/<pid>/task/*/schedstat``) and its kernel share
(``/proc/<pid>/stat``, clock ticks). Their difference is what tokenrelay's own work per read
costs; the floor is what no Python gateway on this loop and this kernel goes below. Rounds
alternate, so a busy machine slows both alike; read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

# -- the floor relay (runs in its own process) ---------------------------------------------


class _Upstream(asyncio.Protocol):
    """The relay's upstream connection: every read goes to the client as it is."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """The relay's client connection: its request (head and Content-Length body) goes to
    the upstream once complete; nothing else is read."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            return
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length:
            assert self.transport is not None
            self.upstream = _Upstream(self.transport)
            asyncio.get_running_loop().create_task(self._connect(self.buffer))

    async def _connect(self, request: bytes) -> None:
        assert self.upstream is not None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: self.upstream, self.host, self.port)
        transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _serve(port: int, upstream: str) -> None:
    host, _, up_port = upstream.split("//", 1)[1].split("/", 1)[0].rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, int(up_port)), "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


# -- the measurement ---------------------------------------------------------------------------


@contextmanager
def _floor(upstream: str, cpus: set[int]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = run.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), upstream],
                            preexec_fn=run._preexec(cpus), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        run.stop(proc)


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the floor relay exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the floor relay did not listen")


def _cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of all threads from schedstat, kernel share from /proc stat ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return total / 1e9, int(fields[12]) / max(1, int(fields[11]) + int(fields[12]))


def _measure(name: str, url: str, pid: int, spec: dict[str, Any],
             load_cpus: set[int]) -> dict[str, Any]:
    target = "direct" if name == "floor" else "gateway"  # the wire format the client reads
    spec = {**spec, "targets": {target: url}, "pids": {}}
    run.loadgen({**spec, "streams": 20, "tokens": 10}, load_cpus, 120)  # warm-up
    cpu0, _ = _cpu(pid)
    result = run.loadgen(spec, load_cpus, 300)[target]
    cpu1, kernel = _cpu(pid)
    # One token per read (the pace): a token is a read, unless a busy machine merged some
    # (then "frames" < "tokens" for tokenrelay, and the figure is per token).
    return {"name": name, "cpu_us_per_read": (cpu1 - cpu0) / max(1, result["tokens"]) * 1e6,
            "kernel_share_since_start": round(kernel, 2), "tokens": result["tokens"],
            "frames": result.get("frames"), "gap_p99_ms": result.get("gap_p99_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(int(args.serve[0]), args.serve[1]))
        return 0
    gw_cpus, load_cpus = run.cores(sorted(os.sched_getaffinity(0)))
    spec = {"phase": "latency", "model": "sim-fast", "heartbeat_s": 5.0,
            "streams": args.streams, "tokens": args.tokens, "rate": args.rate, "ramp_s": 1.0}
    rows: list[dict[str, Any]] = []
    with run.simulator(load_cpus) as (sim_url, _sim):
        for i in range(args.rounds):
            order = ("floor", "tokenrelay") if i % 2 == 0 else ("tokenrelay", "floor")
            for name in order:
                if name == "floor":
                    with _floor(sim_url, gw_cpus) as (url, proc):
                        rows.append(_measure(name, url, proc.pid, spec, load_cpus))
                else:
                    with run.gateway(sim_url, gw_cpus, 5.0) as (url, proc):
                        rows.append(_measure(name, url, proc.pid, spec, load_cpus))
                print(json.dumps(rows[-1]), file=sys.stderr)
    for name in ("floor", "tokenrelay"):
        cpu = [r["cpu_us_per_read"] for r in rows if r["name"] == name]
        print(f"{name:10s} CPU per read: median {statistics.median(cpu):.1f} µs "
              f"(runs: {', '.join(f'{c:.1f}' for c in cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
