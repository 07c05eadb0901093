"""Gateways in front of two fault upstreams with a TOML config, and one question asked
through each client surface: ``/api/chat``, ``/v1`` streaming and ``/v1`` (the openai SDK).

Each provider of a config has its own :class:`FaultUpstream`, so an upstream's request log
is the log of one route: attempt counts and arrival times are read from it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson

from support.client import Stream, chat_body, read_stream
from support.gateway import Gateway, running_gateway
from tokenrelay.sse import SSEDecoder

SURFACES = ("chat", "v1-stream", "v1")  # v1-stream: the openai SDK; "v1-sse": raw bytes


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers and lists of them read the same in TOML


def provider(name: str, up: Any, *, first_token: float = 10, idle: float = 0.5,
             total: float = 60, attempts: int = 3, **extra: Any) -> str:
    """A ``[providers.name]`` table pointing at ``up`` (anything with a ``base_url``: a
    :class:`FaultUpstream`, the simulator) with quick retries."""
    table = {
        "base_url": up.base_url,
        "timeouts": {"connect": 2, "first_token": first_token, "idle": idle, "total": total},
        "retry": {"max_attempts": attempts, "base_delay": 0.01, "max_delay": 0.05},
        **extra,
    }
    return f"[providers.{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())


def model(name: str, provider_name: str, upstream_model: str, **extra: Any) -> str:
    table = {"provider": provider_name, "upstream_model": upstream_model, **extra}
    return f"[models.{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())


@contextlib.asynccontextmanager
async def config_gateway(*tables: str, **env: str) -> AsyncIterator[Gateway]:
    """A real gateway reading ``tables`` as its TOML config."""
    with tempfile.TemporaryDirectory(prefix="tokenrelay-failover-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text("\n".join(tables), encoding="utf-8")
        env = {"TOKENRELAY_CONFIG": str(path), "TOKENRELAY_HEARTBEAT_S": "0.2", **env}
        async with running_gateway(**env) as gw:
            yield gw


@dataclass
class Answer:
    """What one client saw: HTTP status, text, and the surface's own end."""

    surface: str
    status: int
    text: str = ""
    stream: Stream | None = None  # /api/chat
    end: dict[str, Any] = field(default_factory=dict)  # done/error data, or the v1 error
    model: str | None = None  # /v1: the model the response names
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        if self.surface == "chat":
            assert self.stream is not None
            last = self.stream.events[-1]
            return last.event == "done" and last.data["state"] == "complete"
        return self.status == 200 and not self.end

    @property
    def error_code(self) -> str | None:
        error = self.end.get("error") if self.end else None
        return error.get("code") if isinstance(error, dict) else None


async def ask(http: aiohttp.ClientSession, gw: Gateway, surface: str, model_name: str,
              content: str = "q") -> Answer:
    """Ask ``model_name`` one question through ``surface``."""
    body = chat_body(content, model_name)
    if surface == "chat":
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            stream = await read_stream(r)
        return Answer(surface, r.status, stream.text, stream, stream.events[-1].data,
                      raw=stream.raw)
    if surface == "v1-sse":  # /v1 streaming read raw, to see every byte on the wire
        async with http.post(gw.base_url + "/v1/chat/completions",
                             json={**body, "stream": True}) as r:
            raw = await r.read()
        text, end = "", {}
        for event in SSEDecoder().decode(raw):
            if event.data == b"[DONE]":
                continue
            chunk = orjson.loads(event.data)
            if "error" in chunk:
                end = chunk
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
        return Answer(surface, r.status, text, end=end, raw=raw)
    client = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
    try:
        if surface == "v1":
            result = await client.chat.completions.with_raw_response.create(
                model=model_name, messages=body["messages"])
            data = result.parse()
            return Answer(surface, result.status_code, data.choices[0].message.content or "",
                          model=data.model, headers=dict(result.headers))
        text, answer_model = "", None
        stream = await client.chat.completions.create(
            model=model_name, messages=body["messages"], stream=True)
        error: dict[str, Any] = {}
        try:
            async for chunk in stream:
                answer_model = chunk.model
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        except openai.APIError as exc:  # an error chunk inside the stream
            error = {"error": {"code": getattr(exc, "code", None), "message": exc.message}}
        return Answer(surface, 200, text, end=error, model=answer_model)
    except openai.APIStatusError as exc:
        err = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else exc.body
        if not isinstance(err, dict):
            err = {"message": str(err)}
        return Answer(surface, exc.status_code, end={"error": err},
                      headers=dict(exc.response.headers))
    finally:
        await client.close()
