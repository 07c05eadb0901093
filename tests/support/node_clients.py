"""The Node clients people use (``openai`` npm SDK, the Vercel AI SDK), for client tests.

Installed once per machine with npm, at pinned versions, into a cache directory named
after the pins (``~/.cache/tokenrelay-node/<digest>``, or ``$TOKENRELAY_NODE_CACHE``);
a file lock lets parallel test workers share one install. The scripts in ``tests/node``
are CommonJS, so ``NODE_PATH`` finds the cached packages. Nothing is skipped: without
node or npm the test fails with the command that fixes it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Versions that run on Node 20 (Debian's); the newest majors need Node 22.
PACKAGES = {
    "openai": "6.30.1",
    "ai": "6.0.333",
    "@ai-sdk/openai": "3.0.141",
    "zod": "4.1.12",
}
SCRIPTS = Path(__file__).resolve().parent.parent / "node"
_FIX = "make system-deps (or: sudo apt-get install -y nodejs npm; Node >= 20)"


def _cache_dir() -> Path:
    digest = hashlib.sha256(json.dumps(PACKAGES, sort_keys=True).encode()).hexdigest()[:12]
    root = os.environ.get("TOKENRELAY_NODE_CACHE") or Path.home() / ".cache" / "tokenrelay-node"
    return Path(root) / digest


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; the Node client tests need it: {_FIX}")
    return path


def node_modules() -> Path:
    """The cached ``node_modules`` with every pinned package, installed on first use."""
    node = _require("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"node {version.stdout.strip()} is too old (need >= 20): {_FIX}")
    npm = _require("npm")
    target = _cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    stamp = target / ".installed"
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install, whatever the number of workers
        if not stamp.exists():
            (target / "package.json").write_text(json.dumps(
                {"private": True, "dependencies": PACKAGES}, indent=2))
            command = [npm, "install", "--no-audit", "--no-fund", "--no-save",
                       "--prefix", str(target)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.fail(f"npm install failed (exit {done.returncode}); run by hand: "
                            f"{' '.join(command)}\n{done.stderr[-2000:]}")
            stamp.write_text(json.dumps(PACKAGES))
    return target / "node_modules"


def installed_version(package: str) -> str:
    data = json.loads((node_modules() / package / "package.json").read_text())
    return str(data["version"])


async def run_script(script: str, *args: str, timeout: float = 120) -> Any:
    """Run ``tests/node/<script>`` with the cached packages; its stdout's last line is JSON."""
    modules = node_modules()
    env = {**os.environ, "NODE_PATH": str(modules)}
    proc = await asyncio.create_subprocess_exec(
        _require("node"), str(SCRIPTS / script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{err.decode()[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1])
