"""A real HTTP proxy (PyPI's ``proxy.py``) as a subprocess on a free loopback port.

It speaks ``CONNECT`` tunnels and absolute-form requests, Basic proxy authentication
(``--basic-auth``) and, given a certificate, TLS to its clients (an ``https://`` proxy).
Proof that a request went through it: its access log (a tunnel is logged when it closes)
and the ``Via: 1.1 proxy.py`` header it adds to plain-HTTP requests it forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

_numbers = itertools.count()


@dataclass
class HttpProxy:
    """A running proxy: ``url`` (credentials included when it wants some) and its log."""

    port: int
    log: Path
    scheme: str = "http"
    host: str = "127.0.0.1"

    def url(self, userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo + '@' if userinfo else ''}{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def logged(self, needle: str, timeout: float = 20.0) -> str:
        """Until ``needle`` is in the access log (bounded); the log's text."""
        async with asyncio.timeout(timeout):
            while True:
                text = self.log_text()
                if needle in text:
                    return text
                await asyncio.sleep(0.05)  # a file another process appends to: no event


@contextlib.asynccontextmanager
async def running_proxy(
    workdir: Path,
    *,
    basic_auth: str | None = None,
    tls: tuple[Path, Path] | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[HttpProxy]:
    """Start ``python -m proxy`` on 127.0.0.1 (port 0, read back from its port file).
    ``tls`` is (certificate, key): the proxy then wants TLS from its clients."""
    n = next(_numbers)
    port_file, log = workdir / f"proxy-{n}.port", workdir / f"proxy-{n}.log"
    args = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--num-workers", "1", "--num-acceptors", "1",
            "--log-file", str(log), "--log-level", "INFO", "--timeout", "30"]
    if basic_auth is not None:
        args += ["--basic-auth", basic_auth]
    if tls is not None:
        args += ["--cert-file", str(tls[0]), "--key-file", str(tls[1])]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir,
    )
    try:
        async with asyncio.timeout(30):
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.returncode is not None:
                    raise RuntimeError(f"proxy.py exited: {await proc.stderr.read()!r}")  # type: ignore[union-attr]
                await asyncio.sleep(0.05)  # it writes the file once it listens
        port = int(port_file.read_text().split()[0])
        yield HttpProxy(port, log, "https" if tls else "http", host)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
