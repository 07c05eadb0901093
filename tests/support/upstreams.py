"""Upstreams a new user points tokenrelay at by mistake, as real servers on loopback.

* :func:`closed_port`: nothing listens there (connection refused).
* :func:`plain_web_server`: Python's own ``http.server`` in a subprocess: an HTML 404 page
  for ``/v1/models`` and an HTML 501 for the chat POST, like any web server that is not
  an OpenAI-compatible API.
* :func:`chat_only_upstream`: the simulator, except that ``/v1/models`` is an HTML 404
  (servers that chat but do not list their models).
* :func:`self_signed_files` + ``running_asgi(app, ssl_certfile=..., ssl_keyfile=...)``: a
  TLS server whose certificate nobody trusts unless told to (``SSL_CERT_FILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from support.processes import wait_listening
from tokenrelay.simulator import SimulatorConfig, create_simulator

NOT_FOUND_PAGE = (b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
                  b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def plain_web_server(directory: Path) -> AsyncIterator[str]:
    """``python -m http.server`` on a free port; yields ``http://127.0.0.1:PORT``."""
    port = closed_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
        "--directory", str(directory),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_listening(port, "http.server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


class ChatOnly:
    """ASGI: the simulator's chat, but an HTML 404 page for every ``/models`` request."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.simulator = create_simulator(config)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/models"):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/html; charset=utf-8")]})
            await send({"type": "http.response.body", "body": NOT_FOUND_PAGE})
            return
        await self.simulator(scope, receive, send)


def chat_only_upstream(config: SimulatorConfig | None = None) -> ChatOnly:
    return ChatOnly(config or SimulatorConfig(speed=5.0, first_token_delay_scale=0.0))


def self_signed_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key, made by the openssl CLI."""
    if shutil.which("openssl") is None:  # scripts/system-deps.sh installs it (make test)
        raise RuntimeError("the openssl command is not installed: run scripts/system-deps.sh")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key
