"""``tokenrelay bench``: the article's model comparison, measured through the gateway.

    tokenrelay bench --model sim-chat --model sim-fast --model sim-reasoner [--url URL]

Each model gets ``--requests`` answers (``--concurrency`` at a time) through
``POST /api/chat``; per model it reports time to first token (p50/p95, the first text the
user sees: answer or reasoning), decode speed from the first token (p50, tokens from the
``done`` event's usage, else one per frame), total time per answer (p50) and errors, as a
table and a chart (PNG or SVG, matplotlib). Numbers are measured by the client, so they
include the gateway: that is the point.

Without ``--url`` a gateway is started in this process on a free loopback port, with the
upstreams of the usual configuration (``TOKENRELAY_*``, config file) or, with none, the
built-in simulator; so the command works offline. Its SQL store is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tokenrelay.sse import SSEDecoder

__all__ = ["ModelResult", "Sample", "run_model_bench"]


@dataclass(slots=True)
class Sample:
    """One answer as the client saw it."""

    ttft_s: float | None = None
    decode_tps: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class ModelResult:
    model: str
    samples: list[Sample] = field(default_factory=list)

    def _ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    def summary(self) -> dict[str, Any]:
        ok = self._ok()
        ttft = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
        tps = [s.decode_tps for s in ok if s.decode_tps is not None]
        total = [s.total_s for s in ok]
        return {
            "model": self.model,
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "ttft_p50_ms": _pct(ttft, 50),
            "ttft_p95_ms": _pct(ttft, 95),
            "decode_tokens_per_s_p50": _pct(tps, 50),
            "total_p50_s": _pct(total, 50),
            "tokens_p50": _pct([float(s.tokens) for s in ok], 50),
            "error_messages": sorted({s.error for s in self.samples if s.error})[:5],
        }


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


async def _one(
    http: aiohttp.ClientSession, url: str, model: str, args: Any, headers: dict[str, str]
) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
    }
    sample = Sample()
    start = time.perf_counter()
    first = last = None
    frames = 0
    try:
        async with http.post(url + "/api/chat", json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                sample.error = f"HTTP {resp.status}: {text}"
                return sample
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for event in decoder.decode(chunk):
                    if event.event in ("message", "reasoning"):
                        frames += 1
                        last = now
                        if first is None:
                            first = now
                    elif event.event == "done":
                        data = orjson.loads(event.data)
                        usage = data.get("usage") or {}
                        sample.tokens = int(usage.get("completion_tokens") or frames)
                        if data.get("state") != "complete":
                            sample.error = f"ended {data.get('state')}"
                    elif event.event == "error":
                        data = orjson.loads(event.data)
                        sample.error = str(data.get("error", {}).get("message", "error"))[:200]
            if not sample.tokens and sample.error is None:
                sample.error = "stream ended without a done event"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
    sample.total_s = time.perf_counter() - start
    if first is not None:
        sample.ttft_s = first - start
        if last is not None and last > first and sample.tokens > 1:
            sample.decode_tps = (sample.tokens - 1) / (last - first)
    return sample


async def _measure(url: str, args: Any) -> list[ModelResult]:
    # Benchmark answers stay out of the page's history and /api/stats.
    headers = {"Accept": "text/event-stream", "X-TokenRelay-History": "off"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    results = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for model in args.models:
            result = ModelResult(model)
            limit = asyncio.Semaphore(max(1, args.concurrency))

            async def bounded(model: str = model, limit: asyncio.Semaphore = limit) -> Sample:
                async with limit:
                    return await _one(http, url, model, args, headers)

            result.samples = list(
                await asyncio.gather(*(bounded() for _ in range(max(1, args.requests))))
            )
            results.append(result)
            print(f"  {model}: {len(result.samples)} requests done", file=sys.stderr)
    return results


@contextlib.asynccontextmanager
async def _local_gateway() -> AsyncIterator[str]:
    """The real app on 127.0.0.1:<free port> in this event loop (lifespan included)."""
    from tokenrelay.app import create_app
    from tokenrelay.config import load_settings
    from tokenrelay.server import running_in_loop

    environ = {**os.environ, "TOKENRELAY_DATABASE_URL": "none"}
    app = create_app(load_settings(environ=environ))
    async with running_in_loop(
        app, lifespan="on", http="httptools", timeout_graceful_shutdown=1
    ) as url:
        yield url


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_table(rows: list[dict[str, Any]], where: str) -> str:
    head = ("model", "requests", "errors", "TTFT p50 ms", "TTFT p95 ms", "decode tok/s p50",
            "total p50 s")
    body = [
        (r["model"], str(r["requests"]), str(r["errors"]), _fmt(r["ttft_p50_ms"], ".0f"),
         _fmt(r["ttft_p95_ms"], ".0f"), _fmt(r["decode_tokens_per_s_p50"], ".1f"),
         _fmt(r["total_p50_s"], ".2f"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"Models measured through tokenrelay ({where})", "", line(head), sep,
                      *(line(r) for r in body)])


def save_chart(rows: list[dict[str, Any]], path: str) -> None:
    """Three panels: TTFT (p50 bar, p95 whisker), decode tokens/s, total time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 2.2 * len(names) + 5), 3.8))
    p50 = [r["ttft_p50_ms"] or 0.0 for r in rows]
    p95 = [max(0.0, (r["ttft_p95_ms"] or 0.0) - (r["ttft_p50_ms"] or 0.0)) for r in rows]
    axes[0].bar(x, p50, yerr=[[0.0] * len(rows), p95], capsize=4, color="#4c78a8")
    axes[0].set_title("time to first token, ms\n(bar p50, whisker p95)")
    axes[1].bar(x, [r["decode_tokens_per_s_p50"] or 0.0 for r in rows], color="#59a14f")
    axes[1].set_title("decode tokens/s (p50)")
    axes[2].bar(x, [r["total_p50_s"] or 0.0 for r in rows], color="#e15759")
    axes[2].set_title("total time per answer, s (p50)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("tokenrelay bench: models through the gateway")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


async def run_model_bench(args: Any) -> int:
    """Measure each ``--model`` through a gateway; print the table, save chart (and JSON)."""
    if not args.models:
        print("tokenrelay bench: name at least one --model", file=sys.stderr)
        return 2
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".png", ".svg"):
        print("tokenrelay bench: --out must end in .png or .svg", file=sys.stderr)
        return 2
    if args.url:
        url = args.url.rstrip("/")
        results = await _measure(url, args)
        where = url
    else:
        async with _local_gateway() as url:
            results = await _measure(url, args)
        where = "in-process gateway"
    return _report([r.summary() for r in results], where, args)


def _report(rows: list[dict[str, Any]], where: str, args: Any) -> int:
    """Print the table, save the chart (and JSON); the exit status counts errors."""
    print(render_table(rows, where))
    for row in rows:
        for message in row["error_messages"]:
            print(f"  {row['model']}: {message}", file=sys.stderr)
    save_chart(rows, args.out)
    print(f"chart: {args.out}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            {"where": where, "prompt": args.prompt, "max_tokens": args.max_tokens,
             "models": rows}, option=orjson.OPT_INDENT_2))
        print(f"json: {args.json}")
    return 1 if any(r["errors"] for r in rows) else 0
