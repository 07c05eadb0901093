"""Smoke tests of the benchmarks (no timing assertions: benchmarks are not tests).

``bench/run.py --quick`` must start its servers, drive a tiny load and print its table;
``tokenrelay bench`` must measure two simulated models through an in-process gateway and
write its chart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without tokenrelay settings that would point elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env.update(extra)
    return env


def test_bench_run_quick_prints_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--results", str(tmp_path),
         "--only", "throughput,latency,capacity,resume"],
        capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tokenrelay benchmark" in out
    for row in ("tokens/s", "CPU µs/token, batched", "TTFT p99 ms", "inter-token p99 ms",
                "idle streams alive", "RSS per idle open stream", "first replayed event"):
        assert row in out, row
    [result] = list(tmp_path.glob("bench-*.json"))
    data = json.loads(result.read_text())
    run = data["runs"][0]
    assert run["throughput"]["gateway"]["errors"] == 0
    assert run["throughput"]["direct"]["errors"] == 0
    assert run["latency"]["gateway"]["errors"] == 0
    assert run["capacity"]["gateway"]["alive"] == run["capacity"]["gateway"]["streams"]
    assert run["resume"]["gateway"]["resumes"] == data["sizes"]["resume"]["streams"]
    assert run["resume"]["gateway"]["wrong_first_id"] == 0


def test_bench_request_rate_and_sustained_scenarios_run_on_a_tiny_load(tmp_path: Path) -> None:
    """Issue 17's scenarios: history off / SQLite / PostgreSQL side by side, one request
    at a time, and the sustained-streams ramp (one process and --workers 2)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--results", str(tmp_path),
         "--only", "requests,ttft1,sustained"],
        capture_output=True, text=True, timeout=180, env=_clean_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("history off: requests/s", "SQLite history: requests/s",
                "PostgreSQL history: requests/s", "SQLite history: added TTFT p99 ms",
                "1 concurrent, SQLite history", "streams sustained per core, one process",
                "--workers 2"):
        assert row in out, row
    [result] = list(tmp_path.glob("bench-*.json"))
    data = json.loads(result.read_text())
    run = data["runs"][0]
    for phase in ("requests", "ttft1"):
        for target in ("direct", "off", "sqlite", "postgresql"):
            measured = run[phase][target]
            assert measured["complete"] == measured["requests"] == data["sizes"][phase][
                "requests"], (phase, target)
    for target in ("direct", "gateway", "workers2"):
        steps = run["sustained"][target]["steps"]
        assert steps and steps[0]["streams"] == data["sizes"]["sustained"]["step"], target


def test_tokenrelay_bench_compares_models_and_writes_a_chart(tmp_path: Path) -> None:
    chart = tmp_path / "models.png"
    report = tmp_path / "models.json"
    proc = subprocess.run(
        [str(BIN / "tokenrelay"), "bench", "--model", "sim-fast", "--model", "sim-chat",
         "--requests", "2", "--max-tokens", "40", "--out", str(chart), "--json", str(report)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=_clean_env(TOKENRELAY_SIMULATOR_SPEED="50", MPLBACKEND="Agg"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TTFT p50 ms" in proc.stdout and "decode tok/s p50" in proc.stdout
    assert "| sim-fast" in proc.stdout and "| sim-chat" in proc.stdout
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["model"]: r for r in json.loads(report.read_text())["models"]}
    assert rows["sim-chat"]["errors"] == 0 and rows["sim-chat"]["requests"] == 2
    assert rows["sim-chat"]["ttft_p50_ms"] is not None
    assert rows["sim-chat"]["tokens_p50"] == 40


def test_tokenrelay_bench_rejects_an_unknown_chart_format(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "tokenrelay"), "bench", "--model", "sim-fast", "--out",
         str(tmp_path / "chart.gif")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_clean_env(),
    )
    assert proc.returncode == 2 and ".png or .svg" in proc.stderr

