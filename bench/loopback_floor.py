"""The kernel's share of one relayed read, measured alone (not part of ``make bench``).

    .venv/bin/python bench/loopback_floor.py [--rounds 100000]

A relayed token that arrives in its own read costs the gateway at least one ``recv`` of the
upstream socket and one ``send`` to the client socket, plus the event loop's ``epoll``.
On loopback, ``send`` also runs the receiver's TCP path. This times a 100-byte
``send`` + ``recv`` over a loopback TCP connection (TCP_NODELAY) and over a Unix socket
pair, in a tight loop, pinned to one CPU: a floor below which no relay in any language
gets on this machine. (The benchmark's figure for the gateway's kernel share, under load
and with cold caches, is higher.)
"""

from __future__ import annotations

import argparse
import os
import socket
import time


def per_round(a: socket.socket, b: socket.socket, rounds: int) -> float:
    payload = b"x" * 100
    for _ in range(1000):  # warm-up
        a.send(payload)
        b.recv(4096)
    start = time.perf_counter()
    for _ in range(rounds):
        a.send(payload)
        b.recv(4096)
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100_000)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with client, peer:
            tcp = per_round(client, peer, args.rounds)
    a, b = socket.socketpair()
    with a, b:
        unix = per_round(a, b, args.rounds)
    print(f"loopback TCP send+recv of 100 bytes: {tcp:.1f} µs; Unix socket pair: {unix:.1f} µs")


if __name__ == "__main__":
    main()
