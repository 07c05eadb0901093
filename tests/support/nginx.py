"""A real nginx (scripts/system-deps.sh installs it) on a free loopback port, running one
of the configurations in ``deploy/`` with its ports and paths rewritten for a test."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from support.processes import free_port

NGINX = "/usr/sbin/nginx"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _prefixed(conf: str, prefix: Path) -> str:
    """The config with pid, logs and temp files under ``prefix``, in the foreground."""
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    head = f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\ndaemon off;\n"
    paths = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in TEMP_KINDS)
    paths += f"    access_log {prefix}/access.log;\n"
    return head + conf.replace("http {\n", "http {\n" + paths, 1)


def prepare(prefix: Path, conf: str) -> Path:
    """Write ``conf`` (pid, logs and temp files moved under ``prefix``) into ``prefix``."""
    prefix.chmod(0o755)
    for kind in TEMP_KINDS:
        (prefix / kind).mkdir()
        (prefix / kind).chmod(0o777)  # workers may run as another user than the master
    path = prefix / "nginx.conf"
    path.write_text(_prefixed(conf, prefix))
    return path


@contextlib.asynccontextmanager
async def running_nginx(name: str, rewrite: Callable[[str, int], str],
                        probe: str = "/healthz") -> AsyncIterator[str]:
    """``deploy/<name>`` passed through ``rewrite(conf, port)``; yields nginx's base URL
    once ``probe`` answers."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-nginx-") as tmp:
        port = free_port()
        path = prepare(Path(tmp), rewrite((DEPLOY / name).read_text(), port))
        proc = await asyncio.create_subprocess_exec(
            NGINX, "-p", tmp, "-c", str(path),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    if proc.returncode is not None:
                        assert proc.stderr is not None
                        raise RuntimeError(f"nginx exited: {(await proc.stderr.read()).decode()}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(base_url + probe) as resp:
                            if resp.status < 500:
                                break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("nginx did not answer")
            yield base_url
        finally:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
