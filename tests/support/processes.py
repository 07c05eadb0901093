"""``tokenrelay serve`` subprocesses on free loopback ports, for multi-process tests, and
:func:`serve_dry_run` for what the command decides before it listens."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

TOKENRELAY = Path(sys.executable).with_name("tokenrelay")


async def wait_listening(port: int, what: str, tries: int = 200) -> None:
    """Until 127.0.0.1:``port`` accepts a connection (another process started listening:
    nothing to await but the port itself); ``tries`` x 50 ms at most, then RuntimeError."""
    for _ in range(tries):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"{what} did not start listening on port {port}")


def serve_dry_run(env: dict[str, str], *args: str, cwd: Path | None = None
                  ) -> subprocess.CompletedProcess[str]:
    """Run the real ``tokenrelay serve`` command with its server made a no-op (nothing
    listens) and only ``env`` (plus PATH) as its environment; its exit code and output."""
    code = (
        "import sys, tokenrelay.server; tokenrelay.server.serve = lambda *a, **k: None; "
        "from tokenrelay.cli import main; main(sys.argv[1:])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "serve", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Instance:
    """One ``tokenrelay serve`` subprocess."""

    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Launcher:
    """Starts instances that share one Redis prefix, one database and one upstream."""

    def __init__(self, env: dict[str, str], logs: Path, http: aiohttp.ClientSession) -> None:
        self.env = env
        self.logs = logs
        self.http = http
        self.started: list[Instance] = []

    async def start(
        self, *names: str, args: tuple[str, ...] = (), unset: tuple[str, ...] = (), **env: str
    ) -> list[Instance]:
        """Start instances; ``args`` are extra ``serve`` options, ``unset`` env names to drop."""
        instances = []
        for name in names:
            port = free_port()
            log = self.logs / f"{name}.log"
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    str(TOKENRELAY),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *args,
                    env={
                        key: value
                        for key, value in {
                            **self.env,
                            "TOKENRELAY_INSTANCE_ID": f"{name}-{secrets.token_hex(4)}",
                            **env,
                        }.items()
                        if key not in unset
                    },
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.logs,
                )
            instances.append(Instance(name, port, proc, log))
        self.started += instances
        await asyncio.gather(*(self._ready(i) for i in instances))
        return instances

    async def _ready(self, instance: Instance) -> None:
        """Poll /healthz until the instance answers (bounded)."""
        for _ in range(1200):
            if instance.proc.returncode is not None:
                raise RuntimeError(f"{instance.name} exited:\n{instance.log.read_text()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(instance.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{instance.name} did not start:\n{instance.log.read_text()[-3000:]}")

    async def aclose(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.started))
